"""Embeddings of local convolutional features into a high-dimensional space.

Every function is pure and vectorised (no Python loop over features). Inputs are ``(N, d)`` local
features (rows are expected to be L2-normalised, e.g. after :class:`instance_search.fitted.codebook.LocalPCA`)
and a codebook learned by :mod:`instance_search.fitted.codebook`. Arrays may be numpy or torch; the
result has the kind of ``X`` (numpy in, numpy out), float64 when ``X`` is float64, float32 otherwise.

Per-feature functions (``*_embed``, :func:`temb`, :func:`ffaemb`) return ``(N, D)`` so that any
aggregation of :mod:`instance_search.ops.aggregation` (sum, mean, democratic) can follow, as in
Hoang et al. 2017, "Selective deep convolutional features for image retrieval", Sec. 3.2.

Layouts: VLAD / T-emb / F-FAemb are block-major, ``[block_1, ..., block_k]``; the Fisher vector is
``[G_mu_1 .. G_mu_k, G_sigma_1 .. G_sigma_k]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .normalize import l2n

__all__ = [
    "vlad",
    "vlad_embed",
    "nearest_centroid",
    "gmm_posteriors",
    "fisher_vector",
    "fv_embed",
    "temb",
    "ffaemb",
    "ffaemb_coefficients",
    "ffaemb_dim",
    "ffaemb_objective",
]


# --------------------------------------------------------------------------------------------------
# helpers


def _tensor(a, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(dtype)


def _features(X) -> torch.Tensor:
    x = _tensor(X)
    if x.ndim != 2:
        raise ValueError(f"local features must be (N, d), got shape {tuple(x.shape)}")
    return x


def _centroids(C, x: torch.Tensor, name: str = "centroids") -> torch.Tensor:
    c = _tensor(C, x.dtype)
    if c.ndim != 2 or c.shape[1] != x.shape[1]:
        raise ValueError(f"{name} must be (k, {x.shape[1]}) to match the features, got shape {tuple(c.shape)}")
    return c


def _like(t: torch.Tensor, ref):
    return t if isinstance(ref, torch.Tensor) else t.numpy()


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, k) squared Euclidean distances, clamped at 0 against round-off."""
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return d2.clamp_min(0.0)


def nearest_centroid(X, C):
    """Index (N,) of the nearest centroid of each row of ``X`` (ties go to the lowest index)."""
    x = _features(X)
    idx = _sq_dists(x, _centroids(C, x)).argmin(1)
    return idx if isinstance(X, torch.Tensor) else idx.numpy()


# --------------------------------------------------------------------------------------------------
# VLAD


def vlad_embed(X, C):
    """Per-feature VLAD embedding (N, k*d): the residual ``x - c_NN(x)`` placed in its centroid's block.

    Summing the rows gives the un-normalised VLAD of Jégou et al. 2010 (Eq. 1, ``v_k = sum_{NN(x)=k} x - c_k``).
    """
    x = _features(X)
    c = _centroids(C, x)
    n, d = x.shape
    k = c.shape[0]
    a = _sq_dists(x, c).argmin(1)
    out = torch.zeros(n, k, d, dtype=x.dtype)
    out[torch.arange(n), a] = x - c[a]
    return _like(out.reshape(n, k * d), X)


def vlad(X, C, intra_norm: bool = True):
    """VLAD vector (k*d,) of local features, as used on conv-layer features by Ng, Yang & Davis 2015.

    ``v_k = sum_{x: NN(x)=k} (x - c_k)`` (Jégou et al. 2010, Eq. 1); with ``intra_norm`` each block
    ``v_k`` is L2-normalised (Arandjelović & Zisserman 2013, "All about VLAD", Sec. 3), then the
    whole vector is L2-normalised. Empty blocks stay zero; an all-zero result stays zero.
    """
    x = _features(X)
    c = _centroids(C, x)
    k, d = c.shape
    a = _sq_dists(x, c).argmin(1)
    onehot = torch.zeros(x.shape[0], k, dtype=x.dtype)
    onehot[torch.arange(x.shape[0]), a] = 1.0
    v = onehot.T @ x - onehot.sum(0)[:, None] * c  # (k, d): sum of x minus count * c_k
    if intra_norm:
        v = l2n(v, dim=1)
    return _like(l2n(v.reshape(k * d), dim=0), X)


# --------------------------------------------------------------------------------------------------
# Fisher vector


def _gmm_params(means, variances, weights, x: torch.Tensor):
    mu = _centroids(means, x, "gmm_means")
    var = _tensor(variances, x.dtype)
    if var.ndim == 0:
        var = var.expand_as(mu)
    elif var.ndim == 1:
        var = var[:, None].expand_as(mu)
    if var.shape != mu.shape:
        raise ValueError(f"gmm_vars must be scalar, (k,) or (k, d) = {tuple(mu.shape)}, got {tuple(var.shape)}")
    if weights is None:
        w = torch.full((mu.shape[0],), 1.0 / mu.shape[0], dtype=x.dtype)
    else:
        w = _tensor(weights, x.dtype).reshape(-1)
    if w.shape[0] != mu.shape[0]:
        raise ValueError(f"gmm_weights must have {mu.shape[0]} entries, got {w.shape[0]}")
    if bool((var <= 0).any()) or bool((w <= 0).any()):
        raise ValueError("GMM variances and weights must be strictly positive")
    return mu, var.contiguous(), w


def _log_gauss_post(x, mu, var, w) -> torch.Tensor:
    # log w_k + log N(x; mu_k, diag var_k), computed as a quadratic form without an (N, k, d) tensor
    prec = 1.0 / var
    quad = (x * x) @ prec.T - 2.0 * x @ (mu * prec).T + (mu * mu * prec).sum(1)[None, :]
    logdet = torch.log(var).sum(1)
    ll = torch.log(w)[None, :] - 0.5 * (quad + logdet[None, :] + x.shape[1] * math.log(2 * math.pi))
    return torch.softmax(ll, dim=1)


def gmm_posteriors(X, means, variances, weights=None):
    """Soft assignments ``gamma_i(k) = p(k | x_i)`` (N, k) of a diagonal GMM
    (Perronnin, Sánchez & Mensink 2010, Sec. 2)."""
    x = _features(X)
    mu, var, w = _gmm_params(means, variances, weights, x)
    return _like(_log_gauss_post(x, mu, var, w), X)


def _power_l2(v: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    return l2n(torch.sign(v) * v.abs().pow(alpha), dim=-1)


def fv_embed(X, gmm_means, gmm_vars, gmm_weights, second_order: bool = True):
    """Per-feature Fisher-vector gradients (N, k*d or 2*k*d), without the ``1/N`` factor.

    Row i holds ``gamma_i(k) (x_i - mu_k) / (sigma_k sqrt(w_k))`` for every k and, with
    ``second_order``, ``gamma_i(k) [(x_i - mu_k)^2 / sigma_k^2 - 1] / sqrt(2 w_k)``
    (Perronnin, Sánchez & Mensink 2010, "Improving the Fisher kernel for large-scale image
    classification", Sec. 2, gradients w.r.t. means and standard deviations).
    """
    x = _features(X)
    mu, var, w = _gmm_params(gmm_means, gmm_vars, gmm_weights, x)
    g = _log_gauss_post(x, mu, var, w)  # (N, k)
    z = (x[:, None, :] - mu[None]) / var.sqrt()[None]  # (N, k, d) normalised residuals
    n = x.shape[0]
    parts = [(g[:, :, None] * z / w.sqrt()[None, :, None]).reshape(n, -1)]
    if second_order:
        parts.append((g[:, :, None] * (z * z - 1.0) / (2.0 * w).sqrt()[None, :, None]).reshape(n, -1))
    return _like(torch.cat(parts, dim=1), X)


def fisher_vector(X, gmm_means, gmm_vars, gmm_weights, second_order: bool = True, normalize: bool = True):
    """Fisher vector (k*d or 2*k*d,) of local features = mean of :func:`fv_embed` rows.

    Perronnin, Sánchez & Mensink 2010, Sec. 2: ``G_mu_k = 1/(N sqrt w_k) sum_i gamma_i(k)(x_i-mu_k)/sigma_k``
    and ``G_sigma_k = 1/(N sqrt(2 w_k)) sum_i gamma_i(k)[(x_i-mu_k)^2/sigma_k^2 - 1]``. With
    ``normalize`` (the "improved" FV, Sec. 3) the signed square root and L2 normalisation are applied.
    Computed from the zeroth/first/second-order statistics, so no (N, 2kd) matrix is formed.
    """
    x = _features(X)
    mu, var, w = _gmm_params(gmm_means, gmm_vars, gmm_weights, x)
    n = max(x.shape[0], 1)
    g = _log_gauss_post(x, mu, var, w)  # (N, k)
    s0 = g.sum(0)[:, None]  # (k, 1)
    s1 = g.T @ x  # (k, d)
    sd = var.sqrt()
    parts = [((s1 - s0 * mu) / sd / w.sqrt()[:, None] / n).reshape(-1)]
    if second_order:
        s2 = g.T @ (x * x)
        quad = (s2 - 2.0 * mu * s1 + s0 * mu * mu) / var - s0
        parts.append((quad / (2.0 * w).sqrt()[:, None] / n).reshape(-1))
    v = torch.cat(parts)
    if normalize:
        v = _power_l2(v)
    return _like(v, X)


# --------------------------------------------------------------------------------------------------
# Triangulation embedding


def temb(X, C):
    """Per-feature triangulation embedding (N, k*d), Jégou & Zisserman 2014, Sec. 2.

    ``R(x) = [r_1(x), ..., r_k(x)]`` with ``r_j(x) = (x - c_j) / ||x - c_j||`` (a residual that coincides
    with its anchor is left at zero). The learned centring + whitening ``phi(x) = Sigma^-1/2 (R(x) - R_0)``
    (same section) is applied by the ``selective`` recipe (:mod:`instance_search.recipes.hoang`).
    """
    x = _features(X)
    c = _centroids(C, x)
    r = x[:, None, :] - c[None]  # (N, k, d)
    r = l2n(r, dim=2)
    return _like(r.reshape(x.shape[0], -1), X)


# --------------------------------------------------------------------------------------------------
# F-FAemb


def ffaemb_dim(k: int, d: int) -> int:
    """Output dimension of :func:`ffaemb`: ``k * d (d + 1) / 2``."""
    return k * d * (d + 1) // 2


def ffaemb_coefficients(X, B, mu: float = 1e-2):
    """Locality-constrained coding coefficients ``gamma`` (N, k) of F-FAemb, rows summing to 1: for each x,
    ``gamma = argmin ||x - B^T gamma||^2 + mu a(x) ||gamma||^2`` s.t. ``1^T gamma = 1``, with
    ``a(x) = sum_j ||x - b_j||_1^3``, in closed form (Lagrange multiplier ``lambda``):
    ``gamma = M^-1 (B x - lambda 1)``, ``lambda = (1^T M^-1 B x - 1) / (1^T M^-1 1)``, ``M = B B^T + mu a(x) I``
    (Do & Cheung 2017, F-FAemb; transcribed from the authors' ``learn_coeff_one_sample.m``, mu = 1e-2 there).

    ``B`` (k, d) are the anchors (rows). Vectorised over x with one eigen-decomposition of ``B B^T``.
    """
    x = _features(X).to(torch.float64)
    b = _centroids(B, x, "anchors").to(torch.float64)
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    a = (x[:, None, :] - b[None]).abs().sum(2).pow(3).sum(1)  # (N,)
    e, q = torch.linalg.eigh(b @ b.T)  # B B^T = Q diag(e) Q^T
    s = 1.0 / (e.clamp_min(0.0)[None, :] + mu * a[:, None])  # (N, k): eigenvalues of M^-1
    minv_bx = ((x @ b.T @ q) * s) @ q.T  # (N, k)  M^-1 B x
    minv_1 = ((q.sum(0)[None, :]) * s) @ q.T  # (N, k)  M^-1 1
    lam = (minv_bx.sum(1) - 1.0) / minv_1.sum(1)
    g = minv_bx - lam[:, None] * minv_1
    dt = torch.float64 if _tensor(X).dtype == torch.float64 else torch.float32
    return _like(g.to(dt), X)


def ffaemb_objective(X, B, gamma, mu: float = 1e-2) -> float:
    """The coding objective the coefficients minimise, summed over the features:
    ``1/2 sum_i ||x_i - B^T gamma_i||^2 + mu/2 sum_i ||gamma_i||^2 sum_j ||x_i - b_j||_1^3`` (the authors'
    ``get_objective.m``; they keep the k-means anchors with the lowest value of 5 runs, ``init_B_by_kmeans.m``)."""
    x = _features(X).to(torch.float64)
    b = _centroids(B, x, "anchors").to(torch.float64)
    g = _tensor(gamma, torch.float64)
    rec = 0.5 * ((g @ b - x) ** 2).sum()
    loc = ((g * g).sum(1) * (x[:, None, :] - b[None]).abs().sum(2).pow(3).sum(1)).sum()
    return float(rec + 0.5 * mu * loc)


def ffaemb(X, B, gamma=None, mu: float = 1e-2):
    """Per-feature F-FAemb (N, k*d(d+1)/2), Do & Cheung 2017 ("Embedding based on function approximation for
    large scale image search", F-FAemb), as the authors of Hoang et al. 2017 compute it (``fa_embedding.c``):

    ``phi(x) = [gamma_j(x) triu(r_j r_j^T)]_j`` with the unit residual ``r_j = (x - b_j) / ||x - b_j||`` (the
    outer product normalised by ``||x - b_j||^2``), ``triu`` the upper triangle with the diagonal, row by row
    (``torch.triu_indices`` order), off-diagonal entries NOT scaled by sqrt(2), and ``gamma`` the
    locality-constrained coefficients of :func:`ffaemb_coefficients` (computed when not given). A feature
    equal to an anchor has a zero block there (the authors' code gives NaN).
    """
    x = _features(X)
    b = _centroids(B, x, "anchors")
    n, d = x.shape
    k = b.shape[0]
    g = _tensor(ffaemb_coefficients(x, b, mu) if gamma is None else gamma, x.dtype)
    if tuple(g.shape) != (n, k):
        raise ValueError(f"gamma must be ({n}, {k}), got shape {tuple(g.shape)}")
    r = x[:, None, :] - b[None]  # (N, k, d)
    r = l2n(r, dim=2)
    iu, ju = torch.triu_indices(d, d)
    e = r[:, :, iu] * r[:, :, ju] * g[:, :, None]  # (N, k, d(d+1)/2)
    return _like(e.reshape(n, k * iu.shape[0]), X)
