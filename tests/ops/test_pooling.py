"""Pooling ops and normalisations against slow, obviously-correct loop references, and the R-MAC
region grid against a literal transcription of Tolias et al.'s MATLAB code."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instance_search.ops import gem, l2n, mac, power_law, region_macs, rmac, rmac_regions, spoc

# ------------------------------------------------------------------------------------------ references


def mac_ref(X: np.ndarray) -> np.ndarray:
    C, H, W = X.shape
    out = np.full(C, -np.inf)
    for c in range(C):
        for y in range(H):
            for x in range(W):
                out[c] = max(out[c], X[c, y, x])
    return out


def spoc_ref(X: np.ndarray, prior: bool = False) -> np.ndarray:
    C, H, W = X.shape
    sigma = min(H, W) / 6.0  # a third of the distance from the centre to the closest border
    out = np.zeros(C)
    for c in range(C):
        for y in range(H):
            for x in range(W):
                a = 1.0
                if prior:
                    dy, dx = y - (H - 1) / 2, x - (W - 1) / 2
                    a = math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
                out[c] += a * X[c, y, x]
    return out


def gem_ref(X: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    C, H, W = X.shape
    out = np.zeros(C)
    for c in range(C):
        s = 0.0
        for y in range(H):
            for x in range(W):
                s += max(X[c, y, x], eps) ** p
        out[c] = (s / (H * W)) ** (1.0 / p)
    return out


def l2_ref(v: np.ndarray) -> np.ndarray:
    n = math.sqrt(sum(float(a) * float(a) for a in v))
    return v / n if n > 0 else v


def matlab_rmac_regions(H: int, W: int, L: int):
    """Line-by-line transcription of the MATLAB region loop of Tolias et al. (rmac_regionvec_act.m,
    gtolias/rmac), MATLAB semantics kept (1-based idx, NaN test, inclusive 0:n ranges, 1-based
    X(i_+[1:wl], j_+[1:wl], :) indexing), then converted to 0-indexed (x, y, w, h)."""
    ovr = 0.4
    steps = [2, 3, 4, 5, 6, 7]
    w = min(W, H)
    vals = [abs(((w ** 2 - w * ((max(H, W) - w) / (s - 1))) / w ** 2) - ovr) for s in steps]
    idx, best = 0, math.inf
    for k, v in enumerate(vals, start=1):  # MATLAB min: first minimum, 1-based index
        if v < best:
            idx, best = k, v
    Wd = Hd = 0
    if H < W:
        Wd = idx
    elif H > W:
        Hd = idx
    regions = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.float64(W - wl) / np.float64(l + Wd - 1)
        if np.isnan(b):
            b = 0.0
        cenW = [math.floor(wl2 + k * float(b)) - wl2 for k in range(0, l - 1 + Wd + 1)]
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.float64(H - wl) / np.float64(l + Hd - 1)
        if np.isnan(b):
            b = 0.0
        cenH = [math.floor(wl2 + k * float(b)) - wl2 for k in range(0, l - 1 + Hd + 1)]
        for i_ in cenH:
            for j_ in cenW:
                rows = [i_ + t for t in range(1, wl + 1)]  # MATLAB (1-based) row indices
                cols = [j_ + t for t in range(1, wl + 1)]
                if not rows or not cols:  # ~min(size(R))
                    continue
                assert rows[0] >= 1 and rows[-1] <= H and cols[0] >= 1 and cols[-1] <= W
                regions.append((cols[0] - 1, rows[0] - 1, len(cols), len(rows)))
    return regions


def grid(xs, ys, s):
    return [(x, y, s, s) for y in ys for x in xs]


# Derived by hand from the MATLAB rule (see the module docstring of ops/pooling.py):
#  (30, 40): w=30, overlap 1-b/30 for b=10/(steps-1) is closest to 0.4 at steps=2 -> Wd=1.
#   l=1 wl=30 x:{0,10}; l=2 wl=20 x:{0,10,20} y:{0,10}; l=3 wl=15 x:floor(6+k*25/3)-6={0,8,16,25},
#   y:floor(6+k*7.5)-6={0,7,15}.
#  (7, 10): w=7, b=3/(steps-1), steps=2 -> Wd=1. l=1 wl=7 x:{0,3}; l=2 wl=4 wl2=1 x:{0,3,6} y:{0,3};
#   l=3 wl=3 wl2=0 x:floor(k*7/3)={0,2,4,7} y:{0,2,4}.
#  (32, 32): square. l=1 wl=32; l=2 wl=21 wl2=9 b=11 -> {0,11}; l=3 wl=16 wl2=7 b=8 -> {0,8,16}.
EXPECTED = {
    (30, 40): [(0, 0, 30, 30), (10, 0, 30, 30)] + grid([0, 10, 20], [0, 10], 20)
    + grid([0, 8, 16, 25], [0, 7, 15], 15),
    (40, 30): [(0, 0, 30, 30), (0, 10, 30, 30)] + grid([0, 10], [0, 10, 20], 20)
    + grid([0, 7, 15], [0, 8, 16, 25], 15),
    (32, 32): [(0, 0, 32, 32)] + grid([0, 11], [0, 11], 21) + grid([0, 8, 16], [0, 8, 16], 16),
    (7, 10): [(0, 0, 7, 7), (3, 0, 7, 7)] + grid([0, 3, 6], [0, 3], 4) + grid([0, 2, 4, 7], [0, 2, 4], 3),
    # (10, 40): overlap 1-b/10 with b=30/(steps-1) is exactly 0.4 at steps=6 -> Wd=5 (level 1 only).
    (10, 40): [(x, 0, 10, 10) for x in (0, 6, 12, 18, 24, 30)],
}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------ normalize


def test_l2n_numpy_and_torch(rng):
    a = rng.normal(size=(5, 7)).astype(np.float32)
    a[2] = 0.0
    out = l2n(a)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    for i in range(5):
        np.testing.assert_allclose(out[i], l2_ref(a[i].astype(np.float64)), rtol=1e-6, atol=1e-7)
    assert not np.isnan(out).any()
    t = l2n(torch.from_numpy(a))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-6)
    cols = l2n(a.astype(np.float64), dim=0)
    np.testing.assert_allclose(np.linalg.norm(cols, axis=0), 1.0)
    assert l2n(np.array([3, 4])).tolist() == pytest.approx([0.6, 0.8])  # integers become floats


def test_power_law(rng):
    a = np.array([-4.0, -0.25, 0.0, 0.25, 9.0])
    np.testing.assert_allclose(power_law(a), [-2.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(power_law(a, alpha=1.0), a)
    t = power_law(torch.tensor(a, dtype=torch.float32), alpha=0.5)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), [-2.0, -0.5, 0.0, 0.5, 3.0], rtol=1e-6)
    with pytest.raises(ValueError):
        power_law(a, alpha=0)


# ------------------------------------------------------------------------------------------ global pooling

HAND = np.array([[[1.0, 2.0, 0.0], [0.5, 0.0, 3.0]],
                 [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                 [[-1.0, 4.0, 2.0], [0.0, 1.0, 1.0]]])  # (C=3, H=2, W=3)


def test_mac_hand_and_random(rng):
    assert mac(torch.tensor(HAND)).tolist() == [3.0, 0.0, 4.0]
    X = rng.normal(size=(6, 5, 7))
    np.testing.assert_allclose(mac(torch.from_numpy(X)).numpy(), mac_ref(X))
    B = rng.normal(size=(2, 6, 5, 7))
    out = mac(torch.from_numpy(B))
    assert out.shape == (2, 6)
    for b in range(2):
        np.testing.assert_allclose(out[b].numpy(), mac_ref(B[b]))


def test_spoc_hand_and_random(rng):
    assert spoc(torch.tensor(HAND)).tolist() == [6.5, 0.0, 7.0]
    X = rng.random(size=(4, 6, 9))
    np.testing.assert_allclose(spoc(torch.from_numpy(X)).numpy(), spoc_ref(X), rtol=1e-12)
    np.testing.assert_allclose(spoc(torch.from_numpy(X), center_prior=True).numpy(),
                               spoc_ref(X, prior=True), rtol=1e-12)
    B = torch.from_numpy(rng.random(size=(3, 4, 6, 9)))
    np.testing.assert_allclose(spoc(B, center_prior=True)[1].numpy(), spoc_ref(B[1].numpy(), prior=True))


def test_gem_hand_and_random(rng):
    # p = 1 is the mean of the eps-clamped activations (zeros and negatives count as eps).
    out = gem(torch.tensor(HAND), p=1)
    np.testing.assert_allclose(out.numpy(), [(6.5 + 2e-6) / 6, 1e-6, (1e-6 + 4 + 2 + 1e-6 + 1 + 1) / 6], rtol=1e-9)
    X = rng.random(size=(5, 4, 6))
    for p in (1.0, 3.0, 7.5):
        np.testing.assert_allclose(gem(torch.from_numpy(X), p=p).numpy(), gem_ref(X, p), rtol=1e-10)
    np.testing.assert_allclose(gem(torch.from_numpy(X), p=torch.tensor(3.0, dtype=torch.float64)).numpy(),
                               gem_ref(X, 3.0), rtol=1e-10)
    big = gem(torch.from_numpy(X), p=200.0).numpy()  # tends to MAC
    np.testing.assert_allclose(big, mac_ref(X), rtol=0.02)
    with pytest.raises(ValueError):
        gem(torch.from_numpy(X), p=0)


def test_bad_maps():
    with pytest.raises(ValueError):
        mac(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        spoc(torch.zeros(1, 2, 0, 4))
    with pytest.raises(TypeError):
        mac(np.zeros((2, 3, 3)))


# ------------------------------------------------------------------------------------------ R-MAC regions


@pytest.mark.parametrize("hw", sorted(EXPECTED))
def test_rmac_regions_hand_derived(hw):
    got = rmac_regions(*hw, levels=1 if hw == (10, 40) else 3)
    assert got.dtype == np.int64 and got.shape[1] == 4
    assert [tuple(r) for r in got.tolist()] == EXPECTED[hw]
    assert [tuple(r) for r in got.tolist()] == matlab_rmac_regions(*hw, 1 if hw == (10, 40) else 3)


def test_rmac_regions_match_matlab_transcription():
    for H in range(2, 41):
        for W in range(2, 41):
            for L in (1, 3, 5):
                got = [tuple(r) for r in rmac_regions(H, W, levels=L).tolist()]
                assert got == matlab_rmac_regions(H, W, L), (H, W, L)


def test_rmac_regions_large_and_inside():
    for H, W in [(64, 85), (85, 64), (37, 100), (100, 13), (24, 32)]:
        r = rmac_regions(H, W, levels=4)
        assert [tuple(x) for x in r.tolist()] == matlab_rmac_regions(H, W, 4)
        x, y, w, h = r.T
        assert (x >= 0).all() and (y >= 0).all() and (x + w <= W).all() and (y + h <= H).all()
        assert (w == h).all()


def test_rmac_regions_tiny_and_invalid():
    assert rmac_regions(1, 1).tolist() == [[0, 0, 1, 1]]
    assert rmac_regions(1, 7).tolist() == [[0, 0, 7, 1]]
    assert rmac_regions(5, 1, levels=4).tolist() == [[0, 0, 1, 5]]
    for bad in [(0, 5, 3), (5, 0, 3), (4, 4, 0)]:
        with pytest.raises(ValueError):
            rmac_regions(*bad)


def test_region_macs_matches_matlab_indexing(rng):
    """region_macs on rmac_regions equals MATLAB's max over X(i_+[1:wl], j_+[1:wl], :)."""
    H, W, C = 9, 13, 5
    X = rng.normal(size=(C, H, W))
    regions = rmac_regions(H, W)
    got = region_macs(torch.from_numpy(X), regions).numpy()
    assert got.shape == (len(regions), C)
    for k, (x, y, w, h) in enumerate(regions.tolist()):
        sub = X[:, y:y + h, x:x + w]  # rows y+1..y+h in MATLAB numbering
        np.testing.assert_allclose(got[k], mac_ref(sub))
    B = torch.from_numpy(rng.normal(size=(2, C, H, W)))
    gb = region_macs(B, regions)
    assert gb.shape == (2, len(regions), C)
    np.testing.assert_allclose(gb[1].numpy(), region_macs(B[1], regions).numpy())
    with pytest.raises(ValueError):
        region_macs(torch.from_numpy(X), [[10, 0, 4, 4]])  # runs past the right border
    with pytest.raises(ValueError):
        region_macs(torch.from_numpy(X), np.zeros((0, 4), int))


# ------------------------------------------------------------------------------------------ R-MAC vector


def rmac_ref(X: np.ndarray, regions, whiten=None) -> np.ndarray:
    acc = None
    for x, y, w, h in regions:
        v = l2_ref(mac_ref(X[:, y:y + h, x:x + w]))
        if whiten is not None:
            v = l2_ref(whiten(v))
        acc = v if acc is None else acc + v
    return l2_ref(acc)


def test_rmac_hand_made_3x3():
    # Channel 0 fires only at the top-left cell (3), channel 1 only at the bottom-right cell (4).
    X = torch.zeros(2, 3, 3, dtype=torch.float64)
    X[0, 0, 0], X[1, 2, 2] = 3.0, 4.0
    # Regions of a 3x3 map: the full map, four 2x2 and nine 1x1 cells.
    assert rmac_regions(3, 3).tolist() == ([[0, 0, 3, 3]] + [[x, y, 2, 2] for y in (0, 1) for x in (0, 1)]
                                           + [[x, y, 1, 1] for y in (0, 1, 2) for x in (0, 1, 2)])
    # full map -> (3,4)/5; 2x2 top-left -> (1,0); 2x2 bottom-right -> (0,1); cell (0,0) -> (1,0);
    # cell (2,2) -> (0,1); all other regions are zero vectors. Sum (2.6, 2.8), then L2.
    expected = np.array([2.6, 2.8]) / math.sqrt(2.6 ** 2 + 2.8 ** 2)
    np.testing.assert_allclose(rmac(X).numpy(), expected, rtol=1e-12)
    # With a "whitening" that doubles channel 1: (0.6, 1.6)/sqrt(2.92) + 2 * (1, 0) + 2 * (0, 1).
    s = math.sqrt(0.6 ** 2 + 1.6 ** 2)
    v = np.array([0.6 / s + 2, 1.6 / s + 2])
    got = rmac(X, whitening=lambda M: M * torch.tensor([1.0, 2.0], dtype=M.dtype))
    np.testing.assert_allclose(got.numpy(), v / np.linalg.norm(v), rtol=1e-12)


def test_rmac_random_against_reference(rng):
    X = rng.random(size=(8, 11, 15))
    regions = rmac_regions(11, 15, levels=3)
    np.testing.assert_allclose(rmac(torch.from_numpy(X)).numpy(), rmac_ref(X, regions.tolist()), rtol=1e-10)
    A = rng.normal(size=(8, 6))
    got = rmac(torch.from_numpy(X), whitening=lambda M: M @ torch.from_numpy(A))
    np.testing.assert_allclose(got.numpy(), rmac_ref(X, regions.tolist(), whiten=lambda v: v @ A), rtol=1e-10)
    assert got.shape == (6,)
    # custom regions and batches
    custom = [[0, 0, 5, 5], [3, 2, 4, 9]]
    np.testing.assert_allclose(rmac(torch.from_numpy(X), regions=custom).numpy(), rmac_ref(X, custom),
                               rtol=1e-10)
    B = torch.from_numpy(rng.random(size=(3, 8, 11, 15)))
    out = rmac(B, levels=2)
    assert out.shape == (3, 8)
    np.testing.assert_allclose(out[2].numpy(), rmac_ref(B[2].numpy(), rmac_regions(11, 15, 2).tolist()),
                               rtol=1e-10)
    np.testing.assert_allclose(torch.linalg.norm(out, dim=1).numpy(), 1.0)


def test_rmac_tiny_map_is_mac():
    X = torch.rand(4, 1, 6)
    np.testing.assert_allclose(rmac(X).numpy(), l2_ref(mac_ref(X.numpy()).astype(np.float64)), rtol=1e-6)
