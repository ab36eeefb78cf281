"""eval/rerank_eval.py: a benchmark's figures through Collection.search (re-ranking and query expansion), on a
12-image UKBench subset: no re-ranking gives evaluate_recipe's figures; with aml + α-QE the N-S score equals the
one counted by hand from the hits of Collection.search_indexed, and `isearch eval --rerank --qe` prints it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from record_before_hits import PHOTOS


@pytest.mark.slow
def test_evaluate_search_matches_the_runner_and_the_hits(ukbench, tmp_path):
    from instance_search.collection import Collection
    from instance_search.eval.datasets.benchmarks import load_ukbench
    from instance_search.eval.rerank_eval import evaluate_search
    from instance_search.eval.runner import evaluate_recipe
    from instance_search.recipes.base import Recipe

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in PHOTOS:
        shutil.copy(ukbench / p, photos / p)
    bench = load_ukbench(photos)
    recipe = Recipe("rmac", backbone="vgg16", max_size=256)
    ix = tmp_path / "ix"
    plain = evaluate_search(bench, recipe, index_dir=ix, progress=False)
    ref = evaluate_recipe(bench, recipe, progress=False)
    assert plain["ns"] == pytest.approx(ref["ns"], abs=1e-6) and plain["map"] == pytest.approx(ref["map"], abs=1e-6)
    res = evaluate_search(bench, recipe, index_dir=ix, rerank="aml", shortlist=6, qe=2, qe_kind="alpha",
                          progress=False)
    col = Collection.open(ix)
    group = {r["id"]: int(r["path"][-9:-4]) // 4 for r in col.records()}
    ns = np.mean([sum(group[h.id] == group[r["id"]] for h in
                      col.search_indexed(r["id"], top=12, rerank="aml", shortlist=6, qe=2, qe_kind="alpha")[:4])
                  for r in col.records()])
    assert res["ns"] == pytest.approx(ns, abs=1e-9)
    assert res["rerank"] == "aml" and res["qe_kind"] == "alpha" and res["queries"] == 12
    # `isearch eval --rerank --qe` gives the same figures
    from typer.testing import CliRunner

    from instance_search.cli import app

    out = CliRunner().invoke(app, ["eval", "ukbench", "--images", str(photos), "--recipe", "rmac", "--max-size", "256",
                                   "--rerank", "aml", "--shortlist", "6", "--qe", "2", "--qe-kind", "alpha", "-q"])
    assert out.exit_code == 0, out.output
    cli = json.loads(out.stdout)
    assert cli["ns"] == pytest.approx(res["ns"], abs=1e-9) and cli["map"] == pytest.approx(res["map"], abs=1e-9)
    assert cli["rerank"] == "aml" and cli["qe"] == 2
    with pytest.raises(ValueError, match="unknown re-ranking 'x'"):
        evaluate_search(bench, recipe, index_dir=ix, rerank="x", progress=False)
