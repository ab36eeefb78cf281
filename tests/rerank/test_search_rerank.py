"""Re-ranking and query expansion through the Collection API and the CLI, on real Paris photos with boxes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from instance_search.cli.main import app
from instance_search.collection import Collection
from instance_search.eval.datasets import load_benchmark
from instance_search.recipes.base import Recipe

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)


@pytest.fixture(scope="module")
def paris_index(tmp_path_factory):
    bench = load_benchmark("rparis6k")
    # a small real database: the positives of one query plus some other landmarks' images
    q = 0
    ok = list(bench.gnd[q]["easy"]) if "easy" in bench.gnd[q] else list(bench.gnd[q]["ok"])
    others = [i for i in range(len(bench.images)) if i not in set(ok) | set(bench.gnd[q].get("junk", []))]
    rng = np.random.default_rng(0)
    chosen = sorted(ok[:6] + list(rng.choice(others, 10, replace=False)))
    root = tmp_path_factory.mktemp("paris") / "ix"
    col = Collection.create(root, Recipe("rmac", backbone="vgg16", max_size=384), whitening="self")
    col.add_folder([bench.images[i] for i in chosen], progress=False)
    positives = {str(Path(bench.images[i]).resolve()) for i in ok[:6]}
    return root, bench.query_paths[q], bench.query_boxes[q], positives


def _ap(hits, positives):
    rel = [h.path in positives for h in hits]
    hitsum, ap = 0, 0.0
    for k, r in enumerate(rel):
        if r:
            hitsum += 1
            ap += hitsum / (k + 1)
    return ap / len(positives)


def test_rerank_aml_gives_boxes_inside_images(paris_index):
    root, qpath, qbox, positives = paris_index
    col = Collection.open(root)
    base = col.search(qpath, box=qbox, top=16)
    aml = col.search(qpath, box=qbox, top=16, rerank="aml", shortlist=16)
    assert sorted(h.id for h in aml) == sorted(h.id for h in base)
    recs = {r["id"]: r for r in col.records()}
    for h in aml:
        x1, y1, x2, y2 = h.box
        assert 0 <= x1 < x2 <= recs[h.id]["width"] + 1e-6 and 0 <= y1 < y2 <= recs[h.id]["height"] + 1e-6
    # re-ranking by the localised region should not destroy the ranking of a landmark query
    assert _ap(aml, positives) >= 0.6
    casr = col.search(qpath, box=qbox, top=16, rerank="casr", shortlist=8)
    assert all(h.box is not None for h in casr[:8]) and all(h.box is None for h in casr[8:])
    qe = col.search(qpath, box=qbox, top=16, rerank="aml", shortlist=16, qe=3)
    assert len(qe) == 16 and _ap(qe, positives) >= 0.6


def test_rerank_needs_maps(paris_index, tmp_path, ukbench):
    col = Collection.create(tmp_path / "nomaps", Recipe("mac", backbone="vgg16", max_size=128), whitening="none",
                            store_maps=False)
    col.add_folder([ukbench / "ukbench00000.jpg", ukbench / "ukbench00001.jpg"], progress=False)
    with pytest.raises(Exception, match="without conv maps"):
        col.search(ukbench / "ukbench00000.jpg", top=2, rerank="aml")
    with pytest.raises(ValueError, match="re-ranking"):
        col.search(ukbench / "ukbench00000.jpg", top=2, rerank="magic")
    # a short list longer than the collection is the whole collection
    hits = Collection.open(paris_index[0]).search(ukbench / "ukbench00000.jpg", top=100, rerank="aml",
                                                  shortlist=5000)
    assert len(hits) == 16


def test_cli_rerank_json(paris_index, tmp_path):
    root, qpath, qbox, _ = paris_index
    box = ",".join(str(v) for v in (qbox.as_tuple() if hasattr(qbox, "as_tuple") else qbox))
    res = CliRunner().invoke(app, ["search", str(qpath), "--index", str(root), "--box", box, "--top", "5",
                                   "--rerank", "aml", "--json", "--show", str(tmp_path / "g.png")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert all(h["box"] is not None and len(h["box"]) == 4 for h in out["hits"])
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_search_indexed_and_qe_over_windows(paris_index):
    """'More like this' from a stored image (no network pass) equals searching with the image file; QE after
    AML re-scores the short list with the query averaged with the localised windows' R-MACs."""
    root, qpath, qbox, positives = paris_index
    col = Collection.open(root)
    rec = next(r for r in col.records() if r["path"] in positives)
    by_id = col.search_indexed(rec["id"], top=16)
    by_file = col.search(rec["path"], top=16)
    assert [h.id for h in by_id] == [h.id for h in by_file]
    np.testing.assert_allclose([h.score for h in by_id], [h.score for h in by_file], atol=1e-4)
    assert by_id[0].id == rec["id"] and by_id[0].score == pytest.approx(1.0, abs=1e-4)
    aml = col.search_indexed(rec["id"], top=16, rerank="aml", shortlist=16)
    qe = col.search_indexed(rec["id"], top=16, rerank="aml", shortlist=16, qe=3)
    assert sorted(h.id for h in qe) == sorted(h.id for h in aml) and all(h.box is not None for h in qe)
    # reference for the QE scores: q2 = L2(q + sum of the top-3 window vectors), score = window vector . q2
    vec = col.vectors()[[r["id"] for r in col.records()].index(rec["id"])]
    first, wv = col._rerank(col.search_vector(vec, 16), col.store.feature_map(rec["id"]), "aml", 16, vec)
    q2 = vec + sum(wv[h.id] for h in first[:3])
    q2 = q2 / np.linalg.norm(q2)
    expect = sorted(((float(wv[h.id] @ q2), h.id) for h in first), key=lambda t: -t[0])
    np.testing.assert_allclose([h.score for h in qe], [e[0] for e in expect], atol=1e-5)
    assert qe[0].score <= 1.0 + 1e-6 and [h.rank for h in qe] == list(range(1, 17))
    assert _ap(qe, positives) >= 0.6
    # aml-c2f cascade (fine_top): the images it did not re-score have no window vector; QE over the windows when
    # the top qe were all re-scored, else with the stored global vectors of the top qe (no error, no NaN)
    c2f = col.search_indexed(rec["id"], top=16, rerank="aml-c2f", shortlist=16, rerank_options={"fine_top": 5})
    assert len(c2f) == 16 and all(h.box is not None for h in c2f) and all(np.isfinite(h.score) for h in c2f)
    from instance_search import search as S
    from instance_search.rerank.base import make_reranker

    first5, wv5 = S.rerank_hits(col, col.search_vector(vec, 16), col.store.feature_map(rec["id"]),
                                make_reranker("aml-c2f", fine_top=5), 16, vec)
    assert [h.id for h in first5] == [h.id for h in c2f] and len(wv5) == 5
    assert set(wv5) == {h.id for h in first5[:5]}
    qe3 = col.search_indexed(rec["id"], top=16, rerank="aml-c2f", shortlist=16, qe=3, rerank_options={"fine_top": 5})
    q3 = vec + sum(wv5[h.id] for h in first5[:3])
    q3 = q3 / np.linalg.norm(q3)
    want3 = sorted(((float(wv5[h.id] @ q3), h.id) for h in first5[:5]), key=lambda t: -t[0])
    assert [h.id for h in qe3] == [i for _, i in want3] + [h.id for h in first5[5:]]
    np.testing.assert_allclose([h.score for h in qe3[:5]], [v for v, _ in want3], atol=1e-5)
    qe7 = col.search_indexed(rec["id"], top=16, rerank="aml-c2f", shortlist=16, qe=7, rerank_options={"fine_top": 5})
    q7 = vec + col.vectors_of([h.id for h in c2f[:7]]).sum(0)
    want7 = col.search_vector((q7 / np.linalg.norm(q7)).astype(np.float32), 16)
    assert [h.id for h in qe7] == [h.id for h in want7]
    np.testing.assert_allclose([h.score for h in qe7], [h.score for h in want7], atol=1e-5)
    with pytest.raises(KeyError, match="not in the index"):
        col.search_indexed(10_000)
