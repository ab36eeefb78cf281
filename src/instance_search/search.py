"""Search a collection: first-stage FAISS search ─▶ short list ─▶ re-ranker ─▶ query expansion ─▶ hits with boxes.

>>> hits = search(col, "query.jpg", box=(10, 20, 200, 300), top=10, rerank="aml", shortlist=100, qe=5,
...               qe_kind="alpha")

``col`` is a :class:`~instance_search.collection.Collection` (its methods ``search`` / ``search_indexed`` /
``search_vector`` call these functions); this module only reads it (its FAISS index, records, stored maps,
recipe and whitening), so it does not import it. The re-rankers and expansions come from the registries of
:mod:`instance_search.rerank.base` by name (``none``, ``aml``, ``aml-fast``, ``casr``, ``cs-sr``; ``avg``,
``alpha``, ``dba``).

Order of the steps (Tolias et al. 2016, Sec. 6; Salvador et al. 2016, Sec. 4.3): the first stage ranks the index
by the global vectors (against the DBA-augmented vectors when ``qe_kind="dba"``); the best ``shortlist`` images are
re-ranked and get a box; query expansion then uses the best ``qe`` images *after* re-ranking. Average QE (``avg``)
after a re-ranker with its own region space (``casr``, ``cs-sr``: :meth:`~.rerank.base.Reranker.qe_after_rerank`)
is Salvador et al.'s (Sec. 4.3): the mean of the *raw* region vectors of the query box and of the boxes of the top
``qe`` re-ranked images (re-cropped from their maps), L2 (sum pooling: then the PCA-whitening and L2), then the
short list re-ranked again with it (new scores and boxes). That is the default (``space="auto"``) except on a
whitened MAC / R-MAC index, where the earlier global-vector average measured as good or better and is used;
``qe_options={"space": "regions" | "global"}`` names one. After AML with a MAC / R-MAC recipe the expansion uses
the vectors of the localised windows and re-scores the short list with the expanded query; otherwise (and for
``alpha`` after ``casr`` / ``cs-sr``) it uses the stored global vectors and searches the index again (that second
ranking is not re-ranked again and carries no boxes, as before the registry).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .index.faiss_backend import build_faiss
from .index.faiss_backend import search as faiss_search
from .ops.normalize import l2n
from .rerank.aml import cells_to_pixels
from .rerank.base import AverageQE, Expansion, RerankContext, Reranker, make_expansion, make_reranker

__all__ = ["Hit", "SearchState", "search", "search_indexed", "search_vector", "search_described", "rerank_hits",
           "reranker_for", "expansion_for", "FIRST_STAGES"]


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


class SearchState:
    """What searching keeps between queries of one open collection: the re-rankers by name and options (their
    caches: aml-fast's coarse maps, cs-sr's loaded detector) and the DBA-augmented vectors with their FAISS
    index."""

    def __init__(self) -> None:
        self.rerankers: dict[tuple, Reranker] = {}
        self.dba: tuple[Any, tuple, Any] | None = None  # (first-stage FAISS index it was built from, key, index)


def _state(col) -> SearchState:
    return col.search_state


def _key(name: str, options: Mapping[str, Any]) -> tuple:
    return (name, tuple(sorted((k, repr(v)) for k, v in options.items())))


def reranker_for(col, rerank: str | Reranker | None, options: Mapping[str, Any] | None = None) -> Reranker:
    """The re-ranker ``rerank`` (a name, ``None`` = ``"none"``, or an instance, used as it is) with the
    collection's default options for that name (``col.rerank_options[name]``) updated by ``options``; one
    instance per name and options is kept with the collection (its caches live on)."""
    if isinstance(rerank, Reranker):
        if options:
            raise ValueError("give re-ranking options either to the Reranker instance or as options, not both")
        return rerank
    name = "none" if rerank is None else str(rerank)
    opts = {**(col.rerank_options.get(name) or {}), **{k: v for k, v in (options or {}).items() if v is not None}}
    cache = _state(col).rerankers
    key = _key(name, opts)
    if key not in cache:
        cache[key] = make_reranker(name, **opts)
    return cache[key]


def expansion_for(qe_kind: str | Expansion, options: Mapping[str, Any] | None = None) -> Expansion:
    """The query expansion ``qe_kind`` (a name or an instance) with ``options``."""
    if isinstance(qe_kind, Expansion):
        if options:
            raise ValueError("give query-expansion options either to the Expansion instance or as options, not both")
        return qe_kind
    return make_expansion(str(qe_kind), **(options or {}))


def _check(top: int, shortlist: int, qe: int) -> None:
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if shortlist < 1:
        raise ValueError(f"shortlist must be at least 1, got {shortlist}")
    if qe < 0:
        raise ValueError(f"qe must be 0 (off) or more, got {qe}")


def _setup(col, rerank, shortlist, qe, qe_kind, detector, rerank_options, qe_options, top):
    opts = dict(rerank_options or {})
    if detector is not None:
        opts["detector"] = os.fspath(detector)
    reranker = reranker_for(col, rerank, opts)
    expansion = expansion_for(qe_kind, qe_options)
    _check(top, shortlist, qe)
    return reranker, expansion


def search(col, image, box=None, top: int = 10, *, rerank: str | Reranker | None = None, shortlist: int = 1000,
           qe: int = 0, qe_kind: str | Expansion = "avg", detector: str | os.PathLike | None = None,
           rerank_options: Mapping[str, Any] | None = None, qe_options: Mapping[str, Any] | None = None,
           timings: dict[str, float] | None = None, first_stage: str | None = None) -> list[Hit]:
    """Ranked hits for a query image (optionally its box).

    ``rerank``: a name of :data:`~instance_search.rerank.base.RERANKERS` (``none``, ``aml``, ``aml-fast``,
    ``casr``, ``cs-sr``) or a :class:`~instance_search.rerank.base.Reranker`; ``rerank_options`` its options
    (``detector``: the detector file of ``cs-sr``, also accepted as the ``detector`` argument); the top
    ``shortlist`` images are re-ranked and get a box in image pixels. ``qe``: expand with the top ``qe`` results
    after re-ranking (0: off); ``qe_kind``: ``avg``, ``alpha`` or ``dba`` (or an
    :class:`~instance_search.rerank.base.Expansion`) with ``qe_options`` (``alpha``). ``timings``: a dict that
    receives ``network_ms`` (describing the query; with a decoded PIL image as ``image``, the network pass
    alone) and the stages of :func:`search_described`.

    ``first_stage`` (with a ``box``; :data:`FIRST_STAGES`): ``"box"`` describes the box crop and ranks with it
    (the revisited protocol's query; what the benchmarks use), ``"image"`` ranks with the whole query image and
    re-ranks with the box's cells of its map (Salvador et al. 2016, Sec. 4.2 and their ``ranker.py``/``rerank.py``).
    ``None``: the recipe's choice (``Method.first_stage``: ``"image"`` for ``ipa`` / ``rpa``, otherwise ``"box"``).
    """
    reranker, expansion = _setup(col, rerank, shortlist, qe, qe_kind, detector, rerank_options, qe_options, top)
    stage = first_stage if first_stage is not None else getattr(col.recipe.method, "first_stage", "box")
    if stage not in FIRST_STAGES:
        raise ValueError(f"first_stage must be one of {', '.join(FIRST_STAGES)}, got {stage!r}")
    t0 = time.perf_counter()
    if box is not None and stage == "image":
        vec, fmap = _describe_whole(col, image, box)
    else:
        vec, _, fmap = col.describe(image, box=box)
    if timings is not None:
        timings["network_ms"] = (time.perf_counter() - t0) * 1e3
    return search_described(col, vec, fmap, top, reranker, shortlist, qe, expansion, timings)


#: the query of the first stage when a box is given: its crop ("box") or the whole image ("image")
FIRST_STAGES = ("box", "image")


def _describe_whole(col, image, box):
    """(global vector of the whole query image, its map cropped to the box's cells) -- Salvador et al.'s first
    stage and query box: the box (original-image pixels) projected onto the map by Caffe's RoI rounding
    (:func:`~instance_search.ops.boxes.boxes_to_cells`)."""
    from PIL import Image

    from .images import Box, clip_box, load_image, parse_box
    from .ops.boxes import boxes_to_cells, to_map_frame

    if isinstance(image, Image.Image):
        w0, h0 = image.size
    else:
        image = load_image(image, max_size=col.recipe.max_size)
        w0, h0 = image.info.get("original_size", image.size)
    b = box if isinstance(box, Box) else parse_box(box)
    x1, y1, x2, y2 = clip_box(b, w0, h0, name="query image")
    vec, _, fmap = col.describe(image)
    H, W = int(fmap.shape[-2]), int(fmap.shape[-1])
    x, y, w, h = boxes_to_cells(to_map_frame([x1, y1, x2, y2], (w0, h0), (H, W)), 16, H, W)[0]
    return vec, fmap[:, y:y + h, x:x + w]


def search_indexed(col, image_id: int, top: int = 10, *, rerank: str | Reranker | None = None,
                   shortlist: int = 1000, qe: int = 0, qe_kind: str | Expansion = "avg",
                   detector: str | os.PathLike | None = None, rerank_options: Mapping[str, Any] | None = None,
                   qe_options: Mapping[str, Any] | None = None, timings: dict[str, float] | None = None) -> list[Hit]:
    """Like :func:`search`, with an indexed image as the query ("more like this"): its stored vector and stored
    conv map are used, no network pass. The image itself is among the hits. ``timings``: as
    :func:`search_described` (the stored map's read counts as ``search_ms``)."""
    reranker, expansion = _setup(col, rerank, shortlist, qe, qe_kind, detector, rerank_options, qe_options, top)
    vec = col.vectors_of([int(image_id)])[0]
    t0 = time.perf_counter()
    fmap = None if reranker.identity else col.store.feature_map(int(image_id))
    load_ms = (time.perf_counter() - t0) * 1e3
    hits = search_described(col, vec, fmap, top, reranker, shortlist, qe, expansion, timings)
    if timings is not None:
        timings["map_ms"] = load_ms
    return hits


def search_vector(col, vector: np.ndarray, top: int = 10, *, index=None) -> list[Hit]:
    """First stage: the ``top`` indexed images by inner product with ``vector`` (FAISS); ``index``: search this
    FAISS index (same rows as the collection's, e.g. the DBA-augmented vectors) instead of the collection's."""
    base = col.faiss_index()
    if base is None:
        return []
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    scores, pos = faiss_search(index if index is not None else base, np.asarray(vector, np.float32)[None], top)
    recs = col.records()
    return [Hit(rank=r + 1, id=recs[p]["id"], path=recs[p]["path"], score=float(s))
            for r, (s, p) in enumerate(zip(scores[0], pos[0])) if p >= 0]


def _dba_index(col, expansion: Expansion, n: int):
    """The FAISS index of the DBA-augmented vectors (``expansion.database`` over each vector's ``n`` nearest
    neighbours, found by the collection's own FAISS index); built once per state of the index and kept."""
    base = col.faiss_index()
    if base is None:
        return None
    st = _state(col)
    key = (repr(expansion), int(n))
    if st.dba is not None and st.dba[0] is base and st.dba[1] == key:
        return st.dba[2]
    X = base.reconstruct_n(0, base.ntotal)
    k = min(int(n), len(X))
    _, nb = faiss_search(base, X, min(k + 1, len(X)))
    if (nb < 0).any():
        raise ValueError(f"dba: the {col.faiss_kind} FAISS index found fewer than {min(k + 1, len(X))} neighbours for "
                         f"some vectors; use a smaller qe or the exact ('flat') index")
    aug = expansion.database(X, nb, k)
    index = build_faiss(np.ascontiguousarray(aug, np.float32), col.faiss_kind)
    st.dba = (base, key, index)
    return index


def _windows_in_global_space(col) -> bool:
    """Whether a window vector of AML (its MAC, or its R-MAC: :func:`_context`) is comparable with the recipe's
    global vector (Tolias et al. 2016, Sec. 6: true of MAC and R-MAC; ``Method.window_vector``)."""
    return bool(col.recipe.method.window_vector)


def _context(col, qglobal: np.ndarray | None) -> RerankContext:
    store = col.store
    window_rmac: dict[str, Any] = {}
    if col.recipe.method.window_vector == "rmac" and qglobal is not None:  # the window's R-MAC (Tolias Sec. 6)
        window_rmac = dict(finalize=lambda locs: col.recipe.finalize([l2n(np.asarray(L, np.float32)) for L in locs], col.whitening),
                           finalize_batch=True, query_global=qglobal, levels=col.recipe.levels)
    return RerankContext(maps=lambda ids, sparse: store.feature_maps([int(i) for i in ids], sparse=sparse),
                         all_ids=store.ids,
                         version=(tuple(store.manifest["segments"]), tuple(store.manifest["removed"])),
                         whitening=col.whitening, window_rmac=window_rmac)


def rerank_hits(col, hits: list[Hit], qmap: np.ndarray, reranker: Reranker, shortlist: int,
                qglobal: np.ndarray | None = None) -> tuple[list[Hit], dict[int, np.ndarray]]:
    """Re-rank the first ``shortlist`` of ``hits`` with ``reranker``; the rest follow unchanged. Returns the new
    hits (re-ranked ones with a box in image pixels) and the vector each re-ranked image was scored with."""
    out, wvecs, _ = _rerank(col, hits, qmap, reranker, shortlist, qglobal)
    return out, wvecs


@dataclass
class _Reranked:
    """What query expansion after re-ranking needs of a re-ranking: the short list (first-stage order) and its
    scores, the re-ranker's result on it, and the hits after the short list."""

    head: list[Hit]
    scores: np.ndarray
    result: Any
    tail: list[Hit]


def _hits_of(col, head: list[Hit], tail: list[Hit], res, shapes) -> list[Hit]:
    """Hits of a re-ranked short list ``head`` (``res``: its :class:`~.rerank.aml.RerankResult`, boxes in the cells
    of maps of ``shapes``) in front of the unchanged ``tail``."""
    recs = {r["id"]: r for r in col.records()}
    out = []
    for rank, k in enumerate(res.order):
        h = head[int(k)]
        rec = recs[h.id]
        box = cells_to_pixels(res.boxes[int(k)], shapes[int(k)], (rec["width"], rec["height"]))
        out.append(Hit(rank=rank + 1, id=h.id, path=h.path, score=float(res.scores[int(k)]),
                       box=tuple(round(float(v), 1) for v in box)))
    for h in tail:
        out.append(Hit(rank=len(out) + 1, id=h.id, path=h.path, score=h.score))
    return out


def _rerank(col, hits, qmap, reranker, shortlist, qglobal):
    head, tail = hits[:shortlist], hits[shortlist:]
    if not head:
        return list(hits), {}, None
    old = np.asarray([h.score for h in head])
    res, shapes = reranker.rerank(qglobal, qmap, [h.id for h in head], old, _context(col, qglobal))
    # images a cascade did not re-score (aml-c2f beyond fine_top) have NaN vectors: none kept for them
    wvecs = {} if res.vectors is None else {h.id: res.vectors[k] for k, h in enumerate(head)
                                             if np.isfinite(res.vectors[k]).all()}
    return _hits_of(col, head, tail, res, shapes), wvecs, _Reranked(head, old, res, tail)


def _vectors_of(col, ids: Sequence[int]) -> np.ndarray:
    return col.vectors_of(ids)


def search_described(col, vec: np.ndarray, fmap, top: int, reranker: Reranker, shortlist: int, qe: int,
                     expansion: Expansion, timings: dict[str, float] | None = None) -> list[Hit]:
    """The pipeline for a described query (global vector ``vec``, conv map ``fmap``): first stage, re-ranking,
    expansion (module docstring). ``timings``: a dict that receives ``search_ms``, ``rerank_ms`` and ``qe_ms``
    (wall time of each stage; the server shows them)."""
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    rerank = not reranker.identity
    database = expansion.database_side and qe > 0
    index = _dba_index(col, expansion, qe) if database else None
    depth = max(top, shortlist if rerank else top, qe)
    hits = search_vector(col, vec, top=depth, index=index)
    t1 = time.perf_counter()
    t["search_ms"] = (t1 - t0) * 1e3
    wvecs: dict[int, np.ndarray] = {}
    reranked = None
    if rerank and hits:
        hits, wvecs, reranked = _rerank(col, hits, fmap, reranker, shortlist, vec)
    t2 = time.perf_counter()
    t["rerank_ms"] = (t2 - t1) * 1e3
    t["qe_ms"] = 0.0
    if qe <= 0 or not hits or not expansion.query_side:
        return hits[:top]
    try:
        if reranked is not None and isinstance(expansion, AverageQE) and \
                expansion.space_for(col.whitening, _windows_in_global_space(col)) == "regions":
            out = reranker.qe_after_rerank(fmap, [h.id for h in reranked.head], reranked.scores, reranked.result, qe,
                                           _context(col, vec))
            if out is not None:  # QE in the re-ranker's region space (Salvador et al. 2016, Sec. 4.3)
                return _hits_of(col, reranked.head, reranked.tail, *out)[:top]
        return _expand(col, vec, hits, wvecs, reranker, qe, expansion, top)
    finally:
        t["qe_ms"] = (time.perf_counter() - t2) * 1e3


def _expand(col, vec, hits, wvecs, reranker, qe, expansion, top) -> list[Hit]:
    """Query expansion with the top ``qe`` of ``hits`` (after re-ranking; module docstring)."""
    top_ids = [h.id for h in hits[:qe]]
    if reranker.window_vectors and all(i in wvecs for i in top_ids) and _windows_in_global_space(col):
        q2 = expansion.expand(vec, np.stack([wvecs[i] for i in top_ids])).reshape(-1)
        head = [h for h in hits if h.id in wvecs]
        tail = [h for h in hits if h.id not in wvecs]
        new = np.asarray([float(wvecs[h.id] @ q2) for h in head])
        order = np.lexsort((np.arange(len(head)), -new))
        out = [Hit(rank=r + 1, id=head[k].id, path=head[k].path, score=float(new[k]), box=head[k].box)
               for r, k in enumerate(order)]
        out += [Hit(rank=len(out) + j + 1, id=h.id, path=h.path, score=h.score) for j, h in enumerate(tail)]
        return out[:top]
    q2 = expansion.expand(vec, _vectors_of(col, [h.id for h in hits[:qe]]))
    return search_vector(col, np.asarray(q2, np.float32).reshape(-1), top=top)
