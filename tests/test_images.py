from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instance_search.images import (
    MAX_PIXELS,
    Box,
    BoxError,
    ImageError,
    clip_box,
    list_images,
    load_image,
    parse_box,
    resize_max,
)


@pytest.fixture()
def photo(ukbench):
    return ukbench / "ukbench00000.jpg"


def test_load_real_photo_and_max_size(photo):
    img = load_image(photo)
    assert img.mode == "RGB" and img.size == (640, 480)
    small = load_image(photo, max_size=200)
    assert max(small.size) == 200 and small.size == (200, 150)
    # draft decoding then Lanczos resize stays close to a full decode + resize
    ref = resize_max(img, 200)
    diff = np.abs(np.asarray(small, np.float32) - np.asarray(ref, np.float32)).mean()
    assert diff < 6.0


def test_box_crop_is_in_original_coordinates(photo):
    full = np.asarray(load_image(photo))
    crop = load_image(photo, box="10.2,20.7,110,220")
    # revisitop rounding: floor x1,y1, ceil x2,y2
    assert crop.size == (100, 200)
    assert np.array_equal(np.asarray(crop), full[20:220, 10:110])
    # a box partly outside is clipped; a crop is then capped at max_size but never enlarged
    c2 = load_image(photo, box=(600, 400, 900, 900), max_size=1024)
    assert c2.size == (40, 80)


@pytest.mark.parametrize("text", ["", "1,2,3", "a,b,c,d", "5,5,5,9", "9,1,3,4", "1,2,nan,4", "1,2,3,4,5"])
def test_bad_boxes(text):
    with pytest.raises(BoxError):
        parse_box(text)


def test_box_outside_image(photo):
    with pytest.raises(BoxError, match="outside"):
        load_image(photo, box=(700, 10, 800, 50))
    assert clip_box(Box(-5, -5, 10, 10), 100, 100) == (0, 0, 10, 10)


def test_bad_files_named_in_errors(tmp_path, photo):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(photo.read_bytes()[:3000])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    for bad in (empty, trunc, text, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(ImageError) as e:
            load_image(bad)
        assert str(bad) in str(e.value)


def test_colour_modes_and_exif(tmp_path, photo):
    src = Image.open(photo)
    cmyk = tmp_path / "cmyk.jpg"
    src.convert("CMYK").save(cmyk)
    grey = tmp_path / "grey.png"
    src.convert("L").save(grey)
    pal = tmp_path / "pal.png"
    src.convert("P").save(pal)
    rgba = tmp_path / "rgba.png"
    src.convert("RGBA").save(rgba)
    deep = tmp_path / "deep.png"
    arr16 = (np.asarray(src.convert("L"), np.uint16) * 257)
    Image.fromarray(arr16).save(deep)
    for p in (cmyk, grey, pal, rgba, deep):
        img = load_image(p)
        assert img.mode == "RGB" and img.size == (640, 480), p
    # 16-bit is mapped to 8 bits, not clipped
    assert abs(np.asarray(load_image(deep))[..., 0].astype(int) - np.asarray(src.convert("L")).astype(int)).max() <= 1
    # EXIF orientation 6 (rotate 90 CW) is applied
    exif = Image.Exif()
    exif[0x0112] = 6
    rot = tmp_path / "rot.jpg"
    src.save(rot, exif=exif.tobytes())
    assert load_image(rot).size == (480, 640)
    assert load_image(rot, max_size=320).size == (240, 320)


def test_decompression_bomb(tmp_path):
    # A tiny PNG that declares more pixels than the limit.
    side = int(np.sqrt(MAX_PIXELS)) + 100
    bomb = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(bomb)
    with pytest.raises(ImageError, match="bomb|exceeds"):
        load_image(bomb)


def test_list_images(tmp_path, photo):
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    (tmp_path / "a" / "x.JPG").write_bytes(photo.read_bytes())
    (tmp_path / "a" / ".hidden" / "y.jpg").write_bytes(photo.read_bytes())
    (tmp_path / "readme.txt").write_text("hi")
    assert [p.name for p in list_images(tmp_path)] == ["x.JPG"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


def test_scale_box_and_box_size(paris):
    """A real Paris query box (classic ground truth, original pixels) scaled to the 1024-px copy here."""
    import pickle

    from instance_search.images import Box, scale_box

    g = pickle.load(open(paris.parents[1] / "gnd" / "paris6k" / "gnd_rparis6k.pkl", "rb"))  # trusted folder
    i = g["qimlist"].index("paris_defense_000056")
    x1, y1, x2, y2 = g["gnd"][i]["bbx"]
    box = Box(x1, y1, x2, y2)
    assert (box.width, box.height) == (x2 - x1, y2 - y1)
    half = scale_box(box, 0.5, 0.25)
    assert (half.x1, half.y1, half.x2, half.y2) == (x1 * 0.5, y1 * 0.25, x2 * 0.5, y2 * 0.25)
    assert (half.width, half.height) == pytest.approx((box.width * 0.5, box.height * 0.25))


def _awkward_folder(tmp_path, ukbench, n_good=3):
    """Good photos beside a FIFO, a link to /dev/zero, a symlink loop, a dangling link and a socket, all with
    image names."""
    import os
    import socket

    d = tmp_path / "photos"
    d.mkdir()
    for i in range(n_good):
        (d / f"good{i}.jpg").write_bytes((ukbench / f"ukbench{i:05d}.jpg").read_bytes())
    os.mkfifo(d / "fifo.jpg")
    os.symlink("/dev/zero", d / "zero.jpg")
    os.symlink(d / "loop.jpg", d / "loop.jpg")
    os.symlink(d / "gone.jpg", d / "dangling.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.png"))
    return d, sock


def test_only_regular_files_are_listed_and_read(tmp_path, ukbench):
    import threading

    from instance_search.images import regular_file_sha256

    d, sock = _awkward_folder(tmp_path, ukbench)
    try:
        skipped = []
        got = list_images(d, on_skip=lambda p, why: skipped.append((p.name, why)))
        assert [p.name for p in got] == ["good0.jpg", "good1.jpg", "good2.jpg"]
        why = dict(skipped)
        assert sorted(why) == ["dangling.jpg", "fifo.jpg", "loop.jpg", "sock.png", "zero.jpg"]
        assert "FIFO" in why["fifo.jpg"] and "symlink loop" in why["loop.jpg"] and "socket" in why["sock.png"]
        assert "symlink to a character device" in why["zero.jpg"] and "dangling symlink" in why["dangling.jpg"]
        for name, what in (("fifo.jpg", "FIFO"), ("zero.jpg", "character device"), ("loop.jpg", "symlink loop"),
                           ("sock.png", "socket")):
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("e", pytest.raises(ImageError, load_image, d / name)))
            t.start()
            t.join(10)
            assert not t.is_alive(), f"load_image({name}) hangs"
            assert what in str(out["e"].value) and name in str(out["e"].value)
            with pytest.raises(ImageError, match=what):
                regular_file_sha256(d / name)
    finally:
        sock.close()


def test_hashing_reads_at_most_the_stat_size(tmp_path, monkeypatch):
    import hashlib
    import os

    from instance_search import images

    f = tmp_path / "a.jpg"
    f.write_bytes(b"x" * 1000)
    real = images.open_regular

    def growing(path):  # the file grows between the stat and the read
        fh, st = real(path)
        with open(path, "ab") as w:
            w.write(b"y" * 5000)
        return fh, st

    monkeypatch.setattr(images, "open_regular", growing)
    st, sha = images.regular_file_sha256(f)
    assert st.st_size == 1000 and sha == hashlib.sha256(b"x" * 1000).hexdigest()
    assert os.path.getsize(f) == 6000


def test_one_pixel_limit_everywhere(tmp_path):
    """MAX_PIXELS is the one limit: Pillow's bomb check is tied to it (it used to refuse at its own 89.5 Mpx)."""
    from instance_search import images

    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS == images.MAX_PIXELS


def test_printable_names():
    from instance_search.images import printable

    assert printable("a\nb.jpg") == "a\\nb.jpg" and "\n" not in printable("x\r\n3 added, 0 failed")
    assert printable("x\udcffy.jpg") == "x\\xffy.jpg"  # a non-UTF-8 byte, as Python decodes file names
    assert printable("x\udcffy.jpg").encode("utf-8")  # valid UTF-8 (no lone surrogate)
    assert printable("été 日本.jpg") == "été 日本.jpg"
