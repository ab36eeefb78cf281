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
        for name in ("b", "c", "y", "x", "w", "fscale", "offsets"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    with pytest.raises(InputError, match="one size"):
        fine.batch([0, 2])
    with pytest.raises(InputError, match="rows must index"):
        fine.batch([5])


def test_c2f_from_fine_maps_equals_c2f_from_decoded_maps(real):
    sparse, q = real
    store = AMLInvertedMaps.build(sparse, g=4)
    fine = AMLFineMaps.build(sparse)
    rows = np.arange(len(sparse))
    for kw in ({}, {"verify": 0, "top": 2, "radius": 3}):
        a = rerank_aml_c2f(q, sparse, store, rows, query_aspect=7 / 6, **kw)
        b = rerank_aml_c2f(q, sparse, store, rows, query_aspect=7 / 6, fine=fine, **kw)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.n_windows, b.n_windows)
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
