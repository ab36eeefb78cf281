"""Local-feature pipelines on real data: Ng, Yang & Davis 2015 (Fig. 2 layer x scale sweep) and Hoang et al.
2017 (Table-3 mask x embedding grid, mask shares, online speed at 512-D against R-MAC).

Held-out protocol: everything used for UKBench (codebooks, PCA-whitening, local PCA, rotation) is learned on
Holidays and vice versa. One forward pass per image and scale serves every layer; VLADs, maps and keypoints are
cached in benchmarks/cache/ (gitignored), so a re-run only re-scores. Single-threaded by default (the machine
is shared: one thread per process is several times faster than oversubscribed pools there).

    nohup python benchmarks/bench_local.py > benchmarks/results/local.log 2>&1 &

Writes benchmarks/results/local.json and benchmarks/results/sweep.png.
"""
from __future__ import annotations

import argparse
import os
import sys

_THREADS = "1"
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, _THREADS)

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from instance_search.index.store import atomic_write_bytes  # noqa: E402
from instance_search.sweep import (BenchSpec, grid_table, layer_scale_sweep, plot_sweep,  # noqa: E402
                                   selective_grid, selective_speed, sweep_table)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# What the papers report, for the printout (their full datasets, large images: not comparable in absolute terms).
PAPER_NG = ("Ng et al. 2015, Fig. 2 (VGG16/OxfordNet, GoogLeNet; Holidays, Oxford, Paris): at scale 1 the best "
            "layers are intermediate ones (conv4/conv5_1 rather than the last conv layer); at scale 2 the higher "
            "layers gain and the best layer moves up.")
PAPER_HOANG_KEPT = {"sift": 75, "sum": 50, "max": 30}  # % of features kept, approximate (as quoted in the issue)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _findings(result) -> dict[str, dict[str, object]]:
    """Answers to the two questions of the issue, per benchmark."""
    out = {}
    rows = result["rows"]
    for b in dict.fromkeys(r["benchmark"] for r in rows):
        s1 = {r["layer"]: r["map"] for r in rows if r["benchmark"] == b and r["scale"] == "1"}
        s2 = {r["layer"]: r["map"] for r in rows if r["benchmark"] == b and r["scale"] == "2"}
        convs = [layer for layer in s1 if layer.startswith("conv")]
        last = convs[-1] if convs else list(s1)[-1]
        best1 = max(s1, key=s1.get)
        entry: dict[str, object] = {
            "best_layer_scale1": best1, "best_map_scale1": s1[best1], "last_conv": last, "last_map_scale1": s1[last],
            "intermediate_beats_last_at_scale1": bool(best1 != last and s1[best1] > s1[last]),
        }
        if s2:
            gain = {layer: round(s2[layer] - s1[layer], 2) for layer in s1 if layer in s2}
            high = [layer for layer in gain if layer.startswith(("conv5", "pool5", "res5"))]
            low = [layer for layer in gain if layer.startswith(("conv3", "res2", "res3"))]
            best2 = max(s2, key=s2.get)
            entry.update({
                "gain_scale2_minus_scale1": gain, "best_layer_scale2": best2, "best_map_scale2": s2[best2],
                "mean_gain_high_layers": round(float(np.mean([gain[x] for x in high])), 2) if high else None,
                "mean_gain_low_layers": round(float(np.mean([gain[x] for x in low])), 2) if low else None,
            })
            entry["higher_layers_gain_at_scale2"] = bool(high and np.mean([gain[x] for x in high]) > 0)
        out[b] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--holidays", type=int, default=300, help="first N Holidays images (811 = all)")
    ap.add_argument("--ukbench", type=int, default=300, help="first N UKBench images (1000 = all)")
    ap.add_argument("--max-size", type=int, default=192, help="longest image side at scale 1 (scale 2 doubles it)")
    ap.add_argument("--layers", nargs="*", default=None, help="VGG16 layers to sweep (default conv3_1 .. pool5)")
    ap.add_argument("--grid-evaluate", nargs="*", default=["holidays"], help="benchmarks scored in the Table-3 grid")
    ap.add_argument("--speed-images", type=int, default=30,
                    help="Holidays images at their native 325x243 size for the speed test")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sweep", "grid", "speed"])
    ap.add_argument("--k", type=int, default=100, help="VLAD codebook size (Ng et al.: 100)")
    ap.add_argument("--out-dim", type=int, default=128, help="PCA-whitened VLAD dimension (Ng et al.: 128)")
    ap.add_argument("--threads", type=int, default=int(_THREADS))
    ap.add_argument("--cache-dir", default=str(HERE / "cache"))
    args = ap.parse_args(argv)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    specs = [BenchSpec("holidays", args.holidays, args.max_size), BenchSpec("ukbench", args.ukbench, args.max_size)]
    report: dict[str, object] = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or
                                 platform.machine(), "threads": args.threads, "cpu_count": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)

    def save():
        report["cpu_seconds"] = round(time.process_time() - cpu0, 1)
        report["wall_seconds"] = round(time.perf_counter() - wall0, 1)
        atomic_write_bytes(RESULTS / "local.json", json.dumps(report, indent=1).encode())

    if "sweep" not in args.skip:
        _log("Ng et al. 2015 layer x scale sweep")
        res = layer_scale_sweep(specs, layers=args.layers, scales=(1.0, 2.0), k=args.k, out_dim=args.out_dim,
                                codebook_images=60, features_per_image=200, cache_dir=args.cache_dir,
                                save_maps=("conv5_3",), keypoints=True, threads=args.threads, log=_log)
        res["table"] = sweep_table(res)
        res["findings"] = _findings(res)
        res["paper"] = PAPER_NG
        plot_sweep(res, RESULTS / "sweep.png")
        report["sweep"] = res
        print("\n" + res["table"] + "\n", flush=True)
        print(json.dumps(res["findings"], indent=1), flush=True)
        print(PAPER_NG, flush=True)
        save()
    if "grid" not in args.skip:
        _log("Hoang et al. 2017 Table-3 grid (Table-2 configurations, D = 4224)")
        res = selective_grid(specs, evaluate=args.grid_evaluate, config="table2", cache_dir=args.cache_dir,
                             selective_kw={"drop_samples": 2000}, threads=args.threads, log=_log)
        res["table"] = grid_table(res)
        res["paper_kept_percent"] = PAPER_HOANG_KEPT
        report["grid"] = res
        print("\n" + res["table"] + "\n", flush=True)
        print(f"kept % (ours): {res['kept']}  paper ~ {PAPER_HOANG_KEPT}", flush=True)
        save()
    if "speed" not in args.skip:
        _log("online speed at 512-D (T-emb, democratic) against R-MAC, same conv5_3 maps")
        res = selective_speed(specs[1], BenchSpec("holidays", args.speed_images, None), dim=512,
                              aggregation="democratic", n_images=args.speed_images, cache_dir=args.cache_dir,
                              repeats=3, threads=args.threads, log=_log)
        report["speed"] = res
        print(json.dumps(res, indent=1), flush=True)
        save()
    save()
    _log(f"done: {report['cpu_seconds']} CPU s, {report['wall_seconds']} wall s -> {RESULTS / 'local.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
