"""Spatial re-ranking with a detector's region proposals (Salvador, Giró-i-Nieto, Marqués & Satoh 2016,
"Faster R-CNN features for instance search", Sec. 3.3), and query expansion after it.

* :func:`cs_sr` -- class-specific spatial re-ranking (CS-SR): a detector fine-tuned on the query instances
  (:mod:`instance_search.nets.detector`, trained by ``isearch finetune``) scores every proposal of a
  short-listed image for the query's class; the image takes the highest class probability and that proposal's
  regressed box.
* :func:`qe_after_rerank` -- average query expansion after re-ranking (Salvador Sec. 4.3; Chum et al. 2007):
  ``q' = L2(q + sum of the top-M re-ranked images' box vectors)``, then CA-SR of the short list with ``q'``.
* :func:`full_ranking` -- puts a re-ranked short list in front of the rest of the first-stage ranking.

Class-agnostic spatial re-ranking (CA-SR) lives once, in :mod:`instance_search.rerank.ca_sr` (:func:`~.ca_sr.ca_sr`,
:func:`~.ca_sr.ca_sr_regions`); query expansion here re-scores with its :func:`~.ca_sr.best_regions`.

Boxes in :class:`~instance_search.rerank.aml.RerankResult` are map cells ``(x, y, w, h)``, as elsewhere in
:mod:`instance_search.rerank`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..ops.boxes import boxes_to_cells
from ..ops.normalize import l2n
from .aml import RerankResult, order_by_score, region_vectors
from .ca_sr import best_regions

__all__ = ["cs_sr", "cs_sr_scores", "qe_after_rerank", "full_ranking"]


def _cells(boxes_px: np.ndarray, stride: int, map_hw: tuple[int, int]) -> np.ndarray:
    return boxes_to_cells(np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4), stride, int(map_hw[0]),
                          int(map_hw[1]))


def cs_sr_scores(class_scores, class_boxes, shortlist_scores=None, map_hw: Sequence | None = None,
                 stride: int = 16, box_vectors=None) -> RerankResult:
    """CS-SR from precomputed detections (Salvador et al. 2016, Sec. 3.3): ``class_scores`` (N,) = for each
    short-listed image the highest probability of the query's class over its proposals; ``class_boxes`` (N, 4) =
    that proposal's regressed box (map-frame pixels), converted to cells with ``map_hw`` (per image (H, W));
    ``box_vectors`` (N, D): the L2-normalised descriptors of those boxes (kept for query expansion)."""
    s = np.asarray(class_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(class_boxes, dtype=np.float64).reshape(-1, 4)
    if b.shape[0] != s.shape[0]:
        raise ValueError(f"{b.shape[0]} boxes for {s.shape[0]} scores")
    if map_hw is not None:
        if len(map_hw) != len(s):
            raise ValueError(f"{len(map_hw)} map sizes for {len(s)} images")
        cells = np.stack([_cells(b[i], stride, map_hw[i])[0] for i in range(len(s))]) if len(s) else \
            np.zeros((0, 4), np.int64)
    else:
        cells = np.zeros((len(s), 4), dtype=np.int64)
    vec = None if box_vectors is None else np.asarray(box_vectors)
    return RerankResult(s, cells, order_by_score(s, shortlist_scores), np.ones(len(s), dtype=np.int64), vec)


def cs_sr(detector, class_index: int, maps: Sequence[torch.Tensor], shortlist_scores=None, proposals: int = 300,
          whitening: Callable | None = None) -> RerankResult:
    """CS-SR (Salvador et al. 2016, Sec. 3.3): run the fine-tuned ``detector``
    (:class:`~instance_search.nets.detector.Detector`) on the conv5_3 map of every short-listed image; the
    image's score is the highest probability of class ``class_index`` (0-based object class, i.e. detector output
    ``class_index + 1``) over its top ``proposals`` RPN boxes, its box that proposal's class box. The returned
    ``vectors`` are the L2(-whitened) MACs of those boxes (for :func:`qe_after_rerank`)."""
    from ..ops.pooling import region_macs

    K = detector.head.num_classes
    if not 0 <= int(class_index) < K:
        raise ValueError(f"class_index {class_index} outside the detector's {K} classes")
    scores, boxes, hw, vecs = [], [], [], []
    for fmap in maps:
        fmap = fmap if isinstance(fmap, torch.Tensor) else torch.from_numpy(np.asarray(fmap))
        fmap = fmap.float()
        _, probs, cboxes = detector.detect(fmap, proposals)
        p = probs[:, int(class_index) + 1]
        j = int(torch.argmax(p))
        box = cboxes[j, int(class_index) + 1].numpy().astype(np.float64)
        H, W = int(fmap.shape[-2]), int(fmap.shape[-1])
        cell = _cells(box, detector.rpn.stride, (H, W))
        vecs.append(region_vectors(region_macs(fmap, cell), whitening)[0].numpy())
        scores.append(float(p[j]))
        boxes.append(box)
        hw.append((H, W))
    return cs_sr_scores(np.array(scores), np.array(boxes).reshape(-1, 4), shortlist_scores, hw,
                        detector.rpn.stride, np.stack(vecs) if vecs else None)


def qe_after_rerank(query_vec, result: RerankResult, regions: Sequence, top: int = 5,
                    whitening: Callable | None = None, shortlist_scores=None,
                    cells: Sequence | None = None) -> RerankResult:
    """Average query expansion after spatial re-ranking (Chum et al. 2007; Salvador et al. 2016, Sec. 4.3): the
    query box's vector ``L2(W(L2 q))`` plus the ``result.vectors`` (the boxes that decided the scores) of the ``top``
    best re-ranked images, L2-normalised, then CA-SR of the short list (``regions`` as for
    :func:`~instance_search.rerank.ca_sr.ca_sr_regions`)
    with the expanded query."""
    if result.vectors is None:
        raise ValueError("qe_after_rerank: the re-ranking result carries no box vectors")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    q = region_vectors(query_vec, whitening)[0].numpy()
    best = result.order[: int(top)]
    v = q + np.asarray(result.vectors, dtype=np.float64)[best].sum(axis=0)
    v = l2n(v)
    # the expanded vector is already whitened: score it against the whitened regions directly
    if cells is not None and len(cells) != len(regions):
        raise ValueError(f"{len(cells)} cell arrays for {len(regions)} images")
    pairs = ((np.asarray(R), None if cells is None else cells[i]) for i, R in enumerate(regions))
    return best_regions(torch.from_numpy(v), pairs, len(regions), whitening, shortlist_scores)


def full_ranking(first_stage_order: np.ndarray, shortlist: int, rerank_order: np.ndarray) -> np.ndarray:
    """The final ranking of one query: the first ``shortlist`` images of ``first_stage_order`` (database indices,
    best first) re-ordered by ``rerank_order`` (positions in the short list), then the rest unchanged."""
    first = np.asarray(first_stage_order, dtype=np.int64).reshape(-1)
    n = min(int(shortlist), len(first))
    ro = np.asarray(rerank_order, dtype=np.int64).reshape(-1)
    if sorted(ro.tolist()) != list(range(n)):
        raise ValueError(f"rerank_order must be a permutation of the {n} short-list positions")
    return np.concatenate([first[:n][ro], first[n:]])
