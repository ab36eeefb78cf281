"""Coarse-to-fine AML re-ranking (after Tolias, Sicre & Jégou 2016, Sec. 5-6; issue 14).

Exact AML (:mod:`.aml`) scores every window of the Sec. 5.2 grid (step ``t``, aspect within ``s``) on every
short-listed map by Eq. 4 with all channels at full resolution; :mod:`.aml_fast` scores coarse windows only
(maps max-pooled by ``g``, the query's ``K`` strongest channels) and loses accuracy to the coarse boxes. Here the
coarse search only *proposes*:

1. :func:`~.aml_fast.aml_fast_search` gives the ``top`` best coarse windows of each map (map cells, multiples of
   ``g``);
2. of the exact AML grid (:func:`~instance_search.ops.integral.sample_windows`, the same windows exact AML
   samples), only those whose four borders each lie within ``radius`` cells of the matching border of one of
   those proposals are candidates; a float32 pass ranks them and the ``verify`` best are scored exactly:
   integral sums of ``X^α`` (α = 10, Eq. 3) and Eq. 4 in float64;
3. the best is refined by the same coordinate descent as exact AML, and the window is scored as exact AML
   scores it (its R-MAC when the index is R-MAC, else its MAC, whitened when the index is;
   :func:`~.aml.score_windows`).

With ``fine_top`` only that many maps go through steps 2-3 — half with the best coarse windows, half first in
the short list (:func:`coarse_selection`; a cascade, as a short list is one); the others keep their coarse scores
and follow them. The ``aml-c2f`` re-ranker chooses the coarse cell ``g`` from the index's maps (:func:`auto_g`).

Steps 2-3 and the window vectors run compiled (:mod:`instance_search.ops.aml_kernel`, Numba) on
:class:`AMLFineMaps`, the maps' α-powered non-zeros, kept in RAM for a whole index by the ``aml-c2f`` re-ranker.
With ``radius`` at least the map size every sampled window is kept and the result is exact AML's (with its
``verify=0``: every sampled window verified exactly); ``tests/rerank/test_rerank.py`` checks that. A map whose
proposals keep no grid window (an aspect filter that leaves none near them) starts from its best proposal itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..ops.integral import REL_TOL, map_shape, sample_windows, sparse_batch
from ..ops.normalize import l2n
from .aml import RerankResult, order_by_score, prepare_rerank, score_windows
from .aml_fast import DEFAULT_K, DEFAULT_STEP, AMLInvertedMaps, aml_fast_search

__all__ = ["rerank_aml_c2f", "fine_candidates", "coarse_selection", "AMLFineMaps", "FineMapsBuilder", "DEFAULT_TOP",
           "DEFAULT_VERIFY", "DEFAULT_FINE_TOP", "auto_g", "positive_int"]

DEFAULT_TOP = 3  # coarse proposals refined per map
COARSE_CELLS = 8  # coarse cells along a map's longer side when g is chosen from the maps (auto_g)
DEFAULT_FINE_TOP = 200  # maps of a short list refined (the aml-c2f re-ranker's default; issue 14's benchmark)
DEFAULT_VERIFY = 8  # fine candidates per map scored exactly after the fast float32 ranking (as exact AML)


@dataclass(frozen=True, eq=False)
class AMLFineMaps:
    """The α-powered non-zeros of ``N`` maps as the fine stage reads them (Tolias et al. 2016, Eq. 3): what
    :func:`~instance_search.ops.integral.sparse_batch` computes from decoded maps, per image, so that a query
    neither decodes compact codes nor raises cells to the power α. Image ``i``'s cells are
    ``offsets[i]:offsets[i+1]``: channel ``c``, row ``y``, column ``x`` (int16) and weight ``w`` (float64,
    ``(X/s)^α / T`` per channel), in raster order; ``xorder`` (int32) the same cells in column order (indices
    within the image); ``rowptr[rowstart[i] + r]`` where row ``r`` starts, ``colptr[colstart[i] + x]`` where
    column ``x`` starts in ``xorder`` (int32, within the image); ``fscale (N, C)`` float64; ``shapes (N, 2)``
    the maps' ``(H, W)``. All numpy. RAM: 18 bytes per kept cell + 8·C + 4·(H + W + 2) bytes per image
    (:attr:`nbytes`).
    """

    channels: int
    alpha: float
    shapes: np.ndarray
    offsets: np.ndarray
    c: np.ndarray
    y: np.ndarray
    x: np.ndarray
    w: np.ndarray
    fscale: np.ndarray
    xorder: np.ndarray
    rowptr: np.ndarray
    rowstart: np.ndarray
    colptr: np.ndarray
    colstart: np.ndarray

    def __len__(self) -> int:
        return int(self.shapes.shape[0])

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.shapes, self.offsets, self.c, self.y, self.x, self.w, self.fscale,
                                           self.xorder, self.rowptr, self.rowstart, self.colptr, self.colstart)))

    @classmethod
    def build(cls, maps: Iterable, alpha: float = 10.0, progress: bool = False,
              total: int | None = None) -> "AMLFineMaps":
        """From non-negative ``(C, H, W)`` maps or :class:`~instance_search.ops.integral.SparseMap` (sizes may
        differ, channels may not; below 32768 cells a side), one at a time."""
        b = FineMapsBuilder(alpha)
        it = maps
        if progress:
            from tqdm import tqdm

            it = tqdm(maps, total=total, desc="AML fine maps", unit="map")
        for m in it:
            b.add(m)
        return b.finish()

    def _rows(self, rows) -> np.ndarray:
        rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise InputError(f"rows must index the {len(self)} images of the fine maps")
        return rows

    def _check_windows(self, rows: np.ndarray, wins: np.ndarray, count: np.ndarray, what: str) -> None:
        """Refuses any of the first ``count[i]`` windows ``wins[i]`` ``(x, y, w, h)`` outside image ``rows[i]``."""
        hw = self.shapes[rows]
        bad = ((wins[..., :2] < 0).any(-1) | (wins[..., 2:] < 1).any(-1) | (wins[..., 0] + wins[..., 2] > hw[:, 1:])
               | (wins[..., 1] + wins[..., 3] > hw[:, :1])) & (np.arange(wins.shape[1]) < count[:, None])
        if bad.any():
            i = int(np.argwhere(bad)[0, 0])
            raise ValueError(f"{what} of map {i} must lie within its {hw[i, 0]}x{hw[i, 1]} cells")

    def search(self, rows, q, candidates, ncand, steps: int = 3, rounds: int = 15, verify: int = 8):
        """AML started from candidate windows on images ``rows`` (:func:`~instance_search.ops.aml_kernel.fine_search`):
        ``candidates (n, m, 4)`` ``(x, y, w, h)``, the first ``ncand[i]`` of row ``i`` real. Returns ``(edges
        (n, 4) x1 y1 x2 y2, scores, n_evaluated, sums (n, C))``."""
        rows = self._rows(rows)
        qn = np.asarray(l2n(torch.as_tensor(np.asarray(q, np.float64)).reshape(-1)).numpy())
        if qn.shape[0] != self.channels:
            raise ValueError(f"query has {qn.shape[0]} dimensions, the maps have {self.channels} channels")
        cand = np.ascontiguousarray(candidates, np.int64)
        ncand = np.ascontiguousarray(ncand, np.int64)
        if cand.ndim != 3 or cand.shape[0] != len(rows) or cand.shape[2] != 4 or ncand.shape != (len(rows),):
            raise ValueError(f"candidates must be (n={len(rows)}, m, 4) with ncand (n,), got {cand.shape}, "
                             f"{ncand.shape}")
        if len(rows) and (ncand.min() < 1 or ncand.max() > cand.shape[1]):
            raise ValueError("every map needs at least one candidate window")
        self._check_windows(rows, cand, ncand, "candidate windows")
        from ..ops.aml_kernel import fine_search, rank_lut, root_tables  # Numba: imported when first used

        lut, shift, base = rank_lut(self.alpha)
        return fine_search(self.c, self.y, self.x, self.w, self.offsets, self.rowptr, self.rowstart, self.xorder,
                           self.colptr, self.colstart, self.shapes, self.fscale, rows, qn, cand, ncand, REL_TOL,
                           int(steps), int(rounds), int(verify), root_tables(self.alpha), lut, shift, base)

    def window_vectors(self, rows, windows) -> torch.Tensor:
        """Exact ``f̃`` (float64) of windows ``(n, m, 4)`` rows ``(x, y, w, h)`` on images ``rows``: ``(n, m, C)``
        (as :meth:`~instance_search.ops.integral.SparseBatch.window_vectors`)."""
        rows = self._rows(rows)
        wins = np.ascontiguousarray(windows, np.int64).reshape(len(rows), -1, 4)
        self._check_windows(rows, wins, np.full(len(rows), wins.shape[1]), "windows")
        from ..ops.aml_kernel import root_tables, window_vectors

        return torch.from_numpy(window_vectors(self.c, self.y, self.x, self.w, self.offsets, self.rowptr, self.rowstart,
                                               self.shapes, self.fscale, rows, wins, REL_TOL, root_tables(self.alpha)))


class FineMapsBuilder:
    """Collects :class:`AMLFineMaps` one map at a time (``add``, then ``finish``), e.g. while the same decoded
    maps also feed the coarse store."""

    def __init__(self, alpha: float = 10.0):
        self.alpha = float(alpha)
        self.C: int | None = None
        self.parts: dict[str, list] = {k: [] for k in ("c", "y", "x", "w", "fscale", "xorder", "rowptr", "colptr")}
        self.counts: list[int] = []
        self.shapes: list[tuple[int, int]] = []
        self.nbytes = 0  #: bytes held so far (about what :attr:`AMLFineMaps.nbytes` will be)

    def add(self, m) -> None:
        i = len(self.shapes)
        sh = map_shape(m)
        if len(sh) != 3:
            raise InputError(f"maps[{i}] must be (C, H, W), got shape {sh}")
        if self.C is None:
            self.C = sh[0]
        if sh[0] != self.C:
            raise InputError(f"maps[{i}] has {sh[0]} channels, maps[0] has {self.C}")
        if max(sh[1:]) >= 2 ** 15:
            raise InputError(f"maps[{i}] is {sh[1]}x{sh[2]} cells: too large for int16 positions")
        sp = sparse_batch([m], self.alpha)
        H, W = sh[1:]
        y, x = sp.y.numpy(), sp.x.numpy()
        o = np.argsort(y * W + x, kind="stable")  # raster order: rows are contiguous
        y, x = y[o], x[o]
        P = self.parts
        P["c"].append(sp.c.numpy()[o].astype(np.int16))
        P["y"].append(y.astype(np.int16))
        P["x"].append(x.astype(np.int16))
        P["w"].append(sp.w.numpy()[o])
        P["xorder"].append(np.argsort(x * H + y, kind="stable").astype(np.int32))
        P["rowptr"].append(np.searchsorted(y, np.arange(H + 1)).astype(np.int32))
        P["colptr"].append(np.searchsorted(np.sort(x), np.arange(W + 1)).astype(np.int32))
        P["fscale"].append(sp.fscale.numpy())
        self.counts.append(len(o))
        self.shapes.append((H, W))
        self.nbytes += sum(P[k][-1].nbytes for k in P) + 24

    def finish(self) -> AMLFineMaps:
        if self.C is None:
            raise InputError("maps: no maps given")
        P = self.parts

        def starts(parts):
            return np.concatenate([[0], np.cumsum([len(p) for p in parts])[:-1]]).astype(np.int64)

        offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        return AMLFineMaps(self.C, self.alpha, np.asarray(self.shapes, np.int64).reshape(-1, 2), offsets,
                           *(np.concatenate(P[k]) for k in ("c", "y", "x", "w")),
                           np.concatenate(P["fscale"]).reshape(-1, self.C), np.concatenate(P["xorder"]),
                           np.concatenate(P["rowptr"]), starts(P["rowptr"]), np.concatenate(P["colptr"]),
                           starts(P["colptr"]))


class _FineWindows:
    """``window_vectors`` of some images of :class:`AMLFineMaps`, as :func:`~.aml.score_windows` reads them."""

    def __init__(self, fine: AMLFineMaps, rows: np.ndarray):
        self.fine, self.rows = fine, rows

    def window_vectors(self, windows) -> torch.Tensor:
        return self.fine.window_vectors(self.rows, windows)


def _edges(w: np.ndarray) -> np.ndarray:
    """``(x1, y1, x2, y2)`` of ``(..., 4)`` rows ``(x, y, w, h)``."""
    return np.concatenate([w[..., :2], w[..., :2] + w[..., 2:]], -1)


def fine_candidates(H: int, W: int, proposals, valid, radius: int, t: int = 3, aspect: float | None = None,
                    s: float = 1.1) -> tuple[np.ndarray, np.ndarray]:
    """The windows of the exact AML grid ``sample_windows(H, W, t, aspect, s)`` near each map's proposals.

    ``proposals (B, k, 4)`` windows ``(x, y, w, h)`` in map cells, ``valid (B, k)`` which exist; a grid window
    is kept for map ``b`` when each of its borders is within ``radius`` cells of the same border of one valid
    proposal (:func:`~instance_search.ops.aml_kernel.near_windows`). Returns ``(candidates (B, m, 4),
    count (B,))``: each map's kept windows first, in grid order, then padding; a map with none gets its first
    valid proposal.
    """
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius}")
    P = np.ascontiguousarray(proposals, np.int64)
    V = np.ascontiguousarray(valid, bool)
    if P.ndim != 3 or P.shape[2] != 4 or V.shape != P.shape[:2]:
        raise ValueError(f"proposals must be (B, k, 4) with valid (B, k), got {P.shape} and {V.shape}")
    if not V.any(1).all():
        raise ValueError("every map needs at least one valid proposal")
    from ..ops.aml_kernel import near_windows

    grid = np.ascontiguousarray(sample_windows(H, W, t, aspect, s), np.int64).reshape(-1, 4)
    return near_windows(grid, P, V, int(radius))


def rerank_aml_c2f(
    query_vec,
    maps: Sequence | Callable[[np.ndarray], Sequence] | None,
    store: AMLInvertedMaps,
    rows,
    shortlist_scores=None,
    top: int = DEFAULT_TOP,
    radius: int | None = None,
    K: int = DEFAULT_K,
    step: int = DEFAULT_STEP,
    t: int = 3,
    s: float = 1.1,
    query_aspect: float | None = None,
    alpha: float = 10.0,
    refine_steps: int = 3,
    refine_rounds: int = 15,
    whitening: Callable | None = None,
    exact: bool = True,
    finalize: Callable | None = None,
    query_global=None,
    levels: int = 3,
    finalize_batch: bool = False,
    verify: int = DEFAULT_VERIFY,
    fine: AMLFineMaps | None = None,
    fine_top: int | None = None,
    fine_rule: str = "mixed",
) -> RerankResult:
    """Re-rank a short list by coarse-to-fine AML (module docstring).

    ``maps``: the short list's full-resolution maps (dense or :class:`~instance_search.ops.integral.SparseMap`),
    in the order of ``rows``, or a callable that loads those of given short-list positions (called once, with
    the maps the fine stage reads: with ``fine_top``, not the others), their rows in the coarse ``store``
    (:class:`~.aml_fast.AMLInvertedMaps` of the same maps); ``top``, ``radius`` (default: the store's ``g``):
    proposals per map and how far the fine grid windows may lie from them; ``K``, ``step``: the coarse search
    (:func:`~.aml_fast.aml_fast_search`); ``t``, ``s``, ``query_aspect``, ``alpha``, ``refine_*``: exact AML's
    (:func:`~.aml.rerank_aml`), as are the scoring arguments ``whitening``, ``exact``, ``finalize``,
    ``query_global``, ``levels``, ``finalize_batch``.
    ``verify``: the fine candidates of each map are ranked by a float32 pass and the ``verify`` best scored
    exactly (``0``: all exactly). ``fine``: the maps' α-powered non-zeros kept in RAM (:class:`AMLFineMaps`,
    indexed by the same ``rows`` as ``store``); without it they are computed from ``maps`` for this query.
    With ``fine``, ``maps`` may be ``None`` unless the windows are scored by their exact MAC (no ``finalize``,
    ``exact=True``), which reads the maps themselves. ``n_windows`` counts the coarse and the fine windows scored.

    ``fine_top``: the fine stage runs on ``fine_top`` maps chosen by ``fine_rule`` (:func:`coarse_selection`:
    half by best coarse window, half by short-list order; ``None``: every map). They are ranked first, by their
    fine scores; the others follow in the order of their coarse scores, which they keep as ``scores`` (Eq. 4 on
    the ``g``-pooled maps, the query's ``K`` channels), with their best coarse window as box and NaN rows in
    ``vectors``.
    """
    if int(top) != top or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top}")
    _check_fine_top(fine_top)
    radius = int(store.g) if radius is None else radius
    rows = np.asarray(rows, np.int64).reshape(-1)
    n = len(rows)
    if n and (rows.min() < 0 or rows.max() >= len(store)):
        raise ValueError(f"rows must index the store's {len(store)} images")
    loader = maps if callable(maps) else None
    if maps is None and fine is None:
        raise ValueError("give the maps, or the fine maps kept in RAM (fine=)")
    if maps is None and finalize is None and exact:
        raise ValueError("scoring windows by their exact MAC reads the maps: give them")
    if maps is None or loader is not None:
        q, _, _, qg, qw = prepare_rerank(query_vec, [], finalize, query_global, whitening)
        maps = None
    else:
        q, maps, _, qg, qw = prepare_rerank(query_vec, maps, finalize, query_global, whitening)
        if len(maps) != n:
            raise ValueError(f"{n} store rows for {len(maps)} maps")
        _check_shapes(maps, range(n), store, rows)
    shapes = [tuple(int(v) for v in store.shapes[r]) for r in rows]  # the maps' (checked against the store)
    if q.shape[0] != store.channels:
        raise ValueError(f"query has {q.shape[0]} dimensions, the maps have {store.channels} channels")
    if fine is not None and (len(fine) != len(store) or fine.alpha != float(alpha)):
        raise InputError(f"fine maps: {len(fine)} images at alpha={fine.alpha}, the store has {len(store)} and "
                         f"alpha is {alpha}")
    scores = np.zeros(n)
    if n == 0:
        return RerankResult(scores, np.zeros((0, 4), np.int64), order_by_score(scores, shortlist_scores),
                            np.zeros(0, np.int64), None)
    cboxes, cscores, n_coarse, props, pok = aml_fast_search(store, rows, q.numpy(), K=K, query_aspect=query_aspect,
                                                            s=s, step=step, exact_score=False, top=int(top))
    sel = coarse_selection(cscores, fine_top, fine_rule)
    if loader is not None:  # only the maps the fine stage reads
        got = loader(sel)
        if len(got) != len(sel):
            raise ValueError(f"the map loader gave {len(got)} maps for {len(sel)} positions")
        _, got, _, _, _ = prepare_rerank(q, got, None, None, None)
        _check_shapes(got, sel, store, rows)
        maps = [None] * n
        for k, i in enumerate(sel):
            maps[i] = got[k]
    if fine is None:  # this query's selected maps only
        fine = AMLFineMaps.build([maps[i] for i in sel], alpha)
        frows = np.zeros(n, np.int64)
        frows[sel] = np.arange(len(sel))
    else:
        frows = rows
    groups: dict[tuple[int, int], list[int]] = {}
    for i in sel:
        groups.setdefault(shapes[i], []).append(int(i))
    pos = np.zeros(n, np.int64)
    pos[sel] = np.arange(len(sel))
    parts = {hw: fine_candidates(*hw, props[idx], pok[idx], radius, t, query_aspect, s) for hw, idx in groups.items()}
    m = max(c.shape[1] for c, _ in parts.values())
    cand = np.zeros((len(sel), m, 4), np.int64)
    ncand = np.zeros(len(sel), np.int64)
    for hw, idx in groups.items():
        c, cnt = parts[hw]
        cand[pos[idx], :c.shape[1]] = c
        ncand[pos[idx]] = cnt
    edges, fbest, n_eval, _ = fine.search(frows[sel], q.numpy(), cand, ncand, refine_steps, refine_rounds, int(verify))
    boxes = np.asarray(cboxes, np.int64).copy()
    boxes[sel] = np.stack([edges[:, 0], edges[:, 1], edges[:, 2] - edges[:, 0], edges[:, 3] - edges[:, 1]], 1)
    best = np.asarray(cscores, np.float64).copy()
    best[sel] = fbest
    counts = np.asarray(n_coarse, np.int64).copy()
    counts[sel] += n_eval
    vectors: list[np.ndarray | None] = [None] * n
    for idx in groups.values():  # per map size, as exact AML (same batches through the scoring functions)
        score_windows(maps if maps is not None else [None] * n, idx, boxes[idx], best[idx],
                      _FineWindows(fine, frows[idx]), q, scores, vectors, whitening=whitening, exact=exact,
                      finalize=finalize, query_global=qg, levels=levels, finalize_batch=finalize_batch, qw=qw)
    refined = np.zeros(n, bool)
    refined[sel] = True
    scores[~refined] = cscores[~refined]  # the coarse search's score (Eq. 4 on the g-pooled maps), ranked after
    order = order_by_score(scores, shortlist_scores, first=refined)
    vecs = None
    if all(vectors[i] is not None for i in sel):
        vecs = np.full((n, len(vectors[sel[0]])), np.nan)
        vecs[sel] = np.stack([vectors[i] for i in sel])
    return RerankResult(scores, boxes, order, counts, vecs)


def coarse_selection(coarse_scores, fine_top: int | None, rule: str = "mixed") -> np.ndarray:
    """Short-list positions (ascending) of the ``fine_top`` maps the fine stage re-scores; all of them when
    ``fine_top`` is ``None`` or at least the short list. ``rule``: ``"mixed"``, the ``ceil(fine_top / 2)`` whose
    best coarse window scores highest (ties: the earlier in the short list), then the earliest of the short list
    (its first-stage order) not yet chosen; ``"coarse"``: all by coarse score; ``"shortlist"``: the first
    ``fine_top`` of the short list."""
    _check_fine_top(fine_top)
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
    cs = np.asarray(coarse_scores, np.float64).reshape(-1)
    n = len(cs)
    if fine_top is None or fine_top >= n:
        return np.arange(n)
    by_coarse = np.lexsort((np.arange(n), -cs))
    k = {"mixed": (int(fine_top) + 1) // 2, "coarse": int(fine_top), "shortlist": 0}[rule]
    chosen = np.zeros(n, bool)
    chosen[by_coarse[:k]] = True
    chosen[np.flatnonzero(~chosen)[:int(fine_top) - int(chosen.sum())]] = True
    return np.flatnonzero(chosen)


_RULES = ("mixed", "coarse", "shortlist")


def positive_int(value) -> bool:
    """Whether an option value is an integer >= 1 (an int, or a float with no fraction; not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer)) and int(value) == value \
        and value >= 1


def _check_fine_top(fine_top) -> None:
    if fine_top is not None and not positive_int(fine_top):
        raise ValueError(f"fine_top must be an integer >= 1 or None, got {fine_top!r}")


def _check_shapes(maps: Sequence, positions, store: AMLInvertedMaps, rows: np.ndarray) -> None:
    """Refuses a map whose size is not its store row's (another image)."""
    for X, i in zip(maps, positions):
        sh, want = tuple(map_shape(X)[1:]), tuple(int(v) for v in store.shapes[rows[i]])
        if sh != want:
            raise ValueError(f"map {i} is {sh}, its store row {rows[i]} holds a {want} map: not the same image")


def auto_g(shapes) -> int:
    """The coarse cell ``g`` that gives about :data:`COARSE_CELLS` (8) coarse cells along the longer side of the
    median map of ``shapes`` (``(…, H, W)`` tuples): 8 for VGG16 conv5_3 maps of 1024-px images (64 cells, the
    ``aml-fast`` default), 4 for ResNet-50 res5 (32 cells), at least 1."""
    sides = [max(int(s[-2]), int(s[-1])) for s in shapes]
    if not sides:
        return 1
    return max(1, int(np.floor(float(np.median(sides)) / COARSE_CELLS + 0.5)))
