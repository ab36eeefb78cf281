"""Multi-scale MAC / R-MAC / GeM descriptors against single scale, at equal cost reported (issue 14, item 4).

The recipes' ``scales`` option (recipes/tolias.py) describes an image at several scales (default 1, 1/sqrt 2,
1/2; Radenović et al. 2018, Sec. 5.2) and combines them (``scale_pool`` "sum": sum then L2; "gem": GeM over
scales). For each benchmark (Holidays-811, UKBench-1000, RParis-250 with its query boxes, E/M/H) and backbone:

* ``single@S``: one scale at max side S;
* ``multi@S``: the scales at max side S (pixel cost 1 + 1/2 + 1/4 = 1.75x single@S);
* ``single@S*sqrt(cost)`` and ``multi@S/sqrt(cost)``: the equal-cost counterparts (same pixels as multi@S and
  single@S respectively);

with held-out whitening as bench_retrieval.py (learned on Holidays for UKBench and Paris, on UKBench for
Holidays; "none" too), and the measured describing time per image (wall and process CPU) and relative pixel
cost of each setting; and the issue's robustness check on UKBench (``--shrink-queries``): database photos
shrunk to 200 px searched among the 1000 originals (recall@1 of the original). Writes ``benchmarks/results/multiscale.json``. Run on an idle machine for the timings:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_multiscale.py --max-size 512

Smoke run on tiny inputs (checks the script, figures meaningless):

    .venv/bin/python benchmarks/bench_multiscale.py --benchmarks ukbench --no-whitening --max-size 96 \\
        --recipes mac --pools sum --shrink-queries 5 --shrink-side 64 --out /tmp/multiscale_smoke.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from instance_search.collection import Describer, fit_whitening
from instance_search.eval.datasets import load_benchmark
from instance_search.eval.runner import benchmark_items, describe_benchmark, score
from instance_search.index.store import atomic_write_bytes
from instance_search.recipes.base import Recipe

HERE = Path(__file__).resolve().parent
WHITEN_ON = {"ukbench": "holidays", "holidays": "ukbench", "rparis6k": "holidays"}


SETTINGS = ("single", "multi", "single-eq", "multi-eq")


def _settings(size: int, scales: list[float], which=SETTINGS) -> list[tuple[str, int, list[float]]]:
    """single@S, multi@S and the equal-pixel-cost counterparts (``which``: a subset of :data:`SETTINGS`)."""
    cost = sum(s * s for s in scales)
    up, down = int(round(size * math.sqrt(cost))), int(round(size / math.sqrt(cost)))
    every = {"single": (f"single@{size}", size, [1.0]), "multi": (f"multi@{size}", size, scales),
             "single-eq": (f"single@{up} (cost of multi@{size})", up, [1.0]),
             "multi-eq": (f"multi@{down} (cost of single@{size})", down, scales)}
    return [every[k] for k in SETTINGS if k in which]


def shrunk_copies(bench, described, recipes, describer, label, pool, n, side) -> list[dict]:
    """The issue's robustness check: each of the first ``n`` database photos, shrunk to max side ``side``, is
    searched among the whole database (no whitening); recall@1 of its original and its mean rank."""
    from instance_search.images import load_image

    out = []
    for r in recipes:
        D = r.finalize(described[r.name][0], None)
        ranks = []
        for i, path in enumerate(bench.images[:n]):
            img = load_image(path)
            img.thumbnail((side, side))
            g = r.finalize(r.local(describer.features(img)), None)
            sims = D @ g
            ranks.append(int((sims > sims[i]).sum()))
        row = {"setting": label, "scale_pool": pool, "recipe": r.name, "queries": len(ranks), "side": side,
               "recall_at_1": round(float(np.mean(np.asarray(ranks) == 0)), 4),
               "mean_rank": round(float(np.mean(ranks)), 2)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["vgg16"])
    ap.add_argument("--benchmarks", nargs="+", default=["holidays", "ukbench", "rparis6k"])
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1 / math.sqrt(2), 0.5])
    ap.add_argument("--recipes", nargs="+", default=["mac", "rmac", "gem"])
    ap.add_argument("--pools", nargs="+", default=["sum", "gem"], help="scale_pool values (gem: not for rmac)")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                    help="single@S, multi@S, single at the pixel cost of multi@S, multi at the cost of single@S")
    ap.add_argument("--no-whitening", action="store_true", help="skip the held-out whitening (smoke runs)")
    ap.add_argument("--shrink-queries", type=int, default=200,
                    help="UKBench: this many database photos, shrunk to --shrink-side px, each searched among all "
                         "the database (is its original first?); 0: skip")
    ap.add_argument("--shrink-side", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=HERE / "cache")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "multiscale.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ISEARCH_THREADS", os.cpu_count() or 1)))
    order = []
    for b in args.benchmarks:
        for name in (b,) if args.no_whitening else (b, WHITEN_ON[b]):
            if name not in order:
                order.append(name)
    benches = {name: load_benchmark(name) for name in order}
    cost_single = 1.0
    out = {"meta": {"threads": torch.get_num_threads(), "scales": args.scales,
                    "pixel_cost_multi": round(sum(s * s for s in args.scales), 4),
                    "loadavg_1min_start": round(os.getloadavg()[0], 2)}, "timing": [], "results": []}

    def save():
        out["meta"]["date"] = time.strftime("%Y-%m-%d %H:%M")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, json.dumps(out, indent=1).encode())

    for bb in args.backbones:
        backbone = None
        for label, size, scales in _settings(args.max_size, args.scales, args.settings):
            pools = ["sum"] if scales == [1.0] else args.pools
            for pool in pools:
                extra = {} if scales == [1.0] else {"scales": scales, "scale_pool": pool}
                recipes = [Recipe(r, backbone=bb, max_size=size, extra=extra) for r in args.recipes
                           if not (r == "rmac" and pool == "gem")]
                describer = Describer(recipes[0])  # reads the setting's scales; one network for all settings
                if backbone is None:
                    backbone = describer.backbone
                describer._backbone = backbone
                described = {}
                for name in order:
                    _, _, reuse = benchmark_items(benches[name])  # queries without a box reuse their entry
                    n = benches[name].n_images + sum(r is None for r in reuse)
                    c0, w0 = time.process_time(), time.perf_counter()
                    described[name] = describe_benchmark(benches[name], recipes, cache_dir=args.cache,
                                                         describer=describer, progress=False)
                    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                    out["timing"].append({"backbone": bb, "setting": label, "scale_pool": pool, "benchmark": name,
                                          "max_size": size, "scales": scales,
                                          "pixel_cost": round(sum(s * s for s in scales) * (size / args.max_size) ** 2
                                                              * cost_single, 3),
                                          "wall_ms_per_image": round(1e3 * wall / n, 2),
                                          "cpu_ms_per_image": round(1e3 * cpu / n, 2),
                                          "loadavg_1min": round(os.getloadavg()[0], 2),
                                          "note": "cached locals re-used" if wall < 1e-3 * n else ""})
                    print(f"{bb} {label} pool={pool} {name}: {out['timing'][-1]['wall_ms_per_image']} ms/image",
                          flush=True)
                for b in args.benchmarks:
                    for r in recipes:
                        db, q = described[b][r.name]
                        variants = [("none", None)]
                        if not args.no_whitening:
                            train_db, _ = described[WHITEN_ON[b]][r.name]
                            rows = np.concatenate(train_db)
                            variants.append((WHITEN_ON[b], fit_whitening(rows, trained_on=WHITEN_ON[b])))
                        for wname, wh in variants:
                            res = dict(benches[b].evaluate(score(r, db, q, wh)))
                            row = {"backbone": bb, "setting": label, "max_size": size, "scales": scales,
                                   "scale_pool": pool if scales != [1.0] else None, "recipe": r.name,
                                   "benchmark": b, "whitening": wname, **res}
                            out["results"].append(row)
                            print(json.dumps({k: v for k, v in row.items() if not k.startswith("mp@")}), flush=True)
                if args.shrink_queries and "ukbench" in described:
                    out.setdefault("shrunk_copies", []).extend(
                        shrunk_copies(benches["ukbench"], described["ukbench"], recipes, describer, label, pool,
                                      args.shrink_queries, args.shrink_side))
                save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
