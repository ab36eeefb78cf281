"""The index store on SQLite (index/store.py) against the manifest.json store it replaced (commit 3e5d53f, loaded
from git history), on this machine: add N images, kill -9 of a writer at random moments, concurrent writers,
a reader during writes. Entries are synthetic but of R-MAC / VGG16 sizes (20 regions x 512-D fp16, a 512-D
vector, a 512 x 16 x 16 conv map in the compact code). Lance is measured on the same workload by bench_store_lance.py.

    python benchmarks/bench_store.py [--images 1000] [--kills 20] [--writers 4] [--per-writer 100]

Writes benchmarks/results/store.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LEGACY_COMMIT = "3e5d53f"


def load_store(kind: str):
    """The store module: ``sqlite`` (today's) or ``manifest`` (the one before, from git history)."""
    if kind == "sqlite":
        from instance_search.index import store
        return store
    code = subprocess.run(["git", "-C", str(ROOT), "show", f"{LEGACY_COMMIT}:src/instance_search/index/store.py"],
                          capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("instance_search.index._legacy_store", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "instance_search.index"
    sys.modules[spec.name] = mod
    exec(compile(code, f"{LEGACY_COMMIT}:store.py", "exec"), mod.__dict__)
    return mod


def entries(mod, rng, n: int, tag: str):
    from instance_search.index.compact import encode_map

    fmap = np.maximum(rng.standard_normal((512, 16, 16)).astype(np.float32) - 1.0, 0)
    code = encode_map(fmap)  # the same code for every entry: the benchmark measures the store, not the encoder
    out = []
    for k in range(n):
        local = rng.standard_normal((20, 512)).astype(np.float32)
        v = local.sum(0)
        out.append(mod.Entry(path=f"/photos/{tag}-{k}.jpg", width=640, height=480, sha256=f"{k:064x}", mtime=0.0,
                             size=1, local=local, vector=v / np.linalg.norm(v), fmap=code))
    return out


def open_or_create(mod, root: Path, kind: str):
    if mod.IndexStore.exists(root):
        return mod.IndexStore.open(root, writable=True)
    try:
        return mod.IndexStore.create(root, {"recipe": {"name": "rmac"}})
    except Exception:  # another writer created it meanwhile
        return mod.IndexStore.open(root, writable=True)


# ------------------------------------------------------------------------------------------------ child roles
def child_writer(kind: str, root: str, tag: str, batches: int, batch: int, seed: int) -> None:
    mod = load_store(kind)
    rng = np.random.default_rng(seed)
    store = open_or_create(mod, Path(root), kind)
    for b in range(batches):
        es = entries(mod, rng, batch, f"{tag}-{b}")
        ids = store.add(es)
        print(json.dumps({"ids": ids, "paths": [e.path for e in es]}), flush=True)


def child_reader(kind: str, root: str, seconds: float) -> None:
    """Open the index again and again until SIGTERM (or ``seconds``); count failures and views where the records
    and the vectors disagree; print one JSON line."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    mod = load_store(kind)
    end, reads, errors, inconsistent = time.time() + seconds, 0, [], 0
    while time.time() < end and not stop:
        try:
            s = mod.IndexStore.open(root)
            recs, vecs = s.records(), s.vectors()
            if len(recs) and len(recs) != len(vecs):
                inconsistent += 1
            reads += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{exc.__class__.__name__}: {str(exc)[:160]}")
    print(json.dumps({"reads": reads, "errors": len(errors), "first_errors": errors[:3],
                      "inconsistent": inconsistent}), flush=True)


# ------------------------------------------------------------------------------------------------ measurements
def acked(out: str) -> list[tuple[int, str]]:
    """(id, path) of every image a writer reported as stored (two writers may report the same id)."""
    got = []
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        got += list(zip(rec["ids"], rec["paths"]))
    return got


def verify(mod, root: Path, want: list[tuple[int, str]]) -> dict:
    try:
        s = mod.IndexStore.open(root)
    except Exception as exc:  # noqa: BLE001
        return {"opens": False, "error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
    recs = s.records()
    paths = [r["path"] for r in recs]
    have = {r["path"] for r in recs}
    return {"opens": True, "images": len(recs), "acknowledged": len(want),
            "acknowledged_missing": sum(1 for _, p in want if p not in have),
            "acknowledged_duplicate_ids": len(want) - len({i for i, _ in want}),
            "duplicate_paths": len(paths) - len(set(paths)),
            "duplicate_ids": len(recs) - len({r["id"] for r in recs})}


def bench_add(mod, kind: str, n: int, batch: int, work: Path) -> dict:
    root = work / f"add-{kind}"
    rng = np.random.default_rng(0)
    es = entries(mod, rng, n, "a")
    t0 = time.perf_counter()
    s = mod.IndexStore.create(root, {"recipe": {"name": "rmac"}})
    for i in range(0, n, batch):
        s.add(es[i:i + batch])
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = mod.IndexStore.open(root)
    vecs = again.vectors()
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = again.ids()[:: max(1, n // 100)]
    again.feature_maps(ids)
    t_maps = (time.perf_counter() - t0) / len(ids)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"images": n, "batch": batch, "add_s": round(t_add, 3), "images_per_s": round(n / t_add, 1),
            "open_and_read_vectors_s": round(t_open, 3), "map_read_ms": round(t_maps * 1e3, 3),
            "rows": int(len(vecs)), "bytes_on_disk": size}


def run_child(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def bench_kills(mod, kind: str, kills: int, work: Path, seed: int = 1) -> dict:
    root = work / f"kill-{kind}"
    rng = random.Random(seed)
    want: list[tuple[int, str]] = []
    bad = []
    for k in range(kills):
        p = run_child(["--role", "writer", "--kind", kind, "--root", str(root), "--tag", f"k{k}", "--batches", "1000",
                       "--batch", "8", "--seed", str(k)])
        line = p.stdout.readline()  # at least one acknowledged batch, then kill at a random moment
        time.sleep(rng.uniform(0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        want += acked(line + out)
        v = verify(mod, root, want)
        if not v["opens"] or v["acknowledged_missing"] or v["duplicate_ids"]:
            bad.append({"kill": k, **v})
    final = verify(mod, root, want)
    return {"kills": kills, "runs_with_a_problem": len(bad), "first_problems": bad[:3], "final": final}


def bench_concurrent(mod, kind: str, writers: int, per_writer: int, work: Path, read: bool) -> dict:
    root = work / f"conc-{kind}"
    mod.IndexStore.create(root, {"recipe": {"name": "rmac"}})
    batch = 10
    t0 = time.perf_counter()
    ps = [run_child(["--role", "writer", "--kind", kind, "--root", str(root), "--tag", f"w{w}",
                     "--batches", str(per_writer // batch), "--batch", str(batch), "--seed", str(w)])
          for w in range(writers)]
    reader = run_child(["--role", "reader", "--kind", kind, "--root", str(root), "--seconds", "1000"]) if read else None
    want: list[tuple[int, str]] = []
    failed = []
    for p in ps:
        out, err = p.communicate()
        want += acked(out)
        if p.returncode != 0:
            failed.append(err.strip().splitlines()[-1][:200] if err.strip() else f"exit {p.returncode}")
    elapsed = time.perf_counter() - t0
    rd = None
    if reader is not None:
        reader.send_signal(signal.SIGTERM)
        out, _ = reader.communicate()
        rd = None if not out.strip() else json.loads(out.strip().splitlines()[-1])
    res = {"writers": writers, "images_each": per_writer, "elapsed_s": round(elapsed, 2),
           "writers_failed": len(failed), "writer_errors": failed[:3], **verify(mod, root, want)}
    if read:
        res["reader"] = rd
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="main")
    ap.add_argument("--kind", default="sqlite")
    ap.add_argument("--root")
    ap.add_argument("--tag", default="x")
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--per-writer", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="add,kill,concurrent")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store.json"))
    a = ap.parse_args()
    if a.role == "writer":
        return child_writer(a.kind, a.root, a.tag, a.batches, a.batch, a.seed)
    if a.role == "reader":
        return child_reader(a.kind, a.root, a.seconds)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"machine": f"{os.cpu_count()} CPUs (shared with other jobs while measured)",
                    "legacy": f"manifest.json store of commit {LEGACY_COMMIT}", "lance": "see benchmarks/results/store_lance.json (bench_store_lance.py)"})
    only = set(a.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    mods = {kind: load_store(kind) for kind in ("manifest", "sqlite")}
    try:
        if "add" in only:  # alternating repeats, best of each: the machine's load changes over minutes
            runs = {k: [] for k in mods}
            for rep in range(a.repeats):
                for kind, mod in mods.items():
                    shutil.rmtree(work / f"add-{kind}", ignore_errors=True)
                    runs[kind].append(bench_add(mod, kind, a.images, 32, work))
            for kind in mods:
                best = min(runs[kind], key=lambda r: r["add_s"])
                best["repeats"] = a.repeats
                best["open_and_read_vectors_s"] = min(r["open_and_read_vectors_s"] for r in runs[kind])
                best["map_read_ms"] = min(r["map_read_ms"] for r in runs[kind])
                results.setdefault(kind, {})["add"] = best
                print(kind, "add", best, flush=True)
        for kind, mod in mods.items():
            if "kill" in only:
                results.setdefault(kind, {})["kill9"] = bench_kills(mod, kind, a.kills, work)
                print(kind, "kill -9", results[kind]["kill9"], flush=True)
            if "concurrent" in only:
                results.setdefault(kind, {})["concurrent_writers"] = bench_concurrent(mod, kind, a.writers,
                                                                                      a.per_writer, work, read=True)
                print(kind, "concurrent", results[kind]["concurrent_writers"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
