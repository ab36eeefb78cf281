"""End-to-end indexing throughput: ``isearch index`` on a whole folder (decode + network + R-MAC + compact maps
+ durable writes + self-whitening), as a user runs it.

    .venv/bin/python benchmarks/bench_index_throughput.py [--photos ../shared/data/ukbench1000] \
        [--engine winograd] [--max-size 640] [--threads 2]

Prints images/s and writes ``benchmarks/results/index_throughput.json`` (appends one run per call, with the
machine's load average at start and end: other processes on the machine slow it down, and the record says so).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "ukbench1000")
    ap.add_argument("--engine", default="winograd")
    ap.add_argument("--recipe", default="rmac")
    ap.add_argument("--max-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "index_throughput.json")
    ap.add_argument("--keep", type=Path, default=None, help="build the index here and keep it (default: a temporary "
                    "folder, deleted afterwards); it must not exist yet")
    args = ap.parse_args()
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        sys.exit(f"no images in {args.photos}")
    isearch = Path(sys.executable).with_name("isearch")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), ISEARCH_THREADS=str(args.threads))
    tmp = Path(tempfile.mkdtemp(prefix="isearch-throughput-"))
    ix = tmp / "ix"
    if args.keep is not None:
        if args.keep.exists():
            sys.exit(f"--keep {args.keep}: already exists")
        ix = args.keep
    try:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run([str(isearch), "index", str(args.photos), "--index", str(ix), "--engine", args.engine,
                        "--recipe", args.recipe, "--max-size", str(args.max_size), "--quiet"], check=True, env=env)
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size = sum(f.stat().st_size for f in ix.rglob("*") if f.is_file())
        maps = sum(f.stat().st_size for f in (ix / "maps").glob("*.cmap"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec = {"photos": str(args.photos.name), "images": len(photos), "engine": args.engine, "recipe": args.recipe,
           "max_size": args.max_size, "threads": args.threads, "wall_seconds": round(wall, 1),
           "images_per_second": round(len(photos) / wall, 3), "peak_rss_mb": round(peak_kb / 1024),
           "index_bytes_per_image": round(size / len(photos)), "map_bytes_per_image": round(maps / len(photos)),
           "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in load1],
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(rec, indent=1))
    runs = json.loads(args.out.read_text()) if args.out.exists() else []
    runs.append(rec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
