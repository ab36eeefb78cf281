"""Scale-out on an existing distributed engine (Ray): extraction as a Ray Data batch job, sharded FAISS search.

Nothing here is needed for one machine: the embedded default (``Collection.add_folder``, FAISS on local
files) stays as it is. Install the optional extra (``pip install 'instance-search[scale]'``, ``ray[data]``).

* :class:`RayExtractor` / :func:`add_folder_ray` — ``isearch index PHOTOS --engine ray [--address ...]``.
  Ray Data streams the file list through reader tasks (stat, sha256, decode, resize: the same ``load_image``
  as the single process) into a pool of model actors (each one :class:`~instance_search.collection.Describer`,
  loaded once) that write the local descriptors and the compact conv maps (``index.compact``) as sharded
  ``.npz`` files. The driver commits the shards in file order through ``Collection.add_folder``'s own
  bookkeeping, so the result is an ordinary index, identical to the single-process one.
* :class:`ShardedIndex` — FAISS shards held by Ray actors (train once on a sample, add in shards, or open
  each shard's saved file memory-mapped); a query fans out and the per-shard top-k are merged. It has the
  ``d`` / ``ntotal`` / ``search(x, k)`` of a FAISS index, so ``faiss_backend.search`` takes it unchanged.
* :func:`ray_session` — connect to ``address``, or start a local cluster bound to 127.0.0.1 only.

See docs/scale-out.md for how the same code runs at 100M images.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import types
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..images import ImageError

#: On 2 cores a model actor that asks for a whole CPU starves the reader tasks (measured); 0.5 leaves room.
ACTOR_CPUS = 0.5
READER_CPUS = 0.25


def _require_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Ray engine needs the optional extra: pip install 'instance-search[scale]' "
                          f"(ray[data]); {exc}") from exc
    return ray


# ------------------------------------------------------------------------------------------------ cluster


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int = 512):
    """Use the Ray connection already open in this process, or connect to ``address`` (``host:port`` or
    ``auto``; every node needs this package installed), or — with no address — start a local cluster of
    ``num_cpus`` CPUs on 127.0.0.1 only (no dashboard, no usage statistics, an object store of
    ``object_store_mb``) that is shut down on exit. Yields the ``ray`` module."""
    if address is not None:
        ray = _require_ray()
        if ray.is_initialized():
            yield ray
            return
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    # Ray answers "which IP is this node?" with the loopback address only when multi-node clusters are off
    # (the switch Ray reads for Windows/macOS); ray.init(_node_ip_address="127.0.0.1") alone is rewritten to
    # the machine's public IP. The switch is read at import and at call time: set both, restore after.
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = _require_ray()
    from ray._private import ray_constants

    if ray.is_initialized():
        _restore_env(saved)
        yield ray
        return
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=int(object_store_mb) << 20, log_to_driver=False, logging_level="WARNING")
        try:
            bad = [n["NodeManagerAddress"] for n in ray.nodes() if not n["NodeManagerAddress"].startswith("127.")]
            if bad:
                raise RuntimeError(f"the local Ray cluster bound to {bad}, not 127.0.0.1; refusing to use it")
            yield ray
        finally:
            ray.shutdown()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        _restore_env(saved)


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _data_context():
    """Ray Data settings for one extraction job, restored afterwards: results in input order (the commit
    streams), no Ray progress bars or INFO lines (the driver shows Collection.add_folder's tqdm bar)."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    log = logging.getLogger("ray.data")
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, log.level)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    log.setLevel(logging.WARNING)
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved[0], saved[1]
        log.setLevel(saved[2])


# ------------------------------------------------------------------------------------------------ extraction


def _decode(path: Path, max_size: int):
    """``collection._decode`` without importing torch (reader processes stay light): (image or error, stat,
    sha256) with the same calls and the same error messages."""
    from ..io import file_sha256
    from ..images import load_image

    try:
        st = path.stat()
        sha = file_sha256(path)
        return load_image(path, max_size=max_size), st, sha
    except ImageError as exc:
        return exc, None, ""
    except OSError as exc:
        return ImageError(f"{path}: {exc.strerror or exc}"), None, ""


def _read_images(batch: dict[str, np.ndarray], max_size: int) -> dict[str, Any]:
    """Ray Data reader stage: stat, sha256, decode and resize each file (``load_image``, as in the single
    process); pixels travel as raw RGB bytes."""
    out: dict[str, list] = {k: [] for k in ("pos", "path", "pixels", "w", "h", "width", "height", "mtime",
                                             "size", "sha256", "error")}
    for pos, path in zip(batch["pos"], batch["path"]):
        img, st, sha = _decode(Path(str(path)), max_size)
        out["pos"].append(int(pos))
        out["path"].append(str(path))
        if isinstance(img, Exception):
            out["error"].append(str(img) or img.__class__.__name__)
            for k, v in (("pixels", b""), ("w", 0), ("h", 0), ("width", 0), ("height", 0), ("mtime", 0.0),
                         ("size", 0), ("sha256", "")):
                out[k].append(v)
            continue
        width, height = img.info.get("original_size", img.size)
        out["error"].append("")
        out["pixels"].append(img.tobytes())
        out["w"].append(img.width)
        out["h"].append(img.height)
        out["width"].append(int(width))
        out["height"].append(int(height))
        out["mtime"].append(float(st.st_mtime))
        out["size"].append(int(st.st_size))
        out["sha256"].append(sha)
    return {"pos": np.asarray(out["pos"], np.int64), "path": np.asarray(out["path"], dtype=object),
            "pixels": np.asarray(out["pixels"], dtype=object), "w": np.asarray(out["w"], np.int64),
            "h": np.asarray(out["h"], np.int64), "width": np.asarray(out["width"], np.int64),
            "height": np.asarray(out["height"], np.int64), "mtime": np.asarray(out["mtime"], np.float64),
            "size": np.asarray(out["size"], np.int64), "sha256": np.asarray(out["sha256"], dtype=object),
            "error": np.asarray(out["error"], dtype=object)}


class _DescribeActor:
    """Ray Data actor: one network per actor (loaded once), describes a batch and writes it as one shard
    file ``shard-<first position>.npz`` (float32 local vectors, compact conv-map codes)."""

    def __init__(self, recipe: dict, weights: str | None, engine: str, threads: int, store_maps: bool,
                 staging: str, state: dict | None = None):
        import torch

        from ..collection import Describer
        from ..recipes.base import Recipe

        torch.set_num_threads(max(1, int(threads)))
        spec = Recipe.from_dict(recipe)
        if state:  # a fitted recipe (Ng's VLAD, Hoang's selective features) travels with what it learned
            spec.load_state_dict(state)
        self.describer = Describer(spec, weights=weights, engine=engine)
        self.store_maps = store_maps
        self.staging = Path(staging)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from ..io import atomic_save_npz
        from . import store

        n = len(batch["pos"])
        shard = f"shard-{int(np.min(batch['pos'])):012d}-{uuid.uuid4().hex[:8]}.npz"
        local, maps, row = [], [], np.full(n, -1, np.int64)
        errors = list(batch["error"])
        for i in range(n):
            if errors[i]:
                continue
            try:
                img = Image.frombytes("RGB", (int(batch["w"][i]), int(batch["h"][i])), bytes(batch["pixels"][i]))
                loc, fmap = self.describer.describe(img)
            except Exception as exc:  # one bad image must not kill the job: report it like a decode error
                errors[i] = f"{batch['path'][i]}: cannot describe ({exc.__class__.__name__}: {exc})"
                continue
            row[i] = len(local)
            local.append(np.asarray(loc, np.float32))
            if self.store_maps:
                maps.append(np.frombuffer(store.encode_map(fmap), np.uint8))
        if local:
            atomic_save_npz(
                self.staging / shard,
                local=np.concatenate(local),
                local_off=np.concatenate([[0], np.cumsum([len(x) for x in local])]).astype(np.int64),
                maps=np.concatenate(maps) if maps else np.zeros(0, np.uint8),
                maps_off=np.concatenate([[0], np.cumsum([len(m) for m in maps])]).astype(np.int64),
                has_maps=np.asarray(bool(maps)))
        return {"pos": batch["pos"], "path": batch["path"], "error": np.asarray(errors, dtype=object),
                "shard": np.asarray([shard if r >= 0 else "" for r in row], dtype=object), "row": row,
                "width": batch["width"], "height": batch["height"], "mtime": batch["mtime"],
                "size": batch["size"], "sha256": batch["sha256"]}


class RayExtractor:
    """``extract(paths)`` for :meth:`Collection.add_folder` that runs on Ray: yields, in the order of
    ``paths``, ``(path, (local, compact map code, (width, height)) or ImageError, stat, sha256)``.

    ``workers`` model actors of ``actor_cpus`` CPUs each (``engine``: ``auto``, the default, resolved in each
    actor for its device by ``backbones.fast.resolve_engine``; or ``exact`` fp32, ``winograd``, ``folded``),
    ``per_shard`` images per batch and shard file; shards are staged under ``staging`` (default: a hidden
    folder inside the index, which on a multi-machine cluster must be on storage every node sees) and
    deleted once committed. Needs an open Ray connection (:func:`ray_session`).
    """

    def __init__(self, recipe, *, weights: str | None = None, store_maps: bool = True, staging: str | os.PathLike,
                 workers: int = 2, engine: str = "auto", actor_cpus: float = ACTOR_CPUS,
                 reader_cpus: float = READER_CPUS, per_shard: int = 8, threads: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        from ..backbones.fast import resolve_engine
        from ..backbones.weights import canon_arch

        resolve_engine(canon_arch(recipe.backbone), "cpu", engine)  # a bad name fails here, not in every actor
        if per_shard < 1:
            raise ValueError(f"per_shard must be at least 1, got {per_shard}")
        self.recipe, self.weights, self.store_maps = recipe, weights, bool(store_maps)
        self.staging_root = Path(staging)
        self.workers, self.engine, self.per_shard, self.threads = int(workers), engine, int(per_shard), int(threads)
        self.actor_cpus, self.reader_cpus = float(actor_cpus), float(reader_cpus)

    def dataset(self, paths: Sequence[Path], staging: Path):
        """The Ray Data pipeline: file list → reader tasks → model-actor pool → shard files (lazy)."""
        ray = _require_ray()
        from ray.data import ActorPoolStrategy

        items = [{"pos": i, "path": str(p)} for i, p in enumerate(paths)]
        per = max(1, min(self.per_shard, -(-len(items) // self.workers)))  # small jobs: every actor gets work
        ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per))
        ds = ds.map_batches(_read_images, fn_kwargs={"max_size": self.recipe.max_size}, batch_size=per,
                            batch_format="numpy", num_cpus=self.reader_cpus, concurrency=self.workers)
        return ds.map_batches(
            _DescribeActor, batch_size=per, batch_format="numpy", num_cpus=self.actor_cpus,
            compute=ActorPoolStrategy(size=self.workers),
            fn_constructor_kwargs={"recipe": self.recipe.to_dict(), "weights": self.weights, "engine": self.engine,
                                   "threads": self.threads, "store_maps": self.store_maps,
                                   "staging": str(staging), "state": self.recipe.state_dict()})

    def __call__(self, paths: Sequence[Path]) -> Iterator:
        from ..io import load_npz

        paths = [Path(p) for p in paths]
        if not paths:
            return
        self.staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".ray-shards-", dir=self.staging_root))
        try:
            with _data_context():
                waiting: dict[int, dict] = {}
                shards: dict[str, dict[str, np.ndarray]] = {}
                expected = 0
                for row in self.dataset(paths, staging).iter_rows():
                    waiting[int(row["pos"])] = row
                    while expected in waiting:  # in order (preserve_order), but never trust it blindly
                        r = waiting.pop(expected)
                        if str(r["path"]) != str(paths[expected]):
                            raise RuntimeError(f"Ray extraction returned {r['path']} at position {expected}, "
                                               f"expected {paths[expected]}")
                        yield self._item(paths[expected], r, shards, staging, load_npz)
                        expected += 1
                if expected != len(paths) or waiting:
                    raise RuntimeError(f"Ray extraction returned {expected} of {len(paths)} images in order "
                                       f"({len(waiting)} out of order)")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _item(self, path: Path, r: dict, shards: dict, staging: Path, load_npz):
        if r["error"]:
            return path, ImageError(str(r["error"])), None, ""
        name = str(r["shard"])
        if name not in shards:
            if len(shards) >= 4:  # shards arrive in order: keep only the last few loaded
                shards.pop(next(iter(shards)))
            shards[name] = load_npz(staging / name)
        z, j = shards[name], int(r["row"])
        local = z["local"][z["local_off"][j]:z["local_off"][j + 1]]
        code = z["maps"][z["maps_off"][j]:z["maps_off"][j + 1]].tobytes() if bool(z["has_maps"]) else None
        st = types.SimpleNamespace(st_mtime=float(r["mtime"]), st_size=int(r["size"]))
        return path, (local, code, (int(r["width"]), int(r["height"]))), st, str(r["sha256"])


def add_folder_ray(col, photos, *, address: str | None = None, workers: int = 2, engine: str = "auto",
                   batch: int = 32, progress: bool = True, per_shard: int = 8, actor_cpus: float = ACTOR_CPUS,
                   num_cpus: int | None = None, staging: str | os.PathLike | None = None, on_error=None):
    """``col.add_folder(photos)`` with the extraction on a Ray cluster (``address``; default: a local one
    on 127.0.0.1, shut down afterwards). Same report, same index files as the single-process call."""
    extractor = RayExtractor(col.recipe, weights=col.describer.weights,
                             store_maps=col.store.settings.get("store_maps", True),
                             staging=staging if staging is not None else col.store.root,
                             workers=workers, engine=engine, per_shard=per_shard, actor_cpus=actor_cpus)
    with ray_session(address, num_cpus=num_cpus):
        return col.add_folder(photos, batch=batch, progress=progress, on_error=on_error, extract=extractor)


# ------------------------------------------------------------------------------------------------ search


class _ShardWorker:
    """One FAISS shard in a Ray actor."""

    def __init__(self, threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))
        self.index = None

    def add(self, trained: np.ndarray, vectors: np.ndarray | str, lo: int = 0, hi: int | None = None,
            chunk: int = 65536) -> int:
        """Add rows ``lo:hi`` of ``vectors`` (an array, or a ``.npy`` file read memory-mapped) to a copy of the
        trained empty index."""
        import faiss

        self.index = faiss.deserialize_index(trained)
        x = np.load(vectors, mmap_mode="r") if isinstance(vectors, str) else vectors
        hi = len(x) if hi is None else hi
        for a in range(lo, hi, chunk):
            self.index.add(np.ascontiguousarray(x[a:min(hi, a + chunk)], np.float32))
        return int(self.index.ntotal)

    def load(self, path: str, mmap: bool) -> tuple[int, int]:
        from .faiss_backend import load_faiss

        self.index = load_faiss(path, mmap=mmap)
        return int(self.index.ntotal), int(self.index.d)

    def save(self, path: str) -> str:
        from .faiss_backend import save_faiss

        return str(save_faiss(self.index, path))

    def set_params(self, params: dict) -> None:
        from .faiss_backend import set_search_params

        set_search_params(self.index, **params)

    def search(self, queries: np.ndarray, k: int):
        from .faiss_backend import search

        return search(self.index, queries, k)

    def rss(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)


class ShardedIndex:
    """A FAISS index split into shards held by Ray actors (contiguous id ranges). ``search`` sends the
    queries to every shard and keeps the best ``k`` of the union of their top-``k`` lists — the same result
    as one index over all vectors when the shards search exactly."""

    def __init__(self, actors: list, sizes: Sequence[int], d: int):
        self.actors = list(actors)
        self.sizes = [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.d = int(d)
        self.ntotal = int(self.offsets[-1])

    @staticmethod
    def _spawn(n: int, actor_cpus: float, threads: int) -> list:
        ray = _require_ray()
        cls = ray.remote(num_cpus=actor_cpus)(_ShardWorker)
        return [cls.remote(threads) for _ in range(n)]

    @classmethod
    def build(cls, vectors: np.ndarray | str | os.PathLike, *, shards: int = 2, kind: str = "ivfpq", trained=None,
              train_sample: int | None = None, actor_cpus: float = ACTOR_CPUS, threads: int = 1, seed: int = 0,
              **faiss_kw) -> "ShardedIndex":
        """Train one index of ``kind`` here (on ``train_sample`` rows drawn at random, default all; or take
        ``trained``, an empty trained FAISS index), then have each of ``shards`` actors add its contiguous
        slice of ``vectors`` to a copy of it. ``vectors``: an (N, D) array, or the path of a float32 ``.npy``
        file that each actor memory-maps and reads its own slice from (nothing large crosses the object store)."""
        import faiss

        from .faiss_backend import as_matrix, trained_faiss

        ray = _require_ray()
        path = None
        if isinstance(vectors, (str, os.PathLike)):
            path = str(Path(vectors).resolve())
            try:
                vectors = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: not a readable .npy file of vectors ({exc})") from exc
            if vectors.ndim != 2 or vectors.dtype != np.float32:
                raise ValueError(f"{path}: expected an (N, D) float32 array, got {vectors.dtype} {vectors.shape}")
        else:
            vectors = as_matrix(vectors)
        n, d = vectors.shape
        if not 1 <= shards <= max(1, n):
            raise ValueError(f"shards must be between 1 and the number of vectors ({n}), got {shards}")
        if trained is None:
            train = vectors[:0]
            if kind == "ivfpq":
                rows = np.arange(n)
                if train_sample is not None and train_sample < n:
                    rows = np.sort(np.random.default_rng(seed).choice(n, int(train_sample), replace=False))
                train = vectors[rows]
            trained = trained_faiss(train, kind, n=n, seed=seed, **faiss_kw)
        if trained.ntotal or trained.d != d:
            raise ValueError(f"trained must be an empty index of dimension {d} (has {trained.ntotal} vectors, d={trained.d})")
        bounds = np.linspace(0, n, shards + 1).astype(np.int64)
        actors = cls._spawn(shards, actor_cpus, threads)
        tref = ray.put(faiss.serialize_index(trained))
        if path is not None:
            calls = [a.add.remote(tref, path, int(bounds[i]), int(bounds[i + 1])) for i, a in enumerate(actors)]
        else:
            calls = [a.add.remote(tref, ray.put(np.ascontiguousarray(vectors[bounds[i]:bounds[i + 1]])))
                     for i, a in enumerate(actors)]
        return cls(actors, ray.get(calls), d)

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike], *, mmap: bool = True, actor_cpus: float = ACTOR_CPUS,
             threads: int = 1) -> "ShardedIndex":
        """One actor per saved shard file (:meth:`save`), each opening its file memory-mapped."""
        ray = _require_ray()
        paths = [Path(p) for p in paths]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no FAISS shard file here")
        actors = cls._spawn(len(paths), actor_cpus, threads)
        shapes = ray.get([a.load.remote(str(p.resolve()), mmap) for a, p in zip(actors, paths)])
        if len({d for _, d in shapes}) != 1:
            raise ValueError(f"shards {[str(p) for p in paths]} have different dimensions {[d for _, d in shapes]}")
        return cls(actors, [n for n, _ in shapes], shapes[0][1])

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Each actor writes its shard to ``folder/shard-KKKK.faiss`` (atomically)."""
        ray = _require_ray()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [Path(p) for p in ray.get([a.save.remote(str((folder / f"shard-{i:04d}.faiss").resolve()))
                                          for i, a in enumerate(self.actors)])]

    def set_search_params(self, **params) -> None:
        ray = _require_ray()
        ray.get([a.set_params.remote(params) for a in self.actors])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ray = _require_ray()
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.d:
            raise ValueError(f"query dimension {queries.shape[1]} does not match the index ({self.d})")
        k = int(min(k, self.ntotal))
        q = ray.put(queries) if queries.nbytes > 100_000 else queries
        parts = ray.get([a.search.remote(q, k) for a in self.actors])
        scores = np.concatenate([s for s, _ in parts], axis=1)
        ids = np.concatenate([np.where(p >= 0, p + off, -1) for (_, p), off in zip(parts, self.offsets)], axis=1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def memory(self) -> list[int]:
        """Resident memory (bytes) of each shard actor."""
        ray = _require_ray()
        return ray.get([a.rss.remote() for a in self.actors])

    def close(self) -> None:
        ray = _require_ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
