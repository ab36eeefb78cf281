"""Fast approximate AML re-ranking on coarse, channel-restricted maps (after Tolias, Sicre & Jégou 2016, Sec. 5-6).

Exact AML (:mod:`instance_search.rerank.aml`) scores every sampled window with all ``C`` channels at full map
resolution: ~10⁹ window × channel roots for a 1000-image short list of 1024-px VGG16 maps, seconds per query on
one core. This module trades accuracy for speed in two ways, both measured in ``benchmarks/bench_aml_fast.py``:

* **coarse cells**: every map is max-pooled by a factor ``g`` (``g × g`` cells → one coarse cell, the maximum
  of the values: MAC of a window made of whole coarse cells is then exact), and windows live on the coarse grid
  (step ``step`` coarse cells, aspect ratio within a factor ``s`` of the query's, as Sec. 5.2);
* **the query's K strongest channels**: a window is scored by Eq. 4 restricted to the ``K`` channels where the
  query's MAC is largest, ``cos(q_K, f_{R,K})``.

The coarse non-zeros of all images are kept once, in RAM, by :class:`AMLInvertedMaps` (one sorted run per
(image, channel), found through an offsets table, so the ``K`` channels of a short list are gathered without a
loop). Per query, :func:`aml_fast_search` scatters the gathered cells into a ``(Gh, Gw, B, K)`` grid and scores
all windows of all short-listed images at once: with ``pooling="max"`` (default) by the exact window maximum
from a 2-D range-maximum table (the paper's target ``f_R``; no power or root), with ``pooling="power"`` by the
paper's ``f̃_R = (Σ X^α)^{1/α}`` (Eq. 3) from integral images. :func:`rerank_aml_fast` scores the short list by
the best window: its restricted score (``score="search"``) or its MAC over all channels (``score="mac"``, the
default; optionally whitened, as :func:`~instance_search.rerank.aml.rerank_aml` does without R-MAC scoring).

Boxes are ``(x, y, w, h)`` in the maps' own cells (multiples of ``g``, clipped to the map): coarse resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable

import numpy as np
import torch

from ..ops.integral import SparseMap, map_shape, sample_windows
from ..ops.normalize import l2n
from .aml import RerankResult, order_by_score, region_vectors

__all__ = ["AMLInvertedMaps", "aml_fast_search", "rerank_aml_fast", "window_macs", "DEFAULT_K", "DEFAULT_G",
           "DEFAULT_STEP"]

DEFAULT_K = 512  # all VGG16 conv5 channels: smaller K loses 4-8 mAP (benchmarks/results/aml_fast.json)
DEFAULT_G = 8
DEFAULT_STEP = 2
_POOLINGS = ("max", "power")
_SCORES = ("mac", "search")
_LEVELS = 65535  # max pooling: window maxima taken on uint16 codes of value / (image, channel) maximum


def _nonzeros(X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(channel, flat position, value)`` of a :class:`SparseMap` or of a dense map's positive cells."""
    if isinstance(X, SparseMap):
        return np.asarray(X.channel), np.asarray(X.position), np.asarray(X.value, np.float32)
    A = X.detach().cpu().numpy() if hasattr(X, "detach") else np.asarray(X)
    A = A.astype(np.float32, copy=False).reshape(A.shape[0], -1)
    if A.size and (A < 0).any():
        raise ValueError("AML needs non-negative maps (e.g. ReLU activations)")
    ch, pos = np.nonzero(A > 0)
    return ch, pos, A[ch, pos]


@dataclass(frozen=True, eq=False)
class AMLInvertedMaps:
    """Coarse non-zero cells of ``N`` maps with ``C`` channels, kept in RAM for fast AML (see module docstring).

    Each map ``(C, H, W)`` is max-pooled by ``g`` to ``(C, ceil(H/g), ceil(W/g))``; its positive coarse cells
    are stored sorted by (image, channel): coarse row ``cy``, column ``cx`` (uint8 when every coarse side is
    below 256) and ``value`` (float32); the cells of image ``i``, channel ``c`` are
    ``offsets[i·C + c] : offsets[i·C + c + 1]``. ``shapes`` (N, 2): ``(H, W)`` of each original map; ``mac``
    (N, C): each image's channel maxima; ``code``: the values as uint16 fractions of their channel maximum.
    """

    channels: int
    g: int
    shapes: np.ndarray
    offsets: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    value: np.ndarray
    mac: np.ndarray  #: (N, C) float32 channel maxima (the MAC vector) of each image
    code: np.ndarray  #: uint16 ``round(value / mac · 65535)``: what the max-pooling search works on

    def __len__(self) -> int:
        return int(self.shapes.shape[0])

    @property
    def coarse_shapes(self) -> np.ndarray:
        """``(N, 2)``: ``(Gh, Gw)`` of each image's coarse grid."""
        return -(-self.shapes // self.g)

    @property
    def nbytes(self) -> int:
        """RAM held by the arrays (bytes)."""
        arrays = (self.shapes, self.offsets, self.cy, self.cx, self.value, self.mac, self.code)
        return int(sum(a.nbytes for a in arrays))

    @classmethod
    def build(cls, maps: Iterable, g: int = DEFAULT_G, chunk: int = 256, progress: bool = False,
              total: int | None = None) -> "AMLInvertedMaps":
        """Store of ``maps`` (each a non-negative ``(C, H, W)`` array or a :class:`SparseMap`, e.g.
        :func:`instance_search.index.compact.decode_sparse`; sizes may differ, channels may not), pooled by ``g``
        (max of each ``g × g`` block). ``maps`` may be a generator: it is consumed ``chunk`` maps at a time
        (vectorised within a chunk), so only one chunk of full-resolution maps is held at once; ``total``: the
        count for the progress bar."""
        if int(g) != g or g < 1:
            raise ValueError(f"g (coarse pooling factor) must be an integer >= 1, got {g}")
        g = int(g)
        counts, cys, cxs, values, hws = [], [], [], [], []
        C = None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="AML inverted maps", unit="map")
        it = iter(maps)
        i0 = 0
        while True:
            batch = list(islice(it, chunk))
            if not batch:
                break
            shapes = [map_shape(m) for m in batch]
            for i, sh in enumerate(shapes, start=i0):
                if len(sh) != 3:
                    raise ValueError(f"maps[{i}] must be (C, H, W), got shape {sh}")
                if C is None:
                    C = sh[0]
                if sh[0] != C:
                    raise ValueError(f"maps[{i}] has {sh[0]} channels, maps[0] has {C}: all maps need the "
                                     "same channel count")
            hw = np.asarray([sh[1:] for sh in shapes], np.int64).reshape(-1, 2)
            ghw = -(-hw // g)
            parts = [_nonzeros(m) for m in batch]
            n = np.asarray([len(p[0]) for p in parts], np.int64)
            img = np.repeat(np.arange(len(parts)), n)
            ch = np.concatenate([p[0] for p in parts]).astype(np.int64)
            pos = np.concatenate([p[1] for p in parts]).astype(np.int64)
            val = np.concatenate([p[2] for p in parts]).astype(np.float32)
            W, gw = hw[img, 1], ghw[img, 1]
            P = int((ghw[:, 0] * ghw[:, 1]).max())
            cpos = (pos // W) // g * gw + (pos % W) // g
            key = (img * C + ch) * P + cpos
            if g > 1 or (len(key) > 1 and (np.diff(key) < 0).any()):
                o = np.argsort(key, kind="stable")
                key, val = key[o], val[o]
            first = np.ones(len(key), bool)
            first[1:] = key[1:] != key[:-1]
            starts = np.flatnonzero(first)
            ukey = key[starts]
            cpos, gw = ukey % P, ghw[ukey // P // C, 1]
            counts.append(np.bincount(ukey // P, minlength=len(parts) * C))
            kdt = np.uint16 if int(ghw.max()) <= 65535 else np.int64  # narrowed to uint8 at the end if it fits
            cys.append((cpos // gw).astype(kdt))
            cxs.append((cpos % gw).astype(kdt))
            values.append(np.maximum.reduceat(val, starts) if len(starts) else val[:0])
            hws.append(hw)
            i0 += len(batch)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        if C is None:
            raise ValueError("maps: no maps given")
        hw = np.concatenate(hws)
        gmax = int((-(-hw // g)).max())
        cdt = np.uint8 if gmax <= 255 else np.uint16 if gmax <= 65535 else np.int64
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        value = np.concatenate(values)
        lens = np.diff(offsets)
        mac = _seg_max(value, lens).reshape(len(hw), C)
        m = np.repeat(mac.reshape(-1), lens)
        code = np.rint(value / np.where(m > 0, m, 1) * _LEVELS).astype(np.uint16)
        return cls(C, g, hw, offsets, np.concatenate(cys).astype(cdt, copy=False), np.concatenate(cxs).astype(cdt, copy=False),
                   value, mac, code)


def _check_k(K: int, C: int) -> int:
    if int(K) != K or K < 1:
        raise ValueError(f"K (number of query channels) must be an integer >= 1, got {K}")
    return min(int(K), C)


def _entries(store: AMLInvertedMaps, rows: np.ndarray, ks: np.ndarray | None, field: str = "value"):
    """``(cy, cx, value or code, lens)`` of the cells of channels ``ks`` (``None``: all) of images ``rows``, grouped by
    (image, channel) in that order; ``lens`` (B·K,) are the group sizes."""
    C, off = store.channels, store.offsets
    if ks is None:  # each image's cells are one contiguous run: slices, no index array
        lens = np.diff(off[(rows[:, None] * C + np.arange(C + 1)).reshape(-1)].reshape(-1, C + 1), axis=1).reshape(-1)
        spans = list(zip(off[rows * C].tolist(), off[rows * C + C].tolist()))
        return tuple(np.concatenate([a[i:j] for i, j in spans]) if spans else a[:0]
                     for a in (store.cy, store.cx, getattr(store, field))) + (lens,)
    seg = (rows[:, None] * C + ks[None, :]).reshape(-1)
    starts = off[seg]
    lens = off[seg + 1] - starts
    idx = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    return store.cy[idx], store.cx[idx], getattr(store, field)[idx], lens


def _seg_max(v: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Maximum of each run of non-negative ``v`` (runs of lengths ``lens``; 0 for empty runs)."""
    if not len(v):
        return np.zeros(len(lens), v.dtype)
    return torch.segment_reduce(torch.from_numpy(v), "max", lengths=torch.from_numpy(lens), unsafe=True,
                                initial=0).numpy()


def _levels(n: np.ndarray) -> np.ndarray:
    """``floor(log2(n))`` of positive ints."""
    return np.floor(np.log2(n)).astype(np.int64)


def _max_scores(grid: np.ndarray, scale: np.ndarray, wins: np.ndarray, qk: np.ndarray, out: np.ndarray) -> None:
    """Eq. 4 with the exact window max: ``out[n, b] = q·f / |f|`` for windows ``wins (N, 4)`` on ``grid``
    ``(Gh, Gw, B, K)`` (uint16 codes; value = code · ``scale`` (B, K)). 2-D range-maximum table: a window
    ``h × w`` is the union of the four ``2^k × 2^l`` blocks at its corners (``k = ⌊log2 h⌋``,
    ``l = ⌊log2 w⌋``), each block maximum built by doubling; the maxima are taken on the codes, which keep
    the order of the values."""
    Gh, Gw, B, K = grid.shape
    kk, ll = _levels(wins[:, 3]), _levels(wins[:, 2])
    rows = grid
    scale = scale.astype(np.float32)
    for k in range(int(kk.max()) + 1):
        if k:
            d = 1 << (k - 1)
            rows = np.maximum(rows[:-d], rows[d:])
        if not (kk == k).any():
            continue
        tab = rows
        for l in range(int(ll[kk == k].max()) + 1):
            if l:
                d = 1 << (l - 1)
                tab = np.maximum(tab[:, :-d], tab[:, d:])
            sel = np.flatnonzero((kk == k) & (ll == l))
            if not len(sel):
                continue
            x1, y1 = wins[sel, 0], wins[sel, 1]
            x2, y2 = x1 + wins[sel, 2] - (1 << l), y1 + wins[sel, 3] - (1 << k)
            stride = tab.shape[1]
            flat = tab.reshape(-1, B * K)
            f8 = flat[y1 * stride + x1]
            np.maximum(f8, flat[y1 * stride + x2], out=f8)
            np.maximum(f8, flat[y2 * stride + x1], out=f8)
            np.maximum(f8, flat[y2 * stride + x2], out=f8)
            f = f8.reshape(len(sel), B, K).astype(np.float32)
            f *= scale
            f = f.reshape(-1, K)
            nrm = np.sqrt(np.einsum("ij,ij->i", f, f))
            out[sel] = ((f @ qk) / np.maximum(nrm, 1e-30)).reshape(len(sel), B)


def _power_scores(grid: np.ndarray, scale: np.ndarray, wins: np.ndarray, qk: np.ndarray, alpha: float,
                  out: np.ndarray) -> None:
    """Eq. 4 with ``f̃`` (Eq. 3): ``grid`` holds ``(X/s)^α`` (float64, ``s`` the per-(image, channel) maximum
    ``scale (B, K)``); integral images over the coarse grid, four look-ups per window; window sums below
    ``1e-14`` of the channel total are rounding noise and count as zero (as :mod:`instance_search.ops.integral`)."""
    Gh, Gw, B, K = grid.shape
    ii = np.zeros((Gh + 1, Gw + 1, B, K))
    np.cumsum(grid, axis=0, out=ii[1:, 1:])
    np.cumsum(ii[1:, 1:], axis=1, out=ii[1:, 1:])
    flat = ii.reshape(-1, B, K)
    st = Gw + 1
    x1, y1 = wins[:, 0], wins[:, 1]
    x2, y2 = x1 + wins[:, 2], y1 + wins[:, 3]
    tol = 1e-14 * flat[-1]
    for i in range(0, len(wins), 64):
        sl = slice(i, i + 64)
        s = flat[y2[sl] * st + x2[sl]] - flat[y1[sl] * st + x2[sl]] - flat[y2[sl] * st + x1[sl]] + \
            flat[y1[sl] * st + x1[sl]]
        f = np.where(s > tol, s, 0.0) ** (1.0 / alpha) * scale
        out[sl] = (f @ qk) / np.maximum(np.linalg.norm(f, axis=2), 1e-300)


def window_macs(store: AMLInvertedMaps, rows, boxes, channels=None) -> np.ndarray:
    """Exact MAC of one window per image over ``channels`` (default all), from the store's coarse cells:
    ``(B, len(channels))`` float32. ``boxes`` (B, 4) ``(x, y, w, h)`` in map cells whose edges lie on the coarse
    grid (multiples of ``g`` or the map border), as :func:`aml_fast_search` returns (Tolias et al. 2016, Sec. 3:
    ``f_R = max_{p∈R} X(p)``)."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    ks = None if channels is None else np.asarray(channels, np.int64).reshape(-1)
    if ks is not None and len(ks) == store.channels and np.array_equal(ks, np.arange(store.channels)):
        ks = None
    n_ch = store.channels if ks is None else len(ks)
    cy, cx, val, lens = _entries(store, rows, ks)
    per_img = lens.reshape(len(rows), n_ch).sum(1)
    g = store.g
    bx = np.asarray(boxes, np.int64).reshape(-1, 4)
    x1, y1 = bx[:, 0] // g, bx[:, 1] // g
    w, h = -(-(bx[:, 0] + bx[:, 2]) // g) - x1, -(-(bx[:, 1] + bx[:, 3]) // g) - y1
    cdt = store.cx.dtype if store.cx.dtype != np.int64 else np.uint64
    # unsigned wrap-around: (cx - x1) < w  <=>  x1 <= cx < x1 + w
    inside = (cx.astype(cdt, copy=False) - np.repeat(x1.astype(cdt), per_img)) < np.repeat(w.astype(cdt), per_img)
    inside &= (cy.astype(cdt, copy=False) - np.repeat(y1.astype(cdt), per_img)) < np.repeat(h.astype(cdt), per_img)
    v = val * inside
    return _seg_max(v, lens).reshape(len(rows), n_ch)


def aml_fast_search(store: AMLInvertedMaps, rows, q, K: int = DEFAULT_K, query_aspect: float | None = None,
                    s: float = 1.1, step: int = DEFAULT_STEP, pooling: str = "max", alpha: float = 10.0,
                    chunk: int | None = None, windows: np.ndarray | None = None, return_all: bool = False,
                    exact_score: bool = True, top: int | None = None):
    """Best coarse window of each image ``rows`` of ``store`` for the query MAC ``q (C,)``, by Eq. 4 restricted
    to the query's ``K`` largest channels (see the module docstring; Tolias et al. 2016, Sec. 5.2).

    Windows: :func:`~instance_search.ops.integral.sample_windows` on the coarse grid (step ``step`` coarse cells,
    aspect within a factor ``s`` of ``query_aspect``), those inside each image's grid; ``windows`` (N, 4)
    coarse-cell rows replaces them (then ``return_all=True`` also returns the ``(N, B)`` scores, -inf where a
    window leaves an image). ``pooling``: ``"max"`` (exact window max; the windows are ranked on values rounded
    to 65535 levels of each (image, channel) maximum, the returned score is exact) or ``"power"`` (``f̃``, Eq. 3,
    exponent ``alpha``, float64). Images of the same orientation are searched together on one padded grid,
    ``chunk`` at a time (default: ``max(16, 4096 // K)`` images). ``exact_score=False`` (max pooling) skips
    the exact re-scoring of the best windows (the returned scores are then those of the rounded values).
    Returns ``(boxes (B, 4) int64 (x, y, w, h) in map cells, scores (B,), n_windows (B,))``; with ``top``, also
    the ``top`` best windows of each image ``(B, top, 4)`` (map cells, best first) and which of them exist
    ``(B, top)`` bool (an image may have fewer windows): the proposals of coarse-to-fine AML (:mod:`.aml_c2f`).
    """
    if top is not None and (int(top) != top or top < 1):
        raise ValueError(f"top must be an integer >= 1, got {top}")
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
    if int(step) != step or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step}")
    rows = np.asarray(rows, np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(store)):
        raise ValueError(f"rows must index the store's {len(store)} images")
    qv = np.asarray(q, np.float64).reshape(-1)
    C = store.channels
    if qv.shape[0] != C:
        raise ValueError(f"query has {qv.shape[0]} dimensions, the maps have {C} channels")
    K = _check_k(K, C)
    ks = np.sort(np.argsort(-qv, kind="stable")[:K])
    chunk = max(16, 4096 // K) if chunk is None else int(chunk)
    qk = l2n(qv[ks])
    B = len(rows)
    boxes = np.zeros((B, 4), np.int64)
    best = np.full(B, -np.inf)
    n_win = np.zeros(B, np.int64)
    ntop = 1 if top is None else int(top)
    tboxes = np.zeros((B, ntop, 4), np.int64)
    tok = np.zeros((B, ntop), bool)
    all_scores = None
    g = store.g
    ghw = store.coarse_shapes[rows]
    if windows is not None:
        windows = np.asarray(windows, np.int64).reshape(-1, 4)
        all_scores = np.full((len(windows), B), -np.inf)
    portrait = ghw[:, 0] > ghw[:, 1]
    for orient in (False, True):
        grp = np.flatnonzero(portrait == orient)
        if not len(grp):
            continue
        Gh, Gw = (int(v) for v in ghw[grp].max(0))
        wins = windows if windows is not None else sample_windows(Gh, Gw, step, query_aspect, s, grid="map")
        if windows is None and step > 1:  # windows touching the far border of each image's own grid too
            extra = [sample_windows(int(h), int(w), step, query_aspect, s, grid="map")
                     for h, w in np.unique(ghw[grp], axis=0)]
            wins = np.unique(np.concatenate([wins] + extra), axis=0)
        if len(wins):  # given windows may reach beyond the group's grid (they then leave every image)
            Gh, Gw = max(Gh, int((wins[:, 1] + wins[:, 3]).max())), max(Gw, int((wins[:, 0] + wins[:, 2]).max()))
        for c0 in range(0, len(grp), chunk):
            sub = grp[c0:c0 + chunk]
            nb = len(sub)
            cy, cx, val, lens = _entries(store, rows[sub], None if K == C else ks,
                                         "code" if pooling == "max" else "value")
            it = np.int32 if Gh * Gw * nb * K < 2 ** 31 else np.int64
            seg = np.repeat(np.arange(nb * K, dtype=it), lens)
            flat = (cy.astype(it) * it(Gw) + cx) * it(nb * K) + seg
            scale = store.mac[rows[sub]][:, ks].reshape(-1)
            scale = np.where(scale > 0, scale, np.float32(1))
            sc = np.full((len(wins), nb), -np.inf)
            if pooling == "max":
                grid = np.zeros(Gh * Gw * nb * K, np.uint16)
                grid[flat] = val
                _max_scores(grid.reshape(Gh, Gw, nb, K), (scale / _LEVELS).reshape(nb, K), wins,
                            qk.astype(np.float32), sc)
            else:
                grid = np.zeros(Gh * Gw * nb * K)
                grid[flat] = (val.astype(np.float64) / scale[seg]) ** alpha
                _power_scores(grid.reshape(Gh, Gw, nb, K), scale.reshape(nb, K).astype(np.float64), wins, qk,
                              alpha, sc)
            inside = ((wins[:, 0] + wins[:, 2])[:, None] <= ghw[sub, 1][None]) & \
                     ((wins[:, 1] + wins[:, 3])[:, None] <= ghw[sub, 0][None])
            sc = np.where(inside, np.nan_to_num(sc, nan=-1.0), -np.inf)
            j = np.argmax(sc, axis=0)
            if top is not None:
                kk = min(ntop, len(wins))
                tj = np.argsort(-sc, axis=0, kind="stable")[:kk]  # (kk, nb)
                tboxes[sub, :kk] = wins[tj].transpose(1, 0, 2)
                tok[sub, :kk] = np.isfinite(sc[tj, np.arange(nb)]).T
            best[sub] = sc[j, np.arange(nb)]
            boxes[sub] = wins[j]
            n_win[sub] = inside.sum(0)
            if all_scores is not None:
                all_scores[:, sub] = sc
    # coarse cells -> map cells (clipped to the map)
    HW = store.shapes[rows]
    x1, y1 = boxes[:, 0] * g, boxes[:, 1] * g
    x2 = np.minimum((boxes[:, 0] + boxes[:, 2]) * g, HW[:, 1])
    y2 = np.minimum((boxes[:, 1] + boxes[:, 3]) * g, HW[:, 0])
    boxes = np.stack([x1, y1, x2 - x1, y2 - y1], 1)
    if pooling == "max" and B and exact_score:  # the exact restricted score of each best window
        f = window_macs(store, rows, boxes, ks).astype(np.float64)
        best = (f @ qk) / np.maximum(np.linalg.norm(f, axis=1), 1e-300)
    out = (boxes, best, n_win)
    if return_all:
        out = out + (all_scores,)
    if top is not None:
        tx1, ty1 = tboxes[..., 0] * g, tboxes[..., 1] * g
        tx2 = np.minimum((tboxes[..., 0] + tboxes[..., 2]) * g, HW[:, 1:2])
        ty2 = np.minimum((tboxes[..., 1] + tboxes[..., 3]) * g, HW[:, 0:1])
        out = out + (np.stack([tx1, ty1, tx2 - tx1, ty2 - ty1], -1), tok)
    return out


def rerank_aml_fast(query_vec, store: AMLInvertedMaps, rows, shortlist_scores=None, K: int = DEFAULT_K,
                    query_aspect: float | None = None, s: float = 1.1, step: int = DEFAULT_STEP,
                    pooling: str = "max", score: str = "mac", whitening: Callable | None = None,
                    alpha: float = 10.0) -> RerankResult:
    """Re-rank the short list ``rows`` (images of ``store``) by fast approximate AML (module docstring).

    ``score="mac"``: cosine between the best window's MAC over all channels (exact, from the coarse cells) and
    the query MAC, after ``whitening`` when given (``L2(W(L2 f))``, as :func:`~instance_search.rerank.aml.rerank_aml`
    without R-MAC scoring); ``score="search"``: the window's restricted Eq. 4 score itself. ``shortlist_scores``
    only break ties, as in :func:`~instance_search.rerank.aml.rerank_aml`. Boxes are in map cells.
    """
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    boxes, sc, n_win = aml_fast_search(store, rows, query_vec, K=K, query_aspect=query_aspect, s=s, step=step,
                                       pooling=pooling, alpha=alpha, exact_score=score == "search")
    vectors = None
    if score == "mac":
        V = window_macs(store, rows, boxes)
        rv = region_vectors(V, whitening).numpy()
        vectors = rv
        sc = rv @ region_vectors(np.asarray(query_vec, np.float32).reshape(-1), whitening)[0].numpy()
    return RerankResult(np.asarray(sc, np.float64), boxes, order_by_score(np.asarray(sc, np.float64), shortlist_scores),
                        n_win, vectors)
