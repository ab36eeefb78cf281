"""Global and regional pooling of convolutional feature maps.

Feature maps are ``torch.Tensor`` of shape ``(C, H, W)`` (one image) or ``(B, C, H, W)`` (a batch);
pooled vectors are ``(C,)`` or ``(B, C)`` respectively. Nothing here normalises unless stated.

* :func:`mac`  — maximum activations of convolutions, Tolias, Sicre & Jégou 2016 ("Particular object
  retrieval with integral max-pooling of CNN activations", ICLR), Sec. 3, Eq. 1:
  ``f_i = max_{p in Omega} X_i(p)``.
* :func:`spoc` — sum pooling (SPoC), Babenko & Lempitsky 2015 ("Aggregating local deep features for
  image retrieval", ICCV), Sec. 3 (SPoC): ``psi_i = sum_{x,y} alpha(x,y) X_i(x,y)`` with an optional
  Gaussian centre prior ``alpha``.
* :func:`gem`  — generalised mean pooling, Radenović, Tolias & Chum 2018 ("Fine-tuning CNN image
  retrieval with no human annotation", TPAMI), Sec. 3 (GeM pooling): ``f_i = (1/|X_i| sum_x x^p)^(1/p)``.
* :func:`rmac_regions`, :func:`region_macs`, :func:`rmac` — regional MAC (R-MAC), Tolias et al. 2016:
  square regions at ``levels`` scales, MAC per region, L2 → PCA-whitening → L2, sum, L2.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .normalize import l2n

__all__ = ["mac", "spoc", "gem", "rmac_regions", "region_macs", "rmac"]

# R-MAC region-sampling constants of Tolias et al. (2016) / their MATLAB code.
_RMAC_OVERLAP = 0.4  # desired overlap of neighbouring regions
_RMAC_STEPS = np.arange(2, 8, dtype=np.float64)  # candidate numbers of regions along the long side


def _check_map(X: torch.Tensor) -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor feature map, got {type(X).__name__}")
    if X.ndim not in (3, 4):
        raise ValueError(f"expected a (C, H, W) or (B, C, H, W) feature map, got shape {tuple(X.shape)}")
    if X.shape[-1] == 0 or X.shape[-2] == 0:
        raise ValueError(f"feature map has an empty spatial extent: shape {tuple(X.shape)}")
    return X


# ---------------------------------------------------------------------------------------- global pooling
def mac(X: torch.Tensor) -> torch.Tensor:
    """MAC: per-channel maximum over all spatial positions (Tolias et al. 2016, Sec. 3, Eq. 1).

    ``X``: (C, H, W) or (B, C, H, W) → (C,) or (B, C). Not normalised.
    """
    return _check_map(X).amax(dim=(-2, -1))


def _centre_prior(height: int, width: int, dtype, device) -> torch.Tensor:
    """Gaussian centre prior of Babenko & Lempitsky 2015 (Sec. 3, "centering prior"):
    ``alpha(x, y) = exp(-((y - H/2)^2 + (x - W/2)^2) / (2 sigma^2))`` with sigma one third of the
    distance from the centre to the closest border. Positions are cell centres, 0-indexed, so the
    map centre is ((W-1)/2, (H-1)/2) and the closest border is min(H, W)/2 away. Shape (H, W)."""
    sigma = min(height, width) / 2.0 / 3.0
    ys = torch.arange(height, dtype=torch.float64) - (height - 1) / 2.0
    xs = torch.arange(width, dtype=torch.float64) - (width - 1) / 2.0
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return torch.exp(-d2 / (2.0 * sigma * sigma)).to(dtype=dtype, device=device)


def spoc(X: torch.Tensor, center_prior: bool = False) -> torch.Tensor:
    """SPoC sum pooling (Babenko & Lempitsky 2015, Sec. 3): per-channel sum over positions.

    With ``center_prior=True`` every position is weighted by the Gaussian centre prior (see
    :func:`_centre_prior`); by default the prior is off (plain sum, as used for R-MAC-style
    comparisons, e.g. Radenović et al. 2018). ``X``: (C, H, W) or (B, C, H, W) → (C,) or (B, C).
    Not normalised (the paper follows it with L2 → PCA-whitening → L2).
    """
    X = _check_map(X)
    if not torch.is_floating_point(X):
        X = X.to(torch.float32)
    if center_prior:
        X = X * _centre_prior(X.shape[-2], X.shape[-1], X.dtype, X.device)
    return X.sum(dim=(-2, -1))


def gem(X: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean (GeM) pooling (Radenović, Tolias & Chum 2018, Sec. 3):
    ``f_i = (mean_{x in X_i} max(x, eps)^p)^(1/p)``.

    ``p = 1`` is average pooling, ``p → inf`` tends to MAC. Activations are clamped at ``eps`` (they
    are post-ReLU, hence non-negative, in the paper). ``p`` may be a float or a scalar tensor (e.g. a
    learned parameter). ``X``: (C, H, W) or (B, C, H, W) → (C,) or (B, C). Not normalised.
    """
    X = _check_map(X)
    if not torch.is_floating_point(X):
        X = X.to(torch.float32)
    if isinstance(p, torch.Tensor):
        if p.numel() != 1:
            raise ValueError(f"GeM exponent must be a scalar, got shape {tuple(p.shape)}")
        if float(p) <= 0:
            raise ValueError(f"GeM exponent must be > 0, got {float(p)}")
    elif p <= 0:
        raise ValueError(f"GeM exponent must be > 0, got {p}")
    return X.clamp_min(eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


# ---------------------------------------------------------------------------------------- R-MAC
def rmac_regions(height: int, width: int, levels: int = 3) -> np.ndarray:
    """R-MAC regions of an ``height`` × ``width`` feature map (Tolias et al. 2016, Sec. 3), exactly
    as sampled by the authors' MATLAB code (``rmac_regionvec_act.m`` / ``rmac_from_act`` in
    gtolias/rmac), converted to 0-indexed cells.

    Returns an int64 array of shape (R, 4) with rows ``(x, y, w, h)``: the region covers columns
    ``x .. x+w-1`` and rows ``y .. y+h-1`` of the map (0-indexed, end-exclusive ``x+w``/``y+h``).
    "0-indexed" means ``x, y`` = MATLAB's first column/row index − 1: MATLAB takes
    ``X(i_+[1:wl], j_+[1:wl], :)``, so ``x = j_`` and ``y = i_``; ``w = h = wl``.

    The rule, for ``l = 1..levels`` (regions are square, side ``wl = floor(2 min(H,W) / (l+1))``):

    * the number of extra regions along the long side, ``idx`` in 1..6, minimises
      ``|1 - b/w - 0.4|`` with ``w = min(H, W)`` and ``b = (max(H,W) - w) / (steps - 1)``,
      ``steps = 2..7`` (first minimum on ties); it is 0 for the short side and for square maps;
    * along a side of length ``S`` with ``n = l + extra`` regions, the offsets are
      ``floor(wl2 + k * (S - wl) / (n - 1)) - wl2`` for ``k = 0..n-1``, ``wl2 = floor(wl/2 - 1)``
      (a single offset 0 when ``n = 1``);
    * regions are listed level by level, row offsets in the outer loop, column offsets inner;
      levels whose ``wl`` is 0 contribute nothing. Duplicates are kept, as in the original.

    Tiny maps (``min(H, W) < 2``) return the full map ``[[0, 0, W, H]]`` as the single region (the
    original would return 1×1 cells there). ``levels`` must be ≥ 1.
    """
    H, W, L = int(height), int(width), int(levels)
    if H < 1 or W < 1:
        raise ValueError(f"feature map must be at least 1x1, got {H}x{W}")
    if L < 1:
        raise ValueError(f"R-MAC needs at least one level, got levels={levels}")
    if min(H, W) < 2:
        return np.array([[0, 0, W, H]], dtype=np.int64)

    w = min(H, W)
    b = (max(H, W) - w) / (_RMAC_STEPS - 1.0)
    idx = int(np.argmin(np.abs((w * w - w * b) / (w * w) - _RMAC_OVERLAP))) + 1  # MATLAB's 1-based idx
    extra_w = idx if H < W else 0
    extra_h = idx if H > W else 0

    def offsets(side: int, wl: int, n: int) -> np.ndarray:
        wl2 = math.floor(wl / 2.0 - 1.0)
        step = 0.0 if n == 1 else (side - wl) / (n - 1)
        return (np.floor(wl2 + np.arange(n, dtype=np.float64) * step) - wl2).astype(np.int64)

    out = []
    for level in range(1, L + 1):
        wl = math.floor(2.0 * w / (level + 1))
        if wl == 0:
            continue
        xs = offsets(W, wl, level + extra_w)
        ys = offsets(H, wl, level + extra_h)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")  # rows outer, columns inner
        out.append(np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, wl), np.full(xx.size, wl)], axis=1))
    return np.concatenate(out, axis=0).astype(np.int64)


def _check_regions(regions, height: int, width: int) -> np.ndarray:
    r = np.asarray(regions)
    if r.ndim != 2 or r.shape[1] != 4 or r.shape[0] == 0:
        raise ValueError(f"regions must be a non-empty (R, 4) array of (x, y, w, h), got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        if not np.all(r == np.round(r)):
            raise ValueError("regions must hold integer cell coordinates")
    r = r.astype(np.int64)
    x, y, w, h = r.T
    bad = (x < 0) | (y < 0) | (w < 1) | (h < 1) | (x + w > width) | (y + h > height)
    if bad.any():
        raise ValueError(f"region {r[np.argmax(bad)].tolist()} (x, y, w, h) lies outside the "
                         f"{height}x{width} feature map or is empty")
    return r


def region_macs(X: torch.Tensor, regions) -> torch.Tensor:
    """MAC of each region (Tolias et al. 2016, Sec. 3: ``f_R,i = max_{p in R} X_i(p)``).

    ``X``: (C, H, W) or (B, C, H, W); ``regions``: (R, 4) integer ``(x, y, w, h)`` in 0-indexed cells
    (as from :func:`rmac_regions`). Returns (R, C) or (B, R, C), not normalised. One max-reduction per
    region over all channels at once (R is ~20 for 3 levels).
    """
    X = _check_map(X)
    r = _check_regions(regions, X.shape[-2], X.shape[-1])
    vecs = [X[..., y:y + h, x:x + w].amax(dim=(-2, -1)) for x, y, w, h in r.tolist()]
    return torch.stack(vecs, dim=-2)


def _apply_whitening(whitening, M: torch.Tensor) -> torch.Tensor:
    fn = whitening.transform if hasattr(whitening, "transform") else whitening
    out = fn(M)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(np.asarray(out), device=M.device)
    if out.ndim != 2 or out.shape[0] != M.shape[0]:
        raise ValueError(f"whitening must map an (R, C) matrix to (R, D), got {tuple(out.shape)} "
                         f"from {tuple(M.shape)}")
    return out.to(M.dtype) if torch.is_floating_point(out) else out.to(torch.float32)


def rmac(X: torch.Tensor, regions=None, levels: int = 3,
         whitening: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """R-MAC vector (Tolias et al. 2016, Sec. 3):
    ``v = L2( sum_R L2( W( L2( f_R ) ) ) )`` with ``f_R`` the MAC of region R (:func:`region_macs`)
    and ``W`` an optional PCA-whitening (identity when ``None``).

    ``X``: (C, H, W) → (D,), or (B, C, H, W) → (B, D); ``D = C`` without whitening. ``regions``:
    (R, 4) ``(x, y, w, h)`` cells, default :func:`rmac_regions` ``(H, W, levels)``. ``whitening``:
    a callable, or an object with ``.transform`` (e.g. ``PCAWhitening``), mapping an (R, C) tensor
    to (R, D); it is applied to each image's region matrix separately.
    """
    X = _check_map(X)
    if regions is None:
        regions = rmac_regions(X.shape[-2], X.shape[-1], levels=levels)
    macs = region_macs(X, regions)
    if not torch.is_floating_point(macs):
        macs = macs.to(torch.float32)
    batched = macs.ndim == 3
    if not batched:
        macs = macs[None]
    out = []
    for M in macs:  # M: (R, C) of one image
        M = l2n(M, dim=-1)
        if whitening is not None:
            M = l2n(_apply_whitening(whitening, M), dim=-1)
        out.append(l2n(M.sum(dim=0), dim=-1))
    v = torch.stack(out)
    return v if batched else v[0]
