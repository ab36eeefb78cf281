"""Rotation normalisation (RN) of aggregated image vectors (Jégou & Zisserman 2014, "Triangulation embedding and
democratic aggregation for image search", Sec. 4; Hoang, Do, Le Tan & Cheung 2017, Sec. 3.2).

RN learns, on the aggregated vectors of a held-out collection, their mean and principal axes, and maps a vector
``x`` to ``P^T (x - mean)`` with ``P`` orthonormal: a pure rotation (eigenvalues unused, nothing whitened), after
which the first ``drop`` coordinates -- those of largest variance -- are removed and the power-law applied by the
caller. Like the authors' ``learn_rn.m``, only the leading ``components`` axes (1024 there) are learned; ``P`` is
completed by an orthonormal basis of their complement so that the output keeps ``D - drop`` dimensions. The
complement is stored compactly as the Householder reflectors of the learned basis (``D x r`` numbers, never a
``D x D`` matrix). The PCA is :func:`instance_search.fitted.whitening.pca_basis` (the package's one PCA).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import NotFittedError
from .whitening import pca_basis

__all__ = ["RotationNormalisation", "complement_coords", "householder"]


def householder(basis) -> tuple[np.ndarray, np.ndarray]:
    """Compact QR (reflectors (D, r), tau (r,)) of an orthonormal (D, r) basis; with them
    :func:`complement_coords` gives coordinates in an orthonormal basis of the basis' complement."""
    from scipy.linalg import qr

    (hh, tau), _ = qr(np.asarray(basis, np.float64), mode="raw")
    return np.asfortranarray(hh), tau


def complement_coords(hh: np.ndarray, tau: np.ndarray, X) -> np.ndarray:
    """Coordinates (M, D - r) of the rows of X (M, D) in the orthogonal complement of the Householder basis
    ``(hh, tau)`` of :func:`householder` (rows ``r:`` of ``Q^T x``)."""
    from scipy.linalg.lapack import dormqr

    c = np.asfortranarray(np.asarray(X, np.float64).T)
    if c.shape[1] == 0:
        return np.zeros((0, hh.shape[0] - hh.shape[1]), np.float32)
    qtc, _, info = dormqr("L", "T", hh, tau, c, max(1, c.shape[1] * 64))
    if info != 0:  # pragma: no cover - LAPACK argument error
        raise RuntimeError(f"dormqr failed (info={info})")
    return np.ascontiguousarray(qtc[hh.shape[1]:].T, dtype=np.float32)


class RotationNormalisation:
    """``transform(x) = (P^T (x - mean))[drop:]``, ``P = [V_r, complement]`` (see the module doc).

    ``RotationNormalisation(drop=0, components=1024).fit(R)`` with R (M, D) training vectors: ``V_r`` holds the
    ``r = min(components, rank)`` leading principal axes. ``drop`` must not exceed ``r``.
    ``state_dict()`` / ``load_state_dict(arrays)`` round-trip the fitted state as plain arrays.
    """

    def __init__(self, drop: int = 0, components: int = 1024):
        if drop < 0 or components < 1:
            raise ValueError(f"need drop >= 0 and components >= 1, got drop={drop}, components={components}")
        self.drop, self.components = int(drop), int(components)
        self.mean: np.ndarray | None = None  # (D,)
        self.basis: np.ndarray | None = None  # (D, r)
        self.hh: np.ndarray | None = None  # (D, r) Householder reflectors of the basis (None when r = D)
        self.tau: np.ndarray | None = None

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
        if r < x.shape[1]:
            self.hh, self.tau = householder(comps.T)
        else:
            self.hh = self.tau = None
        return self

    def transform(self, R) -> np.ndarray:
        """(M, D) -> (M, D - drop) float32; (D,) -> (D - drop,)."""
        if not self.fitted:
            raise NotFittedError("RotationNormalisation is not fitted; call fit() or load_state_dict() first")
        x = np.asarray(R.detach().cpu().numpy() if hasattr(R, "detach") else R, np.float32)
        one = x.ndim == 1
        x = x[None] if one else x
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"vectors must have {self.in_dim} dimensions, got shape {x.shape}")
        xc = x - self.mean
        parts = [xc @ self.basis]
        if self.hh is not None:
            parts.append(complement_coords(self.hh, self.tau, xc))
        y = np.concatenate(parts, axis=1)[:, self.drop:]
        return y[0] if one else y

    # ---------------------------------------------------------------- state
    def state_dict(self, prefix: str = "rn_") -> dict[str, np.ndarray]:
        if not self.fitted:
            raise NotFittedError("RotationNormalisation is not fitted: nothing to save")
        out = {f"{prefix}mean": self.mean, f"{prefix}basis": self.basis}
        if self.hh is not None:
            out[f"{prefix}hh"], out[f"{prefix}tau"] = np.ascontiguousarray(self.hh), self.tau
        return out

    def load_state_dict(self, data: Mapping[str, np.ndarray], prefix: str = "rn_") -> "RotationNormalisation":
        """Restore from :meth:`state_dict` arrays; ``ValueError`` naming the array that is missing or wrong."""
        for key in (f"{prefix}mean", f"{prefix}basis"):
            if key not in data:
                raise ValueError(f"rotation normalisation: missing array {key!r}")
        mean = np.asarray(data[f"{prefix}mean"], np.float32)
        basis = np.ascontiguousarray(data[f"{prefix}basis"], dtype=np.float32)
        if mean.ndim != 1 or basis.ndim != 2 or basis.shape[0] != mean.shape[0] or basis.shape[1] < self.drop:
            raise ValueError(f"rotation normalisation: {prefix}mean {mean.shape} and {prefix}basis {basis.shape} "
                             f"disagree (drop={self.drop})")
        partial = basis.shape[1] < basis.shape[0]
        if partial != (f"{prefix}hh" in data):
            raise ValueError(f"rotation normalisation: {prefix}hh is {'missing' if partial else 'unexpected'} "
                             f"for a {basis.shape} basis")
        hh = tau = None
        if partial:
            hh = np.asfortranarray(data[f"{prefix}hh"], dtype=np.float64)
            tau = np.asarray(data.get(f"{prefix}tau"), np.float64)
            if hh.shape != basis.shape or tau.shape != (basis.shape[1],):
                raise ValueError(f"rotation normalisation: {prefix}hh {hh.shape} / {prefix}tau {tau.shape} do not "
                                 f"match the basis {basis.shape}")
        for name, a in (("mean", mean), ("basis", basis)):
            if not np.all(np.isfinite(a)):
                raise ValueError(f"rotation normalisation: {prefix}{name} holds NaN or infinite values")
        self.mean, self.basis, self.hh, self.tau = mean, basis, hh, tau
        return self
