"""Embeddings and aggregations against slow per-feature references and hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instance_search.ops import aggregation as agg
from instance_search.ops import embeddings as emb


def _unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = _unit_rows(rng, 40, 5)
    C = _unit_rows(rng, 4, 5)
    var = rng.uniform(0.05, 0.3, size=(4, 5))
    w = rng.uniform(0.5, 1.5, size=4)
    return X, C, var, w / w.sum()


# ------------------------------------------------------------------ slow references (loops on purpose)


def _ref_posterior(x, mu, var, w):
    logp = np.array([math.log(w[k]) + sum(-0.5 * math.log(2 * math.pi * var[k, j]) - (x[j] - mu[k, j]) ** 2 / (2 * var[k, j])
                                          for j in range(len(x))) for k in range(len(w))])
    p = np.exp(logp - logp.max())
    return p / p.sum()


def _ref_vlad_embed(X, C):
    k, d = C.shape
    out = np.zeros((len(X), k * d))
    for i, x in enumerate(X):
        j = int(np.argmin([np.sum((x - c) ** 2) for c in C]))
        out[i, j * d:(j + 1) * d] = x - C[j]
    return out


def _ref_fv_embed(X, mu, var, w):
    k, d = mu.shape
    out = np.zeros((len(X), 2 * k * d))
    for i, x in enumerate(X):
        g = _ref_posterior(x, mu, var, w)
        for c in range(k):
            for j in range(d):
                z = (x[j] - mu[c, j]) / math.sqrt(var[c, j])
                out[i, c * d + j] = g[c] * z / math.sqrt(w[c])
                out[i, k * d + c * d + j] = g[c] * (z * z - 1) / math.sqrt(2 * w[c])
    return out


def _ref_temb(X, C):
    return np.stack([np.concatenate([(x - c) / np.linalg.norm(x - c) for c in C]) for x in X])


def _ref_ffaemb_coefficients(X, B, mu):
    """The authors' learn_coeff_one_sample.m, literally (V = B^T: anchors as columns)."""
    V, n = B.T, B.shape[0]
    out = []
    for x in X:
        A = np.abs(x[:, None] - V).sum(0) ** 3
        inv = np.linalg.inv(V.T @ V + A.sum() * mu * np.eye(n))
        lam = (np.ones(n) @ inv @ V.T @ x - 1) / (np.ones(n) @ inv @ np.ones(n))
        out.append(inv @ (V.T @ x - lam * np.ones(n)))
    return np.array(out)


def _ref_ffaemb(X, B, g):
    """compute_faemb_one_sample of the authors' fa_embedding.c: gamma_j * upper triangle of r r^T, r = unit residual."""
    k, d = B.shape
    rows = []
    for i, x in enumerate(X):
        parts = []
        for c in range(k):
            r = (x - B[c]) / np.linalg.norm(x - B[c])
            for a in range(d):
                for b in range(a, d):
                    parts.append(g[i, c] * r[a] * r[b])
        rows.append(parts)
    return np.array(rows)


# ------------------------------------------------------------------ VLAD


def test_vlad_hand_example():
    C = np.array([[1.0, 0.0], [0.0, 1.0]])
    X = np.array([[0.8, 0.6], [0.6, -0.8], [0.28, 0.96]])
    # x1, x2 -> c1: residuals (-0.2, 0.6) + (-0.4, -0.8) = (-0.6, -0.2); x3 -> c2: (0.28, -0.04)
    raw = np.array([-0.6, -0.2, 0.28, -0.04])
    np.testing.assert_allclose(emb.vlad(X, C, intra_norm=False), raw / math.sqrt(0.48), atol=1e-12)
    # intra-norm: (-3, -1)/sqrt(10) and (7, -1)/sqrt(50), then / sqrt(2)
    expected = np.array([-3 / math.sqrt(20), -1 / math.sqrt(20), 0.7, -0.1])
    np.testing.assert_allclose(emb.vlad(X, C), expected, atol=1e-12)
    np.testing.assert_allclose(emb.vlad_embed(X, C).sum(0), raw, atol=1e-12)


def test_vlad_matches_reference(data):
    X, C, _, _ = data
    E = emb.vlad_embed(X, C)
    np.testing.assert_allclose(E, _ref_vlad_embed(X, C), atol=1e-12)
    v = E.sum(0).reshape(len(C), -1)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    v = v.reshape(-1) / np.linalg.norm(v)
    np.testing.assert_allclose(emb.vlad(X, C), v, atol=1e-12)


def test_vlad_torch_in_torch_out(data):
    X, C, _, _ = data
    out = emb.vlad(torch.from_numpy(X).float(), torch.from_numpy(C).float())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), emb.vlad(X, C), atol=1e-5)


# ------------------------------------------------------------------ Fisher vector


def test_fv_matches_reference(data):
    X, C, var, w = data
    E = emb.fv_embed(X, C, var, w)
    np.testing.assert_allclose(E, _ref_fv_embed(X, C, var, w), atol=1e-10)
    np.testing.assert_allclose(emb.fisher_vector(X, C, var, w, normalize=False), E.mean(0), atol=1e-10)
    first = emb.fisher_vector(X, C, var, w, second_order=False, normalize=False)
    np.testing.assert_allclose(first, E[:, : C.size].mean(0), atol=1e-10)
    v = E.mean(0)
    v = np.sign(v) * np.sqrt(np.abs(v))
    np.testing.assert_allclose(emb.fisher_vector(X, C, var, w), v / np.linalg.norm(v), atol=1e-10)


def test_gmm_posteriors_sum_to_one(data):
    X, C, var, w = data
    P = emb.gmm_posteriors(X, C, var, w)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(P[3], _ref_posterior(X[3], C, var, w), atol=1e-12)


# ------------------------------------------------------------------ T-emb, F-FAemb


def test_temb_matches_reference(data):
    X, C, _, _ = data
    E = emb.temb(X, C)
    np.testing.assert_allclose(E, _ref_temb(X, C), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(E.reshape(len(X), len(C), -1), axis=2), 1.0, atol=1e-12)


def test_ffaemb_matches_reference(data):
    X, C, _, _ = data
    X = X[:8]
    g = emb.ffaemb_coefficients(X, C, 1e-2)
    np.testing.assert_allclose(g, _ref_ffaemb_coefficients(X, C, 1e-2), atol=1e-10)
    np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-12)  # locality-constrained coding: coefficients sum to 1
    E = emb.ffaemb(X, C)
    assert E.shape == (8, emb.ffaemb_dim(4, 5))
    np.testing.assert_allclose(E, _ref_ffaemb(X, C, g), atol=1e-12)
    np.testing.assert_allclose(emb.ffaemb(X, C, gamma=g), E, atol=1e-12)
    # each block's diagonal sums to gamma_j (unit residual), so the whole diagonal sums to 1
    iu, ju = np.triu_indices(5)
    diag = E.reshape(8, 4, -1)[:, :, iu == ju].sum((1, 2))
    np.testing.assert_allclose(diag, 1.0, atol=1e-12)
    # a feature equal to an anchor: a zero block there and finite numbers (the authors' code gives NaN)
    E2 = emb.ffaemb(C[:1], C)
    assert np.isfinite(E2).all() and not E2[0, :15].any()
    # get_objective.m, literally: 1/2 ||B g - X||^2 + mu/2 sum_i ||g_i||^2 sum_j ||x_i - b_j||_1^3
    rec = 0.5 * sum(np.sum((C.T @ g[i] - x) ** 2) for i, x in enumerate(X))
    loc = sum(np.sum(g[i] ** 2) * np.abs(x - b).sum() ** 3 for i, x in enumerate(X) for b in C)
    assert emb.ffaemb_objective(X, C, g, 1e-2) == pytest.approx(rec + 0.5 * 1e-2 * loc, rel=1e-12)
    with pytest.raises(ValueError, match="gamma"):
        emb.ffaemb(X, C, gamma=g[:, :3])
    with pytest.raises(ValueError, match="mu"):
        emb.ffaemb_coefficients(X, C, 0.0)


# ------------------------------------------------------------------ aggregation


def test_democratic_equalises_contributions():
    rng = np.random.default_rng(1)
    # sparse non-negative unit vectors (no clipping of the Gram matrix) plus a "bursty" cluster of
    # near-duplicates, which sum pooling lets dominate
    E = np.abs(rng.standard_normal((30, 16))) * (rng.random((30, 16)) < 0.3)
    E[:, 0] += 0.05  # keep every row non-zero and the Gram matrix connected
    E[:10] = E[0] + 0.01 * np.abs(rng.standard_normal((10, 16)))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    psi, lam = agg.democratic(E, n_iter=20, return_weights=True)
    contrib = lam * (E @ psi)
    s = agg.sum_pool(E)
    contrib_sum = E @ s
    spread = contrib.std() / contrib.mean()
    spread_sum = contrib_sum.std() / contrib_sum.mean()
    assert spread < 1e-3
    assert spread_sum > 0.1 and spread < spread_sum / 100
    # the bursty features get down-weighted
    assert lam[:10].max() < lam[10:].min()


def test_sum_mean_power_law():
    E = np.array([[1.0, -4.0], [3.0, 0.0]])
    np.testing.assert_allclose(agg.sum_pool(E), [4.0, -4.0])
    np.testing.assert_allclose(agg.mean_pool(E), [2.0, -2.0])
    np.testing.assert_allclose(agg.power_law(np.array([4.0, -9.0, 0.0])), np.array([2.0, -3.0, 0.0]) / math.sqrt(13))
    np.testing.assert_allclose(agg.aggregate(E, "mean"), [2.0, -2.0])
    with pytest.raises(ValueError, match="unknown aggregation"):
        agg.aggregate(E, "median")


def test_nearest_centroid_matches_a_loop(data):
    """Nearest centroid of each row against a per-row argmin; numpy in, numpy out; torch in, torch out; a tie
    goes to the lower index."""
    X, C, _, _ = data
    want = np.array([int(np.argmin([np.sum((x - c) ** 2) for c in C])) for x in X])
    got = emb.nearest_centroid(X, C)
    assert isinstance(got, np.ndarray) and np.array_equal(got, want)
    got_t = emb.nearest_centroid(torch.from_numpy(X), torch.from_numpy(C))
    assert isinstance(got_t, torch.Tensor) and np.array_equal(got_t.numpy(), want)
    tie = emb.nearest_centroid(np.zeros((1, 5)), np.stack([C[0], C[0]]))
    assert tie.tolist() == [0]
