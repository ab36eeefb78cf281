from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from instance_search.index.compact import decode_map, encode_map

from instance_search.index.store import (
    CorruptIndexError,
    Entry,
    IndexStore,
    WriterBusyError,
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
    with pytest.raises(CorruptIndexError, match="catalog.sqlite: missing"):
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
    store.close()
    db = tmp_path / "ix" / "catalog.sqlite"
    for f in tmp_path.joinpath("ix").glob("catalog.sqlite-*"):
        f.unlink()
    db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    with pytest.raises(CorruptIndexError, match="catalog.sqlite: corrupt catalogue"):
        IndexStore.open(tmp_path / "ix")
    with pytest.raises(CorruptIndexError, match="already exists"):
        IndexStore.create(tmp_path / "ix", {})


def test_leftover_files_are_cleaned(tmp_path):
    """Files no catalogue row names in segments/ and maps/ (only a dead writer leaves them: they are written under
    the writer lock) and stale temp files go when a writer next takes the lock; the catalogued ones stay."""
    rng = np.random.default_rng(4)
    store = IndexStore.create(tmp_path / "ix", {})
    store.add([_entry(0, rng)])
    (tmp_path / "ix" / "segments" / "seg-orphan.npz").write_bytes(b"half written")
    (tmp_path / "ix" / "segments" / ".seg-x.npz.123.tmp").write_bytes(b"temp")
    (tmp_path / "ix" / "maps" / "seg-orphan.cmap").write_bytes(b"half written")
    (tmp_path / "ix" / ".manifest.json.abc.tmp").write_bytes(b"{}")
    recent = tmp_path / "ix" / ".whitening-staged.npz.x.tmp"  # another process may be writing it right now
    recent.write_bytes(b"x")
    IndexStore.open(tmp_path / "ix", writable=True)
    name = store.manifest["segments"][0]
    assert sorted(p.name for p in (tmp_path / "ix" / "segments").iterdir()) == [name + ".npz"]
    assert sorted(p.name for p in (tmp_path / "ix" / "maps").iterdir()) == [name + ".cmap"]
    assert not (tmp_path / "ix" / ".manifest.json.abc.tmp").exists() and recent.exists()
    old = time.time() - 2 * 3600
    os.utime(recent, (old, old))
    IndexStore.open(tmp_path / "ix", writable=True)
    assert not recent.exists()


def test_update_settings_and_stored_files(tmp_path):
    store = IndexStore.create(tmp_path / "ix", {"recipe": {"name": "rmac"}, "a": 1})
    other = IndexStore.open(tmp_path / "ix")
    assert store.update_settings({"a": 2, "b": [1, 2]}) == {"recipe": {"name": "rmac"}, "a": 2, "b": [1, 2]}
    other.update_settings({"c": "x"})  # merges into the newest version, not into its own stale copy
    assert IndexStore.open(tmp_path / "ix").settings == {"recipe": {"name": "rmac"}, "a": 2, "b": [1, 2], "c": "x"}
    data = bytes(range(256)) * 3
    sha = store.add_file("pca/whitening.npz", data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.add_file("pca/whitening.npz", data) == sha  # the same bytes again: a no-op
    with pytest.raises(ValueError, match="immutable"):
        store.add_file("pca/whitening.npz", b"other")
    for bad in ("../x", "/etc/passwd", ".hidden", "a/../b", ""):
        with pytest.raises(ValueError, match="stored file name"):
            store.add_file(bad, b"x")
    assert other.read_file("pca/whitening.npz") == data  # another object sees it (reloads)
    path = tmp_path / "ix" / "fitted" / "pca" / "whitening.npz"
    path.write_bytes(data[:-1] + b"\x00")
    with pytest.raises(CorruptIndexError, match="whitening.npz: checksum mismatch"):
        other.read_file("pca/whitening.npz")
    path.unlink()
    with pytest.raises(CorruptIndexError, match="whitening.npz: missing"):
        other.read_file("pca/whitening.npz")
    with pytest.raises(CorruptIndexError, match="nope.bin: not stored"):
        other.read_file("nope.bin")


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "index_v1"


def test_index_folder_of_the_earlier_format_is_migrated_once(tmp_path, capfd):
    """tests/fixtures/index_v1 was written by the manifest.json store (commit 3e5d53f): 2 segments, id 1 removed.
    It opens (migrated once, with a message), with the same images, vectors and maps as its files hold."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    store = IndexStore.open(root)
    assert "migrated the index" in capfd.readouterr().err
    assert (root / "catalog.sqlite").is_file() and not (root / "manifest.json").exists()
    assert store.ids().tolist() == [0, 2, 3, 4] and store.manifest["next_id"] == 5
    assert store.settings == {"recipe": {"name": "test"}, "store_maps": True, "weights": None}
    ref = {}
    for seg in sorted((FIXTURE / "segments").glob("*.npz")):
        with np.load(seg) as z:
            blob = (FIXTURE / "maps" / (seg.stem + ".cmap")).read_bytes()
            mo = z["map_offsets"]
            for r, i in enumerate(z["ids"]):
                ref[int(i)] = (str(z["paths"][r]), z["vectors"][r], decode_map(blob[mo[r]:mo[r + 1]]))
    assert [r["path"] for r in store.records()] == [ref[i][0] for i in (0, 2, 3, 4)]
    np.testing.assert_array_equal(store.vectors(), np.stack([ref[i][1] for i in (0, 2, 3, 4)]))
    for i in (0, 2, 3, 4):
        np.testing.assert_array_equal(store.feature_map(i), ref[i][2])
    again = IndexStore.open(root, writable=True)
    assert "migrated" not in capfd.readouterr().err
    assert again.add([_entry(9, np.random.default_rng(0))]) == [5]
    assert set(p.name for p in (root / "segments").iterdir()) >= {p.name for p in (FIXTURE / "segments").iterdir()}


def test_bit_flip_inside_a_map_is_detected(tmp_path):
    rng = np.random.default_rng(8)
    store = IndexStore.create(tmp_path / "ix", {})
    store.add([_entry(i, rng) for i in range(3)])
    cmap = next((tmp_path / "ix" / "maps").glob("*.cmap"))
    data = bytearray(cmap.read_bytes())
    seg = store._segments[store.manifest["segments"][0]]
    pos = int(seg.map_offsets[1]) + (int(seg.map_offsets[2]) - int(seg.map_offsets[1])) // 2
    data[pos] ^= 0x04
    cmap.write_bytes(bytes(data))
    fresh = IndexStore.open(tmp_path / "ix")
    fresh.feature_maps([0, 2])  # the others still read
    with pytest.raises(CorruptIndexError, match=f"{cmap.name}: map of /photos/1.jpg is corrupt"):
        fresh.feature_map(1)


@pytest.mark.slow
def test_a_second_writer_waits_then_names_the_holder(tmp_path):
    store = IndexStore.create(tmp_path / "ix", {})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from instance_search.index.store import IndexStore
        s = IndexStore.open({str(tmp_path / 'ix')!r})
        with s.writing():
            print("held", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = IndexStore.open(tmp_path / "ix", wait=1.0)
        t0 = time.monotonic()
        with pytest.raises(WriterBusyError, match=f"pid {holder.pid}"):
            waiter.add([_entry(0, np.random.default_rng(0))])
        assert 0.9 < time.monotonic() - t0 < 10
        assert len(IndexStore.open(tmp_path / "ix")) == 0  # readers never wait
    finally:
        holder.kill()
        holder.wait()
    assert store.add([_entry(0, np.random.default_rng(0))]) == [0]  # the kernel released the dead holder's lock


CONCURRENT = textwrap.dedent("""
    import sys, numpy as np
    from instance_search.index.store import Entry, IndexStore
    root, who, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = IndexStore.open(root, writable=True)
    rng = np.random.default_rng(who)
    for k in range(n):
        local = rng.random((2, 8)).astype(np.float32)
        ids = store.add([Entry(path=f"/w{who}/{k}-{j}", width=1, height=1, sha256="0", mtime=0.0, size=1,
                               local=local, vector=local[0], fmap=local[:, :, None]) for j in range(2)])
        print(*ids, flush=True)
""")


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(tmp_path):
    """4 processes add into one index at once: every acknowledged image is there exactly once, ids unique
    (the manifest store lost about half of them: both writers wrote the same segment names)."""
    script = tmp_path / "w.py"
    script.write_text(CONCURRENT)
    IndexStore.create(tmp_path / "ix", {})
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "ix"), str(w), "6"],
                              stdout=subprocess.PIPE, text=True) for w in range(4)]
    acked = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        acked += [int(x) for x in out.split()]
    store = IndexStore.open(tmp_path / "ix")
    assert sorted(acked) == store.ids().tolist() == list(range(48))
    paths = [r["path"] for r in store.records()]
    assert len(set(paths)) == 48 and {p.split("/")[1] for p in paths} == {"w0", "w1", "w2", "w3"}
    np.testing.assert_array_equal(store.feature_map(47).shape, (2, 8, 1))


def test_reader_sees_one_version_and_picks_up_other_writers(tmp_path):
    rng = np.random.default_rng(6)
    writer = IndexStore.create(tmp_path / "ix", {})
    writer.add([_entry(i, rng) for i in range(3)])
    reader = IndexStore.open(tmp_path / "ix")
    other = IndexStore.open(tmp_path / "ix")
    other.add([_entry(i, rng) for i in range(3, 5)])
    other.remove([0])
    assert reader.ids().tolist() == [0, 1, 2]  # its version until it reloads
    assert reader.reload() and reader.ids().tolist() == [1, 2, 3, 4]
    assert not reader.reload()
    other.compact()  # the files the reader read are replaced; it still reads maps (after one reload)
    assert reader.feature_map(3).shape == (8, 5, 6)
    assert len(reader.manifest["segments"]) == 1


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


@pytest.mark.slow
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
    assert not (root / "manifest.json").exists() and (root / "catalog.sqlite").is_file()


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


def test_sparse_maps_are_cached_between_short_lists(tmp_path, monkeypatch):
    """Decoded sparse maps are kept (LRU, ``map_cache_limit`` bytes): a second short list decodes only the maps
    not seen yet, returns the same cells, and the cached arrays are read-only; with the limit at 0 nothing is
    kept. A bad ``ISEARCH_MAP_CACHE_MB`` is refused by name."""
    import instance_search.index.store as store_mod
    from instance_search.errors import ISearchError

    rng = np.random.default_rng(11)
    store = IndexStore.create(tmp_path / "ix", {})
    entries = [_entry(i, rng) for i in range(6)]
    store.add(entries)
    calls = []
    real = store_mod.decode_sparse
    monkeypatch.setattr(store_mod, "decode_sparse", lambda code: calls.append(1) or real(code))
    first = store.feature_maps([0, 1, 2], sparse=True)
    assert len(calls) == 3
    again = store.feature_maps([2, 3, 0], sparse=True)
    assert len(calls) == 4  # only map 3 decoded
    for i, m in zip([2, 3, 0], again):
        np.testing.assert_array_equal(m.dense(), decode_map(encode_map(entries[i].fmap)))
    assert again[0] is first[2] and not again[0].value.flags.writeable
    with pytest.raises(ValueError):
        again[0].value[0] = 1.0
    one = sum(a.nbytes for a in (first[0].channel, first[0].position, first[0].value))
    store._map_cache.clear(), setattr(store, "_map_cache_bytes", 0)
    store.map_cache_limit = one + 1  # room for about one map: the least recently used goes
    store.feature_maps([0, 1], sparse=True)
    assert len(store._map_cache) <= 1 and store._map_cache_bytes <= store.map_cache_limit
    store.map_cache_limit = 0
    store._map_cache.clear(), setattr(store, "_map_cache_bytes", 0)
    n = len(calls)
    store.feature_maps([4, 5], sparse=True), store.feature_maps([4, 5], sparse=True)
    assert len(calls) == n + 4 and not store._map_cache
    monkeypatch.setenv("ISEARCH_MAP_CACHE_MB", "lots")
    with pytest.raises(ISearchError, match="ISEARCH_MAP_CACHE_MB='lots'"):
        IndexStore.open(tmp_path / "ix")
