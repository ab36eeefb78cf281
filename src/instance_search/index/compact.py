"""Compact storage of conv feature maps for re-ranking (Tolias, Sicre & Jégou 2016, Sec. 7).

A non-negative ``(C, H, W)`` map (conv5 after ReLU) is kept as:

* per channel its maximum ``m_c`` — so the image's MAC survives (float16, or an 8-bit log-scale code);
* the cells with ``X_c(p) >= rho · m_c`` only ("clipping" the small activations, which max-pooling and its
  ``α = 10`` approximation hardly see: ``rho^10 ≤ 6e-6`` for ``rho = 0.3``), at most ``top`` per channel;
* optionally (``cell_rho``, our addition, not in the paper) also the cells where the channel is strong
  relative to the other channels at that cell, ``X_c(p) >= cell_rho · max_c' X_c'(p)``, down to
  ``floor · m_c``: R-MAC L2-normalises every region, so in a region away from a channel's strongest cells what
  counts is how the channels compare there, which clipping at ``rho · m_c`` alone wipes out;
* their values quantised to ``levels`` steps between ``floor · m_c`` (``floor = rho`` by default) and ``m_c``
  (paper: 8 levels, 3 bits), spaced linearly or geometrically (equal ratios: the same relative error at every
  level);
* their positions, sorted within the channel (raster order) and delta-coded.

Format ``CMP3`` (default): header ``b"CMP3"``, ``C, H, W`` (uint16 each), ``levels - 1`` (uint8), ``rho``
(float16), ``flags`` (uint8: bit 0 maxima as 8-bit log codes, bit 1 geometric levels); the maxima (float16[C],
or float32 ``log2`` range then uint8[C], 0 = empty channel); then entropy-coded integer sequences: the
per-channel counts, each channel's first position, the position gaps ``d - 1`` (one sequence per channel-count
class: 1–7, 8–23, 24–47, 48+ cells) and the levels. Gaps are half zeros (horizontally adjacent cells) and
half long jumps, a mixture Rice codes badly; so each integer ``v`` becomes a bucket ``s = bit_length(v)``
plus ``s - 1`` raw bits (Elias 1975, gamma code's split), and the buckets (and the levels, directly) are coded
with a canonical Huffman code built per map and sequence (Huffman 1952). Each sequence is stored as its
code lengths (4 bits per symbol), the byte length of its Huffman stream (uint32), the stream (MSB first), then
the raw bits; the decoder knows every sequence's length from the counts. Huffman streams are decoded without
a loop over symbols: the code word starting at every bit offset is
looked up at once (a table of ``2^L`` entries), the jump by ``B ~ sqrt(n)`` words from every offset follows by
pointer doubling, then the ``n / B`` block starts one after another and all blocks advance together, word by
word (about ``2 sqrt(n)`` vector steps in all).

Format ``CMP2``: ``max`` float16[C], one byte ``b`` and the per-channel counts in ``b`` bits each, ``k`` in 4
bits each, then four bit-streams: first positions in ``ceil(log2(H·W))`` bits, gap remainders, levels
(``ceil(log2(levels))`` bits each), gap quotients (unary) — Golomb–Rice codes of the gaps (Golomb 1966;
Rice 1979) with one parameter ``k`` per channel. ``CMP1``: one fixed width per channel for all position deltas.
Both are still decoded (and written with ``version=1|2``). The header keeps ``rho``, ``levels`` (and flags), so
codes written with any settings decode without being told them. Encoding and decoding are vectorised over all
non-zeros (no Python loop per cell or channel).
"""
from __future__ import annotations

import heapq
import zlib

import numpy as np

from ..errors import FileFormatError
from ..ops.integral import SparseMap

MAGIC_V3 = b"CMP3"
MAGIC = b"CMP2"
MAGIC_V1 = b"CMP1"
_HEADER = np.dtype([("magic", "S4"), ("C", "<u2"), ("H", "<u2"), ("W", "<u2"), ("levels", "u1"), ("rho", "<f2")])
_HEADER3 = np.dtype(_HEADER.descr + [("flags", "u1")])
_LOG_MAX, _GEOMETRIC = 1, 2  # CMP3 flags
_GAP_CLASSES = np.array([8, 24, 48])  # channel-count class bounds: one gap code per class
_MAX_LEN = 15  # longest Huffman code word (lengths are stored in 4 bits)

__all__ = ["encode_map", "decode_map", "decode_sparse", "SparseMap", "CompactMapError", "DEFAULT_LEVELS", "DEFAULT_RHO",
           "DEFAULT_TOP", "DEFAULT_LOG_MAX", "DEFAULT_SPACING", "DEFAULT_VERSION", "DEFAULT_CELL_RHO", "DEFAULT_FLOOR"]

DEFAULT_LEVELS = 8
DEFAULT_RHO = 0.3
DEFAULT_TOP = 64
DEFAULT_LOG_MAX = False
DEFAULT_SPACING = "linear"
DEFAULT_VERSION = 3
DEFAULT_CELL_RHO = None
DEFAULT_FLOOR = None


class CompactMapError(FileFormatError):
    """A compact map code is damaged or inconsistent."""


def _bits_for(n: int) -> int:
    return max(1, int(np.ceil(np.log2(max(n, 2)))))


def _pack(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Bit-pack non-negative ints ``values[i]`` in ``widths[i]`` bits each (LSB first)."""
    if values.size == 0 or int(widths.max()) == 0:
        return b""
    wmax = int(widths.max())
    j = np.arange(wmax, dtype=np.int64)
    bits = ((values[:, None].astype(np.int64) >> j) & 1).astype(np.uint8)
    bits = bits[j[None, :] < widths[:, None]]
    return np.packbits(bits, bitorder="little").tobytes()


def _unpack(buf: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, int]:
    """Inverse of :func:`_pack`: ``(values, bytes consumed)``. Each value (width <= 32 bits) is read from the
    8 bytes starting at its first byte, as one little-endian uint64, shifted and masked."""
    total = int(widths.sum())
    nbytes = (total + 7) // 8
    if widths.size == 0:
        return np.zeros(0, np.int64), 0
    if buf.size < nbytes:
        raise CompactMapError(f"compact map truncated: need {nbytes} bytes of bits, have {buf.size}")
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    padded = np.zeros(nbytes + 8, np.uint8)
    padded[:nbytes] = buf[:nbytes]
    words = padded[(starts >> 3)[:, None] + np.arange(8)].view("<u8")[:, 0]
    mask = (np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1)
    vals = (words >> (starts & 7).astype(np.uint64)) & mask
    return vals.astype(np.int64), nbytes


def _unary(q: np.ndarray) -> bytes:
    """``q[i]`` zeros then a one, for each ``i``, bit-packed (LSB first)."""
    if q.size == 0:
        return b""
    bits = np.zeros(int(q.sum() + q.size), np.uint8)
    bits[np.cumsum(q + 1) - 1] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def _rice_k(gaps: np.ndarray, ch: np.ndarray, C: int) -> np.ndarray:
    """Per channel, the Rice parameter ``k`` (0..15) that codes its gaps ``(d-1)`` in the fewest bits."""
    n = np.bincount(ch, minlength=C)
    cost = np.stack([np.bincount(ch, weights=gaps >> k, minlength=C) + n * (k + 1) for k in range(16)])
    return cost.argmin(0).astype(np.int64)


def _huffman_lengths(freq: np.ndarray) -> np.ndarray:
    """Code-word lengths (0 for unused symbols) of a Huffman code (Huffman 1952) for ``freq``, at most
    :data:`_MAX_LEN` bits (the counts are flattened and rebuilt until it fits). A single used symbol gets 1 bit."""
    freq = np.asarray(freq, np.int64)
    used = np.flatnonzero(freq)
    lengths = np.zeros(len(freq), np.int64)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    f = freq[used].astype(np.float64)
    while True:
        heap = [(float(w), i, [i]) for i, w in enumerate(f)]  # loop over symbols (at most a few hundred)
        heapq.heapify(heap)
        depth = np.zeros(len(f), np.int64)
        while len(heap) > 1:
            w1, i1, s1 = heapq.heappop(heap)
            w2, i2, s2 = heapq.heappop(heap)
            depth[s1 + s2] += 1
            heapq.heappush(heap, (w1 + w2, min(i1, i2), s1 + s2))
        if depth.max() <= _MAX_LEN:
            lengths[used] = depth
            return lengths
        f = np.ceil(f / 2) + 1  # flatter counts give shorter longest code words


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical code words (Schwartz & Kallick 1964) of ``lengths``: symbols ordered by (length, symbol)
    get consecutive codes, shifted left at each length increase."""
    codes = np.zeros(len(lengths), np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for sym in order:  # loop over symbols
        code <<= int(lengths[sym]) - prev
        codes[sym], prev = code, int(lengths[sym])
        code += 1
    return codes


def _huff_pack(sym: np.ndarray, nsym: int) -> bytes:
    """``sym`` (ints in ``0..nsym-1``) as: code lengths (4 bits each), byte length (uint32), MSB-first stream."""
    lengths = _huffman_lengths(np.bincount(sym, minlength=nsym))
    codes = _canonical(lengths)
    ln, cw = lengths[sym], codes[sym]
    j = np.arange(_MAX_LEN, dtype=np.int64)
    shift = ln[:, None] - 1 - j[None, :]
    bits = ((cw[:, None] >> np.maximum(shift, 0)) & 1).astype(np.uint8)[shift >= 0]
    stream = np.packbits(bits).tobytes()
    return _pack(lengths, np.full(nsym, 4, np.int64)) + np.uint32(len(stream)).tobytes() + stream


def _huff_unpack(buf: np.ndarray, n: int, nsym: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`_huff_pack`: ``(n symbols, bytes consumed)``. The code word at every bit offset is read
    from a lookup table at once; the word offsets ``p_{k+1} = p_k + len(word at p_k)`` follow by pointer
    doubling over the ``nxt`` table."""
    o = (nsym + 1) // 2  # the code lengths, 4 bits each (low nibble first, as _pack writes them)
    lengths = np.stack([buf[:o] & 15, buf[:o] >> 4], 1).reshape(-1)[:nsym].astype(np.int64)
    if buf.size < o + 4:
        raise CompactMapError("compact map truncated: Huffman stream length missing")
    nbytes = int(buf[o:o + 4].view("<u4")[0])
    o += 4
    if buf.size < o + nbytes:
        raise CompactMapError(f"compact map truncated: Huffman stream needs {nbytes} bytes, have {buf.size - o}")
    if not lengths.any() or np.sum(2.0 ** -lengths[lengths > 0]) > 1 + 1e-12:
        raise CompactMapError("compact map code is corrupt (bad Huffman code lengths)")
    L = int(lengths.max())
    codes = _canonical(lengths)
    syms = np.flatnonzero(lengths)
    span = 1 << (L - lengths[syms])
    lut_sym = np.zeros(1 << L, np.int64)
    lut_len = np.zeros(1 << L, np.intp)  # 0: no code word starts so (corrupt stream)
    idx = np.repeat(codes[syms] << (L - lengths[syms]), span) + (np.arange(span.sum()) -
                                                                 np.repeat(np.cumsum(span) - span, span))
    lut_sym[idx] = np.repeat(syms, span)
    lut_len[idx] = np.repeat(lengths[syms], span)
    T = 8 * nbytes
    # the L bits at every bit offset i: from the big-endian 32-bit word at byte i >> 3 (L <= 15, so L + 7 <= 32)
    by = np.zeros(nbytes + 4, np.uint32)
    by[:nbytes] = buf[o:o + nbytes]
    words = (by[:-3] << 24) | (by[1:-2] << 16) | (by[2:-1] << 8) | by[3:]
    i = np.arange(T, dtype=np.intp)  # (intp indices: gathers with int32 ones are several times slower)
    window = (np.take(words, i >> 3) >> (32 - L - (i & 7)).astype(np.uint32)) & np.uint32((1 << L) - 1)
    window = window.astype(np.intp)
    step = np.take(lut_len, window)
    # nxt[i]: offset of the code word after the one at i (i itself where none starts there: the chain then stalls
    # on it, found below); offsets from T on (the end, or past it) lead to themselves
    nxt = np.arange(T + _MAX_LEN + 1, dtype=np.intp)
    nxt[:T] += step
    # blocks of B = 2^jb ~ sqrt(n) words: the jump by B words for all offsets by doubling (jb gathers), the block
    # starts one after another (n / B steps), then all blocks advance together word by word (B steps)
    jb = max(1, max(n, 2).bit_length() // 2)
    big = nxt
    for _ in range(jb):
        big = np.take(big, big)
    B, nblocks = 1 << jb, -(-n // (1 << jb))
    get, p, starts = big.item, 0, [0]
    for _ in range(nblocks - 1):  # loop over blocks of code words
        p = get(p)
        starts.append(p)
    P = np.empty((B, nblocks), np.intp)
    P[0] = starts
    for t in range(1, B):  # loop over the words of a block
        P[t] = np.take(nxt, P[t - 1])
    pos = P.T.reshape(-1)[:n]
    wpos = np.take(window, np.minimum(pos, T - 1)) if T else pos
    if n and (pos[-1] >= T or (np.take(lut_len, wpos) == 0).any() or pos[-1] + step[pos[-1]] > T):
        raise CompactMapError("compact map code is corrupt or truncated (Huffman stream)")
    return np.take(lut_sym, wpos), o + nbytes


def _bucket_nsym(vmax: int) -> int:
    return int(vmax).bit_length() + 1


def _ec_pack(values: np.ndarray, vmax: int, direct: bool = False) -> bytes:
    """Entropy code of non-negative ints ``<= vmax``: with ``direct`` the values themselves are Huffman-coded;
    else the bucket ``s = bit_length(v)`` is, followed by the ``s - 1`` bits below the leading one (raw)."""
    values = np.asarray(values, np.int64)
    if values.size == 0:
        return b""
    if direct:
        return _huff_pack(values, vmax + 1)
    s = np.frexp(values.astype(np.float64))[1].astype(np.int64)  # bit_length (exact below 2**53)
    w = np.maximum(s - 1, 0)
    return _huff_pack(s, _bucket_nsym(vmax)) + _pack(values - np.where(s > 0, 1 << w, 0), w)


def _ec_unpack(buf: np.ndarray, n: int, vmax: int, direct: bool = False) -> tuple[np.ndarray, int]:
    """Inverse of :func:`_ec_pack`: ``(values, bytes consumed)``."""
    if n == 0:
        return np.zeros(0, np.int64), 0
    if direct:
        v, o = _huff_unpack(buf, n, vmax + 1)
    else:
        s, o = _huff_unpack(buf, n, _bucket_nsym(vmax))
        w = np.maximum(s - 1, 0)
        raw, used = _unpack(buf[o:], w)
        v, o = np.where(s > 0, 1 << w, 0) + raw, o + used
    if (v > vmax).any():
        raise CompactMapError("compact map code is corrupt (value out of range)")
    return v, o


def _log_max(mx: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Maxima as 8-bit codes on a log scale between the smallest and largest positive maximum: the code bytes
    (float32 ``log2`` range, then uint8[C], 0 = empty channel) and the maxima the decoder will see."""
    pos = mx > 0
    lo = np.float32(np.log2(mx[pos].min())) if pos.any() else np.float32(0)
    hi = np.float32(np.log2(mx[pos].max())) if pos.any() else np.float32(0)
    with np.errstate(divide="ignore"):
        q = np.where(pos, 1 + np.rint((np.log2(np.where(pos, mx, 1)) - lo) / max(hi - lo, 1e-30) * 254), 0)
    q = np.clip(q, 0, 255).astype(np.uint8)
    return np.array([lo, hi], "<f4").tobytes() + q.tobytes(), _log_max_values(lo, hi, q)


def _log_max_values(lo, hi, q: np.ndarray) -> np.ndarray:
    step = (np.float64(hi) - np.float64(lo)) / 254
    return np.where(q > 0, np.exp2(np.float64(lo) + (q.astype(np.float64) - 1) * step), 0).astype(np.float32)


def _level_values(lev: np.ndarray, levels: int, rho: float, geometric: bool) -> np.ndarray:
    """Value of level ``lev`` as a fraction of the channel maximum: ``rho .. 1`` linearly or geometrically."""
    t = lev / (levels - 1)
    return rho ** (1.0 - t) if geometric else rho + (1.0 - rho) * t


def encode_map(fmap, levels: int = DEFAULT_LEVELS, rho: float = DEFAULT_RHO, top: int | None = DEFAULT_TOP,
               version: int = DEFAULT_VERSION, log_max: bool = DEFAULT_LOG_MAX, spacing: str = DEFAULT_SPACING,
               cell_rho: float | None = DEFAULT_CELL_RHO, floor: float | None = DEFAULT_FLOOR) -> bytes:
    """Compact code of a non-negative ``(C, H, W)`` map (see module docstring). ``version`` 3 (``CMP3``,
    entropy-coded; ``log_max``: maxima in 8-bit log codes instead of float16; ``spacing``: ``"linear"`` or
    ``"geometric"`` levels; ``cell_rho``: also keep ``X_c(p) >= cell_rho · max_c' X_c'(p)`` when
    ``X_c(p) >= floor · m_c``, the levels then spanning ``floor · m_c .. m_c``); 1 and 2 write the earlier
    layouts (float16 maxima, linear levels, channel clipping only)."""
    if version not in (1, 2, 3):
        raise ValueError(f"version must be 1, 2 or 3, got {version}")
    if spacing not in ("linear", "geometric"):
        raise ValueError(f"spacing must be 'linear' or 'geometric', got {spacing!r}")
    if version < 3 and (log_max or spacing != "linear"):
        raise ValueError(f"log_max and geometric spacing need version 3, got version {version}")
    geometric = spacing == "geometric"
    X = np.asarray(fmap, dtype=np.float32)
    if X.ndim != 3:
        raise ValueError(f"encode_map expects a (C, H, W) map, got shape {X.shape}")
    C, H, W = X.shape
    if max(C, H, W) > 65535:
        raise ValueError(f"map {X.shape} too large for the compact format (each side must be < 65536)")
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must be in (0, 1), got {rho}")
    if top is not None and top < 1:
        raise ValueError(f"top must be >= 1 or None, got {top}")
    if cell_rho is not None and not (version == 3 and 0.0 < cell_rho <= 1.0):
        raise ValueError(f"cell_rho must be in (0, 1] and needs version 3, got {cell_rho} (version {version})")
    if floor is not None and (cell_rho is None or not 0.0 < floor <= rho):
        raise ValueError(f"floor must be in (0, rho] and comes with cell_rho, got {floor}")
    rho = float(np.float16(rho))  # stored as float16: encode with the value the decoder will see
    floor = rho if floor is None else float(np.float16(floor))  # the levels span floor·max .. max
    if not np.isfinite(X).all():
        raise ValueError("encode_map: the map has NaN or inf values")
    flat = np.clip(X.reshape(C, H * W), 0, None)
    mx = flat.max(axis=1) if H * W else np.zeros(C, np.float32)
    mx16 = mx.astype(np.float16)
    keep = (flat >= rho * mx[:, None]) & (mx[:, None] > 0)
    if cell_rho is not None and H * W:  # also the channels strong at their cell relative to the other channels
        keep |= (flat >= cell_rho * flat.max(axis=0)[None, :]) & (flat >= floor * mx[:, None]) & (flat > 0)
    rho = floor
    if top is not None and H * W > top:
        # at most ``top`` per channel: the largest of the kept cells (ties broken by position)
        kth = -np.partition(-np.where(keep, flat, -1.0), top - 1, axis=1)[:, top - 1]
        keep &= flat >= kth[:, None]
        over = keep.sum(1) > top
        if over.any():
            cum = np.cumsum(keep[over], axis=1)
            keep[over] &= cum <= top
    ch, pos = np.nonzero(keep)  # sorted by channel, then position
    counts = np.bincount(ch, minlength=C).astype(np.int64)
    if counts.max(initial=0) > 65535:
        raise ValueError("too many non-zeros in one channel for the compact format")
    vals = flat[ch, pos]
    with np.errstate(divide="ignore", invalid="ignore"):
        if geometric:
            rel = 1.0 - np.log(vals / mx[ch]) / np.log(rho)
        else:
            rel = (vals / mx[ch] - rho) / (1.0 - rho)
    lev = np.clip(np.rint(rel * (levels - 1)), 0, levels - 1).astype(np.int64)
    # position deltas within each channel (the first is the position itself)
    first = np.ones(len(pos), bool)
    first[1:] = ch[1:] != ch[:-1]
    delta = pos.astype(np.int64).copy()
    delta[~first] = pos[~first] - pos[np.flatnonzero(~first) - 1]
    lbits = np.full(len(lev), _bits_for(levels), np.int64)
    if version == 1:
        cwidth = np.zeros(C, np.int64)
        if len(pos):
            np.maximum.at(cwidth, ch, delta)
        widths = np.array([int(w).bit_length() or 1 for w in cwidth], np.int64) * (counts > 0)
        header = np.array([(MAGIC_V1, C, H, W, levels - 1, rho)], dtype=_HEADER).tobytes()
        parts = [header, mx16.astype("<f2").tobytes(), counts.astype("<u2").tobytes(), widths.astype("u1").tobytes(),
                 _pack(delta, widths[ch]), _pack(lev, lbits)]
        return b"".join(parts)
    gaps = delta[~first] - 1
    gch = ch[~first]
    if version == 3:
        flags = (_LOG_MAX if log_max else 0) | (_GEOMETRIC if geometric else 0)
        header = np.array([(MAGIC_V3, C, H, W, levels - 1, rho, flags)], dtype=_HEADER3).tobytes()
        maxima = _log_max(mx)[0] if log_max else mx16.astype("<f2").tobytes()
        cls = np.searchsorted(_GAP_CLASSES, counts, side="right")[gch]
        parts = [header, maxima, _ec_pack(counts, 65535), _ec_pack(delta[first], max(H * W - 1, 0))]
        parts += [_ec_pack(gaps[cls == c], max(H * W - 2, 0)) for c in range(len(_GAP_CLASSES) + 1)]
        parts.append(_ec_pack(lev, levels - 1, direct=levels <= 64))
        return b"".join(parts)
    k = _rice_k(gaps, gch, C)  # 0..15: 4 bits
    header = np.array([(MAGIC, C, H, W, levels - 1, rho)], dtype=_HEADER).tobytes()
    cbits = max(int(counts.max(initial=0)).bit_length(), 1)
    parts = [header, mx16.astype("<f2").tobytes(), bytes([cbits]), _pack(counts, np.full(C, cbits, np.int64)),
             _pack(k, np.full(C, 4, np.int64)),
             _pack(delta[first], np.full(int(first.sum()), _bits_for(H * W), np.int64)),
             _pack(gaps & ((1 << k[gch]) - 1), k[gch]), _pack(lev, lbits), _unary(gaps >> k[gch])]
    return b"".join(parts)


def decode_map(code) -> np.ndarray:
    """Inverse of :func:`encode_map` (up to the clipping and quantisation): ``(C, H, W)`` float32."""
    return decode_sparse(code).dense()


def decode_sparse(code) -> SparseMap:
    """The non-zero cells of a code as a :class:`~instance_search.ops.integral.SparseMap` (channel, flat
    position, float32 value), without building the dense map: what AML re-ranking works from."""
    buf = np.frombuffer(bytes(code) if not isinstance(code, (bytes, np.ndarray, memoryview)) else code, dtype=np.uint8)
    if buf.size < _HEADER.itemsize or bytes(buf[:4]) not in (MAGIC_V3, MAGIC, MAGIC_V1):
        raise CompactMapError("not a compact map code (bad magic or too short)")
    h = np.frombuffer(buf[:_HEADER.itemsize].tobytes(), dtype=_HEADER)[0]
    C, H, W, levels, rho = int(h["C"]), int(h["H"]), int(h["W"]), int(h["levels"]) + 1, float(h["rho"])
    if bytes(buf[:4]) == MAGIC_V3:
        mx, counts, delta, lev, geometric, o = _decode_v3(buf, C, H, W, levels)
    else:
        mx, counts, delta, lev, o = _decode_v12(buf, C, H, W, levels)
        geometric = False
    if o != buf.size:
        raise CompactMapError(f"compact map has {buf.size - o} unexpected trailing bytes")
    ch = np.repeat(np.arange(C), counts)
    # undo the delta coding within channels: cumulative sum restarted at each channel
    cs = np.cumsum(delta)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    base = np.repeat(cs[starts[counts > 0]] - delta[starts[counts > 0]], counts[counts > 0]) if len(ch) else cs
    pos = cs - base
    if len(pos) and (pos.max() >= H * W or (lev >= levels).any()):
        raise CompactMapError("compact map code is corrupt (position or level out of range)")
    vals = (mx[ch] * _level_values(lev, levels, rho, geometric)).astype(np.float32)
    return SparseMap((C, H, W), ch, pos, vals)


def _decode_v3(buf: np.ndarray, C: int, H: int, W: int, levels: int):
    """``CMP3`` body: ``(maxima, counts, position deltas, levels, geometric, bytes consumed)``."""
    o = _HEADER3.itemsize
    if buf.size < o:
        raise CompactMapError("compact map truncated: header")
    flags = int(buf[_HEADER.itemsize])
    if flags & ~(_LOG_MAX | _GEOMETRIC):
        raise CompactMapError(f"compact map code is corrupt (unknown flags {flags})")
    nmax = 8 + C if flags & _LOG_MAX else 2 * C
    if buf.size < o + nmax:
        raise CompactMapError(f"compact map truncated: {buf.size} bytes, header needs {o + nmax}")
    if flags & _LOG_MAX:
        lo, hi = np.frombuffer(buf[o:o + 8].tobytes(), "<f4")
        mx = _log_max_values(lo, hi, buf[o + 8:o + 8 + C])
    else:
        mx = np.frombuffer(buf[o:o + 2 * C].tobytes(), "<f2").astype(np.float32)
    o += nmax
    counts, used = _ec_unpack(buf[o:], C, 65535)
    o += used
    if ((counts > 0) & (mx <= 0)).any() or counts.max(initial=0) > H * W:
        raise CompactMapError("compact map code is corrupt (bad counts)")
    nz = counts > 0
    delta = np.zeros(int(counts.sum()), np.int64)
    first = np.zeros(len(delta), bool)
    first[np.cumsum(counts)[nz] - counts[nz]] = True
    delta[first], used = _ec_unpack(buf[o:], int(nz.sum()), max(H * W - 1, 0))
    o += used
    cls = np.searchsorted(_GAP_CLASSES, counts, side="right")[np.repeat(np.arange(C), counts)[~first]]
    gaps = np.zeros(len(cls), np.int64)
    for c in range(len(_GAP_CLASSES) + 1):  # one gap code per channel-count class
        sel = cls == c
        gaps[sel], used = _ec_unpack(buf[o:], int(sel.sum()), max(H * W - 2, 0))
        o += used
    delta[~first] = gaps + 1
    lev, used = _ec_unpack(buf[o:], len(delta), levels - 1, direct=levels <= 64)
    return mx, counts, delta, lev, bool(flags & _GEOMETRIC), o + used


def _decode_v12(buf: np.ndarray, C: int, H: int, W: int, levels: int):
    """``CMP1`` / ``CMP2`` body: ``(maxima, counts, position deltas, levels, bytes consumed)``."""
    v1 = bytes(buf[:4]) == MAGIC_V1
    o = _HEADER.itemsize
    need = o + C * (5 if v1 else 2) + (0 if v1 else 1)
    if buf.size < need:
        raise CompactMapError(f"compact map truncated: {buf.size} bytes, header needs {need}")
    mx = np.frombuffer(buf[o:o + 2 * C].tobytes(), "<f2").astype(np.float32)
    o += 2 * C
    if v1:
        counts = np.frombuffer(buf[o:o + 2 * C].tobytes(), "<u2").astype(np.int64)
        o += 2 * C
        widths = buf[o:o + C].astype(np.int64)  # bits per position delta
        o += C
    else:
        cbits = int(buf[o])
        if not 1 <= cbits <= 16:
            raise CompactMapError("compact map code is corrupt (bad count width)")
        counts, used = _unpack(buf[o + 1:], np.full(C, cbits, np.int64))
        o += 1 + used
        widths, used = _unpack(buf[o:], np.full(C, 4, np.int64))  # Rice parameter k per channel
        o += used
    if (widths > 32).any() or (v1 and ((widths == 0) & (counts > 0)).any()):
        raise CompactMapError("compact map code is corrupt (bad position widths)")
    ch = np.repeat(np.arange(C), counts)
    lbits = np.full(len(ch), _bits_for(levels), np.int64)
    if v1:
        delta, used = _unpack(buf[o:], widths[ch])
        o += used
        lev, used = _unpack(buf[o:], lbits)
        o += used
    else:
        first = np.zeros(len(ch), bool)
        first[np.cumsum(counts)[counts > 0] - counts[counts > 0]] = True
        gch = ch[~first]
        delta = np.zeros(len(ch), np.int64)
        delta[first], used = _unpack(buf[o:], np.full(int(first.sum()), _bits_for(H * W), np.int64))
        o += used
        rem, used = _unpack(buf[o:], widths[gch])
        o += used
        lev, used = _unpack(buf[o:], lbits)
        o += used
        ones = np.flatnonzero(np.unpackbits(buf[o:], bitorder="little"))
        if len(ones) < len(gch):
            raise CompactMapError("compact map truncated: gap quotients missing")
        ones = ones[:len(gch)]
        quot = np.diff(ones, prepend=-1) - 1
        o += (int(ones[-1]) + 8) // 8 if len(ones) else 0
        delta[~first] = (quot << widths[gch]) + rem + 1
    return mx, counts, delta, lev, o


def map_checksum(code) -> int:
    """CRC-32 (zlib) of one stored map code: the index keeps it per image, so that a flipped bit inside a map
    file is detected before the code is decoded (a damaged code can otherwise decode to a plausible map)."""
    buf = code if isinstance(code, (bytes, bytearray, memoryview)) else np.ascontiguousarray(code, np.uint8).data
    return zlib.crc32(buf) & 0xFFFFFFFF
