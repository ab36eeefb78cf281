"""The re-ranker and query-expansion registries (rerank/base.py) and the search pipeline (search.py): every name
reachable from Collection.search, `isearch search` and the HTTP API on a tiny real index; unknown names and
options refused naming the choices; α-QE and DBA against direct transcriptions of their formulas; aml / casr /
aml-fast / average QE giving the hits recorded before the refactor (before_hits.json)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from record_before_hits import AML_FAST, BOX, CASES, INDEXED, OUT, PHOTOS, QUERY, hits_json, run_cases
from instance_search.rerank import base as RB


# ------------------------------------------------------------------------------------------------ registries
def test_registries_hold_the_papers_names():
    assert RB.reranker_names() == ["none", "aml", "aml-fast", "aml-c2f", "casr", "cs-sr"]
    assert RB.expansion_names() == ["avg", "alpha", "dba"]
    assert RB.make_reranker(None).identity and not RB.make_reranker("aml").identity


def test_unknown_names_and_options_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match="unknown re-ranking 'magic'.*none, aml, aml-fast, aml-c2f, casr, cs-sr"):
        RB.make_reranker("magic")
    with pytest.raises(ValueError, match="unknown query expansion 'median'.*avg, alpha, dba"):
        RB.make_expansion("median")
    with pytest.raises(ValueError, match=r"'aml-fast': unknown option\(s\) 'k'.*K, g, pooling, score, step"):
        RB.make_reranker("aml-fast", k=3)
    with pytest.raises(ValueError, match=r"'aml': unknown option\(s\) 'detector' \(accepted: none\)"):
        RB.make_reranker("aml", detector="x.pt")
    with pytest.raises(ValueError, match=r"'avg': unknown option\(s\) 'alpha'"):
        RB.make_expansion("avg", alpha=3)
    with pytest.raises(ValueError, match="cs-sr.*needs a fine-tuned detector.*detector"):
        RB.make_reranker("cs-sr")
    assert RB.make_expansion("alpha").opts == {"alpha": 3.0}
    assert RB.make_reranker("aml-fast", K=64).opts["K"] == 64


# ------------------------------------------------------------------------------------------------ formulas
def _unit(rng, n, d):
    X = rng.normal(size=(n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_alpha_qe_is_radenovic_formula():
    """α-QE (Radenović et al. 2018): q' = L2(q + Σ_j max(qᵀx_j, 0)^α x_j), written out as a loop."""
    rng = np.random.default_rng(1)
    q, X = _unit(rng, 1, 6)[0], _unit(rng, 4, 6)
    X[3] = -q  # a negative cosine gets weight 0
    for alpha in (3.0, 1.0, 0.0):
        ref = q.copy()
        for x in X:
            ref = ref + max(float(q @ x), 0.0) ** alpha * x
        ref = ref / np.linalg.norm(ref)
        got = RB.make_expansion("alpha", alpha=alpha).expand(q, X)
        np.testing.assert_allclose(got, ref, atol=1e-12)
    # average QE: the plain sum
    ref = q + X.sum(0)
    np.testing.assert_allclose(RB.make_expansion("avg").expand(q, X), ref / np.linalg.norm(ref), atol=1e-12)


def test_dba_is_arandjelovic_formula():
    """DBA: x_i <- L2(Σ_{j ∈ kNN(x_i), x_i included} max(x_iᵀx_j, 0)^α x_j), the k-NN by brute force."""
    rng = np.random.default_rng(2)
    X = _unit(rng, 7, 5)
    k, alpha = 3, 3.0
    ref = np.empty_like(X)
    for i in range(len(X)):
        sims = [(float(X[i] @ X[j]), j) for j in range(len(X)) if j != i]
        nn = [i] + [j for _, j in sorted(sims, reverse=True)[:k - 1]]
        v = sum((1.0 if j == i else max(float(X[i] @ X[j]), 0.0) ** alpha) * X[j] for j in nn)
        ref[i] = v / np.linalg.norm(v)
    nb = np.argsort(-(X @ X.T), axis=1)[:, :k + 1]  # what search.py hands in: FAISS's k+1 best, self first
    got = RB.make_expansion("dba").database(X, nb, k)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert RB.make_expansion("dba").database_side and not RB.make_expansion("dba").query_side
    assert RB.make_expansion("alpha").query_side and not RB.make_expansion("alpha").database_side


# ------------------------------------------------------------------------------------------------ real index
@pytest.fixture(scope="module")
def indexes(ukbench, tmp_path_factory):
    """The index of record_before_hits.py (12 UKBench photos, R-MAC, VGG16, 256 px), unwhitened and with a
    whitening learned on itself (a copy of the same index)."""
    from instance_search.collection import Collection
    from instance_search.recipes.base import Recipe

    base = tmp_path_factory.mktemp("rerank-registry")
    plain = base / "plain"
    # the recording (record_before_hits.py) ran the exact fp32 network: so does this index, and its queries below
    col = Collection.create(plain, Recipe("rmac", backbone="vgg16", max_size=256), whitening="none", engine="exact")
    col.add_folder([ukbench / p for p in PHOTOS], progress=False)
    col.store.close()
    white = base / "white"
    shutil.copytree(plain, white)
    col = Collection.open(white, writable=True)
    col.set_whitening(col.learn_whitening(dim=64))
    col.store.close()
    return {"plain": plain, "whitened": white}


def _detector_file(tmp_path):
    """A small randomly initialised detector (2 classes) written as `isearch finetune` writes one."""
    import torch

    from instance_search.nets.detector import Detector, save_detector
    from instance_search.nets.rpn import RPN

    torch.manual_seed(0)
    det = Detector(RPN(), 2, ["obj-a", "obj-b"], hidden=64)
    return save_detector(det, tmp_path / "det.pt", strategy=1)


@pytest.mark.slow
def test_hits_equal_the_ones_recorded_before_the_registry(indexes, ukbench):
    """aml, aml + QE over windows, casr (+ QE), aml-fast (+ QE), average QE, by file and by id, plain and
    whitened: the same images in the same order with the same scores and boxes as before rerank/base.py."""
    from instance_search.collection import Collection

    before = json.loads(OUT.read_text())

    def new_api(col, query, box, rid, rerank, qe):
        opts = {"rerank_options": dict(AML_FAST)} if rerank == "aml-fast" else {}
        if rerank == "casr":  # the recording's CA-SR is the authors' max (L2 only), its QE in the region space
            opts = {"rerank_options": {"vectors": "max"}, "qe_options": {"space": "regions"}}
        col.aml_fast_options = {}
        return (col.search(query, box=box, top=12, rerank=rerank, shortlist=8, qe=qe, qe_kind="avg", **opts),
                col.search_indexed(rid, top=12, rerank=rerank, shortlist=8, qe=qe, **opts))

    for name, root in indexes.items():
        got = run_cases(Collection.open(root, engine="exact"), ukbench, new_api)
        assert set(got) == set(before[name]) and len(got) == 2 * len(CASES)
        for case, hits in before[name].items():
            if name == "whitened" and case.startswith("casr/"):
                continue  # recorded with the index's whitening on the windows: that variant measured worse, is gone
            if case.startswith("casr/qe3/"):
                continue  # recorded with average QE of the global vectors; now Salvador's QE in the region space
                # (issue 17), checked against a transcription in tests/rerank/test_expansion_salvador.py
            g = got[case]
            assert [h[0] for h in g] == [h[0] for h in hits], (name, case)
            np.testing.assert_allclose([h[1] for h in g], [h[1] for h in hits], atol=2e-5, err_msg=f"{name} {case}")
            for a, b in zip(g, hits):
                assert (a[2] is None) == (b[2] is None), (name, case)
                if a[2] is not None:
                    np.testing.assert_allclose(a[2], b[2], atol=0.11, err_msg=f"{name} {case}")
    # every recorded re-ranking / expansion changed the first stage's scores (a skipped step would show)
    for name, cases in before.items():
        for case, hits in cases.items():
            base = {h[0]: h[1] for h in cases["none/qe0/" + case.rsplit("/", 1)[1]]}
            if not case.startswith("none/qe0/"):
                assert max(abs(h[1] - base[h[0]]) for h in hits) > 1e-2, (name, case)
    assert before["plain"]["aml/qe0/file"][0][2] is not None


def _expected_alpha(col, vec, qe):
    hits = col.search_vector(vec, top=qe)
    X = col.vectors()[[[r["id"] for r in col.records()].index(h.id) for h in hits]]
    w = np.maximum(X @ vec, 0) ** 3
    q2 = vec + (w[:, None] * X).sum(0)
    return col.search_vector((q2 / np.linalg.norm(q2)).astype(np.float32), top=12)


@pytest.mark.slow
def test_alpha_qe_and_dba_through_collection_search(indexes):
    from instance_search.collection import Collection
    from instance_search.rerank.expansion import dba

    col = Collection.open(indexes["whitened"])
    rec = next(r for r in col.records() if r["path"].endswith(INDEXED))
    ids = [r["id"] for r in col.records()]
    V = col.vectors()
    vec = V[ids.index(rec["id"])]
    # α-QE: the stored vectors of the top 3, weighted by their cosine cubed, then a new search
    got = col.search_indexed(rec["id"], top=12, qe=3, qe_kind="alpha")
    exp = _expected_alpha(col, vec, 3)
    assert [h.id for h in got] == [h.id for h in exp]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in exp], atol=1e-5)
    # DBA with 3 neighbours: the first stage ranks the augmented database (exact k-NN, numpy) by the query
    aug = dba(V, k=3, alpha=3.0)
    got = col.search_indexed(rec["id"], top=12, qe=3, qe_kind="dba")
    order = np.argsort(-(aug @ vec), kind="stable")
    assert [h.id for h in got] == [ids[i] for i in order]
    np.testing.assert_allclose([h.score for h in got], (aug @ vec)[order], atol=1e-5)
    # the augmented index is built once and kept until the index changes
    state = col._search_state.dba
    col.search_indexed(rec["id"], top=12, qe=3, qe_kind="dba")
    assert col._search_state.dba is state
    # bad input
    with pytest.raises(ValueError, match="unknown query expansion 'mean'.*avg, alpha, dba"):
        col.search_indexed(rec["id"], qe=2, qe_kind="mean")
    with pytest.raises(ValueError, match="qe must be 0"):
        col.search_indexed(rec["id"], qe=-1)
    with pytest.raises(ValueError, match="unknown re-ranking 'magic'.*none, aml"):
        col.search_indexed(rec["id"], rerank="magic")


@pytest.mark.slow
def test_cs_sr_with_a_detector_file(indexes, ukbench, tmp_path):
    """cs-sr re-ranks the short list with the detector's class probabilities (scores equal to a direct
    rerank.cs_sr call on the stored maps), gives every re-ranked hit a box inside its image; the query's class is
    the detector's best class in the query box unless given."""
    import torch

    from instance_search.collection import Collection
    from instance_search.nets.detector import class_detections, load_detector
    from instance_search.rerank.cs_sr import cs_sr

    det_file = _detector_file(tmp_path)
    col = Collection.open(indexes["plain"])
    rec = next(r for r in col.records() if r["path"].endswith(INDEXED))
    hits = col.search_indexed(rec["id"], top=12, rerank="cs-sr", shortlist=6, detector=det_file)
    first = col.search_indexed(rec["id"], top=6)
    assert sorted(h.id for h in hits[:6]) == sorted(h.id for h in first)
    assert all(h.box is not None for h in hits[:6]) and all(h.box is None for h in hits[6:])
    recs = {r["id"]: r for r in col.records()}
    for h in hits[:6]:
        x1, y1, x2, y2 = h.box
        assert 0 <= x1 <= x2 <= recs[h.id]["width"] + 1e-6 and 0 <= y1 <= y2 <= recs[h.id]["height"] + 1e-6
    det, _ = load_detector(det_file)
    qmap = torch.from_numpy(col.store.feature_map(rec["id"]).astype(np.float32))
    k = int(np.argmax(class_detections(det, qmap, 300)[0]))
    maps = [torch.from_numpy(m.astype(np.float32)) for m in col.store.feature_maps([h.id for h in first])]
    ref = cs_sr(det, k, maps, shortlist_scores=[h.score for h in first], proposals=300)
    np.testing.assert_allclose([h.score for h in hits[:6]], ref.scores[ref.order], atol=1e-6)
    assert [h.id for h in hits[:6]] == [first[i].id for i in ref.order]
    named = col.search_indexed(rec["id"], top=6, rerank="cs-sr", shortlist=6, detector=det_file,
                               rerank_options={"class": "obj-b"})
    ref_b = cs_sr(det, 1, maps, shortlist_scores=[h.score for h in first], proposals=300)
    np.testing.assert_allclose([h.score for h in named], ref_b.scores[ref_b.order], atol=1e-6)
    with pytest.raises(ValueError, match="class 'obj-z' is not one of the detector's classes.*obj-a, obj-b"):
        col.search_indexed(rec["id"], rerank="cs-sr", detector=det_file, rerank_options={"class": "obj-z"})
    with pytest.raises(FileNotFoundError, match="nothing.pt|nothing.json"):
        col.search_indexed(rec["id"], rerank="cs-sr", detector=tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="unknown option.*'detector'"):
        col.search_indexed(rec["id"], rerank="aml", detector=det_file)


@pytest.mark.slow
@pytest.mark.parametrize("rerank", ["none", "aml", "aml-fast", "aml-c2f", "casr", "cs-sr"])
def test_every_name_from_python_cli_and_http(indexes, ukbench, tmp_path, rerank):
    """Each re-ranking, with each expansion, from Collection.search, `isearch search` and POST /api/search:
    the same hits from the three."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from instance_search.cli import app
    from instance_search.collection import Collection
    from instance_search.server import create_app

    root = tmp_path / "ix"
    shutil.copytree(indexes["plain"], root)
    det = None
    if rerank == "cs-sr":
        (root / "detectors").mkdir()
        det = _detector_file(root / "detectors")
    fast = ["--fast-k", "64", "--fast-g", "2", "--fast-step", "1"] if rerank == "aml-fast" else []
    query = ukbench / QUERY
    client = TestClient(create_app(root))
    for kind in RB.expansion_names():
        col = Collection.open(root)
        opts = {"rerank_options": dict(AML_FAST)} if rerank == "aml-fast" else {}
        py = col.search(query, top=6, rerank=rerank, shortlist=5, qe=2, qe_kind=kind, detector=det, **opts)
        args = ["search", str(query), "--index", str(root), "--top", "6", "--rerank", rerank, "--shortlist", "5",
                "--qe", "2", "--qe-kind", kind, "--json", *fast] + (["--detector", str(det)] if det else [])
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        cli = json.loads(res.stdout)["hits"]
        assert [h["id"] for h in cli] == [h.id for h in py], (rerank, kind)
        np.testing.assert_allclose([h["score"] for h in cli], [h.score for h in py], atol=1e-5)
        if rerank == "aml-fast":
            continue  # the HTTP API has no per-request aml-fast options (the server's collection defaults)
        options = {"rerank": rerank, "shortlist": 5, "qe": 2, "qe_kind": kind}
        if det:
            options["detector"] = det.name  # a detector file inside <index>/detectors/
        with open(query, "rb") as f:
            r = client.post("/api/search", files={"image": ("q.jpg", f, "image/jpeg")},
                            data={"top": "6", "options": json.dumps(options)})
        assert r.status_code == 200, r.text
        api = r.json()["hits"]
        assert [h["id"] for h in api] == [h.id for h in py], (rerank, kind)
        assert [h["box"] is None for h in api] == [h.box is None for h in py]
    bad = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--rerank", "magic"])
    assert bad.exit_code != 0 and "none, aml, aml-fast, aml-c2f, casr, cs-sr" in bad.output
    bad = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--qe", "2", "--qe-kind", "x"])
    assert bad.exit_code != 0 and "avg, alpha, dba" in bad.output
    r = client.post("/api/search", data={"query_id": "1", "options": json.dumps({"rerank": "magic"})})
    assert r.status_code == 422 and "none, aml, aml-fast, aml-c2f, casr, cs-sr" in r.text
    r = client.post("/api/search", data={"query_id": "1", "options": json.dumps({"qe": 2, "qe_kind": "x"})})
    assert r.status_code == 422 and "avg, alpha, dba" in r.text
    if det:
        for name in ("../det.pt", "/etc/passwd", "nothing.pt"):
            r = client.post("/api/search", data={"query_id": "1", "options": json.dumps(
                {"rerank": "cs-sr", "detector": name})})
            assert r.status_code == 422 and "detector" in r.text, (name, r.text)


@pytest.mark.slow
def test_qe_space_auto_follows_the_index(indexes, ukbench):
    """``casr`` + ``--qe`` with no options: on the whitened R-MAC index QE averages the global vectors, on the
    unwhitened one in the region space (Salvador et al.) -- the same hits as those spaces named; the casr
    vectors are the authors' max on both."""
    from instance_search.collection import Collection

    query, box = ukbench / "ukbench00001.jpg", (40, 30, 600, 450)
    for name, space in (("whitened", "global"), ("plain", "regions")):
        col = Collection.open(indexes[name], engine="exact")
        auto = col.search(query, box=box, top=10, rerank="casr", shortlist=8, qe=3)
        named = col.search(query, box=box, top=10, rerank="casr", shortlist=8, qe=3,
                           rerank_options={"vectors": "max"}, qe_options={"space": space})
        assert [(h.id, h.score, h.box) for h in auto] == [(h.id, h.score, h.box) for h in named], name
    col = Collection.open(indexes["whitened"], engine="exact")
    a = col.search(query, box=box, top=10, rerank="casr", shortlist=8, qe=3)
    b = col.search(query, box=box, top=10, rerank="casr", shortlist=8, qe=3, qe_options={"space": "regions"})
    assert [(h.id, round(h.score, 6)) for h in a] != [(h.id, round(h.score, 6)) for h in b]  # the choice matters
