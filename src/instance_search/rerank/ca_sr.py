"""Class-agnostic spatial re-ranking, CA-SR (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, "Faster R-CNN
features for instance search", Sec. 3.3).

The one CA-SR of the package (:func:`best_regions`; :mod:`.cs_sr` builds on it). The query is described by the
max-pooled conv features of its box (:func:`region_mac`). For each short-listed image, candidate boxes (Salvador: the
RPN proposals; here also any generator ``(H, W) → (N, 4)`` cells, e.g. multi-scale :func:`sliding_windows` or the
R-MAC grid :func:`rmac_boxes`) are max-pooled, compared with the query descriptor by cosine similarity (optionally
after L2 → PCA-whitening → L2), and the image takes the score and box of its best candidate: :func:`ca_sr`
generates and pools the candidates from the maps, :func:`ca_sr_regions` takes stored region MACs (e.g. the RPA
local vectors of the index).

Pooling: ``method="exact"`` (default) computes the exact max over every box, vectorised by
:func:`instance_search.ops.integral.window_max` (a 2-D sparse table of power-of-two block maxima, four look-ups
per box); ``method="integral"`` uses the integral-image approximation ``f̃_R`` (Tolias et al. 2016, Eq. 3).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..ops.integral import power_integral, window_max, window_maxpool_approx
from .aml import RerankResult, as_float_tensor, order_by_score, region_vectors

__all__ = ["ca_sr", "ca_sr_regions", "best_regions", "sliding_windows", "rmac_boxes", "region_mac"]

BoxesFn = Callable[[int, int], np.ndarray]


def region_mac(X, box):
    """MAC of one box ``(x, y, w, h)`` (cells) of a (C, H, W) map: ``max_{p∈box} X_i(p)``, shape (C,)."""
    return window_max(X, np.asarray(box, dtype=np.int64).reshape(1, 4))[0]


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
) -> RerankResult:
    """CA-SR re-ranking (Salvador et al. 2016, Sec. 3.3) with candidate boxes generated from each map: score of
    an image = max over its candidate boxes of ``cos(f_box, q)``; its box = the arg-max (:func:`best_regions`).

    ``query_region_vec``: (C,) max-pooled descriptor of the query box (:func:`region_mac` of the query map);
    ``maps``: (C, H, W) per short-listed image (numpy or torch; sizes may differ); ``candidate_boxes_fn``:
    ``(H, W) → (N, 4)`` cell boxes ``(x, y, w, h)``, default :func:`sliding_windows`; ``shortlist_scores``:
    only break ties in ``order``; ``whitening``: callable or object with ``.transform`` ((R, C) → (R, D));
    ``method``: ``"exact"`` max-pooling or ``"integral"`` approximation with ``alpha`` (see module docstring).
    """
    if method not in ("exact", "integral"):
        raise ValueError(f"method must be 'exact' or 'integral', got {method!r}")
    gen = candidate_boxes_fn or sliding_windows
    q = as_float_tensor(query_region_vec).reshape(-1)

    def candidates():
        for X in maps:
            H, W = int(X.shape[-2]), int(X.shape[-1])
            cands = np.asarray(gen(H, W), dtype=np.int64).reshape(-1, 4)
            if cands.shape[0] == 0:
                raise ValueError(f"candidate_boxes_fn returned no boxes for a {H}x{W} map")
            V = window_max(X, cands) if method == "exact" else window_maxpool_approx(power_integral(X, alpha), cands)
            yield V, cands

    return best_regions(region_vectors(q, whitening)[0], candidates(), len(maps), whitening, shortlist_scores)
