"""Models learned from descriptors: PCA-whitening (this package's ``pca_whitening``) and the codebooks
of ``instance_search.learn.codebook`` (imported directly by their users)."""
from __future__ import annotations

from .pca_whitening import NotFittedError, PCAWhitening, WhiteningFileError

__all__ = ["PCAWhitening", "NotFittedError", "WhiteningFileError"]
