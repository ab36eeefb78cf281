"""Nearest-neighbour search over global vectors with FAISS (inner product = cosine on L2-normalised vectors).

``flat`` is exact and the default; ``hnsw`` (Malkov & Yashunin 2018) and ``ivfpq`` (Jégou, Douze & Schmid
2011, Sec. IV: inverted file + product quantisation, with the short list re-scored exactly) are approximate
options for large collections. Large indexes are trained on a sample (``train_sample``), saved once with
:func:`save_faiss` and opened memory-mapped with :func:`load_faiss`, so that opening costs no copy and
several processes share the pages.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


KINDS = ("flat", "hnsw", "ivfpq")


def as_matrix(vectors: np.ndarray, name: str = "vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (N, D) matrix (what FAISS takes); other shapes refused naming ``name``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {vectors.shape}")
    return vectors


def default_nlist(n: int) -> int:
    """Number of inverted lists for ``n`` vectors: about 4·sqrt(n), at most 4096."""
    return max(1, min(4096, int(4 * np.sqrt(max(n, 1)))))


def empty_faiss(d: int, kind: str = "flat", *, n: int = 0, hnsw_m: int = 32, ef_construction: int = 40,
                nlist: int | None = None, pq_m: int | None = None, pq_bits: int = 8, refine: bool = True,
                seed: int = 0):
    """An empty, untrained FAISS inner-product index of ``kind`` for about ``n`` vectors of dimension ``d``
    (IVF-PQ: ``nlist`` lists, ``pq_m`` sub-quantisers of ``pq_bits`` bits, i.e. ``pq_m·pq_bits/8`` bytes per vector)."""
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = 128
        return index
    if kind == "ivfpq":
        nlist = nlist or default_nlist(n)
        pq_m = pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0)
        if d % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the dimension {d}")
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        ivf.nprobe = min(nlist, 32)
        if not refine:
            return ivf
        index = faiss.IndexRefineFlat(ivf)  # re-score the approximate short list exactly
        index.k_factor = 4
        return index
    raise ValueError(f"unknown FAISS index kind {kind!r}; choose one of {KINDS}")


def _ivf(index):
    """The IndexIVF inside ``index`` (possibly wrapped in a refine index), or None."""
    import faiss

    base = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index
    return faiss.downcast_index(faiss.extract_index_ivf(base)) if isinstance(base, faiss.IndexIVF) else None


def trained_faiss(train: np.ndarray, kind: str = "flat", *, n: int | None = None, **kw):
    """An empty index of ``kind`` trained on the rows of ``train`` (for ``n`` vectors to come, default
    ``len(train)``): train once on a sample, then :meth:`add` the collection, possibly in shards."""
    train = as_matrix(train, "training vectors")
    index = empty_faiss(train.shape[1], kind, n=n if n is not None else len(train), **kw)
    if not index.is_trained:
        ivf = _ivf(index)
        need = max(39 * ivf.nlist, 39 * (1 << ivf.pq.nbits))  # FAISS's minimum for k-means: 39 points per centroid
        if len(train) < need:
            raise ValueError(f"{kind} needs at least {need} vectors to train {ivf.nlist} lists and 2^{ivf.pq.nbits} PQ "
                             f"centroids; have {len(train)} (use flat, or fewer lists / bits)")
        index.train(train)
    return index


def build_faiss(vectors: np.ndarray, kind: str = "flat", *, hnsw_m: int = 32, nlist: int | None = None,
                pq_m: int | None = None, pq_bits: int = 8, seed: int = 0, train_sample: int | None = None,
                refine: bool = True, ef_construction: int = 40):
    """Build a FAISS inner-product index over ``vectors`` (N, D) float32.

    ``train_sample``: train an IVF-PQ index on that many rows drawn at random (``seed``) instead of all of
    them — k-means on a sample of ~64 points per list gives the same lists at a fraction of the cost.
    """
    vectors = as_matrix(vectors)
    n, d = vectors.shape
    if kind == "ivfpq":
        train = vectors
        if train_sample is not None and train_sample < n:
            rows = np.sort(np.random.default_rng(seed).choice(n, int(train_sample), replace=False))
            train = vectors[rows]
        index = trained_faiss(train, kind, n=n, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, seed=seed, refine=refine)
    else:
        index = empty_faiss(d, kind, n=n, hnsw_m=hnsw_m, ef_construction=ef_construction)
    if n:
        index.add(vectors)
    return index


def set_search_params(index, *, nprobe: int | None = None, ef_search: int | None = None,
                      k_factor: float | None = None):
    """Set the speed/recall knobs of ``index`` in place: IVF ``nprobe``, HNSW ``efSearch``, refine ``k_factor``
    (the short list re-scored exactly is ``k_factor · k``). Knobs that do not apply raise ValueError."""
    import faiss

    ivf = _ivf(index)
    if nprobe is not None:
        if ivf is None:
            raise ValueError("nprobe applies to ivfpq indexes only")
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    if ef_search is not None:
        if not isinstance(index, faiss.IndexHNSW):
            raise ValueError("ef_search applies to hnsw indexes only")
        index.hnsw.efSearch = int(ef_search)
    if k_factor is not None:
        if not isinstance(index, faiss.IndexRefine):
            raise ValueError("k_factor applies to refined (ivfpq) indexes only")
        index.k_factor = float(k_factor)
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


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| (recall@k of an approximate top-k against the
    exact top-k; padding ids < 0 never count)."""
    found, truth = np.atleast_2d(found), np.atleast_2d(truth)
    if len(found) != len(truth):
        raise ValueError(f"recall_at_k: {len(found)} result rows for {len(truth)} ground-truth rows")
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 0.0


# ------------------------------------------------------------------------------------------------ files


def save_faiss(index, path: str | os.PathLike) -> Path:
    """Write ``index`` to ``path`` atomically (serialised in memory, then temporary file, fsync, rename)."""
    import faiss

    from ..io import atomic_write_bytes

    return atomic_write_bytes(Path(path), faiss.serialize_index(index).tobytes())


def load_faiss(path: str | os.PathLike, *, mmap: bool = True):
    """Open an index written by :func:`save_faiss`. With ``mmap`` (the default) the file is memory-mapped
    read-only (FAISS ``IO_FLAG_MMAP_IFC``): flat vectors, PQ codes, inverted lists and HNSW links stay in the
    page cache, shared between processes, and only the pages a search touches are read."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no FAISS index file here")
    flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()
        raise ValueError(f"{path}: not a readable FAISS index ({msg[-1] if msg else exc})") from exc
