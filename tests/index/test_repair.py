"""`check_index` names each kind of damage; `repair_index` brings the index back to a consistent, searchable
state keeping every image that can still be read (issue 13)."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from instance_search.index.compact import decode_map, encode_map
from instance_search.index.repair import check_index, repair_index
from instance_search.index.store import Entry, IndexStore


def _entry(i: int, rng) -> Entry:
    local = rng.random((3, 8)).astype(np.float32)
    v = rng.standard_normal(16).astype(np.float32)
    return Entry(path=f"/photos/{i}.jpg", width=64, height=48, sha256=f"{i:064x}", mtime=float(i), size=100 + i,
                 local=local, vector=v / np.linalg.norm(v),
                 fmap=np.maximum(rng.standard_normal((6, 4, 5)), 0).astype(np.float32))


@pytest.fixture()
def index(tmp_path):
    """3 segments of 4 images (ids 0..11), image 5 removed, one stored file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ix"
    store = IndexStore.create(root, {"recipe": {"name": "rmac"}})
    entries = [_entry(i, rng) for i in range(12)]
    for a in (0, 4, 8):
        store.add(entries[a:a + 4])
    store.remove([5])
    store.add_file("pca.bin", b"fitted state")
    store.close()
    assert check_index(root).ok
    return root, entries


def _searchable(root, entries, want_ids):
    """The repaired index opens, passes check, holds exactly ``want_ids``, finds each image first for itself."""
    rep = check_index(root)
    assert rep.ok, rep.problems
    store = IndexStore.open(root)
    assert store.ids().tolist() == sorted(want_ids)
    v = store.vectors()
    assert (np.argmax(v @ v.T, axis=1) == np.arange(len(v))).all()
    for i, row in zip(store.ids(), v):
        np.testing.assert_array_equal(row, entries[i].vector)
    return store


def _seg(root, k):
    store = IndexStore.open(root)
    name = store.manifest["segments"][k]
    seg = store._segments[name]
    store.close()
    return root / "segments" / seg.npz_file, root / "maps" / seg.map_file


ALL = [i for i in range(12) if i != 5]


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_segment(index, damage):
    root, entries = index
    npz, _ = _seg(root, 1)
    data = npz.read_bytes()
    if damage == "truncate":
        npz.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        npz.unlink()
    else:
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        npz.write_bytes(bytes(b))
    rep = check_index(root)
    assert not rep.ok and any(npz.name in p for p in rep.problems), rep.problems
    fixed = repair_index(root)
    assert sorted(fixed.lost) == [f"/photos/{i}.jpg" for i in (4, 6, 7)]  # the segment's live images, listed
    _searchable(root, entries, [0, 1, 2, 3, 8, 9, 10, 11])
    store = IndexStore.open(root)
    assert store.add([_entry(20, np.random.default_rng(1))]) == [12]  # ids never reused


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_map_file_keeps_every_image(index, damage):
    root, entries = index
    _, cmap = _seg(root, 2)
    data = cmap.read_bytes()
    if damage == "truncate":
        cmap.write_bytes(data[:-5])
    elif damage == "delete":
        cmap.unlink()
    else:
        b = bytearray(data)
        b[len(b) - 3] ^= 0x01  # inside the last image's map only
        cmap.write_bytes(bytes(b))
    rep = check_index(root)
    assert not rep.ok and any(cmap.name in p for p in rep.problems), rep.problems
    fixed = repair_index(root)
    assert fixed.lost == []
    lost = [f"/photos/{i}.jpg" for i in ((8, 9, 10, 11) if damage == "delete" else (11,))]  # only those damaged
    assert sorted(fixed.maps_lost) == sorted(lost)
    store = _searchable(root, entries, ALL)
    for i in ALL:
        if f"/photos/{i}.jpg" in lost:
            with pytest.raises(Exception, match="without conv maps"):
                store.feature_map(i)
        else:
            np.testing.assert_array_equal(store.feature_map(i), decode_map(encode_map(entries[i].fmap)))


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_damaged_catalogue_is_rebuilt_from_the_segments(index, damage):
    root, entries = index
    db = root / "catalog.sqlite"
    for f in root.glob("catalog.sqlite-*"):
        f.unlink()
    if damage == "truncate":
        db.write_bytes(db.read_bytes()[:1000])
    elif damage == "delete":
        db.unlink()
    else:
        b = bytearray(db.read_bytes())
        b[100:2000] = bytes(1900)
        db.write_bytes(bytes(b))
    rep = check_index(root)
    assert not rep.ok and any("catalog.sqlite" in p for p in rep.problems), rep.problems
    fixed = repair_index(root)
    assert any("rebuilt the catalogue" in a for a in fixed.actions)
    store = _searchable(root, entries, ALL)  # removed marks kept (from catalog-backup.json)
    assert store.settings == {"recipe": {"name": "rmac"}} and store.read_file("pca.bin") == b"fitted state"
    np.testing.assert_array_equal(store.feature_map(11), decode_map(encode_map(entries[11].fmap)))
    assert store.add([_entry(20, np.random.default_rng(1))]) == [12]


def test_wrong_next_id(index):
    root, entries = index
    con = sqlite3.connect(root / "catalog.sqlite")
    con.execute("UPDATE meta SET value = '7' WHERE key = 'next_id'")
    con.commit()
    con.close()
    rep = check_index(root)
    assert any("next_id 7 is not above the largest stored id 11" in p for p in rep.problems), rep.problems
    fixed = repair_index(root)
    assert any("next_id 7 raised to 12" in a for a in fixed.actions)
    store = _searchable(root, entries, ALL)
    assert store.add([_entry(20, np.random.default_rng(1))]) == [12]


def test_damaged_stored_file_and_leftovers(index):
    root, entries = index
    (root / "fitted" / "pca.bin").write_bytes(b"fitted statE")
    (root / ".manifest.json.x.tmp").write_bytes(b"{")
    (root / "segments" / "seg-orphan.npz").write_bytes(b"half")
    rep = check_index(root)
    assert any("pca.bin: checksum mismatch" in p for p in rep.problems), rep.problems
    fixed = repair_index(root)
    assert any("pca.bin" in a for a in fixed.actions) and any("leftover" in a for a in fixed.actions)
    assert not (root / ".manifest.json.x.tmp").exists() and not (root / "segments" / "seg-orphan.npz").exists()
    _searchable(root, entries, ALL)


def test_check_finds_ids_that_differ_from_the_catalogue(index):
    root, _ = index
    con = sqlite3.connect(root / "catalog.sqlite")
    con.execute("UPDATE images SET path = '/elsewhere.jpg' WHERE id = 2")
    con.commit()
    con.close()
    rep = check_index(root)
    assert any("differ from the catalogue" in p for p in rep.problems), rep.problems


def test_repair_of_a_sound_index_changes_nothing(index):
    root, entries = index
    fixed = repair_index(root)
    assert fixed.lost == [] and fixed.maps_lost == [] and fixed.actions == []
    _searchable(root, entries, ALL)


def test_a_lowered_next_id_is_refused_before_any_write(index):
    root, _ = index
    con = sqlite3.connect(root / "catalog.sqlite")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'next_id'")
    con.commit()
    con.close()
    store = IndexStore.open(root)
    with pytest.raises(Exception, match="next_id 3 is not above the largest stored id 11"):
        store.add([_entry(30, np.random.default_rng(2))])
    assert IndexStore.open(root).ids().tolist() == ALL  # nothing was overwritten
