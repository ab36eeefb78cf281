"""Query expansion and database-side augmentation on L2-normalised global vectors (pure numpy).

* average QE (Chum et al. 2007, "Total recall", Sec. 3; used by Tolias et al. 2016, Sec. 6):
  ``q' = L2(q + Σ_{j≤M} x_j)`` over the top ``M`` results;
* α-QE (Radenović, Tolias & Chum 2018, "Fine-tuning CNN image retrieval with no human annotation", Sec. 5.1):
  ``q' = L2(q + Σ_{j≤M} max(qᵀx_j, 0)^α x_j)`` (the query has weight ``1 = (qᵀq)^α``);
* DBA (Arandjelović & Zisserman 2012, "Three things everyone should know", Sec. 4; α-weighted as in
  Radenović et al. 2018): every database vector is replaced by ``L2(Σ_{j∈kNN(x)} max(xᵀx_j, 0)^α x_j)`` over
  its ``k`` nearest neighbours, itself included (``alpha = 0``: plain average);
* QE after spatial re-ranking as Salvador et al. average (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, "Faster
  R-CNN features for instance search", Sec. 4.3; their ``rerank.py``, stage ``rerank2nd``): the *raw* (unnormalised,
  unwhitened) region vectors of the query box and of the boxes of the top ``M`` re-ranked images are averaged,
  ``q' = (q + Σ_{j≤M} f_j) / (M + 1)`` (:func:`region_mean_qe`); the re-ranker scores ``q'`` as any raw region
  vector, ``L2(W(L2 q'))`` (``W`` only for sum pooling), against the short list's regions again.

Vectors are rows; queries may be one ``(D,)`` vector or a batch ``(Q, D)``. The weights always use the cosine
``qᵀx_j`` of the (assumed L2-normalised) vectors, whatever the ranking came from.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..ops.normalize import l2n

__all__ = ["average_qe", "alpha_qe", "dba", "region_mean_qe"]


def _f(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _top(q: np.ndarray, db: np.ndarray, ranks, top: int) -> np.ndarray:
    """(Q, M) indices of the top results: from ``ranks`` (int, best first), ``scores`` (float, (Q, N)) or the
    inner products ``q @ db.T`` when ``None``."""
    nq, n = q.shape[0], db.shape[0]
    m = min(int(top), n)
    if ranks is None:
        ranks = q @ db.T
    r = np.asarray(ranks)
    if r.ndim == 1:
        r = r[None]
    if r.shape[0] != nq:
        raise ValueError(f"ranks/scores have {r.shape[0]} rows for {nq} queries")
    if np.issubdtype(r.dtype, np.integer):
        idx = r[:, :m]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError("ranks hold indices outside the database")
        return idx
    if r.shape[1] != n:
        raise ValueError(f"scores have {r.shape[1]} columns for a database of {n}")
    if m == 0:
        return np.zeros((nq, 0), dtype=np.int64)
    part = np.argpartition(-r, m - 1, axis=1)[:, :m]
    sub = np.take_along_axis(r, part, 1)
    return np.take_along_axis(part, np.argsort(-sub, axis=1, kind="stable"), 1)


def _expand(q, db, ranks, top: int, alpha: float | None) -> np.ndarray:
    q, db = _f(q), _f(db)
    single = q.ndim == 1
    q2 = q[None] if single else q
    idx = _top(q2, db, ranks, top)  # (Q, M)
    nb = db[idx]  # (Q, M, D)
    if alpha is None:
        w = np.ones(idx.shape, dtype=q2.dtype)
    else:
        w = np.maximum(np.einsum("qd,qmd->qm", q2, nb), 0) ** alpha
    out = l2n(q2 + np.einsum("qm,qmd->qd", w, nb)).astype(q2.dtype, copy=False)
    return out[0] if single else out


def average_qe(q, db, ranks=None, top: int = 5) -> np.ndarray:
    """Average query expansion (Chum et al. 2007): ``L2(q + Σ_{j≤top} x_j)``; re-query with the result.

    ``q``: (D,) or (Q, D); ``db``: (N, D); ``ranks``: int indices best first ((K,) or (Q, K)), or float scores
    ((N,) or (Q, N)), or ``None`` to rank by ``q @ db.T``. Returns the expanded query, shaped like ``q``.
    """
    return _expand(q, db, ranks, top, None)


def alpha_qe(q, db, ranks=None, top: int = 5, alpha: float = 3.0) -> np.ndarray:
    """α-QE (Radenović et al. 2018): ``L2(q + Σ_{j≤top} max(qᵀx_j, 0)^α x_j)``; arguments as
    :func:`average_qe`."""
    return _expand(q, db, ranks, top, float(alpha))


def dba(db, k: int = 10, alpha: float = 3.0, neighbours=None, chunk: int = 256) -> np.ndarray:
    """Database-side augmentation: ``x ← L2(Σ_{j∈kNN(x)} max(xᵀx_j, 0)^α x_j)``, ``kNN`` including ``x``
    itself (Arandjelović & Zisserman 2012; α-weighting of Radenović et al. 2018; ``alpha=0``: plain mean).

    ``db``: (N, D) L2-normalised rows. ``neighbours``: optional (N, K>=k) int indices, best first (e.g. from a
    FAISS search); by default exact k-NN by inner product, computed ``chunk`` rows at a time (``O(N²D)``).
    The item itself is always used with weight 1, and the other ``k-1`` best neighbours fill the rest.
    """
    db = _f(db)
    n = db.shape[0]
    k = max(1, min(int(k), n))
    out = np.empty_like(db)
    for i in range(0, n, chunk):
        rows = np.arange(i, min(i + chunk, n))
        if neighbours is None:
            sims = db[rows] @ db.T
            sims[np.arange(rows.size), rows] = np.inf  # force self into the k-NN
            idx = _top(db[rows], db, sims, k)
        else:
            nb = np.asarray(neighbours)[rows]
            others = nb != rows[:, None]
            if (others.sum(1) < k - 1).any():
                raise ValueError(f"every neighbours row needs at least {k - 1} items other than itself")
            first = np.argsort(~others, axis=1, kind="stable")[:, : k - 1]  # others, in their order
            idx = np.concatenate([rows[:, None], np.take_along_axis(nb, first, 1)], 1)
        vecs = db[idx]  # (B, k, D)
        w = np.maximum(np.einsum("bd,bkd->bk", db[rows], vecs), 0) ** alpha
        w[idx == rows[:, None]] = 1.0
        out[rows] = l2n(np.einsum("bk,bkd->bd", w, vecs))
    return out


def region_mean_qe(query_vec, box_vectors) -> np.ndarray:
    """The expanded query of QE after spatial re-ranking as Salvador et al. 2016 average (Sec. 4.3; ``rerank.py``,
    stage ``rerank2nd``): the mean of the *raw* query box vector ``query_vec`` (C,) and the raw vectors
    ``box_vectors`` (M, C) of the boxes of the top-M re-ranked images (re-cropped from their maps:
    :func:`~instance_search.rerank.ca_sr.crop_vectors`), ``(q + Σ_j f_j) / (M + 1)``. Raw, (C,) float64: the caller
    normalises it as it normalises any region vector (``L2``, then for sum pooling the PCA-whitening and ``L2``,
    :func:`~instance_search.rerank.aml.region_vectors`). ``M = 0`` returns the query itself. (Unlike
    :func:`average_qe`, which sums unit vectors: the raw vectors' norms weight the mean, as in the authors' code.)"""
    q = np.asarray(query_vec, dtype=np.float64).reshape(-1)
    F = np.asarray(box_vectors, dtype=np.float64)
    if F.size == 0:
        return q.copy()
    if F.ndim != 2 or F.shape[1] != q.shape[0]:
        raise InputError(f"box_vectors must be (M, {q.shape[0]}) like the query vector, got shape {F.shape}")
    return (q + F.sum(axis=0)) / (len(F) + 1)
