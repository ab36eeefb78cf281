"""Coarse-to-fine AML's in-RAM fine maps (AMLFineMaps) and its fast candidate ranking (verify), issue 14."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.errors import InputError
from instance_search.index.compact import decode_sparse, encode_map
from instance_search.ops.integral import aml_search_candidates, exact_window_max, sample_windows, sparse_batch
from instance_search.rerank.aml import rerank_aml
from instance_search.rerank.aml_c2f import AMLFineMaps, rerank_aml_c2f
from instance_search.rerank.aml_fast import AMLInvertedMaps


@pytest.fixture(scope="module")
def real(vgg_conv5):
    """Compact-coded crops of a real VGG16 conv5_3 map (two sizes) and a query MAC from one of its regions."""
    V = vgg_conv5.astype(np.float32)
    maps = [V, V[:, :, ::-1].copy(), V[:, 2:, 1:], V[:, 2:, 1:][:, ::-1].copy(), V]
    sparse = [decode_sparse(encode_map(m)) for m in maps]
    q = exact_window_max(V, [(3, 4, 7, 6)])[0]
    return sparse, q


def test_fine_maps_hold_what_sparse_batch_computes(real):
    sparse, _ = real
    fine = AMLFineMaps.build(sparse)
    assert len(fine) == len(sparse) and fine.nbytes > 0
    for rows in ([0, 1, 4], [4, 0], [2, 3]):
        got, want = fine.batch(rows), sparse_batch([sparse[i] for i in rows])
        assert got.shape == want.shape
        assert torch.equal(got.offsets, want.offsets) and torch.equal(got.fscale, want.fscale)
        H, W = got.shape[2:]

        def cells(sp, perm=None):  # the cells as a set of (map, channel, y, x, w) rows, in a canonical order
            i = torch.arange(len(sp.w)) if perm is None else perm
            key = torch.stack([sp.b[i], sp.c[i], sp.y[i], sp.x[i]], 1).numpy()
            o = np.lexsort(key.T[::-1])
            return key[o], sp.w[i].numpy()[o]

        for a, b in zip(cells(got), cells(want)):
            np.testing.assert_array_equal(a, b)
        # raster order within each map; strips(): the stored cells of any rows / columns of each image
        raster = (got.b * H + got.y) * W + got.x
        assert (raster[1:] >= raster[:-1]).all()
        cellsg, order = fine.strips(rows)
        for m, r in enumerate(rows):
            mine = np.zeros(len(fine.w), bool)
            mine[fine.offsets[r]:fine.offsets[r + 1]] = True
            gy, gx = cellsg.y.numpy(), cellsg.x.numpy()
            for r0, r1 in ((0, 1), (2, 5), (0, H)):
                sel = np.arange(int(order.rowptr[m, r0]), int(order.rowptr[m, r1]))
                np.testing.assert_array_equal(sel, np.flatnonzero(mine & (gy >= r0) & (gy < r1)))
            for c0, c1 in ((0, 2), (3, 7), (0, W)):
                sel = order.xperm[int(order.colptr[m, c0]):int(order.colptr[m, c1])].long() + order.xbase[m]
                np.testing.assert_array_equal(np.sort(sel.numpy()), np.flatnonzero(mine & (gx >= c0) & (gx < c1)))
        # a batch of some rows only: the cells of those rows
        y0, y1 = np.array([1, 0, 3])[:len(rows)], np.array([4, H, 5])[:len(rows)]
        part = fine.batch(rows, y0, y1)
        keep = ((got.y >= torch.from_numpy(y0)[got.b]) & (got.y < torch.from_numpy(y1)[got.b])).numpy()
        np.testing.assert_array_equal(part.w.numpy(), got.w.numpy()[keep])
        np.testing.assert_array_equal(part.b.numpy(), got.b.numpy()[keep])
    with pytest.raises(InputError, match="one size"):
        fine.batch([0, 2])
    with pytest.raises(InputError, match="rows must index"):
        fine.batch([5])


def test_c2f_from_fine_maps_equals_c2f_from_decoded_maps(real):
    """The fine maps (and their table-free strip refinement) give the boxes of the decoded maps' path; with the
    radius covering the whole map and every candidate verified, exact AML's (issue 14's exactness test)."""
    sparse, q = real
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
    with pytest.raises(InputError, match="fine maps"):
        rerank_aml_c2f(q, sparse, store, rows, fine=AMLFineMaps.build(sparse[:2]))


def test_verified_candidates_start_from_the_exact_best_of_the_fast_top(real):
    """verify=k: the start is the exact best of the k candidates the fast pass ranks highest; with the grid's
    windows as candidates it is exact AML's batched search with the same verify (same fast pass)."""
    sparse, q = real
    same = [sparse[0], sparse[1], sparse[4]]
    H, W = sparse[0].shape[1:]
    grid = sample_windows(H, W, 3, 7 / 6, 1.1)
    cand = np.repeat(grid[None], len(same), 0)
    ref = rerank_aml(q, same, query_aspect=7 / 6, verify=8)
    got = aml_search_candidates(same, q, cand, verify=8)
    np.testing.assert_array_equal(got[0], ref.boxes)
    # verify >= the candidate count: every candidate exact, as verify=0
    a = aml_search_candidates(same, q, cand[:, :20], verify=20, refine_rounds=0)
    b = aml_search_candidates(same, q, cand[:, :20], verify=0, refine_rounds=0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # the fast pass only reorders: the exact score of the start is the exact best of some 4 candidates, and
    # never above the exact best of all of them
    c = aml_search_candidates(same, q, cand, verify=4, refine_rounds=0)
    d = aml_search_candidates(same, q, cand, verify=0, refine_rounds=0)
    assert (c[1] <= d[1] + 1e-15).all()
    assert (c[1] >= d[1] - 0.05).all()
