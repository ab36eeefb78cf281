from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from instance_search.index.compact import decode_map, encode_map

from instance_search.index.store import (
    CorruptIndexError,
    Entry,
    IndexStore,
)


def _entry(i: int, rng, with_map=True) -> Entry:
    local = rng.random((3, 8)).astype(np.float32)
    fmap = np.maximum(rng.standard_normal((8, 5, 6)).astype(np.float32), 0) if with_map else None
    return Entry(path=f"/photos/{i}.jpg", width=640, height=480, sha256=f"{i:064x}", mtime=1.0 * i, size=100 + i,
                 local=local, vector=local.sum(0) / np.linalg.norm(local.sum(0)), fmap=fmap)


def test_add_reopen_remove(tmp_path):
    rng = np.random.default_rng(0)
    store = IndexStore.create(tmp_path / "ix", {"recipe": {"name": "rmac"}})
    entries = [_entry(i, rng) for i in range(5)]
    ids = store.add(entries[:3])
    ids += store.add(entries[3:])
    assert ids == [0, 1, 2, 3, 4]
    again = IndexStore.open(tmp_path / "ix")
    assert len(again) == 5
    assert [r["path"] for r in again.records()] == [e.path for e in entries]
    np.testing.assert_allclose(again.vectors(), np.stack([e.vector for e in entries]), rtol=1e-6)
    np.testing.assert_allclose(again.local_descriptors()[4], entries[4].local, atol=1e-3)  # stored as fp16
    fmap = again.feature_map(2)
    assert fmap.shape == (8, 5, 6)
    np.testing.assert_array_equal(fmap, decode_map(encode_map(entries[2].fmap)))  # the compact code, read back
    sparse = again.feature_maps([2, 0], sparse=True)  # non-zero cells only, for AML re-ranking
    assert tuple(sparse[0].shape) == (8, 5, 6) and len(sparse[0].value) == int(np.count_nonzero(fmap))
    np.testing.assert_array_equal(sparse[0].dense(), fmap)
    np.testing.assert_array_equal(sparse[1].dense(), again.feature_map(0))
    assert again.remove([1, 3, 99]) == 2
    third = IndexStore.open(tmp_path / "ix", writable=True)
    assert third.ids().tolist() == [0, 2, 4]
    third.compact()
    fourth = IndexStore.open(tmp_path / "ix")
    assert fourth.ids().tolist() == [0, 2, 4] and len(fourth.manifest["segments"]) == 1
    np.testing.assert_allclose(fourth.feature_map(4), third.feature_map(4))
    with pytest.raises(KeyError):
        fourth.feature_map(1)


def test_feature_maps_across_segments_in_any_order(tmp_path):
    """A short list spans segments and comes in score order: every map is the one stored for its id (reference:
    each entry's own compact code, decoded), also after a later add and a removal on the same store object."""
    rng = np.random.default_rng(5)
    store = IndexStore.create(tmp_path / "ix", {})
    entries = [_entry(i, rng) for i in range(9)]
    for a, b in ((0, 4), (4, 5), (5, 9)):
        store.add(entries[a:b])
    want = [7, 0, 4, 8, 2, 5]
    for i, got in zip(want, store.feature_maps(want)):
        np.testing.assert_array_equal(got, decode_map(encode_map(entries[i].fmap)))
    extra = _entry(9, rng)
    assert store.add([extra]) == [9]  # a new segment: the id table is rebuilt
    np.testing.assert_array_equal(store.feature_maps([9, 3])[0], decode_map(encode_map(extra.fmap)))
    store.remove([4])
    for bad in (4, 10, -1):
        with pytest.raises(KeyError, match=f"image id {bad} "):
            store.feature_maps([0, bad])


def test_refresh_vectors_after_new_whitening(tmp_path):
    rng = np.random.default_rng(2)
    store = IndexStore.create(tmp_path / "ix", {})
    store.add([_entry(i, rng) for i in range(4)], tag="none")
    assert store.stale_segments("w1") == store.manifest["segments"]
    n = store.refresh_vectors(lambda local: np.stack([x.mean(0) for x in local]), "w1")
    assert n == 1 and store.stale_segments("w1") == []
    again = IndexStore.open(tmp_path / "ix")
    np.testing.assert_allclose(again.vectors()[1], again.local_descriptors()[1].mean(0), atol=1e-6)


def test_missing_and_corrupt_index(tmp_path):
    with pytest.raises(CorruptIndexError, match="does not exist"):
        IndexStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptIndexError, match="manifest.json: missing"):
        IndexStore.open(tmp_path / "empty")
    rng = np.random.default_rng(3)
    store = IndexStore.create(tmp_path / "ix", {})
    store.add([_entry(i, rng) for i in range(2)])
    seg = next((tmp_path / "ix" / "segments").glob("*.npz"))
    good = seg.read_bytes()
    seg.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptIndexError, match=seg.name):
        IndexStore.open(tmp_path / "ix")
    seg.write_bytes(good)
    (tmp_path / "ix" / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="corrupt manifest"):
        IndexStore.open(tmp_path / "ix")
    with pytest.raises(CorruptIndexError, match="already exists"):
        IndexStore.create(tmp_path / "ix", {})


def test_leftover_files_are_cleaned(tmp_path):
    rng = np.random.default_rng(4)
    store = IndexStore.create(tmp_path / "ix", {})
    store.add([_entry(0, rng)])
    (tmp_path / "ix" / "segments" / "seg-orphan.npz").write_bytes(b"half written")
    (tmp_path / "ix" / "segments" / ".seg-x.npz.123.tmp").write_bytes(b"temp")
    IndexStore.open(tmp_path / "ix", writable=True)
    assert sorted(p.name for p in (tmp_path / "ix" / "segments").iterdir()) == [store.manifest["segments"][0] + ".npz"]


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from instance_search.index.store import Entry, IndexStore
    root = sys.argv[1]
    store = IndexStore.open(root, writable=True) if IndexStore.exists(root) else IndexStore.create(root, {})
    rng = np.random.default_rng(0)
    while True:
        i = store.manifest["next_id"]
        local = rng.random((20, 64)).astype(np.float32)
        fmap = rng.random((64, 30, 40)).astype(np.float32)
        store.add([Entry(path=f"/p/{i}", width=1, height=1, sha256="0", mtime=0.0, size=1, local=local,
                         vector=local[0], fmap=fmap)])
        print(i, flush=True)
""")


def test_kill_minus_9_never_loses_acknowledged_entries(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = tmp_path / "ix"
    acknowledged = -1
    rng = np.random.default_rng(5)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        # wait for at least one acknowledged write, then kill at a random moment
        line = proc.stdout.readline()
        assert line, "writer produced nothing"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=max(1, deadline - time.time()))
        acks = [int(x) for x in (line + out).split()]
        acknowledged = max(acknowledged, max(acks))
        store = IndexStore.open(root)
        ids = store.ids().tolist()
        assert ids == list(range(len(ids))), "ids must be dense, without duplicates"
        assert len(ids) >= acknowledged + 1, "an acknowledged entry was lost"
        for i in (0, len(ids) - 1):
            assert store.feature_map(i).shape == (64, 30, 40)
    assert json.loads((root / "manifest.json").read_text())["format"] == 1


def test_damaged_map_file_is_named(tmp_path):
    rng = np.random.default_rng(3)
    store = IndexStore.create(tmp_path / "ix", {"recipe": {"name": "rmac"}})
    store.add([_entry(i, rng) for i in range(3)])
    cmap = next((tmp_path / "ix" / "maps").glob("*.cmap"))
    data = cmap.read_bytes()
    cmap.write_bytes(data[:-7])
    with pytest.raises(CorruptIndexError, match=cmap.name):
        IndexStore.open(tmp_path / "ix").feature_map(1)
    cmap.write_bytes(data[:10] + b"\xff" * 40 + data[50:])  # same size, garbage inside the first code
    with pytest.raises(CorruptIndexError, match=cmap.name):
        IndexStore.open(tmp_path / "ix").feature_maps([0, 1, 2])
    cmap.unlink()
    with pytest.raises(CorruptIndexError, match=cmap.name):
        IndexStore.open(tmp_path / "ix").feature_map(0)
