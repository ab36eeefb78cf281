"""Durable on-disk collection: per-image local descriptors, global vectors, compact conv maps, metadata.

Layout of an index folder::

    catalog.sqlite           the catalogue (SQLite, WAL): settings, images and their metadata, segments with
                             their sizes and sha256, removed marks, stored files; the only source of truth
    segments/<name>.npz      one batch of images: ids, metadata, region descriptors, global vectors (immutable)
    maps/<name>.cmap         the same batch's conv feature maps in the compact code of index/compact.py
                             (Tolias et al. 2016 Sec. 7), concatenated; each map has a CRC-32 in the catalogue
    fitted/<name>            immutable files stored with :meth:`IndexStore.add_file` (sha256 in the catalogue)
    writer.lock              held (``flock``) by the one process that writes; it names that process
    catalog-backup.json      settings, removed marks and file checksums, for :func:`repair` if the catalogue
                             itself is lost

Concurrency: any number of readers at any time; each reads the catalogue in one SQLite read transaction (a
consistent version) and then the immutable files it names. Writers (``add``, ``remove``, settings, files,
whitening refresh, compaction) serialise on ``writer.lock``: a second writer waits (``wait`` seconds, with a
message naming the holder) and then fails with :class:`WriterBusyError` naming the holder's pid. Segment files
are written *under* the lock and published by the catalogue transaction that names them, so a kill at any
moment leaves every acknowledged image in place, and a file no catalogue row names can only be left over by a
dead writer; the next writer removes it.

Index folders of the earlier ``manifest.json`` format are migrated once, on first open (with a message).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..io import atomic_save_npz, atomic_write_bytes, fsync_dir  # noqa: F401  (atomic_* re-exported)
from ..io import load_npz as _load_npz
from .compact import CompactMapError, decode_map, decode_sparse, encode_map, map_checksum  # noqa: F401

from ..errors import CorruptIndexError, ISearchError

CATALOG = "catalog.sqlite"
LOCK = "writer.lock"
BACKUP = "catalog-backup.json"
MANIFEST = "manifest.json"  # the earlier format, migrated on open
MIGRATED_MANIFEST = "manifest.v1.json"
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
DEFAULT_WAIT_S = 60.0
USE_DEFAULT_WAIT = -1.0  # ``wait`` left out: the process default (``set_default_wait``, e.g. from ``--wait``)
_default_wait: float | None = DEFAULT_WAIT_S


def set_default_wait(seconds: float | None) -> None:
    """How long writers of this process wait for another writer's lock when their store was opened without
    ``wait`` (``None``: forever). The CLI's ``--wait SECONDS`` sets it."""
    global _default_wait
    if seconds is not None and not seconds >= 0:
        raise ValueError(f"--wait must be 0 or more seconds, got {seconds}")
    _default_wait = seconds
#: temp files at the top of the index folder that no lock protects (e.g. a whitening being staged) are only
#: removed once older than this
STALE_TEMP_S = 3600.0


class IndexExistsError(CorruptIndexError):
    """:meth:`IndexStore.create` where an index already is (e.g. another writer created it a moment before)."""


class WriterBusyError(ISearchError, RuntimeError):
    """Another process holds the index's writer lock for longer than the caller would wait (names its pid)."""


def _notify(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: where the store reports waits and migrations (replace to redirect; the CLI and server keep stderr)
notify: Callable[[str], None] = _notify


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load an index ``.npz`` without pickles; any damage raises :class:`CorruptIndexError` naming the file."""
    return _load_npz(path, error=CorruptIndexError, what="index file (the catalogue names it)")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256_size(path: Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of the file at ``path``, read once."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return h.hexdigest(), n
            h.update(b)
            n += len(b)


@dataclass
class Entry:
    """One indexed image: its id, metadata and descriptors (``local``: (R,C) pre-whitening vectors)."""

    path: str
    width: int
    height: int
    sha256: str
    mtime: float
    size: int
    local: np.ndarray
    vector: np.ndarray | None = None
    fmap: np.ndarray | bytes | None = None  # (C,H,W) map, or its code from index.compact.encode_map
    id: int = -1


@dataclass
class _Segment:
    name: str
    ids: np.ndarray
    paths: list[str]
    sizes: np.ndarray  # (n, 2) width, height
    sha256: list[str]
    mtimes: np.ndarray
    filesizes: np.ndarray
    local: np.ndarray  # (sum R, C) float16
    offsets: np.ndarray  # (n+1,)
    vectors: np.ndarray  # (n, D) float32
    has_maps: bool
    tag: str  # which whitening the vectors were computed with
    map_offsets: np.ndarray | None = None  # (n+1,) byte offsets into the map file
    npz_file: str = ""  # file name under segments/
    map_file: str | None = None  # file name under maps/
    map_crc: np.ndarray | None = None  # (n,) CRC-32 of each map code (from the catalogue)


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, n INTEGER NOT NULL, tag TEXT NOT NULL,
    npz_file TEXT NOT NULL, npz_sha256 TEXT NOT NULL, npz_size INTEGER NOT NULL,
    map_file TEXT, map_sha256 TEXT, map_size INTEGER);
CREATE TABLE IF NOT EXISTS images(
    id INTEGER PRIMARY KEY, segment TEXT NOT NULL REFERENCES segments(name), row INTEGER NOT NULL,
    path TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, sha256 TEXT NOT NULL,
    mtime REAL NOT NULL, size INTEGER NOT NULL, map_crc INTEGER, removed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS images_segment ON images(segment, row);
CREATE TABLE IF NOT EXISTS files(name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL);
"""


def connect_catalog(path: Path, timeout: float) -> sqlite3.Connection:
    """A connection to the catalogue at ``path`` (autocommit, busy timeout, synchronous FULL)."""
    con = sqlite3.connect(str(path), timeout=max(timeout, 1.0), isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA busy_timeout = %d" % int(max(timeout, 1.0) * 1000))
    con.execute("PRAGMA synchronous = FULL")
    return con


def init_catalog(con: sqlite3.Connection, settings: dict[str, Any], next_id: int, whitening, created: str) -> None:
    con.execute("PRAGMA journal_mode = WAL")
    con.executescript(SCHEMA)
    con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [
        ("format", str(FORMAT_VERSION)), ("settings", json.dumps(settings, sort_keys=True)),
        ("next_id", str(int(next_id))), ("whitening", json.dumps(whitening)), ("created", created),
        ("version", "0")])


class _WriterLock:
    """An exclusive ``flock`` on ``writer.lock`` (released by the kernel when its holder dies, even by kill -9);
    the file names the holder (pid, command) for waiting processes. Re-entrant within one store object."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.depth = 0

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return f"pid {info.get('pid', '?')} ({info.get('cmd', '?')}, since {info.get('since', '?')})"

    def acquire(self, wait: float | None) -> None:
        if self.depth:
            self.depth += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start, told = time.monotonic(), False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if wait is not None and waited >= wait:
                        raise WriterBusyError(
                            f"{self.path.parent}: another writer holds the index ({self.holder()}); gave up "
                            f"after waiting {waited:.0f} s (raise --wait, or stop that process)") from None
                    if not told and waited >= 0.5:
                        notify(f"waiting for the index {self.path.parent}: another writer holds it "
                               f"({self.holder()})" + (f"; up to {wait:.0f} s" if wait is not None else ""))
                        told = True
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "cmd": " ".join(sys.argv)[:200] or "python",
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd, self.depth = fd, 1

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _map_cache_limit() -> int:
    """``ISEARCH_MAP_CACHE_MB`` (MiB of decoded maps an open index keeps; default 256, 0 = off) in bytes."""
    raw = os.environ.get("ISEARCH_MAP_CACHE_MB", "256")
    try:
        mb = float(raw)
    except ValueError:
        raise ISearchError(f"ISEARCH_MAP_CACHE_MB={raw!r}: give a number of MiB (0 turns the map cache off)") from None
    if not mb >= 0:
        raise ISearchError(f"ISEARCH_MAP_CACHE_MB={raw!r}: give a number of MiB >= 0")
    return int(mb * 2 ** 20)


@dataclass
class IndexStore:
    """A collection index on disk. Open with :meth:`create` or :meth:`open`.

    ``manifest`` is a read-only view of the catalogue version this object holds (``segments``, ``removed``,
    ``next_id``, ``settings``, ``whitening``, ``version``); :meth:`reload` moves it to the newest version."""

    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    _segments: dict[str, _Segment] = field(default_factory=dict)
    wait: float | None = USE_DEFAULT_WAIT

    def __post_init__(self):
        self.root = Path(self.root)
        if self.wait == USE_DEFAULT_WAIT:
            self.wait = _default_wait
        self._con: sqlite3.Connection | None = None
        self._lock = _WriterLock(self.root / LOCK)
        self._mutex = threading.RLock()
        self._records: list[dict[str, Any]] = []
        self._live_rows: list[tuple[str, int]] = []
        self._gc_done = False
        #: bytes of decoded sparse maps kept in RAM (LRU) between short lists: ``ISEARCH_MAP_CACHE_MB``, default
        #: 256 MiB; 0 turns the cache off. Map files are immutable, so an entry never goes stale.
        self.map_cache_limit = _map_cache_limit()
        self._map_cache: OrderedDict[tuple[str, int], tuple[Any, int]] = OrderedDict()  # key -> (map, bytes)
        self._map_cache_bytes = 0
        self._map_cache_lock = threading.Lock()

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, root: str | os.PathLike, settings: dict[str, Any], *,
               wait: float | None = USE_DEFAULT_WAIT) -> "IndexStore":
        root = Path(root)
        if cls.exists(root):
            raise IndexExistsError(f"{root}: an index already exists here")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, wait=wait)
        with store._lock_held():
            if cls.exists(root):
                raise IndexExistsError(f"{root}: an index already exists here")
            tmp = root / f".{CATALOG}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            con = connect_catalog(tmp, 5.0)
            init_catalog(con, dict(settings), 0, None, time.strftime("%Y-%m-%dT%H:%M:%S"))
            con.close()
            os.replace(tmp, root / CATALOG)
            fsync_dir(root)
            store._write_backup_from({"settings": dict(settings), "whitening": None, "removed": [], "next_id": 0,
                                      "files": {}})
        store._load()
        return store

    @classmethod
    def exists(cls, root: str | os.PathLike) -> bool:
        return (Path(root) / CATALOG).is_file() or (Path(root) / MANIFEST).is_file()

    @classmethod
    def open(cls, root: str | os.PathLike, *, writable: bool = False,
             wait: float | None = USE_DEFAULT_WAIT) -> "IndexStore":
        """Open an index (migrating an earlier-format folder once). ``writable`` also removes what dead writers
        left behind (under the writer lock, waiting up to ``wait`` seconds). Writes take the lock themselves."""
        root = Path(root)
        if not root.exists():
            raise CorruptIndexError(f"{root}: no index here (folder does not exist); build one with `isearch index`")
        store = cls(root, wait=wait)
        if not (root / CATALOG).is_file():
            if (root / MANIFEST).is_file():
                store._migrate()
            else:
                raise CorruptIndexError(f"{root / CATALOG}: missing; {root} is not an index folder "
                                        "(build one with `isearch index`)")
        store._load()
        if writable:
            with store._lock_held():
                pass  # the first lock of a store object cleans up after dead writers
        return store

    # ---------------------------------------------------------------- catalogue access
    def _db(self) -> sqlite3.Connection:
        if self._con is None:
            path = self.root / CATALOG
            if not path.is_file():
                raise CorruptIndexError(f"{path}: missing (the index catalogue)")
            try:
                self._con = connect_catalog(path, self.wait if self.wait is not None else 3600.0)
                self._con.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
            except sqlite3.DatabaseError as exc:
                self._con = None
                raise CorruptIndexError(f"{path}: corrupt catalogue ({exc}); run `isearch repair`") from exc
        return self._con

    def close(self) -> None:
        with self._mutex:
            if self._con is not None:
                self._con.close()
                self._con = None

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def _snapshot(self) -> dict[str, Any]:
        """One consistent version of the catalogue (a single read transaction)."""
        con = self._db()
        path = self.root / CATALOG
        try:
            con.execute("BEGIN")
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                segs = con.execute("SELECT name, n, tag, npz_file, npz_sha256, npz_size, map_file, map_sha256, "
                                   "map_size FROM segments ORDER BY seq").fetchall()
                imgs = con.execute("SELECT id, segment, row, path, width, height, sha256, mtime, size, map_crc, "
                                   "removed FROM images").fetchall()
                files = con.execute("SELECT name, sha256, size FROM files").fetchall()
            finally:
                con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise CorruptIndexError(f"{path}: corrupt catalogue ({exc}); run `isearch repair`") from exc
        try:
            fmt = int(meta["format"])
            if fmt != FORMAT_VERSION:
                raise CorruptIndexError(f"{path}: catalogue format {fmt}, this version reads {FORMAT_VERSION}")
            return {"format": fmt, "settings": json.loads(meta["settings"]), "next_id": int(meta["next_id"]),
                    "whitening": json.loads(meta["whitening"]), "created": meta.get("created", ""),
                    "version": int(meta["version"]), "segments": segs, "images": imgs, "files": files}
        except (KeyError, ValueError) as exc:
            raise CorruptIndexError(f"{path}: corrupt catalogue (meta {exc}); run `isearch repair`") from exc

    def _version(self) -> int:
        try:
            row = self._db().execute("SELECT value FROM meta WHERE key='version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise CorruptIndexError(f"{self.root / CATALOG}: corrupt catalogue ({exc})") from exc
        return int(row[0]) if row else -1

    def _load(self, retries: int = 5) -> None:
        """Read the newest catalogue version and the segment files it names (files that vanish because a
        writer replaced them meanwhile: read the newer version)."""
        for attempt in range(retries + 1):
            snap = self._snapshot()
            try:
                self._install(snap)
                return
            except CorruptIndexError:
                if attempt < retries and self._version() != snap["version"]:
                    continue
                raise

    def _install(self, snap: dict[str, Any]) -> None:
        by_seg: dict[str, list[tuple]] = {}
        for row in snap["images"]:
            by_seg.setdefault(row[1], []).append(row)
        segments: dict[str, _Segment] = {}
        for name, n, tag, npz_file, _sha, size, map_file, _msha, _msize in snap["segments"]:
            old = self._segments.get(name)
            if old is not None and old.npz_file == npz_file and old.tag == tag:
                segments[name] = old
                continue
            seg = self._read_segment(name, npz_file, map_file, expect_size=size)
            if map_file is None and seg.map_offsets is not None:
                seg.has_maps = False  # the catalogue rules (repair keeps images whose maps were lost, without)
            rows = sorted(by_seg.get(name, []), key=lambda r: r[2])
            if len(rows) != len(seg.ids) or any(int(seg.ids[r[2]]) != r[0] for r in rows):
                raise CorruptIndexError(f"{self.root / 'segments' / npz_file}: its ids do not match the catalogue; "
                                        "run `isearch check`")
            if rows and rows[0][9] is not None:
                seg.map_crc = np.asarray([r[9] for r in rows], np.int64)
            segments[name] = seg
        removed = sorted(r[0] for r in snap["images"] if r[10])
        self._segments = segments
        names = [s[0] for s in snap["segments"]]
        order = {n: k for k, n in enumerate(names)}
        live = sorted((r for r in snap["images"] if not r[10]), key=lambda r: (order.get(r[1], 1 << 30), r[2]))
        self._records = [{"id": int(r[0]), "path": r[3], "width": int(r[4]), "height": int(r[5]), "sha256": r[6],
                          "mtime": float(r[7]), "size": int(r[8])} for r in live]
        self._live_rows = [(r[1], int(r[2])) for r in live]
        self._files = {f[0]: (f[1], int(f[2])) for f in snap["files"]}
        self._seg_meta = {s[0]: s for s in snap["segments"]}
        self.manifest = {"format": snap["format"], "settings": snap["settings"], "segments": names,
                         "removed": removed, "next_id": snap["next_id"], "whitening": snap["whitening"],
                         "created": snap["created"], "version": snap["version"]}

    def reload(self) -> bool:
        """Move to the newest catalogue version if another process (or object) changed it; returns whether
        anything changed. Cheap when nothing did (one small query)."""
        with self._mutex:
            if self._version() == self.manifest.get("version"):
                return False
            self._load()
            return True

    def _read_segment(self, name: str, npz_file: str, map_file: str | None,
                      expect_size: int | None = None) -> _Segment:
        path = self.root / "segments" / npz_file
        if expect_size is not None:
            try:
                size = path.stat().st_size
            except FileNotFoundError as exc:
                raise CorruptIndexError(f"{path}: missing (the index catalogue names it)") from exc
            if size != expect_size:
                raise CorruptIndexError(f"{path}: {size} bytes, the catalogue records {expect_size} "
                                        "(truncated or replaced); run `isearch repair`")
        z = load_npz(path)
        try:
            n = len(z["ids"])
            seg = _Segment(
                name=name,
                ids=z["ids"].astype(np.int64),
                paths=[str(p) for p in z["paths"]],
                sizes=z["sizes"],
                sha256=[str(s) for s in z["sha256"]],
                mtimes=z["mtimes"],
                filesizes=z["filesizes"],
                local=z["local"],
                offsets=z["offsets"],
                vectors=z["vectors"],
                has_maps=bool(z["has_maps"]),
                tag=str(z["tag"]),
                map_offsets=z["map_offsets"].astype(np.int64) if "map_offsets" in z else None,
                npz_file=npz_file,
                map_file=map_file,
            )
        except KeyError as exc:
            raise CorruptIndexError(f"{path}: corrupt segment (no {exc})") from exc
        if not (len(seg.paths) == n == len(seg.offsets) - 1 == len(seg.vectors)):
            raise CorruptIndexError(f"{path}: corrupt segment (inconsistent lengths)")
        return seg

    # ---------------------------------------------------------------- writer lock
    @contextlib.contextmanager
    def _lock_held(self) -> Iterator[None]:
        with self._mutex:
            self._lock.acquire(self.wait)
            try:
                if not self._gc_done and (self.root / CATALOG).is_file():
                    self._gc_done = True
                    self._remove_leftovers()
                yield
            finally:
                self._lock.release()

    @contextlib.contextmanager
    def writing(self) -> Iterator["IndexStore"]:
        """Hold the writer lock over several writes (each write also takes it on its own); the store moves to
        the newest version first."""
        with self._lock_held():
            self.reload()
            yield self

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that bumps the version (call with the writer lock held)."""
        con = self._db()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
            con.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            raise

    def _referenced(self) -> tuple[set[str], set[str], set[str]]:
        con = self._db()
        segs = con.execute("SELECT npz_file, map_file FROM segments").fetchall()
        files = {r[0] for r in con.execute("SELECT name FROM files").fetchall()}
        return {s[0] for s in segs}, {s[1] for s in segs if s[1]}, files

    def leftovers(self) -> list[Path]:
        """Files that no catalogue row names in segments/, maps/, fitted/ (written under the lock, so left by
        a dead writer when nobody holds it), temp files of dead writers, and a migrated-away manifest's temps."""
        npz, maps, files = self._referenced()
        out: list[Path] = []
        for sub, named in (("segments", npz), ("maps", maps), ("fitted", files)):
            d = self.root / sub
            if d.is_dir():
                for f in sorted(d.iterdir()):
                    rel = f.name if sub != "fitted" else f.relative_to(d).as_posix()
                    if f.is_file() and rel not in named:
                        out.append(f)
        now = time.time()
        for f in sorted(self.root.iterdir()):
            if f.is_file() and f.name.startswith(".") and f.name.endswith(".tmp"):
                manifest_tmp = f.name.startswith(f".{MANIFEST}.") or f.name.startswith(f".{CATALOG}.") \
                    or f.name.startswith(f".{BACKUP}.")
                with contextlib.suppress(OSError):
                    if manifest_tmp or now - f.stat().st_mtime > STALE_TEMP_S:
                        out.append(f)
        return out

    def _remove_leftovers(self) -> list[Path]:
        gone = []
        for f in self.leftovers():
            with contextlib.suppress(OSError):
                f.unlink()
                gone.append(f)
        return gone

    def _write_backup_from(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.root / BACKUP, json.dumps(state, sort_keys=True, indent=1).encode())

    def _write_backup(self) -> None:
        con = self._db()
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        removed = [r[0] for r in con.execute("SELECT id FROM images WHERE removed = 1 ORDER BY id")]
        files = {r[0]: [r[1], r[2]] for r in con.execute("SELECT name, sha256, size FROM files")}
        self._write_backup_from({"settings": json.loads(meta["settings"]), "whitening": json.loads(meta["whitening"]),
                                 "removed": removed, "next_id": int(meta["next_id"]), "files": files})

    # ---------------------------------------------------------------- properties
    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    def _live(self) -> Iterable[tuple[_Segment, int]]:
        for name, row in self._live_rows:
            yield self._segments[name], row

    def __len__(self) -> int:
        return len(self._live_rows)

    def records(self) -> list[dict[str, Any]]:
        """Metadata of every live image, in index order (the order of :meth:`vectors`)."""
        return [dict(r) for r in self._records]

    def ids(self) -> np.ndarray:
        return np.asarray([r["id"] for r in self._records], np.int64)

    def vectors(self) -> np.ndarray:
        rows = [seg.vectors[i] for seg, i in self._live()]
        if not rows:
            return np.zeros((0, 0), np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def local_descriptors(self) -> list[np.ndarray]:
        """Per live image, its (R, C) pre-whitening local vectors (float32)."""
        return [seg.local[seg.offsets[i]:seg.offsets[i + 1]].astype(np.float32) for seg, i in self._live()]

    def path_index(self) -> dict[str, dict[str, Any]]:
        return {r["path"]: r for r in self.records()}

    def feature_map(self, image_id: int) -> np.ndarray:
        """The stored conv feature map (C,H,W) of ``image_id`` (dequantised)."""
        return self.feature_maps([image_id])[0]

    def _id_table(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(segment names, every stored id sorted, its segment number, its row): built once per set of segments,
        so that a short list's maps are found by binary search, not by a walk over the whole index."""
        names = list(self.manifest["segments"])
        key = tuple((n, id(self._segments[n])) for n in names)
        cached = getattr(self, "_id_table_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        lens = np.asarray([len(self._segments[n].ids) for n in names], np.int64)
        all_ids = np.concatenate([self._segments[n].ids for n in names] + [np.zeros(0, np.int64)])
        seg_of = np.repeat(np.arange(len(names)), lens)
        row_of = np.arange(len(all_ids)) - np.repeat(np.cumsum(lens) - lens, lens)
        order = np.argsort(all_ids, kind="stable")
        table = (names, all_ids[order], seg_of[order], row_of[order])
        self._id_table_cache = (key, table)
        return table

    def feature_maps(self, image_ids, sparse: bool = False) -> list:
        """Stored conv maps of several images, reading each segment's map file once (for a short list):
        dense (C, H, W) float32 arrays, or with ``sparse`` their non-zero cells
        (:class:`~instance_search.ops.integral.SparseMap`, what AML re-ranking works from, without the dense map).
        Each code is checked against its CRC-32 from the catalogue before it is decoded."""
        try:
            return self._feature_maps(image_ids, sparse)
        except _MapFileGone as gone:
            missing = gone.args[0]
            if self.reload():  # compacted or refreshed by another process since this version was read
                try:
                    return self._feature_maps(image_ids, sparse)
                except _MapFileGone as again:
                    missing = again.args[0]
        raise CorruptIndexError(f"{missing}: missing (the index catalogue names it); run `isearch repair`")

    def _feature_maps(self, image_ids, sparse: bool) -> list:
        removed = set(self.manifest["removed"])
        want = [int(i) for i in image_ids]
        names, sorted_ids, seg_of, row_of = self._id_table()
        by_seg: dict[str, list[tuple[int, int]]] = {}
        for k, i in enumerate(want):
            p = int(np.searchsorted(sorted_ids, i))
            if p >= len(sorted_ids) or sorted_ids[p] != i or i in removed:
                raise KeyError(f"image id {i} is not in the index {self.root}")
            name, j = names[seg_of[p]], int(row_of[p])
            if not self._segments[name].has_maps:
                raise CorruptIndexError(f"{self.root}: image {i} ({self._segments[name].paths[j]}) was indexed "
                                        "without conv maps (--no-maps); re-index it with maps to re-rank")
            by_seg.setdefault(name, []).append((k, j))
        out: list[np.ndarray | None] = [None] * len(want)
        for name, pairs in by_seg.items():
            seg = self._segments[name]
            if seg.map_offsets is None or seg.map_file is None:
                raise CorruptIndexError(f"{self.root / 'segments' / seg.npz_file}: its conv maps use the format of "
                                        "an older version; re-index these images to re-rank them")
            path = self.root / "maps" / seg.map_file
            total = int(seg.map_offsets[-1])
            try:
                mm = np.memmap(path, dtype=np.uint8, mode="r") if total > 0 else np.zeros(0, np.uint8)
            except FileNotFoundError:
                raise _MapFileGone(path) from None
            except (OSError, ValueError) as exc:
                raise CorruptIndexError(f"{path}: missing or unreadable ({exc})") from exc
            if mm.size != total:
                raise CorruptIndexError(f"{path}: {mm.size} bytes, the segment expects {total}")
            for k, j in pairs:
                key = (seg.map_file, int(seg.map_offsets[j]))
                if sparse and (hit := self._cached_map(key)) is not None:
                    out[k] = hit
                    continue
                code = mm[seg.map_offsets[j]:seg.map_offsets[j + 1]]
                if seg.map_crc is not None and map_checksum(code) != int(seg.map_crc[j]):
                    raise CorruptIndexError(f"{path}: map of {seg.paths[j]} is corrupt (checksum mismatch); "
                                            "run `isearch repair`")
                try:
                    out[k] = decode_sparse(code) if sparse else decode_map(code)
                except CompactMapError as exc:
                    raise CorruptIndexError(f"{path}: map of {seg.paths[j]} is corrupt ({exc})") from exc
                if sparse:
                    self._cache_map(key, out[k])
        return out  # type: ignore[return-value]

    def _cached_map(self, key: tuple[str, int]):
        with self._map_cache_lock:
            hit = self._map_cache.get(key)
            if hit is None:
                return None
            self._map_cache.move_to_end(key)
            return hit[0]

    def _cache_map(self, key: tuple[str, int], smap) -> None:
        """Keep a decoded sparse map (its arrays made read-only: the cached object is shared between short
        lists), evicting the least recently used beyond :attr:`map_cache_limit` bytes."""
        arrays = [a for a in (smap.channel, smap.position, smap.value) if isinstance(a, np.ndarray)]
        size = sum(a.nbytes for a in arrays)
        if size > self.map_cache_limit:
            return
        for a in arrays:
            a.flags.writeable = False
        with self._map_cache_lock:
            if key in self._map_cache:
                return
            self._map_cache[key] = (smap, size)
            self._map_cache_bytes += size
            while self._map_cache_bytes > self.map_cache_limit:
                self._map_cache_bytes -= self._map_cache.popitem(last=False)[1][1]

    # ---------------------------------------------------------------- stored files
    def add_file(self, name: str, data: bytes) -> str:
        """Store ``data`` as the immutable file ``fitted/<name>`` (atomic, under the writer lock) and record its
        sha256 in the catalogue; returns the sha256. Storing the same bytes again is a no-op; other bytes under
        an existing name are refused (files are immutable: use a new name)."""
        rel = _check_file_name(name)
        sha = sha256_bytes(bytes(data))
        with self._lock_held():
            row = self._db().execute("SELECT sha256 FROM files WHERE name = ?", (rel,)).fetchone()
            if row is not None:
                if row[0] != sha:
                    raise ValueError(f"{self.root / 'fitted' / rel}: already stored with other content "
                                     "(stored files are immutable; use a new name)")
                return sha
            atomic_write_bytes(self.root / "fitted" / rel, bytes(data))
            with self._transaction() as con:
                con.execute("INSERT INTO files(name, sha256, size) VALUES (?, ?, ?)", (rel, sha, len(data)))
            self._write_backup()
            self._load()
        return sha

    def read_file(self, name: str) -> bytes:
        """The bytes of a file stored with :meth:`add_file`, verified against its sha256."""
        rel = _check_file_name(name)
        path = self.root / "fitted" / rel
        rec = self._files.get(rel)
        if rec is None:
            self.reload()
            rec = self._files.get(rel)
        if rec is None:
            raise CorruptIndexError(f"{path}: not stored in the index catalogue")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptIndexError(f"{path}: missing or unreadable ({exc.__class__.__name__}); "
                                    "the index catalogue names it") from exc
        if sha256_bytes(data) != rec[0]:
            raise CorruptIndexError(f"{path}: checksum mismatch (damaged; {len(data)} bytes, "
                                    f"catalogue records {rec[1]})")
        return data

    def files(self) -> dict[str, str]:
        """Stored files: name -> sha256."""
        return {k: v[0] for k, v in self._files.items()}

    # ---------------------------------------------------------------- writing
    def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge ``changes`` into the settings atomically (under the writer lock, on the newest version);
        returns the new settings."""
        with self._lock_held():
            with self._transaction() as con:
                cur = json.loads(con.execute("SELECT value FROM meta WHERE key='settings'").fetchone()[0])
                cur.update(dict(changes))
                con.execute("UPDATE meta SET value = ? WHERE key = 'settings'", (json.dumps(cur, sort_keys=True),))
            self._write_backup()
            self._load()
        return dict(self.settings)

    def add(self, entries: list[Entry], tag: str = "none") -> list[int]:
        """Commit ``entries`` as one segment; returns their ids once they are durable.

        ``tag`` names the whitening their global vectors were computed with (see :meth:`refresh_vectors`).
        """
        if not entries:
            return []
        if any(e.vector is None for e in entries):
            raise ValueError("every entry needs its global vector before it is stored")
        # encode the maps before taking the lock: other writers wait only for the files and the transaction
        entries = [replace(e, fmap=encode_map(e.fmap))
                   if e.fmap is not None and not isinstance(e.fmap, (bytes, bytearray)) else e for e in entries]
        with self._lock_held():
            con = self._db()
            first = int(con.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])
            top = con.execute("SELECT MAX(id) FROM images").fetchone()[0]
            if top is not None and first <= top:  # e.g. edited by hand: new images would take stored ids
                raise CorruptIndexError(f"{self.root / CATALOG}: next_id {first} is not above the largest stored id "
                                        f"{top}; run `isearch repair`")
            ids = np.arange(first, first + len(entries), dtype=np.int64)
            name = f"seg-{first:09d}-{len(entries):06d}"  # unique: ids are never reused (next_id only grows)
            self._write_segment(name, entries, ids, tag, replace=None)
            self._load()
        return ids.tolist()

    def remove(self, ids: Iterable[int]) -> int:
        """Mark ``ids`` removed (durable after return); returns how many live images were removed."""
        want = sorted(set(int(i) for i in ids))
        if not want:
            return 0
        with self._lock_held():
            with self._transaction() as con:
                n = 0
                for i in want:
                    n += con.execute("UPDATE images SET removed = 1 WHERE id = ? AND removed = 0", (i,)).rowcount
            if n:
                self._write_backup()
            self._load()
        return n

    def stale_segments(self, tag: str) -> list[str]:
        """Segments whose global vectors were computed with another whitening than ``tag``."""
        return [n for n in self.manifest["segments"] if self._segments[n].tag != tag]

    def refresh_vectors(self, finalize, tag: str, progress=None) -> int:
        """Recompute the global vectors of every stale segment as ``finalize(list of (R,C) local arrays)``.

        Each segment is rewritten to a new file and switched in the catalogue in one transaction (the conv
        maps are kept); a crash part-way leaves some segments stale, and they are refreshed on the next call.
        Returns the number of segments rewritten.
        """
        done = 0
        with self._lock_held():
            self._load()
            for name in self.stale_segments(tag):
                seg = self._segments[name]
                path = self.root / "segments" / seg.npz_file
                z = load_npz(path)
                off = z["offsets"]
                local = [z["local"][off[i]:off[i + 1]].astype(np.float32) for i in range(len(off) - 1)]
                z["vectors"] = np.asarray(finalize(local), np.float32).reshape(len(local), -1)
                z["tag"] = np.asarray(tag)
                new_file = f"{name}.v{self._version() + 1}.npz"  # unique: the version only grows
                new_path = self.root / "segments" / new_file
                atomic_save_npz(new_path, **z)
                sha, size = file_sha256_size(new_path)
                with self._transaction() as con:
                    con.execute("UPDATE segments SET npz_file = ?, npz_sha256 = ?, npz_size = ?, tag = ? "
                                "WHERE name = ?", (new_file, sha, size, tag, name))
                if new_file != seg.npz_file:
                    path.unlink(missing_ok=True)
                done += 1
                if progress is not None:
                    progress(1)
            self._load()
        return done

    def set_whitening(self, info: dict[str, Any] | None) -> None:
        """Record the current whitening (``{"file": ..., "tag": ..., ...}``) durably in the catalogue."""
        with self._lock_held():
            with self._transaction() as con:
                con.execute("UPDATE meta SET value = ? WHERE key = 'whitening'",
                            (json.dumps(None if info is None else dict(info)),))
            self._write_backup()
            self._load()

    @property
    def whitening_info(self) -> dict[str, Any] | None:
        return self.manifest.get("whitening")

    def compact(self) -> None:
        """Merge all segments into one and drop removed images (atomic: one catalogue transaction)."""
        with self._lock_held():
            self._load()
            live = list(self._live())
            old = list(self.manifest["segments"])
            if len(old) <= 1 and not self.manifest["removed"]:
                return
            entries = []
            for seg, i in live:
                e = Entry(
                    path=seg.paths[i], width=int(seg.sizes[i, 0]), height=int(seg.sizes[i, 1]), sha256=seg.sha256[i],
                    mtime=float(seg.mtimes[i]), size=int(seg.filesizes[i]),
                    local=seg.local[seg.offsets[i]:seg.offsets[i + 1]].astype(np.float32),
                    vector=seg.vectors[i],
                    fmap=self._map_code(seg, i) if seg.has_maps else None,
                )
                e.id = int(seg.ids[i])
                entries.append(e)
            if entries and not all(e.fmap is not None for e in entries):
                for e in entries:
                    e.fmap = None
            tags = {seg.tag for seg, _ in live}
            tag = tags.pop() if len(tags) == 1 else "mixed"
            self._write_segment(f"seg-compact-{self._version() + 1:09d}", entries,
                                np.asarray([e.id for e in entries], np.int64), tag, replace=old)
            self._write_backup()
            self._remove_leftovers()
            self._load()

    def _map_code(self, seg: _Segment, i: int) -> bytes:
        """The stored (checked) compact code of row ``i`` of ``seg``."""
        path = self.root / "maps" / str(seg.map_file)
        data = np.memmap(path, dtype=np.uint8, mode="r") if seg.map_offsets[-1] > 0 else np.zeros(0, np.uint8)
        code = bytes(data[seg.map_offsets[i]:seg.map_offsets[i + 1]])
        if seg.map_crc is not None and map_checksum(code) != int(seg.map_crc[i]):
            raise CorruptIndexError(f"{path}: map of {seg.paths[i]} is corrupt (checksum mismatch); "
                                    "run `isearch repair`")
        return code

    def _write_segment(self, name: str, entries: list[Entry], ids: np.ndarray, tag: str,
                       replace: list[str] | None) -> None:
        """Write one segment file (and its maps) durably, then publish it in one catalogue transaction that
        also advances ``next_id`` (``replace``: segment names it supersedes, e.g. by compaction). Lock held."""
        local = [np.asarray(e.local, np.float32) for e in entries]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in local])]).astype(np.int64)
        has_maps = bool(entries) and all(e.fmap is not None for e in entries)
        extra, crcs, map_file, map_sha, map_size = {}, [None] * len(entries), None, None, None
        if has_maps:
            # fmap may arrive already encoded (bytes from encode_map, e.g. by a distributed worker)
            codes = [bytes(e.fmap) if isinstance(e.fmap, (bytes, bytearray)) else encode_map(e.fmap) for e in entries]
            blob = b"".join(codes)
            map_file = f"{name}.cmap"
            atomic_write_bytes(self.root / "maps" / map_file, blob)
            map_sha, map_size = sha256_bytes(blob), len(blob)
            crcs = [map_checksum(c) for c in codes]
            extra["map_offsets"] = np.concatenate([[0], np.cumsum([len(c) for c in codes])]).astype(np.int64)
        npz_file = f"{name}.npz"
        npz_path = self.root / "segments" / npz_file
        atomic_save_npz(
            npz_path, ids=ids,
            paths=np.asarray([e.path for e in entries], dtype=str),
            sizes=np.asarray([[e.width, e.height] for e in entries], np.int32).reshape(-1, 2),
            sha256=np.asarray([e.sha256 for e in entries], dtype=str),
            mtimes=np.asarray([e.mtime for e in entries], np.float64),
            filesizes=np.asarray([e.size for e in entries], np.int64),
            local=(np.concatenate(local) if local else np.zeros((0, 1))).astype(np.float16),
            offsets=offsets,
            vectors=(np.stack([np.asarray(e.vector, np.float32) for e in entries]) if entries
                     else np.zeros((0, 1), np.float32)),
            has_maps=np.asarray(has_maps),
            tag=np.asarray(tag),
            **extra,
        )
        sha, size = file_sha256_size(npz_path)
        with self._transaction() as con:
            if replace is not None:
                for old in replace:
                    con.execute("DELETE FROM images WHERE segment = ?", (old,))
                    con.execute("DELETE FROM segments WHERE name = ?", (old,))
            if entries:
                con.execute("INSERT INTO segments(name, n, tag, npz_file, npz_sha256, npz_size, map_file, map_sha256,"
                            " map_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (name, len(entries), tag, npz_file, sha, size, map_file, map_sha, map_size))
                con.executemany(
                    "INSERT INTO images(id, segment, row, path, width, height, sha256, mtime, size, map_crc) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(int(i), name, r, e.path, int(e.width), int(e.height), e.sha256, float(e.mtime), int(e.size), c)
                     for r, (i, e, c) in enumerate(zip(ids, entries, crcs))])
            if len(ids):
                con.execute("UPDATE meta SET value = CAST(MAX(CAST(value AS INTEGER), ?) AS TEXT) "
                            "WHERE key = 'next_id'", (int(ids.max()) + 1,))
        if not entries:
            npz_path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- migration
    def _migrate(self) -> None:
        """Convert an index folder of the earlier ``manifest.json`` format (format 1) to the catalogue, once:
        the segment files stay where they are; the manifest is kept as ``manifest.v1.json``."""
        with self._lock_held():
            if (self.root / CATALOG).is_file():
                return  # another process migrated it while this one waited
            mpath = self.root / MANIFEST
            try:
                manifest = json.loads(mpath.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CorruptIndexError(f"{mpath}: corrupt manifest ({exc})") from exc
            if not isinstance(manifest, dict) or manifest.get("format") != LEGACY_FORMAT_VERSION:
                raise CorruptIndexError(f"{mpath}: not an instance-search index manifest (format "
                                        f"{manifest.get('format') if isinstance(manifest, dict) else '?'!r})")
            for key in ("settings", "segments", "removed", "next_id"):
                if key not in manifest:
                    raise CorruptIndexError(f"{mpath}: corrupt manifest (no '{key}')")
            tmp = self.root / f".{CATALOG}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            con = connect_catalog(tmp, 5.0)
            try:
                max_id = -1
                init_catalog(con, manifest["settings"], 0, manifest.get("whitening"),
                              manifest.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")))
                con.execute("BEGIN")
                removed = set(int(i) for i in manifest["removed"])
                for name in manifest["segments"]:
                    npz_file = f"{name}.npz"
                    seg = self._read_segment(name, npz_file, None)
                    sha, size = file_sha256_size(self.root / "segments" / npz_file)
                    map_file = map_sha = map_size = None
                    crcs: list[int | None] = [None] * len(seg.ids)
                    if seg.has_maps and seg.map_offsets is not None:
                        map_file = f"{name}.cmap"
                        mpath_ = self.root / "maps" / map_file
                        try:
                            blob = mpath_.read_bytes()
                        except OSError as exc:
                            raise CorruptIndexError(f"{mpath_}: missing or unreadable ({exc})") from exc
                        map_sha, map_size = sha256_bytes(blob), len(blob)
                        mo = seg.map_offsets
                        crcs = [map_checksum(blob[mo[i]:mo[i + 1]]) for i in range(len(seg.ids))]
                    register_segment(con, seg, sha, size, map_file, map_sha, map_size, crcs, removed)
                    if len(seg.ids):
                        max_id = max(max_id, int(seg.ids.max()))
                next_id = max(int(manifest["next_id"]), max_id + 1)
                con.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (str(next_id),))
                con.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                con.close()
                tmp.unlink(missing_ok=True)
                raise CorruptIndexError(f"{mpath}: cannot migrate ({exc}: an id is stored twice)") from exc
            except BaseException:
                con.close()
                tmp.unlink(missing_ok=True)
                raise
            con.close()
            os.replace(tmp, self.root / CATALOG)
            fsync_dir(self.root)
            self._write_backup()
            os.replace(mpath, self.root / MIGRATED_MANIFEST)
            fsync_dir(self.root)
            notify(f"{self.root}: migrated the index from the earlier manifest.json format to the SQLite catalogue "
                   f"{CATALOG} (once; the old manifest is kept as {MIGRATED_MANIFEST})")


def register_segment(con: sqlite3.Connection, seg: _Segment, sha: str, size: int, map_file: str | None,
                      map_sha: str | None, map_size: int | None, crcs: list, removed: set[int]) -> None:
    """Catalogue rows for an existing segment file (migration, repair); inside the caller's transaction."""
    con.execute("INSERT INTO segments(name, n, tag, npz_file, npz_sha256, npz_size, map_file, map_sha256, map_size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seg.name, len(seg.ids), seg.tag, seg.npz_file, sha, size, map_file, map_sha, map_size))
    con.executemany(
        "INSERT INTO images(id, segment, row, path, width, height, sha256, mtime, size, map_crc, removed) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(int(seg.ids[r]), seg.name, r, seg.paths[r], int(seg.sizes[r, 0]), int(seg.sizes[r, 1]), seg.sha256[r],
          float(seg.mtimes[r]), int(seg.filesizes[r]), crcs[r], int(int(seg.ids[r]) in removed))
         for r in range(len(seg.ids))])


class _MapFileGone(Exception):
    """A map file the loaded catalogue version names is gone (args: its path)."""


def _check_file_name(name: str) -> str:
    """A stored file's name: relative, no '..', no hidden parts, printable."""
    rel = Path(str(name))
    if (not str(name) or rel.is_absolute() or any(p in ("", ".", "..") or p.startswith(".") for p in rel.parts)
            or any(not c.isprintable() for c in str(name))):
        raise ValueError(f"stored file name {name!r}: give a relative name without '..' or hidden parts")
    return rel.as_posix()
