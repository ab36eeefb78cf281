"""Fast approximate AML re-ranking (coarse max-pooled maps, the query's K strongest channels) vs exact AML.

After Tolias, Sicre & Jégou 2016, Sec. 5-6; the issue's goal: re-rank 1000 maps in <= 0.1 s per query on one
CPU thread. Same data and maps as ``bench_aml.py`` (Paris-250, VGG16 conv5_3, images at max side 1024 px, maps
from its cache, stored in the default compact code and decoded to their non-zeros):

* speed: per-query single-thread CPU time (``time.process_time``) to re-rank a 1000-map short list (the 238
  database maps repeated), for each (K, g, step), with the store's build time and RAM per image apart;
* accuracy: revisited E/M/H mAP (12 queries = box crops) of R-MAC, R-MAC + exact AML (window R-MAC scoring as
  ``bench_aml.py``, and window MAC scoring) and R-MAC + AML-fast for each (K, g, step), short list 100 and all.

Writes ``benchmarks/results/aml_fast.json``.

    OMP_NUM_THREADS=1 ISEARCH_THREADS=1 .venv/bin/python benchmarks/bench_aml_fast.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from instance_search.eval.runner import benchmark_items, extract_maps
from instance_search.eval.datasets.benchmarks import load_benchmark
from instance_search.eval.metrics import compute_map
from instance_search.index.compact import decode_sparse, encode_map
from instance_search.recipes.base import Recipe
from instance_search.rerank.aml import rerank_aml
from instance_search.rerank.aml_fast import AMLInvertedMaps, rerank_aml_fast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_aml import rerank_map, rmac_scores  # noqa: E402  (same first stage and exact AML as bench_aml.py)

RESULTS = HERE / "results"
CACHE = HERE / "cache"
GOAL = 0.1


def _maps(ranks, bench):
    return {p: round(100 * compute_map(ranks.T, bench.ok_gnd(p))[0], 2) for p in ("easy", "medium", "hard")}


def exact_mac_map(bench, scores, qmaps, dbmaps, shortlist):
    """R-MAC, re-ranked by exact AML scoring the window's MAC (rerank_aml without R-MAC finalisation)."""
    ranks = np.argsort(-scores, axis=1)
    new = ranks.copy()
    for qi, qm in enumerate(qmaps):
        head = ranks[qi, :shortlist]
        res = rerank_aml(qm.max(axis=(1, 2)), [dbmaps[j] for j in head], shortlist_scores=scores[qi, head],
                         query_aspect=qm.shape[2] / qm.shape[1])
        new[qi, :shortlist] = head[res.order]
    return _maps(new, bench)


def fast_map(bench, scores, qmaps, store, shortlist, **kw):
    ranks = np.argsort(-scores, axis=1)
    new = ranks.copy()
    for qi, qm in enumerate(qmaps):
        head = ranks[qi, :shortlist]
        res = rerank_aml_fast(qm.max(axis=(1, 2)), store, head, shortlist_scores=scores[qi, head],
                              query_aspect=qm.shape[2] / qm.shape[1], **kw)
        new[qi, :shortlist] = head[res.order]
    return _maps(new, bench)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, nargs="+", default=[16, 32, 64, 128, 512])
    ap.add_argument("--g", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", default="2:2,4:1,4:2,8:1,8:2", help="g:step pairs (coarse-cell window step per g)")
    ap.add_argument("--power", default="4:2:32,4:2:64", help="g:step:K settings also run with pooling='power' "
                    "(Eq. 3 from integral images) instead of the exact window max")
    ap.add_argument("--scores", nargs="+", default=["mac", "search"])
    ap.add_argument("--speed-queries", type=int, default=3)
    ap.add_argument("--shortlists", type=int, nargs="+", default=[100, 238])
    ap.add_argument("--skip-exact", action="store_true", help="keep the exact-AML figures of an existing --out")
    ap.add_argument("--out", type=Path, default=RESULTS / "aml_fast.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = load_benchmark("rparis6k")
    recipe = Recipe("rmac", backbone="vgg16", max_size=1024)
    db, queries, _ = benchmark_items(bench)
    qmaps = [m.astype(np.float32) for m in extract_maps(queries, recipe, cache_dir=CACHE, desc="query crops")]
    dbmaps = extract_maps(db, recipe, cache_dir=CACHE, desc="database")
    codes = [encode_map(m.astype(np.float32)) for m in dbmaps]  # the default compact code, as the index stores
    dec = [decode_sparse(c) for c in codes]
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    out = {"benchmark": bench.summary(), "backbone": "vgg16 conv5_3", "max_size": 1024, "maps": "compact default",
           "threads": 1, "goal_seconds": GOAL}
    settings = [tuple(int(v) for v in p.split(":")) for p in args.steps.split(",")]
    settings = [(g, st) for g, st in settings if g in args.g]
    power = [tuple(int(v) for v in p.split(":")) for p in args.power.split(",")] if args.power else []
    power = [p for p in power if p[:2] in settings]

    def runs(g):  # (step, K, score, pooling) tried for a store pooled by g
        out = [(st, K, sc, "max") for gg, st in settings if gg == g for K in args.K for sc in args.scores]
        return out + [(st, K, "mac", "power") for gg, st, K in power if gg == g]

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    # ---- speed: 1000-map short list
    short = [dec[i % len(dec)] for i in range(1000)]
    speed = []
    stores = {}
    for g in sorted({g for g, _ in settings}):
        c0, w0 = time.process_time(), time.perf_counter()
        store = AMLInvertedMaps.build(short, g=g, progress=True)
        build_cpu, build_wall = time.process_time() - c0, time.perf_counter() - w0
        stores[g] = AMLInvertedMaps.build(dec, g=g)  # the 238 distinct maps, for the mAP part
        entry = {"g": g, "build_cpu_ms_per_image": round(1e3 * build_cpu / 1000, 3),
                 "build_wall_ms_per_image": round(1e3 * build_wall / 1000, 3),
                 "ram_bytes_per_image": round(store.nbytes / 1000),
                 "coarse_cells_per_image": round(len(store.value) / 1000), "runs": []}
        print(f"store g={g}: build {entry['build_cpu_ms_per_image']} ms CPU/image "
              f"(wall {entry['build_wall_ms_per_image']}),"
              f" {entry['ram_bytes_per_image']} B/image RAM, {entry['coarse_cells_per_image']} coarse non-zeros/image")
        rows = np.arange(1000)
        for step, K, score, pooling in runs(g):
            cpu, wall, loads = [], [], []
            for qi in range(min(args.speed_queries, len(qmaps))):
                q = qmaps[qi].max(axis=(1, 2))
                c0, w0 = time.process_time(), time.perf_counter()
                res = rerank_aml_fast(q, store, rows, K=K, step=step, score=score, pooling=pooling,
                                      query_aspect=qmaps[qi].shape[2] / qmaps[qi].shape[1])
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
                loads.append(os.getloadavg()[0])
            entry["runs"].append({"K": K, "step": step, "score": score, "pooling": pooling,
                                  "cpu_seconds_per_query": round(float(np.median(cpu)), 4),
                                  "wall_seconds_per_query": round(float(np.median(wall)), 4),
                                  "loadavg_1min": round(float(np.median(loads)), 2),
                                  "windows_per_image": round(float(res.n_windows.mean()), 1)})
            r = entry["runs"][-1]
            print(f"  g={g} step={step} K={K} score={score} pooling={pooling}: {r['cpu_seconds_per_query']} s CPU/query"
                  f" (wall {r['wall_seconds_per_query']}, load {r['loadavg_1min']}), "
                  f"{r['windows_per_image']} windows/image", flush=True)
        speed.append(entry)
        out["speed"] = speed
        save()

    # ---- accuracy
    qlocal = [recipe.local_from_map(torch.from_numpy(m)) for m in qmaps]
    dblocal = [recipe.local_from_map(torch.from_numpy(m.astype(np.float32))) for m in dbmaps]
    scores, qglobal = rmac_scores(recipe, qlocal, dblocal, None)
    out["whitening"] = "none"
    out["rmac"] = _maps(np.argsort(-scores, axis=1), bench)
    print(f"R-MAC {out['rmac']}")
    acc = []
    for sl in args.shortlists:
        row = {"shortlist": sl}
        prev = next((a for a in old.get("accuracy", []) if a["shortlist"] == sl), None)
        if args.skip_exact and prev is not None:
            row["exact_aml_rmac"], row["exact_aml_mac"] = prev["exact_aml_rmac"], prev["exact_aml_mac"]
        else:
            row["exact_aml_rmac"] = rerank_map(bench, scores, qglobal, qmaps, dec, recipe, None, sl)
            row["exact_aml_mac"] = exact_mac_map(bench, scores, qmaps, dec, sl)
        print(f"short list {sl}: exact AML (window R-MAC) {row['exact_aml_rmac']}, (window MAC) {row['exact_aml_mac']}",
              flush=True)
        row["fast"] = []
        for g in sorted(stores):
            for step, K, score, pooling in runs(g):
                m = fast_map(bench, scores, qmaps, stores[g], sl, K=K, step=step, score=score, pooling=pooling)
                row["fast"].append({"g": g, "step": step, "K": K, "score": score, "pooling": pooling, "map": m})
                print(f"  AML-fast g={g} step={step} K={K} score={score} pooling={pooling}: {m}", flush=True)
        acc.append(row)
        out["accuracy"] = acc
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
