"""PCA-whitening of global / regional descriptors.

Jégou & Chum 2012 ("Negative evidences and co-occurrences in image retrieval", ECCV, Sec. 3): centre
the training vectors with their mean ``mu``, eigen-decompose the covariance ``Sigma = V diag(lambda) V^T``
and project with ``P = diag(lambda^-1/2) V^T``, optionally keeping only the top ``dim`` eigenvectors
(joint dimensionality reduction). Whitening gives every kept direction unit variance, which
down-weights co-occurring (correlated) components; its weakness is the amplification of directions with
tiny, badly-estimated eigenvalues when training vectors are few. Two optional regularisers address it:

* ``shrinkage``: covariance shrinkage towards ``m I`` (``m`` the mean eigenvalue),
  ``Sigma_s = (1 - s) Sigma + s m I``; ``'auto'`` picks ``s`` with the Ledoit & Wolf (2004) estimate;
* ``reg``: add ``reg * m`` to every kept eigenvalue before the inverse square root;
* ``power``: partial whitening ``diag(lambda^-power)`` (``power = 0.5`` is full whitening,
  ``power = 0`` is plain PCA rotation).

The model is used by R-MAC / MAC / GeM / SPoC pipelines (whitening of L2-normalised vectors, Tolias et
al. 2016; Radenović et al. 2018) and is stored as an ``.npz`` file without pickled objects.
"""
from __future__ import annotations

import datetime as _dt
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, NotFittedError
from ..io import atomic_save_npz, load_npz
from ..ops.normalize import l2n

__all__ = ["PCAWhitening", "NotFittedError", "WhiteningFileError", "eigh_desc", "pca_basis"]

_FORMAT = "instance_search.PCAWhitening"
_FORMAT_VERSION = 1
_RANK_TOL = 1e-10  # eigenvalues below this fraction of the largest are treated as zero


class WhiteningFileError(FileFormatError):
    """A saved whitening file is unreadable, damaged, or not a PCAWhitening file."""


def eigh_desc(sym) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix (D, D): eigenvalues (D,) decreasing, clipped at 0, and the
    eigenvectors as COLUMNS (D, D), each signed so that its largest-magnitude coefficient is positive
    (reproducible signs). The one eigen-solver of every PCA in the package (whitening, local PCA-whitening of
    embeddings, rotation normalisation)."""
    a = np.asarray(sym, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square symmetric matrix, got shape {a.shape}")
    lam, V = np.linalg.eigh(a)  # ascending
    order = np.argsort(lam)[::-1]
    lam, V = np.clip(lam[order], 0.0, None), V[:, order]
    return lam, _fix_signs(V)


def _fix_signs(V: np.ndarray) -> np.ndarray:
    """Columns of V signed so that each one's largest-magnitude coefficient is positive."""
    if V.shape[1] == 0:
        return V
    signs = np.sign(V[np.argmax(np.abs(V), axis=0), np.arange(V.shape[1])])
    return V * np.where(signs == 0, 1.0, signs)


def pca_basis(X, dim: int | None = None, rel_tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the rows of ``X`` (M, D) without whitening: ``(mean (D,), components (r, D) orthonormal rows,
    eigenvalues (r,))`` of the maximum-likelihood covariance ``Xc^T Xc / M``, eigenvalues decreasing,
    ``r = min(dim, numerical rank)`` (directions below ``rel_tol`` of the largest eigenvalue are dropped).

    Uses the (M, M) Gram matrix when ``M <= D`` (e.g. VLADs or aggregated embeddings of 4-50k dimensions
    from a few hundred images), so no (D, D) covariance is formed: with ``G = Xc Xc^T = U diag(w) U^T`` the
    components are ``U^T Xc / sqrt(w)`` and the eigenvalues ``w / M``. Float64, except for matrices of more
    than 2e7 entries (float32, and ``rel_tol >= 1e-6``). Signs as :func:`eigh_desc`. Used by
    :class:`PCAWhitening`'s callers that need only the basis (Ng et al.'s VLAD PCA-whitening, the rotation
    normalisation of :mod:`instance_search.fitted.rotation`).
    """
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    x = np.asarray(X)
    dt = np.float64 if x.size <= 2e7 else np.float32
    x = np.asarray(x, dtype=dt)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs an (M >= 2, D) matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("PCA: the vectors contain NaN or infinite values")
    if dt == np.float32:
        rel_tol = max(rel_tol, 1e-6)
    m, d = x.shape
    mean = x.mean(0, dtype=np.float64)
    xc = (x - mean.astype(dt)).astype(dt, copy=False)
    if m <= d:
        w, u = eigh_desc((xc @ xc.T).astype(np.float64))
        keep = w > rel_tol * max(w[0], 1e-300)
        w, u = w[keep], u[:, keep]
        if dim is not None:
            w, u = w[:dim], u[:, :dim]
        comps = _fix_signs(((u.T.astype(dt) @ xc).astype(np.float64) / np.sqrt(w)[:, None]).T).T
        lam = w / m
    else:
        w, v = eigh_desc((xc.T @ xc).astype(np.float64) / m)
        keep = w > rel_tol * max(w[0], 1e-300)
        w, v = w[keep], v[:, keep]
        if dim is not None:
            w, v = w[:dim], v[:, :dim]
        comps, lam = v.T, w
    if comps.shape[0] == 0:
        raise ValueError("PCA: the training vectors are all identical")
    return mean, np.ascontiguousarray(comps), lam


def _ledoit_wolf(Xc: np.ndarray, cov: np.ndarray) -> float:
    """Ledoit & Wolf (2004, "A well-conditioned estimator for large-dimensional covariance matrices",
    Sec. 3) shrinkage intensity towards ``m I`` for centred data ``Xc`` (N, D) with ``cov = Xc^T Xc / N``."""
    n, d = Xc.shape
    m = np.trace(cov) / d
    d2 = (np.sum(cov * cov) - 2 * m * np.trace(cov) + m * m * d) / d  # ||S - mI||_F^2 / d
    if d2 <= 0:
        return 0.0
    sq = np.einsum("ij,ij->i", Xc, Xc)  # ||x_k||^2
    xsx = np.einsum("ij,ij->i", Xc @ cov, Xc)  # x_k^T S x_k
    b2bar = np.sum(sq * sq - 2 * xsx + np.sum(cov * cov)) / (n * n * d)  # mean ||x x^T - S||^2 / n
    return float(min(max(b2bar, 0.0), d2) / d2)


class PCAWhitening:
    """Learned PCA-whitening ``y = L2( diag((lambda + r)^-power) V_dim^T (x - mu) )``.

    Usage::

        w = PCAWhitening().fit(X_train, dim=256, trained_on="rparis250 R-MAC regions")
        Y = w.transform(X)            # (N, D) numpy or torch → (N, 256), rows L2-normalised
        w.save("whiten.npz"); w2 = PCAWhitening.load("whiten.npz")

    The instance is also callable (``w(X) == w.transform(X)``), so it can be passed as the
    ``whitening`` argument of :func:`instance_search.ops.pooling.rmac`.
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None  # (D,)
        self.components: np.ndarray | None = None  # (dim, D), rows = eigenvectors, decreasing eigenvalue
        self.eigenvalues: np.ndarray | None = None  # (dim,), of the (possibly shrunk) covariance
        self.scale: np.ndarray | None = None  # (dim,), (eigenvalue + reg * mean_eig) ** -power
        self.n_samples: int = 0
        self.trained_on: str = ""
        self.created: str = ""
        self.shrinkage: float = 0.0
        self.reg: float = 0.0
        self.power: float = 0.5

    # ------------------------------------------------------------------ properties
    @property
    def is_fitted(self) -> bool:
        return self.components is not None

    @property
    def in_dim(self) -> int:
        """Input dimensionality D (0 when unfitted)."""
        return 0 if self.mean is None else int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        """Output dimensionality (0 when unfitted)."""
        return 0 if self.components is None else int(self.components.shape[0])

    @property
    def projection(self) -> np.ndarray:
        """The (dim, D) float64 matrix ``P = diag(scale) V^T``."""
        self._require_fitted("projection")
        return self.scale[:, None] * self.components

    def __repr__(self) -> str:
        if not self.is_fitted:
            return "PCAWhitening(unfitted)"
        return (f"PCAWhitening({self.in_dim}->{self.dim}, n_samples={self.n_samples}, "
                f"trained_on={self.trained_on!r})")

    def _require_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"PCAWhitening.{what}: the whitening is not fitted; call fit() or "
                                 f"PCAWhitening.load() first")

    # ------------------------------------------------------------------ learning
    def fit(self, X, dim: int | None = None, shrinkage: float | str = 0.0, trained_on: str = "", *,
            reg: float = 0.0, power: float = 0.5) -> "PCAWhitening":
        """Learn the whitening from training vectors ``X`` (N, D) (numpy or torch), in float64.

        ``dim``: number of kept components (top eigenvalues); ``None`` keeps all directions with
        non-zero variance, i.e. ``min(D, numerical rank)`` — with N ≤ D vectors that is at most N-1.
        Asking for more components than the rank raises ``ValueError`` unless ``shrinkage`` or
        ``reg`` is set (those directions would otherwise be multiplied by ~1/sqrt(0)).
        ``shrinkage``: 0 (none), a float in [0, 1], or ``'auto'`` (Ledoit–Wolf). ``reg``: fraction of
        the mean eigenvalue added to each eigenvalue. ``power``: eigenvalue exponent (0.5 = whitening).
        ``trained_on``: free text naming the collection the whitening was learned on (kept in the
        file, so that results can say whether the whitening saw the test collection).
        The covariance is the maximum-likelihood one, ``Xc^T Xc / N``. Returns ``self``.
        """
        X = _to_numpy_2d(X, "training vectors").astype(np.float64)
        n, d = X.shape
        if n < 2:
            raise ValueError(f"need at least 2 training vectors to learn a whitening, got {n}")
        if not np.all(np.isfinite(X)):
            raise ValueError("training vectors contain NaN or infinite values")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        if not 0.0 <= power <= 0.5 + 1e-12:
            raise ValueError(f"power must be in [0, 0.5], got {power}")

        mean = X.mean(axis=0)
        Xc = X - mean
        cov = Xc.T @ Xc / n
        if isinstance(shrinkage, str):
            if shrinkage != "auto":
                raise ValueError(f"shrinkage must be a number in [0, 1] or 'auto', got {shrinkage!r}")
            s = _ledoit_wolf(Xc, cov)
        else:
            s = float(shrinkage)
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        del Xc
        m = float(np.trace(cov)) / d
        if s > 0:
            cov = (1.0 - s) * cov
            cov[np.diag_indices(d)] += s * m

        lam, V = eigh_desc(cov)
        if lam[0] <= 0:
            raise ValueError("training vectors are all identical: their covariance is zero")
        rank = int(np.sum(lam > _RANK_TOL * lam[0]))
        regularised = s > 0 or reg > 0
        if dim is None:
            dim = d if regularised else rank
        dim = int(dim)
        if not 1 <= dim <= d:
            raise ValueError(f"dim must be in [1, {d}], got {dim}")
        if dim > rank and not regularised:
            raise ValueError(f"cannot whiten to {dim} dimensions: {n} training vectors of dimension {d} "
                             f"span only {rank} directions; lower dim, or pass shrinkage='auto' or reg>0")
        if not regularised and n < 2 * d:
            warnings.warn(f"PCA-whitening learned from only {n} vectors of dimension {d}; small eigenvalues "
                          f"are poorly estimated (consider shrinkage='auto' or reg>0)", RuntimeWarning,
                          stacklevel=2)

        lam, V = lam[:dim], V[:, :dim]
        self.mean = mean
        self.components = np.ascontiguousarray(V.T)
        self.eigenvalues = lam
        self.scale = (lam + reg * m) ** (-power) if power > 0 else np.ones(dim)
        self.n_samples = n
        self.trained_on = str(trained_on)
        self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.shrinkage, self.reg, self.power = s, float(reg), float(power)
        return self

    # ------------------------------------------------------------------ applying
    def transform(self, X, normalize: bool = True):
        """Whiten ``X``: (N, D) or (D,) numpy array or torch tensor → (N, dim) or (dim,), same type
        (and device, for torch). Floating inputs keep their dtype (the arithmetic is float64);
        integer inputs give float32. Rows are L2-normalised when ``normalize`` (default), as in
        R-MAC. Torch inputs stay differentiable."""
        self._require_fitted("transform")
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a hard dependency of the package
            torch = None
        if torch is not None and isinstance(X, torch.Tensor):
            return self._transform_torch(X, normalize, torch)
        A = np.asarray(X)
        single = A.ndim == 1
        A2 = _to_numpy_2d(A[None] if single else A, "vectors")
        self._check_dim(A2.shape[1])
        out_dtype = A2.dtype if np.issubdtype(A2.dtype, np.floating) else np.float32
        Y = (A2.astype(np.float64) - self.mean) @ self.projection.T
        if normalize:
            Y = l2n(Y)
        Y = Y.astype(out_dtype, copy=False)
        return Y[0] if single else Y

    __call__ = transform

    def _transform_torch(self, X, normalize: bool, torch):
        single = X.ndim == 1
        T = X[None] if single else X
        if T.ndim != 2:
            raise ValueError(f"vectors must be (N, D) or (D,), got shape {tuple(X.shape)}")
        self._check_dim(T.shape[1])
        out_dtype = T.dtype if torch.is_floating_point(T) else torch.float32
        mu = torch.as_tensor(self.mean, dtype=torch.float64, device=T.device)
        P = torch.as_tensor(self.projection, dtype=torch.float64, device=T.device)
        Y = (T.to(torch.float64) - mu) @ P.T
        if normalize:
            Y = l2n(Y)
        Y = Y.to(out_dtype)
        return Y[0] if single else Y

    def _check_dim(self, d: int) -> None:
        if d != self.in_dim:
            raise ValueError(f"this whitening expects {self.in_dim}-dimensional vectors, got {d} "
                             f"(trained on {self.trained_on or 'an unnamed collection'})")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` (an ``.npz`` archive, no pickles), atomically: a temporary file
        in the same folder is written, flushed to disk and renamed over ``path``. Returns the path."""
        self._require_fitted("save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.array(_FORMAT), "format_version": np.array(_FORMAT_VERSION, np.int64),
            "mean": self.mean, "components": self.components, "eigenvalues": self.eigenvalues,
            "scale": self.scale, "n_samples": np.array(self.n_samples, np.int64),
            "trained_on": np.array(self.trained_on), "created": np.array(self.created),
            "shrinkage": np.array(self.shrinkage), "reg": np.array(self.reg), "power": np.array(self.power),
        }
        return atomic_save_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCAWhitening":
        """Read a model written by :meth:`save`. Raises ``FileNotFoundError`` for a missing file and
        :class:`WhiteningFileError` (a ``ValueError``) for a damaged or foreign one; both name ``path``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: whitening file not found")
        data = load_npz(path, WhiteningFileError, "whitening file")

        def need(key: str) -> np.ndarray:
            if key not in data:
                raise WhiteningFileError(f"{path}: whitening file lacks {key!r} (damaged or not a whitening)")
            return data[key]

        if str(need("format")) != _FORMAT:
            raise WhiteningFileError(f"{path}: not a PCAWhitening file (format {str(data['format'])!r})")
        version = int(need("format_version"))
        if version > _FORMAT_VERSION:
            raise WhiteningFileError(f"{path}: whitening file format {version} is newer than supported "
                                     f"({_FORMAT_VERSION})")
        try:
            mean = need("mean").astype(np.float64)
            comps = need("components").astype(np.float64)
            eig = need("eigenvalues").astype(np.float64)
            scale = need("scale").astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise WhiteningFileError(f"{path}: whitening arrays are not numeric ({exc})") from exc
        if (mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != mean.shape[0] or comps.shape[0] == 0
                or eig.shape != (comps.shape[0],) or scale.shape != (comps.shape[0],)):
            raise WhiteningFileError(
                f"{path}: inconsistent whitening shapes: mean {mean.shape}, components {comps.shape}, "
                f"eigenvalues {eig.shape}, scale {scale.shape}")
        if not all(np.all(np.isfinite(a)) for a in (mean, comps, eig, scale)):
            raise WhiteningFileError(f"{path}: whitening arrays contain NaN or infinite values")
        w = cls()
        w.mean, w.components, w.eigenvalues, w.scale = mean, comps, eig, scale
        try:
            w.n_samples = int(need("n_samples"))
            w.trained_on = str(need("trained_on"))
            w.created = str(need("created"))
            w.shrinkage = float(need("shrinkage"))
            w.reg = float(need("reg"))
            w.power = float(need("power"))
        except (TypeError, ValueError) as exc:
            raise WhiteningFileError(f"{path}: bad whitening metadata ({exc})") from exc
        return w


def _to_numpy_2d(X, what: str) -> np.ndarray:
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # torch tensor
        X = X.detach().cpu().numpy()
    A = np.asarray(X)
    if A.ndim != 2:
        raise ValueError(f"{what} must be an (N, D) matrix, got shape {A.shape}")
    if A.shape[0] == 0 or A.shape[1] == 0:
        raise ValueError(f"{what} are empty: shape {A.shape}")
    if not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.integer)):
        raise ValueError(f"{what} must be numeric, got dtype {A.dtype}")
    return A
