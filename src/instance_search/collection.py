"""The thin layer that composes images → backbone → recipe → index → search.

>>> col = Collection.create("my-index", Recipe("rmac", backbone="vgg16"))
>>> report = col.add_folder("photos/")
>>> hits = col.search("query.jpg", box=(10, 20, 200, 300), top=10)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .io import file_sha256, prefetch, progress_bar
from .images import Box, ImageError, list_images, load_image, parse_box, regular_file_sha256
from .index.faiss_backend import build_faiss
from .index.faiss_backend import search as faiss_search
from .index.store import CorruptIndexError, Entry, IndexStore
from .fitted.whitening import PCAWhitening
from .recipes.base import Recipe


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    score: float
    box: tuple[float, float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "path": self.path, "score": round(float(self.score), 6),
                "box": self.box}


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    whitening: str = ""

    def summary(self) -> str:
        s = (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
             f"{len(self.failed)} failed")
        return s + (f"; {self.whitening}" if self.whitening else "")


class Describer:
    """Backbone + recipe: image → (local vectors, feature map). Loads the network lazily, once."""

    def __init__(self, recipe: Recipe, weights: str | None = None, device: str = "cpu", engine: str = "exact"):
        self.recipe = recipe
        self.weights = weights
        self.device = device
        self.engine = engine  # "exact" fp32, or "winograd" (VGG16 on CPU, ~2x faster, cosine > 0.99999)
        self._backbone = None

    @property
    def backbone(self):
        if self._backbone is None:
            from .backbones import load_backbone

            self._backbone = load_backbone(self.recipe.backbone, weights=self.weights, device=self.device)
            if self.recipe.name == "learned-rmac":  # the trained conv layers (Gordo et al. 2016), before any engine
                from .nets.rmac_head import prepare_backbone

                prepare_backbone(self._backbone, self.recipe.extra)
            if self.engine != "exact":
                from .backbones.fast import use_engine

                use_engine(self._backbone, self.engine)
        return self._backbone

    @property
    def layer(self) -> str:
        return self.recipe.layer or self.backbone.default_layer

    def feature_map(self, img: Image.Image):
        """Conv feature map (C, H, W) of ``img`` at the recipe's layer (scale 1)."""
        feats = self.backbone.features(img, layers=[self.layer], scales=(1.0,))
        return feats[(self.layer, 1.0)]

    def describe(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        fmap = self.feature_map(img)
        return self.recipe.local_from_map(fmap), fmap.detach().cpu().numpy()


def _decode(path: Path, max_size: int) -> tuple[Path, Any, os.stat_result | None, str]:
    """Read one file for indexing: (path, image or error, stat, sha256). Runs in a worker thread."""
    try:
        st, sha = regular_file_sha256(path)  # FIFOs, devices, loops: ImageError; reads at most st.st_size bytes
        img = load_image(path, max_size=max_size)
        return path, img, st, sha
    except ImageError as exc:
        return path, exc, None, ""
    except OSError as exc:
        return path, ImageError(f"{path}: {exc.strerror or exc}"), None, ""


def _l2rows(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, np.float32)
    return M / np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-12)


def fit_whitening(rows: np.ndarray, dim: int | None = None, trained_on: str = "", power: float = 0.5) -> PCAWhitening:
    """PCA-whitening (Jégou & Chum 2012) of local vectors; Ledoit-Wolf shrinkage of the covariance when
    there are fewer than two samples per dimension (e.g. MAC on a few hundred images). ``power`` < 0.5 whitens
    partially (eigenvalues to the power -``power``; 0 = PCA rotation only)."""
    rows = np.asarray(rows, np.float32)
    shrink = "auto" if len(rows) < 2 * rows.shape[1] else 0.0
    return PCAWhitening().fit(rows, dim=dim, shrinkage=shrink, trained_on=trained_on, power=power)


class Collection:
    """An indexed photo collection on disk (an :class:`IndexStore`) with its recipe and whitening."""

    WHITENING_MODES = ("self", "none")
    #: Below this many images a self-learned whitening over-fits the collection, so the index stays unwhitened
    #: until it grows. Measured: 12 UKBench images whitened on themselves rank worse than unwhitened; the 238
    #: Paris database images (5 landmarks) whitened on their own 9.5k R-MAC regions drop R-MAC from 81.1/80.3/53.3
    #: to 50.9/48.8/11.1 mAP E/M/H (the high-variance directions it flattens are the ones that tell the landmarks
    #: apart), while Holidays-811 (500 scenes) gains (74.3 -> 79.8). A whitening learned on another, diverse
    #: collection (`isearch whitening learn`, `--whitening FILE`) is the papers' protocol and the safe choice.
    MIN_SELF_WHITENING_IMAGES = 500

    def __init__(self, store: IndexStore, weights: str | None = None, device: str = "cpu",
                 faiss_kind: str = "flat"):
        self.store = store
        self.faiss_kind = faiss_kind  # "flat" (exact, default), "hnsw" or "ivfpq" (approximate, large collections)
        self.recipe = Recipe.from_dict(store.settings["recipe"])
        self.describer = Describer(self.recipe, weights=weights or store.settings.get("weights"), device=device)
        self.whitening: PCAWhitening | None = None
        info = store.whitening_info
        if info is not None:
            wpath = store.root / info["file"]
            try:
                self.whitening = PCAWhitening.load(wpath)
            except Exception as exc:
                raise CorruptIndexError(f"{wpath}: the index's whitening cannot be loaded ({exc})") from exc
        self._faiss = None
        self._faiss_ids: np.ndarray | None = None
        self._records: list[dict[str, Any]] | None = None
        #: settings of ``rerank="aml-fast"`` (rerank/aml_fast.py): K query channels, pooling g, window step
        self.aml_fast_options: dict[str, Any] = {}
        self._aml_fast: tuple[Any, Any, dict[int, int]] | None = None  # (key, AMLInvertedMaps, id -> row)

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, root: str | os.PathLike, recipe: Recipe, *, whitening: str | os.PathLike = "self",
               weights: str | None = None, store_maps: bool = True, device: str = "cpu") -> "Collection":
        """Create an empty index at ``root``. ``whitening``: ``"self"`` (learn it on this collection after
        indexing), ``"none"``, or the path of a whitening fitted elsewhere (``isearch whitening learn``)."""
        if recipe.name == "learned-rmac" and str(whitening) == "self":
            whitening = "none"  # the trained head already whitens (its shift + FC start from PCA-whitening)
        settings = {"recipe": recipe.to_dict(), "whitening_mode": "self", "store_maps": bool(store_maps),
                    "weights": weights}
        if str(whitening) not in cls.WHITENING_MODES:
            settings["whitening_mode"] = "given"
        else:
            settings["whitening_mode"] = str(whitening)
        store = IndexStore.create(root, settings)
        col = cls(store, weights=weights, device=device)
        if settings["whitening_mode"] == "given":
            col.set_whitening(PCAWhitening.load(Path(whitening)))
        return col

    @classmethod
    def open(cls, root: str | os.PathLike, *, writable: bool = False, weights: str | None = None,
             device: str = "cpu", faiss_kind: str = "flat") -> "Collection":
        store = IndexStore.open(root, writable=writable)
        col = cls(store, weights=weights, device=device, faiss_kind=faiss_kind)
        if writable:
            col._refresh_vectors()
        return col

    # ------------------------------------------------------------------ whitening
    @property
    def whitening_tag(self) -> str:
        info = self.store.whitening_info
        return info["tag"] if info else "none"

    def set_whitening(self, whitening: PCAWhitening | None) -> None:
        """Install ``whitening`` (or none) and recompute every stored global vector with it."""
        if whitening is None:
            info = None
        else:
            staged = whitening.save(self.store.root / ".whitening-staged.npz")  # atomic, fsynced
            tag = file_sha256(staged)[:16]
            fname = f"whitening-{tag}.npz"
            os.replace(staged, self.store.root / fname)
            info = {"file": fname, "tag": tag, "trained_on": getattr(whitening, "trained_on", ""),
                    "dim": int(whitening.dim)}
        self.whitening = whitening
        tag = info["tag"] if info else "none"
        self.store.refresh_vectors(lambda local: self.recipe.finalize(local, self.whitening), tag)
        self.store.set_whitening(info)
        self._faiss = None

    def learn_whitening(self, dim: int | None = None, trained_on: str | None = None,
                        power: float = 0.5) -> PCAWhitening:
        """Fit PCA-whitening on this collection's own local vectors (R-MAC regions or one per image);
        ``power`` < 0.5: partial whitening (see :func:`fit_whitening`)."""
        local = self.store.local_descriptors()
        if not local:
            raise ValueError(f"{self.store.root}: cannot learn a whitening from an empty index")
        return fit_whitening(np.concatenate(local), dim=dim or self.recipe.whitening_dim,
                             trained_on=trained_on or f"index {self.store.root}", power=power)

    def _refresh_vectors(self) -> None:
        if self.store.stale_segments(self.whitening_tag):
            self.store.refresh_vectors(lambda local: self.recipe.finalize(local, self.whitening), self.whitening_tag)

    # ------------------------------------------------------------------ indexing
    def add_folder(self, photos: str | os.PathLike | Iterable[str | os.PathLike], *, batch: int = 32,
                   progress: bool = True, on_error: Callable[[str, str], None] | None = None,
                   extract: Callable[[list[Path]], Iterator] | None = None) -> IndexReport:
        """Index every image under ``photos`` that is new or changed; bad files are reported, not fatal.

        ``extract(paths)`` yields, in order, ``(path, (local, fmap, (width, height)) or an error, stat, sha256)``
        for each path to describe; the default (:meth:`extract`) decodes and runs the network here, and
        ``index.distributed.RayExtractor`` runs it on a Ray cluster (the bookkeeping below is the same).
        """
        report = IndexReport()

        def skipped(path: Path, why: str) -> None:  # FIFOs, devices, symlink loops ...: named, the batch goes on
            report.failed.append((str(path), why))
            if on_error:
                on_error(str(path), why)

        paths = (list_images(photos, on_skip=skipped) if isinstance(photos, (str, os.PathLike))
                 else [Path(p) for p in photos])
        known = self.store.path_index()
        todo: list[Path] = []
        replaced: list[int] = []
        for p in paths:
            key = str(p.resolve())
            rec = known.get(key)
            if rec is not None:
                try:
                    st = p.stat()
                except OSError as exc:
                    report.failed.append((str(p), str(exc)))
                    continue
                if rec["size"] == st.st_size and rec["mtime"] == st.st_mtime:
                    report.unchanged.append(key)
                    continue
                if rec["size"] == st.st_size and file_sha256(p) == rec["sha256"]:
                    report.unchanged.append(key)
                    continue
                replaced.append(rec["id"])
                report.updated.append(key)
            todo.append(p)
        pending: list[Entry] = []
        store_maps = self.store.settings.get("store_maps", True)
        bar = progress_bar(len(todo), "indexing", progress)
        try:
            for path, res, st, sha in (extract or self.extract)(todo):
                if isinstance(res, Exception):
                    report.failed.append((str(path), str(res)))
                    if on_error:
                        on_error(str(path), str(res))
                    bar.update(1)
                    continue
                local, fmap, (width, height) = res
                key = str(path.resolve())
                pending.append(Entry(path=key, width=width, height=height, sha256=sha, mtime=st.st_mtime,
                                     size=st.st_size, local=local, fmap=fmap if store_maps else None,
                                     vector=self.recipe.finalize(local, self.whitening)))
                if key not in report.updated:
                    report.added.append(key)
                bar.update(1)
                if len(pending) >= batch:
                    self.store.add(pending, tag=self.whitening_tag)
                    pending = []
            if pending:
                self.store.add(pending, tag=self.whitening_tag)
        finally:
            bar.close()
        if replaced:
            self.store.remove(replaced)
        if self.store.settings.get("whitening_mode") == "self" and self.whitening is None and len(self.store):
            local = self.store.local_descriptors()
            n_rows, dim = sum(len(x) for x in local), local[0].shape[1]
            if len(local) >= self.MIN_SELF_WHITENING_IMAGES and n_rows >= 2 * dim:
                w = fit_whitening(np.concatenate(local), dim=self.recipe.whitening_dim,
                                  trained_on=f"index {self.store.root}")
                self.set_whitening(w)
                report.whitening = (f"whitening learned on this collection itself ({w.n_samples} local vectors, "
                                    f"{w.dim}-D); for benchmark numbers learn it on another collection")
            else:
                report.whitening = (f"not whitened: {len(self.store)} images / {n_rows} local vectors are too few "
                                    f"to learn a {dim}-D whitening (need {self.MIN_SELF_WHITENING_IMAGES} images "
                                    f"and {2 * dim} vectors; it is learned once the collection has them, or "
                                    f"use `isearch whitening learn` on another collection)")
        self._faiss = None
        return report

    def extract(self, paths: Sequence[Path]) -> Iterator:
        """``(path, (local, fmap, (width, height)) or ImageError, stat, sha256)`` per path, in order: JPEG
        decoding in threads, overlapped with this process's forward passes."""
        max_size = self.recipe.max_size
        for path, img, st, sha in prefetch(lambda p: _decode(p, max_size), paths):
            if isinstance(img, Exception):
                yield path, img, st, sha
            else:
                try:
                    local, fmap = self.describer.describe(img)
                except ValueError as exc:  # e.g. fewer pixels than the network's stride: report it, go on
                    yield path, ImageError(f"{path}: cannot be described ({exc})"), st, sha
                    continue
                yield path, (local, fmap, img.info.get("original_size", img.size)), st, sha

    def remove_paths(self, paths: Iterable[str | os.PathLike]) -> int:
        known = self.store.path_index()
        ids = []
        for p in paths:
            rec = known.get(str(Path(p).resolve())) or known.get(str(p))
            if rec is None:
                raise KeyError(f"{p}: not in the index {self.store.root}")
            ids.append(rec["id"])
        n = self.store.remove(ids)
        self._faiss = None
        return n

    # ------------------------------------------------------------------ search
    def describe(self, image: str | os.PathLike | Image.Image, box: Box | Sequence[float] | str | None = None):
        """(global vector, local vectors, feature map) of a query image, cropped to ``box`` first."""
        if isinstance(image, Image.Image):
            img = image.convert("RGB")
            if box is not None:
                from .images import clip_box, resize_max

                b = box if isinstance(box, Box) else parse_box(box)
                img = img.crop(clip_box(b, img.width, img.height, name="query image"))
                img = resize_max(img, self.recipe.max_size)
            else:
                from .images import resize_max

                img = resize_max(img, self.recipe.max_size)
        else:
            img = load_image(image, max_size=self.recipe.max_size, box=box)
        local, fmap = self.describer.describe(img)
        return self.recipe.finalize(local, self.whitening), local, fmap

    def _ensure_faiss(self):
        if self._faiss is None:
            self._records = self.store.records()
            if self.store.stale_segments(self.whitening_tag):
                vecs = self.recipe.finalize(self.store.local_descriptors(), self.whitening)
            else:
                vecs = self.store.vectors()
            self._faiss = build_faiss(vecs, self.faiss_kind) if len(vecs) else None
        return self._faiss

    def vectors(self) -> np.ndarray:
        self._ensure_faiss()
        return self._faiss.reconstruct_n(0, self._faiss.ntotal) if self._faiss is not None else np.zeros((0, 0))

    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            self._records = self.store.records()
        return self._records

    def search_vector(self, vector: np.ndarray, top: int = 10) -> list[Hit]:
        index = self._ensure_faiss()
        if index is None:
            return []
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        scores, pos = faiss_search(index, vector[None], top)
        recs = self._records
        return [Hit(rank=r + 1, id=recs[p]["id"], path=recs[p]["path"], score=float(s))
                for r, (s, p) in enumerate(zip(scores[0], pos[0])) if p >= 0]

    def search(self, image: str | os.PathLike | Image.Image, box=None, top: int = 10, *,
               rerank: str | None = None, shortlist: int = 1000, qe: int = 0) -> list[Hit]:
        """Ranked hits for a query image (optionally its box, cropped the way the benchmark protocol does).

        ``rerank``: ``"aml"`` (Tolias et al. 2016 Sec. 6: localise the query's MAC in each short-listed map
        with AML and score the localised region), ``"aml-fast"`` (the same idea on coarse maps and the query's
        strongest channels, :mod:`instance_search.rerank.aml_fast`; options in :attr:`aml_fast_options`) or
        ``"casr"`` (Salvador et al. 2016 Sec. 3.3: best of the candidate boxes); the top ``shortlist`` images
        are re-ranked and get a box in image pixels.
        ``qe``: average query expansion with the top ``qe`` results (Chum et al. 2007), after re-ranking;
        the expanded query is searched again (and the new short list re-ranked).
        """
        if rerank not in (None, "none", "aml", "aml-fast", "casr"):
            raise ValueError(f"unknown re-ranking {rerank!r}; choose aml, aml-fast, casr or none")
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        if shortlist < 1:
            raise ValueError(f"shortlist must be at least 1, got {shortlist}")
        vec, _, fmap = self.describe(image, box=box)
        return self._search_described(vec, fmap, top, rerank, shortlist, qe)

    def search_indexed(self, image_id: int, top: int = 10, *, rerank: str | None = None, shortlist: int = 1000,
                       qe: int = 0) -> list[Hit]:
        """Like :meth:`search`, with an indexed image as the query ("more like this"): its stored vector and
        stored conv map are used, no network pass. The image itself is among the hits."""
        if rerank not in (None, "none", "aml", "aml-fast", "casr"):
            raise ValueError(f"unknown re-ranking {rerank!r}; choose aml, aml-fast, casr or none")
        if top < 1 or shortlist < 1:
            raise ValueError(f"top and shortlist must be at least 1, got {top}, {shortlist}")
        self._ensure_faiss()
        pos = {r["id"]: k for k, r in enumerate(self._records)}
        if int(image_id) not in pos:
            raise KeyError(f"image id {image_id} is not in the index {self.store.root}")
        vec = self._faiss.reconstruct(int(pos[int(image_id)]))
        fmap = self.store.feature_map(int(image_id)) if rerank not in (None, "none") else None
        return self._search_described(vec, fmap, top, rerank, shortlist, qe)

    def _search_described(self, vec, fmap, top: int, rerank, shortlist: int, qe: int) -> list[Hit]:
        """Search with a described query; re-rank; average QE (Chum et al. 2007) with the top ``qe``.

        After AML with a MAC/R-MAC recipe, QE averages the query with the vectors of the *localised windows* of
        the top ``qe`` re-ranked images and re-scores the short list with them (Tolias et al. 2016 Sec. 6);
        otherwise (no re-ranking, CA-SR, other recipes) it averages the stored global vectors of the top
        ``qe`` (after re-ranking, Salvador et al. 2016 Sec. 4.3) and searches again.
        """
        from .rerank.expansion import average_qe

        rerank = None if rerank == "none" else rerank
        depth = max(top, shortlist if rerank else top, qe)
        hits = self.search_vector(vec, top=depth)
        wvecs: dict[int, np.ndarray] = {}
        if rerank:
            hits, wvecs = self._rerank(hits, fmap, rerank, shortlist, vec)
        if qe <= 0 or not hits:
            return hits[:top]
        if rerank == "aml" and self.recipe.name in ("mac", "rmac") and wvecs:
            top_ids = [h.id for h in hits[:qe]]
            q2 = average_qe(vec, np.stack([wvecs[i] for i in top_ids]), ranks=np.arange(len(top_ids)),
                            top=len(top_ids)).reshape(-1)
            head = [h for h in hits if h.id in wvecs]
            tail = [h for h in hits if h.id not in wvecs]
            new = np.asarray([float(wvecs[h.id] @ q2) for h in head])
            order = np.lexsort((np.arange(len(head)), -new))
            out = [Hit(rank=r + 1, id=head[k].id, path=head[k].path, score=float(new[k]), box=head[k].box)
                   for r, k in enumerate(order)]
            out += [Hit(rank=len(out) + j + 1, id=h.id, path=h.path, score=h.score) for j, h in enumerate(tail)]
            return out[:top]
        vecs = self._vectors_of([h.id for h in hits[:qe]])
        q2 = average_qe(vec, vecs, ranks=np.arange(len(vecs)), top=len(vecs))
        return self.search_vector(np.asarray(q2, np.float32).reshape(-1), top=top)

    def _vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        self._ensure_faiss()
        pos = {r["id"]: k for k, r in enumerate(self._records)}
        return np.stack([self._faiss.reconstruct(int(pos[i])) for i in ids])

    def _rerank(self, hits: list[Hit], qmap: np.ndarray, method: str, shortlist: int,
                qglobal: np.ndarray | None = None) -> tuple[list[Hit], dict[int, np.ndarray]]:
        from .rerank.aml import cells_to_pixels, rerank_aml
        from .rerank.ca_sr import ca_sr

        head, tail = hits[:shortlist], hits[shortlist:]
        qvec = np.asarray(qmap, np.float32).max(axis=(1, 2))  # the query's MAC
        old = np.asarray([h.score for h in head])
        if method == "aml-fast":
            res, shapes = self._rerank_fast(head, qvec, qmap.shape[2] / qmap.shape[1], old)
        else:
            # AML works from the maps' non-zero cells (decoded without building dense maps); CA-SR pools dense maps
            maps = self.store.feature_maps([h.id for h in head], sparse=method == "aml")
            shapes = [tuple(m.shape[1:]) for m in maps]
            if method == "aml":
                window_rmac = {}
                if self.recipe.name == "rmac" and qglobal is not None:  # score the window's R-MAC (Tolias Sec. 6)
                    window_rmac = dict(finalize=lambda locs: self.recipe.finalize([_l2rows(L) for L in locs],
                                                                                  self.whitening),
                                       finalize_batch=True, query_global=qglobal, levels=self.recipe.levels)
                res = rerank_aml(qvec, maps, shortlist_scores=old, query_aspect=qmap.shape[2] / qmap.shape[1],
                                 whitening=self.whitening, **window_rmac)
            else:
                res = ca_sr(qvec, maps, shortlist_scores=old, whitening=self.whitening)
        recs = {r["id"]: r for r in self.records()}
        out = []
        for rank, k in enumerate(res.order):
            h = head[int(k)]
            rec = recs[h.id]
            box = cells_to_pixels(res.boxes[int(k)], shapes[int(k)], (rec["width"], rec["height"]))
            out.append(Hit(rank=rank + 1, id=h.id, path=h.path, score=float(res.scores[int(k)]),
                           box=tuple(round(float(v), 1) for v in box)))
        for j, h in enumerate(tail):
            out.append(Hit(rank=len(out) + 1, id=h.id, path=h.path, score=h.score))
        wvecs = {} if res.vectors is None else {h.id: res.vectors[k] for k, h in enumerate(head)}
        return out, wvecs

    def _rerank_fast(self, head: list[Hit], qvec: np.ndarray, query_aspect: float, old: np.ndarray):
        """``rerank="aml-fast"``: ``(RerankResult, map (H, W) of each head image)``. The coarse maps of all images
        are built once (on first use, again after the index changes; streamed a chunk of decoded maps at a time)
        and kept in RAM; boxes are at the coarse resolution."""
        from .rerank.aml_fast import DEFAULT_G, AMLInvertedMaps, rerank_aml_fast

        opts = dict(self.aml_fast_options)
        g = int(opts.pop("g", DEFAULT_G))
        key = (g, tuple(self.store.manifest["segments"]), tuple(self.store.manifest["removed"]))
        if self._aml_fast is None or self._aml_fast[0] != key:
            ids = [int(i) for i in self.store.ids()]
            step = 4096
            maps = (m for i in range(0, len(ids), step) for m in self.store.feature_maps(ids[i:i + step], sparse=True))
            inv = AMLInvertedMaps.build(maps, g=g, progress=len(ids) > 1000, total=len(ids))
            self._aml_fast = (key, inv, {i: r for r, i in enumerate(ids)})
        _, inv, row_of = self._aml_fast
        rows = np.asarray([row_of[h.id] for h in head], np.int64)
        res = rerank_aml_fast(qvec, inv, rows, shortlist_scores=old, query_aspect=query_aspect,
                              whitening=self.whitening, **opts)
        return res, [tuple(int(v) for v in inv.shapes[r]) for r in rows]

    def __len__(self) -> int:
        return len(self.store)

    def stats(self) -> dict[str, Any]:
        info = self.store.whitening_info
        return {"index": str(self.store.root), "images": len(self.store), "recipe": self.recipe.to_dict(),
                "whitening": info, "segments": len(self.store.manifest["segments"])}
