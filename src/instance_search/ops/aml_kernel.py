"""Compiled AML fine search (Tolias, Sicre & Jégou 2016, Sec. 5; issue 14, item 1), one map at a time.

The batched torch search of :mod:`.integral` spends most of its time in temporaries: tables of every window ×
every channel, float64 roots of every channel sum. This module does the same maths in loops compiled by Numba,
on each map's α-powered non-zero cells kept in raster order (``w = (X/s)^α / T`` per channel, Eq. 3 rescaled as
in :class:`~.integral.SparseBatch`):

* :func:`fine_search`: every candidate window of a map scored exactly by Eq. 4 (window sums from an integral
  table over the candidates' own border lines, ``f̃_c = fscale_c · S_c^{1/α}``, cosine with the query's MAC),
  then the best refined by AML's coordinate descent (each border in turn, every shift of up to ``±steps``
  cells, kept when the score improves by more than 1e-12; rounds until none does), the window sums updated by
  the strip of cells a move adds or removes, and only the channels that strip touches re-rooted;
* :func:`window_vectors`: ``f̃`` of given windows (the R-MAC regions of the localised windows).

``S^{1/α}`` is computed from the float64 bits (:func:`root_tables`): ``S = m·2^e`` with ``m ∈ [1, 2)``,
``m = m_k (1 + t)`` for the bucket ``m_k`` of m's first 10 mantissa bits (``t < 2^-10``), so
``S^{1/α} = 2^{e/α} · m_k^{1/α} · (1 + t)^{1/α}``: two tabled factors and the binomial series to ``t^6``
(truncation below 1e-20); relative error a few 1e-16, as ``pow``, at a fraction of its cost.
Sums below ``rel_tol`` (1e-14 of the channel total, float64 cancellation noise) count as zero, as in
:mod:`.integral`. ``tests/ops/test_aml_kernel.py`` checks everything against the torch search.
"""
from __future__ import annotations

import functools
import math
import warnings

import numba
import numpy as np

from .integral import root_lookup

__all__ = ["root_tables", "rank_lut", "roots", "near_windows", "fine_search", "window_vectors"]

_KBITS = 10  # mantissa bits of the tabled bucket
_ORDER = 7  # terms of the binomial series (1 + t)^p, t < 2^-10


def _jit(fastmath: bool = False):
    """``numba.njit`` with the compiled code cached on disk (beside this file, else in the user's cache folder);
    where neither is writable (a read-only install and home) it compiles in each process instead, and says so."""
    def deco(fn):
        try:
            return numba.njit(cache=True, fastmath=fastmath)(fn)
        except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
            warnings.warn(f"instance_search.ops.aml_kernel.{fn.__name__}: compiled code not cached on disk ({exc}); "
                          f"it is compiled again in each process (set NUMBA_CACHE_DIR to a writable folder)",
                          stacklevel=2)
            return numba.njit(cache=False, fastmath=fastmath)(fn)
    return deco


@functools.lru_cache(maxsize=8)
def rank_lut(alpha: float) -> tuple[np.ndarray, int, int]:
    """The candidate ranking's ``S^{1/α}`` table for float32 ``S``, that of the batched search's fast pass
    (:func:`~.integral.root_lookup`)."""
    return root_lookup(float(alpha))


@functools.lru_cache(maxsize=8)
def root_tables(alpha: float) -> tuple[np.ndarray, ...]:
    """Tables of ``S^{1/α}`` (module docstring): ``two (2048,)`` ``2^{(e-1023)/α}`` by biased exponent ``e``,
    ``mk (1024,)`` ``m_k^{1/α}``, ``inv (1024,)`` ``1/m_k``, ``coef (7,)`` the binomial coefficients
    ``C(1/α, j)``, ``p2 (2048,)`` ``2^{-(e-1023)}``."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    p = 1.0 / float(alpha)
    with np.errstate(over="ignore"):  # exponents no window sum reaches (alpha < 1)
        two = np.power(2.0, (np.arange(2048, dtype=np.float64) - 1023.0) * p)
    mk = 1.0 + np.arange(1 << _KBITS, dtype=np.float64) / (1 << _KBITS)
    coef = np.ones(_ORDER)
    for j in range(1, _ORDER):
        coef[j] = coef[j - 1] * (p - j + 1) / j
    return two, np.power(mk, p), 1.0 / mk, coef, np.power(2.0, 1023.0 - np.arange(2048, dtype=np.float64))


@_jit()
def _roots(S, n, out, two, mk, inv, coef, p2):
    """``out[i] = S[i]^{1/α}`` for ``i < n`` (``S`` positive normal float64)."""
    bits = S.view(np.int64)
    for i in range(n):
        b = bits[i]
        e = b >> 52
        k = (b >> 42) & 1023
        t = S[i] * p2[e] * inv[k] - 1.0  # S / (2^(e-1023) m_k) - 1, in [0, 2^-10)
        poly = coef[6]
        for j in range(5, -1, -1):
            poly = poly * t + coef[j]
        out[i] = two[e] * mk[k] * poly


@_jit()
def roots(s, two, mk, inv, coef, p2):
    """``s^{1/α}`` of a float64 array of positive normal values (module docstring)."""
    s = np.ascontiguousarray(s)
    out = np.empty_like(s)
    _roots(s, s.shape[0], out, two, mk, inv, coef, p2)
    return out


@_jit()
def _vector(S, fs, rel_tol, two, mk, inv, coef, p2, f, pos, vals, rts):
    """``f̃ = fs · S^{1/α}`` of window sums ``S`` into ``f`` (sums up to ``rel_tol`` count as zero); returns how
    many channels are non-zero, their indices in ``pos[:n]`` (``vals``, ``rts``: scratch)."""
    n = 0
    for c in range(S.shape[0]):
        f[c] = 0.0
        if S[c] > rel_tol:
            pos[n] = c
            vals[n] = S[c]
            n += 1
    _roots(vals, n, rts, two, mk, inv, coef, p2)
    for i in range(n):
        f[pos[i]] = rts[i] * fs[pos[i]]
    return n


@_jit()
def _score(S, fs, qn, rel_tol, two, mk, inv, coef, p2, f, pos, vals, rts):
    """Eq. 4 of window sums ``S``: ``cos(f̃, q)``, writing ``f̃`` into ``f``; ``(score, dot, norm²)``."""
    n = _vector(S, fs, rel_tol, two, mk, inv, coef, p2, f, pos, vals, rts)
    dot = 0.0
    nn = 0.0
    for i in range(n):
        r = f[pos[i]]
        dot += r * qn[pos[i]]
        nn += r * r
    return dot / max(math.sqrt(nn), 1e-300), dot, nn


@_jit()
def _window_sums(T, pos_y, pos_x, x1, y1, x2, y2, S):
    """``S[c]``: the sums of the window ``[x1, x2) × [y1, y2)`` from the integral table ``T`` (:func:`_table`)
    over the lines whose positions ``pos_y`` / ``pos_x`` give."""
    a, b = pos_y[y1], pos_y[y2]
    cc, d = pos_x[x1], pos_x[x2]
    for ch in range(S.shape[0]):
        S[ch] = T[b, d, ch] - T[a, d, ch] - T[b, cc, ch] + T[a, cc, ch]


@_jit()
def _grid(x1s, y1s, x2s, y2s, H, W):
    """The border lines of windows (sorted, distinct) and where each line value sits among them:
    ``(ly, lx, pos_y (H + 1,), pos_x (W + 1,))``."""
    pos_y = np.zeros(H + 1, np.int64)
    pos_x = np.zeros(W + 1, np.int64)
    return _lines(y1s, y2s, H, pos_y), _lines(x1s, x2s, W, pos_x), pos_y, pos_x


@_jit()
def _lines(a, b, n, out_lut):
    """Sorted distinct values of ``a`` and ``b`` (0..n), and ``out_lut[v]`` = position of line ``v``."""
    mark = np.zeros(n + 1, np.bool_)
    for i in range(a.shape[0]):
        mark[a[i]] = True
        mark[b[i]] = True
    cnt = 0
    for v in range(n + 1):
        if mark[v]:
            out_lut[v] = cnt
            cnt += 1
    lines = np.empty(cnt, np.int64)
    j = 0
    for v in range(n + 1):
        if mark[v]:
            lines[j] = v
            j += 1
    return lines


@_jit()
def _table(c, y, x, w, o0, rowptr, ly, lx, H, W, T):
    """Integral table of one map's cells over sorted lines ``ly`` (Gy) and ``lx`` (Gx), into ``T (Gy, Gx, C)``:
    ``T[j, i, c] = Σ w`` over cells with ``ly[0] <= y < ly[j]`` and ``lx[0] <= x < lx[i]``, so that a window
    on the lines has the sum ``T[b, d] - T[a, d] - T[b, c] + T[a, c]`` (cells outside the lines' span, which
    would cancel, are left out)."""
    Gy, Gx, C = T.shape
    T[:] = 0.0
    bin_x = np.empty(W, np.int64)  # number of lines <= v: the first table column that counts a cell of column v
    j = 0
    for v in range(W):
        while j < Gx and lx[j] <= v:
            j += 1
        bin_x[v] = j
    jy = 0
    for v in range(ly[0], ly[Gy - 1]):
        while jy < Gy and ly[jy] <= v:
            jy += 1
        a = o0 + rowptr[v]
        b = o0 + rowptr[v + 1]
        k = a + np.searchsorted(x[a:b], lx[0])  # a row's cells are sorted by column
        while k < b and x[k] < lx[Gx - 1]:
            T[jy, bin_x[x[k]], c[k]] += w[k]
            k += 1
    for jj in range(Gy):  # cumulative along x, then along y (two branch-free passes over the channels)
        for ii in range(1, Gx):
            for ch in range(C):
                T[jj, ii, ch] += T[jj, ii - 1, ch]
    for jj in range(1, Gy):
        for ii in range(Gx):
            for ch in range(C):
                T[jj, ii, ch] += T[jj - 1, ii, ch]


@_jit(fastmath=True)
def _rank32(T, pos_y, pos_x, x1s, y1s, x2s, y2s, nc, fs32, qn32, lut, shift, base, verify, buf):
    """The ``verify`` candidates of best approximate Eq. 4 score (float32 sums, ``S^{1/α}`` looked up on the
    exponent and 10 mantissa bits as :func:`~.integral._fast_scores`), in candidate order."""
    C = fs32.shape[0]
    bits = buf.view(np.int32)
    nl = lut.shape[0] - 1
    top_s = np.full(verify, -4.0)
    top_i = np.full(verify, -1, np.int64)
    for m in range(nc):
        _window_sums(T, pos_y, pos_x, x1s[m], y1s[m], x2s[m], y2s[m], buf)  # rounded to float32
        dot = np.float32(0.0)
        nn = np.float32(0.0)
        for ch in range(C):
            k = min(max((bits[ch] >> shift) - base, 0), nl)
            g = lut[k] * fs32[ch]
            dot += g * qn32[ch]
            nn += g * g
        sc = dot / max(math.sqrt(nn), 1e-30)
        if sc > top_s[verify - 1]:  # insert, keeping the earlier candidate first among equals
            j = verify - 1
            while j > 0 and top_s[j - 1] < sc:
                top_s[j] = top_s[j - 1]
                top_i[j] = top_i[j - 1]
                j -= 1
            top_s[j] = sc
            top_i[j] = m
    return np.sort(top_i)


@_jit()
def _search_one(c, y, x, w, o0, rowptr, xorder, colptr, H, W, fs, qn, cand, nc, rel_tol, steps, rounds, verify,
                tabs, lut, shift, base, edges_out, sums_out, ws64):
    """AML on one map from its candidates (module docstring); writes ``edges_out`` (x1, y1, x2, y2) and
    ``sums_out`` (C,); returns ``(score, n_evaluated)``."""
    two, mk, inv, coef, p2 = tabs
    C = fs.shape[0]
    f = np.empty(C)
    pos = np.empty(C, np.int64)
    vals = np.empty(C)
    rts = np.empty(C)
    # ---- integral table over the candidates' border lines (_table)
    x1s = cand[:nc, 0]
    y1s = cand[:nc, 1]
    x2s = x1s + cand[:nc, 2]
    y2s = y1s + cand[:nc, 3]
    ly, lx, pos_y, pos_x = _grid(x1s, y1s, x2s, y2s, H, W)
    Gy, Gx = ly.shape[0], lx.shape[0]
    T = ws64[:Gy * Gx * C].reshape((Gy, Gx, C))  # workspaces reused between maps (no page faults)
    _table(c, y, x, w, o0, rowptr, ly, lx, H, W, T)
    rank = verify > 0 and nc > verify
    # ---- candidates: the `verify` best of a float32 ranking (all when verify == 0) scored exactly; the
    # best (ties: the first candidate) starts the descent
    if rank:
        buf = np.empty(C, np.float32)
        chosen = _rank32(T, pos_y, pos_x, x1s, y1s, x2s, y2s, nc, fs.astype(np.float32), qn.astype(np.float32),
                         lut, shift, base, verify, buf)
    else:
        chosen = np.arange(nc)
    S = np.empty(C)
    best = -3.0
    bi = 0
    for m in chosen:
        _window_sums(T, pos_y, pos_x, x1s[m], y1s[m], x2s[m], y2s[m], S)
        sc, _, _ = _score(S, fs, qn, rel_tol, two, mk, inv, coef, p2, f, pos, vals, rts)
        if sc > best:
            best = sc
            bi = m
    e = np.empty(4, np.int64)
    e[0], e[1], e[2], e[3] = x1s[bi], y1s[bi], x2s[bi], y2s[bi]
    V = np.empty(C)
    _window_sums(T, pos_y, pos_x, e[0], e[1], e[2], e[3], V)
    best, dot, nn = _score(V, fs, qn, rel_tol, two, mk, inv, coef, p2, f, pos, vals, rts)
    n_eval = nc
    # ---- coordinate descent: strips of cells between the old and the new border; only the channels a strip
    # touches change, so only those are re-rooted and their terms of the dot product and norm replaced
    st = steps
    nb = 2 * st
    P = np.zeros((nb + 1, C))
    touched = np.zeros(C, np.bool_)
    tl = np.empty(C, np.int64)
    shifts = np.empty(2 * st, np.int64)
    j = 0
    for dd in range(-st, st + 1):
        if dd != 0:
            shifts[j] = dd
            j += 1
    for _ in range(rounds):
        improved = False
        for kb in range(4):
            lim = W if kb == 0 or kb == 2 else H
            v0 = e[kb]
            lo = max(v0 - st, 0)
            hi = min(v0 + st, lim)
            base_v = v0 - st
            nt = 0
            horizontal = kb == 0 or kb == 2
            alo, ahi = (e[1], e[3]) if horizontal else (e[0], e[2])
            for line in range(lo, hi):  # the strip's rows (columns), only their cells within the window's extent
                if horizontal:  # a column's cells (column order) are sorted by row: binary search the first
                    a, b = colptr[line], colptr[line + 1]
                    while a < b:
                        mid = (a + b) >> 1
                        if y[o0 + xorder[mid]] < alo:
                            a = mid + 1
                        else:
                            b = mid
                    k1 = colptr[line + 1]
                else:  # a row's cells are sorted by column
                    a = rowptr[line] + np.searchsorted(x[o0 + rowptr[line]:o0 + rowptr[line + 1]], alo)
                    k1 = rowptr[line + 1]
                for kk in range(a, k1):
                    cell = o0 + (xorder[kk] if horizontal else kk)
                    if (y[cell] if horizontal else x[cell]) >= ahi:
                        break
                    ch = c[cell]
                    if not touched[ch]:
                        touched[ch] = True
                        tl[nt] = ch
                        nt += 1
                        for q in range(nb + 1):
                            P[q, ch] = 0.0
                    P[line - base_v + 1, ch] += w[cell]
            for t in range(nt):  # cumulative over the bins
                ch = tl[t]
                for q in range(1, nb + 1):
                    P[q, ch] += P[q - 1, ch]
            bv = -3.0
            bj = -1
            for si in range(2 * st):
                dd = shifts[si]
                nv = v0 + dd
                if nv < 0 or nv > lim:
                    continue
                if (kb == 0 and nv >= e[2]) or (kb == 2 and nv <= e[0]) or (kb == 1 and nv >= e[3]) or \
                        (kb == 3 and nv <= e[1]):
                    continue
                n_eval += 1
                nv_pos = 0
                for t in range(nt):
                    ch = tl[t]
                    delta = P[st + dd, ch] - P[st, ch]
                    s_new = V[ch] - delta if kb < 2 else V[ch] + delta
                    if s_new > rel_tol:
                        vals[nv_pos] = s_new
                        pos[nv_pos] = ch
                        nv_pos += 1
                _roots(vals, nv_pos, rts, two, mk, inv, coef, p2)
                dt = dot
                nq = nn
                for t in range(nt):
                    ch = tl[t]
                    dt -= f[ch] * qn[ch]
                    nq -= f[ch] * f[ch]
                for t in range(nv_pos):
                    ch = pos[t]
                    r = rts[t] * fs[ch]
                    dt += r * qn[ch]
                    nq += r * r
                sc = dt / max(math.sqrt(max(nq, 0.0)), 1e-300)
                if sc > bv:
                    bv = sc
                    bj = si
            if bj >= 0 and bv > best + 1e-12:
                dd = shifts[bj]
                e[kb] = v0 + dd
                for t in range(nt):
                    ch = tl[t]
                    delta = P[st + dd, ch] - P[st, ch]
                    V[ch] = V[ch] - delta if kb < 2 else V[ch] + delta
                best, dot, nn = _score(V, fs, qn, rel_tol, two, mk, inv, coef, p2, f, pos, vals, rts)
                improved = True
            for t in range(nt):
                touched[tl[t]] = False
        if not improved:
            break
    for i in range(4):
        edges_out[i] = e[i]
    for ch in range(C):
        sums_out[ch] = V[ch]
    return best, n_eval


@_jit()
def fine_search(c, y, x, w, offsets, rowptr, rowstart, xorder, colptr, colstart, shapes, fscale, rows, qn, cand,
                ncand, rel_tol, steps, rounds, verify, tabs, lut, shift, base):
    """AML from given candidate windows on maps ``rows`` (module docstring). Cells of image ``i``:
    ``offsets[i]:offsets[i+1]`` of ``c, y, x, w`` in raster order; its row starts ``rowptr[rowstart[i]:][:H+1]``
    and column starts ``colptr[colstart[i]:][:W+1]`` (into its ``xorder``, the cells in column order);
    ``shapes (N, 2)``; ``fscale (N, C)``. ``cand (n, m, 4)`` windows ``(x, y, w, h)``, the first ``ncand[i]``
    of row ``i`` real; ``verify``: how many candidates of a float32 ranking are scored exactly (0: all);
    ``tabs``: :func:`root_tables`; ``lut, shift, base``: the ranking's root table. Returns ``(edges (n, 4)
    x1 y1 x2 y2, scores (n,), n_evaluated (n,), sums (n, C))``."""
    n = rows.shape[0]
    C = fscale.shape[1]
    edges = np.zeros((n, 4), np.int64)
    scores = np.zeros(n)
    n_eval = np.zeros(n, np.int64)
    sums = np.zeros((n, C))
    ws64 = np.empty(0)
    for i in range(n):
        r = rows[i]
        need = (min(2 * ncand[i], shapes[r, 0] + 1)) * (min(2 * ncand[i], shapes[r, 1] + 1)) * C
        if ws64.shape[0] < need:
            ws64 = np.empty(need)
        H, W = shapes[r, 0], shapes[r, 1]
        o0 = offsets[r]
        rp = rowptr[rowstart[r]:rowstart[r] + H + 1]
        cp = colptr[colstart[r]:colstart[r] + W + 1]
        xo = xorder[o0:offsets[r + 1]]
        s, ne = _search_one(c, y, x, w, o0, rp, xo, cp, H, W, fscale[r], qn, cand[i], ncand[i], rel_tol, steps,
                            rounds, verify, tabs, lut, shift, base, edges[i], sums[i], ws64)
        scores[i] = s
        n_eval[i] = ne
    return edges, scores, n_eval, sums


@_jit()
def window_vectors(c, y, x, w, offsets, rowptr, rowstart, shapes, fscale, rows, wins, rel_tol, tabs):
    """``f̃`` (float64) of windows ``wins (n, m, 4)`` ``(x, y, w, h)`` on maps ``rows``: ``(n, m, C)``; the sums
    from one integral table per map over its windows' border lines (:func:`_table`)."""
    two, mk, inv, coef, p2 = tabs
    n, m = wins.shape[0], wins.shape[1]
    C = fscale.shape[1]
    out = np.zeros((n, m, C))
    S = np.empty(C)
    pos = np.empty(C, np.int64)
    vals = np.empty(C)
    rts = np.empty(C)
    ws = np.empty(0)
    for i in range(n):
        r = rows[i]
        H, W = shapes[r, 0], shapes[r, 1]
        rp = rowptr[rowstart[r]:rowstart[r] + H + 1]
        x1s = wins[i, :, 0]
        y1s = wins[i, :, 1]
        x2s = x1s + wins[i, :, 2]
        y2s = y1s + wins[i, :, 3]
        ly, lx, pos_y, pos_x = _grid(x1s, y1s, x2s, y2s, H, W)
        Gy, Gx = ly.shape[0], lx.shape[0]
        if ws.shape[0] < Gy * Gx * C:
            ws = np.empty(Gy * Gx * C)
        T = ws[:Gy * Gx * C].reshape((Gy, Gx, C))
        _table(c, y, x, w, offsets[r], rp, ly, lx, H, W, T)
        for j in range(m):
            _window_sums(T, pos_y, pos_x, x1s[j], y1s[j], x2s[j], y2s[j], S)
            _vector(S, fscale[r], rel_tol, two, mk, inv, coef, p2, out[i, j], pos, vals, rts)
    return out


@_jit()
def near_windows(grid, props, valid, radius):
    """Windows of ``grid (N, 4)`` ``(x, y, w, h)`` whose four borders are each within ``radius`` cells of the
    same border of one valid proposal of ``props (B, k, 4)`` (``valid (B, k)``), in grid order, per map:
    ``(cand (B, m, 4), count (B,))``; a map with none gets its first valid proposal."""
    B, k = props.shape[0], props.shape[1]
    N = grid.shape[0]
    keep = np.zeros((B, N), np.bool_)
    count = np.zeros(B, np.int64)
    for b in range(B):
        for j in range(N):
            gx1, gy1 = grid[j, 0], grid[j, 1]
            gx2, gy2 = gx1 + grid[j, 2], gy1 + grid[j, 3]
            for p in range(k):
                if not valid[b, p]:
                    continue
                px1, py1 = props[b, p, 0], props[b, p, 1]
                if abs(gx1 - px1) <= radius and abs(gy1 - py1) <= radius and \
                        abs(gx2 - px1 - props[b, p, 2]) <= radius and abs(gy2 - py1 - props[b, p, 3]) <= radius:
                    keep[b, j] = True
                    count[b] += 1
                    break
    m = max(1, count.max()) if B else 1
    cand = np.zeros((B, m, 4), np.int64)
    for b in range(B):
        if count[b] == 0:
            for p in range(k):
                if valid[b, p]:
                    cand[b, 0] = props[b, p]
                    count[b] = 1
                    break
            continue
        i = 0
        for j in range(N):
            if keep[b, j]:
                cand[b, i] = grid[j]
                i += 1
    return cand, count
