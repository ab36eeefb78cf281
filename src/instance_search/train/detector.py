"""A Faster R-CNN-style detector on VGG16 and its fine-tuning on the query instances, for class-specific spatial
re-ranking (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, "Faster R-CNN features for instance search", CVPRW,
Sec. 3.2-3.3).

    pool4 ─▶ conv5_1..conv5_3 ─▶ RPN (nets.rpn) ─▶ proposals
                              └─▶ RoI max-pooling (p x p) ─▶ fc6 ─▶ fc7 ─▶ class scores (K+1), class boxes 4(K+1)

* :class:`DetectorHead` -- the Fast R-CNN head (Girshick 2015, Sec. 2): RoI pooling, two FC layers with ReLU and
  dropout, a (K+1)-way softmax classifier (class 0 = background) and class-specific box regression (targets
  normalised by (0.1, 0.1, 0.2, 0.2) as in Faster R-CNN). No ImageNet weights exist here for VGG16's FC layers
  (the offline weights are conv-only), so the FC layers start random: :func:`train_detector` first trains a
  *base detector* on the training split (its groups as classes, the automatically estimated boxes as ground
  truth) -- the counterpart of Salvador's detector trained on PASCAL -- and then fine-tunes it on the queries.
* Fine-tuning on the queries (Salvador Sec. 3.2): every query object is a class (plus background); the training
  data are the query images and their horizontal flips with the query boxes. ``strategy=1`` trains the FC
  layers only (fc6, fc7, classifier, box regression); ``strategy=2`` trains "all layers after the first two conv
  layers" (the paper's words), read literally on VGG16: conv1_1 and conv1_2 frozen, conv2_1..conv5_3, the RPN and
  the FC layers trained (``trainable="conv2+rpn+fc"``, input pool1 maps; the RPN's loss on the query boxes is
  added and proposals are recomputed with the current weights each step, as in approximate joint training, Ren
  et al. 2015 Sec. 3.2). (Faster R-CNN's own VGG16 recipe freezes conv1 *and* conv2, Ren et al. 2015 Sec. 4; the
  paper says layers, so conv2 trains here.) The package's earlier strategy #2, conv5_1..conv5_3 + RPN + FC from
  pool4 maps, stays reachable by name: ``FinetuneConfig(trainable_2="conv5+rpn+fc")``. ``device``: a torch device
  for the conv layers that train (the cost of #2); the RPN, the head and the losses stay on the CPU.
* RoIs per image (Girshick 2015, Sec. 2.3): the RPN proposals plus the ground-truth boxes; ``rois_per_image``
  sampled with up to 25 % foreground (IoU >= 0.5, labelled with the box's class), the rest background
  (IoU in [0, 0.5)). Loss: softmax log loss + smooth L1 (beta 1) on the foreground RoIs' class deltas.

The networks are in :mod:`instance_search.nets.detector`; :func:`finetune_on_queries` is ``isearch finetune``.
All boxes are map-frame pixels (see :mod:`instance_search.ops.boxes`).
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

from ..io import atomic_write_bytes, file_sha256
from ..nets.detector import BBOX_STDS, Detector
from ..ops.boxes import assign_anchors, box_iou, encode_boxes, flip_boxes
from .rpn import RPNTrainConfig, rpn_loss, sample_labels, smooth_l1

__all__ = ["DetectorSample", "DetectorTrainConfig", "sample_rois", "detector_loss", "train_detector",
           "query_samples", "STRATEGIES", "FinetuneConfig", "read_queries", "query_maps", "train_base_detector",
           "finetune_detector", "finetune_on_queries", "TRAINABLE", "LOWER_LAYERS",
           "with_lower_layers"]

_CKPT_FORMAT = "instance_search.Detector.checkpoint"


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
    pool1: Any = None  # input of strategy #2 as the paper names it (conv2_1 upwards train)

    @staticmethod
    def _get(x) -> torch.Tensor | None:
        if x is None:
            return None
        x = x() if callable(x) else x
        return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).float()


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
        out.append(DetectorSample(box, lab, m.get("pool4"), m.get("conv5"), str(m.get("name", "")), m.get("pool1")))
        if any(m.get(k) is not None for k in ("pool4_flip", "conv5_flip", "pool1_flip")):
            out.append(DetectorSample(flip_boxes(box, width), lab, m.get("pool4_flip"), m.get("conv5_flip"),
                                      f"{m.get('name', '')} (flipped)", m.get("pool1_flip")))
    return out


@dataclass
class DetectorTrainConfig:
    """Settings of :func:`train_detector`. ``trainable`` (:data:`TRAINABLE`): ``"fc"`` (fc6, fc7, classifier, box
    regression: the base detector and Salvador's strategy #1), ``"conv2+rpn+fc"`` (strategy #2 as the paper names
    it: conv2_1..conv5_3 + RPN + FC from pool1 maps; the detector needs its ``lower`` layers) or ``"conv5+rpn+fc"``
    (the package's earlier strategy #2, from pool4 maps)."""

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
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        for name in ("epochs", "images_per_batch", "rois_per_image", "train_proposals"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations < 0 or self.lr <= 0 or not 0 < self.fg_fraction <= 1 or self.new_layer_lr_mult <= 0:
            raise ValueError("iterations must be >= 0, lr > 0, new_layer_lr_mult > 0 and fg_fraction in (0, 1]")
        if not 0 <= self.bg_iou_lo < self.fg_iou <= 1:
            raise ValueError(f"need 0 <= bg_iou_lo < fg_iou <= 1, got {self.bg_iou_lo}, {self.fg_iou}")
        return self


#: what each ``trainable`` setting trains: the detector's parts, and the map the conv part starts from
TRAINABLE = {"fc": ("head",), "conv5+rpn+fc": ("trunk", "rpn", "head"),
             "conv2+rpn+fc": ("lower", "trunk", "rpn", "head")}
#: the VGG16 layers below conv5 that ``"conv2+rpn+fc"`` trains (Salvador Sec. 3.2: all layers after conv1_1, conv1_2)
LOWER_LAYERS = ("conv2_1", "pool4")


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
    target = encode_boxes(rois[fg], gt[matched[fg]].float()) / torch.tensor(BBOX_STDS, device=deltas.device)
    pred = deltas[fg, labels[fg]]
    return cls, smooth_l1(pred - target, 1.0).sum() / labels.numel()


def _set_trainable(det: Detector, trainable: str) -> list[nn.Parameter]:
    for p in det.parameters():
        p.requires_grad_(False)
    if "lower" in TRAINABLE[trainable] and det.lower is None:
        raise ValueError(f"trainable {trainable!r} trains VGG16's layers below conv5: the detector needs them "
                         f"(with_lower_layers)")
    mods = [getattr(det, m) for m in TRAINABLE[trainable]]
    params = []
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _device_of(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _conv5(det: Detector, s: DetectorSample, train_conv: str | bool) -> torch.Tensor:
    """The conv5_3 map of a sample (CPU): through the trained conv layers (on their device) when they train."""
    if train_conv == "conv2":
        p1 = DetectorSample._get(s.pool1)
        if p1 is None:
            raise ValueError(f"sample {s.name or '?'}: training conv2_1..conv5_3 needs its pool1 map")
        dev = _device_of(det.trunk)
        return det.trunk(det.lower(p1[None].to(dev)))[0].cpu()
    if train_conv:
        p4 = DetectorSample._get(s.pool4)
        if p4 is None:
            raise ValueError(f"sample {s.name or '?'}: training the conv5 block needs its pool4 map")
        return det.trunk(p4[None].to(_device_of(det.trunk)))[0].cpu()
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
    train_conv = {"fc": False, "conv5+rpn+fc": True, "conv2+rpn+fc": "conv2"}[cfg.trainable]
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
                   desc: str = "detector", fixed_proposals: Sequence[torch.Tensor] | None = None,
                   device: str | torch.device | None = None) -> dict[str, Any]:
    """Train ``det`` on ``samples`` with SGD (Girshick 2015 / Salvador et al. 2016, Sec. 3.2). Runs
    ``epochs`` passes, or exactly ``iterations`` updates when > 0. With ``checkpoint_dir``, the final state is
    written there (``final.pt`` + ``.json``, keyed by settings, samples and the starting weights) and a re-run with
    the same key loads it instead of training again. ``fixed_proposals`` (one (N_i, 4) tensor per sample) skips
    the RPN pass when the RPN and conv layers are frozen. ``device``: where the conv layers that train run (a torch
    device, e.g. ``"cuda"``; default CPU); the RPN, the head and the losses stay on the CPU, and the detector is
    back on the CPU when this returns. Returns the history (losses, seconds per epoch)."""
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
    dev = torch.device(device) if device is not None else torch.device("cpu")
    convs = [getattr(det, m) for m in TRAINABLE[cfg.trainable] if m in ("lower", "trunk")]
    for m in convs:
        m.to(dev)
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
    for m in convs:
        m.to("cpu")
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


# ------------------------------------------------------------------------------------------------ the command
#: Salvador et al. 2016, Sec. 3.2: what the second fine-tuning phase trains (#2: "all layers after the first two
#: conv layers"; the package's earlier #2, ``"conv5+rpn+fc"``, by name: ``FinetuneConfig.trainable_2``)
STRATEGIES = {1: "fc", 2: "conv2+rpn+fc"}


@dataclass
class FinetuneConfig:
    """Schedule of :func:`finetune_detector` (the same budget for both strategies): phase 1, shared, ``epochs``
    passes training the new output layers and fc6/fc7 at ``lr``; phase 2, ``epochs_2`` more passes training the
    FC layers only (strategy #1) or, for #2, conv2_1..conv5_3, the RPN and the FC layers (the paper's "all layers
    after the first two conv layers") at ``lr_2``; ``trainable_2`` names another phase-2 setting of
    :data:`TRAINABLE` (``"conv5+rpn+fc"``: the package's earlier #2). ``base_*``: the base detector on a boxes file
    (its groups as classes), trained first when no base detector is given."""

    strategy: int = 1
    epochs: int = 20
    lr: float = 3e-3
    epochs_2: int = 4
    lr_2: float = 1e-3
    base_epochs: int = 2
    base_lr: float = 1e-2
    pool: int = 3
    hidden: int = 1024
    rois_per_image: int = 64
    proposals: int = 300
    seed: int = 0
    trainable_2: str | None = None  # None: STRATEGIES[strategy]

    @property
    def phase2(self) -> str:
        """What phase 2 trains (:data:`TRAINABLE`)."""
        return self.trainable_2 or STRATEGIES[self.strategy]

    def validate(self) -> "FinetuneConfig":
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 1 (FC layers) or 2 (conv2_1..conv5_3 + RPN + FC layers), "
                             f"got {self.strategy}")
        if self.trainable_2 is not None and self.trainable_2 not in TRAINABLE:
            raise ValueError(f"trainable_2 must be one of {', '.join(TRAINABLE)}, got {self.trainable_2!r}")
        for name in ("epochs", "base_epochs", "pool", "hidden", "rois_per_image", "proposals"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs_2 < 0:
            raise ValueError(f"epochs_2 must be >= 0, got {self.epochs_2}")
        if min(self.lr, self.lr_2, self.base_lr) <= 0:
            raise ValueError("learning rates must be > 0")
        return self


def read_queries(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A queries file for ``isearch finetune``: JSON ``{"queries": [{"image": PATH, "box": [x1, y1, x2, y2],
    "class": NAME}, ...]}``, image paths relative to the file's folder (or absolute), boxes in original-image
    pixels (EXIF-rotated). Queries of the same class are views of one instance. Errors name the file and entry."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"queries file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON queries file ({exc})") from exc
    qs = doc.get("queries") if isinstance(doc, dict) else None
    if not isinstance(qs, list) or not qs:
        raise ValueError(f"{path}: needs a non-empty list 'queries' of {{image, box, class}}")
    out = []
    for k, q in enumerate(qs):
        where = f"{path}: query {k}"
        if not isinstance(q, dict) or not {"image", "box", "class"} <= set(q):
            raise ValueError(f"{where}: needs 'image', 'box' and 'class', got {q!r}"[:300])
        img = Path(q["image"])
        img = img if img.is_absolute() else path.parent / img
        if not img.is_file():
            raise FileNotFoundError(f"{where}: image {img} not found")
        try:
            box = np.asarray(q["box"], dtype=np.float64).reshape(4)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: box must be 4 numbers x1, y1, x2, y2, got {q['box']!r}") from None
        if not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"{where}: box {box.tolist()} is empty or inverted (need x1 < x2, y1 < y2)")
        out.append({"image": img, "box": box, "class": str(q["class"])})
    return out


def _maps(backbone, trunk: nn.Module, img, pool1: bool = False):
    layers = ["pool1", "pool4"] if pool1 else ["pool4"]
    f = backbone.features(img, layers=layers)
    p4 = f[("pool4", 1.0)].detach().cpu().float()
    with torch.no_grad():
        c5 = trunk(p4[None])[0]
    return p4, c5, (f[("pool1", 1.0)].detach().cpu().float() if pool1 else None)


def query_maps(queries: Sequence[dict[str, Any]], backbone, trunk: nn.Module, classes: Sequence[str],
               max_size: int, stride: int = 16, progress: bool = True, pool1: bool = False) -> list[dict[str, Any]]:
    """The input of :func:`query_samples` for :func:`read_queries`' queries: pool4 and conv5_3 maps (and pool1
    maps with ``pool1``: strategy #2's input) of each query image and of its horizontal flip (Salvador et al.
    2016, Sec. 3.2), its box in the map frame, its label."""
    from PIL import Image

    from ..images import load_image
    from ..io import progress_bar
    from .rpn import original_size
    from ..ops.boxes import to_map_frame

    bar = progress_bar(len(queries), "query images (+ flips) -> pool4, conv5_3", progress)
    out = []
    try:
        for q in queries:
            img = load_image(q["image"], max_size=max_size)
            p4, c5, p1 = _maps(backbone, trunk, img, pool1)
            p4f, c5f, p1f = _maps(backbone, trunk, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), pool1)
            box = to_map_frame(q["box"], original_size(q["image"]), tuple(c5.shape[-2:]), stride)[0]
            out.append({"name": Path(q["image"]).name, "label": list(classes).index(q["class"]) + 1, "box": box,
                        "pool4": p4, "conv5": c5, "pool4_flip": p4f, "conv5_flip": c5f, "pool1": p1,
                        "pool1_flip": p1f})
            bar.update(1)
    finally:
        bar.close()
    return out


def _proposals(det: Detector, samples: Sequence[DetectorSample], k: int) -> list[torch.Tensor]:
    return [det.rpn.propose(DetectorSample._get(s.conv5) if s.conv5 is not None else
                            det.conv_map(DetectorSample._get(s.pool4)), k)[0] for s in samples]


def train_base_detector(det: Detector, samples: Sequence[DetectorSample], config: FinetuneConfig,
                        checkpoint_dir=None, progress: bool = True) -> dict[str, Any]:
    """The base detector (Salvador et al. 2016 start from a detector trained on PASCAL; here the FC layers start
    random, so a detector is first trained on a boxes file's groups with the RPN and conv layers frozen)."""
    cfg = DetectorTrainConfig(trainable="fc", epochs=config.base_epochs, lr=config.base_lr, images_per_batch=2,
                              rois_per_image=config.rois_per_image, train_proposals=config.proposals,
                              seed=config.seed)
    with torch.no_grad():
        props = _proposals(det, samples, config.proposals)
    return train_detector(det, samples, cfg, checkpoint_dir, desc="base detector", fixed_proposals=props,
                          progress=progress)


def with_lower_layers(det: Detector, backbone) -> Detector:
    """Give ``det`` VGG16's conv2_1..pool4 (:data:`LOWER_LAYERS`) with the ImageNet weights of ``backbone``, the
    layers that strategy #2 trains below conv5 (input pool1 maps); returns ``det``."""
    from ..nets.detector import vgg16_block

    det.lower = vgg16_block(*LOWER_LAYERS, backbone)
    return det


def finetune_detector(base: Detector, samples: Sequence[DetectorSample], classes: Sequence[str],
                      config: FinetuneConfig, checkpoint_dir=None, progress: bool = True, backbone=None,
                      device: str | torch.device | None = None) -> tuple[Detector, dict]:
    """Fine-tune a copy of ``base`` on the query instances (Salvador et al. 2016, Sec. 3.2): new output layers
    for ``classes`` (+ background); phase 1 trains the FC layers (``epochs`` at ``lr``, proposals fixed), phase 2
    (``config.phase2``) the FC layers (strategy #1) or, for #2, conv2_1..conv5_3, the RPN and the FC layers
    (approximate joint training with the RPN loss; the samples need pool1 maps, and ``backbone``, the VGG16 whose
    ImageNet weights conv2_1..conv4_3 start from, unless ``base`` has them) for ``epochs_2`` at ``lr_2``.
    ``device``: where the training conv layers run (:func:`train_detector`). Returns ``(detector, {"phase1":
    history, "phase2": history})``."""
    import copy

    cfg = config.validate()
    det = copy.deepcopy(base).set_classes(classes)
    if cfg.epochs_2 and "lower" in TRAINABLE[cfg.phase2] and det.lower is None:
        if backbone is None:
            raise ValueError(f"fine-tuning phase 2 {cfg.phase2!r} trains VGG16's conv2_1..conv4_3: give the backbone "
                             f"whose ImageNet weights they start from")
        with_lower_layers(det, backbone)
    torch.manual_seed(cfg.seed)  # the new output layers' initialisation depends on the seed alone
    det.head.reset_classes(len(classes))
    with torch.no_grad():
        props = _proposals(det, samples, cfg.proposals)
    h1 = train_detector(det, samples, DetectorTrainConfig(
        trainable="fc", epochs=cfg.epochs, lr=cfg.lr, rois_per_image=cfg.rois_per_image,
        train_proposals=cfg.proposals, seed=cfg.seed), checkpoint_dir, desc="fine-tune phase 1 (FC)",
        fixed_proposals=props, progress=progress)
    h2: dict[str, Any] = {"epochs": []}
    if cfg.epochs_2:
        trainable = cfg.phase2
        h2 = train_detector(det, samples, DetectorTrainConfig(
            trainable=trainable, epochs=cfg.epochs_2, lr=cfg.lr_2, rois_per_image=cfg.rois_per_image,
            train_proposals=cfg.proposals, seed=cfg.seed + cfg.strategy), checkpoint_dir,
            desc=f"fine-tune phase 2 (strategy #{cfg.strategy}: {trainable})",
            fixed_proposals=props if trainable == "fc" else None, progress=progress, device=device)
    return det, {"phase1": h1, "phase2": h2}


def finetune_on_queries(queries_file: str | os.PathLike, out: str | os.PathLike, *,
                        config: FinetuneConfig | None = None, base: str | os.PathLike | None = None,
                        rpn_file: str | os.PathLike | None = None,
                        boxes_file: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                        max_size: int = 384, checkpoint_dir: str | os.PathLike | None = None,
                        weights: str | None = None, engine: str = "exact", progress: bool = True,
                        device: str | torch.device | None = None):
    """``isearch finetune``: the CS-SR detector (Salvador et al. 2016, Sec. 3.2) for the queries of
    ``queries_file`` (:func:`read_queries`), written to ``out`` (``.pt`` + ``.json``). The detector starts from
    ``base`` (a detector file) or, without one, from a base detector trained on ``boxes_file`` (``isearch
    clean``; images under ``root``) with the RPN of ``rpn_file`` (``isearch train-rpn``); that base detector is
    saved too (``<out stem>-base.pt``) for re-use. ``device``: where strategy #2's training conv layers run (a torch
    device; default CPU). Returns ``(detector, info, model path)``."""
    from ..backbones import load_backbone
    from ..backbones.fast import use_engine
    from ..nets.detector import conv5_block, load_detector, save_detector
    from ..nets.rpn import load_rpn

    cfg = (config or FinetuneConfig()).validate()
    out = Path(out)
    if out.suffix != ".pt":
        raise ValueError(f"{out}: the model file must end in .pt (its config goes next to it as .json)")
    if (base is None) == (boxes_file is None) or (boxes_file is not None) != (rpn_file is not None):
        raise ValueError("finetune starts from a base detector (--base FILE from an earlier run) or trains one on "
                         "a boxes file with an RPN (--boxes FILE from `isearch clean` and --rpn FILE from "
                         "`isearch train-rpn`), not both")
    queries = read_queries(queries_file)
    classes = list(dict.fromkeys(q["class"] for q in queries))
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else out.parent / f"{out.stem}-run"
    bb = load_backbone("vgg16", weights=weights, progress=progress)
    use_engine(bb, engine)
    bb_sha = str(getattr(bb.weights, "sha256", "") or "")
    info: dict[str, Any] = {"queries_file": str(Path(queries_file).resolve()), "queries": len(queries),
                            "classes": classes, "strategy": cfg.strategy, "finetune_config": asdict(cfg),
                            "max_size": int(max_size)}
    if base is not None:
        det0, bcfg = load_detector(base)
        if det0.backbone_weights_sha256 and bb_sha and det0.backbone_weights_sha256 != bb_sha:
            raise ValueError(f"{base}: base detector trained on other VGG16 weights "
                             f"({det0.backbone_weights_sha256[:16]}…, the backbone has {bb_sha[:16]}…)")
        info["base"] = {"file": str(Path(base).resolve()), "sha256": bcfg.get("state_sha256", "")}
    else:
        from .rpn import boxes_file_samples

        from .cleaning import load_boxes

        rpn, rcfg = load_rpn(rpn_file)
        train, _, summary = boxes_file_samples(boxes_file, root, bb, max_size=max_size, cache_dir=ck / "maps",
                                               progress=progress)
        _, recs = load_boxes(boxes_file, root=summary["root"], kept_only=True)
        groups = sorted({int(recs[s.name]["group"]) for s in train})
        samples = [DetectorSample(s.boxes, np.array([groups.index(int(recs[s.name]["group"])) + 1]), None, s.fmap,
                                  s.name) for s in train]
        torch.manual_seed(cfg.seed)
        det0 = Detector(rpn, len(groups), [str(g) for g in groups], pool=cfg.pool, hidden=cfg.hidden,
                        trunk=conv5_block(bb))
        det0.backbone_weights_sha256 = bb_sha
        hist0 = train_base_detector(det0, samples, cfg, ck, progress=progress)
        base_path = save_detector(det0, out.with_name(f"{out.stem}-base.pt"), trained_on=summary, history=hist0,
                                  rpn_file=str(Path(rpn_file).resolve()), rpn_sha256=rcfg.get("state_sha256", ""))
        info["base"] = {"file": str(base_path), "trained_on": summary, "history": hist0["epochs"]}
    det0.eval()
    need_pool1 = bool(cfg.epochs_2) and "lower" in TRAINABLE[cfg.phase2]
    qmaps = query_maps(queries, bb, det0.trunk, classes, max_size, det0.rpn.stride, progress, pool1=need_pool1)
    samples = query_samples(qmaps, det0.rpn.stride)
    det, hist = finetune_detector(det0, samples, classes, cfg, ck, progress=progress, backbone=bb, device=device)
    det.backbone_weights_sha256 = bb_sha
    info["history"] = {k: v["epochs"] for k, v in hist.items()}
    path = save_detector(det, out, **{k: v for k, v in info.items() if k != "classes"})  # classes: in the config
    return det, info, path
