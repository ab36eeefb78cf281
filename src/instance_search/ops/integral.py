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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
]

_REL_TOL = 1e-14  # window sums below this fraction of the channel total are float64 cancellation noise
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
        tol = _REL_TOL * t[-1]  # channel totals
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
    c, h, w = t.shape
    wins = _windows(windows, h, w)
    src = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
    out = torch.empty(wins.shape[0], c, dtype=src.dtype)
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


def _grid_1d(n: int, step: int) -> list[tuple[int, int]]:
    """(start, size) along one axis: sizes n, n-step, ... >= 1; starts 0, step, ... plus the last start."""
    out = []
    for size in range(n, 0, -step):
        starts = list(range(0, n - size + 1, step))
        if starts[-1] != n - size:
            starts.append(n - size)
        out.extend((s, size) for s in starts)
    return out


def sample_windows(H: int, W: int, step: int = 3, aspect: float | None = None, s: float = 1.1) -> np.ndarray:
    """AML window sampling (Tolias et al. 2016, Sec. 5.2): ``(N, 4)`` int64 rows ``(x, y, w, h)``.

    Widths and heights run down from the full map size in steps of ``step`` cells and positions run in steps of
    ``step`` (plus the position touching the far border). With ``aspect`` (query width / height), windows whose
    aspect ratio ``w/h`` differs from it by more than a factor ``s`` are discarded; if that leaves nothing (a
    coarse grid), the windows with the closest aspect ratio (within a factor ``s`` of the best) are kept.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if H < 1 or W < 1:
        return np.zeros((0, 4), dtype=np.int64)
    gx = torch.tensor(_grid_1d(W, step), dtype=torch.int64)
    gy = torch.tensor(_grid_1d(H, step), dtype=torch.int64)
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
    return qt / qt.norm().clamp_min(1e-300)


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
    refine_rounds: int = 5,
    query_aspect: float | None = None,
    chunk: int = 2048,
) -> tuple[tuple[int, int, int, int], float, int]:
    """Approximate max-pooling localisation, AML (Tolias et al. 2016, Sec. 5.2).

    Scores (Eq. 4) the windows of :func:`sample_windows` (step ``t``, aspect within factor ``s`` of
    ``query_aspect`` = query width / height when given), then refines the best one by coordinate descent on its
    borders ``(x1, y1, x2, y2)``: each border in turn tries every shift of up to ``±refine_steps`` cells and
    keeps the best; at most ``refine_rounds`` rounds, stopping after a round without improvement (the aspect
    constraint is not enforced during refinement). ``X_or_ii``: a ``(C, H, W)`` map or a :class:`PowerIntegral`;
    ``alpha``: 10 for a map, the integral's own when ``None``.
    Returns ``((x, y, w, h), score, n_windows_evaluated)``.
    """
    pi = _as_integral(X_or_ii, alpha)
    H, W = pi.height, pi.width
    if H < 1 or W < 1:
        raise ValueError("empty feature map")
    qn = _query(q, pi.channels)
    wins = torch.from_numpy(sample_windows(H, W, t, query_aspect, s))
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


def batch_power_integral(X: torch.Tensor, alpha: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Integral images of ``B`` same-size maps at once: ``(table (B, (H+1)(W+1), C) float64, scale (B, C))``,
    laid out as :class:`PowerIntegral` (per-channel max scaling, Tolias et al. 2016 Sec. 5.1).

    The powers are taken in float32 (values in [0, 1]) and summed in float64; the table is channel-last so that
    the four corner look-ups of a window are contiguous rows.
    """
    B, C, H, W = X.shape
    x = X.to(torch.float32)
    scale = x.reshape(B, C, -1).amax(2) if H * W else torch.zeros(B, C)
    scale = torch.where(scale > 0, scale, torch.ones(()))
    r = x / scale[:, :, None, None]
    # values with r^alpha < 1e-15 are below the float64 noise floor of the window sums (_REL_TOL, relative to
    # the channel maximum 1), and in float32 such powers can be denormal numbers, ~100x slower on x86: zero them.
    r = torch.where(r >= 1e-15 ** (1.0 / alpha), r, torch.zeros((), dtype=r.dtype))
    p = _ipow(r, alpha).to(torch.float64)
    ii = torch.zeros(B, H + 1, W + 1, C, dtype=torch.float64)
    ii[:, 1:, 1:] = p.cumsum(3).cumsum(2).permute(0, 2, 3, 1)
    return ii.reshape(B, -1, C), scale.to(torch.float64)


def _batch_vectors(table: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """``f̃`` of windows given by corner indices ``idx (B, N, 4)`` (y2x2, y1x2, y2x1, y1x1): ``(B, N, C)``."""
    B = table.shape[0]
    b = torch.arange(B)[:, None]
    s = table[b, idx[..., 0]] - table[b, idx[..., 1]] - table[b, idx[..., 2]] + table[b, idx[..., 3]]
    tol = _REL_TOL * table[:, -1:, :]
    s = torch.where(s > tol, s, torch.zeros((), dtype=s.dtype))
    return s.to(torch.float32).pow(1.0 / alpha) * scale[:, None, :].to(torch.float32)


def _corners(wins: torch.Tensor, W: int) -> torch.Tensor:
    x1, y1, ww, hh = wins.unbind(-1)
    x2, y2, st = x1 + ww, y1 + hh, W + 1
    return torch.stack([y2 * st + x2, y1 * st + x2, y2 * st + x1, y1 * st + x1], -1)


def _cos(f: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
    return (f @ qn) / f.norm(dim=-1).clamp_min(1e-30)


def aml_search_batch(
    maps,
    q,
    t: int = 3,
    s: float = 1.1,
    alpha: float = 10.0,
    refine_steps: int = 3,
    refine_rounds: int = 5,
    query_aspect: float | None = None,
    max_bytes: int = 256 << 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]:
    """AML (Tolias et al. 2016, Sec. 5.2) for many same-size maps ``(B, C, H, W)`` at once.

    Same search as :func:`aml_search` (same sampled windows, same coordinate descent), vectorised over the
    images; the scores are computed in float32 after float64 window sums (``max_bytes`` bounds the work
    buffer). Returns ``(windows (B, 4), scores (B,), n_evaluated (B,), [(table, scale) per chunk])`` — the
    integral images, so that callers can pool further regions of the found windows (R-MAC of the window).
    """
    X = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
    if X.ndim != 4:
        raise ValueError(f"maps must be (B, C, H, W), got shape {tuple(X.shape)}")
    B, C, H, W = X.shape
    if H < 1 or W < 1:
        raise ValueError("empty feature maps")
    qt = torch.as_tensor(np.asarray(q, dtype=np.float32)).reshape(-1)
    if qt.shape[0] != C:
        raise ValueError(f"query has {qt.shape[0]} dimensions, the maps have {C} channels")
    qn = qt / qt.norm().clamp_min(1e-30)
    wins = torch.from_numpy(sample_windows(H, W, t, query_aspect, s))
    cw = _corners(wins, W)
    N = wins.shape[0]
    per_image = (H + 1) * (W + 1) * C * 8 * 2 + N * C * 8 * 2
    chunk = max(1, min(B, int(max_bytes // max(per_image, 1))))
    out_w = np.zeros((B, 4), np.int64)
    out_s = np.zeros(B)
    out_n = np.zeros(B, np.int64)
    integrals = []
    limits = torch.tensor([W, H, W, H])
    for b0 in range(0, B, chunk):
        table, scale = batch_power_integral(X[b0:b0 + chunk], alpha)
        nb = table.shape[0]
        integrals.append((table, scale))
        sc = _cos(_batch_vectors(table, scale, cw.expand(nb, N, 4), alpha), qn)  # (nb, N)
        best_s, j = sc.max(1)
        best = wins[j]
        edges = torch.stack([best[:, 0], best[:, 1], best[:, 0] + best[:, 2], best[:, 1] + best[:, 3]], 1)
        n_eval = torch.full((nb,), N, dtype=torch.int64)
        active = torch.ones(nb, dtype=torch.bool)
        shifts = torch.tensor([d for d in range(-refine_steps, refine_steps + 1) if d != 0], dtype=torch.int64)
        for _ in range(int(refine_rounds)):
            improved = torch.zeros(nb, dtype=torch.bool)
            for k in range(4):
                cand = edges[:, None, :].repeat(1, len(shifts), 1)
                cand[:, :, k] += shifts
                ok = (cand[:, :, k] >= 0) & (cand[:, :, k] <= limits[k]) & (cand[:, :, 0] < cand[:, :, 2]) & \
                    (cand[:, :, 1] < cand[:, :, 3]) & active[:, None]
                cwin = torch.stack([cand[..., 0], cand[..., 1], cand[..., 2] - cand[..., 0],
                                    cand[..., 3] - cand[..., 1]], -1)
                cwin = torch.where(ok[..., None], cwin, torch.tensor([0, 0, 1, 1]))
                cs = _cos(_batch_vectors(table, scale, _corners(cwin, W), alpha), qn)
                cs = torch.where(ok, cs, torch.full((), -2.0))
                n_eval += ok.sum(1)
                v, jj = cs.max(1)
                better = v > best_s.to(v.dtype) + 1e-6
                if bool(better.any()):
                    best_s = torch.where(better, v, best_s)
                    edges = torch.where(better[:, None], cand[torch.arange(nb), jj], edges)
                    improved |= better
            active &= improved
            if not bool(active.any()):
                break
        sl = slice(b0, b0 + nb)
        out_w[sl] = torch.stack([edges[:, 0], edges[:, 1], edges[:, 2] - edges[:, 0], edges[:, 3] - edges[:, 1]],
                                1).numpy()
        out_s[sl] = best_s.numpy()
        out_n[sl] = n_eval.numpy()
    return out_w, out_s, out_n, integrals
