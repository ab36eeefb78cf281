"""The search service behind the server: one index (a :class:`~instance_search.collection.Collection`), the
ground truth that scores hits, bounded decoding, stored thumbnails, uploads."""
from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from PIL import Image

from ..images import MAX_PIXELS, Box, ImageError, clip_box, load_image
from ..io import atomic_write_bytes, file_sha256
from .guard import (DEFAULT_MAX_DECODES, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PIXEL_BUDGET, DEFAULT_UPLOADS_PER_MINUTE,
                    UPLOAD_FORMATS, BadRequest, DecodeGate, UploadRate, copy_limited, client_name,
                    probe_image, sanitize_stem, verify_image)

UPLOAD_FOLDER = "uploads"
THUMB_FOLDER = "thumbs"
MAX_THUMB = 512  # the stored master thumbnail's longer side; larger requests get this size
CACHED_THUMB_SIZES = (64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------- ground truth
_UKBENCH = re.compile(r"ukbench(\d{5})", re.I)


class GroundTruth:
    """Which object (group) each image shows, to score a ranked list with precision@k.

    ``GroundTruth.load`` takes ``None``; ``"ukbench"`` (group = number // 4 of ``ukbenchNNNNN.*`` names); a dict
    or a JSON file ``{"groups": {path_or_file_name: group}}`` (groups are strings or integers). Images are
    matched by their full path first, then by file name.
    """

    def __init__(self, groups: Mapping[str, str] | None = None, rule: str | None = None, source: str = ""):
        self.groups = dict(groups or {})
        self.by_name = {Path(k).name: v for k, v in self.groups.items()}
        self.rule = rule
        self.source = source

    @classmethod
    def load(cls, source: "str | os.PathLike | Mapping | GroundTruth | None") -> "GroundTruth | None":
        if source is None or isinstance(source, GroundTruth):
            return source
        if isinstance(source, str) and source.lower() == "ukbench":
            return cls(rule="ukbench", source="ukbench file names (group = number // 4)")
        if isinstance(source, Mapping):
            return cls(cls._validate(source, "ground truth"), source="dict")
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the ground truth ({exc.strerror or exc})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: the ground truth is not valid JSON ({exc})") from exc
        return cls(cls._validate(data, str(path)), source=str(path))

    @staticmethod
    def _validate(data: Any, where: str) -> dict[str, str]:
        groups = data.get("groups") if isinstance(data, Mapping) else None
        if not isinstance(groups, Mapping):
            raise ValueError(f'{where}: expected {{"groups": {{path_or_name: group, ...}}}}')
        out = {}
        for k, v in groups.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (str, int)):
                raise ValueError(f"{where}: group of {k!r} must be a string or an integer, got {v!r}")
            out[k] = str(v)
        return out

    def group_of(self, path: str | None) -> str | None:
        if not path:
            return None
        if self.rule == "ukbench":
            m = _UKBENCH.fullmatch(Path(path).stem)
            return str(int(m.group(1)) // 4) if m else None
        return self.groups.get(path) or self.by_name.get(Path(path).name)

    def describe(self) -> str:
        return self.source


# ---------------------------------------------------------------------------------------------- service
class SearchService:
    """The state behind the app: one :class:`Collection`, its id → record map, a lock, the decode gate, the
    upload rate and the thumbnails. Before each request it moves to the index's newest version, so images
    added or removed by other processes (``isearch index`` beside the server) show up."""

    def __init__(self, index_dir: str | os.PathLike, *, ground_truth=None, allow_uploads: bool = True,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_files: int = 32, max_top: int = 100,
                 show_paths: bool = False, weights: str | None = None, device: str = "cpu",
                 thumb_cache: int = 512, max_decodes: int = DEFAULT_MAX_DECODES,
                 pixel_budget: int = DEFAULT_PIXEL_BUDGET, uploads_per_minute: int = DEFAULT_UPLOADS_PER_MINUTE,
                 engine: str = "auto"):
        from ..collection import Collection

        self.index_dir = Path(index_dir).resolve()
        self._weights, self._device = weights, device
        self.col = Collection.open(self.index_dir, writable=allow_uploads, weights=weights, device=device,
                                   engine=engine)
        self.gate = DecodeGate(max_decodes=max_decodes, pixel_budget=pixel_budget)
        self.rate = UploadRate(uploads_per_minute)
        self.thumb_dir = self.index_dir / THUMB_FOLDER
        self.thumb_renders = 0  # thumbnails made by decoding an original (tests: once per image)
        self.allow_uploads = allow_uploads
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_files = int(max_files)
        self.max_top = int(max_top)
        self.show_paths = show_paths
        self.gt = GroundTruth.load(ground_truth)
        self.upload_dir = self.index_dir / UPLOAD_FOLDER
        self.lock = threading.RLock()
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_cache = thumb_cache
        self._thumb_lock = threading.Lock()
        self._thumb_make_lock = threading.Lock()
        self._thumb_making: dict[str, threading.Lock] = {}
        self._min_side: int | None = None
        params = inspect.signature(self.col.search).parameters
        # first_stage is not offered: the server crops an uploaded query to its box itself (the revisited protocol)
        self.search_options = sorted(k for k, p in params.items() if k not in ("image", "box", "top", "first_stage")
                                     and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        self._reload_records()

    # ----------------------------------------------------------------- records
    def refresh(self) -> bool:
        """Move to the index's newest version if another process changed it (cheap when none did)."""
        from ..collection import Collection

        with self.lock:
            before = self.col.store.whitening_info
            if not self.col.store.reload():
                return False
            if self.col.store.whitening_info != before:  # a new whitening: the collection must load it
                fresh = Collection.open(self.index_dir, writable=False, weights=self._weights, device=self._device,
                                        engine=self.col.describer.engine)
                fresh.describer = self.col.describer  # keep the loaded network
                self.col = fresh
            self.col.invalidate()  # rebuilt from the new version on the next search
            self._reload_records()
            return True

    def _reload_records(self) -> None:
        recs = self.col.store.records()
        by_id = {int(r["id"]): r for r in recs}
        by_sha = {r["sha256"]: r for r in recs}
        counts: dict[str, int] = {}
        groups: dict[int, str | None] = {}
        for r in recs:
            g = self.gt.group_of(r["path"]) if self.gt else None
            groups[int(r["id"])] = g
            if g is not None:
                counts[g] = counts.get(g, 0) + 1
        # swap in one go: readers (thumbnails) never see a half-built map
        self.by_id, self.by_sha, self.groups, self.group_counts = by_id, by_sha, groups, counts
        self.order = [int(r["id"]) for r in recs]

    def record(self, image_id: int) -> dict[str, Any] | None:
        return self.by_id.get(image_id)

    def image_json(self, rec: dict[str, Any]) -> dict[str, Any]:
        out = {"id": int(rec["id"]), "name": Path(rec["path"]).name, "thumbnail": f"/api/thumbnail/{rec['id']}"}
        if self.show_paths:
            out["path"] = rec["path"]
        if self.gt is not None:
            out["group"] = self.groups.get(int(rec["id"]))
        return out

    def list_images(self, offset: int, limit: int, name: str | None = None) -> dict[str, Any]:
        """A page of indexed images in index order; ``name``: only those whose file name contains it
        (case-insensitive). ``total`` counts the matching images."""
        self.refresh()
        order, by_id = self.order, self.by_id
        if name:
            needle = name.casefold()
            order = [i for i in order if needle in Path(by_id[i]["path"]).name.casefold()]
        return {"total": len(order), "offset": offset, "limit": limit, "name": name or None,
                "images": [self.image_json(by_id[i]) for i in order[offset:offset + limit]]}

    def original(self, image_id: int) -> tuple[bytes, str, str] | None:
        """(bytes, media type, file name) of an indexed image's file, looked up by id only; ``None`` for an
        unknown id; :class:`ImageError` when the file is gone or is not an image any more."""
        self.refresh()
        rec = self.record(image_id)
        if rec is None:
            return None
        path = Path(rec["path"])
        try:
            fmt, _, _ = probe_image(path, path.name)
        except BadRequest as exc:
            raise ImageError(f"image {image_id}: its file is missing or no longer readable") from exc
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"image {image_id}: its file is missing or no longer readable") from exc
        media = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                 "BMP": "image/bmp", "TIFF": "image/tiff", "WEBP": "image/webp"}.get(fmt, "application/octet-stream")
        return data, media, path.name

    def remove(self, image_id: int) -> dict[str, Any]:
        """Take one image out of the index (its file stays on disk). 403 on a read-only server, 404 for an id
        that is not (or no longer) indexed."""
        if not self.allow_uploads:
            raise BadRequest(403, "this server was started read-only (removing images is off)")
        self.refresh()
        with self.lock:
            rec = self.record(image_id)
            if rec is None:
                raise BadRequest(404, f"no image with id {image_id} in this index (already removed?)")
            n = self.col.store.remove([image_id])
            self.col.invalidate()
            self._reload_records()
        return {"removed": n, "id": image_id, "name": Path(rec["path"]).name, "total": len(self.col)}

    # ----------------------------------------------------------------- thumbnails
    def thumbnail(self, image_id: int, size: int) -> bytes | None:
        """JPEG thumbnail of an indexed image, at most ``min(size, MAX_THUMB)`` px. The original is decoded once
        (under the decode gate) into a ``MAX_THUMB``-px master stored in ``<index>/thumbs/`` by its sha256; every
        size is then made from that small master, never from the original again."""
        rec = self.record(image_id)
        if rec is None:
            return None
        size = min(int(size), MAX_THUMB)
        key = (rec["sha256"], size)
        with self._thumb_lock:
            data = self._thumbs.get(key)
            if data is not None:
                self._thumbs.move_to_end(key)
                return data
        master = self._thumb_master(rec)
        if size == MAX_THUMB:
            data = master
        else:
            with Image.open(BytesIO(master)) as im:
                im.draft("RGB", (size, size))
                im = im.convert("RGB")
                im.thumbnail((size, size), Image.Resampling.LANCZOS)
                buf = BytesIO()
                im.save(buf, format="JPEG", quality=85, optimize=True)
                data = buf.getvalue()
        if size in CACHED_THUMB_SIZES:  # other sizes are served but not kept (bounded memory)
            with self._thumb_lock:
                self._thumbs[key] = data
                while len(self._thumbs) > self._thumb_cache:
                    self._thumbs.popitem(last=False)
        return data

    def _thumb_master(self, rec: dict[str, Any]) -> bytes:
        sha = str(rec["sha256"])
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ImageError(f"image {rec['id']}: no checksum to name its thumbnail by")
        path = self.thumb_dir / sha[:2] / f"{sha}-{MAX_THUMB}.jpg"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        with self._thumb_make_lock:  # one render per image even when many ask for it at once
            lock = self._thumb_making.setdefault(sha, threading.Lock())
        with lock:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                pass
            w, h = int(rec.get("width") or 0), int(rec.get("height") or 0)
            if not w or not h:
                _, w, h = probe_image(Path(rec["path"]), Path(rec["path"]).name)
            with self.gate.decoding(w * h, Path(rec["path"]).name):
                img = load_image(rec["path"], max_size=MAX_THUMB)  # ImageError when the file went away
            self.thumb_renders += 1
            buf = BytesIO()
            img.save(buf, format="JPEG", quality=88, optimize=True)
            data = buf.getvalue()
            atomic_write_bytes(path, data)
            with self._thumb_make_lock:
                self._thumb_making.pop(sha, None)
            return data

    # ----------------------------------------------------------------- size check
    def check_describable(self, name: str, width: int, height: int, box: Box | None = None) -> None:
        """Refuse (422) an image that, cropped to ``box`` and scaled to the recipe's ``max_size`` the way
        :func:`load_image` does, has a side shorter than the network's stride: it has no feature map."""
        if box is not None:
            x1, y1, x2, y2 = clip_box(box, width, height, name=name)
            width, height = x2 - x1, y2 - y1
        max_size = self.col.recipe.max_size
        s = max_size / max(width, height) if max_size else 1.0
        if s < 1.0:  # as images.resize_max
            width, height = max(1, round(width * s)), max(1, round(height * s))
        need = self.min_side()
        if min(width, height) < need:
            what = "cropped to the box and scaled" if box is not None else "scaled"
            raise BadRequest(422, f"{name}: {width}x{height} pixels once {what} to at most {max_size} px is too "
                                 f"small to describe; each side needs at least {need} pixels")

    def min_side(self) -> int:
        """The stride of the recipe's layer: the shortest image side that still gives a feature map."""
        if self._min_side is None:
            d = self.col.describer
            self._min_side = int(d.backbone.stride(d.layer))
        return self._min_side

    # ----------------------------------------------------------------- options
    def parse_options(self, text: str | None) -> dict[str, Any]:
        if text is None or text.strip() == "":
            return {}
        try:
            opts = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"options: not valid JSON ({exc})") from None
        if not isinstance(opts, dict):
            raise ValueError("options: expected a JSON object")
        for k, v in opts.items():
            if k not in self.search_options:
                known = ", ".join(self.search_options) or "none yet"
                raise ValueError(f"options: unknown option {k!r} (known: {known})")
            if k in ("rerank_options", "qe_options"):  # the re-ranker's / expansion's own options, flat
                if v is None:
                    continue
                if not isinstance(v, dict) or not all(isinstance(x, str) and (y is None or isinstance(
                        y, (bool, int, float, str))) for x, y in v.items()):
                    raise ValueError(f"options: {k} must be an object of numbers, strings, booleans or nulls, "
                                     f'e.g. {{"vectors": "max"}}')
                if "detector" in v:
                    raise ValueError(f"options: {k}: give the cs-sr detector as the option 'detector'")
                continue
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise ValueError(f"options: {k} must be a number, string, boolean or null")
        if opts.get("detector") is not None:  # cs-sr: the name of a detector file in <index>/detectors/, no path
            name = str(opts["detector"])
            det = self.index_dir / "detectors" / name
            if Path(name).name != name or name in (".", "..") or not det.is_file():
                raise ValueError(f"options: detector {name!r} is not a file in the index's detectors/ folder")
            opts["detector"] = str(det)
        return opts

    # ----------------------------------------------------------------- search
    def _pipeline_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` (keyword arguments of ``Collection.search``) with that method's defaults filled in."""
        params = inspect.signature(self.col.search).parameters
        return {k: options.get(k, params[k].default) for k in self.search_options}

    def search(self, query_path: Path, query_name: str, query_sha: str | None, query_group: str | None,
               box: Box | None, frame: tuple[float, float] | None, top: int, options: dict[str, Any],
               extra_timings: dict[str, float], query_id: int | None = None) -> dict[str, Any]:
        """Rank the index for one query and time each stage (Tolias et al. 2016 Sec. 6 pipeline, search.py):
        ``decode_ms`` (read, crop, scale the query), ``network_ms`` (conv map and global vector), ``search_ms``
        (first stage), ``rerank_ms``, ``qe_ms``. An indexed query (``query_id``) without a box uses its stored
        vector and conv map (``search_indexed``): no decode and no network pass."""
        from .. import search as S

        t0 = time.perf_counter()
        query_size = None
        stage: dict[str, float] = {}
        indexed = query_id is not None and box is None
        if indexed:
            rec = self.by_id[int(query_id)]
            qw, qh = int(rec.get("width") or 0), int(rec.get("height") or 0)
        else:
            _, qw, qh = probe_image(query_path, query_name)
        if box is not None or frame is not None:
            query_size = [qw, qh]
            if frame is not None and box is not None:
                sx, sy = qw / frame[0], qh / frame[1]
                box = Box(box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy)
        if not indexed:
            self.check_describable(query_name, qw, qh, box)
        self.refresh()
        opts = self._pipeline_options(options)
        if indexed:
            with self.lock:
                t1 = time.perf_counter()
                hits = S.search_indexed(self.col, int(query_id), top, timings=stage, **opts)
                t2 = time.perf_counter()
        else:
            with self.gate.decoding(qw * qh, query_name), self.lock:
                t1 = time.perf_counter()
                img = load_image(query_path, max_size=self.col.recipe.max_size, box=box)  # as col.search does
                stage["decode_ms"] = (time.perf_counter() - t1) * 1e3
                hits = S.search(self.col, img, None, top, timings=stage, **opts)
                t2 = time.perf_counter()
        if query_group is None and self.gt is not None and query_sha is not None and query_sha in self.by_sha:
            query_group = self.groups.get(int(self.by_sha[query_sha]["id"]))
        out_hits = []
        for h in hits:
            rec = self.by_id.get(int(h.id)) or {"id": h.id, "path": h.path, "sha256": ""}
            item = {"rank": h.rank, **self.image_json(rec), "score": round(float(h.score), 6),
                    "box": None if h.box is None else [round(float(v), 2) for v in h.box]}
            w, hh = int(rec.get("width") or 0), int(rec.get("height") or 0)
            item["size"] = [w, hh] if w and hh else None  # the page places the box and sizes the card
            if self.gt is not None:
                item["relevant"] = None if query_group is None else (item.get("group") == query_group)
            out_hits.append(item)
        precision = None
        if self.gt is not None and query_group is not None and out_hits:
            rel = [bool(it["relevant"]) for it in out_hits]
            ks = sorted({k for k in (1, 4, 10, len(rel)) if k <= len(rel)})
            precision = {"group": query_group, "relevant_in_index": self.group_counts.get(query_group, 0),
                         "at": {str(k): round(sum(rel[:k]) / k, 4) for k in ks}}
        t3 = time.perf_counter()
        timings = dict(extra_timings)
        timings.update(stage)
        timings.update({"wait_ms": (t1 - t0) * 1e3, "server_ms": (t3 - t0) * 1e3 + extra_timings.get("upload_ms", 0),
                        "format_ms": (t3 - t2) * 1e3})
        timings = {k: round(v, 2) for k, v in timings.items()}
        query = {"name": query_name, "size": query_size, "group": query_group,
                 "box": None if box is None else [round(v, 2) for v in box.as_tuple()]}
        return {"query": query, "top": top, "hits": out_hits, "precision": precision, "timings": timings,
                "pipeline": {"rerank": opts["rerank"] or "none", "shortlist": opts["shortlist"], "qe": opts["qe"],
                             "qe_kind": opts["qe_kind"], "rerank_options": opts.get("rerank_options") or {},
                             "qe_options": opts.get("qe_options") or {}, "indexed_query": indexed}}

    # ----------------------------------------------------------------- uploads
    def store_upload(self, tmp: Path, name: str, fmt: str, sha: str) -> Path:
        """Move a verified upload into ``<index>/uploads/`` under a sanitised, non-clashing name (caller holds
        the lock). A byte-identical file already there is reused."""
        self.upload_dir.mkdir(exist_ok=True)
        stem, ext = sanitize_stem(name), UPLOAD_FORMATS[fmt]
        for n in range(10_000):
            dest = self.upload_dir / (f"{stem}{ext}" if n == 0 else f"{stem}-{n}{ext}")
            if dest.exists() or dest.is_symlink():
                if dest.is_file() and not dest.is_symlink() and file_sha256(dest) == sha:
                    tmp.unlink(missing_ok=True)
                    return dest
                continue
            if dest.resolve().parent != self.upload_dir.resolve():  # belt and braces: never outside uploads/
                raise BadRequest(400, f"{name}: unusable file name")
            os.replace(tmp, dest)
            try:
                fd = os.open(self.upload_dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
            return dest
        raise BadRequest(409, f"{name}: too many uploads with this name")

    def add_uploads(self, files: list[tuple[BinaryIO, str]]) -> dict[str, Any]:
        if not files:
            raise BadRequest(400, "no files uploaded (send them as multipart field 'files')")
        if len(files) > self.max_files:
            raise BadRequest(413, f"{len(files)} files in one request; the limit is {self.max_files}")
        self.rate.take(len(files))
        t0 = time.perf_counter()
        pixels = 0
        self.upload_dir.mkdir(exist_ok=True)
        staged: list[tuple[Path, str, str, str]] = []
        try:
            for src, raw_name in files:  # validate everything before storing anything
                name = client_name(raw_name)
                fd, tmpname = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=self.upload_dir)
                os.close(fd)
                tmp = Path(tmpname)
                staged.append((tmp, name, "", ""))
                _, sha = copy_limited(src, tmp, self.max_upload_bytes, name)
                fmt, w, h = probe_image(tmp, name)
                pixels += w * h
                if pixels > self.gate.pixel_budget:
                    raise BadRequest(413, f"{name}: the images of this request have {pixels} pixels together, more "
                                         f"than the budget of {self.gate.pixel_budget} per request; send fewer")
                fmt, w, h = verify_image(tmp, name, self.gate)
                self.check_describable(name, w, h)
                staged[-1] = (tmp, name, fmt, sha)
            t1 = time.perf_counter()
            self.refresh()
            with self.gate.decoding(pixels, "this request"), self.lock:
                t2 = time.perf_counter()
                stored = [(self.store_upload(tmp, name, fmt, sha), name) for tmp, name, fmt, sha in staged]
                report = self.col.add_folder([p for p, _ in stored], progress=False)
                self._reload_records()
                t3 = time.perf_counter()
        finally:
            for tmp, *_ in staged:
                tmp.unlink(missing_ok=True)
        index = self.col.store.path_index()
        failed = dict(report.failed)
        results = []
        for path, name in stored:
            key = str(path.resolve())
            rec = index.get(key)
            status = ("added" if key in report.added else "updated" if key in report.updated
                      else "unchanged" if key in report.unchanged else "failed")
            item = {"upload": name, "status": status}
            if rec is not None:
                item.update(self.image_json(rec))
            if key in failed or str(path) in failed:
                item["error"] = (failed.get(key) or failed.get(str(path))).replace(str(self.index_dir), "<index>")
            results.append(item)
        return {"images": results, "total": len(self.col), "whitening": report.whitening or None,
                "timings": {"check_ms": round((t1 - t0) * 1e3, 2), "wait_ms": round((t2 - t1) * 1e3, 2),
                            "index_ms": round((t3 - t2) * 1e3, 2)}}

    def stats(self) -> dict[str, Any]:
        # No lock but refresh's: it only reads one consistent catalogue version, so a concurrent upload shows as
        # before or after. (Under the search lock, stats waited behind every queued search: median 12 s with 16
        # clients in benchmarks/bench_server_load.py.)
        self.refresh()
        s = self.col.stats()
        s.update({"uploads": self.allow_uploads, "max_upload_bytes": self.max_upload_bytes,
                  "max_files": self.max_files, "max_top": self.max_top, "search_options": self.search_options,
                  "ground_truth": None if self.gt is None else self.gt.describe(),
                  "groups": None if self.gt is None else len(self.group_counts),
                  "uploads_per_minute": self.rate.per_minute, "max_decodes": self.gate.max_decodes,
                  "pixel_budget": self.gate.pixel_budget, "max_pixels": MAX_PIXELS,
                  "native_memory": getattr(self, "native_memory", None)})
        if not self.show_paths:
            s["index"] = self.index_dir.name
        return s


