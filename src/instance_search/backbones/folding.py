"""BatchNorm folding: the one convolution equal to a convolution followed by a BatchNorm at inference.

Shared by the CPU engines that fold their networks' BatchNorms (:class:`~instance_search.backbones.fast.FoldedResNet50`,
:class:`~instance_search.backbones.fast_lite.FoldedLite0`); a module of its own so that both engine modules import
it without importing each other.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["fold_batchnorm"]


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype = torch.float32):
    """``(weight, bias)`` of the one convolution equal to ``bn(conv(x))`` at inference (Ioffe & Szegedy 2015,
    Alg. 2): with ``k = γ / sqrt(σ² + ε)``, ``W' = k·W`` (per output channel) and ``b' = k·(b - μ) + β``.
    Computed in float64, returned in ``dtype``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm: the BatchNorm has no running statistics")
    w = conv.weight.detach().to(torch.float64)
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    g = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(b)
    k = g / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    mu = bn.running_mean.detach().to(torch.float64)
    return (w * k[:, None, None, None]).to(dtype), (k * (b - mu) + beta).to(dtype)
