"""`isearch check` / `isearch repair` (issue 13) on indexes built by the store, damaged on purpose."""
from __future__ import annotations

import pytest

import json

import numpy as np
from typer.testing import CliRunner

from instance_search.cli import app
from instance_search.index.store import Entry, IndexStore


def _index(root, n=6):
    rng = np.random.default_rng(0)
    store = IndexStore.create(root, {"recipe": {"name": "rmac"}})
    for a in range(0, n, 3):
        store.add([Entry(path=f"/p/{i}\nfake summary.jpg", width=4, height=4, sha256="0", mtime=0.0, size=1,
                         local=rng.random((2, 8)).astype(np.float32), vector=rng.random(8).astype(np.float32),
                         fmap=rng.random((3, 2, 2)).astype(np.float32)) for i in range(a, a + 3)])
    store.close()
    return store


def test_check_then_repair(tmp_path):
    root = tmp_path / "ix"
    _index(root)
    runner = CliRunner()
    ok = runner.invoke(app, ["check", "--index", str(root)])
    assert ok.exit_code == 0 and "ok, 6 images" in ok.output
    seg = sorted((root / "segments").glob("*.npz"))[0]
    seg.write_bytes(seg.read_bytes()[:100])
    bad = runner.invoke(app, ["check", "--index", str(root), "--json"])
    assert bad.exit_code == 1
    rep = json.loads(bad.output)
    assert not rep["ok"] and any(seg.name in p for p in rep["problems"])
    fixed = runner.invoke(app, ["repair", "--index", str(root)])
    assert fixed.exit_code == 0, fixed.output
    lines = fixed.output.splitlines()
    dropped = [x for x in lines if x.startswith("dropped (unreadable): ")]
    assert len(dropped) == 3 and all("\\nfake summary.jpg" in x for x in dropped)  # one line each, escaped
    assert not any(x.startswith("fake summary") for x in lines)
    assert lines[-1].endswith("consistent, 3 images")
    assert runner.invoke(app, ["check", "--index", str(root)]).exit_code == 0


def test_check_of_a_missing_index_fails_cleanly(tmp_path):
    res = CliRunner().invoke(app, ["check", "--index", str(tmp_path / "none")])
    assert res.exit_code == 1 and "no such folder" in res.output


@pytest.mark.slow
def test_remove_waits_then_names_the_writer(tmp_path):
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "ix"
    _index(root)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from instance_search.index.store import IndexStore
        with IndexStore.open({str(root)!r}).writing():
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([str(__import__("pathlib").Path(sys.executable).parent / "isearch"), "remove",
                              "/p/0", "--index", str(root), "--wait", "1"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode != 0
        assert f"pid {holder.pid}" in res.stderr and "waiting for the index" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    finally:
        holder.kill()
        holder.wait()


def test_repair_reextract_describes_the_dropped_photos_again(tmp_path, ukbench):
    """A real index (VGG16 R-MAC, 128 px) loses a segment; `repair --reextract` runs the network again on its
    photos: every image is back, the vectors equal the originals, check passes."""
    import shutil

    from instance_search.collection import Collection
    from instance_search.recipes.base import Recipe

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", photos / f"ukbench{i:05d}.jpg")
    root = tmp_path / "ix"
    col = Collection.create(root, Recipe("rmac", backbone="vgg16", max_size=128), whitening="none")
    col.add_folder(photos, batch=2, progress=False)
    before = {r["path"]: v for r, v in zip(col.store.records(), col.store.vectors())}
    seg = root / "segments" / col.store._segments[col.store.manifest["segments"][0]].npz_file
    seg.write_bytes(seg.read_bytes()[:50])
    res = CliRunner().invoke(app, ["repair", "--index", str(root), "--reextract"])
    assert res.exit_code == 0, res.output
    assert res.output.count("dropped (unreadable): ") == 2 and "re-extracted: 2 added" in res.output
    store = IndexStore.open(root)
    after = {r["path"]: v for r, v in zip(store.records(), store.vectors())}
    assert set(after) == set(before)
    for p, v in before.items():
        np.testing.assert_allclose(after[p], v, atol=1e-5)


def test_a_bad_whitening_file_leaves_no_index_behind(tmp_path, ukbench):
    bad = tmp_path / "w.npz"
    bad.write_bytes(b"not a whitening")
    for w in (bad, tmp_path / "missing.npz"):
        root = tmp_path / f"ix-{w.name}"
        res = CliRunner().invoke(app, ["index", str(ukbench / "ukbench00000.jpg"), "--index", str(root),
                                       "--whitening", str(w), "--max-size", "64"])
        assert res.exit_code == 2 and w.name in res.output, res.output
        assert not IndexStore.exists(root)
