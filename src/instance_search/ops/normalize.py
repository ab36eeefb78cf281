"""Vector normalisations used throughout the retrieval pipelines.

* :func:`l2n` — L2 normalisation, applied after every pooling/whitening step of MAC and R-MAC
  (Tolias, Sicre & Jégou 2016, "Particular object retrieval with integral max-pooling of CNN
  activations": region vectors are L2-normalised before and after PCA-whitening, and the summed
  R-MAC vector is L2-normalised again).
* :func:`power_law` — signed power normalisation ``sign(x) |x|^alpha`` (Perronnin, Sánchez & Mensink
  2010, "Improving the Fisher kernel for large-scale image classification", Sec. 3.1; used after
  PCA-whitening by Jégou & Chum 2012, "Negative evidences and co-occurrences in image retrieval").

Both functions are pure, accept a ``torch.Tensor`` or a ``numpy.ndarray`` and return the same kind
(and, for floating inputs, the same dtype and device); integer inputs become float32.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["EPS", "l2n", "power_law"]


#: The one floor of every L2 normalisation in the package: a vector whose norm is below it is divided by it.
EPS = 1e-12

_LOW_NP = (np.float16,)
_LOW_T = (torch.float16, torch.bfloat16)


def _float_np(x) -> np.ndarray:
    a = np.asarray(x)
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float32)


def _float_t(x: torch.Tensor) -> torch.Tensor:
    return x if torch.is_floating_point(x) else x.to(torch.float32)


def l2n(x, dim: int = -1):
    """L2-normalise ``x`` along ``dim``: ``x / max(||x||_2, EPS)`` with the package's one :data:`EPS` (1e-12).

    Shapes: any; the norm is taken over axis ``dim`` (default: last, i.e. rows of an (N, D) matrix).
    Vectors whose norm is below ``EPS`` are divided by ``EPS`` instead (a zero vector stays zero, so no NaN is
    ever produced). Returns the same type as the input (torch or numpy) and, for floating inputs, the same dtype
    and device; half-precision inputs are normalised in float32 (``EPS`` underflows in float16) and cast back.
    Differentiable (torch autograd) like the formula it computes.
    """
    if isinstance(x, torch.Tensor):
        t = _float_t(x)
        if t.dtype in _LOW_T:
            return l2n(t.to(torch.float32), dim).to(t.dtype)
        return t / t.norm(p=2, dim=dim, keepdim=True).clamp_min(EPS)
    a = _float_np(x)
    if a.dtype in _LOW_NP:
        return l2n(a.astype(np.float32), dim).astype(a.dtype)
    n = np.sqrt(np.sum(a * a, axis=dim, keepdims=True))
    return (a / np.maximum(n, EPS)).astype(a.dtype, copy=False)


def power_law(x, alpha: float = 0.5):
    """Signed power law ``sign(x) * |x|**alpha`` element-wise (no re-normalisation; follow with
    :func:`l2n` as in Perronnin et al. 2010, Sec. 3.1). ``alpha = 0.5`` is the signed square root;
    ``alpha = 1`` is the identity. Shapes: any; returns the input's type."""
    if alpha <= 0:
        raise ValueError(f"power-law exponent must be > 0, got {alpha}")
    if isinstance(x, torch.Tensor):
        t = _float_t(x)
        return torch.sign(t) * t.abs().pow(alpha)
    a = _float_np(x)
    return (np.sign(a) * np.abs(a) ** alpha).astype(a.dtype, copy=False)
