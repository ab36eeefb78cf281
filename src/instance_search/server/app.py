"""FastAPI app over one index folder: search by uploaded image (+ box) or by an indexed image, add images,
thumbnails, stats, and the single search page.

Endpoints (all JSON except ``/`` and thumbnails; errors are ``{"detail": "..."}``):

* ``POST /api/search``  multipart: ``image`` (file) *or* ``query_id`` (an indexed id); optional ``box``
  ``"x1,y1,x2,y2"`` in pixels of the query image (or of a scaled copy of size ``box_frame`` ``"W,H"``), ``top``
  (1..max_top) and ``options`` (a JSON object of extra keyword arguments that ``Collection.search`` accepts).
* ``POST /api/images``  multipart: one or more ``files``; each is checked to be a decodable image, stored
  under ``<index>/uploads/`` with a sanitised name and indexed (all-or-nothing validation).
* ``GET /api/images``   a page of indexed images (id, name, group, thumbnail URL) to pick queries from.
* ``GET /api/stats``    what the index holds and the server's limits.
* ``GET /api/thumbnail/{id}?size=256``  JPEG thumbnail of an *indexed* image, looked up by id only.
* ``GET /``             the page; ``GET /openapi.json`` the OpenAPI description.

Nothing here unpickles, evals or opens a client-supplied path. Searches and additions share one lock (the
backbone, FAISS index and store are not meant for concurrent mutation); thumbnails do not take it.
"""
from __future__ import annotations

import hashlib
import inspect
import ipaddress
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from collections import OrderedDict
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image

from ..images import MAX_PIXELS, Box, BoxError, ImageError, clip_box, load_image, parse_box

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
UPLOAD_FOLDER = "uploads"
CACHED_THUMB_SIZES = (64, 128, 256, 512)
STATIC = Path(__file__).resolve().parent / "static"

#: Formats accepted from clients and the extension a stored upload gets (never the client's own).
UPLOAD_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
                  "WEBP": ".webp", "PPM": ".ppm"}

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
     b"script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
     b"form-action 'self'"),
]


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


# ---------------------------------------------------------------------------------------------- helpers
class _BadImage(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _pixel_limit() -> int:
    pil = Image.MAX_IMAGE_PIXELS
    return int(min(MAX_PIXELS, pil)) if pil else MAX_PIXELS


def probe_image(path: Path, name: str) -> tuple[str, int, int]:
    """(format, width, height) of an image file from its header, EXIF orientation applied to the size.

    Raises :class:`_BadImage` 415 for what is not an image of an accepted format, 413 for too many pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                fmt = img.format or ""
                w, h = img.size
                try:
                    orient = int(img.getexif().get(0x0112, 1))
                except Exception:  # a broken EXIF block: ignore it
                    orient = 1
    except Image.DecompressionBombError as exc:
        raise _BadImage(413, f"{name}: too many pixels, refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, decoder bugs
        raise _BadImage(415, f"{name}: not a readable image ({exc.__class__.__name__})") from None
    if fmt not in UPLOAD_FORMATS:
        raise _BadImage(415, f"{name}: image format {fmt or 'unknown'} is not accepted "
                             f"(accepted: {', '.join(sorted(set(UPLOAD_FORMATS) - {'MPO'}))})")
    if w < 1 or h < 1:
        raise _BadImage(415, f"{name}: image has no pixels")
    if w * h > _pixel_limit():
        raise _BadImage(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {_pixel_limit()} "
                             f"(decompression bomb?)")
    if orient in (5, 6, 7, 8):
        w, h = h, w
    return fmt, w, h


def verify_image(path: Path, name: str) -> tuple[str, int, int]:
    """Header probe, then a full decode through :func:`load_image` (which refuses bombs and corrupt data)."""
    fmt, w, h = probe_image(path, name)
    try:
        load_image(path, max_size=64)
    except ImageError as exc:
        msg = str(exc).replace(str(path), name)
        raise _BadImage(413 if "decompression bomb" in msg else 415, msg) from None
    return fmt, w, h


def client_name(filename: str | None) -> str:
    """The last path component of a client-supplied file name (``/`` or ``\\`` separated), for messages."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:200]
    return name or "upload"


def sanitize_stem(filename: str | None, max_len: int = 80) -> str:
    """A safe file stem from a client-supplied name: ASCII letters, digits, ``._-`` only, no leading dot."""
    name = client_name(filename)
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    stem = re.sub(r"\.{2,}", ".", stem)[:max_len].rstrip("._-")
    return stem or "upload"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_limited(src: BinaryIO, dst: Path, limit: int, name: str) -> tuple[int, str]:
    """Copy an upload to ``dst`` (at most ``limit`` bytes, else 413); returns (size, sha256)."""
    h = hashlib.sha256()
    n = 0
    with open(dst, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            n += len(chunk)
            if n > limit:
                raise _BadImage(413, f"{name}: larger than the upload limit of {limit} bytes")
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if n == 0:
        raise _BadImage(400, f"{name}: empty file (0 bytes)")
    return n, h.hexdigest()


def _parse_frame(text: str | None) -> tuple[float, float] | None:
    if text is None or text.strip() == "":
        return None
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        raise BoxError(f"box_frame {text!r}: expected two numbers W,H") from None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise BoxError(f"box_frame {text!r}: width and height must be positive")
    return w, h


# ---------------------------------------------------------------------------------------------- ASGI guard
class _Guard:
    """Pure ASGI middleware: request body limit (413, also for chunked bodies), refusal of cross-origin
    POSTs (a page on another site must not add images to a local index), optional Host allow-list (DNS
    rebinding) and security headers on every response."""

    def __init__(self, app, max_body: int, allowed_hosts: list[str] | None = None):
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    @staticmethod
    async def _reply(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())] + SECURITY_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.allowed_hosts is not None:
            hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if hostname.strip("[]").lower() not in self.allowed_hosts:
                return await self._reply(send, 400, f"host {host!r} is not served here")
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None:
                netloc = origin.split("://", 1)[-1].rstrip("/")
                if origin == "null" or netloc.lower() != host.lower():
                    return await self._reply(send, 403, f"cross-origin request from {origin!r} refused")
            length = headers.get("content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_body
                except ValueError:
                    return await self._reply(send, 400, "malformed Content-Length header")
                if too_big:
                    return await self._reply(send, 413, f"request body of {length} bytes exceeds the limit of "
                                                        f"{self.max_body} bytes")
        state = {"received": 0, "exceeded": False, "started": False, "replaced": False}

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > self.max_body:
                    state["exceeded"] = True
                    raise _BodyTooLarge()
            return msg

        async def guarded_send(msg):
            if state["replaced"]:
                return
            if msg["type"] == "http.response.start":
                if state["exceeded"]:  # the app turned our exception into some error: answer 413 instead
                    state["replaced"] = True
                    state["started"] = True
                    return await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
                state["started"] = True
                msg = dict(msg)
                names = {k.lower() for k, _ in msg.get("headers", [])}
                msg["headers"] = list(msg.get("headers", [])) + [h for h in SECURITY_HEADERS if h[0] not in names]
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not state["started"]:
                await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
        except Exception:
            if state["exceeded"] and not state["started"]:
                await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
            else:
                raise


class _BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------------- service
class SearchService:
    """The state behind the app: one :class:`Collection`, its id → record map, a lock and a thumbnail cache."""

    def __init__(self, index_dir: str | os.PathLike, *, ground_truth=None, allow_uploads: bool = True,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_files: int = 32, max_top: int = 100,
                 show_paths: bool = False, weights: str | None = None, device: str = "cpu",
                 thumb_cache: int = 512):
        from ..collection import Collection

        self.index_dir = Path(index_dir).resolve()
        self.col = Collection.open(self.index_dir, writable=allow_uploads, weights=weights, device=device)
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
        self._min_side: int | None = None
        params = inspect.signature(self.col.search).parameters
        self.search_options = sorted(k for k, p in params.items() if k not in ("image", "box", "top")
                                     and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        self._reload_records()

    # ----------------------------------------------------------------- records
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

    # ----------------------------------------------------------------- thumbnails
    def thumbnail(self, image_id: int, size: int) -> bytes | None:
        rec = self.record(image_id)
        if rec is None:
            return None
        key = (image_id, size, rec["sha256"])
        with self._thumb_lock:
            data = self._thumbs.get(key)
            if data is not None:
                self._thumbs.move_to_end(key)
                return data
        img = load_image(rec["path"], max_size=size)  # ImageError when the file went away or changed
        buf = BytesIO()
        img.save(buf, format="JPEG", quality=85, optimize=True)
        data = buf.getvalue()
        if size in CACHED_THUMB_SIZES:  # other sizes are served but not kept (bounded memory)
            with self._thumb_lock:
                self._thumbs[key] = data
                while len(self._thumbs) > self._thumb_cache:
                    self._thumbs.popitem(last=False)
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
            raise _BadImage(422, f"{name}: {width}x{height} pixels once {what} to at most {max_size} px is too "
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
    def search(self, query_path: Path, query_name: str, query_sha: str | None, query_group: str | None,
               box: Box | None, frame: tuple[float, float] | None, top: int, options: dict[str, Any],
               extra_timings: dict[str, float]) -> dict[str, Any]:
        t0 = time.perf_counter()
        query_size = None
        _, qw, qh = probe_image(query_path, query_name)
        if box is not None or frame is not None:
            query_size = [qw, qh]
            if frame is not None and box is not None:
                sx, sy = qw / frame[0], qh / frame[1]
                box = Box(box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy)
        self.check_describable(query_name, qw, qh, box)
        with self.lock:
            t1 = time.perf_counter()
            hits = self.col.search(query_path, box=box, top=top, **options)
            t2 = time.perf_counter()
        if query_group is None and self.gt is not None and query_sha is not None and query_sha in self.by_sha:
            query_group = self.groups.get(int(self.by_sha[query_sha]["id"]))
        out_hits = []
        for h in hits:
            rec = self.by_id.get(int(h.id)) or {"id": h.id, "path": h.path, "sha256": ""}
            item = {"rank": h.rank, **self.image_json(rec), "score": round(float(h.score), 6),
                    "box": None if h.box is None else [round(float(v), 2) for v in h.box]}
            if h.box is not None:
                try:
                    _, w, hh = probe_image(Path(h.path), item["name"])
                    item["size"] = [w, hh]
                except _BadImage:
                    item["size"] = None
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
        timings.update({"wait_ms": (t1 - t0) * 1e3, "search_ms": (t2 - t1) * 1e3, "format_ms": (t3 - t2) * 1e3})
        timings = {k: round(v, 2) for k, v in timings.items()}
        query = {"name": query_name, "size": query_size, "group": query_group,
                 "box": None if box is None else [round(v, 2) for v in box.as_tuple()]}
        return {"query": query, "top": top, "hits": out_hits, "precision": precision, "timings": timings}

    # ----------------------------------------------------------------- uploads
    def store_upload(self, tmp: Path, name: str, fmt: str, sha: str) -> Path:
        """Move a verified upload into ``<index>/uploads/`` under a sanitised, non-clashing name (caller holds
        the lock). A byte-identical file already there is reused."""
        self.upload_dir.mkdir(exist_ok=True)
        stem, ext = sanitize_stem(name), UPLOAD_FORMATS[fmt]
        for n in range(10_000):
            dest = self.upload_dir / (f"{stem}{ext}" if n == 0 else f"{stem}-{n}{ext}")
            if dest.exists() or dest.is_symlink():
                if dest.is_file() and not dest.is_symlink() and _sha256_file(dest) == sha:
                    tmp.unlink(missing_ok=True)
                    return dest
                continue
            if dest.resolve().parent != self.upload_dir.resolve():  # belt and braces: never outside uploads/
                raise _BadImage(400, f"{name}: unusable file name")
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
        raise _BadImage(409, f"{name}: too many uploads with this name")

    def add_uploads(self, files: list[tuple[BinaryIO, str]]) -> dict[str, Any]:
        if not files:
            raise _BadImage(400, "no files uploaded (send them as multipart field 'files')")
        if len(files) > self.max_files:
            raise _BadImage(413, f"{len(files)} files in one request; the limit is {self.max_files}")
        t0 = time.perf_counter()
        self.upload_dir.mkdir(exist_ok=True)
        staged: list[tuple[Path, str, str, str]] = []
        try:
            for src, raw_name in files:  # validate everything before storing anything
                name = client_name(raw_name)
                fd, tmpname = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=self.upload_dir)
                os.close(fd)
                tmp = Path(tmpname)
                staged.append((tmp, name, "", ""))
                _, sha = _copy_limited(src, tmp, self.max_upload_bytes, name)
                fmt, w, h = verify_image(tmp, name)
                self.check_describable(name, w, h)
                staged[-1] = (tmp, name, fmt, sha)
            t1 = time.perf_counter()
            with self.lock:
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
        # No lock: it only reads, and the store publishes a new segment before the manifest names it, so a
        # concurrent upload shows as before or after. (Under the lock, stats waited behind every queued
        # search: median 12 s with 16 clients in benchmarks/bench_server_load.py.)
        s = self.col.stats()
        s.update({"uploads": self.allow_uploads, "max_upload_bytes": self.max_upload_bytes,
                  "max_files": self.max_files, "max_top": self.max_top, "search_options": self.search_options,
                  "ground_truth": None if self.gt is None else self.gt.describe(),
                  "groups": None if self.gt is None else len(self.group_counts)})
        if not self.show_paths:
            s["index"] = self.index_dir.name
        return s


# ---------------------------------------------------------------------------------------------- the app
def create_app(index_dir: str | os.PathLike, *, ground_truth=None, allow_uploads: bool = True,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_files: int = 32, max_top: int = 100,
               show_paths: bool = False, allowed_hosts: list[str] | None = None, weights: str | None = None,
               device: str = "cpu"):
    """A FastAPI app serving the index at ``index_dir``.

    ``ground_truth``: ``None``, ``"ukbench"``, a dict or a JSON file ``{"groups": {path_or_name: group}}``;
    with it every hit says whether it shows the query's object and the response carries precision@k.
    ``allow_uploads=False`` opens the index read-only and refuses ``POST /api/images`` (403).
    ``max_upload_bytes`` caps every request body (413). ``show_paths`` adds server file paths to responses
    (off by default: clients see ids and file names). ``allowed_hosts``: Host header allow-list (``serve``
    sets it for loopback addresses against DNS rebinding).
    """
    from .. import __version__

    svc = SearchService(index_dir, ground_truth=ground_truth, allow_uploads=allow_uploads,
                        max_upload_bytes=max_upload_bytes, max_files=max_files, max_top=max_top,
                        show_paths=show_paths, weights=weights, device=device)
    page = (STATIC / "index.html").read_bytes()

    app = FastAPI(title="instance-search", version=__version__, docs_url=None, redoc_url=None,
                  description="Instance-level image search over one index folder: query by image and box, "
                              "add images, thumbnails. The page is at /.")
    app.state.service = svc
    app.add_middleware(_Guard, max_body=svc.max_upload_bytes, allowed_hosts=allowed_hosts)

    def fail(status: int, msg: str):
        raise HTTPException(status_code=status, detail=msg)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    @app.get("/api/stats", summary="What the index holds and the server's limits")
    def stats() -> dict:
        return svc.stats()

    @app.get("/api/images", summary="A page of indexed images (to pick a query from)")
    def list_images(offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=500)) -> dict:
        order, by_id = svc.order, svc.by_id
        return {"total": len(order), "offset": offset,
                "images": [svc.image_json(by_id[i]) for i in order[offset:offset + limit]]}

    @app.get("/api/thumbnail/{image_id}", summary="JPEG thumbnail of an indexed image",
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such indexed id"}})
    def thumbnail(image_id: str, size: int = Query(256, ge=16, le=1024)):
        if not re.fullmatch(r"[0-9]{1,18}", image_id):
            fail(404, "no such image id")
        try:
            data = svc.thumbnail(int(image_id), size)
        except ImageError:
            fail(404, f"image {image_id}: its file is missing or no longer readable")
        if data is None:
            fail(404, f"no image with id {image_id} in this index")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=300"})

    @app.post("/api/search", summary="Rank the indexed images by similarity to a query image (+ box)")
    def search(image: UploadFile | None = File(None, description="query image (or give query_id)"),
               query_id: int | None = Form(None, description="search with an indexed image instead"),
               box: str | None = Form(None, description="x1,y1,x2,y2 in pixels of the query (or of box_frame)"),
               box_frame: str | None = Form(None, description="W,H of the scaled copy the box was drawn on"),
               top: int = Form(10, description="number of results"),
               options: str | None = Form(None, description="JSON object of extra Collection.search options")):
        t0 = time.perf_counter()
        if not 1 <= top <= svc.max_top:
            fail(422, f"top must be between 1 and {svc.max_top}, got {top}")
        try:
            b = parse_box(box) if box not in (None, "") else None
            frame = _parse_frame(box_frame)
        except BoxError as exc:
            fail(422, str(exc))
        try:
            opts = svc.parse_options(options)
        except ValueError as exc:
            fail(422, str(exc))
        if (image is None) == (query_id is None):
            fail(422, "give exactly one of 'image' (a file) or 'query_id' (an indexed image id)")
        with tempfile.TemporaryDirectory(prefix="isearch-query-") as tmpdir:
            try:
                if image is not None:
                    name = client_name(image.filename)
                    qpath = Path(tmpdir) / "query"
                    _, sha = _copy_limited(image.file, qpath, svc.max_upload_bytes, name)
                    probe_image(qpath, name)
                    group = svc.gt.group_of(name) if svc.gt is not None else None
                else:
                    rec = svc.record(int(query_id))
                    if rec is None:
                        fail(404, f"no image with id {query_id} in this index")
                    qpath, name, sha = Path(rec["path"]), Path(rec["path"]).name, rec["sha256"]
                    group = svc.groups.get(int(query_id))
                    try:
                        probe_image(qpath, name)
                    except _BadImage:
                        fail(404, f"image {query_id}: its file is missing or no longer readable")
                t1 = time.perf_counter()
                return svc.search(qpath, name, sha, group, b, frame, top, opts,
                                  {"upload_ms": (t1 - t0) * 1e3})
            except _BadImage as exc:
                fail(exc.status, str(exc))
            except BoxError as exc:
                fail(422, str(exc).replace(str(qpath), name))
            except ImageError as exc:
                msg = str(exc).replace(str(qpath), name)
                if image is None:
                    fail(404, f"image {query_id}: its file is missing or no longer readable")
                fail(413 if "decompression bomb" in msg else 415, msg)
            except (TypeError, ValueError) as exc:
                if opts:
                    fail(422, f"options: {exc}")
                raise

    @app.post("/api/images", summary="Upload images and add them to the index", status_code=200)
    def add_images(files: list[UploadFile] = File(..., description="image files")):
        if not svc.allow_uploads:
            fail(403, "this server was started read-only (uploads are off)")
        try:
            return svc.add_uploads([(f.file, f.filename) for f in files])
        except _BadImage as exc:
            fail(exc.status, str(exc))

    return app


def serve(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *, ground_truth=None,
          allow_uploads: bool = True, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, show_paths: bool = False,
          log_level: str = "info") -> None:
    """Serve the index with uvicorn (one process; the app holds the model and the FAISS index in memory).

    There is no authentication: keep the default ``host="127.0.0.1"`` unless you trust the network.
    """
    import uvicorn

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    allowed = ["127.0.0.1", "localhost", "::1", host.strip("[]")] if loopback else None
    app = create_app(index_dir, ground_truth=ground_truth, allow_uploads=allow_uploads,
                     max_upload_bytes=max_upload_bytes, show_paths=show_paths, allowed_hosts=allowed)
    if not loopback:
        print(f"warning: serving {index_dir} on {host}:{port} without authentication; anyone who can reach it "
              f"can search{' and add images' if allow_uploads else ''}", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1, server_header=False,
                timeout_keep_alive=5, limit_concurrency=64)
