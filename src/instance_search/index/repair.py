"""Check and repair of an index folder (``isearch check`` / ``isearch repair``).

:func:`check_index` reads everything and names what is wrong: the catalogue (SQLite ``integrity_check``, its
tables and keys), every segment file (size, sha256, readable, ids equal to the catalogue's), every map file
(size, sha256, the CRC-32 of each image's map), the stored files (sha256), the ids (unique, below ``next_id``)
and the vectors FAISS is built from (one finite row of one dimension per live image; a flat FAISS index over
them holds as many rows as the catalogue has live images and finds each image first for its own vector).

:func:`repair_index` brings any damaged folder back to a consistent state under the writer lock, keeping every
image whose segment can still be read: unreadable segments are dropped and their images listed; images whose
map is damaged keep their vectors in a segment without maps (listed too: re-extract them to re-rank); a lost
or corrupt catalogue is rebuilt from the segment files, the settings and removed marks of
``catalog-backup.json``; ``next_id`` is raised above every stored id; leftovers and temp files are removed.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CorruptIndexError
from .compact import CompactMapError, decode_sparse, map_checksum
from .store import (BACKUP, CATALOG, MANIFEST, MIGRATED_MANIFEST, USE_DEFAULT_WAIT, Entry, IndexStore, connect_catalog,
                    file_sha256_size, init_catalog, register_segment, sha256_bytes)


@dataclass
class CheckReport:
    root: Path
    problems: list[str] = field(default_factory=list)  # each names the file or record at fault
    notes: list[str] = field(default_factory=list)  # not damage (e.g. leftovers a writer will remove)
    images: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepairReport:
    root: Path
    actions: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # paths of images dropped (their segment could not be read)
    maps_lost: list[str] = field(default_factory=list)  # paths of images kept without their conv map
    images: int = 0


def _catalog_rows(root: Path):
    """(meta, segments rows, images rows, files rows) read straight from the catalogue, or raise."""
    path = root / CATALOG
    if not path.is_file():
        raise CorruptIndexError(f"{path}: missing")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        res = con.execute("PRAGMA integrity_check").fetchall()
        if [r[0] for r in res] != ["ok"]:
            raise CorruptIndexError(f"{path}: integrity check failed ({'; '.join(str(r[0]) for r in res[:3])})")
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        segs = con.execute("SELECT name, n, tag, npz_file, npz_sha256, npz_size, map_file, map_sha256, map_size "
                           "FROM segments ORDER BY seq").fetchall()
        imgs = con.execute("SELECT id, segment, row, path, map_crc, removed FROM images ORDER BY id").fetchall()
        files = con.execute("SELECT name, sha256, size FROM files").fetchall()
        for key in ("format", "settings", "next_id", "whitening", "version"):
            if key not in meta:
                raise CorruptIndexError(f"{path}: corrupt catalogue (no '{key}' in meta)")
        json.loads(meta["settings"])
        int(meta["next_id"])
    except sqlite3.DatabaseError as exc:
        raise CorruptIndexError(f"{path}: corrupt catalogue ({exc})") from exc
    except ValueError as exc:
        raise CorruptIndexError(f"{path}: corrupt catalogue ({exc})") from exc
    finally:
        con.close()
    return meta, segs, imgs, files


def check_index(root: str | os.PathLike, *, faiss_sample: int = 2000) -> CheckReport:
    """Verify every file and record of the index at ``root``; nothing is changed."""
    root = Path(root)
    rep = CheckReport(root)
    if not root.is_dir():
        rep.problems.append(f"{root}: no such folder")
        return rep
    if not (root / CATALOG).is_file() and (root / MANIFEST).is_file():
        rep.notes.append(f"{root / MANIFEST}: an index of the earlier format (migrated when first opened)")
        try:
            IndexStore.open(root)  # migrates, then check the result
        except CorruptIndexError as exc:
            rep.problems.append(str(exc))
            return rep
    try:
        meta, segs, imgs, files = _catalog_rows(root)
    except CorruptIndexError as exc:
        rep.problems.append(str(exc))
        return rep
    next_id = int(meta["next_id"])
    rows_of: dict[str, list[tuple]] = {}
    for r in imgs:
        rows_of.setdefault(r[1], []).append(r)
    seg_names = {s[0] for s in segs}
    for r in imgs:
        if r[1] not in seg_names:
            rep.problems.append(f"{root / CATALOG}: image {r[0]} ({r[3]}) names segment {r[1]}, which is not "
                                "catalogued")
    if imgs and max(r[0] for r in imgs) >= next_id:
        rep.problems.append(f"{root / CATALOG}: next_id {next_id} is not above the largest stored id "
                            f"{max(r[0] for r in imgs)} (new images would reuse ids)")
    live_vectors: list[np.ndarray] = []
    for name, n, tag, npz_file, npz_sha, npz_size, map_file, map_sha, map_size in segs:
        path = root / "segments" / npz_file
        rows = sorted(rows_of.get(name, []), key=lambda r: r[2])
        if not path.is_file():
            rep.problems.append(f"{path}: missing ({len(rows)} images)")
            continue
        sha, size = file_sha256_size(path)
        if size != npz_size or sha != npz_sha:
            rep.problems.append(f"{path}: {size} bytes, sha256 {sha[:12]}..., the catalogue records {npz_size} bytes, "
                                f"{npz_sha[:12]}... (damaged)")
            continue
        try:
            seg = IndexStore(root)._read_segment(name, npz_file, map_file)
        except CorruptIndexError as exc:
            rep.problems.append(str(exc))
            continue
        if len(rows) != len(seg.ids) or any(int(seg.ids[r[2]]) != r[0] or seg.paths[r[2]] != r[3] for r in rows):
            rep.problems.append(f"{path}: its ids or paths differ from the catalogue's")
            continue
        if seg.tag != tag:
            rep.problems.append(f"{path}: whitening tag {seg.tag!r}, the catalogue records {tag!r}")
        if not np.isfinite(seg.vectors).all():
            rep.problems.append(f"{path}: non-finite global vectors")
        live_vectors += [seg.vectors[r[2]] for r in rows if not r[5]]
        rep.images += sum(1 for r in rows if not r[5])
        if seg.has_maps:
            mpath = root / "maps" / str(map_file)
            if not map_file or not mpath.is_file():
                rep.problems.append(f"{mpath}: missing (conv maps of {len(rows)} images)")
                continue
            blob = mpath.read_bytes()
            if len(blob) != map_size or sha256_bytes(blob) != map_sha:
                rep.problems.append(f"{mpath}: {len(blob)} bytes, the catalogue records {map_size} (sha256 "
                                    f"{'differs' if len(blob) == map_size else 'and size differ'}: damaged)")
            mo = seg.map_offsets
            if mo is None or int(mo[-1]) != len(blob):
                continue
            bad = [seg.paths[r[2]] for r in rows
                   if r[4] is not None and map_checksum(blob[mo[r[2]]:mo[r[2] + 1]]) != r[4]]
            if bad:
                rep.problems.append(f"{mpath}: damaged maps of {len(bad)} images ({', '.join(bad[:3])}"
                                    f"{', ...' if len(bad) > 3 else ''})")
    for fname, sha, size in files:
        path = root / "fitted" / fname
        if not path.is_file():
            rep.problems.append(f"{path}: missing (a stored file the catalogue names)")
        elif file_sha256_size(path) != (sha, size):
            rep.problems.append(f"{path}: checksum mismatch (damaged)")
    dims = {len(v) for v in live_vectors}
    if len(dims) > 1:
        rep.problems.append(f"{root}: global vectors of different dimensions {sorted(dims)}")
    elif live_vectors:
        _check_faiss(rep, np.stack(live_vectors).astype(np.float32), faiss_sample)
    if not rep.problems:
        store = IndexStore(root)
        try:
            left = store.leftovers()
        finally:
            store.close()
        if left:
            rep.notes.append(f"{len(left)} leftover or temporary files (removed by the next writer or by "
                             f"`isearch repair`): {', '.join(f.name for f in left[:5])}"
                             f"{', ...' if len(left) > 5 else ''}")
    return rep


def _check_faiss(rep: CheckReport, vecs: np.ndarray, sample: int) -> None:
    """The FAISS index the search builds from these vectors holds one row per live image, equal to the stored
    vector, and for a sample of images (every one up to ``sample``) its best score equals the exact one."""
    from .faiss_backend import build_faiss, search

    index = build_faiss(vecs, "flat")
    if index.ntotal != len(vecs):
        rep.problems.append(f"{rep.root}: FAISS holds {index.ntotal} vectors for {len(vecs)} live images")
        return
    if not np.array_equal(index.reconstruct_n(0, index.ntotal), vecs):
        rep.problems.append(f"{rep.root}: FAISS out of sync: its rows differ from the stored vectors")
        return
    rows = np.arange(len(vecs)) if len(vecs) <= sample else \
        np.random.default_rng(0).choice(len(vecs), sample, replace=False)
    scores, _ = search(index, vecs[rows], 1)
    exact = np.concatenate([(vecs[rows[i:i + 256]] @ vecs.T).max(1) for i in range(0, len(rows), 256)])
    wrong = int((np.abs(scores[:, 0] - exact) > 1e-4 * np.maximum(1, np.abs(exact))).sum())
    if wrong:
        rep.problems.append(f"{rep.root}: FAISS out of sync: {wrong} of {len(rows)} searches differ from exact search")


def _settings_source(root: Path) -> dict:
    """Settings, whitening, removed marks, next id and stored files for a rebuilt catalogue."""
    for name in (BACKUP, MANIFEST, MIGRATED_MANIFEST):
        try:
            data = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            return {"settings": data["settings"], "whitening": data.get("whitening"),
                    "removed": [int(i) for i in data.get("removed", [])], "next_id": int(data.get("next_id", 0)),
                    "files": data.get("files", {}), "from": name}
    raise CorruptIndexError(f"{root}: the catalogue is lost and neither {BACKUP} nor {MANIFEST} holds the index "
                            "settings; rebuild the index with `isearch index`")


def _readable_maps(root: Path, seg) -> tuple[list[bytes | None], bytes | None]:
    """Each row's map code if it decodes (None if damaged), from the segment's map file."""
    n = len(seg.ids)
    if not seg.has_maps or seg.map_offsets is None:
        return [None] * n, None
    try:
        blob = (root / "maps" / str(seg.map_file)).read_bytes()
    except OSError:
        return [None] * n, None
    mo = seg.map_offsets
    out: list[bytes | None] = []
    for i in range(n):
        if mo[i + 1] > len(blob):
            out.append(None)
            continue
        code = blob[mo[i]:mo[i + 1]]
        ok = seg.map_crc is None or map_checksum(code) == int(seg.map_crc[i])
        if ok:
            try:
                decode_sparse(code)
            except CompactMapError:
                ok = False
        out.append(code if ok else None)
    return out, blob


def repair_index(root: str | os.PathLike, *, wait: float | None = USE_DEFAULT_WAIT) -> RepairReport:
    """Bring the index at ``root`` back to a consistent state (see the module docstring); returns what was done
    and which images were dropped or lost their maps."""
    root = Path(root)
    rep = RepairReport(root)
    if not root.is_dir():
        raise CorruptIndexError(f"{root}: no such folder")
    store = IndexStore(root, wait=wait)
    wait = store.wait
    store._lock.acquire(wait)  # held throughout: no other writer runs while the catalogue is fixed
    try:
        try:
            _catalog_rows(root)
            rebuilt = False
        except CorruptIndexError as exc:
            if not (root / CATALOG).is_file() and (root / MANIFEST).is_file():
                try:  # an earlier-format folder that migrates cleanly needs no rebuild
                    store._lock.release()
                    try:
                        IndexStore.open(root, wait=wait)
                    finally:
                        store._lock.acquire(wait)
                    rep.actions.append(f"migrated {root / MANIFEST} to the catalogue")
                    rebuilt = False
                except CorruptIndexError:
                    _rebuild(root, rep, str(exc))
                    rebuilt = True
            else:
                _rebuild(root, rep, str(exc))
                rebuilt = True
        if not rebuilt:
            _repair_catalogued(root, store, rep)
        store.close()
        fresh = IndexStore(root, wait=wait)
        gone = fresh._remove_leftovers()  # this call holds the lock
        if gone:
            rep.actions.append(f"removed {len(gone)} leftover or temporary files")
        fresh._load()
        rep.images = len(fresh)
        fresh.close()
    finally:
        store._lock.release()
    return rep


def _repair_catalogued(root: Path, store: IndexStore, rep: RepairReport) -> None:
    """The catalogue reads: check each segment against it and fix what is damaged."""
    con = store._db()
    segs = con.execute("SELECT name, n, tag, npz_file, npz_sha256, npz_size, map_file, map_sha256, map_size "
                       "FROM segments ORDER BY seq").fetchall()
    for name, n, tag, npz_file, npz_sha, npz_size, map_file, map_sha, map_size in segs:
        rows = con.execute("SELECT id, row, path, map_crc, removed FROM images WHERE segment = ? ORDER BY row",
                           (name,)).fetchall()
        path = root / "segments" / npz_file
        try:
            seg = store._read_segment(name, npz_file, map_file)
            if len(seg.ids) != len(rows) or any(int(seg.ids[r[1]]) != r[0] for r in rows):
                raise CorruptIndexError(f"{path}: its ids differ from the catalogue's")
        except CorruptIndexError as exc:
            with store._transaction() as c:
                c.execute("DELETE FROM images WHERE segment = ?", (name,))
                c.execute("DELETE FROM segments WHERE name = ?", (name,))
            rep.lost += [r[2] for r in rows if not r[4]]
            rep.actions.append(f"dropped segment {npz_file} ({len(rows)} images): {exc}")
            continue
        if rows and rows[0][3] is not None:
            seg.map_crc = np.asarray([r[3] for r in rows], np.int64)
        sha, size = file_sha256_size(path)
        if (sha, size) != (npz_sha, npz_size):  # reads cleanly (zip CRCs pass): record what is there
            with store._transaction() as c:
                c.execute("UPDATE segments SET npz_sha256 = ?, npz_size = ? WHERE name = ?", (sha, size, name))
            rep.actions.append(f"{npz_file}: re-recorded its checksum (the file reads cleanly)")
        if not seg.has_maps:
            continue
        codes, blob = _readable_maps(root, seg)
        whole_ok = blob is not None and len(blob) == map_size and sha256_bytes(blob) == map_sha
        if whole_ok and all(c is not None for c in codes):
            continue
        removed = {r[0] for r in rows if r[4]}
        entries_ok, entries_bad = [], []
        for r in range(len(seg.ids)):
            e = Entry(path=seg.paths[r], width=int(seg.sizes[r, 0]), height=int(seg.sizes[r, 1]),
                      sha256=seg.sha256[r], mtime=float(seg.mtimes[r]), size=int(seg.filesizes[r]),
                      local=seg.local[seg.offsets[r]:seg.offsets[r + 1]].astype(np.float32),
                      vector=seg.vectors[r], fmap=codes[r])
            e.id = int(seg.ids[r])
            (entries_ok if codes[r] is not None else entries_bad).append(e)
        if entries_ok:
            store._write_segment(f"{name}-r{time.time_ns() % 10**9}", entries_ok,
                                 np.asarray([e.id for e in entries_ok], np.int64), seg.tag, replace=[name])
        if entries_bad:
            for e in entries_bad:
                e.fmap = None
            store._write_segment(f"{name}-nomaps{time.time_ns() % 10**9}", entries_bad,
                                 np.asarray([e.id for e in entries_bad], np.int64), seg.tag,
                                 replace=None if entries_ok else [name])
            rep.maps_lost += [e.path for e in entries_bad if e.id not in removed]
        if removed:
            with store._transaction() as c:
                c.executemany("UPDATE images SET removed = 1 WHERE id = ?", [(i,) for i in sorted(removed)])
        rep.actions.append(f"{map_file}: damaged; rewrote segment {name} ({len(entries_ok)} images keep their maps, "
                           f"{len(entries_bad)} kept without)")
    # next id above every stored id; stored files that fail their checksum are dropped (listed)
    max_id = con.execute("SELECT MAX(id) FROM images").fetchone()[0]
    next_id = int(con.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])
    if max_id is not None and next_id <= max_id:
        with store._transaction() as c:
            c.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (str(max_id + 1),))
        rep.actions.append(f"next_id {next_id} raised to {max_id + 1} (above every stored id)")
    for fname, sha, size in con.execute("SELECT name, sha256, size FROM files").fetchall():
        p = root / "fitted" / fname
        if not p.is_file() or file_sha256_size(p) != (sha, size):
            with store._transaction() as c:
                c.execute("DELETE FROM files WHERE name = ?", (fname,))
            rep.actions.append(f"dropped stored file {fname} (missing or damaged; store it again)")
    store._write_backup()


def _rebuild(root: Path, rep: RepairReport, why: str) -> None:
    """A new catalogue from the segment files that read (the damaged one is kept aside)."""
    src = _settings_source(root)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        p = root / (CATALOG + suffix)
        if p.exists():
            os.replace(p, root / f"{CATALOG}{suffix}.damaged-{stamp}")
    rep.actions.append(f"rebuilt the catalogue from the segment files ({why}; settings from {src['from']}; "
                       f"the damaged catalogue is kept as {CATALOG}.damaged-{stamp})")
    tmp = root / f".{CATALOG}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    con = connect_catalog(tmp, 5.0)
    init_catalog(con, src["settings"], src["next_id"], src["whitening"], time.strftime("%Y-%m-%dT%H:%M:%S"))
    removed = set(src["removed"])
    seen: set[int] = set()
    max_id = src["next_id"] - 1
    files = sorted((root / "segments").glob("*.npz"), key=lambda p: -p.stat().st_mtime) \
        if (root / "segments").is_dir() else []
    con.execute("BEGIN")
    probe = IndexStore(root)
    keep: list[tuple] = []  # newest file first for each id (a compaction's old segments may still be there)
    for path in files:
        name = path.name.split(".")[0]
        map_file = f"{name}.cmap"
        try:
            seg = probe._read_segment(name, path.name, map_file)
        except CorruptIndexError as exc:
            rep.actions.append(f"skipped unreadable segment {path.name} ({exc})")
            continue
        if any(int(i) in seen for i in seg.ids):
            rep.actions.append(f"skipped {path.name}: its ids are held by a newer segment (left over by compaction)")
            continue
        if con.execute("SELECT 1 FROM segments WHERE name = ?", (name,)).fetchone():
            name = path.name[:-4]  # a refreshed copy beside its original: a distinct name
            seg.name = name
        crcs: list = [None] * len(seg.ids)
        map_sha = map_size = None
        mf: str | None = None
        if seg.has_maps:
            codes, blob = _readable_maps(root, seg)
            if blob is not None and all(c is not None for c in codes):
                mf, map_sha, map_size = map_file, sha256_bytes(blob), len(blob)
                crcs = [map_checksum(c) for c in codes]
            else:
                seg.has_maps = False  # recorded without maps below: the npz says has_maps, the catalogue rules
                rep.maps_lost += list(seg.paths)
        sha, size = file_sha256_size(path)
        keep.append((seg, sha, size, mf, map_sha, map_size, crcs))
        seen.update(int(i) for i in seg.ids)
        if len(seg.ids):
            max_id = max(max_id, int(seg.ids.max()))
    for seg, sha, size, mf, map_sha, map_size, crcs in sorted(keep, key=lambda k: (int(k[0].ids.min(initial=1 << 62)),
                                                                                      k[0].name)):
        register_segment(con, seg, sha, size, mf, map_sha, map_size, crcs, removed)
    con.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (str(max_id + 1),))
    for fname, (sha, size) in src["files"].items():
        p = root / "fitted" / fname
        if p.is_file() and file_sha256_size(p) == (sha, int(size)):
            con.execute("INSERT INTO files(name, sha256, size) VALUES (?, ?, ?)", (fname, sha, int(size)))
        else:
            rep.actions.append(f"dropped stored file {fname} (missing or damaged)")
    con.execute("COMMIT")
    con.close()
    os.replace(tmp, root / CATALOG)
    if (root / MANIFEST).is_file():
        os.replace(root / MANIFEST, root / MIGRATED_MANIFEST)
