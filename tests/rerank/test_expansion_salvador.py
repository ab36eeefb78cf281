"""QE after spatial re-ranking as Salvador et al. 2016 average it (Sec. 4.3; their rerank.py, stage rerank2nd):
the formula, CA-SR / CS-SR + QE against direct transcriptions, and the product's search path (Collection.search
and `isearch search --rerank casr --qe N`) against a transcription on the index's own stored maps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instance_search.rerank.ca_sr import ca_sr, ca_sr_qe, sliding_windows
from instance_search.rerank.expansion import region_mean_qe


def _l2(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _box_max(X, box):
    """max over the cells of one box (x, y, w, h), by loops."""
    x, y, w, h = [int(v) for v in box]
    out = np.full(X.shape[0], -np.inf)
    for yy in range(y, y + h):
        for xx in range(x, x + w):
            out = np.maximum(out, X[:, yy, xx])
    return out


def _casr_by_hand(q, maps, boxes_of):
    """(scores, winning boxes) of CA-SR by loops: each image's best cosine of L2(max over a box) with L2(q)."""
    scores, best = [], []
    for X in maps:
        cands = boxes_of(X)
        cs = [float(_l2(_box_max(X, b)) @ _l2(q)) for b in cands]
        k = int(np.argmax(cs))
        scores.append(cs[k])
        best.append(cands[k])
    return np.array(scores), best


def _order(scores):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def test_region_mean_qe_is_the_authors_mean_of_raw_vectors():
    rng = np.random.default_rng(0)
    q, F = rng.random(6) * 5, rng.random((3, 6)) * [[1], [10], [100]]
    acc = q.copy()
    for f in F:  # rerank.py: the query plus each re-cropped box, divided by their number
        acc = acc + f
    np.testing.assert_allclose(region_mean_qe(q, F), acc / 4, rtol=1e-12)
    # raw: the box with the largest norm dominates; a sum of unit vectors would not
    assert np.argmax(region_mean_qe(q, F)) == np.argmax(F[2])
    np.testing.assert_array_equal(region_mean_qe(q, np.zeros((0, 6))), q)
    from instance_search.errors import ISearchError

    with pytest.raises(ISearchError, match=r"\(M, 6\)"):
        region_mean_qe(q, rng.random((2, 5)))


def test_ca_sr_qe_equals_a_transcription_on_random_maps():
    rng = np.random.default_rng(1)
    maps = [(np.abs(rng.normal(size=(8, int(rng.integers(4, 7)), int(rng.integers(4, 7))))) + 0.01).astype(np.float32)
            for _ in range(7)]  # no all-zero window: its direction is undefined
    q = np.maximum(rng.normal(size=8), 0).astype(np.float32) + 0.1
    gen = sliding_windows
    first = ca_sr(q, maps, gen, shortlist_scores=np.arange(7)[::-1] * 1.0)
    s1, b1 = _casr_by_hand(q, maps, lambda X: gen(X.shape[1], X.shape[2]))
    np.testing.assert_allclose(first.scores, s1, atol=1e-6)
    for top in (0, 1, 3):
        qe = ca_sr_qe(q, maps, first, top, gen, shortlist_scores=np.arange(7)[::-1] * 1.0)
        o1 = _order(s1)
        raw = [q.astype(np.float64)] + [_box_max(maps[i], b1[i]) for i in o1[:top]]
        q2 = sum(raw) / len(raw)
        s2, _ = _casr_by_hand(q2, maps, lambda X: gen(X.shape[1], X.shape[2]))
        np.testing.assert_allclose(qe.scores, s2, atol=1e-6)
        assert list(qe.order) == _order(s2)
    with pytest.raises(ValueError, match="maps for a re-ranked short list"):
        ca_sr_qe(q, maps[:3], first, 2, gen)


def test_cs_sr_qe_equals_a_transcription_over_the_detector_proposals():
    from instance_search.nets.detector import Detector
    from instance_search.nets.rpn import RPN
    from instance_search.ops.boxes import boxes_to_cells
    from instance_search.rerank.cs_sr import cs_sr, cs_sr_qe

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    det = Detector(RPN(in_channels=16, mid_channels=8), 2, ["a", "b"], pool=2, hidden=16).eval()
    maps = [torch.from_numpy((np.abs(rng.normal(size=(16, 7, 9))) + 0.01).astype(np.float32)) for _ in range(5)]
    q = maps[0].amax(dim=(1, 2)).numpy()
    first = cs_sr(det, 1, maps[1:], proposals=20)
    qe = cs_sr_qe(det, q, maps[1:], first, 2, proposals=20)
    top = list(first.order[:2])
    raw = [q.astype(np.float64)] + [_box_max(maps[1:][i].numpy(), first.boxes[i]) for i in top]
    q2 = sum(raw) / len(raw)

    def proposals(X):
        with torch.no_grad():
            p = det.rpn.propose(torch.from_numpy(X), 20)[0].numpy()
        return list(boxes_to_cells(p.astype(np.float64), 16, X.shape[1], X.shape[2]))

    s2, b2 = _casr_by_hand(q2, [m.numpy() for m in maps[1:]], proposals)
    np.testing.assert_allclose(qe.scores, s2, atol=1e-6)
    np.testing.assert_array_equal(qe.boxes, np.array(b2))


@pytest.mark.slow
def test_collection_search_casr_qe_is_the_authors_qe(ukbench, tmp_path):
    """Collection.search(rerank="casr", qe=3) and the CLI: first stage, CA-SR over sliding windows, then the mean of
    the raw query box vector and the raw re-cropped boxes of the top 3, CA-SR of the short list again -- each
    step transcribed on the index's stored maps; the earlier path (average QE of the global vectors, FAISS again)
    is what qe_kind="alpha"-style global expansions still do, and gives other scores."""
    from typer.testing import CliRunner

    from instance_search.cli.main import app
    from instance_search.collection import Collection
    from instance_search.recipes.base import Recipe

    root = tmp_path / "ix"
    col = Collection.create(root, Recipe("mac", backbone="vgg16", max_size=160), whitening="none")
    col.add_folder([ukbench / f"ukbench{i:05d}.jpg" for i in range(8)], progress=False)
    col = Collection.open(root)
    query, box = ukbench / "ukbench00001.jpg", (40, 30, 600, 450)
    first = col.search(query, box=box, top=8)
    hits = col.search(query, box=box, top=8, rerank="casr", shortlist=6, qe=3)
    # transcription
    _, _, qmap = col.describe(query, box=box)
    qmap = np.asarray(qmap, np.float64)
    q = qmap.max(axis=(1, 2))
    ids = [h.id for h in first[:6]]
    maps = [np.asarray(m, np.float64) for m in col.store.feature_maps(ids, sparse=False)]
    boxes_of = lambda X: list(sliding_windows(X.shape[1], X.shape[2]))  # noqa: E731
    s1, b1 = _casr_by_hand(q, maps, boxes_of)
    o1 = _order(s1)
    q2 = (q + sum(_box_max(maps[i], b1[i]) for i in o1[:3])) / 4
    s2, _ = _casr_by_hand(q2, maps, boxes_of)
    o2 = _order(s2)
    assert [h.id for h in hits[:6]] == [ids[i] for i in o2]
    np.testing.assert_allclose([h.score for h in hits[:6]], [s2[i] for i in o2], atol=1e-5)
    assert all(h.box is not None for h in hits[:6]) and [h.id for h in hits[6:]] == [h.id for h in first[6:]]
    plain = col.search(query, box=box, top=8, rerank="casr", shortlist=6)
    assert max(abs(a.score - b) for a, b in zip(hits, sorted(s2, reverse=True))) < 1e-5
    assert not np.allclose(sorted(h.score for h in plain[:6]), sorted(s2), atol=1e-4)  # QE changed the scores
    # the earlier path stays reachable by name: average QE of the global vectors, the index searched again
    glob = col.search(query, box=box, top=8, rerank="casr", shortlist=6, qe=3, qe_options={"space": "global"})
    X = col.vectors()[[[r["id"] for r in col.records()].index(h.id) for h in plain[:3]]]
    vec, _, _ = col.describe(query, box=box)
    q3 = vec + X.sum(0)
    expect = col.search_vector((q3 / np.linalg.norm(q3)).astype(np.float32), top=8)
    assert [h.id for h in glob] == [h.id for h in expect] and all(h.box is None for h in glob)
    with pytest.raises(ValueError, match="space"):
        col.search(query, box=box, top=8, rerank="casr", qe=3, qe_options={"space": "elsewhere"})
    res = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--box", "40,30,600,450", "--top", "8",
                                   "--rerank", "casr", "--shortlist", "6", "--qe", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    got = out["hits"] if isinstance(out, dict) else out
    assert [h["id"] for h in got] == [h.id for h in hits]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in hits], atol=1e-5)
    # the re-ranking and expansion options from the command line: the earlier global-vector QE by name
    res = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--box", "40,30,600,450", "--top", "8",
                                   "--rerank", "casr", "--shortlist", "6", "--qe", "3", "--json",
                                   "--rerank-option", "vectors=max", "--qe-option", "space=global"])
    assert res.exit_code == 0, res.output
    assert [h["id"] for h in json.loads(res.output)["hits"]] == [h.id for h in glob]
    for flag, bad, why in (("--rerank-option", "vectors=nope", "vectors must be one of"),
                           ("--rerank-option", "colour=1", "unknown option(s) 'colour'"),
                           ("--qe-option", "space", "expected KEY=VALUE"),
                           ("--rerank-option", "vectors=max-whitened", "need the index's PCA-whitening")):
        res = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--rerank", "casr",
                                       "--shortlist", "6", flag, bad])
        assert res.exit_code != 0 and why in res.output, (bad, res.output)
    # the first stage with a box: the whole image (Salvador et al.) or the crop (revisited), from the CLI too
    whole = col.search(query, box=box, top=8, first_stage="image")
    crop = col.search(query, box=box, top=8, first_stage="box")
    assert [(h.id, round(h.score, 5)) for h in whole] != [(h.id, round(h.score, 5)) for h in crop]
    for stage, expect in (("image", whole), ("box", crop)):
        res = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--box", "40,30,600,450",
                                       "--top", "8", "--json", "--first-stage", stage])
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)["hits"]
        assert [h["id"] for h in got] == [h.id for h in expect]
        np.testing.assert_allclose([h["score"] for h in got], [h.score for h in expect], atol=1e-5)
    res = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--box", "40,30,600,450",
                                   "--first-stage", "middle"])
    assert res.exit_code != 0 and "first_stage must be one of box, image" in res.output, res.output
