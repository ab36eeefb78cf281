"""Rotation normalisation (RN) of aggregated image vectors (Jégou & Zisserman 2014, "Triangulation embedding and
democratic aggregation for image search", Sec. 4; Hoang, Do, Le Tan & Cheung 2017, Sec. 3.2).

RN learns, on the aggregated vectors of a held-out collection, their mean and principal axes, and maps a vector
``x`` to ``P^T (x - mean)`` with ``P`` orthonormal: a pure rotation (eigenvalues unused, nothing whitened), after
which the first ``drop`` coordinates -- those of largest variance -- are removed and the power-law applied by the
caller. As in the authors' ``learn_rn.m``, only the leading ``components`` axes ``V`` (D, r) are learned (1024
there) and ``P = qr([V, I_{D, D-r}])``: the complement is the Gram-Schmidt orthogonalisation of the first
``m = D - r`` standard axes against ``V``. Its coordinates are computed without forming ``P``:
``A = (I - V V^T) E_m`` has ``A^T A = I - V_m V_m^T = R^T R`` (Cholesky, ``V_m`` the first m rows of V), so the
complement coordinates of x are ``R^-T (x_{1..m} - V_m V^T x)`` (up to the signs of QR's columns, which the
power law, an odd function, does not mind; when that Cholesky is singular the D x D QR itself is used). Only
``mean`` and ``V`` are stored; ``R`` is recomputed (O(m^3), once per object). The PCA is :func:`instance_search.fitted.whitening.pca_basis` (the package's one PCA).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import NotFittedError
from .whitening import pca_basis

__all__ = ["RotationNormalisation"]


class RotationNormalisation:
    """``transform(x) = (P^T (x - mean))[drop:]``, ``P = [V, complement]`` (see the module doc).

    ``RotationNormalisation(drop=0, components=1024).fit(R)`` with R (M, D) training vectors: ``V`` holds the
    ``r = min(components, rank)`` leading principal axes. ``drop`` must not exceed ``r``.
    ``state_dict()`` / ``load_state_dict(arrays)`` round-trip the fitted state as plain arrays.
    """

    def __init__(self, drop: int = 0, components: int = 1024):
        if drop < 0 or components < 1:
            raise ValueError(f"need drop >= 0 and components >= 1, got drop={drop}, components={components}")
        self.drop, self.components = int(drop), int(components)
        self.mean: np.ndarray | None = None  # (D,)
        self.basis: np.ndarray | None = None  # (D, r)
        self._chol = None  # how the complement is computed (see _complement; computed when first needed)

    def __repr__(self) -> str:
        where = f"{self.in_dim}->{self.out_dim}" if self.fitted else "unfitted"
        return f"RotationNormalisation(drop={self.drop}, components={self.components}, {where})"

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
        x = np.asarray(R.detach().cpu().numpy() if hasattr(R, "detach") else R, np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"rotation normalisation needs (M >= 2, D) training vectors, got shape {x.shape}")
        mean, comps, _ = pca_basis(x, min(self.components, x.shape[1]))
        r = comps.shape[0]
        if self.drop > r:
            raise ValueError(f"cannot drop {self.drop} components: the {x.shape[0]} training vectors span only {r}")
        self.mean = mean.astype(np.float32)
        self.basis = np.ascontiguousarray(comps.T, dtype=np.float32)
        self._chol = None
        return self

    def _complement(self):
        """How to compute the complement's coordinates: ``("chol", R)`` with R the Cholesky factor of
        ``I - V_m V_m^T``, or -- when that matrix is (numerically) singular, i.e. some of the first standard axes
        lie in the learned span -- ``("qr", reflectors, tau)``: LAPACK's Householder QR of ``[V, I_{D, D-r}]``,
        the authors' ``qr`` itself (the same basis up to column signs; O(D^3), so only when needed).
        None when the learned axes span the whole space."""
        d, r = self.basis.shape
        if r == d:
            return None
        if self._chol is None:
            from scipy.linalg import cholesky, qr

            v = self.basis.astype(np.float64)
            try:
                chol = cholesky(np.eye(d - r) - v[: d - r] @ v[: d - r].T, lower=False)
                ok = np.abs(np.diag(chol)).min() > 0.05  # else round-off of the float32 basis is amplified
            except np.linalg.LinAlgError:
                ok = False
            if ok:
                self._chol = ("chol", chol)
            else:
                (hh, tau), _ = qr(np.hstack([v, np.eye(d, d - r)]), mode="raw")
                self._chol = ("qr", np.asfortranarray(hh), tau)
        return self._chol

    def transform(self, R) -> np.ndarray:
        """(M, D) -> (M, D - drop) float32; (D,) -> (D - drop,)."""
        if not self.fitted:
            raise NotFittedError("RotationNormalisation is not fitted; call fit() or load_state_dict() first")
        x = np.asarray(R.detach().cpu().numpy() if hasattr(R, "detach") else R, np.float32)
        one = x.ndim == 1
        x = x[None] if one else x
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"vectors must have {self.in_dim} dimensions, got shape {x.shape}")
        xc = (x - self.mean).astype(np.float64)
        v = self.basis.astype(np.float64)
        lead = xc @ v
        parts = [lead]
        comp = self._complement()
        if comp is not None and comp[0] == "chol":
            from scipy.linalg import solve_triangular

            m = comp[1].shape[0]
            rhs = xc[:, :m] - lead @ v[:m].T  # x_{1..m} - V_m V^T x
            parts.append(solve_triangular(comp[1], rhs.T, trans="T", lower=False).T)
        elif comp is not None:
            from scipy.linalg.lapack import dormqr

            c = np.asfortranarray(xc.T)
            qtc, _, info = dormqr("L", "T", comp[1], comp[2], c, max(1, c.shape[1] * 64))
            if info != 0:  # pragma: no cover - LAPACK argument error
                raise RuntimeError(f"dormqr failed (info={info})")
            parts.append(qtc[v.shape[1]:].T)
        y = np.concatenate(parts, axis=1)[:, self.drop:].astype(np.float32)
        return y[0] if one else y

    # ---------------------------------------------------------------- state
    def state_dict(self, prefix: str = "rn_") -> dict[str, np.ndarray]:
        if not self.fitted:
            raise NotFittedError("RotationNormalisation is not fitted: nothing to save")
        return {f"{prefix}mean": self.mean, f"{prefix}basis": self.basis}

    def load_state_dict(self, data: Mapping[str, np.ndarray], prefix: str = "rn_") -> "RotationNormalisation":
        """Restore from :meth:`state_dict` arrays; ``ValueError`` naming the array that is missing or wrong."""
        for key in (f"{prefix}mean", f"{prefix}basis"):
            if key not in data:
                raise ValueError(f"rotation normalisation: missing array {key!r}")
        mean = np.asarray(data[f"{prefix}mean"], np.float32)
        basis = np.ascontiguousarray(data[f"{prefix}basis"], dtype=np.float32)
        if mean.ndim != 1 or basis.ndim != 2 or basis.shape[0] != mean.shape[0] or not (
                self.drop <= basis.shape[1] <= basis.shape[0]):
            raise ValueError(f"rotation normalisation: {prefix}mean {mean.shape} and {prefix}basis {basis.shape} "
                             f"disagree (drop={self.drop})")
        for name, a in (("mean", mean), ("basis", basis)):
            if not np.all(np.isfinite(a)):
                raise ValueError(f"rotation normalisation: {prefix}{name} holds NaN or infinite values")
        if not np.allclose(basis.T.astype(np.float64) @ basis, np.eye(basis.shape[1]), atol=1e-3):
            raise ValueError(f"rotation normalisation: {prefix}basis is not orthonormal")
        self.mean, self.basis, self._chol = mean, basis, None
        return self
