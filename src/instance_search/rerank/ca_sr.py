"""Class-agnostic spatial re-ranking, CA-SR (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, "Faster R-CNN
features for instance search", Sec. 3.3).

The one CA-SR of the package (:func:`best_regions`; :mod:`.cs_sr` builds on it). The query is described by the
pooled conv features of its box (:func:`query_descriptor`). For each short-listed image, candidate boxes (Salvador:
the RPN proposals; here also any generator ``(H, W) → (N, 4)`` cells, e.g. multi-scale :func:`sliding_windows` or
the R-MAC grid :func:`rmac_boxes`) are pooled (:func:`region_descriptors`), compared with the query descriptor by
cosine similarity, and the image takes the score and box of its best candidate: :func:`ca_sr` generates and pools
the candidates from the maps, :func:`ca_sr_regions` takes stored region MACs (e.g. the RPA local vectors of the
index).

Region vectors (:data:`REGION_VECTORS`, the re-ranker's option ``vectors``), as the authors' ``rerank.py`` builds
them from the ``pool5`` blob (Caffe's 7x7 RoI max-pooling, :func:`~instance_search.ops.boxes.roi_pool`):

* ``"max"`` (authors' default): the max over the RoI, L2-normalised only -- no whitening;
* ``"sum"``: the sum of the 7x7 RoI-pooled bins, L2 → the image-level PCA-whitening (the one of the IPA-sum
  vectors; the authors reuse it for regions) → L2; the query box is sum-pooled over its cells.

* ``"max-whitened"`` (the package's earlier variant, not the authors'): max-pooled, L2 → the index's
  PCA-whitening → L2. On an IPA-sum index it measured worse than ``"max"`` (Holidays-160, sliding windows: mAP
  67.0 against 76.4; benchmarks/bench_salvador_casr_vectors.py); on an R-MAC index, whose whitening is learned
  on grid region MACs, it is better on Paris-250 (box queries) and worse on Holidays-811 and UKBench-1000
  (whole-image queries) than ``"max"``, which stays the default (docs/results.md).

Pooling: ``method="exact"`` (default) computes the exact max over every box, vectorised by
:func:`instance_search.ops.integral.window_max` (a 2-D sparse table of power-of-two block maxima, four look-ups
per box); ``method="integral"`` uses the integral-image approximation ``f̃_R`` (Tolias et al. 2016, Eq. 3).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..ops.boxes import roi_pool
from ..ops.integral import power_integral, window_max, window_maxpool_approx
from .aml import RerankResult, as_float_tensor, order_by_score, region_vectors
from .expansion import region_mean_qe

__all__ = ["ca_sr", "ca_sr_regions", "best_regions", "sliding_windows", "rmac_boxes", "region_mac", "REGION_VECTORS",
           "region_descriptors", "proposal_descriptors", "query_descriptor", "cells_to_roi_boxes", "crop_vectors",
           "winning_rows", "ca_sr_qe", "check_vectors"]

#: the region vectors of CA-SR: name → (pooling, whether the index's whitening is applied); see the module docstring
REGION_VECTORS = {"max": ("max", False), "sum": ("sum", True), "max-whitened": ("max", True)}
#: Caffe's RoI pooling output of the authors' model (``pool5``: 7x7), summed for ``"sum"`` region vectors
POOL5 = 7

BoxesFn = Callable[[int, int], np.ndarray]


def region_mac(X, box):
    """MAC of one box ``(x, y, w, h)`` (cells) of a (C, H, W) map: ``max_{p∈box} X_i(p)``, shape (C,)."""
    return window_max(X, np.asarray(box, dtype=np.int64).reshape(1, 4))[0]


def check_vectors(vectors: str, whitening) -> tuple[str, bool]:
    """``(pooling, whiten)`` of the region-vector kind ``vectors`` (:data:`REGION_VECTORS`); refuses unknown names
    and a whitened kind without a whitening."""
    if vectors not in REGION_VECTORS:
        raise ValueError(f"CA-SR region vectors must be one of {', '.join(REGION_VECTORS)}, got {vectors!r}")
    pooling, whiten = REGION_VECTORS[vectors]
    if whiten and whitening is None:
        raise ValueError(f"CA-SR region vectors {vectors!r} need the index's PCA-whitening (Salvador et al. 2016 "
                         f"reuse the image-level PCA of IPA-sum); this index has none: use vectors 'max'")
    return pooling, whiten


def cells_to_roi_boxes(cells, stride: int = 16) -> np.ndarray:
    """Map-frame pixel boxes whose Caffe RoI (:func:`~instance_search.ops.boxes.roi_extent`) is exactly the cells
    ``(x, y, w, h)``: ``(x s, y s, (x + w - 1) s, (y + h - 1) s)`` (inclusive end)."""
    c = np.asarray(cells, dtype=np.float64).reshape(-1, 4)
    return np.stack([c[:, 0], c[:, 1], c[:, 0] + c[:, 2] - 1, c[:, 1] + c[:, 3] - 1], 1) * stride


def region_descriptors(X, cells, pooling: str = "max") -> torch.Tensor:
    """Raw (R, C) region descriptors of the cells ``(x, y, w, h)`` of one (C, H, W) map, as the authors take them
    from Caffe's ``pool5`` (Salvador et al. 2016, Sec. 3.3; ``rerank.py``): ``"max"`` the max over the RoI (the
    max of the 7x7 RoI-pooled bins), ``"sum"`` the sum of the 7x7 RoI-pooled bins."""
    t = as_float_tensor(X)
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
    if pooling == "max":
        return window_max(t, cells)
    if pooling == "sum":
        return roi_pool(t, cells_to_roi_boxes(cells), POOL5).sum(dim=(2, 3))
    raise ValueError(f"pooling must be 'max' or 'sum', got {pooling!r}")


def proposal_descriptors(X, boxes, pooling: str = "max", stride: int = 16) -> torch.Tensor:
    """Raw (R, C) descriptors of map-frame pixel boxes (RPN proposals) of one (C, H, W) map, from Caffe's 7x7 RoI
    pooling of the boxes themselves (:func:`~instance_search.ops.boxes.roi_pool`), as the authors' ``pool5``:
    ``"max"`` the max of the bins (= the max over the box's cells), ``"sum"`` their sum (bins past the map's
    border are empty and count 0, as in Caffe)."""
    t = as_float_tensor(X)
    if pooling == "max":
        return roi_pool(t, boxes, 1, stride)[:, :, 0, 0]
    if pooling == "sum":
        return roi_pool(t, boxes, POOL5, stride).sum(dim=(2, 3))
    raise ValueError(f"pooling must be 'max' or 'sum', got {pooling!r}")


def query_descriptor(qmap, pooling: str = "max", cells=None) -> np.ndarray:
    """Raw (C,) descriptor of the query box: the max (``"max"``) or sum (``"sum"``) of the (C, H, W) query map over
    ``cells`` ``(x, y, w, h)`` (default: the whole map, i.e. a map of the box crop), as the authors pool the
    query box's cells of conv5_3 (``rerank.py``, ``get_query_local_feat``)."""
    t = as_float_tensor(qmap)
    if cells is not None:
        x, y, w, h = [int(v) for v in np.asarray(cells).reshape(4)]
        t = t[:, y:y + h, x:x + w]
    if t.ndim != 3 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"the query box covers no cell of the map (shape {tuple(t.shape)})")
    if pooling == "max":
        return t.amax(dim=(1, 2)).numpy()
    if pooling == "sum":
        return t.sum(dim=(1, 2)).numpy()
    raise ValueError(f"pooling must be 'max' or 'sum', got {pooling!r}")


def crop_vectors(maps: Sequence, boxes, pooling: str = "max") -> np.ndarray:
    """Raw (M, C) vectors of one box ``(x, y, w, h)`` (cells) per map, pooled over its cells -- the authors'
    re-cropped boxes of query expansion after re-ranking (``rerank.py``, stage ``rerank2nd``)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(boxes) != len(maps):
        raise ValueError(f"{len(boxes)} boxes for {len(maps)} maps")
    return np.stack([query_descriptor(m, pooling, b) for m, b in zip(maps, boxes)]) if len(maps) else \
        np.zeros((0, 0))


def winning_rows(query_vec, regions: Sequence, images: Sequence[int], whitening: Callable | None = None) -> np.ndarray:
    """The raw rows of ``regions`` (per image (R_i, C)) that won CA-SR for the short-list positions ``images``: the
    same arg-max as :func:`ca_sr_regions` with ``query_vec`` and ``whitening``. (M, C)."""
    qv = region_vectors(query_vec, whitening)[0]
    rows = []
    for i in images:
        R = np.asarray(regions[int(i)])
        rows.append(R[int(torch.argmax(region_vectors(R, whitening) @ qv))])
    return np.stack(rows) if rows else np.zeros((0, np.asarray(query_vec).reshape(-1).shape[0]))


def _starts(n: int, size: int, step: int) -> list[int]:
    starts = list(range(0, n - size + 1, step))
    if starts[-1] != n - size:
        starts.append(n - size)
    return starts


def sliding_windows(
    H: int,
    W: int,
    scales: Sequence[float] = (1.0, 0.75, 0.5, 0.35, 0.25),
    aspects: Sequence[float] = (0.5, 1.0, 2.0),
    overlap: float = 0.5,
) -> np.ndarray:
    """Multi-scale sliding windows over an ``H x W`` map: unique ``(N, 4)`` int64 rows ``(x, y, w, h)``.

    For each scale ``σ`` and aspect ``a`` (width / height) the window has area ``(σ·min(H, W))²`` and
    ``w/h = a`` (clipped to the map, at least one cell); positions step by ``(1 - overlap)`` of the window size
    and always include the far border. The full map is always included.
    """
    if H < 1 or W < 1:
        raise ValueError(f"empty map {H}x{W}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    out = [(0, 0, W, H)]
    side0 = min(H, W)
    for sc in scales:
        for a in aspects:
            w = int(np.clip(round(sc * side0 * np.sqrt(a)), 1, W))
            h = int(np.clip(round(sc * side0 / np.sqrt(a)), 1, H))
            sx, sy = max(1, int(round(w * (1 - overlap)))), max(1, int(round(h * (1 - overlap))))
            out.extend((x, y, w, h) for y in _starts(H, h, sy) for x in _starts(W, w, sx))
    return np.unique(np.asarray(out, dtype=np.int64), axis=0)


def rmac_boxes(levels: int = 3) -> BoxesFn:
    """Candidate generator returning the (deduplicated) R-MAC grid of
    :func:`instance_search.ops.pooling.rmac_regions` plus the full map (Tolias et al. 2016, Sec. 3)."""
    from ..ops.pooling import rmac_regions

    def boxes(H: int, W: int) -> np.ndarray:
        r = np.asarray(rmac_regions(H, W, levels=levels), dtype=np.int64).reshape(-1, 4)
        return np.unique(np.concatenate([np.array([[0, 0, W, H]], dtype=np.int64), r]), axis=0)

    return boxes


def best_regions(query_vec: torch.Tensor, regions: Iterable, n: int, whitening: Callable | None = None,
                 shortlist_scores=None) -> RerankResult:
    """The core of CA-SR (Salvador et al. 2016, Sec. 3.3): each image's best cosine between the query vector
    ``query_vec`` -- already ``L2(W(L2 q))`` (:func:`~instance_search.rerank.aml.region_vectors`) -- and its region
    vectors ``L2(W(L2 f_r))``. ``regions`` yields, for the ``n`` short-listed images in turn, ``(R_i, cells_i)``:
    the (R_i, C) region MACs and their (R_i, 4) cell boxes (or None). The winning region's box and whitened
    vector come with each score; ``shortlist_scores`` only break ties in ``order``."""
    qv = as_float_tensor(query_vec).to(torch.float64).reshape(-1)
    scores = np.zeros(n)
    boxes = np.zeros((n, 4), dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    vectors = []
    seen = 0
    for i, (R, cells) in enumerate(regions):
        if i >= n:
            raise ValueError(f"more region sets than the {n} short-listed images")
        if R.ndim != 2 or R.shape[0] == 0:
            raise ValueError(f"image {i} of the short list has no region vectors (shape {tuple(R.shape)})")
        RV = region_vectors(R, whitening)
        cs = RV @ qv
        b = int(torch.argmax(cs))
        scores[i], counts[i] = float(cs[b]), R.shape[0]
        if cells is not None:
            boxes[i] = np.asarray(cells)[b]
        vectors.append(RV[b].numpy())
        seen += 1
    if seen != n:
        raise ValueError(f"{seen} region sets for {n} short-listed images")
    return RerankResult(scores, boxes, order_by_score(scores, shortlist_scores), counts,
                        np.stack(vectors) if vectors else None)


def ca_sr_regions(query_vec, regions: Sequence, shortlist_scores=None, whitening: Callable | None = None,
                  cells: Sequence | None = None) -> RerankResult:
    """CA-SR (Salvador et al. 2016, Sec. 3.3) over *stored* region descriptors: ``score_i = max_r cos(f_{i,r}, q)``.

    ``query_vec``: (C,) MAC of the query box; ``regions``: per short-listed image an (R_i, C) array of region MACs
    (e.g. of its RPN proposals: the RPA local vectors); ``cells``: optional per image (R_i, 4) cell boxes of those
    regions (returned as the images' boxes; zeros otherwise); ``whitening``: callable or object with
    ``.transform``."""
    n = len(regions)
    if cells is not None and len(cells) != n:
        raise ValueError(f"{len(cells)} cell arrays for {n} images")
    pairs = ((np.asarray(R), None if cells is None else cells[i]) for i, R in enumerate(regions))
    return best_regions(region_vectors(query_vec, whitening)[0], pairs, n, whitening, shortlist_scores)


def ca_sr(
    query_region_vec,
    maps: Sequence,
    candidate_boxes_fn: BoxesFn | None = None,
    shortlist_scores=None,
    whitening: Callable | None = None,
    method: str = "exact",
    alpha: float = 10.0,
    pooling: str = "max",
) -> RerankResult:
    """CA-SR re-ranking (Salvador et al. 2016, Sec. 3.3) with candidate boxes generated from each map: score of
    an image = max over its candidate boxes of ``cos(f_box, q)``; its box = the arg-max (:func:`best_regions`).

    ``query_region_vec``: (C,) max-pooled descriptor of the query box (:func:`region_mac` of the query map);
    ``maps``: (C, H, W) per short-listed image (numpy or torch; sizes may differ); ``candidate_boxes_fn``:
    ``(H, W) → (N, 4)`` cell boxes ``(x, y, w, h)``, default :func:`sliding_windows`; ``shortlist_scores``:
    only break ties in ``order``; ``whitening``: callable or object with ``.transform`` ((R, C) → (R, D));
    ``method``: ``"exact"`` max-pooling or ``"integral"`` approximation with ``alpha`` (see module docstring);
    ``pooling``: ``"max"`` or ``"sum"`` region descriptors (:func:`region_descriptors`; the query vector must be
    pooled the same way, :func:`query_descriptor`).
    """
    if method not in ("exact", "integral"):
        raise ValueError(f"method must be 'exact' or 'integral', got {method!r}")
    if pooling not in ("max", "sum"):
        raise ValueError(f"pooling must be 'max' or 'sum', got {pooling!r}")
    if pooling == "sum" and method != "exact":
        raise ValueError("sum-pooled region vectors are computed exactly; method 'integral' approximates max-pooling")
    gen = candidate_boxes_fn or sliding_windows
    q = as_float_tensor(query_region_vec).reshape(-1)

    def candidates():
        for X in maps:
            H, W = int(X.shape[-2]), int(X.shape[-1])
            cands = np.asarray(gen(H, W), dtype=np.int64).reshape(-1, 4)
            if cands.shape[0] == 0:
                raise ValueError(f"candidate_boxes_fn returned no boxes for a {H}x{W} map")
            V = (region_descriptors(X, cands, pooling) if method == "exact"
                 else window_maxpool_approx(power_integral(X, alpha), cands))
            yield V, cands

    return best_regions(region_vectors(q, whitening)[0], candidates(), len(maps), whitening, shortlist_scores)


def ca_sr_qe(query_vec, maps: Sequence, result: RerankResult, top: int = 5, candidate_boxes_fn: BoxesFn | None = None,
             shortlist_scores=None, whitening: Callable | None = None, pooling: str = "max") -> RerankResult:
    """QE after CA-SR as the authors do it (Salvador et al. 2016, Sec. 4.3; ``rerank.py`` stage ``rerank2nd``): the
    raw vectors of the boxes of the ``top`` best images of ``result`` (a CA-SR of the same short list: its
    ``order`` and ``boxes`` in cells), re-cropped from their ``maps`` (:func:`crop_vectors`, pooled as the query),
    are averaged with the raw query box vector ``query_vec`` (C,) (:func:`~.expansion.region_mean_qe`), and the
    short list is re-ranked by :func:`ca_sr` with that query (same candidates ``candidate_boxes_fn``,
    ``whitening`` and ``pooling``). ``top = 0``: CA-SR with the query alone."""
    if len(maps) != len(result.scores):
        raise ValueError(f"{len(maps)} maps for a re-ranked short list of {len(result.scores)}")
    first = np.asarray(result.order, dtype=np.int64)[:max(0, int(top))]
    vecs = crop_vectors([maps[int(t)] for t in first], np.asarray(result.boxes)[first], pooling) if len(first) \
        else np.zeros((0, 0))
    return ca_sr(region_mean_qe(query_vec, vecs), maps, candidate_boxes_fn, shortlist_scores, whitening,
                 pooling=pooling)
