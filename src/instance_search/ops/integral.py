"""Integral max-pooling and approximate max-pooling localisation (AML).

Tolias, Sicre & Jégou 2016, "Particular object retrieval with integral max-pooling of CNN activations"
(ICLR), Sec. 5:

* generalised mean (Eq. 3): ``f̃_{R,i} = (Σ_{p∈R} X_i(p)^α)^{1/α}`` tends to the max-pooled value
  ``f_{R,i} = max_{p∈R} X_i(p)`` as ``α → ∞``; the sums of ``X_i^α`` over any rectangle come from four
  look-ups in an integral image of ``X_i^α`` (Viola & Jones 2001), so every window costs ``O(C)``;
* window score (Eq. 4): cosine between ``f̃_R`` and the query's MAC vector ``q``;
* AML (Sec. 5.2): score uniformly sampled windows (step ``t`` cells, aspect ratio within a factor ``s`` of the
  query's), keep the best and refine its four borders by coordinate descent.

Windows are integer rows ``(x, y, w, h)`` in feature-map cells: 0-indexed left column ``x`` and top row ``y``,
width ``w`` and height ``h`` (the convention of :func:`instance_search.ops.pooling.rmac_regions`); the window
covers columns ``x … x+w-1`` and rows ``y … y+h-1``.

Numerical safety. ``X^α`` overflows float32 for conv5 activations (``100^10 = 1e20``, summed over thousands of
cells) and loses every small value to the largest one. :func:`power_integral` therefore divides each channel by
its own maximum ``s_i`` (so ``(X_i/s_i)^α ∈ [0, 1]``), accumulates in float64, and keeps ``s`` to rescale:
``f̃_{R,i} = s_i · (Σ_{p∈R} (X_i(p)/s_i)^α)^{1/α}``. Window sums are differences of four integral-image entries
of size up to ``H·W``, so values below ~1e-14 of the channel total are rounding noise; they are set to zero
(otherwise the ``1/α`` root would turn 1e-15 noise into ``0.03·s_i``). This puts a floor of about
``s_i · (1e-14 · total_i)^{1/α}`` under the values a window can resolve: ~0.04·s_i at α = 10 (the paper's value),
but ~0.2·s_i at α = 20, so large α buys nothing here.

Maps may be numpy or torch; vectors and scores come back as the kind of the map given to
:func:`power_integral` (windows always as numpy ``int64``).

Re-ranking many images: :func:`aml_search_batch` runs the same search on many same-size maps from their
non-zero cells only (dense maps or :class:`SparseMap`, e.g. decoded compact codes), without building any
``(C, H+1, W+1)`` integral image; see the comment above it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .normalize import l2n

__all__ = [
    "PowerIntegral",
    "power_integral",
    "window_maxpool_approx",
    "exact_window_max",
    "window_max",
    "all_windows",
    "sample_windows",
    "window_scores",
    "aml_search",
    "exhaustive_search",
    "window_iou",
    "SparseMap",
    "REL_TOL",
    "root_lookup",
    "SparseBatch",
    "sparse_batch",
    "map_shape",
    "aml_search_batch",
]

REL_TOL = 1e-14  # window sums below this fraction of the channel total are float64 cancellation noise
# (measured: at most 1.5e-15 of the total on maps up to 100x100)


# ----------------------------------------------------------------------------------------------- helpers
def _map(X) -> tuple[torch.Tensor, bool]:
    is_torch = isinstance(X, torch.Tensor)
    t = X.detach().cpu() if is_torch else torch.from_numpy(np.ascontiguousarray(np.asarray(X)))
    if t.ndim != 3:
        raise ValueError(f"feature map must be (C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t, is_torch


def _windows(windows, h: int | None = None, w: int | None = None) -> torch.Tensor:
    wins = windows.detach().cpu() if isinstance(windows, torch.Tensor) else torch.from_numpy(np.asarray(windows))
    wins = wins.to(torch.int64)
    if wins.numel() == 0:
        return wins.reshape(0, 4)
    if wins.ndim == 1:
        wins = wins[None]
    if wins.ndim != 2 or wins.shape[1] != 4:
        raise ValueError(f"windows must be (N, 4) rows (x, y, w, h), got shape {tuple(wins.shape)}")
    x, y, ww, hh = wins.unbind(1)
    bad = (x < 0) | (y < 0) | (ww < 1) | (hh < 1)
    if w is not None:
        bad |= x + ww > w
    if h is not None:
        bad |= y + hh > h
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"window {wins[i].tolist()} (x, y, w, h) is empty or outside the {h}x{w} map")
    return wins


def _vec_out(t: torch.Tensor, is_torch: bool, dtype: torch.dtype):
    t = t.to(dtype)
    return t if is_torch else t.numpy()


# -------------------------------------------------------------------------------------- integral images
@dataclass(frozen=True, eq=False)
class PowerIntegral:
    """Integral images of ``(X_i / s_i)^α`` (Tolias et al. 2016, Sec. 5.1).

    ``table`` holds the integral images channel-last, flattened: ``((H+1)·(W+1), C)`` float64, so the four
    corner look-ups of many windows are row gathers; :attr:`ii` is the ``(C, H+1, W+1)`` view with
    ``ii[c, y, x] = Σ_{y'<y, x'<x} (X_c(y', x') / s_c)^α``. ``scale`` is ``s`` (``(C,)`` float64, the
    per-channel maximum; 1 for all-zero channels).
    """

    table: torch.Tensor
    scale: torch.Tensor
    alpha: float
    height: int
    width: int
    is_torch: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the original map."""
        return self.channels, self.height, self.width

    @property
    def ii(self) -> torch.Tensor:
        return self.table.T.reshape(self.channels, self.height + 1, self.width + 1)

    def window_sums(self, windows) -> torch.Tensor:
        """``Σ_{p∈R} (X_i(p)/s_i)^α`` for every window row: ``(N, C)`` float64, four look-ups each."""
        wins = _windows(windows, self.height, self.width)
        x1, y1, ww, hh = wins.unbind(1)
        x2, y2 = x1 + ww, y1 + hh
        stride = self.width + 1
        t = self.table
        s = t[y2 * stride + x2] - t[y1 * stride + x2] - t[y2 * stride + x1] + t[y1 * stride + x1]
        tol = REL_TOL * t[-1]  # channel totals
        return torch.where(s > tol, s, torch.zeros((), dtype=s.dtype))


def power_integral(X, alpha: float = 10.0) -> PowerIntegral:
    """Integral images of the α-powered, per-channel max-scaled map (Tolias et al. 2016, Sec. 5.1).

    ``X``: non-negative ``(C, H, W)`` map (numpy or torch, any float dtype incl. float16). Returns a
    :class:`PowerIntegral` (``ii`` is ``(C, H+1, W+1)``); see the module docstring for the scaling.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    t, is_torch = _map(X)
    c, h, w = t.shape
    t64 = t.to(torch.float64)
    if t64.numel() and bool((t64 < 0).any()):
        raise ValueError("power_integral needs a non-negative map (e.g. ReLU activations)")
    scale = t64.reshape(c, -1).amax(1) if h * w else torch.zeros(c, dtype=torch.float64)
    scale = torch.where(scale > 0, scale, torch.ones((), dtype=torch.float64))
    p = (t64 / scale[:, None, None]).pow(alpha)
    ii = torch.zeros(c, h + 1, w + 1, dtype=torch.float64)
    ii[:, 1:, 1:] = p.cumsum(1).cumsum(2)
    table = ii.reshape(c, -1).T.contiguous()
    out_dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    return PowerIntegral(table, scale, float(alpha), h, w, is_torch, out_dtype)


def _as_integral(X_or_ii, alpha: float | None) -> PowerIntegral:
    if isinstance(X_or_ii, PowerIntegral):
        if alpha is not None and float(alpha) != X_or_ii.alpha:
            raise ValueError(f"integral images were built for alpha={X_or_ii.alpha}, not {alpha}")
        return X_or_ii
    return power_integral(X_or_ii, 10.0 if alpha is None else alpha)


def _approx_vectors(pi: PowerIntegral, windows) -> torch.Tensor:
    return pi.window_sums(windows).pow(1.0 / pi.alpha) * pi.scale


def window_maxpool_approx(ii, windows, alpha: float | None = None):
    """Approximate max-pooled vectors ``f̃_R`` (Tolias et al. 2016, Eq. 3) of many windows: ``(N, C)``.

    ``ii``: a :class:`PowerIntegral` (or a raw ``(C, H, W)`` map, which is integrated first); ``windows``:
    ``(N, 4)`` int rows ``(x, y, w, h)``; ``alpha`` must match the one the integral images were built with
    (``None``: theirs). Four look-ups per window and channel, no loop over windows.
    """
    pi = _as_integral(ii, alpha)
    return _vec_out(_approx_vectors(pi, windows), pi.is_torch, pi.dtype)


def exact_window_max(X, windows):
    """Exact max-pooling ``max_{p∈R} X_i(p)`` of each window by a plain loop: slow reference, ``(N, C)``."""
    t, is_torch = _map(X)
    wins = _windows(windows, t.shape[1], t.shape[2])
    out = torch.empty(wins.shape[0], t.shape[0], dtype=t.dtype)
    for n, (x, y, w, h) in enumerate(wins.tolist()):
        out[n] = t[:, y : y + h, x : x + w].amax(dim=(1, 2))
    return out if is_torch else out.numpy()


def window_max(X, windows):
    """Exact max-pooling of many windows, vectorised: ``(N, C)``.

    2-D sparse table (range-maximum by doubling): ``M_{k,l}[y, x]`` is the max over the ``2^k x 2^l`` block at
    ``(y, x)``, built from ``M_{k-1,l}`` (or ``M_{k,l-1}``) by one element-wise max of two shifted copies. A
    window of size ``h x w`` with ``k = ⌊log2 h⌋``, ``l = ⌊log2 w⌋`` is the union of four such blocks anchored at
    its corners (overlap does not matter for a max), so each window costs four gathers of ``C`` values; at most
    ``⌈log2 H⌉·⌈log2 W⌉`` tables are built, only those the windows need.
    """
    t, is_torch = _map(X)
    if is_torch and X.requires_grad:  # keep the graph (RoI max-pooling, nets/rpn.py): gradient to each arg-max
        t = X
    c, h, w = t.shape
    wins = _windows(windows, h, w)
    src = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
    out = torch.empty(wins.shape[0], c, dtype=src.dtype, device=src.device)
    if wins.shape[0] == 0:
        return out if is_torch else out.numpy()
    tables: dict[tuple[int, int], torch.Tensor] = {(0, 0): src}

    def table(k: int, l: int) -> torch.Tensor:
        if (k, l) not in tables:
            if k > 0:
                m, d = table(k - 1, l), 1 << (k - 1)
                tables[(k, l)] = torch.maximum(m[:, :-d], m[:, d:])
            else:
                m, d = table(k, l - 1), 1 << (l - 1)
                tables[(k, l)] = torch.maximum(m[:, :, :-d], m[:, :, d:])
        return tables[(k, l)]

    x, y, ww, hh = wins.unbind(1)
    kk = torch.floor(torch.log2(hh.to(torch.float64))).to(torch.int64)
    ll = torch.floor(torch.log2(ww.to(torch.float64))).to(torch.int64)
    levels, inverse = torch.unique(torch.stack([kk, ll], 1), dim=0, return_inverse=True)
    for g, (k, l) in enumerate(levels.tolist()):
        sel = torch.nonzero(inverse == g)[:, 0]
        m = table(k, l)
        flat, stride = m.reshape(c, -1), m.shape[2]
        x1, y1 = x[sel], y[sel]
        x2, y2 = x1 + ww[sel] - (1 << l), y1 + hh[sel] - (1 << k)  # anchors of the far blocks
        v = torch.maximum(torch.maximum(flat[:, y1 * stride + x1], flat[:, y1 * stride + x2]),
                          torch.maximum(flat[:, y2 * stride + x1], flat[:, y2 * stride + x2]))
        out[sel] = v.T
    return out if is_torch else out.numpy()


# ------------------------------------------------------------------------------------------------ windows
def _pairs(n: int) -> torch.Tensor:
    """All (start, end) with 0 <= start < end <= n, as (K, 2)."""
    return torch.triu_indices(n + 1, n + 1, offset=1).T


def all_windows(H: int, W: int) -> np.ndarray:
    """Every window of an ``H x W`` map, ``(H(H+1)/2 · W(W+1)/2, 4)`` int64 rows ``(x, y, w, h)``."""
    xs, ys = _pairs(W), _pairs(H)
    xi = xs.repeat(ys.shape[0], 1)
    yi = ys.repeat_interleave(xs.shape[0], 0)
    out = torch.stack([xi[:, 0], yi[:, 0], xi[:, 1] - xi[:, 0], yi[:, 1] - yi[:, 0]], 1)
    return out.numpy()


def _grid_1d(n: int, step: int, grid: str = "paper") -> list[tuple[int, int]]:
    """(start, size) along one axis, starts every ``step`` cells plus the start touching the far border.

    ``grid="paper"``: sizes ``2, 2+step, 2+2·step, ... <= n`` (the sizes of Tolias et al.'s ``aml.c``, whose
    windows span rows ``i1 … i2`` with ``i2 - i1 ∈ {1, 1+t, ...}``) plus the whole axis ``n`` (1 when
    ``n = 1``); ``grid="map"``: sizes ``n, n-step, ... >= 1`` (counted down from the map size).
    """
    if grid == "paper":
        sizes = sorted(set(range(min(2, n), n + 1, step)) | {n})
    elif grid == "map":
        sizes = list(range(n, 0, -step))
    else:
        raise ValueError(f"grid must be 'paper' or 'map', got {grid!r}")
    out = []
    for size in sizes:
        starts = list(range(0, n - size + 1, step))
        if starts[-1] != n - size:
            starts.append(n - size)
        out.extend((s, size) for s in starts)
    return out


def sample_windows(H: int, W: int, step: int = 3, aspect: float | None = None, s: float = 1.1,
                   grid: str = "paper") -> np.ndarray:
    """AML window sampling (Tolias et al. 2016, Sec. 5.2): ``(N, 4)`` int64 rows ``(x, y, w, h)``.

    Along each axis (see :func:`_grid_1d`): with ``grid="paper"`` (default) the windows of the authors' grid
    (sizes ``2 + k·step``, starts ``0, step, ...``) plus, for every size, the window touching the far (right or
    bottom) border, plus the whole map, so the grid contains the original one and covers the whole map; with
    ``grid="map"`` sizes run down from the full map size in steps of ``step``. With ``aspect`` (query width /
    height), windows whose aspect ratio ``w/h`` differs from it by more than a factor ``s`` are discarded; if
    that leaves nothing (a coarse grid), the windows with the closest aspect ratio (within a factor ``s`` of the
    best) are kept.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if H < 1 or W < 1:
        return np.zeros((0, 4), dtype=np.int64)
    gx = torch.tensor(_grid_1d(W, step, grid), dtype=torch.int64)
    gy = torch.tensor(_grid_1d(H, step, grid), dtype=torch.int64)
    xi = gx.repeat(gy.shape[0], 1)
    yi = gy.repeat_interleave(gx.shape[0], 0)
    wins = torch.stack([xi[:, 0], yi[:, 0], xi[:, 1], yi[:, 1]], 1)
    if aspect is not None:
        if not aspect > 0 or not s >= 1:
            raise ValueError(f"need aspect > 0 and s >= 1, got aspect={aspect}, s={s}")
        ratio = (wins[:, 2] / wins[:, 3]).to(torch.float64) / float(aspect)
        dev = torch.maximum(ratio, 1.0 / ratio)
        keep = dev <= s * (1 + 1e-9)
        if not bool(keep.any()):
            keep = dev <= dev.min() * s * (1 + 1e-9)
        wins = wins[keep]
    return wins.numpy()


def window_iou(a, b) -> np.ndarray:
    """IoU of windows ``(x, y, w, h)`` (cells, as areas of cell sets); broadcasts ``(..., 4)`` rows."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lo = np.maximum(a[..., :2], b[..., :2])
    hi = np.minimum(a[..., :2] + a[..., 2:], b[..., :2] + b[..., 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


# ------------------------------------------------------------------------------------------------ scores
def _query(q, c: int) -> torch.Tensor:
    qt = q.detach().cpu() if isinstance(q, torch.Tensor) else torch.from_numpy(np.asarray(q, dtype=np.float64))
    qt = qt.to(torch.float64).reshape(-1)
    if qt.shape[0] != c:
        raise ValueError(f"query has {qt.shape[0]} dimensions, the map has {c} channels")
    return l2n(qt)


def _scores(pi: PowerIntegral, wins: torch.Tensor, qn: torch.Tensor, chunk: int) -> torch.Tensor:
    out = torch.empty(wins.shape[0], dtype=torch.float64)
    for i in range(0, wins.shape[0], chunk):
        f = _approx_vectors(pi, wins[i : i + chunk])
        out[i : i + chunk] = (f @ qn) / f.norm(dim=1).clamp_min(1e-300)
    return out


def window_scores(ii, windows, q, alpha: float | None = None, chunk: int = 2048):
    """Cosine similarity between ``f̃_R`` and the query vector ``q`` for many windows (Tolias et al. 2016,
    Eq. 4): ``(N,)``. Windows are processed in chunks of ``chunk`` to bound memory (``chunk · C`` doubles)."""
    pi = _as_integral(ii, alpha)
    wins = _windows(windows, pi.height, pi.width)
    s = _scores(pi, wins, _query(q, pi.channels), max(int(chunk), 1))
    return s if pi.is_torch else s.numpy()


def aml_search(
    X_or_ii,
    q,
    t: int = 3,
    s: float = 1.1,
    alpha: float | None = None,
    refine_steps: int = 3,
    refine_rounds: int = 15,
    query_aspect: float | None = None,
    chunk: int = 2048,
    windows=None,
) -> tuple[tuple[int, int, int, int], float, int]:
    """Approximate max-pooling localisation, AML (Tolias et al. 2016, Sec. 5.2).

    Scores (Eq. 4) the windows of :func:`sample_windows` (step ``t``, aspect within factor ``s`` of
    ``query_aspect`` = query width / height when given), then refines the best one by coordinate descent on its
    borders ``(x1, y1, x2, y2)``: each border in turn tries every shift of up to ``±refine_steps`` cells and
    keeps the best; at most ``refine_rounds`` rounds, stopping after a round without improvement (the aspect
    constraint is not enforced during refinement). These moves include those of the authors' ``aml.c`` (shifts
    of exactly 3, then 2, then 1 cells, 5 iterations each, windows at least 2 cells wide and high); the default
    15 rounds match its 3 × 5 iteration budget. ``X_or_ii``: a ``(C, H, W)`` map or a :class:`PowerIntegral`;
    ``alpha``: 10 for a map, the integral's own when ``None``. ``windows``: ``(n, 4)`` rows ``(x, y, w, h)`` to
    start from instead of the sampled ones (the best, ties to the first, is refined).
    Returns ``((x, y, w, h), score, n_windows_evaluated)``.
    """
    pi = _as_integral(X_or_ii, alpha)
    H, W = pi.height, pi.width
    if H < 1 or W < 1:
        raise ValueError("empty feature map")
    qn = _query(q, pi.channels)
    wins = _windows(windows, H, W) if windows is not None else torch.from_numpy(sample_windows(H, W, t, query_aspect,
                                                                                                s))
    sc = _scores(pi, wins, qn, chunk)
    n = int(wins.shape[0])
    b = int(torch.argmax(sc))
    best, best_score = wins[b].clone(), float(sc[b])
    edges = [int(best[0]), int(best[1]), int(best[0] + best[2]), int(best[1] + best[3])]
    limits = (W, H, W, H)
    for _ in range(int(refine_rounds)):
        improved = False
        for k in range(4):
            cands = []
            for d in range(-int(refine_steps), int(refine_steps) + 1):
                if d == 0:
                    continue
                e = list(edges)
                e[k] += d
                if 0 <= e[k] <= limits[k] and e[0] < e[2] and e[1] < e[3]:
                    cands.append((e[0], e[1], e[2] - e[0], e[3] - e[1]))
            if not cands:
                continue
            cw = torch.tensor(cands, dtype=torch.int64)
            cs = _scores(pi, cw, qn, chunk)
            n += len(cands)
            j = int(torch.argmax(cs))
            if float(cs[j]) > best_score + 1e-12:
                best_score = float(cs[j])
                x, y, w, h = cands[j]
                edges = [x, y, x + w, y + h]
                improved = True
        if not improved:
            break
    window = (edges[0], edges[1], edges[2] - edges[0], edges[3] - edges[1])
    return window, best_score, n


def exhaustive_search(
    X_or_ii, q, alpha: float | None = None, chunk: int = 2048
) -> tuple[tuple[int, int, int, int], float, int]:
    """Best window over all ``H(H+1)/2 · W(W+1)/2`` windows by Eq. 4 (Tolias et al. 2016, Sec. 5.1):
    ``((x, y, w, h), score, n_windows_evaluated)``."""
    pi = _as_integral(X_or_ii, alpha)
    wins = torch.from_numpy(all_windows(pi.height, pi.width))
    if wins.shape[0] == 0:
        raise ValueError("empty feature map")
    sc = _scores(pi, wins, _query(q, pi.channels), chunk)
    b = int(torch.argmax(sc))
    return tuple(int(v) for v in wins[b].tolist()), float(sc[b]), int(wins.shape[0])


# ------------------------------------------------------------------------------------- batched AML search
# Many same-size maps at once, from their non-zero cells only (Tolias et al. 2016, Sec. 5.1-5.2 and Sec. 7: the
# compact maps keep <= 64 cells per channel, so a map has ~15k non-zeros out of 1.6M cells). Nothing
# (C, H+1, W+1)-sized is built per map:
#
# * the sampled windows (step t) have their corners on a coarse set of grid lines, so one table on those lines
#   serves them all (``_grid_table``: bin the non-zeros between the lines, then prefix sums over the small grid);
# * that table is built in float64 from the cell weights ``w = (X/s)^α / total`` (so each channel sums to 1);
#   a float32 copy with every entry rounded to a multiple of 2^-23 gives window sums that are exact in float32
#   arithmetic (all partial sums lie in (-2, 2)) and within 4·2^-24 of the float64 ones; ``S^(1/α)`` comes from
#   a lookup table indexed by the float's exponent and 10 mantissa bits (relative error <= 5e-5); this fast
#   pass only ranks the windows: the ``verify`` best of each map are re-scored exactly from the float64 table,
#   and the best of those is the AML start;
# * the coordinate descent and any other windows (R-MAC regions of the result) are scored exactly from float64
#   tables on per-map grid lines: the +-refine_steps neighbourhood of each border (one table per round) or the
#   windows' own corners.

_QBITS = 23  # fast pass: table entries rounded to multiples of 2^-_QBITS (sums < 2 stay exact in float32)
_LUT_MANTISSA = 10  # fast pass: root looked up on exponent + 10 mantissa bits
_LUT_LOW = 47  # ... for sums from 2^-47 (~REL_TOL) up to 2; smaller ones count as zero
_LUTS: dict[float, torch.Tensor] = {}
_BUFFERS = threading.local()


def _zeros(slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed 1-D tensor of ``n`` elements in a per-thread buffer reused between calls (fresh multi-MB
    allocations cost a page fault per 4 kB here); valid until the next call with the same ``slot``."""
    buf = getattr(_BUFFERS, slot, None)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.zeros(2 * n, dtype=dtype)
        setattr(_BUFFERS, slot, buf)
        return buf[:n]
    return buf[:n].zero_()


class SparseMap(NamedTuple):
    """Non-zero cells of a non-negative ``(C, H, W)`` map (e.g. a decoded compact map, Tolias et al. Sec. 7):
    ``channel``, flat ``position`` (``y·W + x``) and ``value``, 1-D arrays of equal length."""

    shape: tuple[int, int, int]
    channel: np.ndarray
    position: np.ndarray
    value: np.ndarray

    def dense(self) -> np.ndarray:
        """The ``(C, H, W)`` float32 map."""
        C, H, W = self.shape
        out = np.zeros((C, H * W), np.float32)
        out[self.channel, self.position] = self.value
        return out.reshape(C, H, W)


def map_shape(X) -> tuple[int, int, int]:
    """``(C, H, W)`` of a dense map or a :class:`SparseMap`."""
    return tuple(int(v) for v in X.shape) if isinstance(X, SparseMap) else tuple(int(v) for v in np.shape(X))


@dataclass(frozen=True, eq=False)
class SparseBatch:
    """Non-zeros of ``B`` same-size maps, α-powered and normalised per channel (Tolias et al. 2016, Sec. 5.1).

    Cell weights ``w = (X_c(p)/s_c)^α / T_c`` with ``s_c`` the channel maximum and ``T_c = Σ_p (X_c(p)/s_c)^α``,
    so that the weights of a channel sum to 1; the window vector is ``f̃_{R,c} = fscale_c · (Σ_{p∈R} w_p)^{1/α}``
    with ``fscale_c = s_c · T_c^{1/α}`` (Eq. 3 rescaled exactly). Cells with ``(X/s)^α < 1e-15`` are dropped
    (below the float64 noise floor of integral images, see the module docstring). Arrays ``b, c, y, x, w``
    are sorted by map ``b``; ``offsets[b]:offsets[b+1]`` are map ``b``'s.
    """

    shape: tuple[int, int, int, int]
    b: torch.Tensor
    c: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    w: torch.Tensor
    fscale: torch.Tensor
    offsets: torch.Tensor
    alpha: float

    @property
    def maps(self) -> int:
        return self.shape[0]

    def window_vectors(self, windows, maps: Sequence[int] | None = None) -> torch.Tensor:
        """Exact ``f̃`` (float64) of windows ``(n, m, 4)`` rows ``(x, y, w, h)``, ``m`` per map of ``maps``
        (default all, in order): ``(n, m, C)``."""
        idx = list(range(self.maps)) if maps is None else [int(i) for i in maps]
        wins = torch.as_tensor(np.asarray(windows), dtype=torch.int64).reshape(len(idx), -1, 4)
        out = torch.empty(len(idx), wins.shape[1], self.shape[1], dtype=torch.float64)
        for i0 in range(0, len(idx), 16):
            sub = self._select(idx[i0:i0 + 16])
            sw = wins[i0:i0 + 16]
            ly, lx = _lines(torch.cat([sw[..., 1], sw[..., 1] + sw[..., 3]], 1), self.shape[2]), \
                _lines(torch.cat([sw[..., 0], sw[..., 0] + sw[..., 2]], 1), self.shape[3])
            table = _grid_table(sub, ly, lx, torch.float64)
            out[i0:i0 + 16] = _exact_vectors(sub, table, ly, lx, sw)
        return out

    def _select(self, maps: Sequence[int]) -> "SparseBatch":
        """The batch restricted to ``maps`` (renumbered 0..)."""
        maps = [int(i) for i in maps]
        if maps == list(range(maps[0], maps[0] + len(maps))):
            k0, k1 = int(self.offsets[maps[0]]), int(self.offsets[maps[-1] + 1])
            sl = slice(k0, k1)
            b = self.b[sl] - maps[0]
            c, y, x, w = self.c[sl], self.y[sl], self.x[sl], self.w[sl]
        else:
            sel = torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in maps])
            counts = torch.tensor([int(self.offsets[i + 1] - self.offsets[i]) for i in maps])
            b = torch.repeat_interleave(torch.arange(len(maps)), counts)
            c, y, x, w = self.c[sel], self.y[sel], self.x[sel], self.w[sel]
        counts = torch.bincount(b, minlength=len(maps))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return SparseBatch((len(maps),) + self.shape[1:], b, c, y, x, w, self.fscale[maps], offsets, self.alpha)


def _ipow(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """``p ** alpha``; integer ``alpha`` by repeated squaring (several times faster than ``pow`` on CPU)."""
    a = float(alpha)
    if a.is_integer() and 1 <= a <= 64:
        n, out, base = int(a), None, p
        while n:
            if n & 1:
                out = base if out is None else out * base
            n >>= 1
            if n:
                base = base * base
        return out
    return p.pow(a)


def _nonzeros(X, floor: float) -> tuple[np.ndarray | torch.Tensor, ...]:
    """``(channel, position, value)`` of one map's positive cells; for a dense map only those ``>= floor`` times
    their channel's maximum (the others are dropped later anyway)."""
    if isinstance(X, SparseMap):
        return X.channel, X.position, X.value
    t = X.detach().cpu() if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X))
    flat = t.reshape(t.shape[0], -1)
    if not flat.is_floating_point() or flat.dtype == torch.float16:
        flat = flat.to(torch.float32)
    if flat.numel() and bool((flat.amin(1) < 0).any()):
        raise ValueError("AML needs non-negative maps (e.g. ReLU activations)")
    thr = flat.amax(1) * floor if flat.shape[1] else torch.zeros(flat.shape[0], dtype=flat.dtype)
    ch, pos = torch.nonzero((flat >= thr[:, None]) & (flat > 0), as_tuple=True)
    return ch, pos, flat[ch, pos]


def _tensor(a) -> torch.Tensor:
    """``a`` as a tensor; a read-only array (a cached :class:`SparseMap`'s) is copied, never shared."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        return torch.from_numpy(a.copy())
    return torch.as_tensor(a)


def sparse_batch(maps: Sequence, alpha: float = 10.0) -> SparseBatch:
    """:class:`SparseBatch` of same-size maps (each a dense ``(C, H, W)`` array/tensor or a :class:`SparseMap`)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if len(maps) == 0:
        raise ValueError("no maps given")
    shape = map_shape(maps[0])
    if len(shape) != 3:
        raise ValueError(f"maps must be (C, H, W), got shape {shape}")
    C, H, W = shape
    floor = 1e-15 ** (1.0 / alpha)
    parts = []
    for i, X in enumerate(maps):
        if map_shape(X) != shape:
            raise ValueError(f"map {i} has shape {map_shape(X)}, map 0 {shape}: a batch needs equal sizes")
        parts.append(_nonzeros(X, floor))
    counts = torch.tensor([len(p[0]) for p in parts], dtype=torch.int64)
    b = torch.repeat_interleave(torch.arange(len(maps)), counts)
    ch = torch.cat([_tensor(p[0]).to(torch.int64) for p in parts])
    pos = torch.cat([_tensor(p[1]).to(torch.int64) for p in parts])
    val = torch.cat([_tensor(p[2]).to(torch.float64) for p in parts])
    if val.numel() and bool((val < 0).any()):
        raise ValueError("AML needs non-negative maps (e.g. ReLU activations)")
    bc = b * C + ch
    s = torch.zeros(len(maps) * C, dtype=torch.float64).scatter_reduce_(0, bc, val, "amax")
    s = torch.where(s > 0, s, torch.ones((), dtype=torch.float64))
    r = val / s[bc]
    keep = (r >= floor) & (r > 0)
    if not bool(keep.all()):  # cells with (X/s)^alpha < 1e-15: below the float64 noise floor of window sums
        b, ch, pos, r, bc = b[keep], ch[keep], pos[keep], r[keep], bc[keep]
        counts = torch.bincount(b, minlength=len(maps))
    p = _ipow(r, alpha)
    total = torch.zeros(len(maps) * C, dtype=torch.float64).index_add_(0, bc, p)
    w = p / total[bc]
    fscale = (s * total.pow(1.0 / alpha)).reshape(len(maps), C)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return SparseBatch((len(maps), C, H, W), b, ch, pos // W if W else pos, pos % W if W else pos, w, fscale,
                       offsets, float(alpha))


def _lines(coords: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted distinct values of each row of ``coords`` (nb, k), padded with ``n + 1`` (beyond every cell)."""
    v, _ = torch.sort(coords, 1)
    dup = torch.zeros_like(v, dtype=torch.bool)
    dup[:, 1:] = v[:, 1:] == v[:, :-1]
    v = torch.where(dup, torch.full((), n + 1, dtype=v.dtype), v)
    v, _ = torch.sort(v, 1)
    keep = int((~dup).sum(1).max()) if v.numel() else 0
    return v[:, :max(keep, 1)].contiguous()


def _bin_lut(lines: torch.Tensor, n: int) -> torch.Tensor:
    """``(nb, n)``: for each map and coordinate ``v < n``, the number of the map's grid lines ``<= v``."""
    v = torch.arange(n).expand(lines.shape[0], n).contiguous()
    return torch.searchsorted(lines.contiguous(), v, right=True)


def _grid_table(sp: SparseBatch, ly: torch.Tensor, lx: torch.Tensor, dtype: torch.dtype,
                slot: str = "exact") -> torch.Tensor:
    """``T[b, j, i, c] = Σ {w_k : map b, channel c, y_k < ly[b, j], x_k < lx[b, i]}``: ``(nb, Gy, Gx, C)``.

    ``ly (nb, Gy)``, ``lx (nb, Gx)``: sorted grid lines per map (values up to H / W; larger values are padding).
    The cells are binned between the lines (one ``index_add``; cells beyond the last line go to a spare bin),
    then summed cumulatively over the small grid. The table lives in the thread's buffer ``slot``.
    """
    nb, C, H, W = sp.shape
    Gy, Gx = ly.shape[1], lx.shape[1]
    per_map = (Gy + 1) * (Gx + 1) * C
    lut_y = (_bin_lut(ly, H) * ((Gx + 1) * C) + (torch.arange(nb) * per_map)[:, None]).reshape(-1)
    lut_x = (_bin_lut(lx, W) * C).reshape(-1)
    flat = lut_y[sp.b * H + sp.y]
    flat += lut_x[sp.b * W + sp.x]
    flat += sp.c
    t = _zeros(slot, nb * per_map, dtype).index_add_(0, flat, sp.w.to(dtype)).reshape(nb, Gy + 1, Gx + 1, C)
    for j in range(1, Gy + 1):
        t[:, j].add_(t[:, j - 1])
    for i in range(1, Gx + 1):
        t[:, :, i].add_(t[:, :, i - 1])
    return t  # (nb, Gy + 1, Gx + 1, C): the last row and column (cells beyond the lines) are never looked up


def _corner_sums(table: torch.Tensor, ly: torch.Tensor, lx: torch.Tensor, wins: torch.Tensor) -> torch.Tensor:
    """Window sums ``(nb, m, C)`` of windows ``(nb, m, 4)`` whose corners lie on the grid lines of ``table``."""
    nb, Gy, Gx, C = table.shape
    x1, y1 = wins[..., 0].contiguous(), wins[..., 1].contiguous()
    x2, y2 = x1 + wins[..., 2], y1 + wins[..., 3]
    jy1, jy2 = torch.searchsorted(ly, y1), torch.searchsorted(ly, y2)
    jx1, jx2 = torch.searchsorted(lx, x1), torch.searchsorted(lx, x2)
    base = (torch.arange(nb) * Gy * Gx)[:, None]
    flat = table.reshape(-1, C)
    s = flat[base + jy2 * Gx + jx2] - flat[base + jy1 * Gx + jx2]
    s -= flat[base + jy2 * Gx + jx1]
    s += flat[base + jy1 * Gx + jx1]
    return s


def _exact_vectors(sp: SparseBatch, table, ly, lx, wins) -> torch.Tensor:
    """``f̃`` (float64) of windows on the grid lines of a float64 ``table``; sums below ``REL_TOL`` of the
    channel total (float64 rounding noise, as :meth:`PowerIntegral.window_sums`) count as zero."""
    s = _corner_sums(table, ly, lx, wins)
    s = torch.where(s > REL_TOL, s, torch.zeros((), dtype=s.dtype))
    return s.pow_(1.0 / sp.alpha).mul_(sp.fscale[:, None, :])


def _exact_cos(f: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
    return (f @ qn) / f.norm(dim=-1).clamp_min(1e-300)


def _root_lut(alpha: float) -> torch.Tensor:
    """``S^{1/α}`` for float32 ``S`` in [2^-47, 2), by bucket of exponent + 10 mantissa bits (bucket midpoints;
    entry 0 is for ``S`` below the range, zero or negative)."""
    if alpha not in _LUTS:
        shift = 23 - _LUT_MANTISSA
        lo = (127 - _LUT_LOW) << _LUT_MANTISSA
        n = (_LUT_LOW + 1) << _LUT_MANTISSA
        starts = torch.arange(lo, lo + n + 1, dtype=torch.int32).bitwise_left_shift(shift).view(torch.float32)
        mids = (starts[:-1].double() + starts[1:].double()) / 2
        _LUTS[alpha] = torch.cat([torch.zeros(1), mids.pow(1.0 / alpha).float()])
    return _LUTS[alpha]


def root_lookup(alpha: float) -> tuple[np.ndarray, int, int]:
    """The fast pass's ``S^{1/α}`` table for float32 ``S`` as numpy, with its bit shift and base:
    ``S^{1/α} ≈ lut[clip((bits(S) >> shift) - base, 0, len(lut) - 1)]`` (:func:`_root_lut`)."""
    return _root_lut(float(alpha)).numpy(), 23 - _LUT_MANTISSA, ((127 - _LUT_LOW) << _LUT_MANTISSA) - 1


def _fast_scores(table32: torch.Tensor, corners: torch.Tensor, fscale: torch.Tensor, qn: torch.Tensor,
                 alpha: float, residual: torch.Tensor | None = None, step: int = 64) -> torch.Tensor:
    """Approximate Eq. 4 scores ``(nb, N)`` of the windows with corner rows ``corners (N, 4)``, or ``(nb, N, 4)``
    per map (flat indices in the per-map grid, order y2x2, y1x2, y2x1, y1x1) from a float32 table rounded to
    multiples of 2^-23, plus the window sums of the float32 ``residual`` (table minus its rounding) when given."""
    nb, P, C = table32.shape[0], table32.shape[1] * table32.shape[2], table32.shape[3]  # P: grid points
    per_map = corners.ndim == 3  # (nb, N, 4): each map its own windows
    weight = table32.reshape(nb * P, C)
    lut = _root_lut(alpha)
    shift = 23 - _LUT_MANTISSA
    base = ((127 - _LUT_LOW) << _LUT_MANTISSA) - 1
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0]).repeat(nb * step, 1)
    fs = fscale.to(torch.float32)[:, None, :]
    N = corners.shape[-2]
    out = torch.empty(nb, N)
    offs = (torch.arange(nb) * P)[:, None, None]
    gbuf = torch.empty(nb * step * C)
    for i in range(0, N, step):
        cw = corners[..., i:i + step, :]
        n = cw.shape[-2]
        idx = ((cw if per_map else cw[None]) + offs).reshape(-1, 4)
        s = F.embedding_bag(idx, weight, per_sample_weights=sign[:idx.shape[0]], mode="sum")
        if residual is not None:
            s += F.embedding_bag(idx, residual.reshape(nb * P, C), per_sample_weights=sign[:idx.shape[0]], mode="sum")
        k = s.view(torch.int32).bitwise_right_shift_(shift).sub_(base).clamp_(0, lut.shape[0] - 1)
        g = torch.index_select(lut, 0, k.reshape(-1), out=gbuf[:k.numel()]).reshape(nb, n, C)
        g.mul_(fs)
        out[:, i:i + n] = torch.matmul(g, qn).div_(torch.linalg.vector_norm(g, dim=2).clamp_min_(1e-30))
    return out


def _grid_index(values: np.ndarray) -> tuple[torch.Tensor, dict[int, int]]:
    v = np.unique(values)
    return torch.from_numpy(v), {int(a): i for i, a in enumerate(v)}


def aml_search_batch(
    maps,
    q,
    t: int = 3,
    s: float = 1.1,
    alpha: float = 10.0,
    refine_steps: int = 3,
    refine_rounds: int = 15,
    query_aspect: float | None = None,
    verify: int = 8,
    fine: bool | None = None,
    chunk: int = 8,
    refine_chunk: int = 64,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, SparseBatch]:
    """AML (Tolias et al. 2016, Sec. 5.2) for many same-size maps at once, from their non-zero cells.

    ``maps``: ``(B, C, H, W)`` array/tensor, a list of ``(C, H, W)`` maps or :class:`SparseMap`, or a
    :class:`SparseBatch` (built with the same ``alpha``). Same search as :func:`aml_search` (same sampled
    windows, same coordinate descent with its ``1e-12`` improvement threshold, all in float64), except that the
    sampled windows are first ranked by a fast float32 pass (see the comment above) and only the ``verify``
    best per map are scored exactly (``verify=0``: all); the start is the exact best of those (the exact best
    of all windows unless it ranks below ``verify`` in the fast pass, whose scores are within ~1e-4 of the
    exact ones; ``fine`` adds a second float32 table, the rounding residual, which brings the fast pass's
    window sums to ~1e-14 of the channel totals: needed for maps whose cells span a wide range, such as float
    maps (default: ``True`` unless every map is a :class:`SparseMap`, i.e. a compact code clipped at
    ``rho·max``)). The fast pass works on ``chunk`` maps at a time, the coordinate descent on ``refine_chunk``.
    Returns ``(windows (B, 4), scores (B,) float64, n_evaluated (B,),
    SparseBatch)``; :meth:`SparseBatch.window_vectors` pools further windows (R-MAC regions of the result).
    """
    if isinstance(maps, SparseBatch):
        sp = maps
        if sp.alpha != float(alpha):
            raise ValueError(f"the SparseBatch was built for alpha={sp.alpha}, not {alpha}")
    else:
        if isinstance(maps, (np.ndarray, torch.Tensor)) and maps.ndim != 4:
            raise ValueError(f"maps must be (B, C, H, W), got shape {tuple(maps.shape)}")
        maps = list(maps)
        if fine is None:
            fine = not all(isinstance(m, SparseMap) for m in maps)
        sp = sparse_batch(maps, alpha)
    fine_pass = True if fine is None else bool(fine)
    B, C, H, W = sp.shape
    if H < 1 or W < 1:
        raise ValueError("empty feature maps")
    qt = torch.as_tensor(np.asarray(q, dtype=np.float64)).reshape(-1)
    if qt.shape[0] != C:
        raise ValueError(f"query has {qt.shape[0]} dimensions, the maps have {C} channels")
    qn = l2n(qt)
    qn32 = qn.to(torch.float32)
    wins_np = sample_windows(H, W, t, query_aspect, s)
    wins = torch.from_numpy(wins_np)
    N = wins.shape[0]
    gy, iy = _grid_index(np.concatenate([wins_np[:, 1], wins_np[:, 1] + wins_np[:, 3]]))
    gx, ix = _grid_index(np.concatenate([wins_np[:, 0], wins_np[:, 0] + wins_np[:, 2]]))
    Gx = len(gx) + 1  # row stride of the tables (one spare column)
    jx1 = torch.tensor([ix[int(v)] for v in wins_np[:, 0]])
    jx2 = torch.tensor([ix[int(v)] for v in wins_np[:, 0] + wins_np[:, 2]])
    jy1 = torch.tensor([iy[int(v)] for v in wins_np[:, 1]])
    jy2 = torch.tensor([iy[int(v)] for v in wins_np[:, 1] + wins_np[:, 3]])
    corners = torch.stack([jy2 * Gx + jx2, jy1 * Gx + jx2, jy2 * Gx + jx1, jy1 * Gx + jx1], 1)
    edges = torch.zeros(B, 4, dtype=torch.int64)  # (x1, y1, x2, y2) of the current best window
    best_s = torch.zeros(B, dtype=torch.float64)
    n_eval = torch.full((B,), N, dtype=torch.int64)
    step = max(int(chunk), 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * B, desc="AML", unit="map")
    for b0 in range(0, B, step):
        # fast pass over the sampled windows, exact scores for the best `verify` of each map
        sub = sp._select(range(b0, min(b0 + step, B)))
        nb = sub.maps
        lyg, lxg = gy.expand(nb, -1).contiguous(), gx.expand(nb, -1).contiguous()
        t64 = _grid_table(sub, lyg, lxg, torch.float64, slot="fast")
        t32 = torch.round(t64 * 2.0 ** _QBITS).to(torch.float32).mul_(2.0 ** -_QBITS)
        res32 = (t64 - t32.to(torch.float64)).to(torch.float32) if fine_pass else None
        approx = _fast_scores(t32, corners, sub.fscale, qn32, sub.alpha, res32)
        del t32, res32
        k = min(int(verify), N) if verify else N
        top = approx.topk(k, dim=1).indices
        cand = wins[top]  # (nb, k, 4)
        exact = _exact_cos(_exact_vectors(sub, t64, lyg, lxg, cand), qn)
        bs, j = _first_max(exact, top)
        best = cand[torch.arange(nb), j]
        edges[b0:b0 + nb] = torch.stack([best[:, 0], best[:, 1], best[:, 0] + best[:, 2], best[:, 1] + best[:, 3]], 1)
        best_s[b0:b0 + nb] = bs
        if bar is not None:
            bar.update(nb)
    _refine(sp, edges, best_s, n_eval, qn, refine_steps, refine_rounds, refine_chunk, bar)
    if bar is not None:
        bar.close()
    out_w = torch.stack([edges[:, 0], edges[:, 1], edges[:, 2] - edges[:, 0], edges[:, 3] - edges[:, 1]], 1)
    return out_w.numpy(), best_s.numpy(), n_eval.numpy(), sp



def _first_max(scores: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the maximum of ``scores (nb, k)`` and its column; ties go to the smallest ``order`` (the
    windows' index in the sampled list), so the start does not depend on how candidates were ordered."""
    bs = scores.max(1).values
    key = torch.where(scores == bs[:, None], order, torch.full((), torch.iinfo(torch.int64).max))
    return bs, key.argmin(1)


def _refine(sp: SparseBatch, edges: torch.Tensor, best_s: torch.Tensor, n_eval: torch.Tensor, qn: torch.Tensor,
            refine_steps: int, refine_rounds: int, refine_chunk: int, bar=None) -> None:
    """AML coordinate descent (Tolias et al. 2016, Sec. 5.2) in place on ``edges (B, 4)`` rows
    ``(x1, y1, x2, y2)``, their exact scores ``best_s`` and counts ``n_eval``: see :func:`aml_search`."""
    B, C, H, W = sp.shape
    shifts = torch.tensor([d for d in range(-refine_steps, refine_steps + 1) if d != 0], dtype=torch.int64)
    nbhd = torch.arange(-refine_steps, refine_steps + 1)
    limits = torch.tensor([W, H, W, H])
    # coordinate descent, `refine_chunk` maps at a time; one float64 table per round, for the maps still
    # improving, on the +-refine_steps neighbourhood of each border
    rstep = max(int(refine_chunk), 1)
    for b0 in range(0, B, rstep):
        sub = sp._select(range(b0, min(b0 + rstep, B)))
        sl = slice(b0, b0 + sub.maps)
        active = torch.ones(sub.maps, dtype=torch.bool)
        for _ in range(int(refine_rounds)):
            act = torch.nonzero(active)[:, 0]
            na = len(act)
            if na == 0:
                break
            asub = sub if na == sub.maps else sub._select(act.tolist())
            e = edges[sl][act]
            ly = _lines(torch.cat([(e[:, 1:2] + nbhd).clamp(0, H), (e[:, 3:4] + nbhd).clamp(0, H)], 1), H)
            lx = _lines(torch.cat([(e[:, 0:1] + nbhd).clamp(0, W), (e[:, 2:3] + nbhd).clamp(0, W)], 1), W)
            table = _grid_table(asub, ly, lx, torch.float64)
            bs = best_s[sl][act]
            ne = n_eval[sl][act]
            improved = torch.zeros(na, dtype=torch.bool)
            for kk in range(4):
                cnd = e[:, None, :].repeat(1, len(shifts), 1)
                cnd[:, :, kk] += shifts
                ok = (cnd[:, :, kk] >= 0) & (cnd[:, :, kk] <= limits[kk]) & (cnd[:, :, 0] < cnd[:, :, 2]) & \
                    (cnd[:, :, 1] < cnd[:, :, 3])
                cnd = torch.where(ok[..., None], cnd, e[:, None, :])
                cwin = torch.stack([cnd[..., 0], cnd[..., 1], cnd[..., 2] - cnd[..., 0], cnd[..., 3] - cnd[..., 1]],
                                   -1)
                cs = _exact_cos(_exact_vectors(asub, table, ly, lx, cwin), qn)
                cs = torch.where(ok, cs, torch.full((), -2.0, dtype=cs.dtype))
                ne = ne + ok.sum(1)
                v, jj = cs.max(1)
                better = v > bs + 1e-12
                if bool(better.any()):
                    bs = torch.where(better, v, bs)
                    e = torch.where(better[:, None], cnd[torch.arange(na), jj], e)
                    improved |= better
            idx = act + b0
            best_s[idx], edges[idx], n_eval[idx] = bs, e, ne
            active[act] = improved
        if bar is not None:
            bar.update(sub.maps)
