"""Learned models for local-feature embeddings: codebooks, local PCA and the T-emb post-processing.

* :class:`KMeansCodebook` — k-means centroids (VLAD, T-emb anchors); Ng, Yang & Davis 2015 use k = 100.
* :class:`GMMCodebook` — diagonal GMM (Fisher vectors, F-FAemb coefficients).
* :class:`LocalPCA` — PCA of local conv features to d dims + L2 (Hoang et al. 2017, Sec. 3.2 pre-processing).
* :class:`TembPostprocess` — centring + whitening with the first components dropped (Jégou & Zisserman 2014).

All models save to / load from ``.npz`` without pickles; a save is atomic (temp file in the same folder,
fsync, ``os.replace``). Loading a damaged or foreign file raises :class:`CodebookFileError` naming the path;
using an unfitted model raises :class:`RuntimeError`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FileFormatError
from ..io import atomic_save_npz, load_npz
from ..ops.normalize import l2n

__all__ = ["CodebookFileError", "KMeansCodebook", "GMMCodebook", "LocalPCA", "TembPostprocess"]

_FORMAT_VERSION = 1


class CodebookFileError(FileFormatError):
    """A saved model file is unreadable, damaged, or holds another kind of model."""


def _as_2d(X, name: str = "features", dim: int | None = None) -> np.ndarray:
    if hasattr(X, "detach"):  # torch tensor
        X = X.detach().cpu().numpy()
    x = np.asarray(X)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, the model expects {dim}")
    return x


def _atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_save_npz(path, **arrays)


class _NpzModel:
    """Save/load plumbing: subclasses list their array attributes and scalar settings."""

    _ARRAYS: tuple[str, ...] = ()
    _SETTINGS: tuple[str, ...] = ()

    @property
    def fitted(self) -> bool:
        return all(getattr(self, a, None) is not None for a in self._ARRAYS)

    def _check_fitted(self) -> None:
        if not self.fitted:
            name = type(self).__name__
            raise RuntimeError(f"{name} is not fitted: call .fit(features) or {name}.load(path) first")

    def save(self, path) -> Path:
        """Write the fitted model to ``path`` (.npz, atomically); returns the path."""
        self._check_fitted()
        path = Path(path)
        arrays = {"kind": np.array(type(self).__name__), "format_version": np.array(_FORMAT_VERSION)}
        for a in self._ARRAYS:
            arrays[a] = np.asarray(getattr(self, a))
        for s in self._SETTINGS:
            v = getattr(self, s)
            arrays[f"setting_{s}"] = np.array(-1 if v is None else v)
        _atomic_save_npz(path, arrays)
        return path

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; a damaged or foreign file raises :class:`CodebookFileError`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such {cls.__name__} file")
        data = load_npz(path, CodebookFileError, f"{cls.__name__} file")
        kind = str(data.get("kind", ""))
        if kind != cls.__name__:
            raise CodebookFileError(f"{path}: holds {kind or 'no model kind'!r}, expected {cls.__name__}")
        version = int(data.get("format_version", -1))
        if version != _FORMAT_VERSION:
            raise CodebookFileError(f"{path}: format version {version}, this code reads {_FORMAT_VERSION}")
        missing = [a for a in cls._ARRAYS if a not in data] + [s for s in cls._SETTINGS if f"setting_{s}" not in data]
        if missing:
            raise CodebookFileError(f"{path}: {cls.__name__} file lacks {missing}")
        try:
            settings = {s: data[f"setting_{s}"].item() for s in cls._SETTINGS}
            obj = cls(**{s: (None if v == -1 else v) for s, v in settings.items()})
            for a in cls._ARRAYS:
                setattr(obj, a, data[a])
            obj._validate()
        except (ValueError, TypeError) as exc:
            raise CodebookFileError(f"{path}: inconsistent {cls.__name__} ({exc})") from exc
        return obj

    def _validate(self) -> None:  # overridden where shapes must agree
        pass


# --------------------------------------------------------------------------------------------------


class KMeansCodebook(_NpzModel):
    """k-means codebook of local features (faiss.Kmeans, fixed seed); Ng, Yang & Davis 2015 use k = 100 for VLAD."""

    _ARRAYS = ("centroids",)
    _SETTINGS = ("k", "niter", "seed")

    def __init__(self, k: int = 100, niter: int = 20, seed: int = 1234):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.niter, self.seed = int(k), int(niter), int(seed)
        self.centroids: np.ndarray | None = None

    @property
    def dim(self) -> int:
        self._check_fitted()
        return int(self.centroids.shape[1])

    def fit(self, X) -> "KMeansCodebook":
        import faiss

        x = np.ascontiguousarray(_as_2d(X), dtype=np.float32)
        if x.shape[0] < self.k:
            raise ValueError(f"k-means with k={self.k} needs at least {self.k} features, got {x.shape[0]}")
        km = faiss.Kmeans(x.shape[1], self.k, niter=self.niter, seed=self.seed, verbose=False)
        km.train(x)
        self.centroids = np.array(km.centroids, dtype=np.float32).reshape(self.k, x.shape[1])
        return self

    def assign(self, X) -> np.ndarray:
        """Index (N,) int64 of the nearest centroid of each feature."""
        self._check_fitted()
        x = _as_2d(X, dim=self.dim).astype(np.float64)
        c = self.centroids.astype(np.float64)
        d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
        return d2.argmin(1).astype(np.int64)

    def _validate(self) -> None:
        if self.centroids.ndim != 2 or self.centroids.shape[0] != self.k:
            raise ValueError(f"centroids shape {self.centroids.shape} does not match k={self.k}")


class GMMCodebook(_NpzModel):
    """Diagonal-covariance GMM of local features (scikit-learn ``GaussianMixture``), for Fisher vectors
    (Perronnin et al. 2010) and F-FAemb coefficients."""

    _ARRAYS = ("means", "variances", "weights")
    _SETTINGS = ("k", "max_iter", "seed")

    def __init__(self, k: int = 64, max_iter: int = 100, seed: int = 1234, reg_covar: float = 1e-6):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.max_iter, self.seed = int(k), int(max_iter), int(seed)
        self.reg_covar = float(reg_covar)
        self.means = self.variances = self.weights = None

    def fit(self, X) -> "GMMCodebook":
        try:
            from sklearn.mixture import GaussianMixture
        except ImportError as exc:  # pragma: no cover
            raise ImportError("GMMCodebook needs scikit-learn: pip install scikit-learn") from exc
        x = _as_2d(X).astype(np.float64)
        if x.shape[0] < self.k:
            raise ValueError(f"a GMM with k={self.k} needs at least {self.k} features, got {x.shape[0]}")
        gmm = GaussianMixture(n_components=self.k, covariance_type="diag", max_iter=self.max_iter,
                              random_state=self.seed, reg_covar=self.reg_covar)
        gmm.fit(x)
        self.means = gmm.means_.astype(np.float32)
        self.variances = gmm.covariances_.astype(np.float32)
        self.weights = gmm.weights_.astype(np.float32)
        return self

    def posteriors(self, X) -> np.ndarray:
        """Soft assignments (N, k) ``p(k | x)``."""
        from instance_search.ops.embeddings import gmm_posteriors

        self._check_fitted()
        x = _as_2d(X, dim=self.means.shape[1])
        return gmm_posteriors(x, self.means, self.variances, self.weights)

    def assign(self, X) -> np.ndarray:
        """Index (N,) int64 of the most likely component."""
        return self.posteriors(X).argmax(1).astype(np.int64)

    def _validate(self) -> None:
        if self.means.shape != self.variances.shape or self.weights.shape != (self.means.shape[0],):
            raise ValueError("means, variances and weights disagree in shape")
        if (self.variances <= 0).any() or (self.weights <= 0).any():
            raise ValueError("non-positive variances or weights")


class LocalPCA(_NpzModel):
    """PCA of local features to ``d`` dims then L2 normalisation (Hoang et al. 2017, Sec. 3.2 pre-processing);
    with ``whiten`` each component is divided by the square root of its eigenvalue (+ ``eps``)."""

    _ARRAYS = ("mean", "components", "eigvals")
    _SETTINGS = ("d", "whiten", "eps")

    def __init__(self, d: int = 32, whiten: bool = False, eps: float = 1e-8):
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        self.d, self.whiten, self.eps = int(d), bool(whiten), float(eps)
        self.mean = self.components = self.eigvals = None

    def fit(self, X) -> "LocalPCA":
        x = _as_2d(X).astype(np.float64)
        if self.d > x.shape[1]:
            raise ValueError(f"cannot keep d={self.d} components of {x.shape[1]}-dimensional features")
        if x.shape[0] < 2:
            raise ValueError("PCA needs at least 2 features")
        self.mean = x.mean(0)
        cov = np.cov(x - self.mean, rowvar=False, bias=True).reshape(x.shape[1], x.shape[1])
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1][: self.d]
        self.eigvals = np.clip(vals[order], 0.0, None)
        self.components = vecs[:, order].T  # (d, D)
        return self

    def transform(self, X):
        """(N, D) -> (N, d), rows L2-normalised; torch in, torch out (float32)."""
        self._check_fitted()
        is_torch = hasattr(X, "detach")
        x = _as_2d(X, dim=self.components.shape[1]).astype(np.float64)
        y = (x - self.mean) @ self.components.T
        if self.whiten:
            y = y / np.sqrt(self.eigvals + self.eps)
        y = l2n(y)
        y = y.astype(np.float32)
        if is_torch:
            import torch

            return torch.from_numpy(y)
        return y

    def _validate(self) -> None:
        if self.components.shape[0] != self.d or self.mean.shape != (self.components.shape[1],):
            raise ValueError("mean / components shapes disagree with d")


class TembPostprocess(_NpzModel):
    """Centring + whitening with the first ``drop`` principal components removed (Jégou & Zisserman 2014,
    Sec. 2: ``phi(x) = Sigma^-1/2 (R(x) - R_0)``; they then discard the first d components, those of
    largest variance, so a k-anchor T-emb of d-dim features ends with (k - 1) d dimensions).

    J&Z learn ``R_0`` and ``Sigma`` on *embedded local descriptors* (before aggregation); ``fit`` accepts
    whatever (M, D) vectors it is given, so it can equally be fitted on aggregated image vectors. With
    ``drop=0, whiten=False`` it is the plain PCA rotation ("rotation normalisation", RN) applied to
    aggregated vectors before the power-law (J&Z Sec. 4; Hoang et al. 2017). Drop ``d(d+1)/2`` for F-FAemb
    by the same reasoning (an assumption). Eigenvalues below ``eps * max`` are floored there before
    inversion; ``out_dim`` keeps only that many components after the dropped ones.
    """

    _ARRAYS = ("mean", "projection")
    _SETTINGS = ("drop", "whiten", "out_dim")

    def __init__(self, drop: int = 0, whiten: bool = True, out_dim: int | None = None, eps: float = 1e-6):
        if drop < 0:
            raise ValueError(f"drop must be >= 0, got {drop}")
        self.drop, self.whiten = int(drop), bool(whiten)
        self.out_dim = None if out_dim is None else int(out_dim)
        self.eps = float(eps)
        self.mean = self.projection = None

    def fit(self, E) -> "TembPostprocess":
        e = _as_2d(E, "vectors").astype(np.float64)
        dim = e.shape[1]
        if self.drop >= dim:
            raise ValueError(f"cannot drop {self.drop} of {dim} components")
        self.mean = e.mean(0)
        cov = np.cov(e - self.mean, rowvar=False, bias=True).reshape(dim, dim)
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1]
        vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
        stop = dim if self.out_dim is None else min(dim, self.drop + self.out_dim)
        keep = slice(self.drop, stop)
        proj = vecs[:, keep]
        if self.whiten:
            floor = self.eps * max(float(vals[0]), 1e-300)
            proj = proj / np.sqrt(np.maximum(vals[keep], floor))
        self.projection = proj.astype(np.float32)  # (D, D')
        self.mean = self.mean.astype(np.float32)
        return self

    @property
    def output_dim(self) -> int:
        self._check_fitted()
        return int(self.projection.shape[1])

    def transform(self, E):
        """(M, D) or (D,) -> centred, projected (and whitened) (M, D') / (D',); torch in, torch out."""
        self._check_fitted()
        is_torch = hasattr(E, "detach")
        e = E.detach().cpu().numpy() if is_torch else np.asarray(E)
        one = e.ndim == 1
        e = _as_2d(e[None] if one else e, "vectors", dim=self.projection.shape[0]).astype(np.float32)
        y = (e - self.mean) @ self.projection
        y = y[0] if one else y
        if is_torch:
            import torch

            return torch.from_numpy(np.ascontiguousarray(y))
        return y

    def _validate(self) -> None:
        if self.projection.ndim != 2 or self.mean.shape != (self.projection.shape[0],):
            raise ValueError("mean / projection shapes disagree")
