"""End-to-end: index real UKBench photos, search, update, remove, bad files, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from instance_search.cli.main import app
from instance_search.collection import Collection
from instance_search.images import BoxError
from instance_search.index.store import CorruptIndexError
from instance_search.recipes.base import Recipe
from instance_search.fitted.whitening import PCAWhitening

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

N_OBJECTS = 3


@pytest.fixture(scope="module")
def photos(ukbench, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i in range(4 * N_OBJECTS):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", d / f"ukbench{i:05d}.jpg")
    return d


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ix") / "index"
    col = Collection.create(root, Recipe("rmac", backbone="vgg16", max_size=256), whitening="self")
    report = col.add_folder(photos, batch=5, progress=False)
    assert len(report.added) == 4 * N_OBJECTS and not report.failed
    assert "not whitened" in report.whitening  # 12 images are too few to learn it on themselves
    return root


def test_search_finds_other_views(built, photos):
    col = Collection.open(built)
    assert len(col) == 4 * N_OBJECTS
    assert col.stats()["whitening"] is None
    for obj in range(N_OBJECTS):
        hits = col.search(photos / f"ukbench{4 * obj:05d}.jpg", top=4)
        assert hits[0].path.endswith(f"ukbench{4 * obj:05d}.jpg") and hits[0].score > 0.99
        same = sum(int(Path(h.path).stem[-5:]) // 4 == obj for h in hits)
        assert same >= 3, [h.path for h in hits]
    # stored vectors equal a fresh description of the same file
    vec, _, _ = col.describe(photos / "ukbench00005.jpg")
    i = [Path(r["path"]).name for r in col.records()].index("ukbench00005.jpg")
    assert float(col.vectors()[i] @ vec) > 0.999


def test_approximate_faiss_index_agrees(self_whitened, data_dir):
    exact = Collection.open(self_whitened)
    hnsw = Collection.open(self_whitened, faiss_kind="hnsw")
    q = sorted((data_dir / "holidays811" / "jpg").glob("*.jpg"))[10]
    a, b = exact.search(q, top=10), hnsw.search(q, top=10)
    assert [h.id for h in a[:5]] == [h.id for h in b[:5]]
    with pytest.raises(ValueError, match="ivfpq needs"):
        Collection.open(self_whitened, faiss_kind="ivfpq").search(q, top=3)


def test_query_box_and_bad_box(built, photos):
    col = Collection.open(built)
    hits = col.search(photos / "ukbench00004.jpg", box=(100, 60, 540, 420), top=3)
    assert int(Path(hits[0].path).stem[-5:]) // 4 == 1
    with pytest.raises(BoxError):
        col.search(photos / "ukbench00004.jpg", box=(700, 10, 800, 50))


def test_incremental_update_and_remove(built, photos, tmp_path, ukbench):
    root = tmp_path / "copy"
    shutil.copytree(built, root)
    pics = tmp_path / "pics"
    shutil.copytree(photos, pics)
    col = Collection.create(tmp_path / "ix2", Recipe("mac", backbone="vgg16", max_size=128), whitening="none")
    r1 = col.add_folder(pics, progress=False)
    assert len(r1.added) == 4 * N_OBJECTS
    r2 = col.add_folder(pics, progress=False)
    assert r2.added == [] and len(r2.unchanged) == 4 * N_OBJECTS
    # a changed file is re-described, a new one added, a bad one reported by name
    shutil.copy(ukbench / "ukbench00100.jpg", pics / "ukbench00000.jpg")
    shutil.copy(ukbench / "ukbench00101.jpg", pics / "new.jpg")
    (pics / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r3 = col.add_folder(pics, progress=False)
    assert len(r3.updated) == 1 and len(r3.added) == 1
    assert [Path(p).name for p, _ in r3.failed] == ["broken.jpg"] and "broken.jpg" in r3.failed[0][1]
    assert len(col) == 4 * N_OBJECTS + 1
    hits = col.search(ukbench / "ukbench00100.jpg", top=1)
    assert Path(hits[0].path).name == "ukbench00000.jpg"
    assert col.remove_paths([pics / "new.jpg"]) == 1
    again = Collection.open(tmp_path / "ix2")
    assert len(again) == 4 * N_OBJECTS
    with pytest.raises(KeyError):
        again.remove_paths([pics / "nope.jpg"])


def test_cli_roundtrip(built, photos, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["search", str(photos / "ukbench00008.jpg"), "--index", str(built), "--top", "4",
                              "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["hits"]) == 4 and out["hits"][0]["path"].endswith("ukbench00008.jpg")
    res = runner.invoke(app, ["search", str(photos / "ukbench00008.jpg"), "--index", str(built), "--box", "1,2,3"])
    assert res.exit_code == 2 and "box" in res.output
    res = runner.invoke(app, ["search", str(photos / "ukbench00008.jpg"), "--index", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no index" in res.output
    res = runner.invoke(app, ["info", "--index", str(built)])
    assert res.exit_code == 0 and json.loads(res.stdout)["images"] == 4 * N_OBJECTS
    wfile = tmp_path / "w.npz"
    res = runner.invoke(app, ["whitening", "learn", "--index", str(built), "--out", str(wfile), "--dim", "64"])
    assert res.exit_code == 0, res.output
    # partial whitening: eigenvalues to the power -0.25 instead of -0.5; a power outside [0, 0.5] is refused
    half = tmp_path / "w_half.npz"
    res = runner.invoke(app, ["whitening", "learn", "--index", str(built), "--out", str(half), "--dim", "64",
                              "--power", "0.25"])
    assert res.exit_code == 0, res.output
    full_w, half_w = PCAWhitening.load(wfile), PCAWhitening.load(half)
    assert half_w.power == 0.25 and np.allclose(half_w.scale, full_w.eigenvalues ** -0.25)
    assert np.allclose(full_w.scale, full_w.eigenvalues ** -0.5)
    res = runner.invoke(app, ["whitening", "learn", "--index", str(built), "--out", str(tmp_path / "bad.npz"),
                              "--power", "0.7"])
    assert res.exit_code != 0 and "power" in res.output and not (tmp_path / "bad.npz").exists()
    res = runner.invoke(app, ["index", str(photos), "--index", str(tmp_path / "ix3"), "--recipe", "rmac",
                              "--backbone", "vgg16", "--max-size", "256", "--whitening", str(wfile), "--no-maps", "-q"])
    assert res.exit_code == 0, res.output
    col = Collection.open(tmp_path / "ix3")
    assert col.vectors().shape == (4 * N_OBJECTS, 64)
    shown = tmp_path / "ranked.png"
    res = runner.invoke(app, ["search", str(photos / "ukbench00000.jpg"), "--index", str(tmp_path / "ix3"),
                              "--top", "4", "--show", str(shown)])
    assert res.exit_code == 0 and shown.stat().st_size > 10_000
    res = runner.invoke(app, ["index", str(photos), "--index", str(tmp_path / "ix4"), "--recipe", "rmac",
                              "--backbone", "vgg16", "--max-size", "256", "--whitening", "none", "--engine", "exact", "-q"])
    assert res.exit_code == 0, res.output
    exact = Collection.open(tmp_path / "ix4")
    fast = Collection.open(built)  # same photos, same order, no whitening, the default engine (auto)
    assert exact.store.settings["engine"] == "exact" and fast.store.settings["engine"] == "winograd"
    assert np.min(np.sum(fast.vectors() * exact.vectors(), axis=1)) > 0.99999  # the engines' cosine
    res = runner.invoke(app, ["remove", str(photos / "ukbench00000.jpg"), "--index", str(tmp_path / "ix3")])
    assert res.exit_code == 0 and "removed 1" in res.output


@pytest.fixture(scope="module")
def self_whitened(data_dir, tmp_path_factory) -> Path:
    """100 Holidays photos at a small size, with the self-whitening threshold lowered from its default (500
    images) to 100 so that the mechanism is tested quickly."""
    pics = sorted((data_dir / "holidays811" / "jpg").glob("*.jpg"))[:100]
    root = tmp_path_factory.mktemp("selfw") / "index"
    col = Collection.create(root, Recipe("rmac", backbone="vgg16", max_size=96), whitening="self")
    saved = Collection.MIN_SELF_WHITENING_IMAGES
    Collection.MIN_SELF_WHITENING_IMAGES = 100
    try:
        report = col.add_folder(pics, progress=False)
    finally:
        Collection.MIN_SELF_WHITENING_IMAGES = saved
    assert "learned on this collection" in report.whitening
    return root


def test_self_whitening_with_enough_images(self_whitened):
    col = Collection.open(self_whitened)
    info = col.stats()["whitening"]
    assert info["trained_on"].startswith("index") and 256 < info["dim"] <= 512  # rank-limited
    v = col.vectors()
    assert v.shape == (100, info["dim"]) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    # stored vectors are the whitened ones: equal to re-finalising the stored local vectors
    again = col.recipe.finalize(col.store.local_descriptors(), col.whitening)
    assert np.abs(again - v).max() < 1e-4


def test_corrupt_whitening_is_reported(self_whitened, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(self_whitened, root)
    wfile = next(root.glob("whitening-*.npz"))
    wfile.write_bytes(b"garbage")
    with pytest.raises(CorruptIndexError, match=wfile.name):
        Collection.open(root)
