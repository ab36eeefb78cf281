"""Hostile requests against the real server (`serve()` with uvicorn in a subprocess on 127.0.0.1, bounded
lifetime), sent over raw sockets so that nothing is normalised on the client side: path traversal, oversized
and lying bodies, non-image and too-small uploads, bad boxes, malformed JSON and multipart. Every one gets a
4xx (never a 5xx, never a file from outside the index), uploads never write outside ``<index>/uploads/`` (not
even through a planted symlink), and the server is still healthy afterwards with no traceback in its log.

tests/server/test_server.py covers the same endpoints in-process (TestClient); this file adds what only a real socket
shows and what a user can do to the folder around the index.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from conftest import SERVER_OBJECTS, build_server_index, served_index

LIFETIME_S = 300  # the server subprocess is killed after this, whatever happens to the test
SECRET = f"secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def server(ukbench, tmp_path_factory):
    """A served copy of the shared 12-image index; the server's working folder holds a secret file and a
    real photo that is *not* indexed, next to the index folder (what a traversal would go for)."""
    photos, shared = build_server_index(ukbench, tmp_path_factory)
    base = tmp_path_factory.mktemp("security")
    root = base / "index"
    shutil.copytree(shared, root)
    (base / "secret.txt").write_text(SECRET)
    (base / "outside").mkdir()
    outside_jpg = base / "outside" / "target.jpg"
    outside_jpg.write_bytes((photos / "ukbench00012.jpg").read_bytes())
    (root / "uploads").mkdir(exist_ok=True)
    os.symlink(outside_jpg, root / "uploads" / "evil.jpg")  # a link planted where an upload could land
    os.symlink(base / "outside", root / "uploads" / "linkdir")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ISEARCH_THREADS": "1"}
    log_path = base / "server.log"
    with served_index(root, 4 * SERVER_OBJECTS, LIFETIME_S, log_path, cwd=base, log_level="info", env=env) as (port, proc):
        yield {"port": port, "root": root, "base": base, "photos": photos, "log": log_path,
               "outside_sha": hashlib.sha256(outside_jpg.read_bytes()).hexdigest(), "proc": proc}


# ------------------------------------------------------------------------------------------------ raw HTTP
def raw(port: int, request: bytes, body_chunks=(), timeout: float = 60) -> tuple[int, bytes]:
    """Send ``request`` (+ body chunks, stopping if the server hangs up) and read the response to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (e.g. 413) and closed: read what it said
        data = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
                if _complete(data):
                    break
        except (ConnectionResetError, socket.timeout):
            pass
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split(b" ", 2)[1]), data


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v)
    return False


def get(port: int, target: str | bytes, headers: bytes = b"") -> tuple[int, bytes]:
    t = target if isinstance(target, bytes) else target.encode()
    return raw(port, b"GET " + t + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers + b"\r\n")


def post(port: int, target: str, body: bytes, ctype: str, extra: bytes = b"") -> tuple[int, bytes]:
    head = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n"
    return raw(port, head + body)


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "XbOuNdArYx") -> tuple[bytes, str]:
    """(body, content type) of a multipart form: ``(name, filename or None, value)`` per part."""
    out = b""
    for name, filename, value in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _assert_4xx(results: list[tuple[str, int, bytes]], server) -> None:
    bad = [(what, status, body[-300:]) for what, status, body in results if not 400 <= status < 500]
    assert not bad, bad
    for what, status, body in results:
        assert SECRET.encode() not in body and b"root:x:0:0" not in body, what
        assert str(server["base"]).encode() not in body, f"{what}: a server path in the answer"


# ------------------------------------------------------------------------------------------------ tests
def test_path_traversal_never_serves_a_file(server):
    port = server["port"]
    targets = [
        "/../../../../etc/passwd", "/..%2f..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd",
        "/secret.txt", "/../secret.txt", "/./secret.txt", "/index/../secret.txt", "/%2e%2e/secret.txt",
        "/static/../secret.txt", "/static/..%2f..%2fsecret.txt", "/uploads/evil.jpg", "/uploads/linkdir/target.jpg",
        "/manifest.json", "/index/manifest.json", "/api/../manifest.json", "/api/thumbnail/../../secret.txt",
        "/api/thumbnail/..%2f..%2fsecret.txt", "/api/thumbnail/%2e%2e%2fsecret.txt",
        "/api/thumbnail/0/../../../../etc/passwd", "/api/thumbnail/..\\..\\secret.txt", "/api/thumbnail/0%00",
        "/api/thumbnail/%00../secret.txt", "/api/thumbnail/0;/secret.txt", "/api/thumbnail/outside/target.jpg",
        "/api/thumbnail/" + "%2e%2e%2f" * 20 + "etc%2fpasswd", "/api/images/../../secret.txt",
        f"http://127.0.0.1:{port}/../../secret.txt", "/api/thumbnail/-0", "/api/thumbnail/0x1",
    ]
    results = [(t, *get(port, t)) for t in targets]
    _assert_4xx(results, server)
    # the Host header cannot point anywhere either (DNS rebinding), even with a traversal in it
    results = [("host", *get(port, "/api/stats", b"Host: ../../secret.txt\r\n"))]
    status, _ = get(port, "/api/thumbnail/0?path=/etc/passwd&file=../secret.txt")
    assert status == 200  # unknown parameters are ignored: it is thumbnail 0, an indexed photo
    raw_status = raw(port, b"GET /api/stats HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")[0]
    assert raw_status == 400
    _assert_4xx(results, server)


def test_hostile_requests_get_4xx(server):
    port, photos = server["port"], server["photos"]
    jpg = (photos / "ukbench00004.jpg").read_bytes()
    results = []

    def search(fields, what):
        body, ctype = multipart(fields)
        results.append((what, *post(port, "/api/search", body, ctype)))

    # non-images and images we cannot use, uploaded as queries
    for name, data in [("x.jpg", b"plain text"), ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
                       ("x.html", b"<html><script>alert(1)</script></html>"), ("x.zip", b"PK\x03\x04" + bytes(99)),
                       ("x.jpg", jpg[:2000]), ("x.png", b"\x89PNG\r\n\x1a\n" + bytes(40)), ("x.jpg", b""),
                       ("tiny.png", _png(Image.new("RGB", (1, 1)))), ("strip.png", _png(Image.new("RGB", (3, 900)))),
                       ("x.ico", b"\x00\x00\x01\x00" + bytes(60))]:
        search([("image", name, data)], f"query {name}")
    # bad boxes, frames, top and options
    for box in ["1,2,3", "a,b,c,d", "9,9,1,1", "nan,0,1,1", "inf,0,1e400,1", "1e309,0,1,1", "700,0,800,50",
                "0,0,3,3", "1,2,3,4,5", "--1,2,3,4", "0x10,0,100,100", "1;2;3;4", "\x00"]:
        search([("query_id", None, b"4"), ("box", None, box.encode())], f"box {box!r}")
    search([("query_id", None, b"4"), ("box", None, b"0,0,10,10"), ("box_frame", None, b"1e308,1e308")],
           "box in a huge frame")
    search([("query_id", None, b"4"), ("box", None, b"0,0,10,10"), ("box_frame", None, b"-1,5")], "negative frame")
    for top in [b"0", b"-1", b"101", b"1e3", b"99999999999999999999999", b"x"]:
        search([("query_id", None, b"4"), ("top", None, top)], f"top {top!r}")
    for qid in [b"../../secret.txt", b"/etc/passwd", b"-1", b"99999999", b"1.5", b"1e3", b""]:
        search([("query_id", None, qid)], f"query_id {qid!r}")
    for opts in [b"{not json", b"[1,2]", b'"str"', b"null", b"[" * 50000 + b"]" * 50000, b'{"__class__": 1}',
                 b'{"eval": "1"}', b'{"rerank": "evil"}', b'{"shortlist": -5}', b'{"shortlist": "abc"}',
                 b'{"rerank": {"a": 1}}', b'{"qe": [1]}', b"\xff\xfe", b'{"a":1,"a":2}']:
        search([("query_id", None, b"4"), ("options", None, opts)], f"options {opts[:30]!r}")
    search([("image", "q.jpg", jpg), ("query_id", None, b"4")], "image and query_id")
    search([], "neither image nor query_id")
    # malformed bodies and content types
    for ctype, body in [("application/json", b'{"image": '), ("application/json", b'{"query_id": 4}'),
                        ("text/plain", b"query_id=4"), ("multipart/form-data", b"--x\r\n"),
                        ("multipart/form-data; boundary=zz", b"--yy\r\ngarbage"),
                        ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zz--"),
                        ("application/x-www-form-urlencoded", b"query_id=%ZZ&top=%%%"),
                        ("application/x-www-form-urlencoded", b"query_id=4&" + b"&".join(b"f%d=1" % i for i in range(2000)))]:
        results.append((f"{ctype} {body[:20]!r}", *post(port, "/api/search", body, ctype)))
    many, ctype = multipart([(f"f{i}", None, b"1") for i in range(1500)])
    results.append(("1500 form fields", *post(port, "/api/search", many, ctype)))
    # uploads of what is not an image or cannot be indexed
    for name, data in [("a.jpg", b"#!/bin/sh\nrm -rf /\n"), ("a.png", _png(Image.new("RGB", (2, 2)))),
                       ("a.gif", b"GIF89a" + bytes(30)), ("a.jpg", b"")]:
        body, ctype = multipart([("files", name, data)])
        results.append((f"upload {name}", *post(port, "/api/images", body, ctype)))
    body, ctype = multipart([("files", f"{i}.png", _png(Image.new("RGB", (64, 64)))) for i in range(40)])
    results.append(("40 files in one upload", *post(port, "/api/images", body, ctype)))
    # wrong methods and unknown routes
    for method, target in [("DELETE", "/api/images"), ("PUT", "/api/search"), ("PATCH", "/api/stats"),
                           ("GET", "/api/search"), ("TRACE", "/"), ("POST", "/api/thumbnail/0")]:
        results.append((f"{method} {target}", *raw(port, f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                         f"Connection: close\r\nContent-Length: 0\r\n\r\n".encode())))
    _assert_4xx(results, server)
    statuses = {what: status for what, status, _ in results}
    assert statuses["query tiny.png"] == 422 and statuses["query strip.png"] == 422
    assert statuses["box '0,0,3,3'"] == 422 and statuses["box in a huge frame"] == 422
    assert statuses["query x.svg"] == 415 and statuses["upload a.png"] == 422
    assert statuses["query_id b'../../secret.txt'"] == 422


def test_oversized_bodies(server):
    port = server["port"]
    limit = 20 * 1024 * 1024
    results = []
    # a Content-Length over the limit is refused before the body is read
    head = (b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 1000000000000\r\n\r\n")
    t0 = time.monotonic()
    results.append(("content-length 1e12", *raw(port, head)))
    assert time.monotonic() - t0 < 10
    # a real 21 MB upload, and a chunked body (no length) that streams past the limit
    big = os.urandom(limit + 1024 * 1024)
    body, ctype = multipart([("image", "big.jpg", big)])
    results.append(("21 MB query", *post(port, "/api/search", body, ctype)))
    body, ctype = multipart([("files", "big.jpg", big)])
    results.append(("21 MB upload", *post(port, "/api/images", body, ctype)))
    head = (b"POST /api/images HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=zz\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = b'--zz\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n\r\n'
    piece = b"x" * (1 << 20)  # a valid multipart stream whose one file never ends
    chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in [part] + [piece] * 24] + [b"0\r\n\r\n"]
    results.append(("chunked 24 MB", *raw(port, head, chunks)))
    # a Content-Length that lies (smaller than the body, or not a number)
    results.append(("bad content-length", *raw(port, b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                     b"Connection: close\r\nContent-Length: abc\r\n\r\nxx")))
    results.append(("huge header", *raw(port, b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                                              b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n")))
    _assert_4xx(results, server)
    statuses = {what: status for what, status, _ in results}
    assert statuses["content-length 1e12"] == 413 and statuses["21 MB query"] == 413
    assert statuses["21 MB upload"] == 413 and statuses["chunked 24 MB"] == 413
    assert not [p for p in (server["root"] / "uploads").iterdir() if p.name.startswith(".upload-")]


@pytest.mark.slow
def test_uploads_stay_inside_the_index(server):
    """Real images under hostile names: stored under uploads/ with sanitised names only; the planted symlinks
    are never followed (the file they point at keeps its bytes) and nothing appears outside the index."""
    port, root, base, photos = server["port"], server["root"], server["base"], server["photos"]

    def tree() -> dict[str, str]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            for f in filenames:
                p = Path(dirpath) / f
                if p == server["log"]:
                    continue
                out[str(p.relative_to(base))] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    before = tree()
    names = ["evil.jpg", "../../outside/target.jpg", "/tmp/absolute.jpg", "linkdir/target.jpg",
             "..\\..\\secret.jpg", "x.jpg\x00.png", ".hidden.jpg", "con.jpg"]
    fields = [("files", n, (photos / f"ukbench{12 + (k % 2):05d}.jpg").read_bytes()) for k, n in enumerate(names)]
    body, ctype = multipart(fields)
    status, resp = post(port, "/api/images", body, ctype)
    assert status == 200, resp[-500:]
    result = json.loads(resp.partition(b"\r\n\r\n")[2])
    assert all(im["status"] in ("added", "unchanged") for im in result["images"]), result
    after = tree()
    new = sorted(set(after) - set(before))
    stored = [p for p in new if p.startswith("index/uploads/")]
    assert all(p.startswith(("index/uploads/", "index/segments/", "index/maps/")) for p in new), new
    assert all("/" not in p[len("index/uploads/"):] for p in stored), stored
    # two hostile names sanitise to target.jpg with the same bytes: stored once, so 7 files for 8 uploads
    assert {im["name"] for im in result["images"]} == {Path(p).name for p in stored} and len(stored) == 7
    assert all(after[p] != "link" and not Path(p).name.startswith(".") for p in stored), stored
    changed = [p for p in before if before[p] != after.get(p) and not p.startswith("index/")]
    assert not changed, changed  # nothing outside the index was touched
    assert hashlib.sha256((base / "outside" / "target.jpg").read_bytes()).hexdigest() == server["outside_sha"]
    assert (root / "uploads" / "evil.jpg").is_symlink()  # the planted link is left alone, not written through
    assert not Path("/tmp/absolute.jpg").exists()


def test_server_survived_without_errors(server):
    """Runs last: the server still answers, and its log shows no 5xx and no traceback."""
    port = server["port"]
    status, body = get(port, "/api/stats")
    assert status == 200 and json.loads(body.partition(b"\r\n\r\n")[2])["images"] >= 4 * SERVER_OBJECTS
    assert server["proc"].poll() is None
    log = server["log"].read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if '" 5' in line], "a request got a 5xx"
