"""Compact storage of conv feature maps for re-ranking (Tolias, Sicre & Jégou 2016, Sec. 7).

A non-negative ``(C, H, W)`` map (conv5 after ReLU) is kept as:

* per channel its maximum ``m_c`` (float16) — so the image's MAC survives exactly (to fp16);
* the cells with ``X_c(p) >= rho · m_c`` only ("clipping" the small activations, which max-pooling and its
  ``α = 10`` approximation hardly see: ``rho^10 ≤ 6e-6`` for ``rho = 0.3``), at most ``top`` per channel;
* their values quantised to ``levels`` steps between ``rho · m_c`` and ``m_c`` (paper: 8 levels, 3 bits);
* their positions, sorted within the channel and delta-coded: the first position in ``ceil(log2(H·W))``
  bits, the gaps ``d ≥ 1`` by Golomb–Rice coding (Golomb 1966; Rice 1979) with one parameter ``k`` per channel:
  ``(d-1) mod 2^k`` in ``k`` bits and ``(d-1) >> k`` in unary (the number of zeros before a one). The unary parts
  go to a stream of their own, so decoding stays vectorised (the ones' positions give the quotients).

Layout of one code (little-endian): ``b"CMP2"``, ``C, H, W`` (uint16 each), ``levels - 1`` (uint8), ``rho``
(float16), then ``max`` float16[C], one byte ``b`` and the per-channel counts in ``b`` bits each, ``k`` in 4 bits
each, then four bit-streams: first positions, gap remainders, levels (``ceil(log2(levels))`` bits each), gap
quotients (unary); every bit-stream is padded to a byte.
Codes of the previous format ``b"CMP1"`` (one fixed width per channel for all position deltas, ``width``
uint8[C] in place of ``k``; position stream, then level stream) are still decoded. The header keeps ``rho``
and ``levels``, so codes written with any settings decode without being told them.
Encoding and decoding are vectorised over all non-zeros (no Python loop per cell or channel).
"""
from __future__ import annotations

import numpy as np

from ..ops.integral import SparseMap

MAGIC = b"CMP2"
MAGIC_V1 = b"CMP1"
_HEADER = np.dtype([("magic", "S4"), ("C", "<u2"), ("H", "<u2"), ("W", "<u2"), ("levels", "u1"), ("rho", "<f2")])

__all__ = ["encode_map", "decode_map", "decode_sparse", "SparseMap", "CompactMapError", "DEFAULT_LEVELS", "DEFAULT_RHO",
           "DEFAULT_TOP"]

DEFAULT_LEVELS = 8
DEFAULT_RHO = 0.3
DEFAULT_TOP = 64


class CompactMapError(ValueError):
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


def encode_map(fmap, levels: int = DEFAULT_LEVELS, rho: float = DEFAULT_RHO, top: int | None = DEFAULT_TOP,
               version: int = 2) -> bytes:
    """Compact code of a non-negative ``(C, H, W)`` map (see module docstring); ``version=1`` writes the
    previous ``CMP1`` layout (kept for compatibility tests)."""
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version}")
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
    rho = float(np.float16(rho))  # stored as float16: encode with the value the decoder will see
    if not np.isfinite(X).all():
        raise ValueError("encode_map: the map has NaN or inf values")
    flat = np.clip(X.reshape(C, H * W), 0, None)
    mx = flat.max(axis=1) if H * W else np.zeros(C, np.float32)
    mx16 = mx.astype(np.float16)
    keep = (flat >= rho * mx[:, None]) & (mx[:, None] > 0)
    if top is not None and H * W > top:
        # at most ``top`` per channel: the largest (ties broken by position)
        kth = -np.partition(-flat, top - 1, axis=1)[:, top - 1]
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
    if buf.size < _HEADER.itemsize or bytes(buf[:4]) not in (MAGIC, MAGIC_V1):
        raise CompactMapError("not a compact map code (bad magic or too short)")
    v1 = bytes(buf[:4]) == MAGIC_V1
    h = np.frombuffer(buf[:_HEADER.itemsize].tobytes(), dtype=_HEADER)[0]
    C, H, W, levels, rho = int(h["C"]), int(h["H"]), int(h["W"]), int(h["levels"]) + 1, float(h["rho"])
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
    if o != buf.size:
        raise CompactMapError(f"compact map has {buf.size - o} unexpected trailing bytes")
    # undo the delta coding within channels: cumulative sum restarted at each channel
    cs = np.cumsum(delta)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    base = np.repeat(cs[starts[counts > 0]] - delta[starts[counts > 0]], counts[counts > 0]) if len(ch) else cs
    pos = cs - base
    if len(pos) and (pos.max() >= H * W or (lev >= levels).any()):
        raise CompactMapError("compact map code is corrupt (position or level out of range)")
    vals = (mx[ch] * (rho + (1.0 - rho) * lev / (levels - 1))).astype(np.float32)
    return SparseMap((C, H, W), ch, pos, vals)
