"""Integral max-pooling and AML (Tolias et al. 2016, Sec. 5) against slow loop references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.ops import integral as I

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)


def sparse_map(rng, C=32, H=12, W=16, density=0.1, scale=20.0):
    """Random non-negative ReLU-like map: mostly zeros, gamma-distributed activations."""
    return ((rng.random((C, H, W)) < density) * rng.gamma(2.0, scale, (C, H, W))).astype(np.float32)


def planted_map(rng, box, C=64, H=16, W=24):
    """Background strong in channels C/2.., weak in 0..C/2; the object puts one strong peak per channel 0..C/2
    inside ``box`` (x, y, w, h), with peaks on each of the box's four borders."""
    x, y, w, h = box
    X = np.zeros((C, H, W), dtype=np.float32)
    half = C // 2
    X[half:] = (rng.random((C - half, H, W)) < 0.3) * rng.gamma(2.0, 15.0, (C - half, H, W))
    X[:half] = rng.random((half, H, W)) * 3.0
    ys = rng.integers(y, y + h, half)
    xs = rng.integers(x, x + w, half)
    xs[0], xs[1], ys[2], ys[3] = x, x + w - 1, y, y + h - 1  # touch every border
    X[np.arange(half), ys, xs] = rng.uniform(60.0, 100.0, half)
    return X


def cos_rows(A, B):
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    return (A * B).sum(1) / np.maximum(np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1), 1e-300)


def test_window_sums_equal_brute_force():
    rng = np.random.default_rng(0)
    X = sparse_map(rng, C=6, H=7, W=9, density=0.5)
    pi = I.power_integral(X, alpha=3.0)
    assert pi.ii.shape == (6, 8, 10) and pi.shape == (6, 7, 9)
    wins = I.all_windows(7, 9)
    P = (X.astype(np.float64) / pi.scale.numpy()[:, None, None]) ** 3.0
    ref = np.stack([P[:, y:y + h, x:x + w].sum((1, 2)) for x, y, w, h in wins])
    np.testing.assert_allclose(pi.window_sums(wins).numpy(), ref, rtol=1e-12, atol=1e-14)
    # the un-scaled sums (Eq. 3 before the root) follow from the kept scale
    approx = I.window_maxpool_approx(pi, wins)
    np.testing.assert_allclose(approx.astype(np.float64) ** 3,
                               ref * pi.scale.numpy() ** 3, rtol=1e-4, atol=1e-6)


def test_no_overflow_and_single_cells_exact():
    rng = np.random.default_rng(1)
    X = sparse_map(rng, C=4, H=5, W=5, density=0.6, scale=500.0)  # X^10 ~ 1e30+: overflows float32 unscaled
    pi = I.power_integral(torch.from_numpy(X), alpha=10.0)
    cells = np.array([(x, y, 1, 1) for y in range(5) for x in range(5)])
    v = I.window_maxpool_approx(pi, cells)
    assert isinstance(v, torch.Tensor) and v.dtype == torch.float32 and torch.isfinite(v).all()
    ref = X.reshape(4, -1).T
    resolvable = ref >= 0.05 * ref.max(0)  # below ~0.04 s_i, float64 integral images cannot resolve (floor)
    np.testing.assert_allclose(v.numpy()[resolvable], ref[resolvable], rtol=1e-5)
    low, lref = v.numpy()[~resolvable], ref[~resolvable]
    assert (np.isclose(low, lref, rtol=1e-5) | (low == 0)).all()  # exact, or zeroed as rounding noise
    with pytest.raises(ValueError):
        I.power_integral(-X)
    with pytest.raises(ValueError):
        I.window_maxpool_approx(pi, [[3, 3, 3, 1]])  # outside the 5x5 map
    with pytest.raises(ValueError):
        I.window_scores(pi, cells, np.ones(4), alpha=3.0)  # alpha differs from the integral's


def test_exact_vectorised_window_max_matches_loop():
    rng = np.random.default_rng(2)
    X = sparse_map(rng, C=8, H=9, W=11)
    wins = I.all_windows(9, 11)[rng.choice(2970, 300, replace=False)]
    np.testing.assert_array_equal(I.window_max(X, wins), I.exact_window_max(X, wins))
    t = I.window_max(torch.from_numpy(X), wins)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), I.exact_window_max(X, wins))


def test_approximation_improves_with_alpha():
    rng = np.random.default_rng(3)
    X = sparse_map(rng, C=64, H=20, W=30)
    wins = I.all_windows(20, 30)[::211]
    exact = I.window_max(X, wins)
    mean_cos = []
    for a in (1.0, 2.0, 5.0, 10.0):
        mean_cos.append(cos_rows(I.window_maxpool_approx(I.power_integral(X, a), wins), exact).mean())
    assert all(b > a for a, b in zip(mean_cos, mean_cos[1:])), mean_cos
    assert mean_cos[-1] > 0.99


def test_window_scores_match_reference_and_chunking():
    rng = np.random.default_rng(4)
    X = sparse_map(rng, C=16, H=8, W=10)
    pi = I.power_integral(X, 10.0)
    wins = I.all_windows(8, 10)
    q = rng.random(16)
    ref = cos_rows(I.window_maxpool_approx(pi, wins), np.broadcast_to(q, (len(wins), 16)))
    np.testing.assert_allclose(I.window_scores(pi, wins, q), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(I.window_scores(pi, wins, q, chunk=7), I.window_scores(pi, wins, q), rtol=1e-12)


def test_window_generators():
    H, W = 6, 8
    aw = I.all_windows(H, W)
    assert len(aw) == (H * (H + 1) // 2) * (W * (W + 1) // 2) == len(np.unique(aw, axis=0))
    assert (aw[:, 0] + aw[:, 2] <= W).all() and (aw[:, 1] + aw[:, 3] <= H).all() and (aw[:, 2:] >= 1).all()
    sw = I.sample_windows(20, 30, step=3)
    assert (sw[:, 0] + sw[:, 2] <= 30).all() and (sw[:, 1] + sw[:, 3] <= 20).all()
    assert [0, 0, 30, 20] in sw.tolist()
    assert len(sw) < len(I.all_windows(20, 30)) / 20
    sa = I.sample_windows(20, 30, step=3, aspect=1.5, s=1.1)
    r = sa[:, 2] / sa[:, 3] / 1.5
    assert len(sa) > 0 and (np.maximum(r, 1 / r) <= 1.1 + 1e-9).all()
    assert len(I.sample_windows(4, 4, step=3, aspect=7.0, s=1.01)) > 0  # fallback: closest aspect kept


def test_aml_finds_planted_window_with_few_evaluations():
    rng = np.random.default_rng(5)
    box = (9, 5, 8, 6)
    X = planted_map(rng, box)
    x, y, w, h = box
    q = X[:, y:y + h, x:x + w].max((1, 2))
    pi = I.power_integral(X, 10.0)
    win, score, n = I.aml_search(pi, q, t=3, s=1.1, query_aspect=w / h)
    ewin, escore, en = I.exhaustive_search(pi, q)
    assert I.window_iou(win, box) >= 0.7, (win, box)
    assert I.window_iou(ewin, box) >= 0.7, (ewin, box)
    assert en == len(I.all_windows(16, 24)) and n < en / 50
    assert score <= escore + 1e-12 and score > 0.9
    # without the aspect prior AML still localises (more windows, same answer)
    win2, _, n2 = I.aml_search(X, q)
    assert I.window_iou(win2, box) >= 0.7 and n2 > n


def test_real_conv5_map_approximation_and_aml(vgg_conv5):
    X = vgg_conv5
    C, H, W = X.shape
    rng = np.random.default_rng(6)
    wins = I.all_windows(H, W)
    wins = wins[rng.choice(len(wins), 500, replace=False)]
    exact = I.window_max(X, wins)
    cos = {a: cos_rows(I.window_maxpool_approx(I.power_integral(X, a), wins), exact) for a in (1, 2, 5, 10)}
    means = [cos[a].mean() for a in (1, 2, 5, 10)]
    assert all(b > a for a, b in zip(means, means[1:])), means
    assert cos[10].mean() > 0.99 and cos[10].min() > 0.95
    box = (W // 4, H // 4, W // 2, H // 3)
    q = I.exact_window_max(X, [box])[0]
    win, score, n = I.aml_search(X, q, query_aspect=box[2] / box[3])
    assert I.window_iou(win, box) >= 0.7 and n < len(I.all_windows(H, W)) / 50


def eq3_reference(X, box, alpha=10.0):
    """Eq. 3 by a direct float64 sum over the window's cells (no integral image), with the conventions of the
    batched path: cells with (X/s)^alpha < 1e-15 dropped, window sums <= 1e-14 of the channel total zeroed."""
    X = X.astype(np.float64)
    s = X.reshape(len(X), -1).max(1)
    s[s == 0] = 1
    P = (X / s[:, None, None]) ** alpha
    P[P < 1e-15] = 0
    x, y, w, h = box
    S = P[:, y:y + h, x:x + w].sum((1, 2))
    S[S <= 1e-14 * P.sum((1, 2))] = 0
    return s * S ** (1 / alpha)


def test_batched_aml_matches_single_map_search(vgg_conv5):
    """aml_search_batch = aml_search run map by map (same windows, same refinement), on real conv5 maps, from
    dense maps, from their non-zeros (SparseMap) and with every sampled window verified exactly."""
    X = torch.from_numpy(vgg_conv5)
    maps = torch.stack([X, X.flip(2), X.flip(1), X.roll(3, 2), X * (X > 2.0)])
    C, H, W = X.shape
    agree, n = 0, 0
    for box in [(W // 4, H // 4, W // 2, H // 3), (1, 2, 6, 5), (0, 0, W, H)]:
        q = I.exact_window_max(vgg_conv5, [box])[0]
        asp = box[2] / box[3]
        wins, scores, counts, sp = I.aml_search_batch(maps, q, query_aspect=asp, chunk=2)
        flat = [m.numpy().reshape(C, -1) for m in maps]
        sparse = [I.SparseMap((C, H, W), *np.nonzero(f), f[f > 0]) for f in flat]
        w2, s2, c2, _ = I.aml_search_batch(sparse, q, query_aspect=asp, verify=0)  # verify=0: all exact
        for b in range(len(maps)):
            w1, s1, n1 = I.aml_search(maps[b].numpy(), q, query_aspect=asp)
            n += 1
            agree += tuple(wins[b]) == tuple(w1)
            assert tuple(w2[b]) == tuple(w1) and c2[b] == n1  # exact start: the very same search
            assert s2[b] == pytest.approx(s1, abs=1e-9)
            assert scores[b] == pytest.approx(s1, abs=1e-9)
            # the found window really scores what is reported (float64 reference)
            ref = I.window_scores(I.power_integral(maps[b].numpy()), [wins[b]], q)[0]
            assert scores[b] == pytest.approx(ref, abs=1e-9)
            # exact window vectors of the batch = Eq. 3 summed directly over the window's cells: to 1e-7 where
            # the window holds >= 1e-6 of the channel's alpha-mass; 1e-3 near the 1e-14 floor, where ~1e-16
            # float64 cancellation noise of the table is 1e-2 relative before the 1/alpha root
            got = sp.window_vectors(wins[b][None, None], maps=[b])[0, 0].numpy()
            ref_v = eq3_reference(maps[b].numpy(), wins[b])
            strong = ref_v >= 0.3 * maps[b].numpy().max((1, 2))
            np.testing.assert_allclose(got[strong], ref_v[strong], rtol=1e-7)
            np.testing.assert_allclose(got, ref_v, rtol=1e-3, atol=1e-9)
    assert agree == n, f"{agree}/{n} windows identical"
    with pytest.raises(ValueError, match="channels"):
        I.aml_search_batch(maps, np.ones(3))
    with pytest.raises(ValueError, match="equal sizes"):
        I.aml_search_batch([vgg_conv5, vgg_conv5[:, 1:]], q)
    with pytest.raises(ValueError, match="non-negative"):
        I.aml_search_batch([-X], q)


def test_fast_pass_ranks_like_exact_scores(vgg_conv5):
    """The float32 fast pass (rounded table + residual, root from a lookup table) ranks the sampled windows
    like their exact float64 scores: scores within 1e-4, and without the residual table far off on float maps."""
    from instance_search.index.compact import decode_sparse, encode_map

    X = vgg_conv5
    C, H, W = X.shape
    q = I.exact_window_max(X, [(2, 3, 8, 9)])[0]
    wins = I.sample_windows(H, W, 3, 8 / 9, 1.1)
    exact = I.window_scores(I.power_integral(X.astype(np.float64)), wins, q)
    for maps, fine, tol in [([X], True, 1e-4), ([decode_sparse(encode_map(X))], False, 1e-4)]:
        sp = I.sparse_batch(maps)
        gy, gx = np.unique(np.r_[wins[:, 1], wins[:, 1] + wins[:, 3]]), np.unique(np.r_[wins[:, 0], wins[:, 0] + wins[:, 2]])
        ly, lx = torch.from_numpy(gy)[None], torch.from_numpy(gx)[None]
        t64 = I._grid_table(sp, ly, lx, torch.float64)
        t32 = torch.round(t64 * 2.0 ** 23).float() * 2.0 ** -23
        res = (t64 - t32.double()).float() if fine else None
        G = len(gx) + 1
        iy = {v: i for i, v in enumerate(gy)}
        ix = {v: i for i, v in enumerate(gx)}
        corners = torch.tensor([[iy[y + h] * G + ix[x + w], iy[y] * G + ix[x + w], iy[y + h] * G + ix[x], iy[y] * G + ix[x]]
                                for x, y, w, h in wins])
        qn = torch.from_numpy(q / np.linalg.norm(q)).float()
        fast = I._fast_scores(t32, corners, sp.fscale, qn, 10.0, res)[0].numpy()
        ref = exact if fine else I.window_scores(I.power_integral(maps[0].dense().astype(np.float64)), wins, q)
        np.testing.assert_allclose(fast, ref, atol=tol)
        assert int(np.argmax(fast)) == int(np.argmax(ref))
        if fine:  # a float map without the residual table: small window sums are lost to the rounding
            plain = I._fast_scores(t32, corners, sp.fscale, qn, 10.0)[0].numpy()
            assert np.abs(plain - exact).max() > 1e-3


def paper_grid(H, W, t=3, qratio=None, s=1.1):
    """The window grid of Tolias et al. 2016, Sec. 5.2 as their aml.c samples it, written from the description:
    1-based rows i1 = 1, 1+t, ... <= H-1 and i2 = i1+1, i1+1+t, ... <= H (window rows i1..i2 inclusive), columns
    likewise; windows whose height/width ratio differs from the query's ``qratio`` by more than a factor ``s``
    are skipped. Returned as 0-based ``(x, y, w, h)`` rows."""
    out = []
    for i1 in range(1, H, t):
        for i2 in range(i1 + 1, H + 1, t):
            for j1 in range(1, W, t):
                for j2 in range(j1 + 1, W + 1, t):
                    h, w = i2 - i1 + 1, j2 - j1 + 1
                    if qratio is not None and abs(np.log(qratio / (h / w))) > np.log(s):
                        continue
                    out.append((j1 - 1, i1 - 1, w, h))
    return np.array(out, np.int64).reshape(-1, 4)


def test_paper_grid_is_contained_and_far_borders_sampled():
    for H, W in [(7, 10), (12, 16), (9, 9), (2, 5), (1, 4)]:
        for t in (1, 2, 3, 4):
            got = {tuple(r) for r in I.sample_windows(H, W, t).tolist()}
            assert {tuple(r) for r in paper_grid(H, W, t).tolist()} <= got
            assert (0, 0, W, H) in got
            # every sampled size also has its window touching the right and the bottom border
            for x, y, w, h in got:
                assert (W - w, y, w, h) in got and (x, H - h, w, h) in got
    with pytest.raises(ValueError, match="grid"):
        I.sample_windows(5, 5, grid="dense")


@pytest.fixture(scope="module")
def paris_maps(paris):
    """conv5_3 maps (post-ReLU) of the first 50 Paris photos at max side 224 px (14 x ~10 cells)."""
    from PIL import Image

    backbones = pytest.importorskip("instance_search.backbones")
    try:
        bb = backbones.load_backbone("vgg16", progress=False)
    except backbones.WeightsError as exc:
        pytest.skip(f"VGG16 weights unavailable: {exc}")
    out = []
    for f in sorted(paris.glob("*.jpg"))[:50]:
        img = Image.open(f).convert("RGB")
        img.thumbnail((224, 224))
        out.append(bb.features(img, layers=["conv5_3"])[("conv5_3", 1.0)].numpy().astype(np.float32))
    return out


def test_aml_beats_the_papers_grid_on_50_real_maps(paris_maps):
    """Issue 14, item 2: on 50 real maps the AML window scores at least the best window of the authors' grid
    (same Eq. 4 measure, float64), for queries of several aspect ratios taken from other photos."""
    n = checked = 0
    for i, X in enumerate(paris_maps):
        Y = paris_maps[(i + 7) % len(paris_maps)]
        C, H, W = X.shape
        bw, bh = [(5, 5), (5, 8), (8, 5)][i % 3]  # aspects the paper's grid holds on most maps
        box = (0, 0, min(bw, Y.shape[2]), min(bh, Y.shape[1]))
        q = I.exact_window_max(Y, [box])[0]
        aspect = box[2] / box[3]
        ref = paper_grid(H, W, 3, 1 / aspect, 1.1)
        if not len(ref):  # no window of the paper's grid has this aspect on this map: nothing to compare
            continue
        checked += 1
        ref_best = I.window_scores(I.power_integral(X.astype(np.float64)), ref, q).max()
        win, score, _ = I.aml_search(X, q, t=3, s=1.1, query_aspect=aspect)
        _, bscore, _, _ = I.aml_search_batch([X], q, t=3, s=1.1, query_aspect=aspect)
        assert score >= ref_best - 1e-12, (i, score, ref_best)
        # the batched search works from the non-zeros (cells below 1e-15 of (X/s)^α dropped): ~1e-9 apart
        assert bscore[0] >= ref_best - 1e-8, (i, bscore[0], ref_best)
        n += score > ref_best + 1e-9
    assert checked >= 45, checked
    assert n > 0  # the refinement improves on the grid's best somewhere
