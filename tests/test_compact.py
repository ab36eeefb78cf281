"""Compact conv-map code (Tolias et al. 2016 Sec. 7) against a loop reference, on a real VGG16 conv5_3 map."""
import numpy as np
import pytest

from instance_search.index.compact import CompactMapError, decode_map, decode_sparse, encode_map


def reference(X, levels, rho, top):
    """Slow, obviously correct reconstruction: per channel keep the cells >= rho*max (at most `top`, the
    largest, earlier position first on ties), quantise to `levels` steps between rho*max and max."""
    C, H, W = X.shape
    rho = float(np.float16(rho))  # the header stores rho as float16
    out = np.zeros((C, H * W), np.float32)
    for c in range(C):
        v = np.clip(X[c].ravel(), 0, None)
        m = float(v.max())
        if m <= 0:
            continue
        m16 = float(np.float16(m))
        cand = [p for p in range(H * W) if v[p] >= rho * m]
        if top is not None and len(cand) > top:
            order = sorted(cand, key=lambda p: (-v[p], p))[:top]
            kth = v[order[-1]]
            cand = [p for p in cand if v[p] >= kth][:top]
        for p in cand:
            lev = min(max(round((v[p] / m - rho) / (1 - rho) * (levels - 1)), 0), levels - 1)
            out[c, p] = m16 * (rho + (1 - rho) * lev / (levels - 1))
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
        v2 = encode_map(vgg_conv5, levels=levels, rho=rho, top=top)
        assert v1[:4] == b"CMP1" and v2[:4] == b"CMP2"
        Y = decode_map(v2)
        np.testing.assert_array_equal(decode_map(v1), Y)
        np.testing.assert_allclose(Y[:64], reference(vgg_conv5[:64], levels, rho, top), rtol=1e-6, atol=1e-6)
        assert len(v2) < len(v1)
        sp = decode_sparse(v2)
        assert sp.shape == Y.shape and len(sp.value) == int((Y > 0).sum())
        np.testing.assert_array_equal(sp.dense(), Y)
    with pytest.raises(ValueError, match="version"):
        encode_map(vgg_conv5, version=3)


def test_rice_code_corruption_is_refused(vgg_conv5):
    code = encode_map(vgg_conv5[:32])
    with pytest.raises(CompactMapError):
        decode_map(code[:-3])  # unary quotients cut
    bad = bytearray(code)
    bad[13 + 2 * 32] = 0  # count width 0 (after the 13-byte header and 32 float16 maxima)
    with pytest.raises(CompactMapError, match="count width"):
        decode_map(bytes(bad))
