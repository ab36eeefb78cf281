"""Region proposal network (Ren, He, Girshick & Sun 2015, "Faster R-CNN", NIPS, Sec. 3.1) on frozen conv
features, as used for retrieval by Gordo, Almazán, Revaud & Larlus 2016 ("Deep Image Retrieval", ECCV, Sec. 3.2):
R-MAC pooled over the proposals instead of the rigid grid.

Everything is plain PyTorch (no torchvision): anchors, box coding, IoU, NMS, RoI max-pooling.

* Coordinates: boxes are ``(x1, y1, x2, y2)`` float pixels of the *map frame*, i.e. the image whose size is
  ``(W * stride, H * stride)`` for an ``H x W`` conv map (stride 16 for VGG16 conv5_3): cell ``(i, j)`` covers
  pixels ``[j*s, (j+1)*s) x [i*s, (i+1)*s)``. Widths are ``x2 - x1`` (continuous, no ``+1``).
  :func:`to_map_frame` / :func:`from_map_frame` convert from / to original-image pixels by proportional scaling.
* Anchors (Ren Sec. 3.1.1): ``k = len(sizes) * len(ratios)`` boxes of area ``size^2`` and aspect ``h/w = ratio``
  centred on each cell; order (cell row, cell column, ratio, size).
* Head (Ren Sec. 3.1, Fig. 3): 3x3 conv (``mid`` channels) + ReLU, then two sibling 1x1 convs: ``k`` objectness
  logits (a sigmoid / binary log loss, equivalent to Ren's 2k-way softmax) and ``4k`` box deltas.
* Box coding (Ren Eq. 2): ``t_x = (x - x_a)/w_a, t_y = (y - y_a)/h_a, t_w = log(w/w_a), t_h = log(h/h_a)``.
* Training labels (Ren Sec. 3.1.2): positive = IoU > 0.7 with a ground-truth box, or the highest IoU for a
  ground-truth box; negative = IoU < 0.3 with every ground-truth box; 256 anchors sampled per image with up to
  half positives. Loss (Ren Eq. 1): log loss + smooth L1 on the positives' deltas, both averaged over the
  sampled anchors (Ren's lambda = 10 with N_reg ~ 2400 locations is the same balance).
* Proposals (Ren Sec. 3.3): decode, clip, drop boxes under ``min_size``, keep the ``pre_nms`` best, NMS at IoU
  0.7, keep the top ``k``.

:func:`train_rpn` trains a :class:`RPN` on (conv map, ground-truth boxes) samples -- the automatically estimated
boxes of the training split (:func:`instance_search.train.cleaning.load_boxes`) -- with SGD, a progress bar and
one resumable checkpoint per epoch. :func:`save_rpn` / :func:`load_rpn` write and read a trained model (plain
state dict + JSON config, read back with ``torch.load(weights_only=True)``). :func:`roi_pool` is Fast R-CNN's RoI
max-pooling (Girshick 2015, Sec. 2.1), used by :mod:`instance_search.train.detector`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FileFormatError
from ..io import atomic_write_bytes, file_sha256
from ..ops.integral import window_max
from ..io import read_state, save_state

__all__ = [
    "DEFAULT_SIZES", "DEFAULT_RATIOS", "base_anchors", "grid_anchors", "box_iou", "encode_boxes", "decode_boxes",
    "clip_boxes", "nms", "smooth_l1", "assign_anchors", "sample_labels", "RPNHead", "RPN", "rpn_loss",
    "RPNTrainConfig", "RPNSample", "train_rpn", "detection_recall", "roi_pool", "to_map_frame",
    "from_map_frame", "save_rpn", "load_rpn", "RPNFileError", "rpa_recipe", "rpn_for_recipe", "rpa_local_vectors",
    "grid_boxes",
]

_FORMAT = "instance_search.RPN"
_FORMAT_VERSION = 1
_CKPT_FORMAT = "instance_search.RPN.checkpoint"

#: anchor sizes in pixels for images described at a longer side of ~384 px (Ren uses 128/256/512 at ~600-1000)
DEFAULT_SIZES = (48, 96, 192, 384)
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
_DELTA_CLAMP = math.log(1000.0 / 16.0)  # largest exp() argument when decoding w/h (as in Faster R-CNN)


class RPNFileError(FileFormatError):
    """An RPN model or checkpoint file that is missing parts, damaged or inconsistent."""


# ------------------------------------------------------------------------------------------------ boxes
def _boxes(b, name: str = "boxes") -> torch.Tensor:
    t = b if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b, dtype=np.float64))
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.ndim == 1 and t.numel() == 4:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"{name} must be an (N, 4) array of x1, y1, x2, y2, got shape {tuple(t.shape)}")
    return t


def to_map_frame(boxes, image_wh: tuple[float, float], map_hw: tuple[int, int], stride: int = 16) -> np.ndarray:
    """Original-image pixel boxes -> map-frame pixels (the image of size ``(W*stride, H*stride)``)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx = map_hw[1] * stride / float(image_wh[0])
    sy = map_hw[0] * stride / float(image_wh[1])
    return b * np.array([sx, sy, sx, sy])


def from_map_frame(boxes, image_wh: tuple[float, float], map_hw: tuple[int, int], stride: int = 16) -> np.ndarray:
    """Map-frame pixel boxes -> original-image pixels (inverse of :func:`to_map_frame`)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx = float(image_wh[0]) / (map_hw[1] * stride)
    sy = float(image_wh[1]) / (map_hw[0] * stride)
    return b * np.array([sx, sy, sx, sy])


def base_anchors(sizes: Sequence[float] = DEFAULT_SIZES, ratios: Sequence[float] = DEFAULT_RATIOS) -> torch.Tensor:
    """The ``k`` anchors of one position, centred on (0, 0) (Ren et al. 2015, Sec. 3.1.1): for each ratio
    ``r = h/w`` (outer) and size ``s`` (inner), ``w = s/sqrt(r)``, ``h = s*sqrt(r)``. Shape (k, 4)."""
    if not sizes or not ratios or min(sizes) <= 0 or min(ratios) <= 0:
        raise ValueError(f"anchor sizes and ratios must be non-empty and positive, got {sizes}, {ratios}")
    rows = []
    for r in ratios:
        for s in sizes:
            w, h = s / math.sqrt(r), s * math.sqrt(r)
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(height: int, width: int, stride: int, base: torch.Tensor) -> torch.Tensor:
    """All anchors of an ``height x width`` map: ``base`` shifted to every cell centre ``((j+.5)s, (i+.5)s)``.
    Shape (height*width*k, 4), ordered (row, column, anchor) -- the order of :meth:`RPNHead.forward`."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)


def box_iou(a, b) -> torch.Tensor:
    """Intersection over union of every pair: (N, 4) x (M, 4) -> (N, M) (0 where the union is empty)."""
    a, b = _boxes(a, "a"), _boxes(b, "b")
    dt = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dt), b.to(dt)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def encode_boxes(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Regression targets of ``boxes`` w.r.t. ``anchors`` (Ren et al. 2015, Eq. 2): (N, 4) -> (N, 4)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    if bool((aw <= 0).any() or (ah <= 0).any() or (bw <= 0).any() or (bh <= 0).any()):
        raise ValueError("encode_boxes: anchors and boxes must have positive width and height")
    return torch.stack([(bx - ax) / aw, (by - ay) / ah, torch.log(bw / aw), torch.log(bh / ah)], dim=1)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes` (w/h deltas clamped at log(1000/16) as in Faster R-CNN): (N, 4)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(max=_DELTA_CLAMP), deltas[:, 3].clamp(max=_DELTA_CLAMP)
    cx, cy = dx * aw + ax, dy * ah + ay
    w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def clip_boxes(boxes: torch.Tensor, image_wh: tuple[float, float]) -> torch.Tensor:
    """Clip boxes to ``[0, w] x [0, h]``."""
    w, h = float(image_wh[0]), float(image_wh[1])
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


def nms(boxes, scores, iou_threshold: float = 0.7, max_keep: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression (Ren et al. 2015, Sec. 3.3): repeatedly keep the best remaining box and
    drop the others whose IoU with it is > ``iou_threshold``. Returns kept indices, best first (at most
    ``max_keep``). Ties in score: the lower index first."""
    b = _boxes(boxes).detach()
    s = torch.as_tensor(scores).detach().reshape(-1)
    if s.shape[0] != b.shape[0]:
        raise ValueError(f"nms: {b.shape[0]} boxes but {s.shape[0]} scores")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"nms: iou_threshold must be in [0, 1], got {iou_threshold}")
    n = b.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = np.lexsort((np.arange(n), -s.double().numpy())).astype(np.int64)
    bb = b.double().numpy()[order]
    x1, y1, x2, y2 = bb[:, 0], bb[:, 1], bb[:, 2], bb[:, 3]
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    limit = n if max_keep is None else int(max_keep)
    for i in range(n):  # IoU of the kept box with the boxes after it only: O(n) per kept box
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        iw = np.clip(np.minimum(x2[i], x2[i + 1:]) - np.maximum(x1[i], x1[i + 1:]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[i + 1:]) - np.maximum(y1[i], y1[i + 1:]), 0, None)
        inter = iw * ih
        union = area[i] + area[i + 1:] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        suppressed[i + 1:] |= iou > iou_threshold
    return torch.from_numpy(order[np.asarray(keep, dtype=np.int64)])


def smooth_l1(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth L1 (Girshick 2015, Eq. 3), element-wise: ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - beta/2``."""
    ax = x.abs()
    if beta <= 0:
        return ax
    return torch.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


# ------------------------------------------------------------------------------------------------ RoI pooling
def roi_pool(fmap: torch.Tensor, boxes, output_size: int | tuple[int, int] = 7, stride: int = 16) -> torch.Tensor:
    """RoI max-pooling (Girshick 2015, "Fast R-CNN", Sec. 2.1): each box (map-frame pixels) is projected onto
    the map -- cells ``floor(x1/s) .. ceil(x2/s)`` (end-exclusive), clipped, at least one cell -- and divided
    into an ``ph x pw`` grid of sub-windows; bin ``(i, j)`` covers rows ``floor(i h/ph) .. ceil((i+1) h/ph)``
    of the box (likewise columns) and is max-pooled. ``fmap``: (C, H, W); returns (R, C, ph, pw).
    Differentiable in ``fmap`` (the gradient goes to each bin's arg-max)."""
    if fmap.ndim != 3:
        raise ValueError(f"roi_pool expects one (C, H, W) map, got shape {tuple(fmap.shape)}")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    b = _boxes(boxes).detach().to(torch.float64)
    C, H, W = fmap.shape
    R = b.shape[0]
    if R == 0:
        return fmap.new_zeros(0, C, ph, pw)
    if not bool(torch.isfinite(b).all()):
        raise ValueError("roi_pool: boxes must be finite")
    x0 = torch.clamp(torch.floor(b[:, 0] / stride), 0, W - 1)
    y0 = torch.clamp(torch.floor(b[:, 1] / stride), 0, H - 1)
    x1 = torch.maximum(torch.clamp(torch.ceil(b[:, 2] / stride), max=W), x0 + 1)
    y1 = torch.maximum(torch.clamp(torch.ceil(b[:, 3] / stride), max=H), y0 + 1)
    rw, rh = x1 - x0, y1 - y0  # >= 1
    jj = torch.arange(pw, dtype=torch.float64)
    ii = torch.arange(ph, dtype=torch.float64)
    bx0 = x0[:, None] + torch.floor(jj[None] * rw[:, None] / pw)  # (R, pw)
    bx1 = x0[:, None] + torch.ceil((jj[None] + 1) * rw[:, None] / pw)
    by0 = y0[:, None] + torch.floor(ii[None] * rh[:, None] / ph)  # (R, ph)
    by1 = y0[:, None] + torch.ceil((ii[None] + 1) * rh[:, None] / ph)
    X = bx0[:, None, :].expand(R, ph, pw).reshape(-1).long()
    Xw = (bx1 - bx0)[:, None, :].expand(R, ph, pw).reshape(-1).long()
    Y = by0[:, :, None].expand(R, ph, pw).reshape(-1).long()
    Yh = (by1 - by0)[:, :, None].expand(R, ph, pw).reshape(-1).long()
    # exact max of every bin (2-D sparse table of ops.integral.window_max, differentiable): (R*ph*pw, C)
    v = window_max(fmap if fmap.is_floating_point() else fmap.float(), torch.stack([X, Y, Xw, Yh], 1))
    return v.reshape(R, ph, pw, C).permute(0, 3, 1, 2).contiguous()


def grid_boxes(height: int, width: int, levels: int = 3, stride: int = 16) -> np.ndarray:
    """The rigid R-MAC grid (Tolias et al. 2016, Sec. 3; :func:`~instance_search.ops.pooling.rmac_regions`) of an
    ``height x width`` map as map-frame pixel boxes (R, 4) -- the baseline the proposals are compared with."""
    from ..ops.pooling import rmac_regions

    r = rmac_regions(height, width, levels=levels).astype(np.float64)
    return np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], 1) * stride


# ------------------------------------------------------------------------------------------------ the network
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
        from .rmac_head import boxes_to_cells

        boxes, _ = self.propose(fmap, top_k, **kw)
        return boxes_to_cells(boxes.numpy(), self.stride, int(fmap.shape[-2]), int(fmap.shape[-1]))


# ------------------------------------------------------------------------------------------------ training targets
def assign_anchors(anchors: torch.Tensor, gt: torch.Tensor, pos_iou: float = 0.7,
                   neg_iou: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor labels (Ren et al. 2015, Sec. 3.1.2): 1 = positive (IoU >= ``pos_iou`` with some ground-truth box,
    or the highest-IoU anchor(s) of a ground-truth box), 0 = negative (IoU < ``neg_iou`` with all), -1 = ignored.
    Returns (labels (N,) int64, index of the best ground-truth box per anchor (N,))."""
    n = anchors.shape[0]
    if gt.shape[0] == 0:
        return torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    iou = box_iou(anchors, gt)  # (N, G)
    best, arg = iou.max(dim=1)
    labels = torch.full((n,), -1, dtype=torch.int64)
    labels[best < neg_iou] = 0
    labels[best >= pos_iou] = 1
    gt_best = iou.max(dim=0).values  # (G,)
    for g in range(gt.shape[0]):
        if gt_best[g] > 0:
            hit = torch.nonzero(iou[:, g] == gt_best[g])[:, 0]
            labels[hit] = 1
            arg[hit] = g
    return labels, arg


def sample_labels(labels: torch.Tensor, batch: int = 256, positive_fraction: float = 0.5,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep at most ``batch`` labelled anchors, at most ``positive_fraction`` of them positive (Ren Sec. 3.1.3);
    the others become -1 (ignored). Returns a new label vector."""
    out = labels.clone()
    pos = torch.nonzero(labels == 1)[:, 0]
    neg = torch.nonzero(labels == 0)[:, 0]
    n_pos = min(int(batch * positive_fraction), pos.numel())
    n_neg = min(batch - n_pos, neg.numel())
    if pos.numel() > n_pos:
        drop = pos[torch.randperm(pos.numel(), generator=generator)[n_pos:]]
        out[drop] = -1
    if neg.numel() > n_neg:
        drop = neg[torch.randperm(neg.numel(), generator=generator)[n_neg:]]
        out[drop] = -1
    return out


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, gt: torch.Tensor,
             labels: torch.Tensor, matched: torch.Tensor, beta: float = 1.0 / 9.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN loss (Ren et al. 2015, Eq. 1) over the sampled anchors (``labels`` >= 0): mean binary log loss of the
    objectness and smooth-L1 of the positives' deltas, summed and divided by the number of sampled anchors.
    Returns (classification loss, regression loss)."""
    used = labels >= 0
    n = int(used.sum())
    if n == 0:
        zero = logits.sum() * 0.0
        return zero, zero
    cls = F.binary_cross_entropy_with_logits(logits[used], labels[used].to(logits.dtype), reduction="sum") / n
    pos = labels == 1
    if bool(pos.any()):
        target = encode_boxes(anchors[pos], gt[matched[pos]].to(anchors.dtype))
        reg = smooth_l1(deltas[pos] - target.to(deltas.dtype), beta).sum() / n
    else:
        reg = deltas.sum() * 0.0
    return cls, reg


# ------------------------------------------------------------------------------------------------ training
@dataclass
class RPNTrainConfig:
    """Settings of :func:`train_rpn` (defaults: Ren et al. 2015, Sec. 3.1.3, except the number of epochs)."""

    epochs: int = 6
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_drop_epoch: int = 0  # from this epoch (1-based) on, lr x 0.1; 0: never
    images_per_batch: int = 2  # gradients accumulated over this many images per SGD update
    anchors_per_image: int = 256
    positive_fraction: float = 0.5
    pos_iou: float = 0.7
    neg_iou: float = 0.3
    beta: float = 1.0 / 9.0
    seed: int = 0

    def validate(self) -> "RPNTrainConfig":
        for name in ("epochs", "images_per_batch", "anchors_per_image"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in (0, 1], got {self.positive_fraction}")
        if not 0 <= self.neg_iou <= self.pos_iou <= 1:
            raise ValueError(f"need 0 <= neg_iou <= pos_iou <= 1, got {self.neg_iou}, {self.pos_iou}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self


@dataclass
class RPNSample:
    """One training image: its conv map (a tensor, or a callable returning it) and ground-truth boxes in
    map-frame pixels (G, 4)."""

    fmap: Any
    boxes: np.ndarray
    name: str = ""

    def map(self) -> torch.Tensor:
        m = self.fmap() if callable(self.fmap) else self.fmap
        m = m if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m))
        return m.float()


def _sample_loss(rpn: RPN, s: RPNSample, cfg: RPNTrainConfig, gen: torch.Generator | None,
                 sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    fmap = s.map()
    H, W = int(fmap.shape[-2]), int(fmap.shape[-1])
    anchors = rpn.anchors(H, W)
    gt = torch.as_tensor(np.asarray(s.boxes, dtype=np.float32).reshape(-1, 4))
    logits, deltas = rpn(fmap)
    labels, matched = assign_anchors(anchors, gt, cfg.pos_iou, cfg.neg_iou)
    if sample:
        labels = sample_labels(labels, cfg.anchors_per_image, cfg.positive_fraction, gen)
    dev = logits.device
    return rpn_loss(logits, deltas, anchors.to(dev), gt.to(dev), labels.to(dev), matched.to(dev), cfg.beta)


def _config_key(rpn: RPN, cfg: RPNTrainConfig, samples: Sequence[RPNSample]) -> str:
    names = [s.name for s in samples]
    raw = json.dumps({"rpn": rpn.config(), "cfg": asdict(cfg), "n": len(samples), "names": names}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, rpn: RPN, opt, epoch: int, history: dict, key: str) -> None:
    buf = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu() for k, v in rpn.state_dict().items()}, "optimizer": opt.state_dict()},
               buf)
    atomic_write_bytes(path, buf.getvalue())
    meta = {"format": _CKPT_FORMAT, "epoch": epoch, "key": key, "sha256": file_sha256(path), "history": history}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())


def _load_checkpoint(path: Path, rpn: RPN, opt, key: str) -> tuple[int, dict]:
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise RPNFileError(f"{meta_path}: unreadable checkpoint description ({exc})") from exc
    if meta.get("format") != _CKPT_FORMAT or meta.get("key") != key:
        raise RPNFileError(f"{path}: checkpoint of other settings (key {meta.get('key')!r}, expected {key!r})")
    if file_sha256(path) != meta.get("sha256"):
        raise RPNFileError(f"{path}: checkpoint damaged (sha256 differs from {meta_path.name})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    rpn.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(meta["epoch"]), meta["history"]


def train_rpn(rpn: RPN, samples: Sequence[RPNSample], config: RPNTrainConfig | None = None,
              checkpoint_dir: str | os.PathLike | None = None, val_samples: Sequence[RPNSample] | None = None,
              resume: bool = True, progress: bool = True,
              on_epoch: Callable[[int, dict], None] | None = None) -> dict[str, list]:
    """Train ``rpn`` on ``samples`` (Ren et al. 2015, Sec. 3.1.3: SGD with momentum, 256 sampled anchors per
    image). One checkpoint per epoch in ``checkpoint_dir`` (``epoch-NNN.pt`` + ``.json``); with ``resume`` the run
    continues after the last checkpoint of the same settings. Returns the history: per epoch the mean training
    losses, wall seconds, and the validation loss on ``val_samples`` (all anchors labelled, no sampling)."""
    from tqdm.auto import tqdm

    cfg = (config or RPNTrainConfig()).validate()
    if not samples:
        raise ValueError("train_rpn: no training samples (images with ground-truth boxes)")
    for s in samples:
        b = np.asarray(s.boxes, dtype=np.float64).reshape(-1, 4)
        if len(b) == 0 or not np.all(np.isfinite(b)) or np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
            raise ValueError(f"training sample {s.name or '?'}: boxes must be non-empty, finite, x1 < x2, y1 < y2; "
                             f"got {b.tolist()}")
    params = [p for p in rpn.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    key = _config_key(rpn, cfg, samples)
    ckdir = None if checkpoint_dir is None else Path(checkpoint_dir)
    start, history = 0, {"epochs": []}
    if ckdir is not None and resume:
        done = sorted(ckdir.glob("epoch-*.pt"))
        for path in reversed(done):
            try:
                start, history = _load_checkpoint(path, rpn, opt, key)
                break
            except RPNFileError:
                continue
    for epoch in range(start, cfg.epochs):
        lr = cfg.lr * (0.1 if cfg.lr_drop_epoch and epoch + 1 >= cfg.lr_drop_epoch else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        rpn.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(samples), generator=gen).tolist()
        t0, c0 = time.perf_counter(), time.process_time()
        tot_c = tot_r = 0.0
        bar = tqdm(total=len(order), desc=f"RPN epoch {epoch + 1}/{cfg.epochs}", unit="img", disable=not progress,
                   dynamic_ncols=True)
        opt.zero_grad(set_to_none=True)
        for n, i in enumerate(order):
            lc, lr_ = _sample_loss(rpn, samples[i], cfg, gen)
            ((lc + lr_) / cfg.images_per_batch).backward()
            tot_c += float(lc.detach())
            tot_r += float(lr_.detach())
            if (n + 1) % cfg.images_per_batch == 0 or n + 1 == len(order):
                opt.step()
                opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(cls=f"{tot_c / (n + 1):.4f}", reg=f"{tot_r / (n + 1):.4f}")
        bar.close()
        rec = {"epoch": epoch + 1, "lr": lr, "train_cls": tot_c / len(order), "train_reg": tot_r / len(order),
               "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}
        if val_samples:
            rec.update(evaluate_loss(rpn, val_samples, cfg))
        history["epochs"].append(rec)
        if ckdir is not None:
            _save_checkpoint(ckdir / f"epoch-{epoch + 1:03d}.pt", rpn, opt, epoch + 1, history, key)
        if on_epoch is not None:
            on_epoch(epoch + 1, rec)
    rpn.eval()
    return history


@torch.no_grad()
def evaluate_loss(rpn: RPN, samples: Sequence[RPNSample], config: RPNTrainConfig | None = None) -> dict[str, float]:
    """Mean RPN losses over ``samples`` with every labelled anchor used (no sampling): ``val_cls``, ``val_reg``."""
    cfg = config or RPNTrainConfig()
    rpn.eval()
    c = r = 0.0
    for s in samples:
        lc, lr_ = _sample_loss(rpn, s, cfg, None, sample=False)
        c, r = c + float(lc), r + float(lr_)
    n = max(1, len(samples))
    return {"val_cls": c / n, "val_reg": r / n}


def detection_recall(proposals: Sequence, gt: Sequence, iou_thresholds: Sequence[float] = (0.5, 0.7),
                     ks: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """Detection recall: the fraction of ground-truth boxes matched (IoU >= t) by at least one of the first ``k``
    proposals of their image (Gordo et al. 2016, Fig. 4 middle). ``proposals``/``gt``: per image (N_i, 4) /
    (G_i, 4) boxes in the same frame, proposals best first. Returns ``{str(k): {str(t): recall}}`` (``k = 'all'``
    when ``ks`` is None)."""
    if len(proposals) != len(gt):
        raise ValueError(f"detection_recall: {len(proposals)} proposal lists for {len(gt)} images")
    ks_ = [None] if ks is None else [int(k) for k in ks]
    out: dict[str, dict[str, float]] = {}
    total = sum(len(np.asarray(g).reshape(-1, 4)) for g in gt)
    if total == 0:
        raise ValueError("detection_recall: no ground-truth boxes")
    for k in ks_:
        hits = {t: 0 for t in iou_thresholds}
        for p, g in zip(proposals, gt):
            g = np.asarray(g, dtype=np.float64).reshape(-1, 4)
            p = np.asarray(p, dtype=np.float64).reshape(-1, 4)
            if k is not None:
                p = p[:k]
            if len(g) == 0:
                continue
            best = box_iou(g, p).max(dim=1).values.numpy() if len(p) else np.zeros(len(g))
            for t in iou_thresholds:
                hits[t] += int((best >= t).sum())
        out["all" if k is None else str(k)] = {str(t): hits[t] / total for t in iou_thresholds}
    return out


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


# ------------------------------------------------------------------------------------------------ the recipe
_LOADED: dict[tuple[str, str], RPN] = {}


def rpa_recipe(rpn_model: str | os.PathLike, proposals: int = 256, max_size: int = 1024):
    """A :class:`~instance_search.recipes.base.Recipe` ``"rpa"``: R-MAC pooled over the top ``proposals`` RPN boxes
    instead of the rigid grid (Gordo et al. 2016, Sec. 3.2; Salvador et al. 2016, Sec. 3.1: region-wise pooling
    of the RPN proposals). The model's path and sha256 travel in the recipe."""
    from ..recipes.base import Recipe

    path = Path(rpn_model).expanduser().resolve()
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    rpn, cfg = load_rpn(path)
    return Recipe("rpa", backbone="vgg16", layer=cfg.get("layer", "conv5_3"), max_size=max_size,
                  extra={"rpn": str(path), "sha256": cfg["state_sha256"], "proposals": int(proposals)})


def rpn_for_recipe(extra: dict[str, Any]) -> RPN:
    """The RPN a ``rpa`` recipe names (loaded once per process); refuses a model file that changed since."""
    path = extra.get("rpn") if isinstance(extra, dict) else None
    if not path:
        raise ValueError("recipe 'rpa' needs a trained region proposal network (extra['rpn'] = a .pt from "
                         "benchmarks/bench_rpn.py / learn.rpn.save_rpn)")
    key = (str(path), str(extra.get("sha256", "")))
    rpn = _LOADED.get(key)
    if rpn is None:
        rpn, cfg = load_rpn(path)
        if extra.get("sha256") and cfg["state_sha256"] != extra["sha256"]:
            raise RPNFileError(f"{path}: this RPN file changed since the index was built with it")
        _LOADED[key] = rpn
    return rpn


@torch.no_grad()
def rpa_local_vectors(extra: dict[str, Any], fmap: torch.Tensor) -> np.ndarray:
    """(R, C) MACs of the top ``extra['proposals']`` RPN boxes of one conv map (Salvador et al. 2016, Sec. 3.1,
    RPA with max pooling; Gordo et al. 2016, Sec. 3.2), not normalised."""
    from ..ops.pooling import region_macs

    rpn = rpn_for_recipe(extra)
    cells = rpn.proposal_cells(fmap, int(extra.get("proposals", 256)))
    return region_macs(fmap.float(), cells).cpu().numpy().astype(np.float32)
