"""Reliability of a shared index (issue 13), with the real CLI and server in subprocesses (VGG16 R-MAC, 128 px):

* ``writers``: 4 concurrent ``isearch index`` runs on disjoint UKBench folders into one index, ``--runs`` times:
  every image present exactly once, every image found first when searched with its own vector, `check` passes.
* ``kills``: the same 4 writers, one of them killed (kill -9) at a random moment, ``--kills`` times, each round
  resumed: the index opens, `isearch check` passes, no image seen committed by an earlier round is lost.
* ``mixed``: server uploads + a CLI writer + a CLI remove at the same time, ``--mixed`` times: the uploads and the
  CLI's images are all there exactly once, the removed one is gone, the server counts the CLI's images.
* ``special``: a folder with a FIFO, a link to /dev/zero, a symlink loop and 20 good photos: 20 indexed, 3 named
  as skipped, exit 0.
* ``memory``: 40 concurrent uploads of a 9400 x 9500 PNG (89 Mpx, under the limit) to a server: its peak RSS;
  then 40 concurrent thumbnail requests of one image: how many decoded the original (stored thumbnails count).

    python benchmarks/bench_reliability.py [--runs 20 --kills 50 --mixed 10] [--only writers,kills,...]

Writes benchmarks/results/reliability.json (figures in docs/reliability.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from instance_search.index.repair import check_index  # noqa: E402
from instance_search.index.store import IndexStore  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ukbench1000"
ISEARCH = str(Path(sys.executable).parent / "isearch")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ISEARCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ARGS = ["--max-size", "128", "--whitening", "none", "--batch", "4", "-q", "--wait", "600"]


def folders(base: Path, n_folders: int, per: int, start: int = 0) -> list[Path]:
    out = []
    for f in range(n_folders):
        d = base / f"photos{f}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(start + f * per, start + (f + 1) * per):
            shutil.copy(DATA / f"ukbench{i:05d}.jpg", d / f"ukbench{i:05d}.jpg")
        out.append(d)
    return out


def index_cmd(folder: Path, index: Path) -> list[str]:
    return [ISEARCH, "index", str(folder), "--index", str(index), *ARGS]


def soundness(index: Path, expected: set[str] | None = None) -> dict:
    """Opens; check passes; ids unique; each path once; each image first for its own vector; expected paths."""
    store = IndexStore.open(index)
    recs = store.records()
    paths = [r["path"] for r in recs]
    v = store.vectors()
    top1 = bool(len(v) == 0 or (np.argmax(v @ v.T, axis=1) == np.arange(len(v))).all())
    rep = check_index(index)
    out = {"images": len(recs), "unique_paths": len(set(paths)) == len(paths),
           "unique_ids": len({r["id"] for r in recs}) == len(recs), "self_top1": top1, "check_ok": rep.ok,
           "problems": rep.problems[:3]}
    if expected is not None:
        out["missing"] = len(expected - set(paths))
        out["extra"] = len(set(paths) - expected)
    out["ok"] = out["unique_paths"] and out["unique_ids"] and top1 and rep.ok and not out.get("missing") \
        and not out.get("extra")
    return out


def bench_writers(work: Path, runs: int, per: int) -> dict:
    photos = folders(work / "w-photos", 4, per)
    expected = {str(p.resolve()) for d in photos for p in d.iterdir()}
    bad, times = [], []
    for r in range(runs):
        index = work / f"w-index-{r}"
        t0 = time.perf_counter()
        ps = [subprocess.Popen(index_cmd(d, index), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for d in photos]
        outs = [p.communicate() for p in ps]
        times.append(time.perf_counter() - t0)
        s = soundness(index, expected)
        s["exit_codes"] = [p.returncode for p in ps]
        if not s["ok"] or any(s["exit_codes"]):
            s["stderr"] = [e.decode()[-300:] for _, e in outs if e]
            bad.append({"run": r, **s})
        shutil.rmtree(index)
        print(f"writers run {r}: {s['images']} images, ok={s['ok']}", flush=True)
    return {"runs": runs, "writers": 4, "images_each": per, "runs_with_a_problem": len(bad),
            "first_problems": bad[:3], "median_run_s": round(float(np.median(times)), 1)}


def bench_kills(work: Path, kills: int, per: int, seed: int = 7) -> dict:
    photos = folders(work / "k-photos", 4, per, start=200)
    expected = {str(p.resolve()) for d in photos for p in d.iterdir()}
    index = work / "k-index"
    rng = random.Random(seed)
    seen: dict[int, str] = {}
    bad = []
    landed = partial = 0
    for k in range(kills):
        ps = [subprocess.Popen(index_cmd(d, index), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
              for d in photos]
        victim = rng.randrange(4)
        time.sleep(rng.uniform(2.0, 12.0))  # model loading, decoding, forward passes, commits
        if ps[victim].poll() is None:
            os.kill(ps[victim].pid, signal.SIGKILL)
            landed += 1
        for p in ps:
            p.communicate()
        try:
            s = soundness(index)
            store = IndexStore.open(index)
            now = {r["id"]: r["path"] for r in store.records()}
            s["lost"] = sum(1 for i, p in seen.items() if now.get(i) != p)
            seen = now
        except Exception as exc:  # noqa: BLE001 - recorded
            s = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
        if not s.get("ok") or s.get("lost"):
            bad.append({"kill": k, **s})
        partial += 0 < len(seen) < len(expected)
        print(f"kill {k}: {s.get('images')} images, ok={s.get('ok')}, lost={s.get('lost')}", flush=True)
        if len(seen) == len(expected):  # everything indexed: start over so that the next kill lands mid-run
            shutil.rmtree(index)
            seen = {}
    return {"kills": kills, "writers": 4, "images_each": per, "rounds_with_a_problem": len(bad),
            "killed_while_running": landed, "rounds_leaving_a_partial_index": partial, "first_problems": bad[:3]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, log: Path, **kw) -> tuple[subprocess.Popen, str]:
    port = free_port()
    extra = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    code = ("import sys; from instance_search.server import serve; "
            f"serve(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), log_level='warning'{', ' + extra if extra else ''})")
    p = subprocess.Popen([sys.executable, "-c", code, str(index), str(port)], env=ENV, stdout=open(log, "wb"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/api/stats", timeout=5).read()
            return p, url
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)


def post_files(url: str, files: list[tuple[str, bytes]], timeout: float = 600) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, data in files:
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(data)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(url + "/api/images", data=body.getvalue(), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.loads(r.read())


def bench_mixed(work: Path, rounds: int) -> dict:
    bad = []
    for r in range(rounds):
        base = work / f"m{r}"
        first, cli_new = folders(base, 2, 8, start=400 + 40 * r)
        index = base / "index"
        subprocess.run(index_cmd(first, index), env=ENV, check=True, capture_output=True)
        server, url = start_server(index, base / "server.log")
        try:
            uploads = [(f"up{r}-{i}.jpg", (DATA / f"ukbench{420 + 40 * r + i:05d}.jpg").read_bytes()) for i in range(6)]
            victim = str(sorted(first.iterdir())[0].resolve())
            results = {}

            def upload(i):
                results[f"up{i}"] = post_files(url, uploads[2 * i:2 * i + 2])

            ts = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
            cli = subprocess.Popen(index_cmd(cli_new, index), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            rm = subprocess.Popen([ISEARCH, "remove", victim, "--index", str(index), "--wait", "600"], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            cli_out = cli.communicate()
            rm_out = rm.communicate()
            served = get_json(url + "/api/stats")["images"]
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
        expected = ({str(p.resolve()) for p in first.iterdir()} - {victim}) | {str(p.resolve()) for p in cli_new.iterdir()}
        s = soundness(index)
        store = IndexStore.open(index)
        paths = {r_["path"] for r_ in store.records()}
        up_ok = all(v[0] == 200 and all(im["status"] == "added" for im in v[1]["images"]) for v in results.values())
        s.update({"uploads_ok": up_ok, "cli_exit": cli.returncode, "remove_exit": rm.returncode,
                  "cli_missing": len(expected - paths), "removed_still_there": victim in paths,
                  "uploads_present": sum(1 for p in paths if "/uploads/" in p), "server_count": served,
                  "index_count": len(paths)})
        ok = s["ok"] and up_ok and not cli.returncode and not rm.returncode and not s["cli_missing"] \
            and not s["removed_still_there"] and s["uploads_present"] == 6 and served == len(paths)
        if not ok:
            s["stderr"] = [cli_out[1].decode()[-300:], rm_out[1].decode()[-300:]]
            bad.append({"round": r, **s})
        print(f"mixed round {r}: ok={ok} {s['index_count']} images, server counts {served}", flush=True)
    return {"rounds": rounds, "rounds_with_a_problem": len(bad), "first_problems": bad[:3]}


def bench_special(work: Path) -> dict:
    d = work / "special"
    folders(d, 1, 20, start=600)
    photos = d / "photos0"
    os.mkfifo(photos / "fifo.jpg")
    os.symlink("/dev/zero", photos / "zero.jpg")
    os.symlink(photos / "loop.jpg", photos / "loop.jpg")
    t0 = time.perf_counter()
    p = subprocess.run([ISEARCH, "index", str(photos), "--index", str(d / "index"), *ARGS[:-3]], env=ENV,
                       capture_output=True, text=True, timeout=1200)
    skipped = [line for line in p.stderr.splitlines() if line.startswith("skipped ")]
    n = len(IndexStore.open(d / "index")) if IndexStore.exists(d / "index") else 0
    return {"exit": p.returncode, "indexed": n, "skipped_lines": skipped, "seconds": round(time.perf_counter() - t0, 1),
            "ok": p.returncode == 0 and n == 20 and len(skipped) == 3}


def bench_memory(work: Path, uploads: int = 40) -> dict:
    import psutil
    from PIL import Image

    base = work / "mem"
    first, = folders(base, 1, 8, start=700)
    index = base / "index"
    subprocess.run(index_cmd(first, index), env=ENV, check=True, capture_output=True)
    buf = io.BytesIO()
    Image.new("RGB", (9400, 9500), (120, 130, 140)).save(buf, format="PNG")
    big = buf.getvalue()
    server, url = start_server(index, base / "server.log", uploads_per_minute=1000)
    proc = psutil.Process(server.pid)
    peak, stop = [proc.memory_info().rss], []

    def sample():
        while not stop:
            try:
                peak.append(proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        before = proc.memory_info().rss
        codes, latencies = [], []

        def up(i):
            codes.append(post_files(url, [(f"big{i}.png", big)])[0])

        def ping():
            while not stop:
                t0 = time.perf_counter()
                try:
                    urllib.request.urlopen(url + "/api/stats", timeout=60).read()
                    latencies.append(time.perf_counter() - t0)
                except OSError:
                    latencies.append(float("inf"))
                time.sleep(0.5)

        pinger = threading.Thread(target=ping)
        pinger.start()
        t0 = time.perf_counter()
        ts = [threading.Thread(target=up, args=(i,)) for i in range(uploads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        upload_s = time.perf_counter() - t0
        after_uploads = proc.memory_info().rss
        peak_uploads = max(peak)
        ids = [im["id"] for im in get_json(url + "/api/images?limit=500")["images"]]
        big_id = max(ids)
        thumbs_before = len(list((index / "thumbs").rglob("*.jpg"))) if (index / "thumbs").is_dir() else 0
        peak.clear()
        tcodes, tlat = [], []

        def thumb(i):
            t0_ = time.perf_counter()
            with urllib.request.urlopen(f"{url}/api/thumbnail/{big_id}?size={(64, 128, 256, 512)[i % 4]}",
                                        timeout=600) as r:
                r.read()
                tcodes.append(r.status)
            tlat.append(time.perf_counter() - t0_)

        ts = [threading.Thread(target=thumb, args=(i,)) for i in range(40)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        thumbs_after = len(list((index / "thumbs").rglob("*.jpg")))
        peak_thumbs = max(peak) if peak else None
    finally:
        stop.append(1)
        sampler.join()
        pinger.join()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    mb = 1 / 2 ** 20
    return {"uploads": uploads, "image": "9400x9500 PNG", "upload_codes": {str(c): codes.count(c) for c in set(codes)},
            "rss_before_mb": round(before * mb), "peak_rss_uploads_mb": round(peak_uploads * mb),
            "rss_after_uploads_mb": round(after_uploads * mb), "uploads_s": round(upload_s, 1),
            "stats_latency_max_s": round(max(latencies), 2) if latencies else None,
            "stats_answered": sum(1 for x in latencies if x != float("inf")), "stats_asked": len(latencies),
            "thumbnail_requests": 40, "thumbnail_codes": {str(c): tcodes.count(c) for c in set(tcodes)},
            "originals_decoded_for_thumbnails": thumbs_after - thumbs_before,
            "thumbnail_max_s": round(max(tlat), 2) if tlat else None,
            "peak_rss_thumbnails_mb": None if peak_thumbs is None else round(peak_thumbs * mb)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--mixed", type=int, default=10)
    ap.add_argument("--per", type=int, default=12, help="photos per writer")
    ap.add_argument("--only", default="writers,kills,mixed,special,memory")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reliability.json")
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: the UKBench photos are missing")
    only = set(a.only.split(","))
    results = json.loads(a.out.read_text()) if a.out.is_file() else {}
    results["machine"] = f"{os.cpu_count()} CPUs shared with other jobs; load {os.getloadavg()[0]:.1f} at start"
    work = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    try:
        for name, fn in (("special", lambda: bench_special(work)),
                         ("writers", lambda: bench_writers(work, a.runs, a.per)),
                         ("kills", lambda: bench_kills(work, a.kills, a.per)),
                         ("mixed", lambda: bench_mixed(work, a.mixed)),
                         ("memory", lambda: bench_memory(work))):
            if name in only:
                t0 = time.perf_counter()
                results[name] = fn()
                results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
                print(name, json.dumps(results[name])[:1500], flush=True)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
