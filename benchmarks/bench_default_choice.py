"""The default backbone and recipe, chosen by measurement (issue 14, item 5): accuracy × indexing images/s ×
query latency × bytes per image for each backbone × MAC / R-MAC / GeM × single / multi-scale.

* **Accuracy** is read from ``benchmarks/results/multiscale_<backbone>.json`` (bench_multiscale.py: Holidays-811
  mAP, UKBench-1000 N-S, RParis-250 E / M / H with the query boxes; whitening learned on the other collection,
  the papers' held-out protocol; the ``single@S`` and ``multi@S`` settings, multi = scales 1, 1/√2, 1/2 summed).
* **Indexing images/s, query latency and bytes per image** are measured here, through the product's own path:
  ``Collection.create`` + ``add_folder`` of ``--n`` RParis-250 photos (1024 px originals, described at max side
  ``--max-size``; decode + network + pooling + compact conv maps + durable writes), then ``Collection.search``
  of ``--queries`` other RParis photos (decode + network + first-stage search; no re-ranking), median.
  Bytes per image: what the second half of the photos added to the index folder on disk, per image (the
  compact conv maps that AML / CA-SR re-rank with are most of it), and the global vector alone (dimension × 4).

MAC, R-MAC and GeM share the network pass: the cost columns are measured once per backbone and setting (with
the R-MAC recipe, whose pooling is the dearest of the three) and the vector size per recipe.

    OMP_NUM_THREADS=1 ISEARCH_THREADS=1 .venv/bin/python benchmarks/bench_default_choice.py

Writes ``benchmarks/results/default_choice.json`` and prints a Markdown table. Run it on an idle machine for the
timings (the load average at start and end is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from instance_search.collection import Collection
from instance_search.index.store import atomic_write_bytes
from instance_search.recipes.base import Recipe

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
SCALES = [1.0, 2 ** -0.5, 0.5]


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def accuracy(backbone: str, results: Path) -> dict:
    """(setting, recipe) -> {holidays, ukbench_ns, rparis E/M/H} with held-out whitening, from bench_multiscale."""
    path = results / f"multiscale_{backbone}.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["results"]
    out: dict = {}
    for r in rows:
        # held-out whitening; single@S and multi@S (sum over scales), not the equal-cost counterparts
        if r["whitening"] == "none" or "cost of" in r["setting"] or r["scale_pool"] not in (None, "sum"):
            continue
        kind = "single" if r["scales"] == [1.0] else "multi"
        cell = out.setdefault((kind, r["recipe"]), {})
        if r["benchmark"] == "holidays":
            cell["holidays_map"] = round(r["map"], 2)
        elif r["benchmark"] == "ukbench":
            cell["ukbench_ns"] = round(r["ns"], 3)
            cell["ukbench_map"] = round(r["map"], 2)
        elif r["benchmark"] == "rparis6k":
            cell["rparis_emh"] = [round(r[f"map_{d}"], 2) for d in ("easy", "medium", "hard")]
    return out


def measure(backbone: str, multi: bool, photos: list[Path], queries: list[Path], max_size: int, engine: str) -> dict:
    extra = {"scales": SCALES, "scale_pool": "sum"} if multi else {}
    recipe = Recipe("rmac", backbone=backbone, max_size=max_size, extra=extra)
    tmp = Path(tempfile.mkdtemp(prefix="isearch-default-"))
    try:
        warm = Collection.create(tmp / "warm", recipe, whitening="none", engine=engine)
        warm.add_folder(photos[:2], progress=False)  # warm-up: weights read, first-call allocations
        del warm
        col = Collection.create(tmp / "ix", recipe, whitening="none", engine=engine)
        half = len(photos) // 2
        c0, w0 = time.process_time(), time.perf_counter()
        col.add_folder(photos[:half], progress=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        size_half, maps_half = folder_bytes(tmp / "ix"), folder_bytes(tmp / "ix" / "maps")
        seg_half = folder_bytes(tmp / "ix" / "segments")
        c0, w0 = time.process_time(), time.perf_counter()
        col.add_folder(photos[half:], progress=False)
        wall, cpu = wall + time.perf_counter() - w0, cpu + time.process_time() - c0
        col = Collection.open(tmp / "ix", engine=engine)
        col.search(queries[0], top=10)  # warm-up
        lat = []
        for q in queries:
            t0 = time.perf_counter()
            col.search(q, top=10)
            lat.append(1e3 * (time.perf_counter() - t0))
        n, added = len(photos), len(photos) - half
        # bytes per image: what the second half added (the fixed cost of an empty index left out)
        per_image = (folder_bytes(tmp / "ix") - size_half) / added
        maps_per_image = (folder_bytes(tmp / "ix" / "maps") - maps_half) / added
        seg_per_image = (folder_bytes(tmp / "ix" / "segments") - seg_half) / added  # global + local (region) vectors
        return {"backbone": backbone, "setting": "multi" if multi else "single", "max_size": max_size,
                "engine": engine, "images": n, "index_images_per_s": round(n / wall, 3),
                "index_cpu_s_per_image": round(cpu / n, 3), "query_ms_median": round(statistics.median(lat), 1),
                "query_ms": [round(v, 1) for v in lat], "index_bytes_per_image": int(per_image),
                "maps_bytes_per_image": int(maps_per_image), "segments_bytes_per_image": int(seg_per_image), "dim": int(col.vectors().shape[1]),
                "loadavg_1min": round(os.getloadavg()[0], 2)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["vgg16", "resnet50", "efficientnet-lite0"])
    ap.add_argument("--n", type=int, default=40, help="photos indexed per cell")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--photos", type=Path, default=DATA / "rparis250" / "jpg")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "default_choice.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ISEARCH_THREADS", os.cpu_count() or 1)))
    photos = sorted(p for p in args.photos.rglob("*.jpg"))
    if len(photos) < args.n + args.queries:
        raise SystemExit(f"{args.photos}: {len(photos)} photos, need {args.n + args.queries}")
    step = len(photos) // (args.n + args.queries)  # spread over the landmarks (files are sorted by landmark)
    picked = photos[::step][:args.n + args.queries]
    db, qs = picked[:args.n], picked[args.n:]
    out = {"meta": {"threads": torch.get_num_threads(), "n": args.n, "queries": args.queries,
                    "max_size": args.max_size, "photos": str(args.photos), "scales_multi": SCALES,
                    "loadavg_1min_start": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")},
           "costs": [], "table": []}
    for bb in args.backbones:
        acc = accuracy(bb, args.results)
        for multi in (False, True):
            cost = measure(bb, multi, db, qs, args.max_size, args.engine)
            out["costs"].append(cost)
            print(json.dumps({k: v for k, v in cost.items() if k != "query_ms"}), flush=True)
            for recipe in ("mac", "rmac", "gem"):
                row = {"backbone": bb, "recipe": recipe, "setting": cost["setting"],
                       **acc.get((cost["setting"], recipe), {}),
                       "index_images_per_s": cost["index_images_per_s"], "query_ms": cost["query_ms_median"],
                       "index_bytes_per_image": cost["index_bytes_per_image"], "vector_bytes": 4 * cost["dim"]}
                out["table"].append(row)
    out["meta"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(out, indent=1).encode())
    print("| backbone | recipe | scales | Holidays mAP | UKBench N-S | RParis-250 E / M / H | index img/s | query ms |"
          " KB / image (index) | vector bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["table"]:
        emh = " / ".join(f"{v:.2f}" for v in r["rparis_emh"]) if "rparis_emh" in r else "—"
        print(f"| {r['backbone']} | {r['recipe']} | {r['setting']} | {r.get('holidays_map', '—')} | "
              f"{r.get('ukbench_ns', '—')} | {emh} | {r['index_images_per_s']} | {r['query_ms']} | "
              f"{r['index_bytes_per_image'] / 1024:.0f} | {r['vector_bytes']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
