"""Runners for the two local-feature papers: the layer x scale sweep of Ng, Yang & Davis 2015 (their Fig. 2)
and the mask x embedding/aggregation grid of Hoang et al. 2017 (their Table 3), plus the online-speed check.

Protocol. Every learned thing is learned on a HELD-OUT collection: with ``benchmarks=("holidays", "ukbench")``
and no ``train_on``, UKBench is described with codebooks / PCA / rotation learned on Holidays and vice versa.

Budget. One forward pass per image and scale gives every layer. The sweep never keeps low-layer maps: it
(1) learns one k-means codebook per (collection, layer, scale) on ``features_per_image`` random cells of
``codebook_images`` evenly spaced images, then (2) runs every image once per scale and writes, for each layer,
its VLAD under every collection's codebook into fp16 ``.npy`` files (memory-mapped, so RAM stays flat), then
(3) learns the PCA-whitening and scores. Everything is cached under ``cache_dir`` (keys hash the image list,
sizes, scale, layers and codebooks), and the scale-1 maps of ``save_maps`` layers (default ``conv5_3``) plus
the SIFT keypoints are stored in the same format :func:`conv_maps` reads, so the Table-3 grid reuses them.

Functions (the CLI wires ``isearch sweep`` -> :func:`layer_scale_sweep` + :func:`sweep_table` +
:func:`plot_sweep`, ``isearch selective-grid`` -> :func:`selective_grid` + :func:`grid_table`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..io import atomic_save_npz, load_npz, prefetch
from ..ops.normalize import l2n
from ..recipes.hoang import MASKS, Selective, mask_cells
from ..recipes.base import Recipe
from ..recipes.ng import cells, codebook_image_indices, fit_codebook, raw_vlad, sample_cells

__all__ = [
    "BenchSpec",
    "DEFAULT_LAYERS",
    "DEFAULT_PAIRS",
    "conv_maps",
    "grid_table",
    "layer_scale_sweep",
    "limit_threads",
    "plot_sweep",
    "selective_grid",
    "selective_recipe",
    "selective_speed",
    "subset_benchmark",
    "sweep_table",
]

#: Layers swept by default (Ng et al. 2015 sweep the conv layers of each network).
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "vgg16": ("conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
              "pool5"),
    "resnet50": ("res2", "res3", "res4", "res5"),
    "googlenet": ("inception_3a", "inception_3b", "inception_4a", "inception_4b", "inception_4c", "inception_4d",
                  "inception_4e", "inception_5a", "inception_5b"),
}
#: Table 3 of Hoang et al. 2017: (embedding, aggregation) columns; masks are the rows.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("fv", "sum"), ("vlad", "sum"), ("vlad", "democratic"), ("temb", "sum"), ("temb", "democratic"), ("ffaemb", "sum"),
    ("ffaemb", "democratic"),
)
_VERSION = 1


# --------------------------------------------------------------------------------------------------
# threads


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Cap torch's and the BLAS / OpenMP pools' threads at ``n`` inside the block (``None``: unchanged).

    On a CPU shared with other jobs one thread per process is often several times faster than oversubscribed
    pools (measured here: a 4752x528 QR took 9 s with 2 OpenBLAS threads on a loaded 2-core machine, 0.2 s
    with 1; a VGG16 forward pass 3-5x faster with 1 torch thread)."""
    if n is None:
        yield
        return
    import torch

    # threadpoolctl only reaches libraries already loaded: load SciPy's OpenBLAS and FAISS's OpenMP first
    import scipy.linalg  # noqa: F401
    import scipy.linalg.lapack  # noqa: F401

    try:
        import faiss  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            yield
        else:
            with threadpool_limits(int(n)):
                yield
    finally:
        torch.set_num_threads(old)


def _threaded(fn):
    """Add a keyword ``threads: int | None = None`` that runs ``fn`` under :func:`limit_threads`."""

    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        with limit_threads(threads):
            return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    params.insert(len(params), inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None,
                                                 annotation="int | None"))
    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


# --------------------------------------------------------------------------------------------------
# benchmarks and their subsets


def subset_benchmark(bench, limit: int | None):
    """The first ``limit`` database images of a UKBench / Holidays benchmark, with its ground truth
    restricted to them (UKBench: ``limit`` rounded down to whole groups of 4; Holidays: queries without a
    positive among the kept images are dropped). ``None`` or a limit >= the size returns ``bench``."""
    from .datasets.benchmarks import Benchmark
    from . import metrics as ev

    if limit is None or limit >= bench.n_images:
        return bench
    if bench.protocol == "ukbench":
        n = max(4, int(limit) // 4 * 4)
        paths = list(bench.images[:n])
        groups = np.asarray(bench.groups[:n])
        gnd = [{"ok": np.flatnonzero(groups == groups[q]), "junk": np.empty(0, np.int64)} for q in range(n)]
        return Benchmark(name=bench.name, images=paths, query_paths=list(paths), query_boxes=[None] * n, gnd=gnd,
                         protocol="ukbench", query_indices=list(range(n)), groups=groups, comparable=False,
                         note=f"UKBench first {n} images: not comparable with published N-S scores")
    if bench.protocol == "holidays":
        paths = list(bench.images[: int(limit)])
        queries, gnd = ev.holidays_gnd([p.name for p in paths])
        keep = [i for i, g in enumerate(gnd) if len(g["ok"])]
        return Benchmark(name=bench.name, images=paths, query_paths=[paths[queries[i]] for i in keep],
                         query_boxes=[None] * len(keep), gnd=[gnd[i] for i in keep], protocol="holidays",
                         query_indices=[queries[i] for i in keep], comparable=False,
                         note=f"Holidays first {len(paths)} images: not comparable with published mAP")
    raise ValueError(f"subsets are defined for ukbench and holidays, not {bench.protocol!r}")


@dataclass
class BenchSpec:
    """A benchmark as used here: name, the first ``limit`` images (None: all), images capped at ``max_size``."""

    name: str
    limit: int | None = None
    max_size: int | None = None
    images_dir: str | None = None
    _bench: Any = field(default=None, repr=False)

    @property
    def bench(self):
        if self._bench is None:
            from .datasets import load_benchmark

            self._bench = subset_benchmark(load_benchmark(self.name, images_dir=self.images_dir), self.limit)
        return self._bench

    @property
    def images(self) -> list[Path]:
        return [Path(p) for p in self.bench.images]

    @property
    def tag(self) -> str:
        return f"{self.name}{len(self.images)}-m{self.max_size or 'full'}"

    def describe(self) -> str:
        return (f"{self.name}: {len(self.images)} images, {self.bench.n_queries} queries, max side "
                f"{self.max_size or 'original'}")

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.max_size}|".encode())
        for p in self.images:
            h.update(f"{p.name}|".encode())
        return h.hexdigest()[:12]


def _spec(x, limits=None, max_sizes=None) -> BenchSpec:
    if isinstance(x, BenchSpec):
        return x
    def pick(v):
        return v.get(x) if isinstance(v, Mapping) else v
    return BenchSpec(str(x), limit=pick(limits), max_size=pick(max_sizes))


def _default_pairing(names: Sequence[str], train_on: Mapping[str, str] | None) -> dict[str, str]:
    if train_on:
        return dict(train_on)
    if len(names) == 2:
        return {names[0]: names[1], names[1]: names[0]}
    raise ValueError("give train_on={benchmark: held-out benchmark} unless exactly two benchmarks are swept")


def _evaluate(bench, vecs: np.ndarray) -> dict[str, float]:
    q = vecs[np.asarray(bench.query_indices, dtype=np.int64)]
    res = bench.evaluate((q @ vecs.T).astype(np.float32))
    out = {"map": round(float(res["map"]), 2)}
    if "ns" in res:
        out["ns"] = round(float(res["ns"]), 3)
    return out


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Progress:
    def __init__(self, total: int, what: str, log: Callable[[str], None], every_s: float = 30.0):
        self.total, self.what, self.log, self.every = total, what, log, every_s
        self.t0 = self.last = time.perf_counter()
        self.n = 0

    def step(self) -> None:
        self.n += 1
        now = time.perf_counter()
        if now - self.last >= self.every or self.n == self.total:
            rate = (now - self.t0) / max(self.n, 1)
            self.log(f"  {self.what}: {self.n}/{self.total} ({rate:.2f} s/img, {now - self.t0:.0f} s)")
            self.last = now


def _images(spec: BenchSpec, indices: Sequence[int] | None = None):
    from ..images import load_image

    paths = spec.images
    idx = range(len(paths)) if indices is None else indices
    return prefetch(lambda i: (i, load_image(paths[i], max_size=spec.max_size)), list(idx))


def _load_backbone(backbone, engine: str = "exact", weights=None):
    if not isinstance(backbone, str):
        return backbone
    from ..backbones import load_backbone

    bb = load_backbone(backbone, weights=weights, progress=False)
    if engine != "exact":
        from ..backbones.fast import use_engine

        use_engine(bb, engine)
    return bb


def _weights_tag(backbone, weights, engine: str) -> tuple[str, Any]:
    """(name for cache files, backbone loaded now or None). Weights a user supplies (GoogLeNet, or any explicit
    ``weights``) are not pinned: the name then carries the sha256 of their tensors, so caches never mix them."""
    if not isinstance(backbone, str):
        return backbone, None
    from ..backbones.weights import SOURCES, canon_arch

    if weights is None and any(s.kind == "package" for s in SOURCES[canon_arch(backbone)]):
        return backbone, None
    bb = _load_backbone(backbone, engine, weights)
    return f"{backbone}-{(bb.weights.state_sha256 or bb.weights.sha256)[:12]}", bb


# --------------------------------------------------------------------------------------------------
# cached conv maps (one layer, one scale) and SIFT keypoints


def _maps_path(cache_dir: Path, spec: BenchSpec, backbone: str, layer: str, scale: float) -> Path:
    return Path(cache_dir) / "maps" / f"{backbone}_{layer}_s{scale:g}_{spec.tag}_{spec.key()}.npz"


def _kp_path(cache_dir: Path, spec: BenchSpec) -> Path:
    return Path(cache_dir) / "maps" / f"sift_{spec.tag}_{spec.key()}.npz"


def _save_maps(path: Path, maps: list[np.ndarray], names: list[str]) -> None:
    shapes = np.array([m.shape for m in maps], dtype=np.int32).reshape(-1, 3)
    data = np.concatenate([np.asarray(m, np.float16).reshape(-1) for m in maps]) if maps else np.zeros(0, np.float16)
    atomic_save_npz(path, **{"data": data, "shapes": shapes, "names": np.array(names), "version": np.array(_VERSION)})


def _read_maps(path: Path) -> list[np.ndarray]:
    z = load_npz(path, what="conv-map cache file")
    data, shapes = z["data"], z["shapes"]
    sizes = np.prod(shapes, axis=1)
    off = np.concatenate([[0], np.cumsum(sizes)])
    return [data[off[i]:off[i + 1]].reshape(shapes[i]) for i in range(len(shapes))]


def _save_keypoints(path: Path, kps: list[np.ndarray], hws: list[tuple[int, int]]) -> None:
    off = np.concatenate([[0], np.cumsum([len(k) for k in kps])]).astype(np.int64)
    flat = np.concatenate(kps).astype(np.float32) if kps else np.zeros((0, 2), np.float32)
    atomic_save_npz(path, **{"kp": flat.reshape(-1, 2), "off": off, "hw": np.array(hws, np.int32).reshape(-1, 2)})


def _read_keypoints(path: Path) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    z = load_npz(path, what="keypoint cache file")
    kp, off, hw = z["kp"], z["off"], z["hw"]
    return [kp[off[i]:off[i + 1]] for i in range(len(off) - 1)], [tuple(map(int, h)) for h in hw]


@_threaded
def conv_maps(spec: BenchSpec | str, layer: str = "conv5_3", scale: float = 1.0, *, backbone: str = "vgg16",
              cache_dir: str | os.PathLike = "benchmarks/cache", keypoints: bool = False, engine: str = "exact",
              log: Callable[[str], None] | None = _log_default, backbone_obj=None):
    """Conv maps (list of fp16 (C, h, w)) of a benchmark's images at one layer and scale, cached in
    ``cache_dir/maps``; with ``keypoints`` also the SIFT keypoints ((N, 2) x, y) and (H, W) of every image as
    it was fed to the network at scale 1. Returns ``(maps, keypoints or None, image_hws or None)``."""
    from ..ops.masks import sift_keypoints

    spec = _spec(spec)
    log = log or (lambda m: None)
    mp, kpp = _maps_path(cache_dir, spec, backbone, layer, scale), _kp_path(cache_dir, spec)
    need_maps, need_kp = not mp.exists(), keypoints and not kpp.exists()
    if need_maps or need_kp:
        bb = backbone_obj if backbone_obj is not None else (_load_backbone(backbone, engine) if need_maps else None)
        maps, kps, hws = [], [], []
        prog = _Progress(len(spec.images), f"{spec.tag} {layer} s{scale:g} maps", log)
        for _, img in _images(spec):
            if need_maps:
                maps.append(bb.features(img, [layer], (scale,))[(layer, scale)].numpy().astype(np.float16))
            if need_kp:
                kps.append(sift_keypoints(img))
                hws.append((img.height, img.width))
            prog.step()
        if need_maps:
            _save_maps(mp, maps, [p.name for p in spec.images])
        if need_kp:
            _save_keypoints(kpp, kps, hws)
    maps = _read_maps(mp)
    if not keypoints:
        return maps, None, None
    kps, hws = _read_keypoints(kpp)
    return maps, kps, hws


# --------------------------------------------------------------------------------------------------
# Ng et al. 2015: layer x scale sweep


def _hash_arrays(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


def _codebook_samples(spec: BenchSpec, layers: Sequence[str], scale: float, n_images: int, per_image: int,
                      seed: int, get_bb, cache_dir: Path, backbone: str, log) -> dict[str, np.ndarray]:
    """Random cells of evenly spaced images for the codebooks, drawn as the ``ng-vlad`` recipe's ``fit`` draws
    them (:func:`~instance_search.recipes.ng.sample_cells`: one stream per scale, image by image, layer by
    layer), so that a recipe fitted on the same images with the same ``layers`` learns the same codebooks."""
    n = len(spec.images)
    idx = codebook_image_indices(n, n_images)
    key = hashlib.sha256(json.dumps([backbone, list(layers), scale, idx.tolist(), per_image, seed,
                                     spec.key()]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "ngvlad" / f"cbsample_{backbone}_{spec.tag}_s{scale:g}_{key}.npz"
    if path.exists():
        z = load_npz(path, what="codebook-sample cache file")
        return {layer: z[layer].astype(np.float32) for layer in layers}
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    bb = get_bb()
    prog = _Progress(len(idx), f"{spec.tag} s{scale:g} codebook sample", log)
    for i, img in _images(spec, idx.tolist()):
        feats = bb.features(img, list(layers), (scale,))
        for layer, x in zip(layers, sample_cells([feats[(layer, scale)] for layer in layers], per_image, rng)):
            out[layer].append(x)
        prog.step()
    arrays = {layer: np.concatenate(v) for layer, v in out.items()}
    atomic_save_npz(path, **arrays)
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _vlad_pass(spec: BenchSpec, layers: Sequence[str], scale: float, codebooks: Mapping[str, Mapping[str, np.ndarray]],
               get_bb, cache_dir: Path, backbone: str, save_maps: Sequence[str], keypoints: bool, log,
               limit: int | None = None) -> dict[tuple[str, str], np.ndarray]:
    """VLADs (n, k*C) fp16 of the images of ``spec`` for each (layer, codebook name), from one forward pass
    per image (:func:`~instance_search.recipes.ng.raw_vlad`, the ``ng-vlad`` recipe's raw VLAD); memory-mapped
    .npy files in a folder keyed by everything that determines them.

    Resumable: ``done.json`` records how many leading images (``rows``) are done, checkpointed every minute,
    so a killed pass goes on where it stopped and ``limit`` (the first N images) is served by a partial one.
    Rows past ``rows`` are zeros: callers read only the first ``limit``."""
    from ..ops.masks import sift_keypoints

    cb_names = sorted(codebooks)
    key = _hash_arrays(*[codebooks[c][layer] for c in cb_names for layer in layers],
                       np.frombuffer(json.dumps([backbone, list(layers), scale, spec.key(), cb_names]).encode(),
                                     np.uint8))
    n_all = len(spec.images)
    n = n_all if limit is None else max(0, min(int(limit), n_all))
    folder = Path(cache_dir) / "ngvlad" / f"vlad_{backbone}_{spec.tag}_s{scale:g}_{key}"
    done = folder / "done.json"
    files = {(layer, c): folder / f"{layer}__{c}.npy" for layer in layers for c in cb_names}
    info = {"images": n_all, "layers": list(layers), "scale": scale, "codebooks": cb_names}
    r0 = int(json.loads(done.read_text()).get("rows", n_all)) if done.exists() else 0
    if r0 < n:
        folder.mkdir(parents=True, exist_ok=True)
        bb = get_bb()
        if r0 == 0 or not all(f.exists() for f in files.values()):
            r0 = 0
            mm = {(layer, c): np.lib.format.open_memmap(f, mode="w+", dtype=np.float16,
                                                        shape=(n_all, codebooks[c][layer].size))
                  for (layer, c), f in files.items()}
        else:
            mm = {lc: np.load(f, mmap_mode="r+") for lc, f in files.items()}
            log(f"  {spec.tag} s{scale:g}: resuming the VLAD pass at image {r0}")
        whole = r0 == 0 and n == n_all  # maps and keypoints are stored from whole passes only
        keep_maps = [layer for layer in save_maps if scale == 1.0 and layer in layers and whole
                     and not _maps_path(cache_dir, spec, backbone, layer, scale).exists()]
        kept: dict[str, list[np.ndarray]] = {layer: [] for layer in keep_maps}
        want_kp = keypoints and scale == 1.0 and whole and not _kp_path(cache_dir, spec).exists()
        kps, hws = [], []
        prog = _Progress(n - r0, f"{spec.tag} s{scale:g} VLADs ({len(layers)} layers x {len(cb_names)} codebooks)",
                         log)

        def checkpoint(rows: int) -> None:
            for a in mm.values():
                a.flush()
            _atomic_text(done, json.dumps({**info, "rows": rows}))

        last = time.perf_counter()
        for i, img in _images(spec, range(r0, n)):
            feats = bb.features(img, list(layers), (scale,))
            for layer in layers:
                fmap = feats[(layer, scale)]
                x = cells(fmap)  # flattened once for every codebook
                for c in cb_names:
                    mm[(layer, c)][i] = raw_vlad(x, codebooks[c][layer])
                if layer in kept:
                    kept[layer].append(fmap.numpy().astype(np.float16))
            if want_kp:
                kps.append(sift_keypoints(img))
                hws.append((img.height, img.width))
            prog.step()
            if time.perf_counter() - last > 60:
                checkpoint(i + 1)
                last = time.perf_counter()
        for layer, maps in kept.items():
            _save_maps(_maps_path(cache_dir, spec, backbone, layer, scale), maps, [p.name for p in spec.images])
        if want_kp:
            _save_keypoints(_kp_path(cache_dir, spec), kps, hws)
        checkpoint(n)
        del mm
    return {lc: np.load(f, mmap_mode="r") for lc, f in files.items()}


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@_threaded
def layer_scale_sweep(benchmarks: Sequence[str | BenchSpec] = ("holidays", "ukbench"), *,
                      train_on: Mapping[str, str] | None = None, backbone: str = "vgg16",
                      layers: Sequence[str] | None = None, scales: Sequence[float] = (1.0, 2.0),
                      k: int = 100, out_dim: int = 128, limit: int | Mapping[str, int] | None = None,
                      max_size: int | Mapping[str, int] | None = None, codebook_images: int = 50,
                      features_per_image: int = 200, multiscale: bool = True,
                      cache_dir: str | os.PathLike = "benchmarks/cache", save_maps: Sequence[str] = ("conv5_3",),
                      keypoints: bool = True, engine: str = "exact", seed: int = 1234,
                      scale_limits: Mapping[float, Mapping[str, int]] | None = None, weights: str | None = None,
                      log: Callable[[str], None] | None = _log_default) -> dict[str, Any]:
    """Ng, Yang & Davis 2015, Fig. 2: mAP of VLAD (k-means ``k``, intra-norm, L2, PCA-whitening to ``out_dim``)
    of every ``layer`` at every ``scale`` (and, with ``multiscale``, of the scales' VLADs concatenated), for
    every benchmark, with everything learned on its held-out partner (``train_on``; default: the two
    benchmarks swap; a benchmark that is not a key of ``train_on`` is only trained on, not scored).
    ``limit`` / ``max_size`` may be per benchmark (``{"ukbench": 400}``).
    ``scale_limits`` (``{2.0: {"ukbench": 300}}``) runs a benchmark's pass at that scale on its first N images
    only (codebooks still sampled from all of it): every PCA-whitening of its partner is then learned on those N
    (the same training set for every scale, so that scales compare), and the benchmark itself is also scored on
    its first N images, reported as ``"ukbench[:300]"``, for every scale. ``weights``: as for
    :func:`~instance_search.backbones.load_backbone` (GoogLeNet: the file supplied with ``isearch weights fetch
    googlenet --path FILE`` by default); unpinned weights name the cache files by their sha256.

    Returns ``{"rows": [{benchmark, train, layer, scale, map[, ns]}], "settings": ..., "timing_s": ...,
    "notes": [...]}``; see :func:`sweep_table` and :func:`plot_sweep`.
    """
    log = log or (lambda m: None)
    t_start = time.perf_counter()
    specs = [_spec(b, limit, max_size) for b in benchmarks]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmarks must be distinct, got {names}")
    pairing = _default_pairing(names, train_on)
    for x, y in pairing.items():
        if x not in names or y not in names or x == y:
            raise ValueError(f"train_on must map each benchmark to ANOTHER swept benchmark, got {x!r} -> {y!r}")
    layers = tuple(layers or DEFAULT_LAYERS.get(backbone, ()))
    if not layers:
        raise ValueError(f"no default layers for backbone {backbone!r}: pass layers=[...]")
    scales = tuple(float(s) for s in scales)
    cache_dir = Path(cache_dir)
    tag, loaded = _weights_tag(backbone, weights, engine)
    bb_holder: dict[str, Any] = {} if loaded is None else {"bb": loaded}

    def get_bb():
        if "bb" not in bb_holder:
            bb_holder["bb"] = _load_backbone(backbone, engine)
        return bb_holder["bb"]

    def recipe(layer: str, sc: Sequence[float]):
        """The ``ng-vlad`` recipe of one cell (its codebooks and whitening are set from the sweep's caches)."""
        return Recipe("ng-vlad", backbone=backbone, layer=layer,
                      extra={"layers": [layer], "scales": list(sc), "k": k, "dim": out_dim, "seed": seed,
                             "codebook_images": codebook_images, "features_per_image": features_per_image})

    by_name = {s.name: s for s in specs}
    trainers = sorted(set(pairing.values()))
    timing: dict[str, float] = {}
    scale_limits = {float(a): dict(b) for a, b in (scale_limits or {}).items()}

    def avail(name: str, scale: float) -> int:
        n = len(by_name[name].images)
        return min(n, int(scale_limits.get(scale, {}).get(name, n)))

    for s in specs:
        log(f"[sweep] {s.describe()}")
    # (1) codebooks: one per (training collection, layer, scale), then (2) per scale
    t0 = time.perf_counter()
    cbs: dict[float, dict[str, dict[str, np.ndarray]]] = {}
    vlads: dict[tuple[str, float], dict[tuple[str, str], np.ndarray]] = {}
    t_vlad = 0.0
    for scale in scales:
        cbs[scale] = {}
        for name in trainers:
            samples = _codebook_samples(by_name[name], layers, scale, codebook_images, features_per_image, seed,
                                        get_bb, cache_dir, tag, log)
            cbs[scale][name] = {layer: fit_codebook(samples[layer], k, recipe(layer, (scale,)).method.niter, seed)
                                for layer in layers}
        # (2) VLADs of every image under every codebook, one forward pass per image and scale
        t1 = time.perf_counter()
        for s in specs:
            vlads[(s.name, scale)] = _vlad_pass(s, layers, scale, cbs[scale], get_bb, cache_dir, tag,
                                                save_maps, keypoints, log, limit=avail(s.name, scale))
        t_vlad += time.perf_counter() - t1
    timing["codebook_sample_and_kmeans"] = time.perf_counter() - t0 - t_vlad
    timing["forward_and_vlad"] = t_vlad
    # (3) PCA-whitening learned on the held-out collection, scoring
    t0 = time.perf_counter()
    rows = []
    variants = [((scale,), f"{scale:g}") for scale in scales]
    if multiscale and len(scales) > 1:
        variants.append((scales, "+".join(f"{sc:g}" for sc in scales)))
    for s in specs:
        if s.name not in pairing:  # a training collection only
            continue
        x, y = s.name, pairing[s.name]
        n_train = min(avail(y, q) for q in scales)  # the same training images at every scale
        sizes = sorted({len(s.images)} | {avail(x, q) for q in scales}, reverse=True)
        for cap in sizes:
            bench = s.bench if cap == len(s.images) else subset_benchmark(s.bench, cap)
            m = bench.n_images  # UKBench subsets are whole groups of 4
            label = x if m == len(s.images) else f"{x}[:{m}]"
            for layer in layers:
                for sc, slabel in variants:
                    if min(avail(x, q) for q in sc) < cap:
                        continue
                    ng = recipe(layer, sc).method  # the cell is the ng-vlad recipe fitted on y
                    ng.set_codebooks({(layer, q): cbs[q][y][layer] for q in sc})
                    train = np.concatenate([np.asarray(vlads[(y, q)][(layer, y)][:n_train], np.float32)
                                            for q in sc], axis=1)
                    ng.fit_whitening(train, trained_on=f"{by_name[y].describe()}, first {n_train}")
                    del train
                    test = np.concatenate([np.asarray(vlads[(x, q)][(layer, y)][:m], np.float32) for q in sc],
                                          axis=1)
                    res = _evaluate(bench, ng.project(test))
                    del test
                    rows.append({"benchmark": label, "train": y, "train_images": n_train, "layer": layer,
                                 "scale": slabel, **res})
                    log(f"  {label:9s} {layer:8s} scale {slabel:5s} " + " ".join(f"{a}={b}" for a, b in res.items()))
    timing["pca_and_scoring"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    return {
        "paper": "Ng, Yang & Davis 2015, Fig. 2",
        "rows": rows,
        "settings": {"backbone": backbone, "weights": tag, "layers": list(layers), "scales": list(scales), "k": k,
                     "out_dim": out_dim, "codebook_images": codebook_images,
                     "features_per_image": features_per_image, "engine": engine,
                     "benchmarks": {s.name: s.describe() for s in specs}, "train_on": pairing,
                     "scale_limits": {f"{a:g}": b for a, b in scale_limits.items()}},
        "timing_s": {a: round(b, 1) for a, b in timing.items()},
        "notes": [s.bench.note for s in specs if s.bench.note],
    }


def sweep_table(result: Mapping[str, Any]) -> str:
    """Markdown table of a sweep: one row per layer, one column per (benchmark, scale); best per column in bold."""
    rows = result["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cols = list(dict.fromkeys((r["benchmark"], r["scale"]) for r in rows))
    val = {(r["benchmark"], r["scale"], r["layer"]): r for r in rows}
    best = {c: max(val[(c[0], c[1], layer)]["map"] for layer in layers if (c[0], c[1], layer) in val) for c in cols}
    head = "| layer | " + " | ".join(f"{b} s{s}" for b, s in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for layer in layers:
        cells = []
        for c in cols:
            r = val.get((c[0], c[1], layer))
            if r is None:
                cells.append("")
                continue
            txt = f"{r['map']:.1f}" + (f" ({r['ns']:.2f})" if "ns" in r else "")
            cells.append(f"**{txt}**" if r["map"] == best[c] else txt)
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """PNG like Ng et al.'s Fig. 2: mAP against layer, one line per scale, one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 4), squeeze=False)
    for ax, b in zip(axes[0], benches):
        for scale in dict.fromkeys(r["scale"] for r in rows if r["benchmark"] == b):
            pts = {r["layer"]: r["map"] for r in rows if r["benchmark"] == b and r["scale"] == scale}
            xs = [i for i, layer in enumerate(layers) if layer in pts]
            ax.plot(xs, [pts[layers[i]] for i in xs], marker="o", label=f"scale {scale}")
        train = next(r["train"] for r in rows if r["benchmark"] == b)
        ax.set_title(f"{result['settings']['benchmarks'].get(b, b)}\n(codebook + PCA on {train})", fontsize=9)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("mAP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    st = result["settings"]
    fig.suptitle(f"VLAD of {st['backbone']} local features (k={st['k']}, PCA-whitened to {st['out_dim']}-D)",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# Hoang et al. 2017: Table-3 grid, online speed


def selective_recipe(config: str | int, mask: str, embedding: str, aggregation: str, *, layer: str = "conv5_3",
                     backbone: str = "vgg16", **options) -> Recipe:
    """The ``selective`` recipe of one grid cell: ``config`` ``"table2"`` (= 4224) or a named dimension
    (:func:`~instance_search.recipes.hoang.resolve_config`); ``options``: further ``selective`` options."""
    dim = 4224 if config == "table2" else int(config)
    return Recipe("selective", backbone=backbone, layer=layer,
                  extra={"mask": mask, "embedding": embedding, "aggregation": aggregation, "dim": dim, **options})


def _make_selective(config: str | int, mask: str, embedding: str, aggregation: str, **kw) -> Selective:
    """The :class:`Selective` model of :func:`selective_recipe` (benchmarks and tests use it directly)."""
    return selective_recipe(config, mask, embedding, aggregation, **kw).method.model


@_threaded
def selective_grid(benchmarks: Sequence[str | BenchSpec] = ("holidays", "ukbench"), *,
                   train_on: Mapping[str, str] | None = None, masks: Sequence[str] = MASKS,
                   pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS, config: str | int = "table2",
                   evaluate: Sequence[str] | None = None, backbone: str = "vgg16", layer: str = "conv5_3",
                   limit: int | Mapping[str, int] | None = None, max_size: int | Mapping[str, int] | None = None,
                   cache_dir: str | os.PathLike = "benchmarks/cache", engine: str = "exact",
                   selective_kw: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] | None = _log_default) -> dict[str, Any]:
    """Hoang et al. 2017, Table 3: mAP of every mask x (embedding, aggregation) on conv maps of ``layer``
    (scale 1), each configuration learned on the held-out partner (``train_on``, default: swap two benchmarks).
    ``config``: ``"table2"`` (D = 4224 for every embedding), ``1024`` (every embedding at 1024-D, see
    :data:`~instance_search.recipes.hoang.DIM1024`) or another Table-4 dimension (512 ... 8064; T-emb's ``d, k``).
    ``evaluate``: the benchmarks to score (default all; the others only serve as training sets).

    Returns ``{"rows": [{benchmark, train, mask, embedding, aggregation, dim, map[, ns], fit_s, encode_ms}],
    "skipped": [cells not computable, with the reason: a rotation normalisation that drops more components
    than the training images can span, e.g. F-FAemb at 4224-D (1056) learned on 1000 images],
    "kept": {benchmark: {mask: mean share of cells kept}}, "settings", "timing_s"}``.
    """
    log = log or (lambda m: None)
    t_start = time.perf_counter()
    specs = [_spec(b, limit, max_size) for b in benchmarks]
    by_name = {s.name: s for s in specs}
    names = list(by_name)
    evaluate = list(evaluate or names)
    pairing = _default_pairing(names, train_on)
    kw = {a: b for a, b in dict(selective_kw or {}).items() if a not in ("layer", "backbone")}
    data = {}
    for name in set(evaluate) | {pairing[e] for e in evaluate}:
        maps, kps, hws = conv_maps(by_name[name], layer, 1.0, backbone=backbone, cache_dir=cache_dir,
                                   keypoints="sift" in masks, engine=engine, log=log)
        data[name] = (maps, kps, hws)
    kept: dict[str, dict[str, float]] = {}
    rows, skipped = [], []
    emb_aggs: dict[str, list[str]] = {}
    for e, a in pairs:
        emb_aggs.setdefault(e, []).append(a)
    for x in evaluate:
        y = pairing[x]
        tmaps, tkps, thws = data[y]
        qmaps, qkps, qhws = data[x]
        kept[x] = {}
        for mask in masks:
            share = [float(mask_cells(m, mask, None if qkps is None else qkps[i],
                                      None if qhws is None else qhws[i]).mean()) for i, m in enumerate(qmaps)]
            kept[x][mask] = round(float(np.mean(share)) * 100, 1)
            for emb, aggs in emb_aggs.items():
                # one recipe per cell; the cells of one embedding share its fitted local models (PCA, codebook,
                # embedding whitening: they do not depend on the aggregation), each fits its own RN
                t0 = time.perf_counter()
                recipes = {a: selective_recipe(config, mask, emb, a, layer=layer, backbone=backbone, **kw)
                           for a in aggs}
                base = recipes[aggs[0]].method.model
                most = min(base.rn_components, len(tmaps) - 1)  # rotated axes the training images can give
                if base.drop > most:
                    why = (f"its rotation normalisation drops {base.drop} components; {len(tmaps)} training images "
                           f"({y}) give at most {most}")
                    skipped += [{"benchmark": x, "train": y, "mask": mask, "embedding": emb, "aggregation": a,
                                 "dim": base.dim, "reason": why} for a in aggs]
                    log(f"  {x:9s} {mask:5s} {emb:7s} {'/'.join(aggs)} D={base.dim}: not computable, {why}")
                    continue
                base.fit_local(tmaps, tkps, thws)
                for a in aggs[1:]:
                    recipes[a].method.model = base.with_aggregation(a)

                def raws(maps, kps, hws):
                    out = {a: [] for a in aggs}
                    for i, m in enumerate(maps):
                        E = base.embed(base.select(m, None if kps is None else kps[i], None if hws is None else hws[i]))
                        for a in aggs:
                            out[a].append(base.aggregate(E, a))
                    return {a: np.stack(v) for a, v in out.items()}

                train_raw = raws(tmaps, tkps, thws)
                for a in aggs:
                    recipes[a].method.model.fit_rn(train_raw[a])
                fit_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                test_raw = raws(qmaps, qkps, qhws)
                enc_ms = (time.perf_counter() - t1) / max(len(qmaps), 1) * 1000
                for a in aggs:
                    model = recipes[a].method.model
                    vecs = model.finalize(test_raw[a])
                    res = _evaluate(by_name[x].bench, vecs)
                    qv = vecs[np.asarray(by_name[x].bench.query_indices, dtype=np.int64)]
                    exact = float(by_name[x].bench.evaluate((qv @ vecs.T).astype(np.float32))["map"])
                    rows.append({"benchmark": x, "train": y, "mask": mask, "embedding": emb, "aggregation": a,
                                 "d": model.d, "k": model.k, "drop": model.drop, "dim": model.dim, **res,
                                 "map_unrounded": exact,
                                 "fit_s": round(fit_s, 1), "encode_ms": round(enc_ms, 1)})
                    log(f"  {x:9s} {mask:5s} {emb:7s} {a:10s} D={model.dim} "
                        + " ".join(f"{p}={q}" for p, q in res.items()) + f" (fit {fit_s:.0f} s)")
    return {
        "paper": "Hoang et al. 2017, Table 3",
        "rows": rows,
        "skipped": skipped,
        "kept": kept,
        "settings": {"backbone": backbone, "layer": layer, "scale": 1.0, "config": config, "masks": list(masks),
                     "pairs": [list(p) for p in pairs], "train_on": pairing,
                     "benchmarks": {s.name: s.describe() for s in specs},
                     "selective": kw},
        "timing_s": {"total": round(time.perf_counter() - t_start, 1)},
        "notes": [s.bench.note for s in specs if s.bench.note],
    }


def grid_table(result: Mapping[str, Any], benchmark: str | None = None) -> str:
    """Markdown table of a grid: masks as rows, (embedding, aggregation) as columns, mAP (N-S for UKBench)."""
    rows = [r for r in result["rows"] if benchmark is None or r["benchmark"] == benchmark]
    skipped = [r for r in result.get("skipped", []) if benchmark is None or r["benchmark"] == benchmark]
    out = []
    for b in dict.fromkeys(r["benchmark"] for r in rows + skipped):
        rb = [r for r in rows if r["benchmark"] == b] or [r for r in skipped if r["benchmark"] == b]
        cols = list(dict.fromkeys((r["embedding"], r["aggregation"], r["dim"]) for r in rb))
        masks = list(dict.fromkeys(r["mask"] for r in rb))
        val = {(r["mask"], r["embedding"], r["aggregation"]): r for r in rb}
        kept = result.get("kept", {}).get(b, {})
        out.append(f"{result['settings']['benchmarks'].get(b, b)} (trained on {rb[0]['train']})")
        out.append("| mask (kept %) | " + " | ".join(f"{e}+{a} ({d}-D)" for e, a, d in cols) + " |")
        out.append("|" + "---|" * (len(cols) + 1))
        for m in masks:
            cells = []
            for e, a, _ in cols:
                r = val.get((m, e, a))
                cells.append("" if r is None or "map" not in r else
                             f"{r['map']:.1f}" + (f" ({r['ns']:.2f})" if "ns" in r else ""))
            out.append(f"| {m} ({kept.get(m, float('nan')):.0f}) | " + " | ".join(cells) + " |")
        gone = {(r["embedding"], r["aggregation"], r["dim"]): r["reason"] for r in skipped if r["benchmark"] == b}
        for (e, a, d), why in gone.items():
            out.append(f"not computable: {e}+{a} ({d}-D): {why}")
        out.append("")
    return "\n".join(out).rstrip()


@_threaded
def selective_speed(train: str | BenchSpec = "ukbench", test: str | BenchSpec = "holidays", *, dim: int = 512,
                    aggregation: str = "democratic", masks: Sequence[str] = MASKS, n_images: int = 100,
                    backbone: str = "vgg16", layer: str = "conv5_3", cache_dir: str | os.PathLike = "benchmarks/cache",
                    limit: int | Mapping[str, int] | None = None, max_size: int | Mapping[str, int] | None = None,
                    repeats: int = 1, log: Callable[[str], None] | None = _log_default) -> dict[str, Any]:
    """Online cost per image EXCLUDING the network (Hoang et al. 2017, speed comparison): mask + local PCA +
    embedding + aggregation + RN + power-law of a Table-4 ``dim`` model, against R-MAC (Tolias et al. 2016:
    3-level regions, PCA-whitening to 512-D) on the same cached maps. SIFT is timed with keypoints given
    and, separately, the SIFT detection itself on the images. Milliseconds per image (mean over ``n_images``)."""
    import torch

    from ..collection import fit_whitening
    from ..images import load_image
    from ..ops.masks import sift_keypoints
    from ..ops.pooling import region_macs, rmac, rmac_regions

    log = log or (lambda m: None)
    tr, te = _spec(train, limit, max_size), _spec(test, limit, max_size)
    tmaps, tkps, thws = conv_maps(tr, layer, 1.0, backbone=backbone, cache_dir=cache_dir, keypoints=True, log=log)
    qmaps, qkps, qhws = conv_maps(te, layer, 1.0, backbone=backbone, cache_dir=cache_dir, keypoints=True, log=log)
    n = min(n_images, len(qmaps))
    qm = [np.asarray(m, np.float32) for m in qmaps[:n]]
    out: dict[str, Any] = {"n_images": n, "dim": dim, "aggregation": aggregation, "layer": layer,
                           "map_shape_example": list(qm[0].shape), "ms_per_image": {}, "wall_ms_per_image": {},
                           "kept_features": {}, "timer": "ms_per_image: CPU time (time.process_time), 1 thread",
                           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    for mask in masks:
        sel = Selective.table4(dim, mask=mask, aggregation=aggregation, layer=layer, backbone=backbone)
        sel.fit(tmaps, tkps, thws)
        sel.encode(qm[0], qkps[0], qhws[0])  # warm-up
        cpu, wall = _per_image_ms(lambda i, m: sel.encode(m, qkps[i], qhws[i]), qm, repeats)
        out["ms_per_image"][mask], out["wall_ms_per_image"][mask] = cpu, wall
        out["kept_features"][mask] = round(float(np.mean([sel.select(m, qkps[i], qhws[i]).shape[0]
                                                          for i, m in enumerate(qm)])), 1)
        log(f"  speed {mask:5s}: {cpu:.2f} CPU ms/image ({wall:.2f} wall; "
            f"{out['kept_features'][mask]} features kept on average)")
    # R-MAC on the same maps, whitening learned on the training maps' regions
    regs = [region_macs(torch.from_numpy(np.asarray(m, np.float32)),
                        rmac_regions(m.shape[1], m.shape[2])).numpy() for m in tmaps]
    rows = np.concatenate([l2n(r) for r in regs])
    w = fit_whitening(rows, dim=min(512, rows.shape[1]), trained_on=tr.describe())
    rmac(torch.from_numpy(qm[0]), whitening=w)
    cpu, wall = _per_image_ms(lambda i, m: rmac(torch.from_numpy(m), whitening=w), qm, repeats)
    out["ms_per_image"]["rmac"], out["wall_ms_per_image"]["rmac"] = cpu, wall
    log(f"  speed rmac : {cpu:.2f} CPU ms/image ({wall:.2f} wall)")
    # SIFT detection itself (on the images as fed to the network)
    paths = te.images[:min(n, 30)]
    imgs = [load_image(p, max_size=te.max_size) for p in paths]
    cpu, wall = _per_image_ms(lambda i, img: sift_keypoints(img), imgs, 1)
    out["ms_per_image"]["sift_detection"], out["wall_ms_per_image"]["sift_detection"] = cpu, wall
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    log(f"  SIFT detection: {cpu:.2f} CPU ms/image ({wall:.2f} wall)")
    return out


def _per_image_ms(fn: Callable[[int, Any], Any], items: Sequence, repeats: int) -> tuple[float, float]:
    """(CPU, wall) milliseconds per item of ``fn(i, item)`` over ``items``: the run with least CPU time of
    ``repeats`` (CPU time = ``time.process_time``, the figure that a busy shared machine does not inflate)."""
    best = (float("inf"), float("inf"))
    for _ in range(max(1, repeats)):
        c0, t0 = time.process_time(), time.perf_counter()
        for i, x in enumerate(items):
            fn(i, x)
        best = min(best, (time.process_time() - c0, time.perf_counter() - t0))
    return round(best[0] / len(items) * 1000, 2), round(best[1] / len(items) * 1000, 2)
