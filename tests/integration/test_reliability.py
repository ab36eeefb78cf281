"""Reliability of `isearch index` as a user runs it (the real CLI in a subprocess, VGG16 R-MAC at 128 px):

* a folder of real UKBench photos mixed with images of every awkward kind (CMYK, 16-bit, palette, greyscale,
  EXIF-rotated, ...) and with bad files of every kind (truncated, 0-byte, corrupt headers, decompression bomb,
  non-images under image names, a dangling link, images too small to describe): every good image is indexed,
  every bad one is reported by name, the command exits 0 and prints no traceback;
* kill -9 at random moments while indexing that folder, resume each time: the final index equals the
  uninterrupted run (same ids and paths, equal vectors and local descriptors, no duplicates, no stray files),
  and no kill ever loses an image that an earlier check had seen committed.

(benchmarks/bench_kill_resume.py does the same with 20 kills on a larger set.)
"""
from __future__ import annotations

import io
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from instance_search.index.store import IndexStore

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

ISEARCH = str(Path(sys.executable).parent / "isearch")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ISEARCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
INDEX_ARGS = ["--max-size", "128", "--whitening", "none", "--batch", "3"]
N_PLAIN = 30  # plain UKBench photos in the folder
KILLS = 5


def _png_header(w: int, h: int, crc_ok: bool = True) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb when that is too many)."""
    def chunk(tag: bytes, data: bytes, ok: bool = True) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc if ok else crc ^ 1)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0), crc_ok)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def build_folder(ukbench: Path, root: Path) -> tuple[dict[str, tuple[int, int]], list[Path]]:
    """Write the mixed folder. Returns ({good file name: expected (width, height)}, [bad paths])."""
    root.mkdir(parents=True)
    good: dict[str, tuple[int, int]] = {}
    for i in range(N_PLAIN):
        (root / f"ukbench{i:05d}.jpg").write_bytes((ukbench / f"ukbench{i:05d}.jpg").read_bytes())
        good[f"ukbench{i:05d}.jpg"] = (640, 480)
    src = Image.open(ukbench / "ukbench00040.jpg").convert("RGB")
    src2 = Image.open(ukbench / "ukbench00044.jpg").convert("RGB")

    def save(name: str, img: Image.Image, size=(640, 480), **kw) -> None:
        img.save(root / name, **kw)
        good[name] = size

    # --- awkward but valid: converted, never refused
    save("cmyk.jpg", src.convert("CMYK"))
    save("cmyk.tif", src2.convert("CMYK"), compression="tiff_lzw")
    save("grey.jpg", src.convert("L"))
    save("grey-8bit.png", src2.convert("L"))
    save("grey-16bit.png", Image.fromarray(np.asarray(src2.convert("L"), np.uint16) * 257))  # same pixels x257
    arr48 = (np.asarray(src, np.uint16) * 257)[..., ::-1]  # OpenCV writes BGR
    cv2.imwrite(str(root / "rgb-48bit.png"), np.ascontiguousarray(arr48))
    good["rgb-48bit.png"] = (640, 480)
    save("float.tif", Image.fromarray(np.asarray(src.convert("L"), np.float32) / 255.0))
    save("palette.png", src.convert("P"))
    pal = src2.convert("P")
    save("palette-transparent.gif", pal, transparency=0)
    save("rgba.png", src.convert("RGBA"))
    save("la.png", src2.convert("LA"))
    save("bilevel.bmp", src.convert("1"))
    save("progressive.jpg", src2, quality=85, progressive=True)
    save("photo.webp", src, quality=80)
    save("photo.ppm", src2)
    buf = io.BytesIO()
    src.save(buf, format="JPEG")
    (root / "jpeg-named.png").write_bytes(buf.getvalue())  # a JPEG under a .png name: still an image
    good["jpeg-named.png"] = (640, 480)
    (root / "UPPER.JPEG").write_bytes(buf.getvalue())
    good["UPPER.JPEG"] = (640, 480)
    for orient, size in ((3, (640, 480)), (6, (480, 640)), (8, (480, 640))):
        exif = Image.Exif()
        exif[0x0112] = orient
        save(f"exif-rot{orient}.jpg", src2, size=size, exif=exif.tobytes())
    # the pixels a viewer shows for exif-rot6.jpg, stored losslessly: must give the same descriptor
    shown = Image.open(root / "exif-rot6.jpg")
    shown.load()
    from PIL import ImageOps

    save("exif-rot6-as-shown.png", ImageOps.exif_transpose(shown), size=(480, 640))
    jpg = buf.getvalue()
    app1 = b"Exif\x00\x00" + b"II*\x00" + b"\xff" * 40  # an EXIF block whose IFD offset points nowhere
    (root / "broken-exif.jpg").write_bytes(jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:])
    good["broken-exif.jpg"] = (640, 480)
    (root / "album.jpg").mkdir()  # a folder with an image name: walked into, not read as an image
    (root / "album.jpg" / "inside.jpg").write_bytes((ukbench / "ukbench00048.jpg").read_bytes())
    good["album.jpg/inside.jpg"] = (640, 480)

    # --- bad: reported by name and skipped
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": jpg[:3000],
        "truncated.png": (root / "palette.png").read_bytes()[:2000],
        "bad-crc-header.png": _png_header(64, 48, crc_ok=False),
        "garbled-header.jpg": jpg[:2] + bytes(range(256)) * 4 + jpg[1026:],
        "bomb.png": _png_header(30000, 30000),
        "notes.jpg": b"this is not an image\n" * 20,
        "page.png": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "archive.gif": b"PK\x03\x04" + os.urandom(500),
        "program.tif": b"\x7fELF\x02\x01\x01" + bytes(500),
        "script.webp": b"#!/bin/sh\nrm -rf /\n",
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    tiny = Image.new("RGB", (1, 1), (200, 30, 30))
    tiny.save(root / "one-pixel.png")
    Image.fromarray(np.asarray(src)[:2, :]).save(root / "two-pixel-strip.png")  # 640x2 -> 128x1 at --max-size 128
    buf = io.BytesIO()
    src.resize((40, 30)).save(buf, format="TIFF")
    d = bytearray(buf.getvalue())  # StripOffsets typed RATIONAL: made Pillow 13 raise TypeError (test_fuzz.py)
    ifd = struct.unpack_from("<I", d, 4)[0]
    for k in range(struct.unpack_from("<H", d, ifd)[0]):
        if struct.unpack_from("<H", d, ifd + 2 + 12 * k)[0] == 273:
            struct.pack_into("<H", d, ifd + 2 + 12 * k + 2, 5)
    (root / "odd-strip-offsets.tif").write_bytes(bytes(d))
    os.symlink(root / "does-not-exist.jpg", root / "dangling-link.jpg")
    bad_paths = [root / n for n in bad] + [root / "one-pixel.png", root / "two-pixel-strip.png",
                                           root / "odd-strip-offsets.tif", root / "dangling-link.jpg"]
    return good, bad_paths


def run_index(folder: Path, index: Path, log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([ISEARCH, "index", str(folder), "--index", str(index), *INDEX_ARGS], env=ENV,
                            stdout=subprocess.PIPE, stderr=open(log, "wb"), **kw)


@pytest.fixture(scope="module")
def mixed(ukbench, tmp_path_factory):
    """The mixed folder and an uninterrupted `isearch index` run over it (the reference)."""
    base = tmp_path_factory.mktemp("reliability")
    folder = base / "photos"
    good, bad = build_folder(ukbench, folder)
    index, log = base / "reference-index", base / "reference.log"
    proc = run_index(folder, index, log)
    started = _wait_for_progress_bar(proc, log)
    out, _ = proc.communicate(timeout=600)
    return {"folder": folder, "good": good, "bad": bad, "index": index, "rc": proc.returncode,
            "stdout": out.decode(), "stderr": log.read_text(), "indexing_s": time.monotonic() - started}


def _wait_for_progress_bar(proc: subprocess.Popen, log: Path, timeout: float = 120) -> float:
    """Wait until the run shows its progress bar (the model is loading, files are being read); its time."""
    deadline = time.monotonic() + timeout
    while b"indexing" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return time.monotonic()


def _progress(log: Path) -> tuple[int, int] | None:
    """(done, total) of the last progress bar update in a run's stderr."""
    m = re.findall(rb"(\d+)/(\d+) \[", log.read_bytes())
    return (int(m[-1][0]), int(m[-1][1])) if m else None


def kill_during_indexing(proc: subprocess.Popen, log: Path, kills_left: int, jitter_s: float,
                         rng: random.Random, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` at a random moment of its indexing: once its progress bar shows a random count in the
    first 1/(kills_left+1) of its work, plus a random part of one image's time (so the kill lands anywhere:
    model loading, decoding, a forward pass, a commit). Tied to progress, not to the clock, so a faster or
    slower machine cannot let the loop finish the work. Returns whether the process was still running."""
    deadline = time.monotonic() + timeout
    target = None
    while proc.poll() is None and time.monotonic() < deadline:
        p = _progress(log)
        if p is not None and target is None:
            target = rng.randint(0, p[1] // (kills_left + 1))
        if p is not None and p[0] >= target:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0, jitter_s))
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    return True


def test_bad_images_reported_good_ones_indexed(mixed):
    err, out = mixed["stderr"], mixed["stdout"]
    assert mixed["rc"] == 0, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    for p in mixed["bad"]:  # every bad file named in exactly one "skipped" line
        assert sum(str(p) in line for line in skipped) == 1, (p.name, skipped)
    assert len(skipped) == len(mixed["bad"])
    n_good = len(mixed["good"])
    assert f"{n_good} added, 0 updated, 0 unchanged, {len(mixed['bad'])} failed" in out, out
    store = IndexStore.open(mixed["index"])
    recs = {Path(r["path"]).relative_to(mixed["folder"].resolve()).as_posix(): r for r in store.records()}
    assert set(recs) == set(mixed["good"])  # every good image, nothing else
    for name, size in mixed["good"].items():
        assert (recs[name]["width"], recs[name]["height"]) == size, name  # EXIF rotation applied
    assert len(store) == n_good and len(set(store.ids().tolist())) == n_good
    vec = dict(zip([Path(r["path"]).name for r in store.records()], store.vectors()))
    assert all(np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-4 for v in vec.values())
    # the conversions are right, not merely silent: same pixels -> same descriptor
    assert float(vec["grey-16bit.png"] @ vec["grey-8bit.png"]) > 0.9999
    assert float(vec["exif-rot6.jpg"] @ vec["exif-rot6-as-shown.png"]) > 0.9999
    assert float(vec["rgb-48bit.png"] @ vec["palette.png"]) > 0.9  # both from ukbench00040, 8-bit palette lossy
    # and a second run over the same folder changes nothing and reports the bad files again
    again = subprocess.run([ISEARCH, "index", str(mixed["folder"]), "--index", str(mixed["index"]), *INDEX_ARGS,
                            "-q"], env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Traceback" not in again.stderr
    assert f"0 added, 0 updated, {n_good} unchanged, {len(mixed['bad'])} failed" in again.stdout


def _snapshot(index: Path) -> dict[int, str]:
    """id -> path of a (possibly interrupted) index, after checking it is sound."""
    store = IndexStore.open(index)
    ids, recs = store.ids().tolist(), store.records()
    assert ids == list(range(len(ids))), f"ids not dense and unique: {ids}"
    paths = [r["path"] for r in recs]
    assert len(set(paths)) == len(paths), "a path is stored twice"
    if ids:
        v = store.vectors()
        assert np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
        assert all(len(x) and np.isfinite(x).all() for x in store.local_descriptors())
    return dict(zip(ids, paths))


def test_kill_minus_9_and_resume_equals_an_uninterrupted_run(mixed, tmp_path):
    assert mixed["rc"] == 0
    ref = IndexStore.open(mixed["index"])
    total = len(ref)
    per_image_s = mixed["indexing_s"] / (len(mixed["good"]) + len(mixed["bad"]))
    rng = random.Random(20240607)
    index, seen, kills, partial = tmp_path / "index", {}, 0, 0
    for attempt in range(KILLS):
        log = tmp_path / f"run{attempt}.log"
        proc = run_index(mixed["folder"], index, log)
        kills += kill_during_indexing(proc, log, KILLS - attempt, per_image_s, rng)
        proc.communicate(timeout=60)
        if not IndexStore.exists(index):
            continue  # killed before the first manifest was written
        now = _snapshot(index)
        assert seen.items() <= now.items(), "an image committed before this kill was lost or renumbered"
        seen = now
        partial += 0 < len(now) < total
    final = subprocess.run([ISEARCH, "index", str(mixed["folder"]), "--index", str(index), *INDEX_ARGS, "-q"],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills == KILLS, f"only {kills} of {KILLS} runs were still indexing when killed"
    assert partial >= 1, "no kill left a partial index: the test exercised nothing"

    got = IndexStore.open(index)
    assert _snapshot(index) == dict(zip(ref.ids().tolist(), [r["path"] for r in ref.records()]))
    for a, b in zip(got.records(), ref.records()):
        assert {k: a[k] for k in ("id", "path", "width", "height", "sha256", "size")} == \
               {k: b[k] for k in ("id", "path", "width", "height", "sha256", "size")}
    np.testing.assert_allclose(got.vectors(), ref.vectors(), rtol=0, atol=1e-5)
    for x, y in zip(got.local_descriptors(), ref.local_descriptors()):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-3)  # stored as float16
    stray = got.leftovers()  # files in segments/, maps/ no catalogue row names; stale temp files
    assert not stray, f"files the catalogue does not name: {stray}"
