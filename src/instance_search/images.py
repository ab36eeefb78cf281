"""Loading and validating images and query boxes.

Every error names the offending file or box. Images come back as RGB ``PIL.Image`` objects with EXIF
orientation applied, optionally shrunk so that the longer side is at most ``max_size`` (the revisitop
protocol keeps images at their own size, capped at 1024 px).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

#: THE pixel limit: the largest image (width x height, before any resize) that is decoded anywhere (indexing,
#: queries, uploads). Pillow's own decompression-bomb check is set to it too (it warns above this and refuses
#: above twice this), so no other, lower limit applies by accident.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(InputError):
    """An image that cannot be used, with the path in the message."""


class BoxError(InputError):
    """A query box that is malformed, empty or outside its image."""


@dataclass(frozen=True)
class Box:
    """Axis-aligned box (x1, y1, x2, y2) in pixel coordinates of the original image, x2/y2 exclusive."""

    x1: float
    y1: float
    x2: float
    y2: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1


def parse_box(text: str | Sequence[float] | None) -> Box | None:
    """Parse ``"x1,y1,x2,y2"`` (or a 4-sequence) into a :class:`Box`; ``None`` passes through.

    Raises :class:`BoxError` for anything that is not four finite numbers with x1 < x2 and y1 < y2.
    """
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", ",").split(",") if p != ""]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise BoxError(f"box {text!r}: expected four numbers x1,y1,x2,y2") from None
    else:
        try:
            values = [float(v) for v in text]
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float range
            raise BoxError(f"box {text!r}: expected four numbers x1,y1,x2,y2") from None
    if len(values) != 4:
        raise BoxError(f"box {text!r}: expected four numbers x1,y1,x2,y2, got {len(values)}")
    if not all(np.isfinite(values)):
        raise BoxError(f"box {text!r}: coordinates must be finite")
    x1, y1, x2, y2 = values
    if not (x2 > x1 and y2 > y1):
        raise BoxError(f"box {text!r}: empty or inverted (need x1 < x2 and y1 < y2)")
    return Box(x1, y1, x2, y2)


def clip_box(box: Box, width: int, height: int, *, name: str = "image") -> tuple[int, int, int, int]:
    """Clip ``box`` to a ``width`` x ``height`` image and round it to whole pixels.

    Follows revisitop's query cropping: ``x1,y1`` floored, ``x2,y2`` ceiled. A box that does not overlap
    the image at all, or that is less than one pixel after clipping, raises :class:`BoxError`.
    """
    x1 = max(0, int(np.floor(box.x1)))
    y1 = max(0, int(np.floor(box.y1)))
    x2 = min(width, int(np.ceil(box.x2)))
    y2 = min(height, int(np.ceil(box.y2)))
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise BoxError(
            f"box {box.as_tuple()} lies outside {name} of size {width}x{height} (nothing left after clipping)"
        )
    return x1, y1, x2, y2


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_stat(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed) if it is a regular file; else :class:`ImageError` saying what it
    is: a FIFO, socket or device (reading those can block forever or never end), a folder, a symlink loop, a
    dangling link, missing. Never reads the file."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(f"{path}: a symlink loop, not a file") from exc
        if exc.errno == errno.ENOENT:
            raise ImageError(f"{path}: " + ("a dangling symlink" if os.path.islink(path) else "no such file")) from exc
        raise ImageError(f"{path}: cannot stat ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        what = _kind(st.st_mode)
        raise ImageError(f"{path}: {'a symlink to ' if os.path.islink(path) else ''}{what}, not a regular file")
    return st


def open_regular(path: str | os.PathLike):
    """Open ``path`` for reading only if it is a regular file: opened non-blocking (a FIFO swapped in after a
    check cannot hang the open) and checked again on the open descriptor. Returns ``(binary file, stat)``."""
    path = Path(path)
    regular_file_stat(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ImageError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError(f"{path}: {_kind(st.st_mode)}, not a regular file")
    return os.fdopen(fd, "rb"), st


def regular_file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> tuple[os.stat_result, str]:
    """``(stat, sha256)`` of a regular file, reading at most the size it had when stat'ed (a file that grows
    while hashed, or one that is endless, cannot keep the hash running). Other files: :class:`ImageError`."""
    f, st = open_regular(path)
    h, left = hashlib.sha256(), st.st_size
    with f:
        while left > 0:
            b = f.read(min(chunk, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return st, h.hexdigest()


def printable(text: str) -> str:
    """``text`` (a file name, a message naming one) as one printable line of valid UTF-8: line breaks and other
    control characters escaped (a name cannot fake another output line), undecodable bytes (the surrogates
    Python gives non-UTF-8 names) as ``\\xNN``."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _print_skip(path: Path, reason: str) -> None:
    print(f"skipped {printable(reason)}", file=sys.stderr, flush=True)


def list_images(root: str | os.PathLike, on_skip: Callable[[Path, str], None] | None = _print_skip) -> list[Path]:
    """All regular image files under ``root`` (recursive, sorted, hidden folders skipped; links followed).

    Entries with an image name that are not regular files -- FIFOs, sockets, devices, links to them, symlink
    loops, dangling links -- are not listed: each is passed to ``on_skip(path, reason)`` (default: a
    ``skipped ...`` line on stderr), so one bad entry never stops or hangs a batch."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"collection folder {root} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and is_image_file(f):
                p = Path(dirpath) / f
                try:
                    regular_file_stat(p)
                except ImageError as exc:
                    if on_skip is not None:
                        on_skip(p, str(exc))
                    continue
                out.append(p)
    return out


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode (L, LA, P, CMYK, I;16, I, F, RGBA ...) to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.max() > 255 or arr.min() < 0:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{path}: cannot convert colour mode {mode} to RGB ({exc})") from exc


def load_image(
    path: str | os.PathLike,
    max_size: int | None = None,
    box: Box | Sequence[float] | str | None = None,
) -> Image.Image:
    """Load ``path`` as an RGB image, EXIF-rotated, cropped to ``box`` and capped at ``max_size``.

    ``img.info["original_size"]`` keeps the (width, height) of the whole EXIF-rotated image.
    The box is in the coordinates of the original (EXIF-rotated) image; cropping happens before any
    resizing, as in the revisitop protocol. JPEGs are downscaled while decoding (``Image.draft``) when
    they are much larger than ``max_size``. Raises :class:`ImageError` (naming the file) for missing,
    empty, truncated, corrupt or over-sized files, and :class:`BoxError` for bad boxes.
    """
    path = Path(path)
    box = box if isinstance(box, Box) or box is None else parse_box(box)
    f, st = open_regular(path)  # ImageError for missing files, folders, FIFOs, devices, links to them, loops
    if st.st_size == 0:
        f.close()
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                w0, h0 = img.size
                if w0 * h0 > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {w0}x{h0} = {w0 * h0} pixels exceeds the limit of {MAX_PIXELS} (decompression bomb?)"
                    )
                exif_rotated = _exif_transposes(img)
                drafted = False
                if max_size is not None and box is None and img.format == "JPEG" and not exif_rotated:
                    # Decode at a reduced scale (factor 1/2, 1/4, 1/8) no smaller than needed.
                    scale = max_size / max(w0, h0)
                    if scale < 0.5:
                        img.draft("RGB", (int(np.ceil(w0 * scale)), int(np.ceil(h0 * scale))))
                        drafted = True
                img.load()
                if exif_rotated:  # exif_transpose copies even when there is nothing to turn: 4 bytes a pixel more
                    img = ImageOps.exif_transpose(img)
                img = _to_rgb(img, path)
                original_size = (w0, h0) if drafted else img.size
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({exc})") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as exc:
        raise ImageError(f"{path}: unreadable or corrupt image ({exc.__class__.__name__}: {exc})") from exc
    except Exception as exc:  # decoder bugs on hostile files, e.g. Pillow 13's TypeError on a TIFF whose
        # StripOffsets tag is typed RATIONAL (found by tests/integration/test_fuzz.py): one bad file must not stop a run
        raise ImageError(f"{path}: unreadable or corrupt image ({exc.__class__.__name__}: {exc})") from exc
    if min(img.size) < 1:
        raise ImageError(f"{path}: image has no pixels")
    if box is not None:
        img = img.crop(clip_box(box, img.width, img.height, name=str(path)))
    if max_size is not None:
        img = resize_max(img, max_size)
    img.info["original_size"] = original_size  # (width, height) after EXIF rotation, before crop/resize
    return img


def header_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image *without decoding its pixels*: Pillow's ``getexif`` on a PNG
    loads the whole image to look for an eXIf chunk after the pixel data (measured: 40 concurrent size checks of
    an 89 Mpx PNG took a server to 13 GB), so for PNG only an eXIf chunk before the pixels counts. A broken EXIF
    block counts as 1 (upright)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw if not raw.startswith(b"Exif\x00\x00") else raw[6:])
            return int(exif.get(0x0112, 1))
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _exif_transposes(img: Image.Image) -> bool:
    try:
        return int(img.getexif().get(0x0112, 1)) not in (0, 1)
    except Exception:  # a broken EXIF block is not worth refusing the image for
        return False


def resize_max(img: Image.Image, max_size: int) -> Image.Image:
    """Shrink ``img`` (never enlarge) so that its longer side is ``max_size`` (Lanczos, aspect kept)."""
    if max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    w, h = img.size
    s = max_size / max(w, h)
    if s >= 1.0:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def scale_box(box: Box, sx: float, sy: float) -> Box:
    return Box(box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy)
