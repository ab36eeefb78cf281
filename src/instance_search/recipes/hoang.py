"""Hoang et al.'s local-feature pipeline as a fitted object (fit on a TRAINING collection, then encode);
Ng et al. 2015's VLAD is in :mod:`.ng`.

* :class:`Selective` -- Hoang, Do, Le Tan & Cheung 2017, "Selective deep convolutional features for image
  retrieval" (ACM MM): a mask (SIFT / SUM / MAX, Sec. 3.1) selects cells of a conv map; the kept features are
  PCA-reduced to ``d`` and L2-normalised, embedded one by one (FV, VLAD, T-emb, F-FAemb), aggregated (sum /
  mean / democratic), rotation-normalised (a whitening learned on the aggregated vectors of a held-out set;
  for T-emb and F-FAemb the first components are dropped), power-law 0.5 and L2 (Sec. 3.2).

Maps are ``(C, H, W)`` numpy arrays or torch tensors (non-negative, post-ReLU). All heavy work is vectorised
(no Python loop over local features). Models save to one ``.npz`` (no pickles, written atomically) and refuse
to encode before they are fitted (:class:`~instance_search.fitted.whitening.NotFittedError`).

Documented choices where the papers leave room (see each class): the Table-2 / Table-4 ``(d, k)`` values
(:data:`TABLE2`, :data:`TABLE4`) are derived from the stated output dimensions; the rotation normalisation is
regularised because held-out collections here hold hundreds, not tens of thousands, of images.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import FileFormatError
from ..io import atomic_save_npz, load_npz
from ..ops.normalize import l2n
import torch

from ..fitted.codebook import GMMCodebook, KMeansCodebook, LocalPCA
from ..fitted.whitening import NotFittedError
from ..ops import embeddings as _emb
from ..ops.aggregation import aggregate as _aggregate
from ..ops.aggregation import democratic_weights as _democratic_weights
from ..ops.masks import masked_features, max_mask, sift_mask, sum_mask

__all__ = [
    "AGGREGATIONS",
    "EMBEDDINGS",
    "MASKS",
    "TABLE2",
    "TABLE4",
    "DIM1024",
    "LocalModelFileError",
    "NotFittedError",
    "RotationNormalisation",
    "Selective",
    "embedding_dim",
    "default_drop",
    "map_features",
    "mask_cells",
    "pca_basis",
]

_FORMAT_VERSION = 1
MASKS = ("none", "sift", "sum", "max")
EMBEDDINGS = ("fv", "vlad", "temb", "ffaemb")
AGGREGATIONS = ("sum", "mean", "democratic")

#: Hoang et al. 2017, Table 2: every embedding at D = 4224. ``(d, k)`` solve the usual dimension formulas
#: (FV 2kd, VLAD kd, T-emb (k-1)d after dropping d components, F-FAemb (k-1)d(d+1)/2 after dropping one
#: anchor's worth); the exact pairs of the paper could not be checked offline.
TABLE2: dict[str, dict[str, int]] = {
    "fv": {"d": 48, "k": 44},  # 2 * 44 * 48 = 4224
    "vlad": {"d": 64, "k": 66},  # 66 * 64 = 4224
    "temb": {"d": 64, "k": 67},  # 67 * 64 - 64 = 4224
    "ffaemb": {"d": 32, "k": 9},  # 9 * 528 - 528 = 4224
}
#: Hoang et al. 2017, Table 4 (dimensions 512 ... 8064), with T-emb: ``(k - 1) d = D``.
TABLE4: dict[int, dict[str, Any]] = {
    512: {"embedding": "temb", "d": 32, "k": 17},
    1024: {"embedding": "temb", "d": 64, "k": 17},
    2048: {"embedding": "temb", "d": 64, "k": 33},
    4096: {"embedding": "temb", "d": 64, "k": 65},
    8064: {"embedding": "temb", "d": 128, "k": 64},
}
#: Every embedding at D = 1024 (the issue's comparison size; Hoang et al. give Table 3 at 4224-D only):
#: FV 2kd, VLAD kd, T-emb (k-1)d (= Table 4's 1024-D row). F-FAemb cannot hit 1024 exactly ((k-1) d(d+1)/2 is
#: never a power of two), so it keeps d = 16, k = 9 and drops 200 = 136 + 64 leading components instead of 136.
DIM1024: dict[str, dict[str, int]] = {
    "fv": {"d": 32, "k": 16},  # 2 * 16 * 32 = 1024
    "vlad": {"d": 64, "k": 16},  # 16 * 64 = 1024
    "temb": {"d": 64, "k": 17},  # 17 * 64 - 64 = 1024
    "ffaemb": {"d": 16, "k": 9, "drop": 200},  # 9 * 136 - 200 = 1024
}


class LocalModelFileError(FileFormatError):
    """A saved Selective file is unreadable, damaged, or holds another kind of model."""


# --------------------------------------------------------------------------------------------------
# small helpers


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _map(fmap) -> np.ndarray:
    m = _np(fmap)
    if m.ndim != 3:
        raise ValueError(f"a conv feature map must be (C, H, W), got shape {m.shape}")
    return m


def map_features(fmap) -> np.ndarray:
    """Every cell of a ``(C, H, W)`` map as a local feature: ``(H*W, C)`` float32, row-major cells."""
    m = _map(fmap)
    return np.ascontiguousarray(m.reshape(m.shape[0], -1).T, dtype=np.float32)


def _sample_rows(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0 or x.shape[0] <= n:
        return x
    return x[np.sort(rng.choice(x.shape[0], n, replace=False))]


def _atomic_save(path, arrays: dict[str, np.ndarray]) -> Path:
    return atomic_save_npz(path, **arrays)


def _load(path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    data = load_npz(path, LocalModelFileError, f"{kind} file")
    try:
        found = str(data.get("kind", ""))
        version = int(data.get("format_version", -1))
        settings = json.loads(str(data["settings"]))
    except Exception as exc:  # BadZipFile, ValueError, KeyError, OSError, JSONDecodeError ...
        raise LocalModelFileError(f"{path}: corrupt or unreadable {kind} file ({type(exc).__name__}: {exc})") from exc
    if found != kind:
        raise LocalModelFileError(f"{path}: holds {found or 'no model kind'!r}, expected {kind}")
    if version != _FORMAT_VERSION:
        raise LocalModelFileError(f"{path}: format version {version}, this code reads {_FORMAT_VERSION}")
    return data, settings


def pca_basis(X, dim: int | None = None, rel_tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the rows of ``X`` (M, D): ``(mean (D,), components (r, D) orthonormal rows, eigenvalues (r,))``,
    eigenvalues decreasing, ``r = min(dim, numerical rank)``.

    Uses the (M, M) Gram matrix when ``M <= D`` (VLADs of 50k+ dimensions from a few hundred images), so no
    (D, D) covariance is formed. Computed in float64, except for matrices of more than 2e7 entries (float32,
    and directions below 1e-6 of the largest eigenvalue are discarded as round-off). Each component's largest
    coefficient is made positive (reproducible signs).
    """
    x = _np(X)
    dt = np.float64 if x.size <= 2e7 else np.float32
    x = np.asarray(x, dtype=dt)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs an (M >= 2, D) matrix, got shape {x.shape}")
    if dt == np.float32:
        rel_tol = max(rel_tol, 1e-6)
    m, d = x.shape
    mean = x.mean(0, dtype=np.float64)
    xc = (x - mean.astype(dt)).astype(dt, copy=False)
    if m <= d:
        g = (xc @ xc.T).astype(np.float64)
        w, u = np.linalg.eigh(g)
        order = np.argsort(w)[::-1]
        w, u = w[order], u[:, order]
        keep = w > rel_tol * max(w[0], 1e-300)
        w, u = w[keep], u[:, keep]
        if dim is not None:
            w, u = w[:dim], u[:, :dim]
        comps = (u.T.astype(dt) @ xc).astype(np.float64) / np.sqrt(w)[:, None]
        lam = w / m
    else:
        cov = (xc.T @ xc).astype(np.float64) / m
        w, v = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1]
        w, v = np.clip(w[order], 0.0, None), v[:, order]
        keep = w > rel_tol * max(w[0], 1e-300)
        w, v = w[keep], v[:, keep]
        if dim is not None:
            w, v = w[:dim], v[:, :dim]
        comps, lam = v.T, w
    if comps.shape[0] == 0:
        raise ValueError("PCA: the training vectors are all identical")
    idx = np.argmax(np.abs(comps), axis=1)
    signs = np.sign(comps[np.arange(comps.shape[0]), idx])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    return mean, comps, lam


# --------------------------------------------------------------------------------------------------
# Hoang et al. 2017


def embedding_dim(embedding: str, d: int, k: int) -> int:
    """Dimension of one embedded feature (and of the aggregated vector) before dropping components."""
    if embedding == "fv":
        return 2 * k * d
    if embedding in ("vlad", "temb"):
        return k * d
    if embedding == "ffaemb":
        return _emb.ffaemb_dim(k, d)
    raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")


def default_drop(embedding: str, d: int) -> int:
    """Leading principal components removed from the centred embedded features: ``d`` for T-emb (Jégou &
    Zisserman 2014, Sec. 2), ``d(d+1)/2`` for F-FAemb (one anchor's worth, by the same reasoning), 0 for FV
    and VLAD."""
    if embedding == "temb":
        return d
    if embedding == "ffaemb":
        return d * (d + 1) // 2
    if embedding in ("fv", "vlad"):
        return 0
    raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")


def mask_cells(fmap, mask: str, keypoints=None, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean (H, W) selection of Hoang et al. 2017 (Sec. 3.1): ``'max'`` (Eq. 2), ``'sum'`` (Eq. 3),
    ``'sift'`` (Eq. 1: cells holding a SIFT keypoint; needs ``keypoints`` (N, 2) as (x, y) pixels of the image
    of size ``image_hw`` = (H, W) that produced the map) or ``'none'`` (all cells)."""
    m = _map(fmap)
    if mask == "max":
        return np.asarray(max_mask(m))
    if mask == "sum":
        return np.asarray(sum_mask(m))
    if mask == "sift":
        if keypoints is None or image_hw is None:
            raise ValueError("the SIFT mask needs the image's keypoints and its (H, W) size")
        return sift_mask(keypoints, image_hw, m.shape[1:])
    if mask == "none":
        return np.ones(m.shape[1:], dtype=bool)
    raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS)}")


class RotationNormalisation:
    """Rotation normalisation (RN) of aggregated vectors, learned on a held-out set: centring, rotation onto
    the principal axes, whitening, removal of the ``drop`` leading components (Jégou & Zisserman 2014, Sec. 2
    and 4; Hoang et al. 2017, Sec. 3.2). ``transform``: (M, D) -> (M, D - drop).

    With M training vectors and M - 1 < D only M - 1 axes are learned; the rest of the space is completed by an
    orthonormal basis of their complement (Householder reflections, stored compactly), so the output keeps all
    D - drop dimensions. Whitening is regularised, ``(lambda_i + reg * mean(lambda))^-1/2``, the complement
    counting as eigenvalue 0: with ``reg = 1`` the dominant directions are whitened and the poorly estimated
    tail is left nearly as is. ``whiten=False`` gives the plain PCA rotation.
    """

    def __init__(self, drop: int = 0, whiten: bool = True, reg: float = 1.0):
        if drop < 0 or reg < 0:
            raise ValueError(f"drop and reg must be >= 0, got drop={drop}, reg={reg}")
        self.drop, self.whiten, self.reg = int(drop), bool(whiten), float(reg)
        self.mean = self.basis = self.scale = self.hh = self.tau = None
        self.perp_scale = 1.0

    @property
    def fitted(self) -> bool:
        return self.basis is not None

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_dim(self) -> int:
        return self.in_dim - self.drop

    def fit(self, R) -> "RotationNormalisation":
        x = np.asarray(_np(R), np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"rotation normalisation needs (M >= 2, D) training vectors, got {x.shape}")
        mean, comps, lam = pca_basis(x)
        dim = x.shape[1]
        r = comps.shape[0]
        if self.drop > r:
            raise ValueError(f"cannot drop {self.drop} components: the {x.shape[0]} training vectors span {r}")
        if self.whiten:
            mbar = float(lam.sum()) / dim
            if r < dim and self.reg <= 0:
                raise ValueError("whitening a space larger than the training set spans needs reg > 0")
            floor = max(self.reg * mbar, 1e-12 * float(lam[0]))
            scale = 1.0 / np.sqrt(lam + floor)
            perp = 1.0 / math.sqrt(floor)
        else:
            scale, perp = np.ones(r), 1.0
        self.mean = mean.astype(np.float32)
        self.basis = np.ascontiguousarray(comps.T, dtype=np.float32)  # (D, r)
        self.scale = scale.astype(np.float32)
        self.perp_scale = float(perp)
        if r < dim:
            self.hh, self.tau = _householder(comps.T)
        else:
            self.hh = self.tau = None
        return self

    def transform(self, R) -> np.ndarray:
        if not self.fitted:
            raise NotFittedError("RotationNormalisation is not fitted")
        x = np.asarray(_np(R), np.float32)
        one = x.ndim == 1
        x = x[None] if one else x
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"vectors must have {self.in_dim} dimensions, got shape {x.shape}")
        xc = x - self.mean
        parts = [((xc @ self.basis) * self.scale)[:, self.drop:]]
        if self.hh is not None:
            parts.append(_complement_coords(self.hh, self.tau, xc) * np.float32(self.perp_scale))
        y = np.concatenate(parts, axis=1)
        return y[0] if one else y

    def to_arrays(self, prefix: str = "rn_") -> dict[str, np.ndarray]:
        out = {f"{prefix}mean": self.mean, f"{prefix}basis": self.basis, f"{prefix}scale": self.scale,
               f"{prefix}perp_scale": np.array(self.perp_scale)}
        if self.hh is not None:
            out[f"{prefix}hh"], out[f"{prefix}tau"] = self.hh, self.tau
        return out

    def from_arrays(self, data: Mapping[str, np.ndarray], prefix: str = "rn_") -> "RotationNormalisation":
        self.mean = data[f"{prefix}mean"].astype(np.float32)
        self.basis = np.ascontiguousarray(data[f"{prefix}basis"], dtype=np.float32)
        self.scale = data[f"{prefix}scale"].astype(np.float32)
        self.perp_scale = float(data[f"{prefix}perp_scale"])
        if f"{prefix}hh" in data:
            self.hh = np.asfortranarray(data[f"{prefix}hh"], dtype=np.float64)
            self.tau = data[f"{prefix}tau"].astype(np.float64)
        if self.basis.shape[0] != self.mean.shape[0] or self.scale.shape != (self.basis.shape[1],):
            raise ValueError("rotation-normalisation arrays disagree in shape")
        if (self.hh is None) != (self.basis.shape[1] == self.basis.shape[0]) or (
                self.hh is not None and self.hh.shape != self.basis.shape):
            raise ValueError("rotation-normalisation complement does not match its basis")
        return self


def _householder(basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compact QR (reflectors, tau) of an orthonormal (D, r) basis; ``Q^T x`` rows r: are coordinates of x in
    an orthonormal basis of the basis' complement."""
    from scipy.linalg import qr

    (hh, tau), _ = qr(np.asarray(basis, np.float64), mode="raw")
    return np.asfortranarray(hh), tau


def _complement_coords(hh: np.ndarray, tau: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Coordinates (M, D - r) of the rows of X (M, D) in the orthogonal complement of the Householder basis."""
    from scipy.linalg.lapack import dormqr

    c = np.asfortranarray(np.asarray(X, np.float64).T)
    qtc, _, info = dormqr("L", "T", hh, tau, c, max(1, c.shape[1] * 64))
    if info != 0:  # pragma: no cover - LAPACK argument error
        raise RuntimeError(f"dormqr failed (info={info})")
    return np.ascontiguousarray(qtc[hh.shape[1]:].T, dtype=np.float32)


class Selective:
    """Selective conv features (Hoang, Do, Le Tan & Cheung 2017): mask -> local PCA -> embedding ->
    aggregation -> rotation normalisation -> power-law -> L2.

    ``Selective(mask, embedding, aggregation, d, k)``; :meth:`table2` / :meth:`table4` build the paper's
    configurations. ``fit(maps, keypoints=None, image_hws=None)`` learns everything on a TRAINING collection:

    1. the local PCA to ``d`` (+ L2) on up to ``features_per_image`` masked cells per image;
    2. the codebook: k-means for VLAD / T-emb, a diagonal GMM for FV / F-FAemb;
    3. for T-emb and F-FAemb (Jégou & Zisserman 2014, Sec. 2): the mean embedded feature ``R0`` and the
       ``drop`` leading principal directions of the centred embedded features, which are removed
       (``d`` for T-emb, ``d(d+1)/2`` for F-FAemb), so vectors have ``dim = D0 - drop`` dimensions;
    4. the rotation normalisation (:class:`RotationNormalisation`, regularised whitening) on the training
       images' aggregated vectors.

    Per image, vectorised: kept cells ``X`` (N, C) -> ``L2(PCA_d(X))`` -> ``phi`` (N, D0) [- ``R0``] ->
    ``psi = agg(phi)`` (democratic weights computed on the features with the dropped directions removed) ->
    complement coordinates (dim,) -> ``L2`` -> RN -> ``sign(x)|x|^alpha`` -> ``L2``. Because ``psi`` is
    L2-normalised before RN, ``'sum'`` and ``'mean'`` give the same vector (both names are accepted). When a mask
    keeps no cell (e.g. MAX on an all-zero map) every cell is used. ``encode(map, keypoints=None, image_hw=None)``:
    the SIFT mask needs the image's keypoints (x, y pixels) and (H, W).
    """

    KIND = "Selective"

    def __init__(self, mask: str = "max", embedding: str = "temb", aggregation: str = "democratic", d: int = 64,
                 k: int = 67, *, drop: int | None = None, rn: str | None = "whiten", rn_reg: float = 1.0,
                 alpha: float = 0.5, center: bool | None = None, features_per_image: int = 100,
                 max_train_features: int = 60_000, gmm_max_features: int = 10_000, gmm_iter: int = 30,
                 kmeans_iter: int = 20, drop_samples: int = 5000, seed: int = 1234, layer: str = "conv5_3",
                 backbone: str = "vgg16"):
        if mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS)}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        if rn not in ("whiten", "rotate", None):
            raise ValueError(f"rn must be 'whiten', 'rotate' or None, got {rn!r}")
        if d < 1 or k < 1 or alpha <= 0:
            raise ValueError(f"need d >= 1, k >= 1, alpha > 0; got d={d}, k={k}, alpha={alpha}")
        self.mask, self.embedding, self.aggregation = mask, embedding, aggregation
        self.d, self.k = int(d), int(k)
        self.center = embedding in ("temb", "ffaemb") if center is None else bool(center)
        self.drop = (default_drop(embedding, self.d) if self.center else 0) if drop is None else int(drop)
        if self.drop and not self.center:
            raise ValueError("dropping leading components needs centred embeddings (center=True)")
        if not 0 <= self.drop < self.embed_dim:
            raise ValueError(f"cannot drop {self.drop} of {self.embed_dim} dimensions")
        self.rn, self.rn_reg, self.alpha = rn, float(rn_reg), float(alpha)
        self.features_per_image, self.max_train_features = int(features_per_image), int(max_train_features)
        self.gmm_max_features, self.gmm_iter, self.kmeans_iter = int(gmm_max_features), int(gmm_iter), int(kmeans_iter)
        self.drop_samples = int(drop_samples)
        self.seed, self.layer, self.backbone = int(seed), str(layer), str(backbone)
        self.pca: LocalPCA | None = None
        self.codebook: KMeansCodebook | GMMCodebook | None = None
        self.local_mean: np.ndarray | None = None  # (D0,) R0
        self.drop_basis: np.ndarray | None = None  # (D0, drop) leading directions removed
        self._drop_qr: tuple[np.ndarray, np.ndarray] | None = None
        self.rot: RotationNormalisation | None = None
        self.trained_on = ""

    # ---------------------------------------------------------------- configurations
    @classmethod
    def table2(cls, embedding: str, mask: str = "max", aggregation: str = "democratic", **kw) -> "Selective":
        """A Table-2 configuration (D = 4224) of Hoang et al. 2017 for ``embedding``."""
        if embedding not in TABLE2:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(TABLE2)}")
        return cls(mask, embedding, aggregation, **{**TABLE2[embedding], **kw})

    @classmethod
    def table4(cls, dim: int, mask: str = "max", aggregation: str = "democratic", **kw) -> "Selective":
        """A Table-4 configuration (D in 512, 1024, 2048, 4096, 8064) of Hoang et al. 2017 (T-emb)."""
        if dim not in TABLE4:
            raise ValueError(f"no Table-4 configuration of {dim} dimensions; choose one of {sorted(TABLE4)}")
        cfg = {**TABLE4[dim], **kw}
        return cls(mask, cfg.pop("embedding"), aggregation, **cfg)

    @classmethod
    def dim1024(cls, embedding: str, mask: str = "max", aggregation: str = "democratic", **kw) -> "Selective":
        """``embedding`` at D = 1024 (:data:`DIM1024`), for the 1024-D version of Table 3."""
        if embedding not in DIM1024:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(DIM1024)}")
        return cls(mask, embedding, aggregation, **{**DIM1024[embedding], **kw})

    def __repr__(self) -> str:
        return (f"Selective(mask={self.mask!r}, embedding={self.embedding!r}, aggregation={self.aggregation!r}, "
                f"d={self.d}, k={self.k}, dim={self.dim}, {'fitted' if self.fitted else 'unfitted'})")

    @property
    def embed_dim(self) -> int:
        """Dimension D0 of one embedded feature."""
        return embedding_dim(self.embedding, self.d, self.k)

    @property
    def dim(self) -> int:
        """Output dimension ``D0 - drop``."""
        return self.embed_dim - self.drop

    @property
    def local_fitted(self) -> bool:
        return (self.pca is not None and self.codebook is not None and (not self.center or self.local_mean is not None)
                and (not self.drop or self.drop_basis is not None))

    @property
    def fitted(self) -> bool:
        return self.local_fitted and (self.rn is None or self.rot is not None)

    def _need(self, full: bool = True) -> None:
        if not self.local_fitted or (full and not self.fitted):
            raise NotFittedError(f"{self!r}: call fit(train_maps) or Selective.load(path) first")

    # ---------------------------------------------------------------- steps
    def select(self, fmap, keypoints=None, image_hw=None) -> np.ndarray:
        """Kept local features (N, C) float32 of one map (all cells when the mask keeps none)."""
        m = _map(fmap)
        keep = mask_cells(m, self.mask, keypoints, image_hw)
        if not keep.any():
            keep = np.ones_like(keep)
        return np.asarray(masked_features(m.astype(np.float32, copy=False), keep), dtype=np.float32)

    def _embed_raw(self, feats) -> torch.Tensor:
        y = self.pca.transform(torch.as_tensor(np.asarray(_np(feats), np.float32)))
        cb = self.codebook
        if self.embedding == "vlad":
            return _emb.vlad_embed(y, torch.from_numpy(cb.centroids))
        if self.embedding == "temb":
            return _emb.temb(y, torch.from_numpy(cb.centroids))
        if self.embedding == "fv":
            return _emb.fv_embed(y, cb.means, cb.variances, cb.weights)
        return _emb.ffaemb(y, cb.means, cb.variances, cb.weights)

    def embed(self, feats) -> torch.Tensor:
        """Local PCA + L2, embedding and (T-emb / F-FAemb) centring: (N, C) -> (N, D0) float32 tensor."""
        self._need(full=False)
        e = self._embed_raw(feats)
        if self.center:
            e = e - torch.from_numpy(self.local_mean)
        return e

    def aggregate(self, E, aggregation: str | None = None) -> np.ndarray:
        """Aggregated vector (dim,) of embedded features (N, D0): dropped directions removed, L2-normalised."""
        self._need(full=False)
        agg = aggregation or self.aggregation
        e = E if isinstance(E, torch.Tensor) else torch.from_numpy(np.asarray(E, np.float32))
        if agg == "democratic" and self.drop:
            v = torch.from_numpy(self.drop_basis)
            lam = _democratic_weights(e - (e @ v) @ v.T)
            psi = lam @ e if e.shape[0] else torch.zeros(e.shape[1], dtype=e.dtype)
        else:
            psi = _aggregate(e, agg)
        psi = np.asarray(_np(psi), np.float32)
        if self.drop:
            psi = _complement_coords(*self._drop_qr, psi[None])[0]
        return l2n(psi)

    def raw(self, fmap, keypoints=None, image_hw=None) -> np.ndarray:
        """Aggregated vector (dim,) of one map, before rotation normalisation."""
        return self.aggregate(self.embed(self.select(fmap, keypoints, image_hw)))

    def finalize(self, raw) -> np.ndarray:
        """RN, power-law and L2 of aggregated vectors: (dim,) -> (dim,), (M, dim) -> (M, dim)."""
        self._need()
        r = np.asarray(_np(raw), np.float32)
        y = self.rot.transform(r) if self.rot is not None else r
        return l2n(np.sign(y) * np.abs(y) ** self.alpha).astype(np.float32)

    def encode(self, fmap, keypoints=None, image_hw=None) -> np.ndarray:
        """Global descriptor (dim,) float32, L2-normalised, of one conv map."""
        self._need()
        return self.finalize(self.raw(fmap, keypoints, image_hw))

    def encode_many(self, maps: Sequence, keypoints: Sequence | None = None,
                    image_hws: Sequence | None = None) -> np.ndarray:
        """Descriptors (n, dim) of several maps (with per-map keypoints / image sizes for the SIFT mask)."""
        self._need()
        raws = [self.raw(m, None if keypoints is None else keypoints[i], None if image_hws is None else image_hws[i])
                for i, m in enumerate(maps)]
        return self.finalize(np.stack(raws)) if raws else np.zeros((0, self.dim), np.float32)

    # ---------------------------------------------------------------- learning
    def fit(self, maps: Sequence, keypoints: Sequence | None = None, image_hws: Sequence | None = None,
            trained_on: str = "") -> "Selective":
        """Learn every model from a TRAINING collection of conv maps (two passes over ``maps``)."""
        self.fit_local(maps, keypoints, image_hws)
        if self.rn is not None:
            self.fit_rn(np.stack([self.raw(m, None if keypoints is None else keypoints[i],
                                           None if image_hws is None else image_hws[i])
                                  for i, m in enumerate(maps)]))
        self.trained_on = str(trained_on)
        return self

    def fit_local(self, maps: Sequence, keypoints: Sequence | None = None,
                  image_hws: Sequence | None = None) -> "Selective":
        """Steps 1-3 of the class doc, from sampled masked features of the training maps."""
        if self.mask == "sift" and (keypoints is None or image_hws is None):
            raise ValueError("fitting with the SIFT mask needs keypoints and image sizes for every training map")
        rng = np.random.default_rng(self.seed)
        rows = [_sample_rows(self.select(m, None if keypoints is None else keypoints[i],
                                         None if image_hws is None else image_hws[i]), self.features_per_image, rng)
                for i, m in enumerate(maps)]
        x = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        x = _sample_rows(x, self.max_train_features, rng)
        need = max(self.k, self.d + 1, self.drop + 1, 2)
        if x.shape[0] < need:
            raise ValueError(f"only {x.shape[0]} training features: need at least {need}")
        self.pca = LocalPCA(self.d).fit(x)
        y = self.pca.transform(x)
        if self.embedding in ("vlad", "temb"):
            self.codebook = KMeansCodebook(self.k, niter=self.kmeans_iter, seed=self.seed).fit(y)
        else:
            self.codebook = GMMCodebook(self.k, max_iter=self.gmm_iter, seed=self.seed).fit(
                _sample_rows(y, self.gmm_max_features, rng))
        self.local_mean = self.drop_basis = self._drop_qr = None
        if self.center:
            xs = _sample_rows(x, max(self.drop_samples, self.drop + 1), rng)
            e = torch.cat([self._embed_raw(xs[i:i + 1000]) for i in range(0, xs.shape[0], 1000)])
            mean = e.double().mean(0)
            self.local_mean = mean.float().numpy()
            if self.drop:
                ec = (e.double() - mean).float()
                torch.manual_seed(self.seed)
                _, _, v = torch.svd_lowrank(ec, q=min(self.drop + 10, min(ec.shape)), niter=2)
                self.set_drop_basis(v[:, : self.drop].double().numpy())
        self.rot = None
        return self

    def set_drop_basis(self, basis) -> None:
        """Directions (D0, drop) removed from the centred embeddings (orthonormalised here)."""
        b = np.asarray(basis, np.float64)
        if b.shape != (self.embed_dim, self.drop):
            raise ValueError(f"drop basis must be ({self.embed_dim}, {self.drop}), got {b.shape}")
        q, _ = np.linalg.qr(b)
        self.drop_basis = np.ascontiguousarray(q, dtype=np.float32)
        self._drop_qr = _householder(q)

    def fit_rn(self, raw) -> "Selective":
        """Rotation normalisation learned on the aggregated vectors (M, dim) of training images."""
        self._need(full=False)
        r = np.asarray(_np(raw), np.float32)
        if r.ndim != 2 or r.shape[1] != self.dim:
            raise ValueError(f"training vectors must be (M, {self.dim}), got {r.shape}")
        self.rot = RotationNormalisation(0, whiten=self.rn == "whiten", reg=self.rn_reg).fit(r)
        return self

    def with_aggregation(self, aggregation: str) -> "Selective":
        """A copy with another aggregation that shares the fitted local models (its RN must be fitted)."""
        st = self._settings()
        st["aggregation"] = aggregation
        twin = Selective(**st)
        twin.pca, twin.codebook, twin.local_mean = self.pca, self.codebook, self.local_mean
        twin.drop_basis, twin._drop_qr = self.drop_basis, self._drop_qr
        return twin

    # ---------------------------------------------------------------- persistence
    def _settings(self) -> dict[str, Any]:
        return {"mask": self.mask, "embedding": self.embedding, "aggregation": self.aggregation, "d": self.d,
                "k": self.k, "drop": self.drop, "rn": self.rn, "rn_reg": self.rn_reg, "alpha": self.alpha,
                "center": self.center, "features_per_image": self.features_per_image,
                "max_train_features": self.max_train_features, "gmm_max_features": self.gmm_max_features,
                "gmm_iter": self.gmm_iter, "kmeans_iter": self.kmeans_iter, "drop_samples": self.drop_samples,
                "seed": self.seed, "layer": self.layer, "backbone": self.backbone}

    def save(self, path) -> Path:
        """Write the fitted model to ``path`` (.npz, no pickles, atomic)."""
        self._need()
        arrays = {"kind": np.array(self.KIND), "format_version": np.array(_FORMAT_VERSION),
                  "settings": np.array(json.dumps(self._settings())), "trained_on": np.array(self.trained_on),
                  "pca_mean": self.pca.mean, "pca_components": self.pca.components, "pca_eigvals": self.pca.eigvals}
        if isinstance(self.codebook, KMeansCodebook):
            arrays["cb_centroids"] = self.codebook.centroids
        else:
            arrays.update(cb_means=self.codebook.means, cb_variances=self.codebook.variances,
                          cb_weights=self.codebook.weights)
        if self.local_mean is not None:
            arrays["local_mean"] = self.local_mean
        if self.drop_basis is not None:
            arrays["drop_basis"] = self.drop_basis
        if self.rot is not None:
            arrays.update(self.rot.to_arrays())
        return _atomic_save(path, arrays)

    @classmethod
    def load(cls, path) -> "Selective":
        data, st = _load(path, cls.KIND)
        try:
            obj = cls(**st)
            pca = LocalPCA(obj.d)
            pca.mean, pca.components, pca.eigvals = data["pca_mean"], data["pca_components"], data["pca_eigvals"]
            pca._validate()
            obj.pca = pca
            if obj.embedding in ("vlad", "temb"):
                cb = KMeansCodebook(obj.k, niter=obj.kmeans_iter, seed=obj.seed)
                cb.centroids = data["cb_centroids"].astype(np.float32)
            else:
                cb = GMMCodebook(obj.k, max_iter=obj.gmm_iter, seed=obj.seed)
                cb.means, cb.variances, cb.weights = (data["cb_means"], data["cb_variances"], data["cb_weights"])
            cb._validate()
            obj.codebook = cb
            if obj.center:
                obj.local_mean = data["local_mean"].astype(np.float32)
                if obj.local_mean.shape != (obj.embed_dim,):
                    raise ValueError(f"local mean has shape {obj.local_mean.shape}, expected ({obj.embed_dim},)")
            if obj.drop:
                obj.set_drop_basis(data["drop_basis"])
            if obj.rn is not None:
                obj.rot = RotationNormalisation(0, whiten=obj.rn == "whiten", reg=obj.rn_reg).from_arrays(data)
                if obj.rot.in_dim != obj.dim:
                    raise ValueError(f"rotation learned on {obj.rot.in_dim}-D vectors, model makes {obj.dim}-D")
            obj.trained_on = str(data["trained_on"])
        except (KeyError, ValueError, TypeError) as exc:
            raise LocalModelFileError(f"{path}: inconsistent {cls.KIND} file ({exc})") from exc
        return obj
