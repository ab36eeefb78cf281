"""Re-ranking of a short list: AML spatial verification (Tolias et al. 2016, Sec. 6), CA-SR (Salvador et al.
2016, Sec. 3.3), query expansion (average QE, α-QE) and database-side augmentation (DBA); the re-rankers and
expansions by name behind one interface in :mod:`.base` (``make_reranker``, ``make_expansion``)."""
from __future__ import annotations

from .aml import RerankResult, cells_to_pixels, cosine_scores, pixels_to_cells, region_vectors, rerank_aml
from .expansion import alpha_qe, average_qe, dba
from .ca_sr import ca_sr, region_mac, rmac_boxes, sliding_windows
from .base import EXPANSIONS, RERANKERS, Expansion, RerankContext, Reranker, make_expansion, make_reranker

__all__ = [
    "RerankResult",
    "rerank_aml",
    "region_vectors",
    "cells_to_pixels",
    "pixels_to_cells",
    "cosine_scores",
    "ca_sr",
    "region_mac",
    "rmac_boxes",
    "sliding_windows",
    "average_qe",
    "alpha_qe",
    "dba",
    "Reranker",
    "Expansion",
    "RerankContext",
    "RERANKERS",
    "EXPANSIONS",
    "make_reranker",
    "make_expansion",
]
