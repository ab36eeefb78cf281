"""Training of the region proposal network (Ren, He, Girshick & Sun 2015, "Faster R-CNN", Sec. 3.1.2-3.1.3) on
frozen conv features and automatically estimated object boxes, as Gordo et al. 2016 (Sec. 3.2, 4.1) train theirs
on the cleaned landmarks set (``isearch clean`` -> ``isearch train-rpn``).

* Labels (Ren Sec. 3.1.2): positive = IoU > 0.7 with a ground-truth box, or the highest IoU for a ground-truth
  box; negative = IoU < 0.3 with every ground-truth box (:func:`~instance_search.ops.boxes.assign_anchors`);
  256 anchors sampled per image with up to half positives (:func:`sample_labels`).
* Loss (Ren Eq. 1): log loss + smooth L1 on the positives' deltas, both averaged over the sampled anchors (Ren's
  lambda = 10 with N_reg ~ 2400 locations is the same balance).
* :func:`train_rpn`: SGD with momentum, a progress bar, one resumable checkpoint per epoch; on the CPU or a CUDA
  GPU (``device``): the network, each map and the loss live there; anchor labelling and sampling stay on the CPU
  with a CPU generator, so a seed draws the same anchors on either device. Files hold CPU tensors.
* :func:`train_rpn_on_boxes`: the whole command -- conv5_3 maps of the kept images of a boxes file (cached), their
  boxes in the map frame, a share of the groups held out for a validation loss, training, the model file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_write_bytes, file_sha256
from ..nets.rpn import RPN, RPNFileError, save_rpn
from ..ops.boxes import DEFAULT_SIZES, assign_anchors, box_iou, encode_boxes, to_map_frame

__all__ = ["smooth_l1", "sample_labels", "rpn_loss", "RPNTrainConfig", "RPNSample", "train_rpn", "evaluate_loss",
           "detection_recall", "original_size", "boxes_file_samples", "train_rpn_on_boxes"]

_CKPT_FORMAT = "instance_search.RPN.checkpoint"


def smooth_l1(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth L1 (Girshick 2015, Eq. 3), element-wise: ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - beta/2``."""
    ax = x.abs()
    if beta <= 0:
        return ax
    return torch.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


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


def _cpu_state(obj):
    """A copy of a (nested) state dict with every tensor on the CPU (a GPU run's checkpoint loads anywhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_state(v) for v in obj)
    return obj


def _save_checkpoint(path: Path, rpn: RPN, opt, epoch: int, history: dict, key: str) -> None:
    buf = io.BytesIO()
    torch.save({"model": _cpu_state(rpn.state_dict()), "optimizer": _cpu_state(opt.state_dict())}, buf)
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
    opt.load_state_dict(state["optimizer"])  # torch moves the momentum to the parameters' device
    return int(meta["epoch"]), meta["history"]


def train_rpn(rpn: RPN, samples: Sequence[RPNSample], config: RPNTrainConfig | None = None,
              checkpoint_dir: str | os.PathLike | None = None, val_samples: Sequence[RPNSample] | None = None,
              resume: bool = True, progress: bool = True,
              on_epoch: Callable[[int, dict], None] | None = None,
              device: str | torch.device | None = None) -> dict[str, list]:
    """Train ``rpn`` on ``samples`` (Ren et al. 2015, Sec. 3.1.3: SGD with momentum, 256 sampled anchors per
    image). One checkpoint per epoch in ``checkpoint_dir`` (``epoch-NNN.pt`` + ``.json``); with ``resume`` the run
    continues after the last checkpoint of the same settings. ``device``: where ``rpn`` is moved to and trained
    (None: where it is). Returns the history: per epoch the mean training losses, wall seconds, and the
    validation loss on ``val_samples`` (all anchors labelled, no sampling)."""
    from tqdm.auto import tqdm

    cfg = (config or RPNTrainConfig()).validate()
    if not samples:
        raise ValueError("train_rpn: no training samples (images with ground-truth boxes)")
    for s in samples:
        b = np.asarray(s.boxes, dtype=np.float64).reshape(-1, 4)
        if len(b) == 0 or not np.all(np.isfinite(b)) or np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
            raise ValueError(f"training sample {s.name or '?'}: boxes must be non-empty, finite, x1 < x2, y1 < y2; "
                             f"got {b.tolist()}")
    if device is not None:
        from .triplet import check_device

        rpn.to(check_device(device))  # before the optimizer is built on its parameters
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
            tot_c += float(lc.detach().cpu())
            tot_r += float(lr_.detach().cpu())
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
        c, r = c + float(lc.cpu()), r + float(lr_.cpu())
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


# ------------------------------------------------------------------------------------------------ the command
def original_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the whole image after EXIF rotation -- the frame of the boxes of ``isearch clean``
    (as :func:`instance_search.images.load_image` reports in ``info["original_size"]``), without decoding it."""
    from PIL import Image

    from ..images import ImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                o = int(im.getexif().get(0x0112, 1))
            except Exception:  # a broken EXIF block: no rotation, as load_image does
                o = 1
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable image ({exc})") from exc
    return (h, w) if o in (5, 6, 7, 8) else (w, h)


def _held_out(group: int, share: float, seed: int) -> bool:
    h = int(hashlib.sha256(f"{seed}:{int(group)}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < share


def boxes_file_samples(boxes_file: str | os.PathLike, root: str | os.PathLike | None, backbone, *, max_size: int = 384,
                       cache_dir: str | os.PathLike, layer: str = "conv5_3", stride: int = 16,
                       val_groups: float = 0.0, seed: int = 0, progress: bool = True):
    """Training samples of the kept images of a boxes file (``isearch clean``; image paths relative to ``root``,
    by default the folder the file records):
    the ``layer`` maps at longer side ``max_size`` (cached as fp16 under ``cache_dir``, shared by re-runs) and the
    estimated box mapped to the map frame. The groups whose hash of ``seed:group`` falls under ``val_groups`` are
    held out. Returns ``(train samples, validation samples, summary)``."""
    from .cleaning import load_boxes
    from .triplet import InputCache

    if not 0.0 <= float(val_groups) < 1.0:
        raise ValueError(f"val_groups must be in [0, 1), got {val_groups}")
    if root is None:  # the folder `isearch clean` worked in, recorded in the file
        header, _ = load_boxes(boxes_file)
        if not header.get("root"):
            raise ValueError(f"{boxes_file}: records no image root folder; give it (--root)")
        root = header["root"]
    root = Path(root)
    header, recs = load_boxes(boxes_file, root=root, kept_only=True)
    if not recs:
        raise ValueError(f"{boxes_file}: no kept image with a box (nothing to train on)")
    rels = sorted(recs)
    paths = [root / r for r in rels]
    maps = InputCache.build([(p, None) for p in paths], backbone, layer, max_size, cache_dir, progress=progress,
                            desc=f"{layer} maps of {len(paths)} images")
    train, val = [], []
    for i, (rel, path) in enumerate(zip(rels, paths)):
        H, W = np.load(maps.file(i), mmap_mode="r").shape[-2:]
        box = to_map_frame(recs[rel]["box"], original_size(path), (int(H), int(W)), stride)
        s = RPNSample(fmap=(lambda i=i: maps[i]), boxes=box, name=rel)
        (val if _held_out(recs[rel]["group"], val_groups, seed) else train).append(s)
    if not train:
        raise ValueError(f"{boxes_file}: every group was held out for validation (val_groups={val_groups})")
    summary = {"boxes_file": str(Path(boxes_file).resolve()), "boxes_sha256": file_sha256(boxes_file),
               "cleaning_params": header.get("params"), "root": str(root.resolve()), "max_size": int(max_size),
               "layer": layer, "kept_images": len(recs), "train_images": len(train), "validation_images": len(val),
               "groups": len({recs[r]["group"] for r in rels})}
    return train, val, summary


def train_rpn_on_boxes(boxes_file: str | os.PathLike, root: str | os.PathLike | None, out: str | os.PathLike, *,
                       config: RPNTrainConfig | None = None, max_size: int = 384, mid_channels: int = 256,
                       sizes: Sequence[float] = DEFAULT_SIZES, val_groups: float = 0.1,
                       checkpoint_dir: str | os.PathLike | None = None, weights: str | None = None,
                       engine: str = "auto", resume: bool = True, progress: bool = True,
                       on_epoch: Callable[[int, dict], None] | None = None, device: str = "cpu"):
    """``isearch train-rpn``: train an RPN (Gordo et al. 2016, Sec. 3.2) on VGG16 conv5_3 maps of the kept images
    of ``boxes_file`` with their estimated boxes as ground truth, and write it to ``out`` (``.pt`` + ``.json``
    with its sha256, the training data and history). Checkpoints (and the map cache) go to ``checkpoint_dir``
    (default: ``out``'s folder / ``<stem>-run``). ``device``: ``"cpu"`` or ``"cuda"``, for the VGG16 maps and the
    training (the model file holds CPU tensors); ``engine``: of the frozen VGG16 (``auto``: winograd on the CPU,
    exact on a GPU; the RPN itself runs exact). Returns ``(rpn, history, model path, data summary)``."""
    from ..backbones import load_backbone
    from ..backbones.fast import engine_of, use_engine
    from .triplet import check_device

    device = str(check_device(device))
    cfg = (config or RPNTrainConfig()).validate()
    if max_size is None or int(max_size) < 32:
        raise ValueError(f"max_size must be at least 32 pixels, got {max_size}")
    out = Path(out)
    if out.suffix != ".pt":
        raise ValueError(f"{out}: the model file must end in .pt (its config goes next to it as .json)")
    torch.manual_seed(cfg.seed)
    rpn = RPN(mid_channels=int(mid_channels), sizes=sizes, max_size=int(max_size))  # checks sizes / channels
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else out.parent / f"{out.stem}-run"
    bb = load_backbone("vgg16", weights=weights, progress=progress, device=device)
    use_engine(bb, engine)
    train, val, summary = boxes_file_samples(boxes_file, root, bb, max_size=max_size, cache_dir=ck / "maps",
                                             val_groups=val_groups, seed=cfg.seed, progress=progress)
    summary["backbone_weights_sha256"] = str(getattr(bb.weights, "sha256", "") or "")
    summary["engine"] = engine_of(bb)
    history = train_rpn(rpn, train, cfg, ck / "checkpoints", val_samples=val or None, resume=resume,
                        progress=progress, on_epoch=on_epoch, device=device)
    path = save_rpn(rpn, out, trained_on=summary, history=history, train_config=asdict(cfg), device=str(device))
    return rpn, history, path, summary
