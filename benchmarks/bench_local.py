"""Local-feature pipelines on real data: Ng, Yang & Davis 2015 (Fig. 2 layer x scale sweep) and Hoang et al.
2017 (Table-3 mask x embedding grid, mask shares, online speed at 512-D against R-MAC).

Held-out protocol: everything used for UKBench (codebooks, PCA-whitening, local PCA, rotation) is learned on
Holidays and vice versa. One forward pass per image and scale serves every layer; VLADs, maps and keypoints are
cached in benchmarks/cache/ (gitignored), so a re-run only re-scores. Single-threaded by default (the machine
is shared: one thread per process is several times faster than oversubscribed pools there).

    nohup python benchmarks/bench_local.py > benchmarks/results/local.log 2>&1 &           # small subsets
    nohup python benchmarks/bench_local.py --full > benchmarks/results/local_full.log 2>&1 &  # full collections

Writes benchmarks/results/local.json + sweep.png (small), local_full.json + sweep_full*.png (--full).
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
from instance_search.eval.sweeps import (BenchSpec, grid_table, layer_scale_sweep, plot_sweep,  # noqa: E402
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


def _size(v: int | None) -> int | None:
    return None if not v else int(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="the full-size protocol: all of Holidays-811 at its native 325x243, all of UKBench-1000 "
                         "at max side 320 (scale 2 = its native 640), Table 3 at 1024-D and 4224-D on both, "
                         "Table 4 on Holidays, ResNet-50 sweep; writes local_full.json / sweep_full*.png")
    ap.add_argument("--holidays", type=int, default=300, help="first N Holidays images (811 = all)")
    ap.add_argument("--ukbench", type=int, default=300, help="first N UKBench images (1000 = all)")
    ap.add_argument("--max-size", type=int, default=192, help="longest image side at scale 1 (scale 2 doubles it)")
    ap.add_argument("--holidays-max-size", type=int, default=None, help="override --max-size for Holidays (0: native)")
    ap.add_argument("--ukbench-max-size", type=int, default=None, help="override --max-size for UKBench (0: native)")
    ap.add_argument("--steps", nargs="*", default=None,
                    choices=["sweep", "grid", "sweep_resnet50", "table4", "speed", "seeds"],
                    help="what to run, in this order (default: sweep grid speed; --full: all)")
    ap.add_argument("--layers", nargs="*", default=None, help="VGG16 layers to sweep (default conv3_1 .. pool5)")
    ap.add_argument("--grid-evaluate", nargs="*", default=None, help="benchmarks scored in the Table-3 grid")
    ap.add_argument("--grid-configs", nargs="*", default=None, help="table2 and/or 1024 (default: table2)")
    ap.add_argument("--table4-dims", nargs="*", type=int, default=[512, 1024, 2048, 4096, 8064])
    ap.add_argument("--table4-masks", nargs="*", default=["none", "sift", "sum", "max"])
    ap.add_argument("--table4-evaluate", nargs="*", default=["holidays"],
                    help="benchmarks scored in Table 4 (results key table4, or table4_<names> when not holidays)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1234, 1, 2, 3, 4],
                    help="step 'seeds': fitting seeds of the 1024-D T-emb + democratic + MAX cell on Holidays "
                         "(how much a Table-3 cell moves with the seed alone; 1234 is the grid's own)")
    ap.add_argument("--grid-pairs", nargs="*", default=None,
                    help="embedding:aggregation pairs of the Table-3 grid (default: all seven, e.g. temb:democratic)")
    ap.add_argument("--resnet-scales", type=float, nargs="+", default=[1.0, 2.0],
                    help="scales of the ResNet-50 sweep (default 1 2)")
    ap.add_argument("--scale-limits", type=json.loads, default=None,
                    help='JSON {scale: {benchmark: N}}: pass only the first N images of a benchmark at that scale '
                         '(CPU time); its partner\'s PCA-whitening is then learned on them at every scale and it is '
                         'also scored on them. --full default: {"2": {"holidays": 150, "ukbench": 150}}')
    ap.add_argument("--resnet-ukbench", type=int, default=None,
                    help="UKBench images for the ResNet-50 sweep (its held-out partner for Holidays; default all)")
    ap.add_argument("--speed-images", type=int, default=30, help="Holidays images (native size) in the speed test")
    ap.add_argument("--k", type=int, default=100, help="VLAD codebook size (Ng et al.: 100)")
    ap.add_argument("--out-dim", type=int, default=128, help="PCA-whitened VLAD dimension (Ng et al.: 128)")
    ap.add_argument("--engine", default="winograd", choices=["exact", "winograd"],
                    help="VGG16 engine (winograd: same maps to ~1e-6 relative, several times faster on a CPU)")
    ap.add_argument("--threads", type=int, default=int(_THREADS))
    ap.add_argument("--out", default=None, help="results name (default local, --full: local_full)")
    ap.add_argument("--cache-dir", default=str(HERE / "cache"))
    args = ap.parse_args(argv)
    if args.full:
        args.holidays, args.ukbench = 811, 1000
        args.holidays_max_size = 0 if args.holidays_max_size is None else args.holidays_max_size
        args.ukbench_max_size = 320 if args.ukbench_max_size is None else args.ukbench_max_size
        if args.scale_limits is None:
            args.scale_limits = {"2": {"holidays": 150, "ukbench": 150}}
    steps = args.steps or (["sweep", "grid", "sweep_resnet50", "table4", "speed"] if args.full
                           else ["sweep", "grid", "speed"])
    configs = args.grid_configs or (["1024", "table2"] if args.full else ["table2"])
    grid_eval = args.grid_evaluate or (["holidays", "ukbench"] if args.full else ["holidays"])
    name = args.out or ("local_full" if args.full else "local")
    hsize = args.max_size if args.holidays_max_size is None else _size(args.holidays_max_size)
    usize = args.max_size if args.ukbench_max_size is None else _size(args.ukbench_max_size)
    specs = [BenchSpec("holidays", args.holidays, hsize), BenchSpec("ukbench", args.ukbench, usize)]

    cpu0, wall0 = time.process_time(), time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"{name}.json"
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "cpu_count": os.cpu_count(), "engine": args.engine}
    report: dict[str, object] = {}

    def save(key=None, value=None):
        """Update this run's keys in the results file; it is re-read first, so that results accumulate over
        runs of single steps, even concurrent ones (a grid run on one benchmark keeps the other's rows)."""
        old = json.loads(out_path.read_text()) if out_path.exists() else {}
        if key is not None:
            prev = old.get(key)
            if key.startswith("grid") and isinstance(prev, dict) and prev.get("settings", {}).get("config") == \
                    value["settings"]["config"]:
                # rows are replaced per (benchmark, embedding, aggregation): a run of other pairs
                # (--grid-pairs) or of the other benchmark keeps the rows it did not compute
                def cell(r):
                    return r["benchmark"], r["embedding"], r["aggregation"]
                mine = {cell(r) for r in value["rows"]}
                value = {**value, "rows": [r for r in prev["rows"] if cell(r) not in mine] + value["rows"],
                         "kept": {**prev.get("kept", {}), **value["kept"]}}
                pairs = prev["settings"].get("pairs", []) + value["settings"].get("pairs", [])
                value["settings"] = {**value["settings"], "pairs": [list(p) for p in dict.fromkeys(map(tuple, pairs))]}
                value["table"] = grid_table(value)
            report[key] = value
        old.update(meta)
        old.update(report)
        old["cpu_seconds_last_run"] = round(time.process_time() - cpu0, 1)
        old["wall_seconds_last_run"] = round(time.perf_counter() - wall0, 1)
        old["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        atomic_write_bytes(out_path, json.dumps(old, indent=1).encode())

    def sweep(backbone: str, sweep_specs, layers, plot_name: str | None, scales=(1.0, 2.0), scale_limits=None):
        _log(f"Ng et al. 2015 layer x scale sweep, {backbone}, scales {scales}, limits {scale_limits}")
        res = layer_scale_sweep(sweep_specs, backbone=backbone, layers=layers, scales=scales, k=args.k,
                                out_dim=args.out_dim, codebook_images=60, features_per_image=200,
                                cache_dir=args.cache_dir, save_maps=("conv5_3",) if backbone == "vgg16" else (),
                                keypoints=True, engine=args.engine if backbone == "vgg16" else "exact",
                                scale_limits=scale_limits, threads=args.threads, log=_log)
        res["table"] = sweep_table(res)
        res["findings"] = _findings(res)
        res["paper"] = PAPER_NG
        if plot_name:
            plot_sweep(res, RESULTS / plot_name)
        print("\n" + res["table"] + "\n", flush=True)
        print(json.dumps(res["findings"], indent=1), flush=True)
        print(PAPER_NG, flush=True)
        return res

    def grid(config, pairs=None, evaluate=None, masks=None):
        kw = {} if pairs is None else {"pairs": pairs}
        if masks is not None:
            kw["masks"] = masks
        res = selective_grid(specs, evaluate=evaluate or grid_eval, config=config, cache_dir=args.cache_dir,
                             engine=args.engine, selective_kw={"emb_samples": 20000}, threads=args.threads,
                             log=_log, **kw)
        res["table"] = grid_table(res)
        res["paper_kept_percent"] = PAPER_HOANG_KEPT
        print("\n" + res["table"] + "\n", flush=True)
        print(f"kept % (ours): {res['kept']}  paper ~ {PAPER_HOANG_KEPT}", flush=True)
        return res

    full_sfx = "_full" if args.full else ""
    for step in steps:
        if step == "sweep":
            limits = {float(a): b for a, b in args.scale_limits.items()} if args.scale_limits else None
            if limits and any(a != 1.0 for a in limits):
                # scale 1 alone with every training image it has, then all scales on a common training set
                save("sweep_scale1", sweep("vgg16", specs, args.layers, None, scales=(1.0,),
                                           scale_limits={1.0: limits[1.0]} if 1.0 in limits else None))
            save("sweep", sweep("vgg16", specs, args.layers, f"sweep{full_sfx}.png", scale_limits=limits))
        elif step == "sweep_resnet50":
            limits = {q: {"ukbench": args.resnet_ukbench} for q in (1.0, 2.0)} if args.resnet_ukbench else None
            save("sweep_resnet50", sweep("resnet50", specs, None, f"sweep{full_sfx}_resnet50.png",
                                         scales=tuple(args.resnet_scales), scale_limits=limits))
        elif step == "grid":
            for config in configs:
                cfg = config if config == "table2" else int(config)
                _log(f"Hoang et al. 2017 Table-3 grid, config {cfg}")
                pairs = [tuple(p.split(":")) for p in args.grid_pairs] if args.grid_pairs else None
                save(f"grid_{config}" if args.full or config != "table2" else "grid", grid(cfg, pairs=pairs))
        elif step == "table4":
            rows = []
            for dim in args.table4_dims:
                _log(f"Hoang et al. 2017 Table 4: T-emb + democratic at {dim}-D on {', '.join(args.table4_evaluate)}")
                res = grid(dim, pairs=[("temb", "democratic")], evaluate=args.table4_evaluate, masks=args.table4_masks)
                rows += res["rows"]
                key = "table4" if args.table4_evaluate == ["holidays"] else "table4_" + "_".join(args.table4_evaluate)
                save(key, {"paper": "Hoang et al. 2017, Table 4", "rows": rows, "kept": res["kept"],
                                "settings": res["settings"]})
        elif step == "seeds":
            rows = []
            for seed in args.seeds:
                _log(f"Hoang et al. 2017: 1024-D T-emb + democratic + MAX on Holidays, fitting seed {seed}")
                res = selective_grid(specs, evaluate=["holidays"], config=1024, pairs=[("temb", "democratic")],
                                     masks=["max"], cache_dir=args.cache_dir, engine=args.engine,
                                     selective_kw={"emb_samples": 20000, "seed": seed}, threads=args.threads,
                                     log=_log)
                rows += [{**r, "seed": seed} for r in res["rows"]]
                maps = np.asarray([r["map_unrounded"] for r in rows])
                save("seeds_1024", {"rows": rows, "mean": round(float(maps.mean()), 3),
                                    "std": round(float(maps.std(ddof=1)), 3) if len(maps) > 1 else None,
                                    "min": round(float(maps.min()), 3), "max": round(float(maps.max()), 3),
                                    "settings": res["settings"]})
            print(json.dumps({k: v for k, v in report["seeds_1024"].items() if k != "rows"}), flush=True)
        elif step == "speed":
            _log("online speed at 512-D (T-emb, democratic) against R-MAC, same conv5_3 maps")
            test = specs[0] if args.full else BenchSpec("holidays", args.speed_images, None)
            res = selective_speed(specs[1], test, dim=512, aggregation="democratic", n_images=args.speed_images,
                                  cache_dir=args.cache_dir, repeats=3, threads=args.threads, log=_log)
            print(json.dumps(res, indent=1), flush=True)
            save("speed", res)
    save()
    _log(f"done: {time.process_time() - cpu0:.1f} CPU s, {time.perf_counter() - wall0:.1f} wall s -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
