"""Nearest-neighbour search over global vectors with FAISS (inner product = cosine on L2-normalised vectors).

``flat`` is exact and the default; ``hnsw`` and ``ivfpq`` are approximate options for large collections.
"""
from __future__ import annotations

import numpy as np

KINDS = ("flat", "hnsw", "ivfpq")


def build_faiss(vectors: np.ndarray, kind: str = "flat", *, hnsw_m: int = 32, nlist: int | None = None,
                pq_m: int | None = None, seed: int = 0):
    """Build a FAISS inner-product index over ``vectors`` (N, D) float32."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (N, D), got shape {vectors.shape}")
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    elif kind == "ivfpq":
        nlist = nlist or max(1, min(4096, int(4 * np.sqrt(max(n, 1)))))
        pq_m = pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0)
        if n < 39 * nlist:
            raise ValueError(f"ivfpq needs at least {39 * nlist} vectors to train {nlist} lists; have {n} (use flat)")
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        ivf.train(vectors)
        ivf.nprobe = min(nlist, 32)
        index = faiss.IndexRefineFlat(ivf)  # re-score the approximate short list exactly
        index.k_factor = 4
    else:
        raise ValueError(f"unknown FAISS index kind {kind!r}; choose one of {KINDS}")
    if n:
        index.add(vectors)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, positions) for each query row; ``k`` is capped at the collection size."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if queries.shape[1] != index.d:
        raise ValueError(f"query dimension {queries.shape[1]} does not match the index ({index.d})")
    k = int(min(k, index.ntotal))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores, pos = index.search(queries, k)
    return scores, pos
