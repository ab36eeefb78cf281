"""Property-based fuzzing (hypothesis) of what reads untrusted input: the image loader, the box parser and
the server's file-name sanitiser.

The loader is fed (a) real small images of every format we accept, cut from a UKBench photo, with random
byte flips, insertions, deletions and truncations, and (b) arbitrary bytes under image file names. Whatever
the bytes, ``load_image`` must return an 8-bit RGB image with at least one pixel or raise ``ImageError``
naming the file -- never any other exception. The box parser must return a valid box or raise ``BoxError``.
Bounded: a fixed number of examples per property, derandomised (the same examples on every run), so the file
runs in well under a minute on one thread.
"""
from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from instance_search.images import Box, BoxError, ImageError, load_image, parse_box

# Pillow warns (UserWarning) about the corrupt EXIF/TIFF tags it skips in mutated files: expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: ISEARCH_FUZZ_EXAMPLES=2000 for a longer run (the figures in the README come from one)
FUZZ = settings(max_examples=int(os.environ.get("ISEARCH_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: format -> (file extension, Pillow save arguments, mode of the seed image)
FORMATS = {
    "JPEG": (".jpg", {"quality": 80}, "RGB"),
    "PJPEG": (".jpg", {"quality": 80, "progressive": True}, "RGB"),
    "PNG": (".png", {}, "RGB"),
    "PNG-P": (".png", {}, "P"),
    "PNG-16": (".png", {}, "I;16"),
    "GIF": (".gif", {}, "P"),
    "BMP": (".bmp", {}, "RGB"),
    "TIFF": (".tif", {}, "RGB"),
    "TIFF-LZW": (".tif", {"compression": "tiff_lzw"}, "RGB"),
    "TIFF-CMYK": (".tif", {}, "CMYK"),
    "WEBP": (".webp", {"quality": 70}, "RGB"),
    "PPM": (".ppm", {}, "RGB"),
}


@pytest.fixture(scope="module")
def seeds(ukbench) -> dict[str, tuple[str, bytes]]:
    """Small valid files of each format (a 40x30 crop of a real photo), as (extension, bytes)."""
    photo = Image.open(ukbench / "ukbench00010.jpg").convert("RGB").crop((200, 150, 280, 210)).resize((40, 30))
    out = {}
    for name, (ext, kwargs, mode) in FORMATS.items():
        if mode == "I;16":
            img = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)
        else:
            img = photo.convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=name.split("-")[0].replace("PJPEG", "JPEG"), **kwargs)
        out[name] = (ext, buf.getvalue())
    return out


def _check_loader(path: Path, max_size: int | None = None, box=None) -> None:
    """The loader's contract on one file: an RGB image with pixels, or ImageError/BoxError naming it."""
    try:
        img = load_image(path, max_size=max_size, box=box)
    except ImageError as exc:
        assert str(path) in str(exc), exc
        return
    except BoxError:
        assert box is not None
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    if max_size is not None:
        assert max(img.size) <= max_size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (img.height, img.width, 3)
    w0, h0 = img.info["original_size"]
    assert w0 >= 1 and h0 >= 1


def test_seeds_are_valid_images(seeds, tmp_path):
    """The seeds themselves load (else the mutation fuzzing below would only exercise error paths)."""
    for name, (ext, data) in seeds.items():
        p = tmp_path / f"seed-{name}{ext}"
        p.write_bytes(data)
        img = load_image(p)
        assert img.mode == "RGB" and img.size == (40, 30), name


def odd_tiff(seed: bytes, tag_type: int) -> bytes:
    """``seed`` (a little-endian TIFF) with the type of its StripOffsets tag (273) set to ``tag_type``."""
    import struct

    d = bytearray(seed)
    assert d[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", d, 4)[0]
    for k in range(struct.unpack_from("<H", d, ifd)[0]):
        if struct.unpack_from("<H", d, ifd + 2 + 12 * k)[0] == 273:
            struct.pack_into("<H", d, ifd + 2 + 12 * k + 2, tag_type)
            return bytes(d)
    raise AssertionError("no StripOffsets tag")


@pytest.mark.parametrize("tag_type", [5, 10, 11, 12])  # RATIONAL, SRATIONAL, FLOAT, DOUBLE
def test_regression_tiff_with_fractional_strip_offsets(seeds, tmp_path, tag_type):
    """Found by random mutation (30 000 mutants, 2 hits): Pillow 13 raises TypeError, not OSError, on a TIFF
    whose StripOffsets tag is typed RATIONAL or FLOAT; it used to escape load_image and stop `isearch index`."""
    path = tmp_path / "odd.tif"
    path.write_bytes(odd_tiff(seeds["TIFF"][1], tag_type))
    with pytest.raises(ImageError, match="odd.tif: unreadable or corrupt image"):
        load_image(path)


_mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                      st.floats(0, 1, allow_nan=False), st.integers(0, 255), st.integers(1, 64))


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), mutations=st.lists(_mutation, min_size=1, max_size=6),
       max_size=st.sampled_from([None, 16, 33]))
def test_loader_on_mutated_images(seeds, tmp_path, fmt, mutations, max_size):
    ext, data = seeds[fmt]
    buf = bytearray(data)
    for op, where, byte, n in mutations:
        i = min(int(where * len(buf)), max(len(buf) - 1, 0))
        if op == "flip" and buf:
            buf[i] ^= 1 << (byte % 8)
        elif op == "set" and buf:
            buf[i:i + n] = bytes([byte]) * len(buf[i:i + n])
        elif op == "insert":
            buf[i:i] = bytes([byte]) * n
        elif op == "delete":
            del buf[i:i + n]
        elif op == "truncate":
            del buf[i:]
    path = tmp_path / f"mutant{ext}"
    path.write_bytes(bytes(buf))
    _check_loader(path, max_size=max_size)


@FUZZ
@given(data=st.binary(max_size=2048), ext=st.sampled_from([".jpg", ".png", ".gif", ".tif", ".bmp", ".webp",
                                                           ".ppm", ".pgm"]),
       magic=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"II*\x00", b"MM\x00*",
                              b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n", b"P5\n"]))
@example(data=b"", ext=".jpg", magic=b"")
@example(data=b"\x00" * 100, ext=".png", magic=b"\x89PNG\r\n\x1a\n")
@example(data=b"4 4\n255\n", ext=".ppm", magic=b"P6\n")
def test_loader_on_arbitrary_bytes(tmp_path, data, ext, magic):
    path = tmp_path / f"noise{ext}"
    path.write_bytes(magic + data)
    _check_loader(path, max_size=32)


@FUZZ
@given(box=st.one_of(st.tuples(*[st.floats(allow_nan=True, allow_infinity=True)] * 4),
                     st.tuples(*[st.integers(-10**6, 10**6)] * 4)))
def test_loader_with_any_box(seeds, tmp_path, box):
    ext, data = seeds["PNG"]
    path = tmp_path / f"boxed{ext}"
    path.write_bytes(data)
    try:
        img = load_image(path, box=box)
    except BoxError as exc:
        assert "box" in str(exc)
        return
    # a box that is accepted lies (partly) inside the 40x30 image; the crop is its clipped part
    b = parse_box(box)
    x1, y1 = max(0, math.floor(b.x1)), max(0, math.floor(b.y1))
    x2, y2 = min(40, math.ceil(b.x2)), min(30, math.ceil(b.y2))
    assert img.size == (x2 - x1, y2 - y1)


# --------------------------------------------------------------------------------------------- box parser
_number_text = st.one_of(st.floats().map(repr), st.integers(-10**30, 10**30).map(str),
                         st.sampled_from(["inf", "-inf", "nan", "1e999", "-0", "0x10", "1_0", " ", "", "١٢"]))


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.lists(_number_text, max_size=6).map(",".join),
                      st.lists(_number_text, max_size=6).map(" ".join)))
@example(text="1,2,3,4")
@example(text="1e308,1e308,1e309,1e309")
def test_parse_box_on_any_text(text):
    try:
        b = parse_box(text)
    except BoxError as exc:
        assert repr(text) in str(exc)
        return
    assert isinstance(b, Box)
    assert all(math.isfinite(v) for v in b.as_tuple()) and b.x1 < b.x2 and b.y1 < b.y2


@FUZZ
@given(values=st.one_of(
    st.lists(st.one_of(st.floats(), st.integers(), st.integers(-10**400, 10**400), st.none(), st.text(max_size=5),
                       st.booleans()), max_size=6),
    st.tuples(*[st.floats(allow_nan=False, allow_infinity=False)] * 4)))
@example(values=[10**400, 0, 1, 1])
def test_parse_box_on_any_sequence(values):
    try:
        b = parse_box(values)
    except BoxError:
        return
    assert all(math.isfinite(v) for v in b.as_tuple()) and b.x1 < b.x2 and b.y1 < b.y2


@FUZZ
@given(st.tuples(*[st.floats(allow_nan=False, allow_infinity=False)] * 4))
def test_parse_box_round_trips_valid_boxes(v):
    """Four finite numbers with x1 < x2, y1 < y2 written as text come back exactly (repr round-trips)."""
    x1, y1, x2, y2 = v
    text = f"{x1!r},{y1!r},{x2!r},{y2!r}"
    if x1 < x2 and y1 < y2:
        assert parse_box(text) == Box(x1, y1, x2, y2)
        assert parse_box(text.replace(",", " ")) == Box(x1, y1, x2, y2)
    else:
        with pytest.raises(BoxError):
            parse_box(text)


# --------------------------------------------------------------------------------------------- upload names
@FUZZ
@given(name=st.one_of(st.none(), st.text(max_size=300),
                      st.lists(st.sampled_from(["..", ".", "/", "\\", "etc", "passwd", "C:", "\x00", "é", " ",
                                                "~", "%2e", ".jpg"]), max_size=12).map("".join)))
def test_upload_names_are_sanitised(name):
    from instance_search.server.guard import sanitize_stem

    stem = sanitize_stem(name)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", stem), stem
    assert ".." not in stem and not stem.endswith((".", "-", "_"))
