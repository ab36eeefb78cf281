"""The compiled AML fine search (ops/aml_kernel.py, issue 14 item 1) against slow, obviously correct references:
``pow`` for the root, ``math.fsum`` over a window's cells for window vectors, and the dense integral-image
``aml_search`` (Tolias et al. 2016, Sec. 5.2) started from the same candidate windows."""
from __future__ import annotations

import math

import numpy as np
import pytest

from instance_search.ops import aml_kernel as K
from instance_search.ops.integral import aml_search, sample_windows, sparse_batch
from instance_search.rerank.aml_c2f import AMLFineMaps


def test_root_matches_pow_to_the_last_bits():
    rng = np.random.default_rng(0)
    s = np.concatenate([10.0 ** rng.uniform(-14, 0.3, 20000),
                        2.0 ** np.arange(-46, 2, dtype=np.float64),  # powers of two: bucket and exponent edges
                        1.0 + np.arange(1024) / 1024, np.nextafter(1.0 + np.arange(1, 1025) / 1024, 0)])
    for alpha in (10.0, 3.0, 1.0, 20.0):
        got = K.roots(s, *K.root_tables(alpha))
        np.testing.assert_allclose(got, s ** (1.0 / alpha), rtol=1e-15, atol=0)


def test_window_vectors_equal_fsum_over_the_cells(vgg_compact_crops):
    sparse, _ = vgg_compact_crops
    fine = AMLFineMaps.build(sparse)
    rng = np.random.default_rng(1)
    for r in (0, 2, 3):
        sp = sparse_batch([sparse[r]])
        H, W = sparse[r].shape[1:]
        wins = []
        for _ in range(12):
            x, y = rng.integers(0, W), rng.integers(0, H)
            wins.append((x, y, rng.integers(1, W - x + 1), rng.integers(1, H - y + 1)))
        wins.append((0, 0, W, H))
        got = fine.window_vectors([r], np.asarray(wins)[None])[0].numpy()
        c, yy, xx, w = (t.numpy() for t in (sp.c, sp.y, sp.x, sp.w))
        fs = sp.fscale.numpy()[0]
        want = np.zeros_like(got)
        for j, (x, y, ww, hh) in enumerate(wins):
            inside = (yy >= y) & (yy < y + hh) & (xx >= x) & (xx < x + ww)
            for ch in np.unique(c[inside]):
                tot = math.fsum(w[inside & (c == ch)])
                if tot > 1e-14:
                    want[j, ch] = fs[ch] * tot ** 0.1
        # sums from integral tables: float64 cancellation of ~1e-16 of the window's total, then the 1/α root
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * want.max())
        assert ((got > 0) == (want > 0)).mean() > 0.999


def _candidates(rng, H, W, n):
    grid = sample_windows(H, W, 3)
    return grid[rng.choice(len(grid), size=min(n, len(grid)), replace=False)]


def test_fine_search_equals_dense_aml_from_the_same_candidates(vgg_compact_crops):
    """Every candidate exact (verify=0), then the coordinate descent: the box, score and window count of the
    dense integral-image ``aml_search`` started from the same windows, on every map, several candidate sets."""
    sparse, q = vgg_compact_crops
    fine = AMLFineMaps.build(sparse)
    rng = np.random.default_rng(2)
    for trial in range(4):
        rows = np.arange(len(sparse))
        cands = [_candidates(rng, *sparse[r].shape[1:], n=[1, 5, 40, 400][trial]) for r in rows]
        m = max(len(c) for c in cands)
        cand = np.zeros((len(rows), m, 4), np.int64)
        for i, c in enumerate(cands):
            cand[i, :len(c)] = c
        ncand = np.array([len(c) for c in cands])
        for steps, rounds in ((3, 15), (2, 1), (1, 0)):
            edges, scores, n_eval, sums = fine.search(rows, q, cand, ncand, steps, rounds, verify=0)
            for i, r in enumerate(rows):
                X = sparse[r].dense().astype(np.float64)
                (x, y, w, h), sc, n = aml_search(X, q, refine_steps=steps, refine_rounds=rounds, windows=cands[i])
                assert tuple(edges[i]) == (x, y, x + w, y + h), (trial, steps, i)
                assert scores[i] == pytest.approx(sc, rel=1e-12, abs=1e-12)
                assert n_eval[i] == n
                # the kept window sums are those of the final window
                sp = sparse_batch([sparse[r]])
                inside = (sp.y >= y) & (sp.y < y + h) & (sp.x >= x) & (sp.x < x + w)
                want = np.zeros(sums.shape[1])
                np.add.at(want, sp.c.numpy()[inside.numpy()], sp.w.numpy()[inside.numpy()])
                np.testing.assert_allclose(sums[i], want, rtol=1e-9, atol=1e-15)


def test_verify_scores_the_best_of_a_float32_ranking_exactly(vgg_compact_crops):
    """verify=k: the start is the exact best of the k candidates the float32 pass ranks highest: never above
    the exact best of all, and close to it; k >= the candidate count is verify=0."""
    sparse, q = vgg_compact_crops
    fine = AMLFineMaps.build(sparse)
    rows = np.arange(len(sparse))
    rng = np.random.default_rng(3)
    cands = [_candidates(rng, *sparse[r].shape[1:], n=300) for r in rows]
    m = max(len(c) for c in cands)
    cand = np.zeros((len(rows), m, 4), np.int64)
    for i, c in enumerate(cands):
        cand[i, :len(c)] = c
    ncand = np.array([len(c) for c in cands])
    every = fine.search(rows, q, cand, ncand, rounds=0, verify=0)
    for k in (1, 4, 8):
        some = fine.search(rows, q, cand, ncand, rounds=0, verify=k)
        assert (some[1] <= every[1] + 1e-15).all()
        assert (some[1] >= every[1] - 0.02).all()
    eight = fine.search(rows, q, cand, ncand, rounds=0, verify=8)
    np.testing.assert_array_equal(eight[0], every[0])  # the float32 ranking keeps the best among its top 8 here
    big = fine.search(rows, q, cand, ncand, rounds=0, verify=m)
    np.testing.assert_array_equal(big[0], every[0])
    np.testing.assert_array_equal(big[1], every[1])


def test_fine_search_refuses_bad_candidates(vgg_compact_crops):
    sparse, q = vgg_compact_crops
    fine = AMLFineMaps.build(sparse[:1])
    H, W = sparse[0].shape[1:]
    ok = np.array([[[0, 0, 2, 2]]])
    with pytest.raises(ValueError, match="within"):
        fine.search([0], q, np.array([[[W - 1, 0, 2, 2]]]), [1])
    with pytest.raises(ValueError, match="at least one"):
        fine.search([0], q, ok, [0])
    with pytest.raises(ValueError, match="dimensions"):
        fine.search([0], q[:5], ok, [1])
    with pytest.raises(Exception, match="rows must index"):
        fine.search([1], q, ok, [1])


def test_works_without_a_writable_cache_folder(tmp_path):
    """Where Numba finds no writable place for its cache the kernels compile per process, with a warning."""
    import subprocess
    import sys

    code = ("import warnings, numpy as np\n"
            "from numba.core import caching\n"
            "impl = getattr(caching, 'CacheImpl', None) or caching._CacheImpl\n"
            "impl._locator_classes = []  # no locator: as if the install and the home were read-only\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from instance_search.ops import aml_kernel as K\n"
            "assert any('not cached on disk' in str(x.message) for x in w), [str(x.message) for x in w]\n"
            "s = np.array([0.5, 1e-9])\n"
            "print(np.abs(K.roots(s, *K.root_tables(10.0)) / s ** 0.1 - 1).max())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 1e-15
