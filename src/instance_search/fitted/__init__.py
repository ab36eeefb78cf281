"""Models learned from descriptors: PCA-whitening (this package's ``pca_whitening``) and the codebooks
of ``instance_search.fitted.codebook`` (imported directly by their users)."""
from __future__ import annotations

from .whitening import NotFittedError, PCAWhitening, WhiteningFileError

__all__ = ["PCAWhitening", "NotFittedError", "WhiteningFileError"]
