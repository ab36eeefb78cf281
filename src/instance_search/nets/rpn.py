"""Region proposal network (Ren, He, Girshick & Sun 2015, "Faster R-CNN", NIPS, Sec. 3.1) on frozen conv
features, as used for retrieval by Gordo, Almazán, Revaud & Larlus 2016 ("Deep Image Retrieval", ECCV, Sec. 3.2):
R-MAC pooled over the proposals instead of the rigid grid; and by Salvador et al. 2016 (RPA, CA-SR, CS-SR).

* Head (Ren Sec. 3.1, Fig. 3): 3x3 conv (``mid`` channels) + ReLU, then two sibling 1x1 convs: ``k`` objectness
  logits (a sigmoid / binary log loss, equivalent to Ren's 2k-way softmax) and ``4k`` box deltas over the anchors
  of :func:`~instance_search.ops.boxes.grid_anchors` (box coding: Ren Eq. 2, :mod:`instance_search.ops.boxes`).
* Proposals (Ren Sec. 3.3): decode, clip, drop boxes under ``min_size``, keep the ``pre_nms`` best, NMS at IoU
  0.7, keep the top ``k``. Boxes are map-frame pixels (see :mod:`instance_search.ops.boxes`).

Training: :mod:`instance_search.train.rpn` (``isearch train-rpn``). :func:`save_rpn` / :func:`load_rpn` write and
read a trained model (plain state dict + JSON config with its sha256, read back with
``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FileFormatError
from ..io import read_state, save_state
from ..ops.boxes import (DEFAULT_RATIOS, DEFAULT_SIZES, base_anchors, boxes_to_cells, clip_boxes, decode_boxes,
                         grid_anchors, nms)

__all__ = ["RPNHead", "RPN", "save_rpn", "load_rpn", "RPNFileError", "DEFAULT_SIZES", "DEFAULT_RATIOS"]

_FORMAT = "instance_search.RPN"
_FORMAT_VERSION = 1


class RPNFileError(FileFormatError):
    """An RPN model or checkpoint file that is missing parts, damaged or inconsistent."""


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 objectness (k) and 1x1 box-regression (4k) convs (Ren et al. 2015, Sec. 3.1)."""

    def __init__(self, in_channels: int = 512, mid_channels: int = 512, num_anchors: int = 12):
        super().__init__()
        if min(in_channels, mid_channels, num_anchors) < 1:
            raise ValueError("RPNHead: channel and anchor counts must be positive")
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.cls = nn.Conv2d(mid_channels, num_anchors, 1)
        self.reg = nn.Conv2d(mid_channels, 4 * num_anchors, 1)
        for m in (self.conv, self.cls, self.reg):  # Ren et al.: zero-mean Gaussian, std 0.01; zero bias
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> objectness logits (B, H*W*k) and deltas (B, H*W*k, 4), ordered (row, column, anchor)."""
        t = F.relu(self.conv(x))
        B, _, H, W = t.shape
        logits = self.cls(t).permute(0, 2, 3, 1).reshape(B, -1)
        deltas = self.reg(t).permute(0, 2, 3, 1).reshape(B, H, W, -1, 4).reshape(B, -1, 4)
        return logits, deltas


class RPN(nn.Module):
    """A region proposal network on one conv layer (VGG16 conv5_3 by default): :class:`RPNHead` + its anchors.

    ``propose(fmap, k)`` gives the top-``k`` boxes (map-frame pixels) after NMS. ``max_size`` records the longer
    image side the network was trained at (the anchors are in pixels: describe images at that size)."""

    def __init__(self, in_channels: int = 512, mid_channels: int = 512, sizes: Sequence[float] = DEFAULT_SIZES,
                 ratios: Sequence[float] = DEFAULT_RATIOS, stride: int = 16, layer: str = "conv5_3",
                 max_size: int | None = None):
        super().__init__()
        self.sizes = tuple(float(s) for s in sizes)
        self.ratios = tuple(float(r) for r in ratios)
        self.stride = int(stride)
        self.layer = layer
        self.max_size = None if max_size is None else int(max_size)
        self.register_buffer("base", base_anchors(self.sizes, self.ratios), persistent=False)
        self.head = RPNHead(in_channels, mid_channels, self.base.shape[0])
        self.in_channels, self.mid_channels = int(in_channels), int(mid_channels)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "RPN":
        """An (untrained) RPN of the architecture :meth:`config` describes."""
        return cls(int(cfg["in_channels"]), int(cfg["mid_channels"]), cfg["sizes"], cfg["ratios"], int(cfg["stride"]),
                   cfg.get("layer", "conv5_3"), cfg.get("max_size"))

    @property
    def num_anchors(self) -> int:
        return int(self.base.shape[0])

    def config(self) -> dict[str, Any]:
        return {"format": _FORMAT, "format_version": _FORMAT_VERSION, "in_channels": self.in_channels,
                "mid_channels": self.mid_channels, "sizes": list(self.sizes), "ratios": list(self.ratios),
                "stride": self.stride, "layer": self.layer, "max_size": self.max_size}

    def anchors(self, height: int, width: int) -> torch.Tensor:
        return grid_anchors(height, width, self.stride, self.base.cpu())

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, H, W) or (1, C, H, W) -> (logits (N,), deltas (N, 4)) over the N = H*W*k anchors."""
        x = fmap[None] if fmap.ndim == 3 else fmap
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != self.in_channels:
            raise ValueError(f"RPN expects one ({self.in_channels}, H, W) map, got shape {tuple(fmap.shape)}")
        dev = self.head.conv.weight.device
        logits, deltas = self.head(x.to(dev, torch.float32))
        return logits[0], deltas[0]

    @torch.no_grad()
    def propose(self, fmap: torch.Tensor, top_k: int = 256, pre_nms: int = 2000, nms_iou: float = 0.7,
                min_size: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposals of one map (Ren et al. 2015, Sec. 3.3): ``(boxes (<=top_k, 4) map-frame pixels, objectness
        probabilities)``, best first. ``min_size`` (pixels, default the stride) drops tiny boxes."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        H, W = int(fmap.shape[-2]), int(fmap.shape[-1])
        logits, deltas = self(fmap)
        logits, deltas = logits.cpu(), deltas.cpu()
        anchors = self.anchors(H, W)
        n = min(int(pre_nms), logits.shape[0])
        top = torch.topk(logits, n).indices
        boxes = clip_boxes(decode_boxes(anchors[top], deltas[top]), (W * self.stride, H * self.stride))
        scores = torch.sigmoid(logits[top])
        ms = float(self.stride if min_size is None else min_size)
        ok = ((boxes[:, 2] - boxes[:, 0]) >= ms) & ((boxes[:, 3] - boxes[:, 1]) >= ms)
        if not bool(ok.any()):  # degenerate map: fall back to the whole image
            return torch.tensor([[0.0, 0.0, W * self.stride, H * self.stride]]), torch.ones(1)
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, nms_iou, max_keep=top_k)
        return boxes[keep], scores[keep]

    def proposal_cells(self, fmap: torch.Tensor, top_k: int = 256, **kw) -> np.ndarray:
        """Proposals as feature-map cells ``(x, y, w, h)`` (for :func:`~instance_search.ops.pooling.region_macs`)."""
        boxes, _ = self.propose(fmap, top_k, **kw)
        return boxes_to_cells(boxes.numpy(), self.stride, int(fmap.shape[-2]), int(fmap.shape[-1]))


# ------------------------------------------------------------------------------------------------ files
def save_rpn(rpn: RPN, path: str | os.PathLike, **info: Any) -> Path:
    """Save ``rpn`` as a plain state dict (``.pt``) and its JSON config (``.json`` beside it, with the state
    file's sha256 and any ``info``, e.g. the training summary)."""
    return save_state(rpn, path, rpn.config(), **info)


def load_rpn(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[RPN, dict[str, Any]]:
    """Read a model written by :func:`save_rpn` (``torch.load(weights_only=True)``: no pickled code). Errors name
    the file."""
    path, cfg, state = read_state(path, _FORMAT, RPNFileError, "RPN", _FORMAT_VERSION, map_location)
    try:
        rpn = RPN.from_config(cfg)
        rpn.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise RPNFileError(f"{path}: not a readable RPN state dict ({type(exc).__name__}: {str(exc)[:300]})") from exc
    rpn.eval()
    return rpn.to(map_location), cfg
