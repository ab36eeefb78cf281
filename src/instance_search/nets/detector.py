"""A Faster R-CNN-style detector on VGG16 (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, "Faster R-CNN features
for instance search", CVPRW, Sec. 3; Girshick 2015, "Fast R-CNN", Sec. 2), for class-specific spatial re-ranking:

    pool4 ─▶ conv5_1..conv5_3 ─▶ RPN (nets.rpn) ─▶ proposals
                              └─▶ RoI max-pooling (p x p) ─▶ fc6 ─▶ fc7 ─▶ class scores (K+1), class boxes 4(K+1)

* :class:`DetectorHead` -- the Fast R-CNN head: RoI pooling (:func:`~instance_search.ops.boxes.roi_pool`), two FC
  layers with ReLU and dropout, a (K+1)-way softmax classifier (class 0 = background) and class-specific box
  regression (targets normalised by (0.1, 0.1, 0.2, 0.2) as in Faster R-CNN).
* :func:`class_detections` -- per object class the best proposal's probability and that proposal (the authors'
  default) or its regressed box (Salvador Sec. 3.3, what CS-SR ranks by).

Training (the base detector, fine-tuning strategies #1 / #2): :mod:`instance_search.train.detector`
(``isearch finetune``). Files: plain state dict + JSON config with its sha256 (:func:`save_detector`).
All boxes are map-frame pixels (see :mod:`instance_search.ops.boxes`).
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
from ..ops.boxes import clip_boxes, decode_boxes, roi_pool
from .rmac_head import RMACNet
from .rpn import RPN

__all__ = ["BBOX_STDS", "DetectorHead", "Detector", "class_detections", "save_detector", "load_detector",
           "DetectorFileError", "conv5_block", "vgg16_block", "DETECTION_BOXES"]

BBOX_STDS = (0.1, 0.1, 0.2, 0.2)  # Faster R-CNN's normalisation of the RoI box-regression targets
_FORMAT = "instance_search.Detector"


class DetectorFileError(FileFormatError):
    """A detector model or checkpoint file that is missing parts, damaged or inconsistent."""


# ------------------------------------------------------------------------------------------------ modules
def conv5_block(backbone=None) -> nn.Sequential:
    """VGG16's conv5_1..relu5_3 (input: pool4 maps), with the ImageNet weights of ``backbone`` when given."""
    net = RMACNet("conv5")
    if backbone is not None:
        net.init_from_backbone(backbone)
    return net.trunk


def vgg16_block(first: str, last: str, backbone=None) -> nn.Sequential:
    """VGG16's layers ``first`` .. ``last`` (children names of :class:`~instance_search.backbones.vgg16.VGG16`,
    inclusive), with the ImageNet weights of ``backbone`` when given (e.g. ``"conv2_1".."pool4"``: the layers that
    CS-SR strategy #2 fine-tunes below conv5, input pool1 maps)."""
    from collections import OrderedDict

    from ..backbones.vgg16 import VGG16

    vgg = VGG16()
    order = list(vgg._order)
    if first not in order or last not in order or order.index(first) > order.index(last):
        raise ValueError(f"no VGG16 block {first!r}..{last!r}")
    names = order[order.index(first):order.index(last) + 1]
    children = dict(vgg.features.named_children())
    if backbone is not None:
        src = dict(backbone.net.features.named_children())
        with torch.no_grad():
            for n in names:
                if isinstance(children[n], nn.Conv2d):
                    children[n].weight.copy_(src[n].weight)
                    children[n].bias.copy_(src[n].bias)
    return nn.Sequential(OrderedDict((n, children[n]) for n in names))


class DetectorHead(nn.Module):
    """Fast R-CNN head (Girshick 2015, Sec. 2): RoI max-pooling to ``pool x pool`` -> fc6 -> fc7 (ReLU, dropout)
    -> ``num_classes + 1`` class logits and ``4 (num_classes + 1)`` box deltas (class 0 = background).

    The pooled RoI vector is L2-normalised (times sqrt of its dimension, i.e. unit mean square) before fc6: here
    the FC layers start from random weights, and VGG16's raw conv5_3 activations (hundreds) would saturate them
    (Faster R-CNN starts from pre-trained fc6/fc7)."""

    def __init__(self, num_classes: int, in_channels: int = 512, pool: int = 3, hidden: int = 1024,
                 dropout: float = 0.5, stride: int = 16):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"DetectorHead needs at least one object class, got {num_classes}")
        if pool < 1 or hidden < 1 or not 0 <= dropout < 1:
            raise ValueError(f"DetectorHead: bad pool={pool}, hidden={hidden} or dropout={dropout}")
        self.in_channels, self.pool, self.hidden, self.stride = int(in_channels), int(pool), int(hidden), int(stride)
        self.dropout = float(dropout)
        self.fc6 = nn.Linear(in_channels * pool * pool, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        for m in (self.fc6, self.fc7):
            nn.init.normal_(m.weight, std=(2.0 / m.in_features) ** 0.5)  # He init for the ReLU layers
            nn.init.zeros_(m.bias)
        self.reset_classes(num_classes)

    @property
    def num_classes(self) -> int:
        return self.cls_score.out_features - 1

    def reset_classes(self, num_classes: int) -> "DetectorHead":
        """New classifier and box-regression layers for ``num_classes`` (+ background), fc6/fc7 kept
        (Salvador et al. 2016, Sec. 3.2: the output layers are replaced for the query classes)."""
        if num_classes < 1:
            raise ValueError(f"need at least one object class, got {num_classes}")
        dev = self.fc7.weight.device
        self.cls_score = nn.Linear(self.hidden, num_classes + 1).to(dev)
        self.bbox_pred = nn.Linear(self.hidden, 4 * (num_classes + 1)).to(dev)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        return self

    def features(self, fmap: torch.Tensor, boxes) -> torch.Tensor:
        """fc7 activations (R, hidden) of the boxes (map-frame pixels) of one (C, H, W) map."""
        x = F.normalize(roi_pool(fmap, boxes, self.pool, self.stride).flatten(1), dim=1) * self.fc6.in_features ** 0.5
        x = F.dropout(F.relu(self.fc6(x)), self.dropout, self.training)
        return F.dropout(F.relu(self.fc7(x)), self.dropout, self.training)

    def forward(self, fmap: torch.Tensor, boxes) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (R, K+1), box deltas (R, K+1, 4)) of the boxes of one map."""
        h = self.features(fmap, boxes)
        return self.cls_score(h), self.bbox_pred(h).reshape(h.shape[0], -1, 4)


class Detector(nn.Module):
    """conv5 block + :class:`~instance_search.nets.rpn.RPN` + :class:`DetectorHead` on VGG16 pool4 maps
    (Salvador et al. 2016, Sec. 3: Faster R-CNN with VGG16). ``classes``: names of the object classes."""

    def __init__(self, rpn: RPN, num_classes: int, classes: Sequence[str] | None = None, pool: int = 3,
                 hidden: int = 1024, dropout: float = 0.5, trunk: nn.Sequential | None = None,
                 lower: nn.Sequential | None = None):
        super().__init__()
        self.trunk = trunk if trunk is not None else conv5_block()
        #: VGG16 layers below conv5 that CS-SR strategy #2 fine-tuned (:func:`vgg16_block`, e.g. conv2_1..pool4;
        #: input pool1 maps), or None: then the detector reads pool4 / conv5_3 maps of the ImageNet VGG16
        self.lower = lower
        self.rpn = rpn
        self.head = DetectorHead(num_classes, rpn.in_channels, pool, hidden, dropout, rpn.stride)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        if len(self.classes) != num_classes:
            raise ValueError(f"{len(self.classes)} class names for {num_classes} classes")
        self.backbone_weights_sha256 = ""

    def set_classes(self, classes: Sequence[str]) -> "Detector":
        """Replace the output layers for new classes (fc6/fc7, conv5 and the RPN are kept)."""
        self.classes = list(classes)
        self.head.reset_classes(len(self.classes))
        return self

    def config(self) -> dict[str, Any]:
        h = self.head
        return {"format": _FORMAT, "format_version": 1, "rpn": self.rpn.config(), "classes": self.classes,
                "pool": h.pool, "hidden": h.hidden, "dropout": h.dropout,
                "backbone_weights_sha256": self.backbone_weights_sha256,
                **({"lower": list(self.lower._modules)} if self.lower is not None else {})}

    def conv_map(self, pool4: torch.Tensor) -> torch.Tensor:
        """conv5_3 map (C, H, W) of one pool4 map (C, H, W)."""
        if pool4.ndim != 3:
            raise ValueError(f"expected one (512, H, W) pool4 map, got shape {tuple(pool4.shape)}")
        return self.trunk(pool4[None].float())[0]

    @torch.no_grad()
    def detect(self, fmap: torch.Tensor, proposals: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detections on one conv5_3 map: (proposals (R, 4), class probabilities (R, K+1), class-specific boxes
        (R, K+1, 4), regressed and clipped), map-frame pixels."""
        was = self.training
        self.eval()
        props, _ = self.rpn.propose(fmap, proposals)
        logits, deltas = self.head(fmap.float(), props)
        probs = torch.softmax(logits, dim=1)
        R, K1 = probs.shape
        stds = torch.tensor(BBOX_STDS)
        boxes = decode_boxes(props[:, None, :].expand(R, K1, 4).reshape(-1, 4), (deltas * stds).reshape(-1, 4))
        H, W = int(fmap.shape[-2]), int(fmap.shape[-1])
        boxes = clip_boxes(boxes, (W * self.rpn.stride, H * self.rpn.stride)).reshape(R, K1, 4)
        self.train(was)
        return props, probs, boxes


#: which box CS-SR reports for a detection: the RPN proposal as it is (Salvador et al.'s ``rerank.py`` with
#: ``use_regressed_boxes = False``, the default) or the proposal moved by the class's box regression
DETECTION_BOXES = ("proposal", "regressed")


def class_detections(detector: Detector, fmap: torch.Tensor, proposals: int = 300,
                     box: str = "proposal") -> tuple[np.ndarray, np.ndarray]:
    """For every object class k: the highest class probability over the proposals of one map and that
    proposal's box (Salvador et al. 2016, Sec. 3.3): ``box="proposal"`` the raw RPN proposal (the authors'
    default), ``"regressed"`` its class-k regressed box. Returns (scores (K,), boxes (K, 4) map-frame px)."""
    if box not in DETECTION_BOXES:
        raise ValueError(f"box must be one of {', '.join(DETECTION_BOXES)}, got {box!r}")
    props, probs, boxes = detector.detect(fmap, proposals)
    p = probs[:, 1:]
    best = p.argmax(dim=0)  # (K,)
    k = torch.arange(p.shape[1])
    chosen = props[best] if box == "proposal" else boxes[best, k + 1]
    return p[best, k].numpy().astype(np.float64), chosen.numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------ files
def save_detector(det: Detector, path: str | os.PathLike, **info: Any) -> Path:
    """Save a detector as a plain state dict (``.pt``) + JSON config (``.json``, with the sha256 and ``info``)."""
    return save_state(det, path, det.config(), **info)


def load_detector(path: str | os.PathLike) -> tuple[Detector, dict[str, Any]]:
    """Read a detector written by :func:`save_detector` (``torch.load(weights_only=True)``). Errors name the file."""
    path, cfg, state = read_state(path, _FORMAT, DetectorFileError, "detector")
    try:
        low = cfg.get("lower")
        det = Detector(RPN.from_config(cfg["rpn"]), len(cfg["classes"]), cfg["classes"], int(cfg["pool"]),
                       int(cfg["hidden"]), float(cfg["dropout"]), lower=vgg16_block(low[0], low[-1]) if low else None)
        det.load_state_dict(state, strict=True)
    except Exception as exc:
        raise DetectorFileError(f"{path}: not a readable detector ({type(exc).__name__}: {str(exc)[:300]})") from exc
    det.backbone_weights_sha256 = str(cfg.get("backbone_weights_sha256", ""))
    det.eval()
    return det, cfg
