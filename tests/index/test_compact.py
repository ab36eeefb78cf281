"""Compact conv-map code (Tolias et al. 2016 Sec. 7) against a loop reference, on a real VGG16 conv5_3 map:
formats CMP1, CMP2 and CMP3 (entropy-coded), and the Huffman coder against a bit-by-bit decoder."""
import math

import numpy as np
import pytest

from instance_search.index import compact as cm
from instance_search.index.compact import CompactMapError, decode_map, decode_sparse, encode_map


def reference(X, levels, rho, top, spacing="linear", log_max=False, cell_rho=None, floor=None):
    """Slow, obviously correct reconstruction: per channel keep the cells >= rho*max (at most `top`, the
    largest, earlier position first on ties), quantise to `levels` steps between rho*max and max (equal
    differences, or equal ratios for "geometric"); the maximum as float16, or as an 8-bit code on a log2 scale
    between the smallest and largest positive channel maxima."""
    C, H, W = X.shape
    rho = float(np.float16(rho))  # the header stores rho as float16
    floor = rho if floor is None else float(np.float16(floor))
    out = np.zeros((C, H * W), np.float32)
    cellmax = [max(float(np.clip(X[c].ravel()[p], 0, None)) for c in range(C)) for p in range(H * W)]
    mxs = [float(np.clip(X[c], 0, None).max()) for c in range(C)]
    lo = float(np.float32(np.log2(min(m for m in mxs if m > 0))))
    hi = float(np.float32(np.log2(max(mxs))))
    for c in range(C):
        v = np.clip(X[c].ravel(), 0, None)
        m = mxs[c]
        if m <= 0:
            continue
        if log_max:
            q = 1 + round((math.log2(m) - lo) / max(hi - lo, 1e-30) * 254)
            m_dec = float(np.float32(2.0 ** (lo + (q - 1) * (hi - lo) / 254)))
        else:
            m_dec = float(np.float16(m))
        cand = [p for p in range(H * W) if v[p] >= rho * m or (
            cell_rho is not None and v[p] > 0 and v[p] >= cell_rho * cellmax[p] and v[p] >= floor * m)]
        if top is not None and len(cand) > top:
            order = sorted(cand, key=lambda p: (-v[p], p))[:top]
            kth = v[order[-1]]
            cand = [p for p in cand if v[p] >= kth][:top]
        for p in cand:
            f = floor  # the levels span floor·max .. max (floor = rho without cell_rho)
            if spacing == "geometric":
                t = 1 - math.log(v[p] / m) / math.log(f)
            else:
                t = (v[p] / m - f) / (1 - f)
            lev = min(max(round(t * (levels - 1)), 0), levels - 1)
            frac = f ** (1 - lev / (levels - 1)) if spacing == "geometric" else f + (1 - f) * lev / (levels - 1)
            out[c, p] = m_dec * frac
    return out.reshape(C, H, W)


@pytest.mark.parametrize("levels,rho,top", [(8, 0.3, 64), (8, 0.1, None), (16, 0.5, 5)])
def test_roundtrip_matches_reference(vgg_conv5, levels, rho, top):
    X = vgg_conv5[:64]  # 64 channels keep the loop reference quick
    code = encode_map(X, levels=levels, rho=rho, top=top)
    Y = decode_map(code)
    R = reference(X, levels, rho, top)
    assert Y.shape == X.shape
    np.testing.assert_allclose(Y, R, rtol=1e-6, atol=1e-6)
    # the MAC survives (to float16)
    np.testing.assert_allclose(Y.max(axis=(1, 2)), X.max(axis=(1, 2)), rtol=1e-3)


def test_size_and_full_map(vgg_conv5):
    X = vgg_conv5
    code = encode_map(X)
    Y = decode_map(code)
    nnz = int((Y > 0).sum())
    assert nnz <= 64 * X.shape[0]
    # bytes: header + 5 per channel + bit-packed positions and 3-bit levels, far below float16 (2 B per cell)
    assert len(code) < 5 * X.shape[0] + 2 * nnz + 32 < X.size * 2 / 10


def test_corrupt_codes_are_refused(vgg_conv5):
    code = encode_map(vgg_conv5[:16])
    with pytest.raises(CompactMapError, match="magic"):
        decode_map(b"XXXX" + code[4:])
    with pytest.raises(CompactMapError, match="truncated"):
        decode_map(code[: len(code) // 2])
    with pytest.raises(CompactMapError, match="trailing"):
        decode_map(code + b"\0\0")
    with pytest.raises(ValueError, match="C, H, W"):
        encode_map(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        encode_map(np.full((2, 3, 3), np.nan))


def test_empty_and_zero_maps():
    Z = np.zeros((4, 3, 5), np.float32)
    np.testing.assert_array_equal(decode_map(encode_map(Z)), Z)
    E = np.zeros((4, 0, 5), np.float32)
    assert decode_map(encode_map(E)).shape == (4, 0, 5)


def test_previous_format_still_decodes_and_rice_is_smaller(vgg_conv5):
    """CMP1 codes (fixed-width deltas, the format of indexes written before) decode to the same map as the
    current Rice-coded CMP2 ones, which are smaller; decode_sparse gives the same cells as decode_map."""
    for levels, rho, top in [(8, 0.3, 64), (4, 0.4, 16), (16, 0.1, None)]:
        v1 = encode_map(vgg_conv5, levels=levels, rho=rho, top=top, version=1)
        v2 = encode_map(vgg_conv5, levels=levels, rho=rho, top=top, version=2)
        assert v1[:4] == b"CMP1" and v2[:4] == b"CMP2"
        Y = decode_map(v2)
        np.testing.assert_array_equal(decode_map(v1), Y)
        np.testing.assert_allclose(Y[:64], reference(vgg_conv5[:64], levels, rho, top), rtol=1e-6, atol=1e-6)
        assert len(v2) < len(v1)
        sp = decode_sparse(v2)
        assert sp.shape == Y.shape and len(sp.value) == int((Y > 0).sum())
        np.testing.assert_array_equal(sp.dense(), Y)
    with pytest.raises(ValueError, match="version"):
        encode_map(vgg_conv5, version=4)


def test_rice_code_corruption_is_refused(vgg_conv5):
    code = encode_map(vgg_conv5[:32], version=2)
    with pytest.raises(CompactMapError):
        decode_map(code[:-3])  # unary quotients cut
    bad = bytearray(code)
    bad[13 + 2 * 32] = 0  # count width 0 (after the 13-byte header and 32 float16 maxima)
    with pytest.raises(CompactMapError, match="count width"):
        decode_map(bytes(bad))


@pytest.mark.parametrize("levels,rho,top,spacing,log_max", [
    (8, 0.3, 64, "linear", False), (8, 0.25, None, "geometric", False), (16, 0.3, 64, "linear", True),
    (4, 0.2, 5, "geometric", True), (100, 0.3, 64, "linear", False)])
def test_cmp3_matches_reference(vgg_conv5, levels, rho, top, spacing, log_max):
    X = vgg_conv5[:64]
    code = encode_map(X, levels=levels, rho=rho, top=top, spacing=spacing, log_max=log_max)
    assert code[:4] == b"CMP3"
    R = reference(X, levels, rho, top, spacing, log_max)
    np.testing.assert_allclose(decode_map(code), R, rtol=1e-5, atol=1e-6)
    sp = decode_sparse(code)
    assert len(sp.value) == int((R > 0).sum()) and (sp.value > 0).all()
    if log_max:  # 8-bit log codes: the MAC within half a step (range / 254 in log2) of the float map's
        mx = X.max(axis=(1, 2))
        lg = np.log2(mx[mx > 0])
        err = np.abs(np.log2(decode_map(code).max(axis=(1, 2))[mx > 0]) - lg)
        assert err.max() <= (lg.max() - lg.min()) / 254 / 2 + 1e-6


def test_all_formats_decode_alike_and_cmp3_is_smallest(vgg_conv5):
    """CMP1, CMP2 and CMP3 codes of the same settings decode to the same cells; CMP3 is the smallest."""
    for levels, rho, top in [(8, 0.3, 64), (4, 0.4, 16), (16, 0.1, None)]:
        codes = [encode_map(vgg_conv5, levels=levels, rho=rho, top=top, version=v) for v in (1, 2, 3)]
        assert [c[:4] for c in codes] == [b"CMP1", b"CMP2", b"CMP3"]
        maps = [decode_sparse(c) for c in codes]
        for m in maps[1:]:
            for a, b in zip(m, maps[0]):
                np.testing.assert_array_equal(a, b)
        assert len(codes[2]) < len(codes[1]) < len(codes[0])
    assert encode_map(vgg_conv5)[:4] == b"CMP3"  # the default
    with pytest.raises(ValueError, match="version 3"):
        encode_map(vgg_conv5, version=2, spacing="geometric")
    with pytest.raises(ValueError, match="spacing"):
        encode_map(vgg_conv5, spacing="log")


def _slow_huffman_decode(stream: bytes, n: int, lengths: np.ndarray) -> list[int]:
    """Bit by bit: grow a prefix until it is one of the canonical code words."""
    codes = cm._canonical(lengths)
    table = {(int(lengths[s]), int(codes[s])): s for s in range(len(lengths)) if lengths[s]}
    bits = np.unpackbits(np.frombuffer(stream, np.uint8))
    out, i = [], 0
    while len(out) < n:
        ln, v = 0, 0
        while (ln, v) not in table:
            v, ln, i = (v << 1) | int(bits[i]), ln + 1, i + 1
        out.append(table[(ln, v)])
    return out


@pytest.mark.parametrize("seed,n,nsym", [(0, 1, 1), (1, 5, 3), (2, 3000, 17), (3, 20000, 200), (4, 777, 2)])
def test_huffman_against_bitwise_decoder(seed, n, nsym):
    rng = np.random.default_rng(seed)
    sym = np.minimum(rng.geometric(0.3, n) - 1, nsym - 1)  # skewed, as gap buckets and levels are
    code = cm._huff_pack(sym, nsym)
    buf = np.frombuffer(code, np.uint8)
    lengths, o = cm._unpack(buf, np.full(nsym, 4, np.int64))
    assert (lengths <= cm._MAX_LEN).all() and np.sum(2.0 ** -lengths[lengths > 0]) <= 1
    nbytes = int(buf[o:o + 4].view("<u4")[0])
    stream = code[o + 4:o + 4 + nbytes]
    assert _slow_huffman_decode(stream, n, lengths) == sym.tolist()
    dec, used = cm._huff_unpack(buf, n, nsym)
    assert used == len(code)
    np.testing.assert_array_equal(dec, sym)
    # optimal: no longer than the entropy + 1 bit per symbol, and not below the entropy
    p = np.bincount(sym, minlength=nsym) / n
    H = -(p[p > 0] * np.log2(p[p > 0])).sum()
    bits = int((lengths[sym]).sum())
    assert n * H - 1e-6 <= bits <= n * (H + 1)
    v = rng.integers(0, 5000, n) * (rng.random(n) < 0.5)  # half zeros, like the position gaps
    packed = cm._ec_pack(v, 5000)
    back, used = cm._ec_unpack(np.frombuffer(packed, np.uint8), n, 5000)
    np.testing.assert_array_equal(back, v)
    assert used == len(packed)


def test_huffman_length_limit():
    """Fibonacci counts make a Huffman code deeper than 15 bits: the lengths are limited and still decode."""
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])
    sym = np.repeat(np.arange(25), fib)
    lengths = cm._huffman_lengths(np.bincount(sym))
    assert lengths.max() <= cm._MAX_LEN and np.sum(2.0 ** -lengths) <= 1
    dec, _ = cm._huff_unpack(np.frombuffer(cm._huff_pack(sym, 25), np.uint8), len(sym), 25)
    np.testing.assert_array_equal(dec, sym)


def test_cmp3_corrupt_codes_are_refused(vgg_conv5):
    code = encode_map(vgg_conv5[:32], log_max=True)
    with pytest.raises(CompactMapError, match="truncated"):
        decode_map(code[:40])
    for cut in (1, 7, len(code) // 3):
        with pytest.raises(CompactMapError):
            decode_map(code[:-cut])
    with pytest.raises(CompactMapError, match="trailing"):
        decode_map(code + b"\0")
    bad = bytearray(code)
    bad[13] = 0x80  # unknown flag
    with pytest.raises(CompactMapError, match="flags"):
        decode_map(bytes(bad))
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(30):  # random byte damage after the header: refused, or decoded to a valid map
        bad = bytearray(code)
        i = int(rng.integers(14 + 8 + 32, len(code)))
        bad[i] ^= int(rng.integers(1, 256))
        try:
            sp = decode_sparse(bytes(bad))
        except CompactMapError:
            refused += 1
            continue
        assert sp.position.max() < 24 * 16 and (sp.value >= 0).all()
    assert refused > 0


def test_cmp3_edge_maps():
    for shape in [(4, 3, 5), (4, 0, 5), (3, 1, 1), (2, 1, 2)]:
        Z = np.zeros(shape, np.float32)
        np.testing.assert_array_equal(decode_map(encode_map(Z)), Z)
    one = np.zeros((3, 1, 1), np.float32)
    one[1] = 2.5
    np.testing.assert_allclose(decode_map(encode_map(one, log_max=True)), one, rtol=1e-6)
    x = np.random.default_rng(0).random((5, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(decode_map(encode_map(x, levels=256, rho=0.01, top=None)), reference(x, 256, 0.01, None),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell_rho,floor,spacing,top", [(0.4, 0.05, "geometric", None), (0.5, 0.1, "linear", 30),
                                                        (1.0, 0.1, "geometric", None)])
def test_cell_relative_selection_matches_reference(vgg_conv5, cell_rho, floor, spacing, top):
    """cell_rho also keeps the channels strong at a cell relative to the other channels there (down to
    floor·max); the levels then span floor·max .. max."""
    X = vgg_conv5[:48]
    code = encode_map(X, levels=6, rho=0.3, top=top, spacing=spacing, log_max=True, cell_rho=cell_rho, floor=floor)
    R = reference(X, 6, 0.3, top, spacing, True, cell_rho, floor)
    np.testing.assert_allclose(decode_map(code), R, rtol=1e-5, atol=1e-6)
    plain = decode_map(encode_map(X, levels=6, rho=0.3, top=top, spacing=spacing, log_max=True))
    assert ((R > 0) | (plain == 0)).all() and (R > 0).sum() > (plain > 0).sum()  # a superset of the cells
    with pytest.raises(ValueError, match="floor"):
        encode_map(X, floor=0.1)
    with pytest.raises(ValueError, match="cell_rho"):
        encode_map(X, cell_rho=0.4, version=2)
