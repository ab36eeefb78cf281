"""Aggregation of per-feature embeddings (N, D) into one image vector (D,).

Sum / average pooling and democratic aggregation (Jégou & Zisserman 2014, "Triangulation embedding and
democratic aggregation for image search", Sec. 3), followed by power-law + L2 normalisation, as used by
Hoang et al. 2017 ("Selective deep convolutional features for image retrieval", Sec. 3.2–3.3).
Arrays may be numpy or torch; results have the kind of the input.
"""
from __future__ import annotations

import numpy as np
import torch

from . import normalize as _normalize
from .normalize import l2n

__all__ = ["sum_pool", "mean_pool", "democratic", "democratic_weights", "power_law", "l2n", "aggregate"]

_EPS = 1e-12


def _tensor(a) -> torch.Tensor:
    t = a.detach() if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _embeddings(E) -> torch.Tensor:
    e = _tensor(E)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(e.shape)}")
    return e


def _like(t: torch.Tensor, ref):
    return t if isinstance(ref, torch.Tensor) else t.numpy()


def power_law(v, alpha: float = 0.5, l2: bool = True):
    """Signed power-law ``sign(v)|v|^alpha`` (Perronnin et al. 2010, Sec. 3.1; Jégou & Zisserman 2014,
    Sec. 4), then L2 normalisation along the last axis when ``l2``."""
    t = _normalize.power_law(v, alpha)
    return l2n(t) if l2 else t


def sum_pool(E):
    """Sum aggregation ``psi = sum_i phi(x_i)``."""
    return _like(_embeddings(E).sum(0), E)


def mean_pool(E):
    """Average aggregation ``psi = 1/N sum_i phi(x_i)`` (zero vector for N = 0)."""
    e = _embeddings(E)
    return _like(e.sum(0) / max(e.shape[0], 1), E)


def democratic_weights(E, n_iter: int = 10, gamma: float = 0.5):
    """Democratic weights ``lambda`` (N,) of Jégou & Zisserman 2014, Sec. 3.2 (Algorithm 1).

    Goal: every embedded vector contributes equally to the similarity of the aggregated vector,
    ``lambda_i phi_i^T psi = C`` with ``psi = sum_j lambda_j phi_j``, i.e. ``diag(lambda) K lambda = C 1``
    on the Gram matrix ``K``. Negative entries of ``K`` are set to 0 (``K_+``) so that the Sinkhorn-like
    scaling applies. Starting from ``lambda = 1``, each iteration computes
    ``sigma = diag(lambda) K_+ lambda`` and updates ``lambda_i <- lambda_i / sigma_i^gamma``. ``gamma = 0.5``
    is the symmetric Sinkhorn step; smaller values damp the update. Rows with no positive similarity
    (zero vectors) keep their weight; they add nothing to ``psi``.
    """
    e = _embeddings(E)
    n = e.shape[0]
    lam = torch.ones(n, dtype=e.dtype)
    if n == 0:
        return _like(lam, E)
    k = (e @ e.T).clamp_min(0.0)
    for _ in range(int(n_iter)):
        sigma = lam * (k @ lam)
        lam = torch.where(sigma > _EPS, lam / sigma.clamp_min(_EPS).pow(gamma), lam)
    return _like(lam, E)


def democratic(E, n_iter: int = 10, gamma: float = 0.5, return_weights: bool = False):
    """Democratic aggregation ``psi = sum_i lambda_i phi(x_i)`` (Jégou & Zisserman 2014, Sec. 3.2)
    with the weights of :func:`democratic_weights`. The scale of ``psi`` is arbitrary (normalise after)."""
    e = _embeddings(E)
    lam = _tensor(democratic_weights(e, n_iter=n_iter, gamma=gamma))
    psi = lam @ e if e.shape[0] else torch.zeros(e.shape[1], dtype=e.dtype)
    if return_weights:
        return _like(psi, E), _like(lam, E)
    return _like(psi, E)


_METHODS = {"sum": sum_pool, "mean": mean_pool, "democratic": democratic}


def aggregate(E, method: str = "sum", **kwargs):
    """Dispatch to ``sum`` / ``mean`` / ``democratic`` aggregation by name."""
    try:
        fn = _METHODS[method]
    except KeyError:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {sorted(_METHODS)}") from None
    return fn(E, **kwargs)
