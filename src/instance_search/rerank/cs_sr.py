"""Spatial re-ranking with a detector's region proposals (Salvador, Giró-i-Nieto, Marqués & Satoh 2016,
"Faster R-CNN features for instance search", Sec. 3.3), and query expansion after it.

* :func:`cs_sr` -- class-specific spatial re-ranking (CS-SR): a detector fine-tuned on the query instances
  (:mod:`instance_search.nets.detector`, trained by ``isearch finetune``) scores every proposal of a
  short-listed image for the query's class; the image takes the highest class probability and that proposal
  (``box="proposal"``, the authors' default) or its regressed box (``box="regressed"``).
* :func:`qe_after_rerank` -- query expansion after re-ranking as the authors average (Salvador Sec. 4.3;
  ``rerank.py``, stage ``rerank2nd``): the *raw* vectors of the query box and of the boxes of the top-M
  re-ranked images (re-cropped from their maps, :func:`~.ca_sr.crop_vectors`) are averaged, then L2 (and, for
  sum pooling, the image-level PCA-whitening and L2 again), then CA-SR of the short list with that query. (This
  package summed the unit, whitened vectors before; that variant was not measured better and is gone.)
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
from .aml import RerankResult, order_by_score, region_vectors
from .ca_sr import best_regions, crop_vectors, proposal_descriptors
from .expansion import region_mean_qe

__all__ = ["cs_sr", "cs_sr_scores", "qe_after_rerank", "cs_sr_qe", "expanded_query", "full_ranking"]


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
          whitening: Callable | None = None, box: str = "proposal") -> RerankResult:
    """CS-SR (Salvador et al. 2016, Sec. 3.3): run the fine-tuned ``detector``
    (:class:`~instance_search.nets.detector.Detector`) on the conv5_3 map of every short-listed image; the
    image's score is the highest probability of class ``class_index`` (0-based object class, i.e. detector output
    ``class_index + 1``) over its top ``proposals`` RPN boxes, its box that proposal (``box="proposal"``, the
    authors' ``use_regressed_boxes = False``) or its class-regressed box (``"regressed"``). The returned
    ``vectors`` are the L2(-whitened) MACs of those boxes; their raw vectors for :func:`qe_after_rerank` are
    :func:`~.ca_sr.crop_vectors` of the maps and ``boxes``."""
    from ..nets.detector import DETECTION_BOXES
    from ..ops.pooling import region_macs

    K = detector.head.num_classes
    if not 0 <= int(class_index) < K:
        raise ValueError(f"class_index {class_index} outside the detector's {K} classes")
    if box not in DETECTION_BOXES:
        raise ValueError(f"cs-sr: box must be one of {', '.join(DETECTION_BOXES)}, got {box!r}")
    scores, boxes, hw, vecs = [], [], [], []
    for fmap in maps:
        fmap = fmap if isinstance(fmap, torch.Tensor) else torch.from_numpy(np.asarray(fmap))
        fmap = fmap.float()
        props, probs, cboxes = detector.detect(fmap, proposals)
        p = probs[:, int(class_index) + 1]
        j = int(torch.argmax(p))
        b = (props[j] if box == "proposal" else cboxes[j, int(class_index) + 1]).numpy().astype(np.float64)
        H, W = int(fmap.shape[-2]), int(fmap.shape[-1])
        cell = _cells(b, detector.rpn.stride, (H, W))
        vecs.append(region_vectors(region_macs(fmap, cell), whitening)[0].numpy())
        scores.append(float(p[j]))
        boxes.append(b)
        hw.append((H, W))
    return cs_sr_scores(np.array(scores), np.array(boxes).reshape(-1, 4), shortlist_scores, hw,
                        detector.rpn.stride, np.stack(vecs) if vecs else None)


def expanded_query(query_vec, box_vectors, whitening: Callable | None = None) -> np.ndarray:
    """The query of QE after re-ranking (Salvador et al. 2016, Sec. 4.3; ``rerank.py`` stage ``rerank2nd``), in the
    space of the region vectors: ``L2(W(L2(m)))`` of the mean ``m`` of the *raw* query box vector ``q`` (C,) and the
    raw box vectors ``box_vectors`` (M, C) (:func:`~.expansion.region_mean_qe`; ``W`` only with a ``whitening``:
    the authors' sum pooling). Returns (D,) float64."""
    return region_vectors(region_mean_qe(query_vec, box_vectors), whitening)[0].numpy()


def qe_after_rerank(query_vec, box_vectors, regions: Sequence, whitening: Callable | None = None,
                    shortlist_scores=None, cells: Sequence | None = None) -> RerankResult:
    """Query expansion after spatial re-ranking (Chum et al. 2007; Salvador et al. 2016, Sec. 4.3): the query
    :func:`expanded_query` of the raw query box vector ``query_vec`` (C,) and the raw vectors ``box_vectors``
    (M, C) of the boxes of the top-M re-ranked images (:func:`~.ca_sr.crop_vectors` of their maps, or
    :func:`~.ca_sr.winning_rows` of stored regions), then CA-SR of the short list with it: ``regions`` (per
    image the raw (R_i, C) region vectors, scored as ``L2(W(L2 f))``) and ``cells`` as for
    :func:`~instance_search.rerank.ca_sr.ca_sr_regions`. M = 0 is CA-SR with the query alone."""
    v = expanded_query(query_vec, box_vectors, whitening)
    if cells is not None and len(cells) != len(regions):
        raise ValueError(f"{len(cells)} cell arrays for {len(regions)} images")
    pairs = ((np.asarray(R), None if cells is None else cells[i]) for i, R in enumerate(regions))
    return best_regions(torch.from_numpy(v), pairs, len(regions), whitening, shortlist_scores)


def cs_sr_qe(detector, query_vec, maps: Sequence, result: RerankResult, top: int = 5, proposals: int = 300,
             shortlist_scores=None) -> RerankResult:
    """QE after CS-SR as the authors do it (Salvador et al. 2016, Sec. 4.3; ``rerank.py`` stage ``rerank2nd`` with
    ``pooling = 'max'``): the raw max-pooled vectors of the boxes of the ``top`` best images of ``result`` (a
    :func:`cs_sr` of the same short list: its ``order`` and ``boxes`` in cells), re-cropped from their ``maps``
    (:func:`~.ca_sr.crop_vectors`), are averaged with the raw query box vector ``query_vec`` (C,)
    (:func:`~.expansion.region_mean_qe`), and the short list is re-ranked by CA-SR with that query over each map's
    top ``proposals`` RPN boxes of the ``detector`` (max of Caffe's RoI bins, L2 only:
    :func:`~.ca_sr.proposal_descriptors`)."""
    if len(maps) != len(result.scores):
        raise ValueError(f"{len(maps)} maps for a re-ranked short list of {len(result.scores)}")
    first = np.asarray(result.order, dtype=np.int64)[:max(0, int(top))]
    tmaps = [maps[int(t)] for t in first]
    boxes = np.asarray(result.boxes)[first]
    q = region_mean_qe(query_vec, crop_vectors(tmaps, boxes, "max") if len(first) else np.zeros((0, 0)))

    def regions():
        for m in maps:
            t = (m if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m))).float()
            with torch.no_grad():
                props, _ = detector.rpn.propose(t, int(proposals))
            props = props.numpy().astype(np.float64)
            cells = _cells(props, detector.rpn.stride, (int(t.shape[-2]), int(t.shape[-1])))
            yield proposal_descriptors(t, props, "max", detector.rpn.stride), cells

    return best_regions(region_vectors(q, None)[0], regions(), len(maps), None, shortlist_scores)


def full_ranking(first_stage_order: np.ndarray, shortlist: int, rerank_order: np.ndarray) -> np.ndarray:
    """The final ranking of one query: the first ``shortlist`` images of ``first_stage_order`` (database indices,
    best first) re-ordered by ``rerank_order`` (positions in the short list), then the rest unchanged."""
    first = np.asarray(first_stage_order, dtype=np.int64).reshape(-1)
    n = min(int(shortlist), len(first))
    ro = np.asarray(rerank_order, dtype=np.int64).reshape(-1)
    if sorted(ro.tolist()) != list(range(n)):
        raise ValueError(f"rerank_order must be a permutation of the {n} short-list positions")
    return np.concatenate([first[:n][ro], first[n:]])
