"""Server limits of issue 13: the decode gate (concurrent decodes and pixels at once), stored thumbnails made
once, upload caps per request and per minute, the optional token, and images added by another process showing
up without a restart."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from conftest import build_server_index as build_index
from instance_search.server import create_app
from instance_search.server.guard import BadRequest, DecodeGate, UploadRate


@pytest.fixture(scope="module")
def built(ukbench, tmp_path_factory):
    return build_index(ukbench, tmp_path_factory)


@pytest.fixture()
def index_copy(built, tmp_path):
    root = tmp_path / "index"
    # without thumbs/: tests/server/test_server.py may have stored thumbnails in the shared index earlier in the session
    shutil.copytree(built[1], root, ignore=shutil.ignore_patterns("thumbs"))
    return root


def test_decode_gate_bounds_decodes_and_pixels():
    gate = DecodeGate(max_decodes=3, pixel_budget=100)
    state = {"active": 0, "pixels": 0, "max_active": 0, "max_pixels": 0}
    lock = threading.Lock()

    def work(px):
        with gate.decoding(px, "x"):
            with lock:
                state["active"] += 1
                state["pixels"] += px
                state["max_active"] = max(state["max_active"], state["active"])
                state["max_pixels"] = max(state["max_pixels"], state["pixels"])
            time.sleep(0.02)
            with lock:
                state["active"] -= 1
                state["pixels"] -= px

    threads = [threading.Thread(target=work, args=(px,)) for px in [60, 30, 10, 10, 90, 20, 5, 5, 50, 40] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["max_active"] <= 3 and state["max_pixels"] <= 100 and gate.peak_pixels <= 100
    assert state["max_active"] >= 2  # it does run decodes side by side
    with pytest.raises(BadRequest) as e:
        with gate.decoding(101, "huge.png"):
            pass
    assert e.value.status == 413 and "huge.png" in str(e.value)
    busy = DecodeGate(max_decodes=1, pixel_budget=10, timeout=0.2)
    with busy.decoding(10, "a"):
        with pytest.raises(BadRequest) as e:
            with busy.decoding(1, "b.jpg"):
                pass
    assert e.value.status == 503


def test_upload_rate():
    rate = UploadRate(5)
    rate.take(3)
    rate.take(2)
    with pytest.raises(BadRequest) as e:
        rate.take(1)
    assert e.value.status == 429 and "5 per minute" in str(e.value)
    UploadRate(0).take(10_000)  # 0: no limit


def test_thumbnails_are_made_once_and_stored(index_copy):
    app = create_app(index_copy)
    svc = app.state.service
    c = TestClient(app)
    sizes = [64, 128, 256, 512, 100, 1024] * 7
    out = []

    def get(s):
        out.append(c.get(f"/api/thumbnail/3?size={s}"))

    threads = [threading.Thread(target=get, args=(s,)) for s in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 42 and all(r.status_code == 200 for r in out)
    assert svc.thumb_renders == 1  # one decode of the original for 42 requests of 6 sizes
    stored = list((index_copy / "thumbs").rglob("*.jpg"))
    assert len(stored) == 1 and stored[0].name.endswith("-512.jpg")
    again = create_app(index_copy).state.service  # a restarted server: from the stored master, no decode
    assert again.thumbnail(3, 256) and again.thumb_renders == 0


def test_images_added_by_another_process_show_up(index_copy, built):
    from instance_search.collection import Collection

    photos = built[0]
    c = TestClient(create_app(index_copy, allow_uploads=False))
    before = c.get("/api/stats").json()["images"]
    other = Collection.open(index_copy, writable=True)  # another writer (as `isearch index` beside the server)
    other.add_folder([photos / "ukbench00012.jpg", photos / "ukbench00013.jpg"], progress=False)
    assert c.get("/api/stats").json()["images"] == before + 2
    listed = c.get("/api/images?limit=500").json()
    assert listed["total"] == before + 2
    new_id = max(im["id"] for im in listed["images"])
    res = c.post("/api/search", data={"query_id": str(new_id), "top": "3"}).json()
    assert res["hits"][0]["id"] == new_id and {h["name"] for h in res["hits"][:2]} == {"ukbench00012.jpg",
                                                                                      "ukbench00013.jpg"}
    assert c.get(f"/api/thumbnail/{new_id}?size=64").status_code == 200


def test_uploads_per_minute_and_pixels_per_request(index_copy, built):
    photos = built[0]
    c = TestClient(create_app(index_copy, uploads_per_minute=2, pixel_budget=400_000))
    jpg = (photos / "ukbench00012.jpg").read_bytes()  # 640x480 = 307200 pixels
    two = [("files", (f"a{i}.jpg", jpg, "image/jpeg")) for i in range(2)]
    r = c.post("/api/images", files=two)
    assert r.status_code == 413 and "pixels" in r.json()["detail"]  # 614400 > 400000 in one request
    assert c.post("/api/images", files=two[:1]).status_code == 429  # the refused request counted (2 of 2)


def test_token(index_copy):
    c = TestClient(create_app(index_copy, token="s3cret"))
    assert c.get("/api/stats").status_code == 401
    assert c.get("/api/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/stats", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/openapi.json").status_code == 401
    page = c.get("/?token=s3cret")
    assert page.status_code == 200 and "isearch_token=s3cret" in page.headers.get("set-cookie", "")
    assert "HttpOnly" in page.headers["set-cookie"] and "SameSite=Strict" in page.headers["set-cookie"]
    assert c.get("/api/stats").status_code == 200  # the cookie the page set
    assert TestClient(create_app(index_copy)).get("/api/stats").status_code == 200  # no token: open (loopback)


def test_native_memory_limits_on_glibc():
    import platform

    from instance_search.server.guard import limit_native_memory

    msg = limit_native_memory()
    if platform.libc_ver()[0] == "glibc":
        assert msg.startswith("glibc: mmap threshold 4 MB, 2 arenas"), msg
    else:
        assert "not glibc" in msg


def test_size_check_never_decodes_the_pixels(tmp_path, monkeypatch):
    """probe_image reads the header only, also for a PNG (Pillow's getexif on a PNG decodes the whole image:
    343 MB for a 9400 x 9500 one), and still applies an EXIF orientation stored before the pixels."""
    from PIL import Image, ImageFile

    from instance_search.server.guard import probe_image

    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), (1, 2, 3)).save(big)
    rot = tmp_path / "rot.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(rot, exif=exif.tobytes())
    jpg = tmp_path / "rot.jpg"
    Image.new("RGB", (40, 30)).save(jpg, exif=exif.tobytes())

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert probe_image(big, "big.png") == ("PNG", 3000, 2000)
    assert probe_image(rot, "rot.png") == ("PNG", 30, 40)
    assert probe_image(jpg, "rot.jpg") == ("JPEG", 30, 40)


def test_query_too_small_to_describe_names_the_file(index_copy, tmp_path):
    from PIL import Image

    from instance_search.collection import Collection
    from instance_search.images import ImageError

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (3, 2), (9, 9, 9)).save(tiny)
    col = Collection.open(index_copy)
    with pytest.raises(ImageError, match=f"{tiny}: cannot be described"):
        col.describe(tiny)
    with pytest.raises(ImageError, match="query image: cannot be described"):
        col.describe(Image.new("RGB", (2, 2)))
