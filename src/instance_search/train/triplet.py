"""Training learned R-MAC with the three-stream triplet ranking loss (Gordo et al. 2016, "Deep Image Retrieval",
ECCV, Sec. 3.1): loss, hard-triplet mining, cached inputs of the frozen layers, and a trainer with checkpoints,
resume, a progress bar and a loss curve.

* :func:`triplet_loss` -- ``L(q, d+, d-) = 1/2 max(0, m + ||q - d+||^2 - ||q - d-||^2)`` (Gordo Sec. 3.1, Eq. 1),
  margin ``m = 0.1`` by default. The three streams share their weights, so a batch of triplets is computed
  by describing each distinct image once; the gradients are the same as with three separate streams.
* :func:`hardest_negatives` -- for each query, the most similar images of *other* groups (at most one per
  group), i.e. the negatives that give the largest loss (Gordo Sec. 3.1: hard triplets are essential).
* :class:`TripletTrainer` -- SGD with momentum; every ``remine_every`` updates the descriptors of the round's
  queries, their positives and a pool of candidate negatives are recomputed with the current weights and hard
  triplets are mined again; gradients are accumulated over the ``batch`` triplets of an update in chunks of
  ``micro_batch``. Checkpoints (model + optimizer + position + history) are written at round boundaries and
  at the end of every epoch, and a run resumes exactly where a checkpoint left it.
* :class:`InputCache` -- the output of the frozen part of the network (e.g. pool4 for ``train_layers="conv5"``)
  for every training image, computed once and stored on disk as fp16, so an epoch only runs the trainable
  layers (minutes on a CPU instead of days).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import FileFormatError, InputError
from ..io import atomic_write_bytes
from ..nets.rmac_head import RMACNet, save_model

__all__ = ["triplet_loss", "hardest_negatives", "choose_positives", "InputCache", "TrainConfig", "TripletTrainer",
           "plot_loss_curve", "CheckpointError", "train_on_split", "check_device"]

_CKPT_FORMAT = "instance_search.TripletTrainer.checkpoint"
_CKPT_VERSION = 1


class CheckpointError(FileFormatError):
    """A training checkpoint that cannot be read or does not belong to this run's settings."""


# ------------------------------------------------------------------------------------------------ loss and mining
def triplet_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Triplet ranking loss of Gordo et al. 2016 (Sec. 3.1, Eq. 1), one value per triplet:
    ``1/2 max(0, m + ||q - d+||^2 - ||q - d-||^2)``. ``q, pos, neg``: (T, D) (or (D,)) -> (T,) (or scalar)."""
    if q.shape != pos.shape or q.shape != neg.shape:
        raise ValueError(f"triplet_loss: shapes differ: q {tuple(q.shape)}, d+ {tuple(pos.shape)}, "
                         f"d- {tuple(neg.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    dp = (q - pos).pow(2).sum(dim=-1)
    dn = (q - neg).pow(2).sum(dim=-1)
    return 0.5 * torch.clamp(margin + dp - dn, min=0.0)


def hardest_negatives(sim: np.ndarray, query_labels: np.ndarray, pool_labels: np.ndarray, k: int = 1,
                      one_per_label: bool = True) -> np.ndarray:
    """Hard negatives: for each query (row of ``sim``, (Q, P) similarities to a pool of P images), the ``k``
    most similar pool images whose label differs from the query's -- at most one per label when
    ``one_per_label`` (the hardest image of each other group). Returns (Q, k) int64 pool positions, most
    similar first, -1 where the pool has fewer such images. Ties: the lower pool position first."""
    sim = np.asarray(sim, dtype=np.float64)
    ql, pl = np.asarray(query_labels), np.asarray(pool_labels)
    if sim.ndim != 2 or sim.shape != (len(ql), len(pl)):
        raise ValueError(f"hardest_negatives: sim {sim.shape} does not match {len(ql)} queries x {len(pl)} pool")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.full((len(ql), k), -1, dtype=np.int64)
    for a in range(len(ql)):
        order = np.argsort(-sim[a], kind="stable")
        order = order[pl[order] != ql[a]]
        if one_per_label:
            _, first = np.unique(pl[order], return_index=True)
            order = order[np.sort(first)]
        take = order[:k]
        out[a, :len(take)] = take
    return out


def choose_positives(sim: np.ndarray, query_pos: np.ndarray, query_labels: np.ndarray, pool_labels: np.ndarray,
                     mode: str = "random", rng: np.random.Generator | None = None) -> np.ndarray:
    """One positive per query: a pool image of the same label other than the query itself (``query_pos``: the
    query's own pool position). ``mode``: ``"random"`` or ``"hardest"`` (the least similar). -1 if none."""
    if mode not in ("random", "hardest"):
        raise ValueError(f"positive mode must be 'random' or 'hardest', got {mode!r}")
    rng = rng or np.random.default_rng(0)
    pl = np.asarray(pool_labels)
    out = np.full(len(query_pos), -1, dtype=np.int64)
    for a, (qp, lab) in enumerate(zip(np.asarray(query_pos), np.asarray(query_labels))):
        cand = np.flatnonzero(pl == lab)
        cand = cand[cand != qp]
        if len(cand) == 0:
            continue
        out[a] = cand[np.argmin(sim[a, cand])] if mode == "hardest" else rng.choice(cand)
    return out


# ------------------------------------------------------------------------------------------------ cached inputs
class InputCache(Sequence):
    """Outputs of the frozen part of VGG16 at one tap (the trainable part's input) for a list of images.

    One fp16 ``.npy`` file per image in a folder named by a hash of the settings (image files and boxes, tap,
    max side, backbone weights and engine); an interrupted build resumes. ``cache[i]`` is a float32 (C, H, W)
    tensor. Build with :meth:`build`."""

    def __init__(self, folder: str | os.PathLike, n: int, settings: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.n = int(n)
        self.settings = settings or {}

    def __len__(self) -> int:
        return self.n

    def file(self, i: int) -> Path:
        return self.folder / f"{i:06d}.npy"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"InputCache index {i} out of range ({self.n} images)")
        i %= self.n
        try:
            arr = np.load(self.file(i), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.file(i)}: damaged cache entry ({exc}); delete {self.folder} to rebuild") from exc
        return torch.from_numpy(arr.astype(np.float32))

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(np.load(self.file(i), mmap_mode="r").shape) for i in range(self.n)]

    @staticmethod
    def settings_for(items: Sequence[tuple[Path, Any]], backbone, layer: str, max_size: int | None) -> dict[str, Any]:
        from ..backbones.fast import engine_of

        files = []
        for path, box in items:
            p = Path(path)
            try:
                size = p.stat().st_size
            except OSError as exc:
                raise FileNotFoundError(f"{p}: training/evaluation image not found ({exc.strerror})") from None
            files.append([p.name, size, None if box is None else [float(v) for v in tuple(box)]])
        return {"backbone": backbone.name, "weights": str(getattr(backbone.weights, "sha256", "")), "layer": layer,
                "max_size": max_size, "engine": engine_of(backbone), "files": files}

    @classmethod
    def build(cls, items: Sequence[tuple[str | os.PathLike, Any]], backbone, layer: str, max_size: int | None,
              root: str | os.PathLike, *, progress: bool = True, desc: str = "caching inputs") -> "InputCache":
        """Compute (or reuse) the ``layer`` maps of ``items`` = [(image path, box or None)], each image loaded
        with its longer side capped at ``max_size`` and cropped to its box first (revisitop's query protocol).
        ``layer == "image"`` stores the preprocessed image itself. Progress bar while computing."""
        from ..io import prefetch, progress_bar
        from ..images import load_image

        items = [(Path(p), b) for p, b in items]
        settings = cls.settings_for(items, backbone, layer, max_size)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(root) / f"{layer}-{max_size}-{len(items)}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "settings.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps(settings, indent=0).encode())
        cache = cls(folder, len(items), settings)
        todo = [i for i in range(len(items)) if not cache.file(i).exists()]
        if not todo:
            return cache
        bar = progress_bar(len(todo), desc, progress)

        def decode(i):
            return i, load_image(items[i][0], max_size=max_size, box=items[i][1])

        try:
            for i, img in prefetch(decode, todo):
                if layer == "image":
                    arr = backbone.preprocess(img)
                else:
                    arr = backbone.features(img, layers=[layer], scales=(1.0,))[(layer, 1.0)]
                arr = arr.detach().cpu().numpy()
                big = float(np.abs(arr).max()) if arr.size else 0.0
                arr = arr.astype(np.float16 if big < 6.0e4 else np.float32)
                tmp = folder / f".{i:06d}.tmp.npy"
                np.save(tmp, arr)
                os.replace(tmp, cache.file(i))
                bar.update(1)
        finally:
            bar.close()
        return cache


# ------------------------------------------------------------------------------------------------ trainer
def check_device(device) -> torch.device:
    """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) as a ``torch.device``; a name torch does
    not know, or a CUDA device on a machine where torch sees no GPU, is refused (:class:`InputError` naming it)
    before any work -- never silently run on the CPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"device {device!r}: not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() "
                         f"is False); use 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: training runs on 'cpu' or 'cuda'")
    return dev


def _cpu_state(obj):
    """A copy of a (nested) state dict with every tensor on the CPU, so that a checkpoint written on a GPU
    loads on a CPU-only machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_state(v) for v in obj)
    return obj


@dataclass
class TrainConfig:
    """Settings of :class:`TripletTrainer` (see the module docstring)."""

    epochs: int = 3
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    margin: float = 0.1  # Gordo et al. 2016, Sec. 3.1
    batch: int = 16  # triplets per SGD update (gradients accumulated over them)
    micro_batch: int = 8  # triplets per forward/backward pass
    remine_every: int = 4  # updates between two minings
    mine_pool: int = 0  # candidate negatives described per mining besides queries + positives (0: all images)
    negatives: int = 1  # hardest negatives (of distinct groups) per query
    positive: str = "random"  # "random" or "hardest"
    anchors_per_epoch: int = 0  # queries per epoch (0: every training image that has a positive)
    skip_easy: bool = True  # drop mined triplets whose loss is already 0 (they give no gradient)
    describe_batch: int = 16  # maps per batch when describing
    seed: int = 0

    def validate(self) -> "TrainConfig":
        for name in ("epochs", "batch", "micro_batch", "remine_every", "negatives", "describe_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mine_pool", "anchors_per_epoch", "weight_decay", "margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.positive not in ("random", "hardest"):
            raise ValueError(f"positive must be 'random' or 'hardest', got {self.positive!r}")
        return self

    def comparable(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (all but the number of epochs)."""
        d = asdict(self)
        d.pop("epochs")
        return d


class TripletTrainer:
    """Three-stream Siamese training of an :class:`RMACNet` with hard triplets (Gordo et al. 2016, Sec. 3.1).

    ``inputs``: the network inputs of the training images (an :class:`InputCache` or a list of (C, H, W)
    tensors); ``labels``: their group labels (same label = same object/scene). ``checkpoint_dir``: where
    ``checkpoint.pt``, per-epoch models ``epoch-NNN.pt`` (+ ``.json``), the final ``model.pt`` and
    ``loss_curve.png`` go (None: no files). ``fit(resume=True)`` continues from ``checkpoint.pt`` if present.
    ``device``: where the network, its inputs and the losses live (``"cpu"``, ``"cuda"``, a ``torch.device``;
    None: wherever ``net`` already is); the inputs stay on the CPU (or in the cache) until a batch needs them.
    Files hold CPU tensors whatever the device (a model trained on a GPU loads on a CPU-only machine).
    """

    def __init__(self, net: RMACNet, inputs: Sequence[torch.Tensor], labels, config: TrainConfig | None = None,
                 checkpoint_dir: str | os.PathLike | None = None, *, progress: bool = True,
                 info: dict[str, Any] | None = None, device: str | torch.device | None = None):
        if device is not None:
            net = net.to(check_device(device))  # before the optimizer is built on its parameters
        self.net = net
        self.inputs = inputs
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(inputs):
            raise ValueError(f"{len(inputs)} training inputs but {len(self.labels)} labels")
        self.config = (config or TrainConfig()).validate()
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.progress = progress
        self.info = dict(info or {})
        members: dict[int, list[int]] = {}
        for i, lab in enumerate(self.labels.tolist()):
            members.setdefault(lab, []).append(i)
        self.members = {k: np.asarray(v, dtype=np.int64) for k, v in members.items()}
        self.anchors = np.asarray([i for i, lab in enumerate(self.labels.tolist()) if len(members[lab]) > 1],
                                  dtype=np.int64)
        if len(self.anchors) == 0:
            raise ValueError("no training image has a positive (every group has a single image)")
        if len(self.members) < 2:
            raise ValueError("triplets need at least two groups in the training set")
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the network has no trainable parameters")
        c = self.config
        self.optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        self.epoch = 0  # next epoch to run
        self.round = 0  # next round of that epoch
        self.updates = 0
        self.epoch_elapsed = 0.0  # seconds already spent in the current epoch (before a resume)
        self.epoch_cpu = 0.0  # CPU seconds of this process, likewise
        self.history: dict[str, list] = {"updates": [], "rounds": [], "epochs": []}

    @property
    def device(self) -> torch.device:
        """The device of the network's parameters (where batches, descriptors and losses are computed)."""
        return self.net.head.shift.device

    # -------------------------------------------------------------- randomness: a pure function of the position
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([int(self.config.seed), *[int(k) for k in keys]])

    def epoch_rounds(self, epoch: int) -> list[np.ndarray]:
        """The queries of ``epoch`` (shuffled), cut into mining rounds."""
        c = self.config
        order = self._rng(epoch).permutation(self.anchors)
        if c.anchors_per_epoch:
            order = order[:c.anchors_per_epoch]
        per = max(1, math.ceil(c.batch * c.remine_every / c.negatives))
        return [order[k:k + per] for k in range(0, len(order), per)]

    # -------------------------------------------------------------- mining
    @torch.no_grad()
    def describe(self, ids: Sequence[int]) -> torch.Tensor:
        self.net.eval()
        return self.net.embed([self.inputs[int(i)] for i in ids], batch=self.config.describe_batch)

    def mine(self, anchors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Hard triplets for ``anchors`` with the current weights: ``(triplets (T, 3) image ids, their losses at
        mining time, stats)``. The pool holds the queries, all their positives and ``mine_pool`` random
        other images (every image when ``mine_pool`` is 0)."""
        c = self.config
        anchors = np.asarray(anchors, dtype=np.int64)
        need = np.unique(np.concatenate([self.members[int(lab)] for lab in np.unique(self.labels[anchors])]))
        if c.mine_pool and c.mine_pool < len(self.labels) - len(need):
            others = np.setdiff1d(np.arange(len(self.labels)), need, assume_unique=True)
            extra = rng.choice(others, size=c.mine_pool, replace=False)
            pool = np.union1d(need, extra)
        else:
            pool = np.arange(len(self.labels))
        D = self.describe(pool)
        where = {int(g): k for k, g in enumerate(pool.tolist())}
        apos = np.asarray([where[int(a)] for a in anchors])
        sim = (D[torch.as_tensor(apos, device=D.device)] @ D.T).double().cpu().numpy()
        plab = self.labels[pool]
        alab = self.labels[anchors]
        pos = choose_positives(sim, apos, alab, plab, c.positive, rng)
        neg = hardest_negatives(sim, alab, plab, k=c.negatives)
        rows = [(apos[a], pos[a], neg[a, j]) for a in range(len(anchors)) for j in range(c.negatives)
                if pos[a] >= 0 and neg[a, j] >= 0]
        if not rows:
            return np.zeros((0, 3), np.int64), np.zeros(0), {"pool": len(pool), "triplets": 0, "active": 0}
        t = np.asarray(rows, dtype=np.int64)
        tt = torch.as_tensor(t, device=D.device)
        losses = triplet_loss(D[tt[:, 0]], D[tt[:, 1]], D[tt[:, 2]], c.margin).cpu().numpy().astype(np.float64)
        stats = {"pool": int(len(pool)), "triplets": int(len(t)), "active": int((losses > 0).sum()),
                 "mined_loss": float(losses.mean())}
        triplets = pool[t]
        if c.skip_easy:
            keep = losses > 0
            triplets, losses = triplets[keep], losses[keep]
        return triplets, losses, stats

    # -------------------------------------------------------------- one update
    def batch_loss(self, triplets: np.ndarray, backward: bool = False) -> tuple[float, int]:
        """Mean triplet loss of ``triplets`` (T, 3) image ids with the current weights (each distinct image of a
        micro-batch described once); with ``backward`` the gradients of that mean are accumulated."""
        c = self.config
        triplets = np.asarray(triplets, dtype=np.int64).reshape(-1, 3)
        total, active = 0.0, 0
        for k in range(0, len(triplets), c.micro_batch):
            chunk = triplets[k:k + c.micro_batch]
            ids, inv = np.unique(chunk.ravel(), return_inverse=True)
            inv = torch.as_tensor(inv.reshape(chunk.shape), device=self.device)
            with torch.set_grad_enabled(backward):
                D = self.net.embed([self.inputs[int(i)] for i in ids], batch=c.describe_batch)
                lv = triplet_loss(D[inv[:, 0]], D[inv[:, 1]], D[inv[:, 2]], c.margin)
                if backward:
                    (lv.sum() / len(triplets)).backward()
            total += float(lv.detach().sum().cpu())
            active += int((lv.detach() > 0).sum().cpu())
        return total / max(1, len(triplets)), active

    def step(self, triplets: np.ndarray) -> tuple[float, int]:
        """One SGD update on a batch of triplets (gradients accumulated over micro-batches). Returns the batch's
        mean loss before the update and how many of its triplets had a non-zero loss."""
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, active = self.batch_loss(triplets, backward=True)
        self.optimizer.step()
        self.updates += 1
        return loss, active

    @torch.no_grad()
    def mean_loss(self, triplets: np.ndarray) -> float:
        """Mean loss of fixed triplets with the current weights (no update)."""
        self.net.eval()
        return self.batch_loss(triplets, backward=False)[0]

    # -------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / "checkpoint.pt"

    def save_checkpoint(self) -> Path | None:
        path = self.checkpoint_path
        if path is None:
            return None
        import io

        state = {"format": _CKPT_FORMAT, "format_version": _CKPT_VERSION,
                 "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                 "optimizer": _cpu_state(self.optimizer.state_dict()), "epoch": self.epoch, "round": self.round,
                 "updates": self.updates, "epoch_elapsed": float(self.epoch_elapsed),
                 "epoch_cpu": float(self.epoch_cpu), "history": self.history,
                 "model_config": json.dumps(self.net.config(), sort_keys=True),
                 "train_config": json.dumps(self.config.comparable(), sort_keys=True),
                 "backbone_weights_sha256": self.net.backbone_weights_sha256}
        buf = io.BytesIO()
        torch.save(state, buf)
        return atomic_write_bytes(path, buf.getvalue())

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> bool:
        """Restore model, optimizer, position and history from ``path`` (default ``checkpoint.pt``); False if
        there is none. Refuses a checkpoint of other settings (all but ``epochs`` must match)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None or not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
            raise CheckpointError(f"{path}: not a learned R-MAC training checkpoint")
        mine = self.net.config()
        if not mine["backbone_weights_sha256"]:  # a bare network: it takes the checkpoint's backbone
            mine["backbone_weights_sha256"] = state.get("backbone_weights_sha256", "")
        if state["model_config"] != json.dumps(mine, sort_keys=True):
            raise CheckpointError(f"{path}: checkpoint of another network ({state['model_config']}); use another "
                                  f"checkpoint folder or --no-resume")
        if state["train_config"] != json.dumps(self.config.comparable(), sort_keys=True):
            raise CheckpointError(f"{path}: checkpoint of other training settings ({state['train_config']}); only "
                                  f"the number of epochs may change on resume (use another folder or --no-resume)")
        self.net.load_state_dict(state["model"])
        self.net.backbone_weights_sha256 = mine["backbone_weights_sha256"]
        self.optimizer.load_state_dict(state["optimizer"])  # torch moves the momentum to the parameters' device
        self.epoch, self.round, self.updates = int(state["epoch"]), int(state["round"]), int(state["updates"])
        self.epoch_elapsed = float(state["epoch_elapsed"])
        self.epoch_cpu = float(state.get("epoch_cpu", 0.0))
        self.history = state["history"]
        return True

    # -------------------------------------------------------------- the loop
    def fit(self, resume: bool = True) -> dict[str, list]:
        """Train up to ``config.epochs`` epochs (resuming from the checkpoint when ``resume``); returns the
        history: per update (loss, active triplets), per mining round (mined loss, pool, seconds) and per epoch
        (seconds, mean loss)."""
        from tqdm.auto import tqdm

        c = self.config
        if resume and self.load_checkpoint() and self.progress:
            print(f"resumed from {self.checkpoint_path}: epoch {self.epoch + 1}, round {self.round + 1}, "
                  f"{self.updates} updates done", file=sys.stderr)
        while self.epoch < c.epochs:
            rounds = self.epoch_rounds(self.epoch)
            t_epoch = time.perf_counter() - self.epoch_elapsed
            c_epoch = time.process_time() - self.epoch_cpu
            bar = tqdm(total=len(rounds), initial=self.round, desc=f"epoch {self.epoch + 1}/{c.epochs}",
                       unit="round", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
            try:
                while self.round < len(rounds):
                    t0 = time.perf_counter()
                    triplets, _, stats = self.mine(rounds[self.round], self._rng(self.epoch, self.round))
                    t1 = time.perf_counter()
                    order = self._rng(self.epoch, self.round, 1).permutation(len(triplets))
                    losses = []
                    for k in range(0, len(triplets), c.batch):
                        loss, active = self.step(triplets[order[k:k + c.batch]])
                        losses.append(loss)
                        self.history["updates"].append({"epoch": self.epoch, "round": self.round,
                                                        "update": self.updates, "loss": loss, "active": active,
                                                        "triplets": int(len(order[k:k + c.batch]))})
                        bar.set_postfix(loss=f"{loss:.4f}", mined=f"{stats.get('mined_loss', 0.0):.4f}",
                                        active=f"{stats['active']}/{stats['triplets']}")
                    self.history["rounds"].append({"epoch": self.epoch, "round": self.round, "update": self.updates,
                                                   "mine_seconds": t1 - t0, "train_seconds": time.perf_counter() - t1,
                                                   "mean_batch_loss": float(np.mean(losses)) if losses else 0.0,
                                                   **stats})
                    self.round += 1
                    self.epoch_elapsed = time.perf_counter() - t_epoch
                    self.epoch_cpu = time.process_time() - c_epoch
                    bar.update(1)
                    if self.round < len(rounds):
                        self.save_checkpoint()
            finally:
                bar.close()
            seconds, cpu = time.perf_counter() - t_epoch, time.process_time() - c_epoch
            ep = [r for r in self.history["rounds"] if r["epoch"] == self.epoch]
            ups = [u for u in self.history["updates"] if u["epoch"] == self.epoch]
            self.history["epochs"].append({
                "epoch": self.epoch, "seconds": seconds, "cpu_seconds": cpu, "updates": len(ups),
                "mine_seconds": float(sum(r["mine_seconds"] for r in ep)),
                "train_seconds": float(sum(r["train_seconds"] for r in ep)),
                "mean_batch_loss": float(np.mean([u["loss"] for u in ups])) if ups else 0.0,
                "mean_mined_loss": float(np.mean([r.get("mined_loss", 0.0) for r in ep])) if ep else 0.0,
                "queries": int(sum(len(r) for r in rounds))})
            self.epoch += 1
            self.round = 0
            self.epoch_elapsed = self.epoch_cpu = 0.0
            if self.checkpoint_dir is not None:
                self.save_checkpoint()
                save_model(self.net, self.checkpoint_dir / f"epoch-{self.epoch:03d}.pt", **self.model_info())
        if self.checkpoint_dir is not None:
            save_model(self.net, self.checkpoint_dir / "model.pt", **self.model_info())
            if self.history["updates"]:
                plot_loss_curve(self.history, self.checkpoint_dir / "loss_curve.png")
        return self.history

    def model_info(self) -> dict[str, Any]:
        return {"training": {**self.info, "config": asdict(self.config), "epochs_done": self.epoch,
                             "updates": self.updates,
                             "seconds_per_epoch": [round(e["seconds"], 1) for e in self.history["epochs"]],
                             "cpu_seconds_per_epoch": [round(e.get("cpu_seconds", 0.0), 1)
                                                       for e in self.history["epochs"]]}}


# ------------------------------------------------------------------------------------------------ loss curve
def plot_loss_curve(history: dict[str, list], path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG of the training loss: the mean triplet loss of every update (and its running mean over 10 updates)
    and the mean loss of the hard triplets found at each mining, against the update number; epochs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = history.get("updates", [])
    rounds = history.get("rounds", [])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if ups:
        x = np.asarray([u["update"] for u in ups])
        y = np.asarray([u["loss"] for u in ups])
        ax.plot(x, y, color="tab:blue", alpha=0.35, lw=0.8, label="batch loss (hard triplets, before the update)")
        w = min(10, len(y))
        if w > 1:
            ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color="tab:blue", lw=2,
                    label=f"running mean of {w} updates")
    if rounds:
        ax.plot([r["update"] for r in rounds], [r.get("mined_loss", 0.0) for r in rounds], "o-", ms=3,
                color="tab:red", lw=1, label="mined loss (all mined triplets, at mining time)")
    for e in history.get("epochs", [])[:-1]:
        last = [u["update"] for u in ups if u["epoch"] == e["epoch"]]
        if last:
            ax.axvline(max(last) + 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("SGD update")
    ax.set_ylabel("triplet loss (Gordo et al. 2016, Eq. 1)")
    ax.set_title(title or "learned R-MAC: triplet ranking loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ the whole recipe
def train_on_split(checkpoint_dir: str | os.PathLike, config: TrainConfig | None = None, *,
                   train_layers: str = "conv5", max_size: int = 384, out_dim: int = 512,
                   data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   engine: str = "auto", resume: bool = True, progress: bool = True, device: str = "cpu"):
    """Train learned R-MAC on the project's training split (Holidays-811 + UKBench 0-499, asserted disjoint from
    the evaluation split): cache the frozen layers' outputs, initialise the head from PCA-whitening of the
    training regions, train with hard triplets. ``device``: ``"cpu"`` or ``"cuda"`` (the frozen layers, the
    trained network and every batch run there; the files hold CPU tensors). ``engine``: of the frozen layers
    only (:func:`~instance_search.backbones.fast.use_engine`; ``auto``: winograd on the CPU, exact on a GPU);
    the trained layers always run the exact fp32 convolutions. Returns ``(net, history, model path)``."""
    from ..backbones import load_backbone
    from ..backbones.fast import engine_of, use_engine
    from ..eval.datasets import splits
    from ..nets.rmac_head import INPUT_LAYER, fit_head_whitening

    if train_layers not in INPUT_LAYER:  # check the settings before any heavy work
        raise ValueError(f"unknown train_layers {train_layers!r}; choose one of {', '.join(INPUT_LAYER)}")
    device = str(check_device(device))
    config = (config or TrainConfig()).validate()
    if max_size is None or max_size < 32:
        raise ValueError(f"max_size must be at least 32 pixels, got {max_size}")
    ts = splits.training_set(data_dir)  # raises if it overlaps the evaluation split
    ckpt = Path(checkpoint_dir)
    bb = load_backbone("vgg16", progress=progress, device=device)
    use_engine(bb, engine)
    cache = InputCache.build([(p, None) for p in ts.paths], bb, INPUT_LAYER[train_layers], max_size,
                             Path(cache_dir) if cache_dir is not None else ckpt / "inputs", progress=progress,
                             desc=f"frozen layers -> {INPUT_LAYER[train_layers]}")
    net = RMACNet(train_layers, out_dim=out_dim).init_from_backbone(bb).to(device)
    info = {"trained_on": f"training split: Holidays-811 + UKBench images 0-499 ({len(ts)} images, "
                          f"{len(set(ts.labels.tolist()))} groups)", "max_size": max_size,
            "engine": engine_of(bb), "device": str(device)}
    trainer = TripletTrainer(net, cache, ts.labels, config, ckpt, progress=progress, info=info, device=device)
    if not (resume and trainer.checkpoint_path.is_file()):
        w = fit_head_whitening(net, cache, trained_on=info["trained_on"], progress=progress)
        trainer.info["pca"] = f"{w.n_samples} regional vectors -> {w.dim}-D"
    history = trainer.fit(resume=resume)
    return net, history, ckpt / "model.pt"
