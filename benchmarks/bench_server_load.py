#!/usr/bin/env python
"""Load test of `isearch serve` on loopback with locust (headless, bounded in time).

Builds a small real index (``--images`` UKBench photos, VGG16 R-MAC at ``--max-size`` px, no whitening), starts
the real server (``serve()``: uvicorn, one process) on 127.0.0.1 in a subprocess with a bounded lifetime, and
for each N in ``--users`` runs N concurrent locust users for ``--seconds`` seconds. Each user sends requests
back to back (no think time), a mix that a person on the page makes: search with an indexed image (1),
search with an uploaded photo and a box (1), thumbnails (4), the image list (1), stats (1). Searches run the
network (serialised by the server's lock); thumbnails and lists do not.

Why locust: it installs from PyPI (the ``bench`` extra), runs headless, drives real HTTP/1.1 keep-alive
connections from gevent users, and reports requests/s, latency percentiles and failures per endpoint as CSV.
(wrk is not packaged on PyPI and would need a C build; ab cannot post multipart files per request.) The
clients run on the same 2 cores as the server, so the figures are a floor for this machine.

Prints a table and writes benchmarks/results/server_load.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_server_load.py [--users 1 4 16] [--seconds 30]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ISEARCH_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))

LOCUSTFILE = textwrap.dedent('''
    import os, random
    from locust import HttpUser, constant, task

    PHOTO = open(os.environ["ISEARCH_LOAD_PHOTO"], "rb").read()
    N = int(os.environ["ISEARCH_LOAD_IMAGES"])


    class PageUser(HttpUser):
        wait_time = constant(0)

        @task(1)
        def search_by_id(self):
            self.client.post("/api/search", data={"query_id": str(random.randrange(N)), "top": "10"},
                             name="POST /api/search (query_id)")

        @task(1)
        def search_by_upload(self):
            self.client.post("/api/search", files={"image": ("q.jpg", PHOTO, "image/jpeg")},
                             data={"box": "100,60,540,420", "top": "10"}, name="POST /api/search (upload+box)")

        @task(4)
        def thumbnail(self):
            self.client.get(f"/api/thumbnail/{random.randrange(N)}?size=128", name="GET /api/thumbnail/{id}")

        @task(1)
        def images(self):
            self.client.get("/api/images?offset=0&limit=24", name="GET /api/images")

        @task(1)
        def stats(self):
            self.client.get("/api/stats", name="GET /api/stats")
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_index(root: Path, n: int, max_size: int) -> None:
    from instance_search.collection import Collection
    from instance_search.recipes.base import Recipe

    col = Collection.create(root, Recipe("rmac", backbone="vgg16", max_size=max_size), whitening="none")
    rep = col.add_folder([DATA / "ukbench1000" / f"ukbench{i:05d}.jpg" for i in range(n)], progress=True)
    assert len(rep.added) == n, rep.failed


def read_stats(prefix: Path) -> dict:
    rows = {}
    with open(f"{prefix}_stats.csv") as f:
        for r in csv.DictReader(f):
            def num(k):
                v = r.get(k, "")
                return None if v in ("", "N/A") else float(v)
            rows[r["Name"] if r["Name"] != "Aggregated" else "all"] = {
                "requests": int(num("Request Count") or 0), "failures": int(num("Failure Count") or 0),
                "requests_per_s": round(num("Requests/s") or 0, 2),
                "p50_ms": num("50%"), "p95_ms": num("95%"), "p99_ms": num("99%"), "max_ms": num("Max Response Time"),
                "mean_ms": round(num("Average Response Time") or 0, 1)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--max-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "server_load.json")
    a = ap.parse_args()
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    if locust is None:
        sys.exit("locust is not installed: .venv/bin/pip install -e '.[bench]'")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="isearch-load-") as tmp:
        tmp = Path(tmp)
        print(f"building an index of {a.images} UKBench photos (VGG16 R-MAC, {a.max_size} px) ...", flush=True)
        build_index(tmp / "index", a.images, a.max_size)
        port = free_port()
        lifetime = 120 + len(a.users) * (a.seconds + 60)
        code = ("import sys; from instance_search.server import serve; "
                "serve(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        server_log = open(tmp / "server.log", "wb")
        server = subprocess.Popen(["timeout", "-k", "5", str(lifetime), sys.executable, "-c", code,
                                   str(tmp / "index"), str(port)], stdout=server_log, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/api/stats", timeout=2).read()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
                    time.sleep(0.3)
            # warm-up: load the network once, fill the thumbnail cache
            req = urllib.request.Request(url + "/api/search", data=b"query_id=0&top=10", method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            urllib.request.urlopen(req, timeout=300).read()
            (tmp / "locustfile.py").write_text(LOCUSTFILE)
            runs = []
            for n in tqdm(a.users, desc="load levels", unit="level"):
                prefix = tmp / f"users{n}"
                lenv = {**env, "ISEARCH_LOAD_PHOTO": str(DATA / "ukbench1000" / "ukbench00005.jpg"),
                        "ISEARCH_LOAD_IMAGES": str(a.images)}
                t0 = time.monotonic()
                p = subprocess.run([locust, "-f", str(tmp / "locustfile.py"), "--headless", "-u", str(n), "-r",
                                    str(n), "--run-time", f"{a.seconds}s", "--host", url, "--csv", str(prefix),
                                    "--only-summary", "--stop-timeout", "30", "--loglevel", "WARNING"],
                                   env=lenv, capture_output=True, text=True, timeout=a.seconds + 120)
                wall = time.monotonic() - t0
                stats = read_stats(prefix)
                errors = []
                if Path(f"{prefix}_failures.csv").is_file():
                    with open(f"{prefix}_failures.csv") as f:
                        errors = [dict(r) for r in csv.DictReader(f)]
                runs.append({"users": n, "seconds": a.seconds, "wall_s": round(wall, 1), "locust_rc": p.returncode,
                             "all": stats.pop("all"), "endpoints": stats, "errors": errors})
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
            server_log.close()
        log = (tmp / "server.log").read_text(errors="replace")
    summary = {
        "benchmark": "isearch serve under load on 127.0.0.1 (locust, headless)",
        "tool": "locust " + subprocess.run([locust, "--version"], capture_output=True, text=True).stdout.split()[1],
        "config": {"images": a.images, "max_size": a.max_size, "recipe": "rmac", "backbone": "vgg16",
                   "seconds_per_level": a.seconds, "mix": {"search by id": 1, "search by upload + box": 1,
                                                           "thumbnail 128 px": 4, "image list": 1, "stats": 1},
                   "server": "serve(): uvicorn, 1 process, OMP_NUM_THREADS=" + env["OMP_NUM_THREADS"]},
        "runs": runs,
        "server_alive_after": alive,
        "server_log_tracebacks": log.count("Traceback"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "clients and server share the machine's cores; other work may be running"},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=1))
    print(f"\n{'users':>5} {'endpoint':<32} {'requests':>8} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'errors':>6}")
    for r in runs:
        for name, s in [("all", r["all"]), *sorted(r["endpoints"].items())]:
            print(f"{r['users']:>5} {name:<32} {s['requests']:>8} {s['requests_per_s']:>7.2f} {s['p50_ms'] or 0:>7.0f} "
                  f"{s['p95_ms'] or 0:>7.0f} {s['p99_ms'] or 0:>7.0f} {s['failures']:>6}")
    print(f"server alive after: {alive}; tracebacks in its log: {summary['server_log_tracebacks']}  -> {a.out}")


if __name__ == "__main__":
    main()
