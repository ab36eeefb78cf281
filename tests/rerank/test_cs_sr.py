"""Spatial re-ranking with proposals (rerank/cs_sr.py): CA-SR over stored regions, CS-SR with a detector, QE after
re-ranking -- each against a brute-force loop, on real conv maps of UKBench photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.nets import detector as ND
from instance_search.nets import rpn as NR
from instance_search.ops.boxes import boxes_to_cells
from instance_search.rerank.ca_sr import ca_sr_regions
from instance_search.rerank import cs_sr as CS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def maps(ukbench):
    """conv5_3 maps (224 px) of UKBench images 0-5: two views of object 0 first, then others."""
    from instance_search.backbones import load_backbone
    from instance_search.backbones.fast import use_engine
    from instance_search.images import load_image

    bb = use_engine(load_backbone("vgg16"), "winograd")
    return [bb.features(load_image(ukbench / f"ukbench{i:05d}.jpg", max_size=224), layers=["conv5_3"])
            [("conv5_3", 1.0)] for i in (0, 1, 4, 5, 8, 9)]


@pytest.fixture(scope="module")
def rpn():
    torch.manual_seed(0)
    return NR.RPN(mid_channels=16, sizes=(48, 96, 192), max_size=224).eval()


def _regions(rpn, maps, k=20):
    from instance_search.ops.pooling import region_macs

    cells = [rpn.proposal_cells(m, k) for m in maps]
    return [region_macs(m, c).numpy() for m, c in zip(maps, cells)], cells


def _l2(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_ca_sr_regions_matches_brute_force(maps, rpn):
    from instance_search.fitted.whitening import PCAWhitening

    regs, cells = _regions(rpn, maps)
    q = maps[0].amax(dim=(1, 2)).numpy()  # the whole of view 0 as the query box
    res = ca_sr_regions(q, regs[1:], cells=cells[1:])
    for i, Rg in enumerate(regs[1:]):
        cs = _l2(Rg) @ _l2(q)
        assert res.scores[i] == pytest.approx(cs.max(), abs=1e-9)
        np.testing.assert_array_equal(res.boxes[i], cells[1:][i][int(np.argmax(cs))])
    assert list(res.order) == sorted(range(5), key=lambda i: -res.scores[i])
    assert res.order[0] == 0, "the other view of the same object should win"
    w = PCAWhitening().fit(np.concatenate(regs), dim=64, shrinkage="auto")
    resw = ca_sr_regions(q, regs[1:], whitening=w)
    qw = _l2(w.transform(_l2(q)[None].astype(np.float32)))[0]
    for i, Rg in enumerate(regs[1:]):
        rw = _l2(w.transform(_l2(Rg).astype(np.float32)))
        assert resw.scores[i] == pytest.approx(float((rw @ qw).max()), abs=1e-5)
    with pytest.raises(ValueError, match="no region vectors"):
        ca_sr_regions(q, [np.zeros((0, 512))])


def test_qe_after_rerank_by_hand(maps, rpn):
    """The authors' QE after re-ranking (rerank.py, stage rerank2nd): mean of the RAW query box vector and the raw
    vectors of the top boxes, then L2 (no whitening for max pooling), then CA-SR again."""
    from instance_search.fitted.whitening import PCAWhitening
    from instance_search.rerank.ca_sr import winning_rows

    regs, cells = _regions(rpn, maps)
    q = maps[0].amax(dim=(1, 2)).numpy()
    first = ca_sr_regions(q, regs[1:], cells=cells[1:])
    top = winning_rows(q, regs[1:], first.order[:2])
    for r, i in enumerate(first.order[:2]):  # the rows that won: their L2 is the winner's vector
        np.testing.assert_allclose(_l2(top[r]), first.vectors[i], atol=1e-9)
        assert any(np.array_equal(top[r], row) for row in regs[1:][i])
    qe = CS.qe_after_rerank(q, top, regs[1:])
    v = _l2((q.astype(np.float64) + top[0] + top[1]) / 3)
    for i, Rg in enumerate(regs[1:]):
        assert qe.scores[i] == pytest.approx(float((_l2(Rg) @ v).max()), abs=1e-9)
    # the raw average is not the sum of unit vectors (the earlier variant)
    u = _l2(_l2(q) + first.vectors[first.order[0]] + first.vectors[first.order[1]])
    assert not np.allclose(qe.scores, [float((_l2(Rg) @ u).max()) for Rg in regs[1:]], atol=1e-6)
    same = CS.qe_after_rerank(q, np.zeros((0, 512)), regs[1:])  # no expansion = CA-SR again
    np.testing.assert_allclose(same.scores, first.scores, atol=1e-12)
    # sum pooling: mean of raw sums -> L2 -> PCA-whitening -> L2 (the authors reuse the image-level PCA)
    w = PCAWhitening().fit(np.concatenate(regs), dim=64, shrinkage="auto")
    qs = maps[0].sum(dim=(1, 2)).numpy()
    e = CS.expanded_query(qs, top, w)
    ref = _l2(w.transform(_l2((qs.astype(np.float64) + top.sum(0)) / 3)[None].astype(np.float32)))[0]
    np.testing.assert_allclose(e, ref, atol=1e-6)


def test_cs_sr_takes_the_best_proposal_of_the_query_class(maps, rpn):
    torch.manual_seed(1)
    det = ND.Detector(rpn, 3, ["a", "b", "c"], pool=2, hidden=32).eval()
    with torch.no_grad():
        torch.nn.init.normal_(det.head.bbox_pred.weight, std=0.05)  # regressed boxes differ from the proposals
    res = CS.cs_sr(det, 1, maps, proposals=40)  # the authors' default: the raw proposal
    reg = CS.cs_sr(det, 1, maps, proposals=40, box="regressed")
    moved = 0
    for i, m in enumerate(maps):
        props, probs, boxes = det.detect(m, 40)
        j = int(torch.argmax(probs[:, 2]))
        assert res.scores[i] == pytest.approx(float(probs[j, 2]), rel=1e-6) and reg.scores[i] == res.scores[i]
        np.testing.assert_array_equal(res.boxes[i], boxes_to_cells(props[j][None].numpy(), 16, *m.shape[-2:])[0])
        np.testing.assert_array_equal(reg.boxes[i], boxes_to_cells(boxes[j, 2][None].numpy(), 16, *m.shape[-2:])[0])
        moved += int(not np.array_equal(res.boxes[i], reg.boxes[i]))
    assert moved > 0
    assert list(res.order) == list(np.argsort(-res.scores, kind="stable"))
    assert res.vectors.shape == (len(maps), 512)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, rtol=1e-6)
    sc, bx = ND.class_detections(det, maps[0], 40)
    assert sc[1] == pytest.approx(res.scores[0], rel=1e-6)
    with pytest.raises(ValueError, match="class_index 3"):
        CS.cs_sr(det, 3, maps[:1])
    with pytest.raises(ValueError, match="box must be one of proposal, regressed"):
        CS.cs_sr(det, 1, maps[:1], box="centre")


def test_cs_sr_scores_and_full_ranking():
    res = CS.cs_sr_scores([0.2, 0.9, 0.9, 0.1], np.tile([[0.0, 0.0, 32.0, 48.0]], (4, 1)), [4, 3, 2, 1],
                          map_hw=[(10, 10)] * 4)
    assert list(res.order) == [1, 2, 0, 3]  # tie between 1 and 2 broken by the first-stage score
    np.testing.assert_array_equal(res.boxes[0], [0, 0, 3, 4])  # Caffe RoI cells: 0..round(2), 0..round(3)
    first = np.array([7, 3, 5, 1, 0, 2])
    np.testing.assert_array_equal(CS.full_ranking(first, 4, res.order), [3, 5, 7, 1, 0, 2])
    with pytest.raises(ValueError, match="permutation"):
        CS.full_ranking(first, 4, [0, 0, 1, 2])
    with pytest.raises(ValueError, match="2 boxes for 4 scores"):
        CS.cs_sr_scores([1, 2, 3, 4], np.zeros((2, 4)))


def test_cs_sr_reranker_box_option():
    from instance_search.rerank import base as RB

    assert RB.make_reranker("cs-sr", detector="d.pt").opts["box"] == "proposal"  # the authors' default
    assert RB.make_reranker("cs-sr", detector="d.pt", box="regressed").opts["box"] == "regressed"
    with pytest.raises(ValueError, match="box must be 'proposal' or 'regressed', got 'centre'"):
        RB.make_reranker("cs-sr", detector="d.pt", box="centre")
