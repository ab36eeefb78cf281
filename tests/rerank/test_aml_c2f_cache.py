"""Coarse-to-fine AML's in-RAM fine maps (AMLFineMaps), issue 14; the compiled search itself: tests/ops/test_aml_kernel.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.errors import InputError
from instance_search.ops.integral import sparse_batch
from instance_search.rerank.aml import rerank_aml
from instance_search.rerank.aml_c2f import AMLFineMaps, rerank_aml_c2f
from instance_search.rerank.aml_fast import AMLInvertedMaps


def test_fine_maps_hold_what_sparse_batch_computes(vgg_compact_crops):
    sparse, _ = vgg_compact_crops
    fine = AMLFineMaps.build(sparse)
    assert len(fine) == len(sparse) and fine.nbytes > 0
    for r, m in enumerate(sparse):
        want = sparse_batch([m])
        C, H, W = m.shape
        sl = slice(fine.offsets[r], fine.offsets[r + 1])
        np.testing.assert_array_equal(fine.fscale[r], want.fscale.numpy()[0])
        assert tuple(fine.shapes[r]) == (H, W)
        y, x, c, w = fine.y[sl].astype(np.int64), fine.x[sl].astype(np.int64), fine.c[sl].astype(np.int64), fine.w[sl]
        assert ((y * W + x)[1:] >= (y * W + x)[:-1]).all()  # raster order
        key = np.stack([c, y, x], 1)
        o = np.lexsort(key.T[::-1])
        wk = torch.stack([want.c, want.y, want.x], 1).numpy()
        ow = np.lexsort(wk.T[::-1])
        np.testing.assert_array_equal(key[o], wk[ow])
        np.testing.assert_array_equal(w[o], want.w.numpy()[ow])
        # where each row starts, and each column in the column order
        rp = fine.rowptr[fine.rowstart[r]:fine.rowstart[r] + H + 1]
        cp = fine.colptr[fine.colstart[r]:fine.colstart[r] + W + 1]
        xo = fine.xorder[sl]
        for v in range(H):
            np.testing.assert_array_equal(np.arange(rp[v], rp[v + 1]), np.flatnonzero(y == v))
        for v in range(W):
            np.testing.assert_array_equal(np.sort(xo[cp[v]:cp[v + 1]]), np.flatnonzero(x == v))
            assert (np.diff(y[xo[cp[v]:cp[v + 1]]]) >= 0).all()


def test_c2f_from_fine_maps_equals_c2f_from_decoded_maps(vgg_compact_crops):
    """The fine maps (and their table-free strip refinement) give the boxes of the decoded maps' path; with the
    radius covering the whole map and every candidate verified, exact AML's (issue 14's exactness test)."""
    sparse, q = vgg_compact_crops
    store = AMLInvertedMaps.build(sparse, g=4)
    fine = AMLFineMaps.build(sparse)
    rows = np.arange(len(sparse))
    for kw in ({}, {"verify": 0, "top": 2, "radius": 3}, {"refine_steps": 2, "top": 1, "radius": 2}):
        a = rerank_aml_c2f(q, sparse, store, rows, query_aspect=7 / 6, **kw)
        b = rerank_aml_c2f(q, sparse, store, rows, query_aspect=7 / 6, fine=fine, **kw)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(a.n_windows, b.n_windows)
    for aspect in (7 / 6, 0.5, None):
        ref = rerank_aml(q, sparse, query_aspect=aspect, verify=0)
        got = rerank_aml_c2f(q, sparse, store, rows, query_aspect=aspect, radius=100, top=1, verify=0, fine=fine)
        np.testing.assert_array_equal(got.boxes, ref.boxes)
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-12, atol=1e-12)
    # a short list in another order than the store's rows: the cached fine maps are read by row
    sub = np.array([4, 0, 2])
    a = rerank_aml_c2f(q, [sparse[i] for i in sub], store, sub, query_aspect=7 / 6)
    b = rerank_aml_c2f(q, [sparse[i] for i in sub], store, sub, query_aspect=7 / 6, fine=fine)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    # scored by the window's R-MAC, the maps are not needed when the fine maps are cached
    def finalize(local):
        g = np.stack([L.sum(0) for L in local]) if isinstance(local, list) else local.sum(0)
        return g / np.linalg.norm(g, axis=-1, keepdims=True)

    kw = dict(query_aspect=7 / 6, finalize=finalize, query_global=finalize(q[None]))
    a = rerank_aml_c2f(q, [sparse[i] for i in sub], store, sub, fine=fine, **kw)
    b = rerank_aml_c2f(q, None, store, sub, fine=fine, **kw)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    with pytest.raises(ValueError, match="exact MAC reads the maps"):
        rerank_aml_c2f(q, None, store, sub, fine=fine)
    with pytest.raises(ValueError, match="give the maps"):
        rerank_aml_c2f(q, None, store, sub, **kw)
    with pytest.raises(InputError, match="fine maps"):
        rerank_aml_c2f(q, sparse, store, rows, fine=AMLFineMaps.build(sparse[:2]))


def test_c2f_fine_top_refines_the_best_coarse_maps_only(vgg_compact_crops):
    """fine_top: the maps its rule chooses (by coarse score and short-list order) are re-scored exactly as c2f
    re-scores them alone and ranked first; the others keep the coarse search's box and score and follow in its
    order (NaN window vectors)."""
    from instance_search.rerank.aml_c2f import DEFAULT_TOP, coarse_selection
    from instance_search.rerank.aml_fast import DEFAULT_K, DEFAULT_STEP, aml_fast_search

    sparse, q = vgg_compact_crops
    store = AMLInvertedMaps.build(sparse, g=4)
    fine = AMLFineMaps.build(sparse)
    n = len(sparse)
    rows = np.arange(n)
    old = np.linspace(1.0, 0.5, n)
    cbox, cs, nc, _, _ = aml_fast_search(store, rows, q, K=DEFAULT_K, query_aspect=7 / 6, step=DEFAULT_STEP,
                                         exact_score=False, top=DEFAULT_TOP)

    def finalize(local):
        g = np.stack([L.sum(0) for L in local]) if isinstance(local, list) else local.sum(0)
        return g / np.linalg.norm(g, axis=-1, keepdims=True)

    wr = dict(finalize=finalize, query_global=finalize(q[None]))
    def reference(scores, k, rule):  # the rules, written out
        by_coarse = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        take = {"coarse": by_coarse[:k], "shortlist": [], "mixed": by_coarse[:(k + 1) // 2]}[rule]
        for i in range(len(scores)):
            if len(take) < k and i not in take:
                take = take + [i]
        return np.sort(take)

    rng = np.random.default_rng(0)
    for rule in ("mixed", "coarse", "shortlist"):
        for _ in range(20):
            sc = rng.integers(0, 5, 12).astype(float)  # ties
            for k in (1, 2, 5, 11, 12, 30):
                np.testing.assert_array_equal(coarse_selection(sc, k, rule), reference(sc, min(k, 12), rule))
    with pytest.raises(ValueError, match="rule"):
        coarse_selection(cs, 2, "best")
    for ftop, rule in ((1, "mixed"), (2, "coarse"), (4, "mixed"), (3, "shortlist")):
        sel = reference(cs, ftop, rule)
        rest = np.setdiff1d(rows, sel)
        for f, extra in ((None, {}), (fine, {}), (fine, wr)):
            got = rerank_aml_c2f(q, sparse, store, rows, shortlist_scores=old, query_aspect=7 / 6, fine_top=ftop,
                                 fine_rule=rule, fine=f, **extra)
            alone = rerank_aml_c2f(q, [sparse[i] for i in sel], store, sel, shortlist_scores=old[sel],
                                   query_aspect=7 / 6, **extra)
            np.testing.assert_array_equal(got.boxes[sel], alone.boxes)
            np.testing.assert_allclose(got.scores[sel], alone.scores, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(got.order[:ftop], sel[alone.order])
            np.testing.assert_array_equal(got.boxes[rest], cbox[rest])
            np.testing.assert_allclose(got.scores[rest], cs[rest], rtol=1e-6)
            np.testing.assert_array_equal(got.n_windows[rest], nc[rest])
            assert got.n_windows[sel].min() > nc[sel].min()
            np.testing.assert_array_equal(got.order[ftop:], sorted(rest, key=lambda i: (-cs[i], -old[i], i)))
            np.testing.assert_allclose(got.vectors[sel], alone.vectors, rtol=1e-12, atol=1e-12)
            assert np.isnan(got.vectors[rest]).all()
    # maps given by a loader: called once, with the positions the fine stage reads only; the same result
    calls = []
    for rule in ("mixed", "coarse"):
        calls.clear()
        lazy = rerank_aml_c2f(q, lambda pos: calls.append(list(pos)) or [sparse[i] for i in pos], store, rows,
                              shortlist_scores=old, query_aspect=7 / 6, fine_top=2, fine_rule=rule)
        eager = rerank_aml_c2f(q, sparse, store, rows, shortlist_scores=old, query_aspect=7 / 6, fine_top=2,
                               fine_rule=rule)
        assert calls == [list(reference(cs, 2, rule))]
        np.testing.assert_array_equal(lazy.boxes, eager.boxes)
        np.testing.assert_array_equal(lazy.scores, eager.scores)
        np.testing.assert_array_equal(lazy.order, eager.order)
    with pytest.raises(ValueError, match="loader gave 1 maps for 2"):
        rerank_aml_c2f(q, lambda pos: [sparse[0]], store, rows, fine_top=2)
    with pytest.raises(ValueError, match="not the same image"):
        rerank_aml_c2f(q, lambda pos: [sparse[2]] * len(pos), store, rows, fine_top=2, fine_rule="shortlist")
    # a fine_top covering the short list: every map refined, the same result as without it
    a = rerank_aml_c2f(q, sparse, store, rows, query_aspect=7 / 6, fine_top=n)
    b = rerank_aml_c2f(q, sparse, store, rows, query_aspect=7 / 6)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.order, b.order)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="fine_top"):
            rerank_aml_c2f(q, sparse, store, rows, fine_top=bad)
