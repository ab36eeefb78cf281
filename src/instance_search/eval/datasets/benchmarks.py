"""Standard instance-retrieval benchmarks: UKBench, INRIA Holidays, Oxford5k / Paris6k (classic and revisited).

A :class:`Benchmark` holds the database image paths, the queries (path, optional box, database index when
the query is itself a database image) and the ground truth as indices into the database list, and
evaluates rankings or similarity matrices with the benchmark's official protocol.

Oxford/Paris loaders keep only the images actually present in the given folder and remap the ground truth
onto them; a benchmark built from a subset records ``comparable=False`` -- its figures are real measurements
but must not be compared with published tables.

Ground-truth pickles are read with a restricted unpickler (builtins only), and only from paths the caller
names explicitly or from the shared data folder: load pickles only from trusted paths.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import metrics as ev

__all__ = [
    "Benchmark",
    "BENCHMARKS",
    "IMAGE_EXTENSIONS",
    "find_shared_data",
    "load_gnd_pickle",
    "load_ukbench",
    "load_holidays",
    "load_revisited",
    "load_classic",
    "load_benchmark",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
BENCHMARKS = ("ukbench", "holidays", "oxford5k", "paris6k", "roxford5k", "rparis6k")

Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Benchmark:
    """A retrieval benchmark.

    ``gnd`` has one dict per query with index arrays into ``images``: ``ok``/``junk`` for the ukbench,
    holidays and classic protocols, ``easy``/``hard``/``junk`` for the revisited one.  ``query_indices[q]``
    is the database index of query ``q`` when the query is a database image (else ``None``); a query with
    a box is described from the crop, not from its database entry.
    """

    name: str
    images: list[Path]
    query_paths: list[Path]
    query_boxes: list[Box | None]
    gnd: list[dict[str, np.ndarray]]
    protocol: str  # "ukbench" | "holidays" | "classic" | "revisited"
    query_indices: list[int | None] = field(default_factory=list)
    groups: np.ndarray | None = None  # ukbench: object id of every database image
    comparable: bool = False  # True only for the complete official image set
    note: str = ""
    kappas: tuple[int, ...] = (1, 5, 10)

    def __post_init__(self) -> None:
        if not self.query_indices:
            self.query_indices = [None] * len(self.query_paths)
        if not (len(self.query_paths) == len(self.query_boxes) == len(self.gnd) == len(self.query_indices)):
            raise ValueError("Benchmark: query_paths, query_boxes, gnd and query_indices must have equal length")

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_queries(self) -> int:
        return len(self.query_paths)

    def ok_gnd(self, protocol: str | None = None) -> list[dict[str, np.ndarray]]:
        """Ground truth as ``[{'ok', 'junk'}]`` (revisited benchmarks need ``protocol``: easy/medium/hard)."""
        if self.protocol == "revisited":
            return ev.revisited_gnd(self.gnd, protocol or "medium")
        return self.gnd

    def ranks(self, ranks_or_scores: np.ndarray) -> np.ndarray:
        """Validate ranks ``(<= n_images, n_queries)`` or convert scores ``(n_queries, n_images)``."""
        return ev.as_ranks(ranks_or_scores, self.n_images, self.n_queries)

    def evaluate(self, ranks_or_scores: np.ndarray) -> dict[str, Any]:
        """The benchmark's standard figures (percentages, except the N-S score which is out of 4).

        Integer input = ranks ``(n_images, n_queries)``; floating input = scores ``(n_queries, n_images)``.
        ukbench: ``ns``, ``map``; holidays and classic: ``map``; revisited: ``map_easy``/``map_medium``/
        ``map_hard`` and ``mp@k_*``.  ``comparable`` repeats whether the figures may be set against
        published numbers.
        """
        ranks = self.ranks(ranks_or_scores)
        out: dict[str, Any] = {}
        if self.protocol == "ukbench":
            qg = self.groups[np.asarray(self.query_indices, dtype=np.int64)]
            out["ns"] = ev.ukbench_ns_score(ranks, self.groups, qg)
            out["map"] = float(ev.compute_map(ranks, self.gnd)[0] * 100)
        elif self.protocol in ("holidays", "classic"):
            out["map"] = float(ev.compute_map(ranks, self.gnd)[0] * 100)
        elif self.protocol == "revisited":
            out.update(ev.evaluate_revisited(ranks, self.gnd, self.kappas))
        else:
            raise ValueError(f"unknown protocol {self.protocol!r}")
        out["comparable"] = bool(self.comparable)
        return out

    def perfect_ranks(self, protocol: str | None = None) -> np.ndarray:
        """An ideal ranking (positives first, then junk, then the rest) -- for sanity checks."""
        g = self.ok_gnd(protocol)
        cols = []
        for entry in g:
            ok = list(dict.fromkeys(int(i) for i in entry["ok"]))
            ok_set = set(ok)
            junk = [i for i in dict.fromkeys(int(i) for i in entry["junk"]) if i not in ok_set]
            seen = ok_set | set(junk)
            rest = [i for i in range(self.n_images) if i not in seen]
            cols.append(ok + junk + rest)
        return np.array(cols, dtype=np.int64).T.reshape(self.n_images, len(g))

    def summary(self) -> str:
        return (f"{self.name}: {self.n_images} database images, {self.n_queries} queries, protocol "
                f"{self.protocol}{'' if self.comparable else ' (subset: NOT comparable with published numbers)'}")


# ----------------------------------------------------------------------------------------------------------
# Locating data, reading pickles
# ----------------------------------------------------------------------------------------------------------

def find_shared_data() -> Path | None:
    """The shared benchmark data folder.

    ``$ISEARCH_DATA`` wins (a FileNotFoundError if it is set but not a folder); otherwise the first
    ``shared/data`` folder found walking up from the current directory, then from this package's file
    (the layout ``<root>/main`` = repository, ``<root>/shared/data`` = data).  ``None`` if there is none.
    """
    env = os.environ.get("ISEARCH_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"ISEARCH_DATA={env!r} is not a folder")
        return p.resolve()
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for d in [start, *start.parents]:
            cand = d / "shared" / "data"
            if cand.is_dir():
                return cand.resolve()
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Only plain containers and scalars: refuses any class or function reference."""

    _ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes",
                                          "int", "float", "bool", "complex")}

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"ground-truth pickle references {module}.{name}: refused "
                                     "(only builtin containers and numbers are allowed)")


def load_gnd_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Load a revisitop-style ground-truth pickle (``imlist``, ``qimlist``, ``gnd``[, ``qidx``]).

    Pickles only from trusted paths: pass a file you obtained from the dataset authors (or the shared
    data folder's copy).  The unpickler allows builtin containers and numbers only, so a pickle that
    tries to construct arbitrary objects is refused with ``pickle.UnpicklingError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth pickle not found: {path}")
    with open(path, "rb") as f:
        data = _RestrictedUnpickler(f).load()
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise ValueError(f"{path}: not a revisitop ground-truth pickle (need a dict with imlist, qimlist, gnd)")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise ValueError(f"{path}: gnd has {len(data['gnd'])} entries for {len(data['qimlist'])} queries")
    return data


def _image_dir(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if (root / "jpg").is_dir():
        return root / "jpg"
    return root


def _list_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix in IMAGE_EXTENSIONS and p.is_file():
            out.setdefault(p.stem, p)
    return out


# ----------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------

_UKB = re.compile(r"ukbench(\d+)$", re.IGNORECASE)


def load_ukbench(root: str | os.PathLike) -> Benchmark:
    """UKBench (``ukbenchNNNNN.jpg``): every image is a query, object = number // 4, positives = the group
    including the query itself (N-S score and mAP), no junk.  Comparable only with all 10200 images."""
    folder = _image_dir(Path(root))
    items = []
    for stem, p in _list_by_stem(folder).items():
        m = _UKB.match(stem)
        if m:
            items.append((int(m.group(1)), p))
    if not items:
        raise FileNotFoundError(f"no ukbenchNNNNN.jpg images in {folder}")
    items.sort()
    nums = np.array([n for n, _ in items], dtype=np.int64)
    groups = nums // 4
    paths = [p for _, p in items]
    gnd = []
    for q in range(len(paths)):
        gnd.append({"ok": np.flatnonzero(groups == groups[q]), "junk": np.empty(0, dtype=np.int64)})
    full = len(paths) == 10200
    return Benchmark(
        name="ukbench", images=paths, query_paths=list(paths), query_boxes=[None] * len(paths), gnd=gnd,
        protocol="ukbench", query_indices=list(range(len(paths))), groups=groups, comparable=full,
        note="" if full else f"UKBench subset of {len(paths)} of 10200 images: not comparable with published "
                             "N-S scores",
    )


def load_holidays(root: str | os.PathLike) -> Benchmark:
    """INRIA Holidays (``<id>.jpg``): queries are the database images with ``id % 100 == 0``, positives the
    other images with the same ``id // 100``; the query is excluded from its own ranking (given as junk,
    which is equivalent).  Comparable only with the full 1491 images."""
    folder = _image_dir(Path(root))
    items = []
    for stem, p in _list_by_stem(folder).items():
        if stem.isdigit():
            items.append((int(stem), p))
    if not items:
        raise FileNotFoundError(f"no Holidays images (<6-digit id>.jpg) in {folder}")
    items.sort()
    paths = [p for _, p in items]
    queries, gnd = ev.holidays_gnd([p.name for p in paths])
    full = len(paths) == 1491
    return Benchmark(
        name="holidays", images=paths, query_paths=[paths[q] for q in queries], query_boxes=[None] * len(queries),
        gnd=gnd, protocol="holidays", query_indices=list(queries), comparable=full,
        note="" if full else f"Holidays subset of {len(paths)} of 1491 images: not comparable with published mAP",
    )


def _restrict(data: dict[str, Any], folder: Path, name: str, keys: Sequence[str]):
    """Keep the imlist/qimlist entries whose file is in ``folder``; remap the gnd index lists ``keys``."""
    files = _list_by_stem(folder)
    imlist, qimlist = list(data["imlist"]), list(data["qimlist"])
    keep = [i for i, n in enumerate(imlist) if n in files]
    if not keep:
        raise FileNotFoundError(
            f"{name}: none of the {len(imlist)} database images of the ground truth is in {folder} "
            f"({len(files)} image files there, e.g. query images only); point images_dir at the full "
            f"{name} image folder (revisitop layout: <root>/jpg/<name>.jpg)")
    remap = np.full(len(imlist), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    qkeep = [q for q, n in enumerate(qimlist) if n in files]
    if not qkeep:
        raise FileNotFoundError(f"{name}: none of the {len(qimlist)} query images is in {folder}")
    gnd = []
    for q in qkeep:
        g = data["gnd"][q]
        entry = {}
        for k in keys:
            idx = np.asarray(g.get(k, []), dtype=np.int64).ravel()
            idx = remap[idx] if idx.size else idx
            entry[k] = idx[idx >= 0]
        gnd.append(entry)
    boxes = []
    for q in qkeep:
        b = data["gnd"][q].get("bbx")
        boxes.append(None if b is None else tuple(float(v) for v in b))
    complete = len(keep) == len(imlist) and len(qkeep) == len(qimlist)
    images = [files[imlist[i]] for i in keep]
    qpaths = [files[qimlist[q]] for q in qkeep]
    return images, qpaths, boxes, gnd, qkeep, remap, complete


def _subset_note(name: str, images: list, n_full: int, queries: list, nq_full: int) -> str:
    return (f"{name} subset: {len(images)} of {n_full} database images, {len(queries)} of {nq_full} queries "
            "(ground truth restricted to them): real measurements, NOT comparable with published numbers")


def load_revisited(root_images: str | os.PathLike, gnd_pkl: str | os.PathLike, name: str | None = None) -> Benchmark:
    """Revisited Oxford/Paris (ROxford5k / RParis6k), revisitop layout ``<root>/jpg/<name>.jpg``.

    The database is ``imlist`` (queries are not in it), queries are ``qimlist`` cropped to their ``bbx``.
    Only images present in the folder are kept and ``easy``/``hard``/``junk`` are remapped onto them.
    """
    gnd_pkl = Path(gnd_pkl)
    data = load_gnd_pickle(gnd_pkl)
    name = name or gnd_pkl.stem.replace("gnd_", "")
    folder = _image_dir(Path(root_images))
    images, qpaths, boxes, gnd, qkeep, _, complete = _restrict(data, folder, name, ("easy", "hard", "junk"))
    return Benchmark(
        name=name, images=images, query_paths=qpaths, query_boxes=boxes, gnd=gnd, protocol="revisited",
        query_indices=[None] * len(qpaths), comparable=complete,
        note="" if complete else _subset_note(name, images, len(data["imlist"]), qpaths, len(data["qimlist"])),
    )


def load_classic(root_images: str | os.PathLike, gnd_pkl: str | os.PathLike, name: str | None = None) -> Benchmark:
    """Classic Oxford5k / Paris6k (revisitop's ``gnd_oxford5k.pkl`` / ``gnd_paris6k.pkl``: ``ok`` = good + ok,
    ``junk``).  The query images stay in the database (``qidx``) and the query itself is usually one of its
    positives, as in the original protocol; queries are cropped to ``bbx``.  Restricted to the images
    present in the folder, like :func:`load_revisited`.
    """
    gnd_pkl = Path(gnd_pkl)
    data = load_gnd_pickle(gnd_pkl)
    name = name or gnd_pkl.stem.replace("gnd_", "")
    folder = _image_dir(Path(root_images))
    converted = dict(data)
    converted["gnd"] = [dict(g, **c) for g, c in zip(data["gnd"], ev.classic_gnd(data["gnd"]))]
    images, qpaths, boxes, gnd, qkeep, remap, complete = _restrict(converted, folder, name, ("ok", "junk"))
    qidx = data.get("qidx")
    if qidx is None:
        pos = {n: i for i, n in enumerate(data["imlist"])}
        qidx = [pos.get(data["qimlist"][q], -1) for q in range(len(data["qimlist"]))]
    qind = []
    for q in qkeep:
        i = int(qidx[q])
        qind.append(int(remap[i]) if 0 <= i < len(remap) and remap[i] >= 0 else None)
    all_queries = {int(qidx[q]) for q in range(len(data["qimlist"]))}
    if all(int(i) in all_queries for i in np.flatnonzero(remap >= 0)):
        raise FileNotFoundError(
            f"{name}: the images in {folder} are query images only ({len(images)} of them), no other "
            f"database image of the {len(data['imlist'])}; point images_dir at the full {name} image folder")
    return Benchmark(
        name=name, images=images, query_paths=qpaths, query_boxes=boxes, gnd=gnd, protocol="classic",
        query_indices=qind, comparable=complete,
        note="" if complete else _subset_note(name, images, len(data["imlist"]), qpaths, len(data["qimlist"])),
    )


_DEFAULTS = {
    # name: (loader, default images (relative to the data folder), default gnd)
    "ukbench": ("ukbench", "ukbench1000", None),
    "holidays": ("holidays", "holidays811", None),
    "oxford5k": ("classic", "oxford5k-queries10", "gnd/gnd_oxford5k.pkl"),
    "paris6k": ("classic", "rparis250/jpg", "gnd/gnd_paris6k.pkl"),
    "roxford5k": ("revisited", "oxford5k-queries10", "gnd/oxford5k/gnd_roxford5k.pkl"),
    "rparis6k": ("revisited", "rparis250/jpg", "gnd/paris6k/gnd_rparis6k.pkl"),
}


def load_benchmark(name: str, images_dir: str | os.PathLike | None = None,
                   gnd: str | os.PathLike | None = None) -> Benchmark:
    """Load one of ``ukbench, holidays, oxford5k, paris6k, roxford5k, rparis6k``.

    Missing ``images_dir`` / ``gnd`` default to the shared data folder (:func:`find_shared_data`):
    ukbench1000, holidays811, rparis250 (for paris6k and rparis6k) and the standard pickles in ``gnd/``.
    The shared folder holds only 10 Oxford query images, so oxford5k / roxford5k need ``images_dir``.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _DEFAULTS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    kind, img_rel, gnd_rel = _DEFAULTS[key]
    data = None
    if images_dir is None or (gnd is None and gnd_rel is not None):
        data = find_shared_data()
        if data is None:
            raise FileNotFoundError(f"{key}: no images_dir/gnd given and no shared data folder found "
                                    "(set ISEARCH_DATA to the folder holding ukbench1000/, holidays811/, gnd/ ...)")
    images = Path(images_dir) if images_dir is not None else data / img_rel
    if kind == "ukbench":
        return load_ukbench(images)
    if kind == "holidays":
        return load_holidays(images)
    gnd_path = Path(gnd) if gnd is not None else data / gnd_rel
    loader = load_classic if kind == "classic" else load_revisited
    return loader(images, gnd_path, name=key)
