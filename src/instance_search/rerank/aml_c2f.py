"""Coarse-to-fine AML re-ranking (after Tolias, Sicre & Jégou 2016, Sec. 5-6; issue 14).

Exact AML (:mod:`.aml`) scores every window of the Sec. 5.2 grid (step ``t``, aspect within ``s``) on every
short-listed map by Eq. 4 with all channels at full resolution; :mod:`.aml_fast` scores coarse windows only
(maps max-pooled by ``g``, the query's ``K`` strongest channels) and loses accuracy to the coarse boxes. Here the
coarse search only *proposes*:

1. :func:`~.aml_fast.aml_fast_search` gives the ``top`` best coarse windows of each map (map cells, multiples of
   ``g``);
2. of the exact AML grid (:func:`~instance_search.ops.integral.sample_windows`, the same windows exact AML
   samples), only those whose four borders each lie within ``radius`` cells of the matching border of one of
   those proposals are scored, exactly: integral sums of ``X^α`` (α = 10, Eq. 3) and Eq. 4 in float64;
3. the best is refined by the same coordinate descent as exact AML
   (:func:`~instance_search.ops.integral.aml_search_candidates`), and the window is scored as exact AML scores
   it (its R-MAC when the index is R-MAC, else its MAC, whitened when the index is;
   :func:`~.aml.score_windows`).

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
from ..ops.integral import (CellOrder, SparseBatch, SparseMap, aml_search_candidates, map_shape, refine_strips, sample_windows,
                             sparse_batch)
from ..ops.normalize import l2n
from .aml import RerankResult, order_by_score, prepare_rerank, score_windows
from .aml_fast import DEFAULT_K, DEFAULT_STEP, AMLInvertedMaps, aml_fast_search

__all__ = ["rerank_aml_c2f", "fine_candidates", "AMLFineMaps", "DEFAULT_TOP", "DEFAULT_VERIFY"]

DEFAULT_TOP = 3  # coarse proposals refined per map
DEFAULT_VERIFY = 8  # fine candidates per map scored exactly after the fast float32 ranking (as exact AML)


@dataclass(frozen=True, eq=False)
class AMLFineMaps:
    """The α-powered non-zeros of ``N`` maps kept in RAM for the fine stage (Tolias et al. 2016, Eq. 3): what
    :func:`~instance_search.ops.integral.sparse_batch` computes from decoded maps, per image, so that a query
    neither decodes compact codes nor raises cells to the power α. Image ``i``'s cells are
    ``offsets[i]:offsets[i+1]``: channel ``c``, row ``y``, column ``x`` (int16) and weight ``w`` (float64,
    ``(X/s)^α / T`` per channel), in raster order, and ``xorder`` (int32) the same cells in column order;
    ``fscale (N, C)`` float64; ``shapes (N, 2)`` the maps' ``(H, W)``. RAM: 18 bytes per kept cell + 8·C bytes
    per image (:attr:`nbytes`).
    """

    channels: int
    alpha: float
    shapes: np.ndarray
    offsets: np.ndarray
    c: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    w: torch.Tensor
    fscale: torch.Tensor
    xorder: torch.Tensor  #: (n,) int32: each image's cells in column order (indices within the image)
    rowptr: list  #: per image (H + 1,) int32: where each row's cells start (within the image)
    colptr: list  #: per image (W + 1,) int32: where each column's cells start in ``xorder``

    def __len__(self) -> int:
        return int(self.shapes.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.shapes.nbytes + sum(t.numel() * t.element_size()
                                                                  for t in (self.c, self.y, self.x, self.w, self.fscale,
                                                                            self.xorder, *self.rowptr, *self.colptr)))

    @classmethod
    def build(cls, maps: Iterable, alpha: float = 10.0) -> "AMLFineMaps":
        """From non-negative ``(C, H, W)`` maps or :class:`~instance_search.ops.integral.SparseMap` (sizes may
        differ, channels may not; below 32768 cells a side), one at a time."""
        cs, ys, xs, ws, fs, xo, rp, cp, counts, shapes = [], [], [], [], [], [], [], [], [], []
        C = None
        for i, m in enumerate(maps):
            sh = map_shape(m)
            if len(sh) != 3:
                raise InputError(f"maps[{i}] must be (C, H, W), got shape {sh}")
            if C is None:
                C = sh[0]
            if sh[0] != C:
                raise InputError(f"maps[{i}] has {sh[0]} channels, maps[0] has {C}")
            if max(sh[1:]) >= 2 ** 15:
                raise InputError(f"maps[{i}] is {sh[1]}x{sh[2]} cells: too large for int16 positions")
            sp = sparse_batch([m], alpha)
            o = torch.argsort(sp.y * sh[2] + sp.x, stable=True)  # raster order: rows are contiguous
            y, x = sp.y[o], sp.x[o]
            cs.append(sp.c[o].to(torch.int16))
            ys.append(y.to(torch.int16))
            xs.append(x.to(torch.int16))
            ws.append(sp.w[o])
            xo.append(torch.argsort(x * sh[1] + y, stable=True).to(torch.int32))
            rp.append(torch.searchsorted(y, torch.arange(sh[1] + 1)).to(torch.int32))
            cp.append(torch.searchsorted(torch.sort(x).values, torch.arange(sh[2] + 1)).to(torch.int32))
            fs.append(sp.fscale)
            counts.append(int(sp.w.numel()))
            shapes.append(sh[1:])
        if C is None:
            raise InputError("maps: no maps given")
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(C, float(alpha), np.asarray(shapes, np.int64).reshape(-1, 2), offsets, torch.cat(cs),
                   torch.cat(ys), torch.cat(xs), torch.cat(ws), torch.cat(fs), torch.cat(xo), rp, cp)

    def _check(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not len(rows):
            raise InputError("no rows given")
        if rows.min() < 0 or rows.max() >= len(self):
            raise InputError(f"rows must index the {len(self)} images of the fine maps")
        hw = self.shapes[rows]
        if (hw != hw[0]).any():
            raise InputError("a fine batch needs maps of one size")
        return rows

    def batch(self, rows, y0=None, y1=None) -> SparseBatch:
        """The :class:`~instance_search.ops.integral.SparseBatch` of images ``rows`` (all of one size), only
        their cells in rows ``y0[i] … y1[i]-1`` when given (windows within those rows have the same sums)."""
        rows = self._check(rows)
        H, W = (int(v) for v in self.shapes[rows[0]])
        rp = [self.rowptr[r] for r in rows.tolist()]
        y0 = np.zeros(len(rows), np.int64) if y0 is None else np.clip(np.asarray(y0, np.int64), 0, H)
        y1 = np.full(len(rows), H, np.int64) if y1 is None else np.clip(np.asarray(y1, np.int64), 0, H)
        starts = self.offsets[rows] + np.asarray([int(p[a]) for p, a in zip(rp, y0.tolist())], np.int64)
        ends = self.offsets[rows] + np.asarray([int(p[a]) for p, a in zip(rp, y1.tolist())], np.int64)
        lens = np.maximum(ends - starts, 0)
        spans = list(zip(starts.tolist(), np.maximum(ends, starts).tolist()))

        def cat(t: torch.Tensor) -> torch.Tensor:  # one copy of the images' contiguous runs
            return torch.cat([t[i:j] for i, j in spans])

        tl = torch.from_numpy(lens)
        b = torch.repeat_interleave(torch.arange(len(rows)), tl)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), tl.cumsum(0)])
        return SparseBatch((len(rows), self.channels, H, W), b, cat(self.c).long(), cat(self.y).long(),
                           cat(self.x).long(), cat(self.w), self.fscale[torch.from_numpy(rows)], offsets, self.alpha)

    def strips(self, rows) -> tuple[SparseBatch, CellOrder]:
        """The cells of images ``rows`` (sizes may differ) as :func:`~instance_search.ops.integral.refine_strips`
        reads them: the stored arrays themselves (nothing copied; ``b`` and ``offsets`` unset) and where each
        image's rows and columns lie in them (:class:`~instance_search.ops.integral.CellOrder`)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not len(rows) or rows.min() < 0 or rows.max() >= len(self):
            raise InputError(f"rows must index the {len(self)} images of the fine maps")
        hw = self.shapes[rows]
        H, W = (int(v) for v in hw.max(0))
        first = torch.from_numpy(self.offsets[rows])
        cells = SparseBatch((len(rows), self.channels, H, W), None, self.c, self.y, self.x, self.w,
                            self.fscale[torch.from_numpy(rows)], None, self.alpha)

        def padded(ptrs, n):  # (B, n + 1), each padded with its last entry
            return torch.stack([torch.cat([p, p[-1:].expand(n + 1 - len(p))]) for p in ptrs]).long() + first[:, None]

        rowptr = padded([self.rowptr[r] for r in rows.tolist()], H)
        colptr = padded([self.colptr[r] for r in rows.tolist()], W)
        return cells, CellOrder(rowptr, colptr, self.xorder, first, torch.from_numpy(hw))


def _edges(w: np.ndarray) -> np.ndarray:
    """``(x1, y1, x2, y2)`` of ``(..., 4)`` rows ``(x, y, w, h)``."""
    return np.concatenate([w[..., :2], w[..., :2] + w[..., 2:]], -1)


def fine_candidates(H: int, W: int, proposals, valid, radius: int, t: int = 3, aspect: float | None = None,
                    s: float = 1.1, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The windows of the exact AML grid ``sample_windows(H, W, t, aspect, s)`` near each map's proposals.

    ``proposals (B, k, 4)`` windows ``(x, y, w, h)`` in map cells, ``valid (B, k)`` which exist; a grid window
    is kept for map ``b`` when each of its borders is within ``radius`` cells of the same border of one valid
    proposal. Returns ``(candidates (B, m, 4), ok (B, m))``: kept windows in grid order, padded; a map with
    none gets its first valid proposal.
    """
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius}")
    P = np.asarray(proposals, np.int64)
    V = np.asarray(valid, bool)
    if P.ndim != 3 or P.shape[2] != 4 or V.shape != P.shape[:2]:
        raise ValueError(f"proposals must be (B, k, 4) with valid (B, k), got {P.shape} and {V.shape}")
    if not V.any(1).all():
        raise ValueError("every map needs at least one valid proposal")
    wins = sample_windows(H, W, t, aspect, s)
    we = _edges(wins)  # (N, 4)
    pe = _edges(P)  # (B, k, 4)
    B = len(P)
    sel = np.zeros((B, len(wins)), bool)
    for b0 in range(0, B, chunk):
        d = np.abs(we[None, None] - pe[b0:b0 + chunk, :, None])  # (nb, k, N, 4)
        near = (d <= radius).all(-1) & V[b0:b0 + chunk, :, None]
        sel[b0:b0 + chunk] = near.any(1)
    counts = sel.sum(1)
    m = max(int(counts.max()) if B else 0, 1)
    order = np.argsort(~sel, axis=1, kind="stable")[:, :m]
    cand = wins[order] if len(wins) else np.zeros((B, m, 4), np.int64)
    ok = np.take_along_axis(sel, order, 1) if len(wins) else np.zeros((B, m), bool)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        first = V[empty].argmax(1)
        cand[empty, 0] = P[empty, first]
        ok[empty, 0] = True
    return cand, ok


def rerank_aml_c2f(
    query_vec,
    maps: Sequence,
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
) -> RerankResult:
    """Re-rank a short list by coarse-to-fine AML (module docstring).

    ``maps``: the short list's full-resolution maps (dense or :class:`~instance_search.ops.integral.SparseMap`),
    in the order of ``rows``, their rows in the coarse ``store`` (:class:`~.aml_fast.AMLInvertedMaps` of the
    same maps); ``top``, ``radius`` (default: the store's ``g``): proposals per map and how far the fine grid
    windows may lie from them; ``K``, ``step``: the coarse search (:func:`~.aml_fast.aml_fast_search`); ``t``,
    ``s``, ``query_aspect``, ``alpha``, ``refine_*``: exact AML's (:func:`~.aml.rerank_aml`), as are the scoring
    arguments ``whitening``, ``exact``, ``finalize``, ``query_global``, ``levels``, ``finalize_batch``.
    ``verify``: the fine candidates of each map are ranked by exact AML's fast float32 pass and the ``verify``
    best scored exactly (``0``: all exactly; :func:`~instance_search.ops.integral.aml_search_candidates`).
    ``fine``: the maps' α-powered non-zeros kept in RAM (:class:`AMLFineMaps`, indexed by the same ``rows`` as
    ``store``): then they are read from there instead of from ``maps`` (which still give the sizes and, for
    exact MAC scoring, the window maxima). ``n_windows`` counts the coarse and the fine windows scored.
    """
    if int(top) != top or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top}")
    radius = int(store.g) if radius is None else radius
    q, maps, groups, qg, qw = prepare_rerank(query_vec, maps, finalize, query_global, whitening)
    rows = np.asarray(rows, np.int64).reshape(-1)
    n = len(maps)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} store rows for {n} maps")
    if n and (rows.min() < 0 or rows.max() >= len(store)):
        raise ValueError(f"rows must index the store's {len(store)} images")
    if fine is not None and (len(fine) != len(store) or fine.alpha != float(alpha)):
        raise InputError(f"fine maps: {len(fine)} images at alpha={fine.alpha}, the store has {len(store)} and "
                         f"alpha is {alpha}")
    for i, X in enumerate(maps):
        if tuple(map_shape(X)[1:]) != tuple(int(v) for v in store.shapes[rows[i]]):
            raise ValueError(f"map {i} is {map_shape(X)[1:]}, its store row {rows[i]} holds a "
                             f"{tuple(int(v) for v in store.shapes[rows[i]])} map: not the same image")
    scores = np.zeros(n)
    boxes = np.zeros((n, 4), dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    vectors: list[np.ndarray | None] = [None] * n
    if n == 0:
        return RerankResult(scores, boxes, order_by_score(scores, shortlist_scores), counts, None)
    _, _, n_coarse, props, pok = aml_fast_search(store, rows, q.numpy(), K=K, query_aspect=query_aspect, s=s,
                                                 step=step, exact_score=False, top=int(top))
    # the fast pass's residual table only for float maps (compact codes are clipped: as exact AML's `fine`)
    residual = not all(isinstance(m, SparseMap) for m in maps)
    if fine is not None:
        # candidates per map size (from the rows they span), then ONE table-free refinement of every map
        qn = l2n(torch.as_tensor(np.asarray(q.numpy(), dtype=np.float64)).reshape(-1))  # as the candidates'
        edges = torch.zeros(n, 4, dtype=torch.int64)
        best = torch.zeros(n, dtype=torch.float64)
        n_eval = torch.zeros(n, dtype=torch.int64)
        sums = torch.zeros(n, store.channels, dtype=torch.float64)
        for (H, W), idx in groups.items():
            cand, ok = fine_candidates(H, W, props[idx], pok[idx], radius, t, query_aspect, s)
            ry = np.where(ok, cand[..., 1], H).min(1), np.where(ok, cand[..., 1] + cand[..., 3], 0).max(1)
            ti = torch.as_tensor(idx)
            edges[ti], best[ti], n_eval[ti], sums[ti] = aml_search_candidates(
                fine.batch(rows[idx], *ry), q.numpy(), cand, ok, alpha=alpha, verify=int(verify), return_state=True,
                residual=residual, chunk=4)
        cells, order = fine.strips(rows)
        refine_strips(cells, order, edges, best, n_eval, sums, qn, refine_steps, refine_rounds)
        all_wins = torch.stack([edges[:, 0], edges[:, 1], edges[:, 2] - edges[:, 0], edges[:, 3] - edges[:, 1]],
                               1).numpy()
        for (H, W), idx in groups.items():
            wins = all_wins[idx]
            boxes[idx], counts[idx] = wins, n_eval.numpy()[idx] + n_coarse[idx]
            sp = fine.batch(rows[idx], wins[:, 1], wins[:, 1] + wins[:, 3])  # the windows' own rows
            score_windows(maps, idx, wins, best.numpy()[idx], sp, q, scores, vectors, whitening=whitening,
                          exact=exact, finalize=finalize, query_global=qg, levels=levels,
                          finalize_batch=finalize_batch, qw=qw)
    else:
        for (H, W), idx in groups.items():
            cand, ok = fine_candidates(H, W, props[idx], pok[idx], radius, t, query_aspect, s)
            wins, sc, cnt, sp = aml_search_candidates([maps[i] for i in idx], q.numpy(), cand, ok, alpha=alpha,
                                                      refine_steps=refine_steps, refine_rounds=refine_rounds,
                                                      verify=int(verify), residual=residual, chunk=4)
            boxes[idx], counts[idx] = wins, cnt + n_coarse[idx]
            score_windows(maps, idx, wins, sc, sp, q, scores, vectors, whitening=whitening, exact=exact,
                          finalize=finalize, query_global=qg, levels=levels, finalize_batch=finalize_batch, qw=qw)
    vecs = np.stack(vectors) if all(v is not None for v in vectors) else None
    return RerankResult(scores, boxes, order_by_score(scores, shortlist_scores), counts, vecs)
