"""The request guard of the server: what a request may carry before any work is done for it.

* :class:`Guard` (ASGI middleware): body size limit, cross-origin POSTs refused, Host allow-list, optional
  token, security headers.
* :class:`DecodeGate`: every decode of a client's or an indexed image runs under it -- at most ``max_decodes``
  at a time and at most ``pixel_budget`` pixels being decoded at once across all requests (a near-limit image
  waits for the others), so peak memory is bounded by the budget, not by the number of clients.
* :class:`UploadRate`: uploads per minute (429 beyond it), on top of the per-request file and byte caps.
* upload checks: :func:`probe_image` (header only), :func:`verify_image` (a full decode, under the gate),
  client-supplied names made safe (:func:`client_name`, :func:`sanitize_stem`), bounded copies.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
import unicodedata
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import parse_qsl

from PIL import Image

from ..images import MAX_PIXELS, BoxError, ImageError, header_orientation, load_image

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024

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


TOKEN_COOKIE = "isearch_token"
DEFAULT_MAX_DECODES = 4
DEFAULT_PIXEL_BUDGET = MAX_PIXELS  # pixels decoded at once by the whole server (one near-limit image)
DEFAULT_UPLOADS_PER_MINUTE = 120


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8


def limit_native_memory(mmap_threshold: int = 4 << 20, arena_max: int = 2) -> str:
    """Make freed image buffers go back to the system (glibc ``mallopt``; process-wide): a fixed mmap threshold
    (glibc's dynamic one climbs to 32 MB after the first large free, after which Pillow's 16 MB blocks stay in
    the heap) and at most ``arena_max`` malloc arenas (one per thread otherwise: measured, 40 concurrent uploads
    of an 89 Mpx PNG kept 13 GB in up to 16 arenas although the decodes ran one at a time). Returns what was
    done, for the stats; without glibc, says so."""
    if _LIBC is None:
        return "not glibc: allocator left as it is"
    ok = _LIBC.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and _LIBC.mallopt(M_ARENA_MAX, int(arena_max)) == 1
    return (f"glibc: mmap threshold {mmap_threshold >> 20} MB, {arena_max} arenas" if ok
            else "glibc mallopt refused the settings")


def release_freed_memory() -> None:
    """Return freed heap pages to the system now (glibc ``malloc_trim``), after a large decode."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class DecodeGate:
    """Bounded decoding: at most ``max_decodes`` decodes at once, and their pixels (width x height of each image
    being decoded) add up to at most ``pixel_budget``; a caller waits (up to ``timeout`` s, then 503) until
    its pixels fit. An image larger than the budget cannot fit and is refused at once (413)."""

    def __init__(self, max_decodes: int = DEFAULT_MAX_DECODES, pixel_budget: int = DEFAULT_PIXEL_BUDGET,
                 timeout: float = 120.0):
        if max_decodes < 1 or pixel_budget < 1:
            raise ValueError(f"max_decodes and pixel_budget must be positive, got {max_decodes}, {pixel_budget}")
        self.max_decodes, self.pixel_budget, self.timeout = int(max_decodes), int(pixel_budget), float(timeout)
        self._cond = threading.Condition()
        self._active = 0
        self._pixels = 0
        self.peak_pixels = 0  # the most pixels ever decoded at once (tests, stats)

    @contextlib.contextmanager
    def decoding(self, pixels: int, name: str) -> Iterator[None]:
        pixels = max(1, int(pixels))
        if pixels > self.pixel_budget:
            raise BadRequest(413, f"{name}: {pixels} pixels exceed the server's decoding budget of "
                                  f"{self.pixel_budget}")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while self._active >= self.max_decodes or self._pixels + pixels > self.pixel_budget:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BadRequest(503, f"{name}: the server is busy decoding other images; try again")
                self._cond.wait(left)
            self._active += 1
            self._pixels += pixels
            self.peak_pixels = max(self.peak_pixels, self._pixels)
        try:
            yield
        finally:
            if pixels >= 4_000_000:  # a large decode's buffers: hand them back before the next one
                release_freed_memory()
            with self._cond:
                self._active -= 1
                self._pixels -= pixels
                self._cond.notify_all()


class UploadRate:
    """At most ``per_minute`` uploaded images in any 60 s window (server-wide; 0 = no limit)."""

    def __init__(self, per_minute: int = DEFAULT_UPLOADS_PER_MINUTE):
        self.per_minute = int(per_minute)
        self._times: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            while self._times and now - self._times[0] >= 60.0:
                self._times.popleft()
            if len(self._times) + n > self.per_minute:
                wait = 60.0 - (now - self._times[0]) if self._times else 60.0
                raise BadRequest(429, f"{n} images would exceed the upload limit of {self.per_minute} per minute; "
                                      f"try again in {math.ceil(wait)} s")
            self._times.extend([now] * n)


class BadRequest(Exception):
    """A request refused with an HTTP status and a message naming the input."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def probe_image(path: Path, name: str) -> tuple[str, int, int]:
    """(format, width, height) of an image file from its header, EXIF orientation applied to the size.

    Raises :class:`BadRequest` 415 for what is not an image of an accepted format, 413 for too many pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                fmt = img.format or ""
                w, h = img.size
                orient = header_orientation(img)  # never decodes the pixels (Pillow's PNG getexif would)
    except Image.DecompressionBombError as exc:
        raise BadRequest(413, f"{name}: too many pixels, refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, decoder bugs
        raise BadRequest(415, f"{name}: not a readable image ({exc.__class__.__name__})") from None
    if fmt not in UPLOAD_FORMATS:
        raise BadRequest(415, f"{name}: image format {fmt or 'unknown'} is not accepted "
                             f"(accepted: {', '.join(sorted(set(UPLOAD_FORMATS) - {'MPO'}))})")
    if w < 1 or h < 1:
        raise BadRequest(415, f"{name}: image has no pixels")
    if w * h > MAX_PIXELS:
        raise BadRequest(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {MAX_PIXELS} "
                             f"(decompression bomb?)")
    if orient in (5, 6, 7, 8):
        w, h = h, w
    return fmt, w, h


def verify_image(path: Path, name: str, gate: DecodeGate) -> tuple[str, int, int]:
    """Header probe, then a full decode through :func:`load_image` (which refuses bombs and corrupt data),
    under the decode gate."""
    fmt, w, h = probe_image(path, name)
    try:
        with gate.decoding(w * h, name):
            load_image(path, max_size=64)
    except ImageError as exc:
        msg = str(exc).replace(str(path), name)
        raise BadRequest(413 if "decompression bomb" in msg else 415, msg) from None
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


def copy_limited(src: BinaryIO, dst: Path, limit: int, name: str) -> tuple[int, str]:
    """Copy an upload to ``dst`` (at most ``limit`` bytes, else 413); returns (size, sha256)."""
    h = hashlib.sha256()
    n = 0
    with open(dst, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            n += len(chunk)
            if n > limit:
                raise BadRequest(413, f"{name}: larger than the upload limit of {limit} bytes")
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if n == 0:
        raise BadRequest(400, f"{name}: empty file (0 bytes)")
    return n, h.hexdigest()


def parse_frame(text: str | None) -> tuple[float, float] | None:
    """The ``width,height`` frame a box was drawn in (``None`` when not given); bad text raises BoxError."""
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
class Guard:
    """Pure ASGI middleware: request body limit (413, also for chunked bodies), refusal of cross-origin
    POSTs (a page on another site must not add images to a local index), optional Host allow-list (DNS
    rebinding), optional token (``Authorization: Bearer <token>`` or the cookie that ``/?token=<token>``
    sets; every ``/api/`` request without it gets 401) and security headers on every response."""

    def __init__(self, app, max_body: int, allowed_hosts: list[str] | None = None, token: str | None = None):
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.token = token

    def _authorised(self, scope, headers: dict[str, str]) -> bool | str:
        """True if no token is set or the request carries it; the token itself (to set as a cookie) when it
        came as ``?token=`` on the page; False otherwise."""
        if self.token is None:
            return True
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == TOKEN_COOKIE and hmac.compare_digest(v.encode(), self.token.encode()):
                return True
        if scope.get("path") == "/":
            for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                if k == "token" and hmac.compare_digest(v.encode(), self.token.encode()):
                    return self.token
        return False

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
        auth = self._authorised(scope, headers)
        if auth is False and (scope.get("path", "").startswith("/api/") or scope.get("path") == "/openapi.json"):
            return await self._reply(send, 401, "this server needs a token: send 'Authorization: Bearer <token>' "
                                                "or open /?token=<token> once in the browser")
        cookie = [(b"set-cookie", f"{TOKEN_COOKIE}={auth}; Path=/; HttpOnly; SameSite=Strict".encode())] \
            if isinstance(auth, str) else []
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
                    raise BodyTooLarge()
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
                msg["headers"] = (list(msg.get("headers", [])) + [h for h in SECURITY_HEADERS if h[0] not in names]
                                  + cookie)
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not state["started"]:
                await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
        except Exception:
            if state["exceeded"] and not state["started"]:
                await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
            else:
                raise


class BodyTooLarge(Exception):
    pass



