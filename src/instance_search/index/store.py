"""Durable on-disk collection: per-image local descriptors, global vectors, compact conv maps, metadata.

Layout of an index folder::

    manifest.json            the only source of truth: settings, committed segments, removed ids
    segments/seg-NNNNNN.npz  one committed batch: ids, metadata, region descriptors, global vectors
    maps/seg-NNNNNN.cmap     the same batch's conv feature maps in the compact code of index/compact.py
                             (Tolias et al. 2016 Sec. 7), concatenated; read memory-mapped (optional).
    whitening.npz            the fitted PCA-whitening (if any)

Crash safety: a segment is written to a temporary file, fsynced and renamed into place *before* the
manifest that names it is atomically replaced (write temp, fsync, ``os.replace``, fsync the folder).
A kill at any moment therefore leaves either the old or the new manifest, both naming only complete
files; segment files that no manifest names are leftovers and are deleted on the next open for writing.
Nothing is reported as stored before the manifest that names it is on disk.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..io import atomic_save_npz, atomic_write_bytes  # noqa: F401  (re-exported)
from .compact import CompactMapError, decode_map, decode_sparse, encode_map

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class IndexError_(RuntimeError):
    """A missing, corrupt or incompatible index folder (the message names the file)."""


# A friendlier public name; ``IndexError`` would shadow the builtin.
CorruptIndexError = IndexError_


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load an ``.npz`` without pickles; any damage raises :class:`CorruptIndexError` naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise CorruptIndexError(f"{path}: missing (the index manifest names it)") from exc
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise CorruptIndexError(f"{path}: corrupt or unreadable ({exc.__class__.__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------
# compact conv maps


# --------------------------------------------------------------------------------------------------


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
    map_offsets: np.ndarray | None = None  # (n+1,) byte offsets into maps/<name>.cmap (None: old .npz maps)


@dataclass
class IndexStore:
    """A collection index on disk. Open with :meth:`create` or :meth:`open`."""

    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    _segments: dict[str, _Segment] = field(default_factory=dict)

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, root: str | os.PathLike, settings: dict[str, Any]) -> "IndexStore":
        root = Path(root)
        if (root / MANIFEST).exists():
            raise IndexError_(f"{root}: an index already exists here")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        store.manifest = {
            "format": FORMAT_VERSION,
            "settings": dict(settings),
            "segments": [],
            "removed": [],
            "next_id": 0,
            "whitening": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        store._commit()
        return store

    @classmethod
    def exists(cls, root: str | os.PathLike) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def open(cls, root: str | os.PathLike, *, writable: bool = False) -> "IndexStore":
        root = Path(root)
        mpath = root / MANIFEST
        if not root.exists():
            raise IndexError_(f"{root}: no index here (folder does not exist); build one with `isearch index`")
        if not mpath.is_file():
            raise IndexError_(f"{mpath}: missing; {root} is not an index folder (build one with `isearch index`)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexError_(f"{mpath}: corrupt manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise IndexError_(f"{mpath}: not an instance-search index manifest (format {manifest.get('format')!r})"
                              if isinstance(manifest, dict) else f"{mpath}: corrupt manifest")
        for key in ("settings", "segments", "removed", "next_id"):
            if key not in manifest:
                raise IndexError_(f"{mpath}: corrupt manifest (no '{key}')")
        store = cls(root, manifest)
        for name in manifest["segments"]:
            store._segments[name] = store._read_segment(name)
        if writable:
            store._remove_leftovers()
        return store

    def _read_segment(self, name: str) -> _Segment:
        path = self.root / "segments" / f"{name}.npz"
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
            )
        except KeyError as exc:
            raise CorruptIndexError(f"{path}: corrupt segment (no {exc})") from exc
        if not (len(seg.paths) == n == len(seg.offsets) - 1 == len(seg.vectors)):
            raise CorruptIndexError(f"{path}: corrupt segment (inconsistent lengths)")
        return seg

    def _remove_leftovers(self) -> None:
        named = set(self.manifest["segments"])
        for sub in ("segments", "maps"):
            d = self.root / sub
            if not d.is_dir():
                continue
            for f in d.iterdir():
                stem = f.name.split(".npz")[0].split(".cmap")[0]
                if f.name.startswith(".") or stem not in named:
                    try:
                        f.unlink()
                    except OSError:
                        pass

    def _commit(self) -> None:
        data = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
        atomic_write_bytes(self.root / MANIFEST, data)

    # ---------------------------------------------------------------- properties
    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    def _live(self) -> Iterable[tuple[_Segment, int]]:
        removed = set(self.manifest["removed"])
        for name in self.manifest["segments"]:
            seg = self._segments[name]
            for i, id_ in enumerate(seg.ids):
                if int(id_) not in removed:
                    yield seg, i

    def __len__(self) -> int:
        return sum(1 for _ in self._live())

    def records(self) -> list[dict[str, Any]]:
        """Metadata of every live image, in index order (the order of :meth:`vectors`)."""
        return [
            {
                "id": int(seg.ids[i]),
                "path": seg.paths[i],
                "width": int(seg.sizes[i, 0]),
                "height": int(seg.sizes[i, 1]),
                "sha256": seg.sha256[i],
                "mtime": float(seg.mtimes[i]),
                "size": int(seg.filesizes[i]),
            }
            for seg, i in self._live()
        ]

    def ids(self) -> np.ndarray:
        return np.asarray([int(seg.ids[i]) for seg, i in self._live()], np.int64)

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
        (:class:`~instance_search.ops.integral.SparseMap`, what AML re-ranking works from, without the dense map)."""
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
                raise IndexError_(f"{self.root}: image {i} ({self._segments[name].paths[j]}) was indexed without "
                                  f"conv maps (--no-maps); re-index it with maps to re-rank")
            by_seg.setdefault(name, []).append((k, j))
        out: list[np.ndarray | None] = [None] * len(want)
        for name, pairs in by_seg.items():
            seg = self._segments[name]
            if seg.map_offsets is not None:
                path = self.root / "maps" / f"{name}.cmap"
                try:
                    mm = np.memmap(path, dtype=np.uint8, mode="r") if seg.map_offsets[-1] > 0 else np.zeros(0, np.uint8)
                except (OSError, ValueError) as exc:
                    raise CorruptIndexError(f"{path}: missing or unreadable ({exc})") from exc
                if mm.size != seg.map_offsets[-1]:
                    raise CorruptIndexError(f"{path}: {mm.size} bytes, the segment expects {seg.map_offsets[-1]}")
                for k, j in pairs:
                    try:
                        code = mm[seg.map_offsets[j]:seg.map_offsets[j + 1]]
                        out[k] = decode_sparse(code) if sparse else decode_map(code)
                    except CompactMapError as exc:
                        raise CorruptIndexError(f"{path}: map of {seg.paths[j]} is corrupt ({exc})") from exc
                continue
            raise CorruptIndexError(f"{self.root / 'segments' / name}.npz: its conv maps use the format of an older "
                                    "version; re-index these images to re-rank them")
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- writing
    def add(self, entries: list[Entry], tag: str = "none") -> list[int]:
        """Commit ``entries`` as one segment; returns their ids once they are durable.

        ``tag`` names the whitening their global vectors were computed with (see :meth:`refresh_vectors`).
        """
        if not entries:
            return []
        first = self.manifest["next_id"]
        ids = np.arange(first, first + len(entries), dtype=np.int64)
        if any(e.vector is None for e in entries):
            raise ValueError("every entry needs its global vector before it is stored")
        name = f"seg-{first:09d}-{len(self.manifest['segments']):06d}"
        self._write_segment(name, entries, ids, tag)
        self.manifest["segments"].append(name)
        self.manifest["next_id"] = int(first + len(entries))
        self._commit()
        return ids.tolist()

    def remove(self, ids: Iterable[int]) -> int:
        """Mark ``ids`` removed (durable after return); returns how many live images were removed."""
        live = set(self.ids().tolist())
        todo = sorted(set(int(i) for i in ids) & live)
        if todo:
            self.manifest["removed"] = sorted(set(self.manifest["removed"]) | set(todo))
            self._commit()
        return len(todo)

    def stale_segments(self, tag: str) -> list[str]:
        """Segments whose global vectors were computed with another whitening than ``tag``."""
        return [n for n in self.manifest["segments"] if self._segments[n].tag != tag]

    def refresh_vectors(self, finalize, tag: str, progress=None) -> int:
        """Recompute the global vectors of every stale segment as ``finalize(list of (R,C) local arrays)``.

        Each segment is rewritten atomically with the new ``tag``; a crash part-way leaves some segments
        stale, and they are refreshed on the next call. Returns the number of segments rewritten.
        """
        stale = self.stale_segments(tag)
        for name in stale:
            path = self.root / "segments" / f"{name}.npz"
            z = load_npz(path)
            off = z["offsets"]
            local = [z["local"][off[i]:off[i + 1]].astype(np.float32) for i in range(len(off) - 1)]
            z["vectors"] = np.asarray(finalize(local), np.float32).reshape(len(local), -1)
            z["tag"] = np.asarray(tag)
            atomic_save_npz(path, **z)
            self._segments[name] = self._read_segment(name)
            if progress is not None:
                progress(1)
        return len(stale)

    def set_whitening(self, info: dict[str, Any] | None) -> None:
        """Record the current whitening (``{"file": ..., "tag": ..., ...}``) durably in the manifest."""
        self.manifest["whitening"] = None if info is None else dict(info)
        self._commit()

    @property
    def whitening_info(self) -> dict[str, Any] | None:
        return self.manifest.get("whitening")

    def compact(self) -> None:
        """Merge all segments into one and drop removed images (atomic: the manifest switches at once)."""
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
                fmap=self.feature_map(int(seg.ids[i])) if seg.has_maps else None,
            )
            e.id = int(seg.ids[i])
            entries.append(e)
        if entries and not all(e.fmap is not None for e in entries):
            for e in entries:
                e.fmap = None
        # The new segment keeps the old ids so that references stay valid.
        name = f"seg-compact-{time.time_ns()}"
        if entries:
            tags = {seg.tag for seg, _ in live}
            tag = tags.pop() if len(tags) == 1 else "mixed"
            self._write_segment(name, entries, np.asarray([e.id for e in entries], np.int64), tag)
        self.manifest["segments"] = [name] if entries else []
        self.manifest["removed"] = []
        self._commit()
        self._segments = {n: self._segments[n] for n in self.manifest["segments"]}
        self._remove_leftovers()

    def _write_segment(self, name: str, entries: list[Entry], ids: np.ndarray, tag: str) -> None:
        """Write one complete segment file (and its maps) durably; the manifest is not touched."""
        local = [np.asarray(e.local, np.float32) for e in entries]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in local])]).astype(np.int64)
        has_maps = bool(entries) and all(e.fmap is not None for e in entries)
        extra = {}
        if has_maps:
            # fmap may arrive already encoded (bytes from encode_map, e.g. by a distributed worker)
            codes = [bytes(e.fmap) if isinstance(e.fmap, (bytes, bytearray)) else encode_map(e.fmap) for e in entries]
            (self.root / "maps").mkdir(exist_ok=True)
            atomic_write_bytes(self.root / "maps" / f"{name}.cmap", b"".join(codes))
            extra["map_offsets"] = np.concatenate([[0], np.cumsum([len(c) for c in codes])]).astype(np.int64)
        atomic_save_npz(
            self.root / "segments" / f"{name}.npz", ids=ids,
            paths=np.asarray([e.path for e in entries], dtype=str),
            sizes=np.asarray([[e.width, e.height] for e in entries], np.int32).reshape(-1, 2),
            sha256=np.asarray([e.sha256 for e in entries], dtype=str),
            mtimes=np.asarray([e.mtime for e in entries], np.float64),
            filesizes=np.asarray([e.size for e in entries], np.int64),
            local=(np.concatenate(local) if local else np.zeros((0, 1))).astype(np.float16),
            offsets=offsets,
            vectors=np.stack([np.asarray(e.vector, np.float32) for e in entries]) if entries else np.zeros((0, 1), np.float32),
            has_maps=np.asarray(has_maps),
            tag=np.asarray(tag),
            **extra,
        )
        self._segments[name] = self._read_segment(name)
