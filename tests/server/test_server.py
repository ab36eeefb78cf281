"""HTTP API on a small real index (12 UKBench photos, R-MAC on VGG16 at 256 px): search, box search, uploads,
thumbnails, and every bad input answered with the right 4xx."""
from __future__ import annotations

import io
import json
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pytest

from fastapi.testclient import TestClient  # needs fastapi, python-multipart and httpx2 (or httpx)
from PIL import Image

from instance_search.collection import Collection
from conftest import build_server_index as build_index
from instance_search.server import create_app
from instance_search.server.guard import sanitize_stem





@pytest.fixture(scope="module")
def built(ukbench, tmp_path_factory) -> tuple[Path, Path]:
    return build_index(ukbench, tmp_path_factory)


@pytest.fixture(scope="module")
def photos(built) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def index_dir(built) -> Path:
    return built[1]


@pytest.fixture(scope="module")
def client(index_dir) -> TestClient:
    return TestClient(create_app(index_dir, ground_truth="ukbench"))


def _jpg(photos: Path, i: int) -> bytes:
    return (photos / f"ukbench{i:05d}.jpg").read_bytes()


def _png_header(w: int, h: int) -> bytes:
    """A tiny PNG that claims to be w x h (a decompression bomb as far as its header goes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _group(name: str) -> int:
    return int(Path(name).stem[-5:]) // 4


# ------------------------------------------------------------------------------------------------ search
def test_search_by_upload_finds_other_views(client, photos):
    r = client.post("/api/search", files={"image": ("ukbench00000.jpg", _jpg(photos, 0), "image/jpeg")},
                    data={"top": "4"})
    assert r.status_code == 200, r.text
    res = r.json()
    names = [h["name"] for h in res["hits"]]
    assert names[0] == "ukbench00000.jpg" and res["hits"][0]["score"] > 0.99
    assert {"ukbench00001.jpg", "ukbench00002.jpg", "ukbench00003.jpg"} <= set(names), names
    assert [h["rank"] for h in res["hits"]] == [1, 2, 3, 4]
    assert all(h["box"] is None and h["relevant"] is True for h in res["hits"])
    assert all(h["thumbnail"] == f"/api/thumbnail/{h['id']}" and "path" not in h for h in res["hits"])
    assert res["precision"] == {"group": "0", "relevant_in_index": 4, "at": {"1": 1.0, "4": 1.0}}
    assert res["timings"]["search_ms"] > 0 and {"upload_ms", "wait_ms"} <= set(res["timings"])
    assert res["query"]["name"] == "ukbench00000.jpg" and res["query"]["box"] is None


def test_search_by_indexed_id(client):
    ids = {im["name"]: im["id"] for im in client.get("/api/images", params={"limit": 100}).json()["images"]}
    r = client.post("/api/search", data={"query_id": str(ids["ukbench00008.jpg"]), "top": "4"})
    assert r.status_code == 200, r.text
    names = [h["name"] for h in r.json()["hits"]]
    assert {"ukbench00009.jpg", "ukbench00010.jpg", "ukbench00011.jpg"} <= set(names), names


def test_box_search_in_a_scaled_frame(client):
    """The page draws boxes on a scaled copy: ``box_frame`` says its size and the server scales the box."""
    r = client.post("/api/search", data={"query_id": "4", "top": "4", "box": "40,24,216,168",
                                         "box_frame": "256,192"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["query"]["box"] == [100.0, 60.0, 540.0, 420.0] and res["query"]["size"] == [640, 480]
    groups = [_group(h["name"]) for h in res["hits"]]
    assert groups[0] == 1 and groups.count(1) >= 3, groups
    assert res["precision"]["at"]["1"] == 1.0


# ------------------------------------------------------------------------------------------------ read-only endpoints
def test_thumbnails_by_id_only(client):
    r = client.get("/api/thumbnail/5")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) == 256
    assert max(Image.open(io.BytesIO(client.get("/api/thumbnail/5?size=64").content)).size) == 64
    assert client.get("/api/thumbnail/5?size=0").status_code == 422
    assert client.get("/api/thumbnail/5?size=99999").status_code == 422
    for url in ["/api/thumbnail/999", "/api/thumbnail/-1", "/api/thumbnail/1.jpg", "/api/thumbnail/%EF%BC%91",
                "/api/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd", "/api/thumbnail/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                "/api/thumbnail/%2Fetc%2Fpasswd", "/api/thumbnail/1%00", "/api/thumbnail/1/../../../etc/passwd",
                "/api/thumbnail/..\\..\\etc\\passwd", "/../../etc/passwd", "/static/../../../etc/passwd",
                "/api/thumbnail/" + "9" * 40]:
        r = client.get(url)
        assert r.status_code == 404, (url, r.status_code)
        assert b"root:" not in r.content


def test_traversal_in_query_fields_is_refused(client):
    r = client.post("/api/search", data={"query_id": "../../etc/passwd"})
    assert r.status_code == 422 and b"root:" not in r.content
    r = client.post("/api/search", data={"query_id": "99999"})
    assert r.status_code == 404


def test_stats_list_page_and_openapi(client, index_dir):
    s = client.get("/api/stats").json()
    assert s["images"] == 12 and s["recipe"]["name"] == "rmac" and s["uploads"] is True
    assert s["groups"] == 3 and s["ground_truth"].startswith("ukbench") and s["index"] == index_dir.name
    lst = client.get("/api/images", params={"offset": 10, "limit": 5}).json()
    assert lst["total"] == 12 and len(lst["images"]) == 2 and lst["images"][0]["group"] is not None
    assert client.get("/api/images", params={"limit": 0}).status_code == 422
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<canvas" in page.text and 'type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/images", "/api/stats", "/api/thumbnail/{image_id}"} <= set(spec["paths"])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_search_inputs(client, photos, tmp_path):
    jpg = _jpg(photos, 4)

    def post(data=None, name="q.jpg", content=jpg, ctype="image/jpeg"):
        files = None if content is None else {"image": (name, content, ctype)}
        return client.post("/api/search", files=files, data=data or {})

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="ICO")
    cases = [
        (post(content=b"hello, not an image", name="x.jpg"), 415, "not a readable image"),
        (post(content=b"<svg xmlns='http://www.w3.org/2000/svg'/>", name="x.svg"), 415, "not a readable image"),
        (post(content=jpg[:3000]), 415, "corrupt"),
        (post(content=buf.getvalue(), name="x.ico"), 415, "ICO is not accepted"),
        (post(content=_png_header(30000, 30000), name="bomb.png"), 413, "decompression bomb"),
        (post(content=_png_header(12000, 12000), name="bomb2.png"), 413, "exceeds the limit"),
        (post(content=b""), 400, "empty"),
        (post({"box": "1,2,3"}), 422, "four numbers"),
        (post({"box": "a,b,c,d"}), 422, "four numbers"),
        (post({"box": "50,50,10,10"}), 422, "inverted"),
        (post({"box": "nan,0,10,10"}), 422, "finite"),
        (post({"box": "700,10,800,50"}), 422, "outside q.jpg"),
        (post({"box": "1,1,50,50", "box_frame": "0,10"}), 422, "box_frame"),
        (post({"box": "1,1,50,50", "box_frame": "abc"}), 422, "box_frame"),
        (post({"top": "0"}), 422, "top must be"),
        (post({"top": "1000"}), 422, "top must be"),
        (post({"top": "abc"}), 422, "top"),
        (post({"options": "{not json"}), 422, "not valid JSON"),
        (post({"options": "[1, 2]"}), 422, "JSON object"),
        (post({"options": '{"__class__": 1}'}), 422, "unknown option"),
        (post({"query_id": "4"}), 422, "exactly one"),
        (post(content=None), 422, "exactly one"),
        (client.post("/api/search", json={"image": "ukbench00004.jpg"}), 422, ""),
        (client.post("/api/search", content=b"image=x", headers={"content-type": "text/plain"}), 422, ""),
        (client.post("/api/search", content=b"--xx\r\ngarbage",
                     headers={"content-type": "multipart/form-data; boundary=yy"}), 400, ""),
        (client.post("/api/search", content=b"1", headers={"content-type": "multipart/form-data"}), 400, ""),
        (client.post("/api/search", data={"query_id": "4"}, headers={"origin": "http://evil.example"}), 403,
         "cross-origin"),
        (client.get("/api/search"), 405, ""),
    ]
    for i, (r, status, words) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, list) or words.lower() in detail.lower(), (i, detail)
        assert str(tmp_path.parent) not in r.text  # no server paths in error messages
    # the query file's temporary copy never shows in messages
    assert "isearch-query-" not in post({"box": "700,10,800,50"}).text


def test_body_limit(index_dir, photos):
    small = TestClient(create_app(index_dir, max_upload_bytes=100_000))
    jpg = _jpg(photos, 4)
    assert len(jpg) > 100_000
    r = small.post("/api/search", files={"image": ("q.jpg", jpg, "image/jpeg")})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    r = small.post("/api/images", files=[("files", ("q.jpg", jpg, "image/jpeg"))])
    assert r.status_code == 413

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        for _ in range(20):
            yield b"x" * 10_000

    r = small.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413, r.text
    r = small.post("/api/search", content=b"x", headers={"content-length": "abc"})
    assert r.status_code == 400


def test_bad_uploads_store_nothing(index_dir, photos):
    c = TestClient(create_app(index_dir))
    updir = index_dir / "uploads"
    before = sorted(p.name for p in updir.iterdir()) if updir.is_dir() else []
    r = c.post("/api/images", files=[("files", ("evil.jpg", b"#!/bin/sh\nrm -rf /\n", "image/jpeg"))])
    assert r.status_code == 415 and "evil.jpg" in r.json()["detail"]
    # all-or-nothing: one bad file among good ones refuses the request
    r = c.post("/api/images", files=[("files", ("good.jpg", _jpg(photos, 12), "image/jpeg")),
                                     ("files", ("bomb.png", _png_header(30000, 30000), "image/png"))])
    assert r.status_code == 413
    r = c.post("/api/images", files=[("files", ("empty.jpg", b"", "image/jpeg"))])
    assert r.status_code == 400
    assert c.post("/api/images", data={"x": "1"}).status_code == 422
    many = [("files", (f"{i}.png", _png_header(2, 2), "image/png")) for i in range(40)]
    assert c.post("/api/images", files=many).status_code == 413
    after = sorted(p.name for p in updir.iterdir()) if updir.is_dir() else []
    assert after == before  # no stored files, no leftover temporary files
    assert c.get("/api/stats").json()["images"] == 12
    ro = TestClient(create_app(index_dir, allow_uploads=False))
    r = ro.post("/api/images", files=[("files", ("a.jpg", _jpg(photos, 12), "image/jpeg"))])
    assert r.status_code == 403


def test_sanitize_stem():
    assert sanitize_stem("../../etc/passwd") == "passwd"
    assert sanitize_stem("..\\..\\boot.ini") == "boot"
    assert sanitize_stem("évian photo (1).JPG") == "evian_photo_1"
    assert sanitize_stem(".bashrc") == "bashrc"
    assert sanitize_stem("....") == "upload" and sanitize_stem("") == "upload" and sanitize_stem(None) == "upload"
    assert sanitize_stem("a\x00b/c\nd.png") == "cd"
    assert len(sanitize_stem("x" * 500 + ".jpg")) == 80


# ------------------------------------------------------------------------------------------------ uploads
def test_upload_adds_images_concurrently_with_search(index_dir, photos, tmp_path):
    """Upload two views of a new object (nasty names) while a search and thumbnail requests run; then the
    new images are indexed, stored inside the index folder only, and find each other."""
    root = tmp_path / "index"
    shutil.copytree(index_dir, root)
    c = TestClient(create_app(root, ground_truth="ukbench"))
    results: dict[str, object] = {}

    def upload():
        results["upload"] = c.post("/api/images", files=[
            ("files", ("../../../ukbench00012.jpg", _jpg(photos, 12), "image/jpeg")),
            ("files", ("C:\\temp\\..\\ukbench00013.jpg", _jpg(photos, 13), "image/jpeg"))])

    def search():
        results["search"] = c.post("/api/search", data={"query_id": "0", "top": "4"})

    def browse():
        results["thumbs"] = [c.get(f"/api/thumbnail/{i}?size=64").status_code for i in range(12)]
        results["stats"] = c.get("/api/stats").status_code

    threads = [threading.Thread(target=f) for f in (upload, search, browse)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    r = results["upload"]
    assert r.status_code == 200, r.text
    added = r.json()
    assert [im["status"] for im in added["images"]] == ["added", "added"] and added["total"] == 14
    assert [im["name"] for im in added["images"]] == ["ukbench00012.jpg", "ukbench00013.jpg"]
    assert [im["group"] for im in added["images"]] == ["3", "3"]
    assert sorted(p.name for p in (root / "uploads").iterdir()) == ["ukbench00012.jpg", "ukbench00013.jpg"]
    assert not list(tmp_path.glob("ukbench*")) and not list(tmp_path.parent.glob("ukbench*"))
    assert results["search"].status_code == 200
    assert sum(_group(h["name"]) == 0 for h in results["search"].json()["hits"]) >= 3
    assert results["thumbs"] == [200] * 12 and results["stats"] == 200

    new_ids = [im["id"] for im in added["images"]]
    assert client_ok(c.get(f"/api/thumbnail/{new_ids[1]}"))
    res = c.post("/api/search", data={"query_id": str(new_ids[1]), "top": "2"}).json()
    assert [h["id"] for h in res["hits"]] == [new_ids[1], new_ids[0]], res["hits"]
    assert res["precision"]["at"]["1"] == 1.0 and res["precision"]["relevant_in_index"] == 2

    # the same bytes again: nothing new; other bytes under a taken name: a suffixed name
    again = c.post("/api/images", files=[("files", ("ukbench00012.jpg", _jpg(photos, 12), "image/jpeg"))]).json()
    assert again["images"][0]["status"] == "unchanged" and again["total"] == 14
    buf = io.BytesIO()
    Image.open(photos / "ukbench00012.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, format="JPEG")
    other = c.post("/api/images", files=[("files", ("ukbench00012.jpg", buf.getvalue(), "image/jpeg"))]).json()
    assert other["images"][0]["name"] == "ukbench00012-1.jpg" and other["total"] == 15
    assert c.get("/api/stats").json()["images"] == 15


def client_ok(r) -> bool:
    return r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


def test_boxes_and_options_pass_through(index_dir, photos, monkeypatch):
    """Hits that carry a box (from a re-ranker) come back with the hit image's size; ``options`` reach the
    search pipeline only as ``Collection.search``'s own keyword arguments."""
    from instance_search import search as S
    from instance_search.search import Hit

    seen = {}

    def fake_described(col, vec, fmap, top, reranker, shortlist, qe, expansion, timings=None):
        seen.update(rerank=type(reranker).__name__, shortlist=shortlist, qe=qe, top=top)
        timings.update(search_ms=1.0, rerank_ms=2.0, qe_ms=0.0)
        recs = col.records()
        return [Hit(rank=1, id=recs[5]["id"], path=recs[5]["path"], score=0.5, box=(10.0, 20.0, 300.5, 400.0)),
                Hit(rank=2, id=recs[6]["id"], path=recs[6]["path"], score=0.4)]

    monkeypatch.setattr(S, "search_described", fake_described)
    c = TestClient(create_app(index_dir, ground_truth={"groups": {"ukbench00004.jpg": "a", "ukbench00005.jpg": "a"}}))
    assert {"rerank", "shortlist", "qe", "qe_kind"} <= set(c.get("/api/stats").json()["search_options"])
    r = c.post("/api/search", data={"query_id": "4", "top": "2", "options": '{"rerank": "aml", "shortlist": 20}'})
    assert r.status_code == 200, r.text
    res = r.json()
    assert seen["shortlist"] == 20 and seen["qe"] == 0 and seen["top"] == 2, seen
    assert res["pipeline"] == {"rerank": "aml", "shortlist": 20, "qe": 0, "qe_kind": "avg", "rerank_options": {},
                               "qe_options": {}, "indexed_query": True}
    assert res["hits"][0]["box"] == [10.0, 20.0, 300.5, 400.0] and res["hits"][0]["size"] == [640, 480]
    assert res["hits"][1]["box"] is None and res["hits"][1]["size"] == [640, 480]
    assert [h["relevant"] for h in res["hits"]] == [True, False]
    assert res["precision"] == {"group": "a", "relevant_in_index": 2, "at": {"1": 1.0, "2": 0.5}}
    assert c.post("/api/search", data={"query_id": "4", "options": '{"rerank": [1]}'}).status_code == 422
    assert c.post("/api/search", data={"query_id": "4", "options": '{"eval": "1"}'}).status_code == 422


# ------------------------------------------------------------------------------------------------ issue 15 endpoints
def test_rerank_from_the_api_gives_boxes_and_stage_times(client, photos):
    """Exact AML on a short list draws a box inside each re-ranked image; each stage is timed; an indexed
    query without a box runs no network pass (no decode_ms / network_ms)."""
    opts = '{"rerank": "aml", "shortlist": 6, "qe": 2}'
    r = client.post("/api/search", files={"image": ("q.jpg", _jpg(photos, 0), "image/jpeg")},
                    data={"top": "8", "options": opts})
    assert r.status_code == 200, r.text
    res = r.json()
    t = res["timings"]
    assert {"upload_ms", "decode_ms", "network_ms", "search_ms", "rerank_ms", "qe_ms", "server_ms"} <= set(t), t
    assert t["network_ms"] > 0 and t["rerank_ms"] > 0 and t["server_ms"] >= t["network_ms"]
    boxed = [h for h in res["hits"] if h["box"] is not None]
    assert len(boxed) == 6, res["hits"]
    for h in boxed:
        x1, y1, x2, y2 = h["box"]
        w, hh = h["size"]
        assert 0 <= x1 < x2 <= w + 1 and 0 <= y1 < y2 <= hh + 1, h
    assert res["hits"][0]["name"] == "ukbench00000.jpg"
    ids = {im["name"]: im["id"] for im in client.get("/api/images", params={"limit": 100}).json()["images"]}
    r = client.post("/api/search", data={"query_id": str(ids["ukbench00000.jpg"]), "top": "4"})
    t = r.json()["timings"]
    assert r.status_code == 200 and "network_ms" not in t and "decode_ms" not in t and t["search_ms"] >= 0
    assert r.json()["pipeline"]["indexed_query"] is True and r.json()["hits"][0]["name"] == "ukbench00000.jpg"
    # the indexed query ranks as the upload of the same file does
    up = client.post("/api/search", files={"image": ("q.jpg", _jpg(photos, 0), "image/jpeg")}, data={"top": "4"})
    assert [h["id"] for h in up.json()["hits"]] == [h["id"] for h in r.json()["hits"]]
    for bad in ('{"rerank": "nope"}', '{"shortlist": 0, "rerank": "aml"}', '{"qe": -1}', '{"qe_kind": "x"}'):
        r = client.post("/api/search", data={"query_id": "4", "options": bad})
        assert r.status_code == 422, (bad, r.status_code, r.text)


def test_rerank_and_qe_options_from_the_api(client, photos):
    """The page's CA-SR choices reach the re-ranker: ``rerank_options`` / ``qe_options`` as flat JSON objects give
    the same hits as ``Collection.search`` with those options; bad ones are refused naming the option (a cs-sr
    detector path smuggled inside them too)."""
    ids = {im["name"]: im["id"] for im in client.get("/api/images", params={"limit": 100}).json()["images"]}
    qid = ids["ukbench00000.jpg"]
    got = {}
    for vectors in ("max", None):
        opts = {"rerank": "casr", "shortlist": 6, "qe": 2, "rerank_options": {"vectors": vectors},
                "qe_options": {"space": "global"}}
        if vectors is None:  # the default: the authors' max
            opts["rerank_options"] = {}
        r = client.post("/api/search", data={"query_id": str(qid), "top": "8", "options": json.dumps(opts)})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["pipeline"]["rerank_options"] == ({"vectors": vectors} if vectors else {})
        assert res["pipeline"]["qe_options"] == {"space": "global"}
        got[vectors] = [(h["id"], h["score"]) for h in res["hits"]]
    # the default is the authors' max: the same hits; QE changed the list
    assert got[None] == got["max"]
    plain = client.post("/api/search", data={"query_id": str(qid), "top": "8", "options": json.dumps(
        {"rerank": "casr", "shortlist": 6, "rerank_options": {"vectors": "max"}})}).json()
    assert [(h["id"], h["score"]) for h in plain["hits"]] != got["max"]
    for bad, why in (('{"rerank": "casr", "rerank_options": {"vectors": "nope"}}', "vectors"),
                     ('{"rerank": "casr", "rerank_options": {"colour": 1}}', "colour"),
                     ('{"rerank": "casr", "rerank_options": [1]}', "rerank_options"),
                     ('{"rerank": "casr", "rerank_options": {"vectors": {"a": 1}}}', "rerank_options"),
                     ('{"rerank": "cs-sr", "rerank_options": {"detector": "/etc/passwd"}}', "detector"),
                     ('{"rerank": "casr", "rerank_options": {"vectors": "max-whitened"}}', "whitening"),
                     ('{"rerank": "casr", "qe": 2, "qe_options": {"space": "elsewhere"}}', "space")):
        r = client.post("/api/search", data={"query_id": str(qid), "options": bad})
        assert r.status_code == 422 and why in r.json()["detail"], (bad, r.status_code, r.text)


def test_list_filters_by_name_and_pages(client):
    lst = client.get("/api/images", params={"name": "UKBENCH0000", "limit": 4}).json()
    assert lst["total"] == 10 and [im["name"] for im in lst["images"]] == [f"ukbench{i:05d}.jpg" for i in range(4)]
    lst = client.get("/api/images", params={"name": "bench0001", "offset": 1, "limit": 50}).json()
    assert lst["total"] == 2 and [im["name"] for im in lst["images"]] == ["ukbench00011.jpg"]
    assert client.get("/api/images", params={"name": "zzz"}).json() == {
        "total": 0, "offset": 0, "limit": 24, "name": "zzz", "images": []}
    assert client.get("/api/images", params={"name": "x" * 201}).status_code == 422
    assert client.get("/api/images", params={"offset": -1}).status_code == 422


def test_original_file_by_id(client, photos):
    r = client.get("/api/original/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content in {_jpg(photos, i) for i in range(12)}
    for url in ["/api/original/999", "/api/original/-1", "/api/original/a", "/api/original/1.jpg",
                "/api/original/..%2F..%2Fetc%2Fpasswd", "/api/original/" + "9" * 40]:
        r = client.get(url)
        assert r.status_code == 404 and b"root:" not in r.content, (url, r.status_code)


def test_docs_page_is_served_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000 and "javascript" in js.headers["content-type"]
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    assert client.get("/docs/assets/..%2F__init__.py").status_code == 404
    assert client.get("/docs/assets/nope.js").status_code == 404


def test_new_endpoints_need_the_token(index_dir):
    c = TestClient(create_app(index_dir, token="s3cret", allow_uploads=False))
    for method, url in [("GET", "/api/original/3"), ("DELETE", "/api/images/3"), ("GET", "/api/images?name=x")]:
        assert c.request(method, url).status_code == 401, url
        assert c.request(method, url, headers={"authorization": "Bearer s3cret"}).status_code in (200, 403), url


def test_remove_image(index_dir, tmp_path):
    """DELETE takes one image out of the index: 404 for bad or removed ids, 403 cross-origin and read-only; the
    removed image is gone from the list, searches, thumbnails and query_id."""
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    ro = TestClient(create_app(copy, allow_uploads=False))
    assert ro.delete("/api/images/3").status_code == 403
    c = TestClient(create_app(copy))
    assert c.delete("/api/images/3", headers={"origin": "http://evil.example"}).status_code == 403
    for bad in ["999", "-1", "a", "1.5", "..%2Fx"]:
        assert c.delete(f"/api/images/{bad}").status_code in (404, 405), bad
    name = next(im["name"] for im in c.get("/api/images", params={"limit": 50}).json()["images"] if im["id"] == 3)
    r = c.delete("/api/images/3", headers={"origin": "http://testserver"})
    assert r.status_code == 200 and r.json() == {"removed": 1, "id": 3, "name": name, "total": 11}, r.text
    assert c.delete("/api/images/3").status_code == 404
    assert 3 not in [im["id"] for im in c.get("/api/images", params={"limit": 50}).json()["images"]]
    assert c.post("/api/search", data={"query_id": "3"}).status_code == 404
    assert c.get("/api/thumbnail/3").status_code == 404 and c.get("/api/original/3").status_code == 404
    hits = c.post("/api/search", data={"query_id": "4", "top": "11"}).json()["hits"]
    assert len(hits) == 11 and 3 not in [h["id"] for h in hits]


def test_ground_truth_files(tmp_path):
    from instance_search.server import GroundTruth

    good = tmp_path / "gt.json"
    good.write_text('{"groups": {"/photos/a.jpg": 1, "b.jpg": "x"}}')
    gt = GroundTruth.load(good)
    assert gt.group_of("/photos/a.jpg") == "1" and gt.group_of("/else/b.jpg") == "x" and gt.group_of("c.jpg") is None
    assert GroundTruth.load("ukbench").group_of("/x/ukbench00007.jpg") == "1"
    for text in ("{not json", '{"groups": [1]}', '{"groups": {"a.jpg": [1]}}', '{"groups": {"a.jpg": true}}', "[]"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match="bad.json"):
            GroundTruth.load(bad)
    with pytest.raises(ValueError, match="cannot read"):
        GroundTruth.load(tmp_path / "missing.json")
