"""CA-SR region vectors as Salvador et al.'s rerank.py builds them (rerank/ca_sr.py): max-pooled L2 only, the
sum of Caffe's 7x7 RoI-pooled bins (L2 -> image-level PCA -> L2), and max with a whitening (the functions' own
argument) -- against direct transcriptions (the Caffe ROIPooling layer of test_roi_caffe.py, numpy loops)."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from instance_search.fitted.whitening import PCAWhitening
from instance_search.ops import boxes as B
from instance_search.rerank import base as RB
from reference_caffe import caffe_roi_pool

CA = importlib.import_module("instance_search.rerank.ca_sr")  # the package exports a function of that name


def _l2(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(3)
    out = []
    for h, w in ((7, 9), (6, 6), (8, 5), (7, 9)):
        X = np.maximum(rng.standard_normal((8, h, w)), 0).astype(np.float32)  # ReLU maps, like conv5_3
        out.append(X)
    return out


@pytest.fixture(scope="module")
def whitening(maps):
    rng = np.random.default_rng(4)
    rows = _l2(np.abs(rng.standard_normal((200, 8)))).astype(np.float32)
    return PCAWhitening().fit(rows, dim=6)


def test_cells_to_roi_boxes_round_trips_through_caffe_rounding():
    cells = np.array([[0, 0, 1, 1], [2, 3, 4, 2], [0, 0, 9, 7], [8, 6, 1, 1]])
    np.testing.assert_array_equal(B.roi_extent(CA.cells_to_roi_boxes(cells), 16), cells)


def test_region_descriptors_equal_the_authors_pool5_sums_and_maxes(maps):
    X = maps[0]
    cells = CA.sliding_windows(*X.shape[1:])
    got_sum = CA.region_descriptors(torch.from_numpy(X), cells, "sum").numpy()
    got_max = CA.region_descriptors(torch.from_numpy(X), cells, "max").numpy()
    pool5 = caffe_roi_pool(X, CA.cells_to_roi_boxes(cells), 7, 7, 1 / 16)  # what the authors read from 'pool5'
    np.testing.assert_allclose(got_sum, pool5.sum(axis=(2, 3)), rtol=1e-5)  # np.sum(np.sum(feats, 2), 2)
    np.testing.assert_array_equal(got_max, pool5.max(axis=(2, 3)))          # np.max(np.max(feats, 2), 2)
    for (x, y, w, h), v in zip(cells.tolist(), got_max):  # the max of the bins is the max of the cells
        np.testing.assert_array_equal(v, X[:, y:y + h, x:x + w].max(axis=(1, 2)))
    with pytest.raises(ValueError, match="pooling must be 'max' or 'sum'"):
        CA.region_descriptors(torch.from_numpy(X), cells, "mean")


def _reference(q, maps, kind, whitening):
    """Brute force: every sliding window pooled from the Caffe transcription, the authors' normalisation."""
    scores = []
    for X in maps:
        cells = CA.sliding_windows(*X.shape[1:])
        pool5 = caffe_roi_pool(X, CA.cells_to_roi_boxes(cells), 7, 7, 1 / 16)
        R = pool5.sum(axis=(2, 3)) if kind == "sum" else pool5.max(axis=(2, 3))
        if kind == "max":  # L2 only
            V, qq = _l2(R), _l2(q)
        else:  # L2 -> PCA-whitening -> L2
            V = _l2(whitening.transform(_l2(R).astype(np.float32)))
            qq = _l2(whitening.transform(_l2(q)[None].astype(np.float32)))[0]
        scores.append(float((V @ qq).max()))
    return np.array(scores)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["max", "sum", "max-whitened"])
def test_ca_sr_region_vectors_against_a_direct_transcription(maps, whitening, kind):
    pooling, whiten = CA.check_vectors(kind, whitening) if kind in CA.REGION_VECTORS else ("max", True)
    q = CA.query_descriptor(torch.from_numpy(maps[0]), pooling, cells=(1, 1, 5, 4))
    ref_q = (maps[0][:, 1:5, 1:6].sum(axis=(1, 2)) if pooling == "sum" else maps[0][:, 1:5, 1:6].max(axis=(1, 2)))
    np.testing.assert_allclose(q, ref_q, rtol=1e-6)
    res = CA.ca_sr(q, maps[1:], whitening=whitening if whiten else None, pooling=pooling)
    np.testing.assert_allclose(res.scores, _reference(q, maps[1:], kind, whitening), atol=2e-5)
    # the query's own box among the candidates of its own map scores 1 for max (sum: the 7x7 bins differ from
    # the cells' sum unless the box is 7x7-divisible, as in the authors' code)
    own = CA.ca_sr(q, [maps[0]], lambda H, W: np.array([[1, 1, 5, 4], [0, 0, W, H]]),
                   whitening=whitening if whiten else None, pooling=pooling)
    if pooling == "max":
        assert own.scores[0] == pytest.approx(1.0, abs=1e-9) and own.boxes[0].tolist() == [1, 1, 5, 4]


def test_vectors_option_refused_or_needs_a_whitening():
    with pytest.raises(ValueError, match="'max-whitened' need the index's PCA-whitening"):
        CA.check_vectors("max-whitened", None)
    with pytest.raises(ValueError, match="'sum' need the index's PCA-whitening"):
        CA.check_vectors("sum", None)
    with pytest.raises(ValueError, match="casr: vectors must be one of max, sum, max-whitened, got 'whitened'"):
        RB.make_reranker("casr", vectors="whitened")
    assert RB.make_reranker("casr").opts["vectors"] == "max"
    with pytest.raises(ValueError, match="integral"):
        CA.ca_sr(np.ones(4), [np.ones((4, 3, 3), np.float32)], pooling="sum", method="integral")


@pytest.mark.slow
def test_casr_reranker_uses_the_named_vectors(maps, whitening):
    ids = [1, 2, 3]
    ctx = RB.RerankContext(maps=lambda i, sparse: [maps[k] for k in i], all_ids=lambda: [0, 1, 2, 3],
                           whitening=whitening)
    qmap = maps[0][:, 1:5, 1:6]  # the query box's cells (the box crop's map)
    for kind in CA.REGION_VECTORS:
        res, shapes = RB.make_reranker("casr", vectors=kind).rerank(None, qmap, ids, np.zeros(3), ctx)
        np.testing.assert_allclose(res.scores, _reference(CA.query_descriptor(qmap, CA.REGION_VECTORS[kind][0]),
                                                          [maps[k] for k in ids], kind, whitening), atol=2e-5)
        assert shapes == [m.shape[1:] for m in maps[1:]]
    plain = RB.RerankContext(maps=ctx.maps, all_ids=ctx.all_ids, whitening=None)
    with pytest.raises(ValueError, match="need the index's PCA-whitening"):
        RB.make_reranker("casr", vectors="sum").rerank(None, qmap, ids, np.zeros(3), plain)


def test_crop_vectors_and_winning_rows(maps):
    boxes = np.array([[0, 0, 2, 3], [1, 1, 4, 4]])
    v = CA.crop_vectors(maps[:2], boxes, "sum")
    np.testing.assert_allclose(v[1], maps[1][:, 1:5, 1:5].sum(axis=(1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="2 boxes for 3 maps"):
        CA.crop_vectors(maps[:3], boxes)
    rng = np.random.default_rng(0)
    regs = [rng.random((5, 8)) for _ in range(3)]
    q = rng.random(8)
    res = CA.ca_sr_regions(q, regs)
    rows = CA.winning_rows(q, regs, [0, 1, 2])
    for i in range(3):
        j = int(np.argmax(_l2(regs[i]) @ _l2(q)))
        np.testing.assert_array_equal(rows[i], regs[i][j])
        np.testing.assert_allclose(_l2(rows[i]), res.vectors[i], atol=1e-12)


def test_proposal_descriptors_equal_the_caffe_pool5(maps):
    from reference_caffe import EDGE_BOXES

    X = maps[0]
    boxes = EDGE_BOXES[[0, 2, 3, 5, 8, 9, 12]]
    pool5 = caffe_roi_pool(X, boxes, 7, 7, 1 / 16)
    np.testing.assert_allclose(CA.proposal_descriptors(torch.from_numpy(X), boxes, "sum").numpy(),
                               pool5.sum(axis=(2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(CA.proposal_descriptors(torch.from_numpy(X), boxes, "max").numpy(),
                                  pool5.max(axis=(2, 3)))
