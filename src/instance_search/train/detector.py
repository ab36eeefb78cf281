"""A Faster R-CNN-style detector on VGG16 and its fine-tuning on the query instances, for class-specific spatial
re-ranking (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, "Faster R-CNN features for instance search", CVPRW,
Sec. 3.2-3.3).

    pool4 ─▶ conv5_1..conv5_3 ─▶ RPN (learn.rpn) ─▶ proposals
                              └─▶ RoI max-pooling (p x p) ─▶ fc6 ─▶ fc7 ─▶ class scores (K+1), class boxes 4(K+1)

* :class:`DetectorHead` -- the Fast R-CNN head (Girshick 2015, Sec. 2): RoI pooling, two FC layers with ReLU and
  dropout, a (K+1)-way softmax classifier (class 0 = background) and class-specific box regression (targets
  normalised by (0.1, 0.1, 0.2, 0.2) as in Faster R-CNN). No ImageNet weights exist here for VGG16's FC layers
  (the offline weights are conv-only), so the FC layers start random: :func:`train_detector` first trains a
  *base detector* on the training split (its groups as classes, the automatically estimated boxes as ground
  truth) -- the counterpart of Salvador's detector trained on PASCAL -- and then fine-tunes it on the queries.
* Fine-tuning on the queries (Salvador Sec. 3.2): every query object is a class (plus background); the training
  data are the query images and their horizontal flips with the query boxes. ``strategy=1`` trains the FC
  layers only (fc6, fc7, classifier, box regression); ``strategy=2`` also the last conv block (conv5_1..conv5_3)
  and the RPN (its loss on the query boxes is added; proposals are recomputed with the current weights each
  step, as in approximate joint training, Ren et al. 2015 Sec. 3.2).
* RoIs per image (Girshick 2015, Sec. 2.3): the RPN proposals plus the ground-truth boxes; ``rois_per_image``
  sampled with up to 25 % foreground (IoU >= 0.5, labelled with the box's class), the rest background
  (IoU in [0, 0.5)). Loss: softmax log loss + smooth L1 (beta 1) on the foreground RoIs' class deltas.

All boxes are map-frame pixels (see :mod:`instance_search.nets.rpn`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FileFormatError
from ..io import atomic_write_bytes, file_sha256
from ..io import read_state, save_state
from ..nets.rpn import (RPN, RPNTrainConfig, assign_anchors, box_iou, clip_boxes, decode_boxes, encode_boxes,
                  roi_pool, rpn_loss, sample_labels, smooth_l1)

__all__ = ["BBOX_STDS", "DetectorHead", "Detector", "DetectorSample", "DetectorTrainConfig", "sample_rois",
           "detector_loss", "train_detector", "flip_boxes", "query_samples", "class_detections", "save_detector",
           "load_detector", "DetectorFileError", "conv5_block"]

BBOX_STDS = (0.1, 0.1, 0.2, 0.2)  # Faster R-CNN's normalisation of the RoI box-regression targets
_FORMAT = "instance_search.Detector"
_CKPT_FORMAT = "instance_search.Detector.checkpoint"


class DetectorFileError(FileFormatError):
    """A detector model or checkpoint file that is missing parts, damaged or inconsistent."""


# ------------------------------------------------------------------------------------------------ modules
def conv5_block(backbone=None) -> nn.Sequential:
    """VGG16's conv5_1..relu5_3 (input: pool4 maps), with the ImageNet weights of ``backbone`` when given."""
    from ..nets.rmac_head import RMACNet

    net = RMACNet("conv5")
    if backbone is not None:
        net.init_from_backbone(backbone)
    return net.trunk


class DetectorHead(nn.Module):
    """Fast R-CNN head (Girshick 2015, Sec. 2): RoI max-pooling to ``pool x pool`` -> fc6 -> fc7 (ReLU, dropout)
    -> ``num_classes + 1`` class logits and ``4 (num_classes + 1)`` box deltas (class 0 = background).

    The pooled RoI vector is L2-normalised (times sqrt of its dimension, i.e. unit mean square) before fc6: here the FC layers start from random weights, and VGG16's
    raw conv5_3 activations (hundreds) would saturate them (Faster R-CNN starts from pre-trained fc6/fc7)."""

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
                 hidden: int = 1024, dropout: float = 0.5, trunk: nn.Sequential | None = None):
        super().__init__()
        self.trunk = trunk if trunk is not None else conv5_block()
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
                "backbone_weights_sha256": self.backbone_weights_sha256}

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


def class_detections(detector: Detector, fmap: torch.Tensor, proposals: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """For every object class k: the highest class probability over the proposals of one map and that
    proposal's class-k box (Salvador et al. 2016, Sec. 3.3). Returns (scores (K,), boxes (K, 4) map-frame px)."""
    props, probs, boxes = detector.detect(fmap, proposals)
    p = probs[:, 1:]
    best = p.argmax(dim=0)  # (K,)
    k = torch.arange(p.shape[1])
    return p[best, k].numpy().astype(np.float64), boxes[best, k + 1].numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------ training data
@dataclass
class DetectorSample:
    """One training image: its pool4 map and/or conv5_3 map (tensors or callables returning them), the
    ground-truth boxes (G, 4) in map-frame pixels and their classes (G,) in 1..K."""

    boxes: np.ndarray
    labels: np.ndarray
    pool4: Any = None
    conv5: Any = None
    name: str = ""

    @staticmethod
    def _get(x) -> torch.Tensor | None:
        if x is None:
            return None
        x = x() if callable(x) else x
        return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).float()


def flip_boxes(boxes, width: float) -> np.ndarray:
    """Boxes of the horizontally flipped image (``width`` = map-frame width): ``x1' = width - x2``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)


def query_samples(maps: Sequence[dict], stride: int = 16) -> list[DetectorSample]:
    """Training samples of the query images and their flips (Salvador et al. 2016, Sec. 3.2). ``maps``: one dict
    per query with ``box`` (4,) map-frame pixels of the unflipped image, ``label`` (1..K), ``pool4``/``conv5``
    (unflipped) and ``pool4_flip``/``conv5_flip`` (maps of the flipped image; either may be None), ``name``."""
    out = []
    for m in maps:
        ref = m.get("conv5") if m.get("conv5") is not None else m.get("pool4")
        ref = DetectorSample._get(ref)
        if ref is None:
            raise ValueError(f"query {m.get('name', '?')}: no map given")
        width = ref.shape[-1] * stride
        lab = np.array([int(m["label"])], dtype=np.int64)
        box = np.asarray(m["box"], dtype=np.float64).reshape(1, 4)
        out.append(DetectorSample(box, lab, m.get("pool4"), m.get("conv5"), str(m.get("name", ""))))
        if m.get("pool4_flip") is not None or m.get("conv5_flip") is not None:
            out.append(DetectorSample(flip_boxes(box, width), lab, m.get("pool4_flip"), m.get("conv5_flip"),
                                      f"{m.get('name', '')} (flipped)"))
    return out


@dataclass
class DetectorTrainConfig:
    """Settings of :func:`train_detector`. ``trainable``: ``"fc"`` (fc6, fc7, classifier, box regression: the
    base detector and Salvador's strategy #1) or ``"conv5+rpn+fc"`` (strategy #2)."""

    trainable: str = "fc"
    epochs: int = 1
    iterations: int = 0  # > 0: stop after this many SGD updates (over as many epochs as needed)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    images_per_batch: int = 2
    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_lo: float = 0.0
    train_proposals: int = 300
    rpn_weight: float = 1.0  # weight of the RPN loss when the RPN trains
    new_layer_lr_mult: float = 1.0  # learning-rate multiplier of the classifier and box-regression layers
    seed: int = 0

    def validate(self) -> "DetectorTrainConfig":
        if self.trainable not in ("fc", "conv5+rpn+fc"):
            raise ValueError(f"trainable must be 'fc' or 'conv5+rpn+fc', got {self.trainable!r}")
        for name in ("epochs", "images_per_batch", "rois_per_image", "train_proposals"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations < 0 or self.lr <= 0 or not 0 < self.fg_fraction <= 1 or self.new_layer_lr_mult <= 0:
            raise ValueError("iterations must be >= 0, lr > 0, new_layer_lr_mult > 0 and fg_fraction in (0, 1]")
        if not 0 <= self.bg_iou_lo < self.fg_iou <= 1:
            raise ValueError(f"need 0 <= bg_iou_lo < fg_iou <= 1, got {self.bg_iou_lo}, {self.fg_iou}")
        return self


def sample_rois(proposals: torch.Tensor, gt: torch.Tensor, gt_labels: torch.Tensor, n: int = 64,
                fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou_lo: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast R-CNN RoI sampling (Girshick 2015, Sec. 2.3): candidates = proposals + ground-truth boxes; up to
    ``fg_fraction * n`` foreground RoIs (IoU >= ``fg_iou``, label of the best box), the rest background
    (IoU in [``bg_iou_lo``, ``fg_iou``), label 0). Returns (rois (R, 4), labels (R,), matched gt index (R,))."""
    cand = torch.cat([proposals.float(), gt.float()], 0)
    iou = box_iou(cand, gt)
    best, arg = iou.max(dim=1)
    fg = torch.nonzero(best >= fg_iou)[:, 0]
    bg = torch.nonzero((best < fg_iou) & (best >= bg_iou_lo))[:, 0]
    n_fg = min(int(round(n * fg_fraction)), fg.numel())
    fg = fg[torch.randperm(fg.numel(), generator=generator)[:n_fg]]
    n_bg = min(n - n_fg, bg.numel())
    bg = bg[torch.randperm(bg.numel(), generator=generator)[:n_bg]]
    keep = torch.cat([fg, bg])
    labels = torch.cat([gt_labels[arg[fg]].long(), torch.zeros(bg.numel(), dtype=torch.long)])
    return cand[keep], labels, arg[keep]


def detector_loss(cls_logits: torch.Tensor, deltas: torch.Tensor, rois: torch.Tensor, labels: torch.Tensor,
                  gt: torch.Tensor, matched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast R-CNN multi-task loss (Girshick 2015, Eq. 1): mean softmax log loss + smooth L1 (beta 1) of the
    foreground RoIs' deltas of their class against normalised targets, divided by the number of RoIs."""
    cls = F.cross_entropy(cls_logits, labels)
    fg = labels > 0
    if not bool(fg.any()):
        return cls, deltas.sum() * 0.0
    target = encode_boxes(rois[fg], gt[matched[fg]].float()) / torch.tensor(BBOX_STDS)
    pred = deltas[fg, labels[fg]]
    return cls, smooth_l1(pred - target, 1.0).sum() / labels.numel()


def _set_trainable(det: Detector, trainable: str) -> list[nn.Parameter]:
    for p in det.parameters():
        p.requires_grad_(False)
    mods = [det.head]
    if trainable == "conv5+rpn+fc":
        mods += [det.trunk, det.rpn]
    params = []
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _conv5(det: Detector, s: DetectorSample, train_conv: bool) -> torch.Tensor:
    if train_conv:
        p4 = DetectorSample._get(s.pool4)
        if p4 is None:
            raise ValueError(f"sample {s.name or '?'}: training the conv5 block needs its pool4 map")
        return det.conv_map(p4)
    c5 = DetectorSample._get(s.conv5)
    if c5 is not None:
        return c5
    p4 = DetectorSample._get(s.pool4)
    if p4 is None:
        raise ValueError(f"sample {s.name or '?'}: needs a pool4 or conv5_3 map")
    with torch.no_grad():
        return det.conv_map(p4)


def _step_loss(det: Detector, s: DetectorSample, cfg: DetectorTrainConfig, gen: torch.Generator,
               proposals: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    train_conv = cfg.trainable == "conv5+rpn+fc"
    fmap = _conv5(det, s, train_conv)
    gt = torch.as_tensor(np.asarray(s.boxes, dtype=np.float32).reshape(-1, 4))
    gl = torch.as_tensor(np.asarray(s.labels, dtype=np.int64).reshape(-1))
    if proposals is None:
        with torch.no_grad():
            proposals, _ = det.rpn.propose(fmap.detach(), cfg.train_proposals)
    rois, labels, matched = sample_rois(proposals, gt, gl, cfg.rois_per_image, cfg.fg_fraction, cfg.fg_iou,
                                        cfg.bg_iou_lo, gen)
    logits, deltas = det.head(fmap, rois)
    lc, lr_ = detector_loss(logits, deltas, rois, labels, gt, matched)
    loss = lc + lr_
    info = {"cls": float(lc.detach()), "reg": float(lr_.detach())}
    if train_conv:
        H, W = int(fmap.shape[-2]), int(fmap.shape[-1])
        anchors = det.rpn.anchors(H, W)
        rl, rd = det.rpn(fmap)
        rcfg = RPNTrainConfig()
        alab, amatch = assign_anchors(anchors, gt, rcfg.pos_iou, rcfg.neg_iou)
        alab = sample_labels(alab, rcfg.anchors_per_image, rcfg.positive_fraction, gen)
        rc, rr = rpn_loss(rl, rd, anchors, gt, alab, amatch, rcfg.beta)
        loss = loss + cfg.rpn_weight * (rc + rr)
        info.update(rpn_cls=float(rc.detach()), rpn_reg=float(rr.detach()))
    return loss, info


def _key(det: Detector, cfg: DetectorTrainConfig, samples: Sequence[DetectorSample], init_sha: str) -> str:
    raw = json.dumps({"det": det.config(), "cfg": asdict(cfg), "names": [s.name for s in samples], "init": init_sha},
                     sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _state_sha(det: Detector) -> str:
    h = hashlib.sha256()
    for k, v in sorted(det.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_detector(det: Detector, samples: Sequence[DetectorSample], config: DetectorTrainConfig | None = None,
                   checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
                   desc: str = "detector", fixed_proposals: Sequence[torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``det`` on ``samples`` with SGD (Girshick 2015 / Salvador et al. 2016, Sec. 3.2). Runs
    ``epochs`` passes, or exactly ``iterations`` updates when > 0. With ``checkpoint_dir``, the final state is
    written there (``final.pt`` + ``.json``, keyed by settings, samples and the starting weights) and a re-run with
    the same key loads it instead of training again. ``fixed_proposals`` (one (N_i, 4) tensor per sample) skips
    the RPN pass when the RPN and conv layers are frozen. Returns the history (losses, seconds per epoch)."""
    from tqdm.auto import tqdm

    cfg = (config or DetectorTrainConfig()).validate()
    if not samples:
        raise ValueError("train_detector: no training samples")
    if fixed_proposals is not None and len(fixed_proposals) != len(samples):
        raise ValueError(f"{len(fixed_proposals)} proposal sets for {len(samples)} samples")
    if fixed_proposals is not None and cfg.trainable != "fc":
        raise ValueError("fixed_proposals only make sense when the RPN does not train (trainable='fc')")
    for s in samples:
        lab = np.asarray(s.labels).reshape(-1)
        if len(lab) == 0 or lab.min() < 1 or lab.max() > det.head.num_classes:
            raise ValueError(f"sample {s.name or '?'}: labels must be in 1..{det.head.num_classes}, got {lab.tolist()}")
    key = _key(det, cfg, samples, _state_sha(det))
    ck = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{desc.replace(' ', '_')}-{key}.pt"
    if ck is not None and resume and ck.is_file():
        try:
            meta = json.loads(ck.with_suffix(".json").read_text())
            if meta.get("format") == _CKPT_FORMAT and meta.get("sha256") == file_sha256(ck):
                det.load_state_dict(torch.load(ck, map_location="cpu", weights_only=True))
                det.eval()
                return meta["history"]
        except (OSError, ValueError, RuntimeError):
            pass
    params = _set_trainable(det, cfg.trainable)
    out_layers = {id(p) for m in (det.head.cls_score, det.head.bbox_pred) for p in m.parameters()}
    groups = [{"params": [p for p in params if id(p) not in out_layers], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in out_layers], "lr": cfg.lr * cfg.new_layer_lr_mult}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = cfg.iterations * cfg.images_per_batch if cfg.iterations else cfg.epochs * len(samples)
    history: dict[str, Any] = {"epochs": [], "config": asdict(cfg), "images": len(samples)}
    det.train()
    if cfg.trainable == "fc":  # frozen parts stay in eval mode
        det.trunk.eval()
        det.rpn.eval()
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    seen = updates = 0
    epoch = 0
    opt.zero_grad(set_to_none=True)
    while seen < total:
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(samples), generator=gen).tolist()
        t0, c0 = time.perf_counter(), time.process_time()
        sums: dict[str, float] = {}
        n_ep = 0
        for i in order:
            if seen >= total:
                break
            loss, info = _step_loss(det, samples[i], cfg, gen,
                                    None if fixed_proposals is None else fixed_proposals[i])
            (loss / cfg.images_per_batch).backward()
            seen += 1
            n_ep += 1
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + v
            if seen % cfg.images_per_batch == 0 or seen == total:
                opt.step()
                opt.zero_grad(set_to_none=True)
                updates += 1
            bar.update(1)
            bar.set_postfix({k: f"{v / n_ep:.3f}" for k, v in sums.items()})
        epoch += 1
        history["epochs"].append({"epoch": epoch, "images": n_ep, "updates_total": updates,
                                  **{f"train_{k}": v / max(1, n_ep) for k, v in sums.items()},
                                  "seconds": round(time.perf_counter() - t0, 2),
                                  "cpu_seconds": round(time.process_time() - c0, 2)})
    bar.close()
    det.eval()
    for p in det.parameters():
        p.requires_grad_(False)
    if ck is not None:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in det.state_dict().items()}, buf)
        atomic_write_bytes(ck, buf.getvalue())
        atomic_write_bytes(ck.with_suffix(".json"), json.dumps(
            {"format": _CKPT_FORMAT, "key": key, "sha256": file_sha256(ck), "history": history}, indent=1).encode())
    return history


# ------------------------------------------------------------------------------------------------ files
def save_detector(det: Detector, path: str | os.PathLike, **info: Any) -> Path:
    """Save a detector as a plain state dict (``.pt``) + JSON config (``.json``, with the sha256 and ``info``)."""
    return save_state(det, path, det.config(), **info)


def load_detector(path: str | os.PathLike) -> tuple[Detector, dict[str, Any]]:
    """Read a detector written by :func:`save_detector` (``torch.load(weights_only=True)``). Errors name the file."""
    path, cfg, state = read_state(path, _FORMAT, DetectorFileError, "detector")
    try:
        det = Detector(RPN.from_config(cfg["rpn"]), len(cfg["classes"]), cfg["classes"], int(cfg["pool"]),
                       int(cfg["hidden"]), float(cfg["dropout"]))
        det.load_state_dict(state, strict=True)
    except Exception as exc:
        raise DetectorFileError(f"{path}: not a readable detector ({type(exc).__name__}: {str(exc)[:300]})") from exc
    det.backbone_weights_sha256 = str(cfg.get("backbone_weights_sha256", ""))
    det.eval()
    return det, cfg
