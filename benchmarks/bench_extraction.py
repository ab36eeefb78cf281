#!/usr/bin/env python
"""Extraction on the CPU, per backbone and engine: VGG16 conv5_3 (exact fp32 vs Winograd), ResNet-50 res5
(exact fp32 vs BatchNorm folded vs the Winograd engine, the default ``auto`` on the CPU) and EfficientNet-Lite0
head (exact fp32 vs ``folded``, its ``auto`` on the CPU).

Measures, in one run:

* the machine's fp32 matmul peak (a 4096 x 4096 matmul in torch, ``--threads`` threads, GFLOP/s);
* the direct-convolution cost of VGG16 up to conv5_3 on a 768 x 1024 input (GFLOP, counted from the layer
  table) and the resulting lower bound for direct fp32 convolution (cost / peak);
* the time of the exact eager fp32 trunk and of the Winograd engine (strip workers, the default, and OpenMP
  op-level parallelism) on a real 768 x 1024 photo (median of ``--runs`` runs after a warm-up, the engines
  interleaved so that a change of machine load hits all),
  and the per-image time of the engine on batches of same-size images (``--batch``);
* the agreement of the descriptors: cosine of MAC and of R-MAC (unwhitened), relative error of the raw
  conv5_3 map;
* end-to-end indexing throughput (images/s: JPEG decode + preprocessing + trunk + MAC) on ``--n`` UKBench
  images (640 x 480), exact vs Winograd, and the worst MAC cosine over those images;
* ResNet-50 up to res5 on the same 768 x 1024 photo: its FLOPs counted from the layer table (every conv of the
  network, at its output size), the direct-convolution bound (FLOPs / peak) and the issue's goal (0.6 x that
  bound); the times of the exact network, of ``folded`` (BatchNorm folded, channels-last, oneDNN convs), of the
  ``winograd`` engine with its 3x3 convolutions left direct (what the NHWC matmul 1x1 convs alone buy), and of
  the ``winograd`` engine itself; MAC / R-MAC cosine of each engine vs exact; end-to-end throughput on the
  UKBench images, exact vs winograd, with the worst MAC cosine;
* EfficientNet-Lite0 up to its head (1280 channels, stride 32) on the same photo: its FLOPs (counted by torch's
  FLOP counter on the network), the direct bound (FLOPs / peak: a loose one, since its depthwise and narrow 1x1
  convolutions are bound by memory traffic, not by multiplications), the times of the exact network and of the
  ``folded`` engine (:class:`~instance_search.backbones.fast_lite.FoldedLite0`), the head map's relative error
  and the MAC / R-MAC cosines vs exact; end-to-end throughput on the UKBench images, exact vs folded.

``--backbones`` runs a subset of the sections (e.g. ``--backbones efficientnet-lite0``); the matmul peak is always
measured. A subset is written to ``benchmarks/results/extraction_<backbones>.json`` unless ``--out`` says
otherwise, so the full run's file is not overwritten.

The machine may be shared: the load average before and after is recorded. Results are printed and written to
``benchmarks/results/extraction.json``.

    .venv/bin/python benchmarks/bench_extraction.py [--n 40] [--runs 3] [--threads 2] [--backbones vgg16,...]

(about 3 minutes on the idle 2-core machine with the defaults)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ISEARCH_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))

from instance_search.backbones import load_backbone  # noqa: E402
from instance_search.backbones import fast  # noqa: E402
from instance_search.backbones.vgg16 import VGG16_CONVS  # noqa: E402
from instance_search.images import load_image  # noqa: E402

BACKBONES = ("vgg16", "resnet50", "efficientnet-lite0")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_peak(n: int = 4096, runs: int = 5) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    flop = 2.0 * n**3
    return {
        "n": n,
        "gflops_best": flop / min(times) / 1e9,
        "gflops_median": flop / statistics.median(times) / 1e9,
        "times_s": times,
    }


def vgg16_gflop(h: int, w: int, last: str = "conv5_3") -> float:
    """Multiply-adds x 2 of the direct 3x3 convolutions up to ``last`` (pools after each block)."""
    total = 0.0
    for name, cin, cout in VGG16_CONVS:
        total += 2.0 * 9 * cin * cout * h * w
        if name == last:
            break
        if name in ("conv1_2", "conv2_2", "conv3_3", "conv4_3"):
            h, w = h // 2, w // 2
    return total / 1e9


def resnet50_gflop(net, h: int, w: int) -> dict:
    """Multiply-adds x 2 of every convolution of a ResNet-50 up to res5 on an h x w input, counted from its layer
    table (each ``nn.Conv2d`` at its output size), split into 3x3 / 1x1 / projection shortcut / stem (GFLOP)."""
    import torch.nn as nn

    def out(n, k, s, p):
        return (n + 2 * p - k) // s + 1

    def conv(c: nn.Conv2d, hh: int, ww: int) -> tuple[float, int, int]:
        k, s, p = c.kernel_size[0], c.stride[0], c.padding[0]
        ho, wo = out(hh, k, s, p), out(ww, k, s, p)
        return 2.0 * k * k * c.in_channels * c.out_channels * ho * wo / 1e9, ho, wo

    parts = {"stem": 0.0, "3x3": 0.0, "1x1": 0.0, "shortcut": 0.0}
    g, hh, ww = conv(net.conv1, h, w)
    parts["stem"] += g
    hh, ww = out(hh, 3, 2, 1), out(ww, 3, 2, 1)  # max-pool
    for i in range(4):
        for blk in getattr(net, f"layer{i + 1}"):
            g1, h1, w1 = conv(blk.conv1, hh, ww)
            g2, h2, w2 = conv(blk.conv2, h1, w1)
            g3, h3, w3 = conv(blk.conv3, h2, w2)
            parts["1x1"] += g1 + g3
            parts["3x3"] += g2
            if blk.downsample is not None:
                parts["shortcut"] += conv(blk.downsample[0], hh, ww)[0]
            hh, ww = h3, w3
    parts["total"] = sum(parts.values())
    parts["out_hw"] = [hh, ww]
    return parts


def interleaved_times(fns: dict, runs: int) -> dict:
    """Median (and all) times of each callable, after one warm-up each, run in turns."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v} for k, v in times.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def descriptors(fmap: torch.Tensor) -> dict[str, torch.Tensor]:
    """MAC, and R-MAC / region MACs when the pooling module provides them, of a (C, H, W) map."""
    out = {"mac": fmap.amax(dim=(-2, -1))}
    try:
        from instance_search.ops.pooling import region_macs, rmac, rmac_regions
    except ImportError:
        return out
    regions = rmac_regions(fmap.shape[-2], fmap.shape[-1])
    out["rmac"] = rmac(fmap, regions=regions)
    out["region_macs"] = region_macs(fmap, regions)
    return out


def photo_768x1024():
    """A real 1024 x 768 (W x H) photo: the first Paris image of that size, else a resized UKBench one."""
    for p in sorted((DATA / "rparis250" / "jpg").glob("*.jpg")):
        img = load_image(p)
        if img.size == (1024, 768):
            return str(p), img
    p = DATA / "ukbench1000" / "ukbench00000.jpg"
    return str(p) + " (resized)", load_image(p).resize((1024, 768))


def time_engines(engines: dict, x: torch.Tensor, layer: str, runs: int, bound: float, gflop: float) -> dict:
    """Each engine (``name -> module(x, [layer])``) timed on ``x`` (interleaved runs) and compared with the first
    one, the exact network: per engine its timing, ``over_direct_bound``, effective GFLOP/s, speed-up over exact
    (median and min), the map's relative and max-abs error, and the cosines of its MAC / R-MAC."""
    def runner(eng):
        def run():
            with torch.inference_mode():
                return eng(x, [layer])[layer]
        return run

    t = interleaved_times({k: runner(e) for k, e in engines.items()}, runs)
    exact = next(iter(engines))
    ref = runner(engines[exact])()[0]
    d_ref = descriptors(ref)
    rows = {}
    for name, eng in engines.items():
        fmap = runner(eng)()[0]
        d = descriptors(fmap)
        row = dict(t[name])
        row.update({"over_direct_bound": row["median_s"] / bound, "effective_gflops": gflop / row["median_s"],
                    "speedup_vs_exact": t[exact]["median_s"] / row["median_s"],
                    "speedup_vs_exact_min": t[exact]["min_s"] / row["min_s"],
                    f"{layer}_rel_err": rel_err(fmap, ref),
                    f"{layer}_max_abs_err_over_max": float((fmap - ref).abs().max() / ref.abs().max()),
                    "cos_mac": cos(d["mac"], d_ref["mac"])})
        if "rmac" in d_ref:
            row["cos_rmac"] = cos(d["rmac"], d_ref["rmac"])
        rows[name] = row
        print(f"  {name:20s} median {row['median_s']:.3f} s, min {row['min_s']:.3f} s = "
              f"{row['over_direct_bound']:.2f} x bound ({row['effective_gflops']:.0f} effective GFLOP/s, "
              f"{row['speedup_vs_exact']:.2f}x exact)  {layer} rel err {row[f'{layer}_rel_err']:.1e}  "
              f"1-cos MAC {1 - row['cos_mac']:.1e}" + (f" R-MAC {1 - row['cos_rmac']:.1e}" if "cos_rmac" in row else ""))
    return rows


def resnet50_section(x_photo, path: str, peak: dict, runs: int, paths: list) -> dict:
    """ResNet-50 up to res5 on the 768 x 1024 photo: FLOPs, bound, engines' times and cosines (see the module
    docstring); end-to-end on the UKBench ``paths``."""
    try:
        bb = load_backbone("resnet50", progress=False)
    except Exception as exc:  # noqa: BLE001 - no weights here: the section says so instead of failing the run
        print(f"ResNet-50 skipped: {exc}")
        return {"skipped": str(exc)}
    x = bb.preprocess(x_photo)[None]
    flops = resnet50_gflop(bb.net, x.shape[-2], x.shape[-1])
    bound = flops["total"] / peak["gflops_best"]
    goal = 0.6 * bound
    print(f"ResNet-50 up to res5 on {x.shape[-2]}x{x.shape[-1]} ({bb.net.variant} variant): {flops['total']:.1f} GFLOP "
          f"(3x3 {flops['3x3']:.1f}, 1x1 {flops['1x1']:.1f}, shortcuts {flops['shortcut']:.1f}, stem "
          f"{flops['stem']:.1f}) -> direct bound {bound:.3f} s at peak, goal 0.6 x bound = {goal:.3f} s")
    folded = fast.FoldedResNet50(bb.net)
    wino = fast.FoldedResNet50(bb.net, winograd=True)
    # the same engine with its 3x3 convolutions left direct (folded, channels-last): what the matmul 1x1s buy
    matmul_only = fast.FoldedResNet50(bb.net, winograd=True)
    matmul_only._fast = [[dataclasses.replace(b, u2=None) for b in row] for row in matmul_only._fast]
    engines = {"exact": bb.net, "folded": folded, "winograd_direct3x3": matmul_only, "winograd": wino}
    out: dict = {"photo": path, "input": list(x.shape), "variant": bb.net.variant, "gflop": flops,
                 "direct_fp32_bound_s": bound, "goal_s": goal,
                 "engines": time_engines(engines, x, "res5", runs, bound, flops["total"])}
    for row in out["engines"].values():
        row["meets_goal"] = row["median_s"] <= goal
    out["winograd_workspace_mb"] = wino.workspace_bytes() / 2**20
    # end to end on the UKBench images, through Backbone.features (use_engine, as the product runs it)
    out["ukbench_end_to_end"] = end_to_end(bb, "res5", "winograd", paths, "ResNet-50")
    return out


def end_to_end(bb, layer: str, engine: str, paths: list, label: str) -> dict:
    """Images/s of ``bb.features`` (decode included, as the product runs it) on ``paths`` with the exact network
    and with ``engine`` (:func:`fast.use_engine`), and the worst MAC cosine between the two over the images."""
    e2e: dict = {"n_images": len(paths)}
    macs = {}
    for name in ("exact", engine):
        fast.use_engine(bb, name)
        bb.features(load_image(paths[0]), layer)
        t0 = time.perf_counter()
        vecs = []
        for p in paths:
            fmap = bb.features(load_image(p), layer)[(layer, 1.0)]
            vecs.append(fmap.amax(dim=(-2, -1)))
        dt = time.perf_counter() - t0
        macs[name] = torch.stack(vecs)
        e2e[name] = {"seconds": dt, "images_per_s": len(paths) / dt, "s_per_image": dt / len(paths)}
        print(f"  end-to-end {label} {name}: {len(paths)} UKBench images in {dt:.1f} s = {len(paths) / dt:.3f} "
              "images/s")
    fast.use_engine(bb, "exact")
    e2e["min_cos_mac"] = float(F.cosine_similarity(macs["exact"].double(), macs[engine].double(), dim=1).min())
    e2e["speedup"] = e2e["exact"]["seconds"] / e2e[engine]["seconds"]
    print(f"  end-to-end speedup {e2e['speedup']:.2f}x, worst MAC cosine over the images {e2e['min_cos_mac']:.7f} "
          f"(1-cos {1 - e2e['min_cos_mac']:.1e})")
    return e2e


def lite0_section(x_photo, path: str, peak: dict, runs: int, paths: list) -> dict:
    """EfficientNet-Lite0 up to its head on the 768 x 1024 photo, exact vs folded (see the module docstring); end
    to end on the UKBench ``paths``."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        bb = load_backbone("efficientnet-lite0", progress=False)
    except Exception as exc:  # noqa: BLE001 - no weights here: the section says so instead of failing the run
        print(f"EfficientNet-Lite0 skipped: {exc}")
        return {"skipped": str(exc)}
    x = bb.preprocess(x_photo)[None]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        bb.net(x, ["head"])
    gflop = counter.get_total_flops() / 1e9
    bound = gflop / peak["gflops_best"]
    print(f"EfficientNet-Lite0 up to head on {x.shape[-2]}x{x.shape[-1]}: {gflop:.2f} GFLOP -> direct bound "
          f"{bound:.3f} s at peak")
    engines = {"exact": bb.net, "folded": fast.FoldedLite0(bb.net)}

    out: dict = {"photo": path, "input": list(x.shape), "gflop": gflop, "direct_fp32_bound_s": bound,
                 "engines": time_engines(engines, x, "head", runs, bound, gflop)}
    out["folded_workspace_mb"] = engines["folded"].workspace_bytes() / 2**20
    out["ukbench_end_to_end"] = end_to_end(bb, "head", "folded", paths, "Lite0")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="UKBench images for the end-to-end throughput (default 40)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per engine on the 768x1024 image (>= 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--batch", type=str, default="2", help="batch sizes to try with the engine, e.g. '2,4' ('' none)")
    ap.add_argument("--backbones", type=str, default=",".join(BACKBONES),
                    help=f"comma-separated sections to run (default all: {','.join(BACKBONES)})")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default benchmarks/results/extraction.json, or extraction_<backbones>.json "
                         "for a subset)")
    args = ap.parse_args(argv)
    chosen = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BACKBONES))
    if unknown or not chosen:
        ap.error(f"--backbones: unknown {unknown}; choose among {', '.join(BACKBONES)}")
    if args.out is None:
        subset = set(chosen) != set(BACKBONES)
        args.out = REPO / "benchmarks" / "results" / (f"extraction_{'_'.join(chosen)}.json" if subset
                                                      else "extraction.json")
    torch.set_num_threads(args.threads)
    res: dict = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg_before": os.getloadavg(),
        }
    }
    print(f"CPU {res['machine']['cpu']}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {res['machine']['loadavg_before']}")

    # ---- peak and the direct-convolution bound
    peak = matmul_peak()
    gflop = vgg16_gflop(768, 1024)
    bound = gflop / peak["gflops_best"]
    res["peak"] = peak
    res["backbones"] = chosen
    print(f"peak fp32 matmul (4096^2): {peak['gflops_best']:.1f} GFLOP/s (median {peak['gflops_median']:.1f})")
    path, img = photo_768x1024()
    paths = sorted((DATA / "ukbench1000").glob("*.jpg"))[: args.n]
    if "vgg16" in chosen:
        res["vgg16_conv5_3_768x1024"] = {"direct_gflop": gflop, "direct_fp32_bound_s": bound}
        print(f"VGG16 up to conv5_3 on 768x1024: {gflop:.1f} GFLOP direct -> bound {bound:.2f} s at peak")
        vgg16_section(res, args, peak, gflop, bound, path, img, paths)

    # ---- ResNet-50 res5: exact vs folded vs winograd
    if "resnet50" in chosen:
        res["resnet50_res5_768x1024"] = resnet50_section(x_photo=img, path=path, peak=peak,
                                                         runs=max(3, args.runs), paths=paths)

    # ---- EfficientNet-Lite0 head: exact vs folded
    if "efficientnet-lite0" in chosen:
        res["efficientnet_lite0_head_768x1024"] = lite0_section(x_photo=img, path=path, peak=peak,
                                                                runs=max(3, args.runs), paths=paths)

    res["machine"]["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"load average after: {res['machine']['loadavg_after']}; wrote {args.out}")
    return res


def vgg16_section(res: dict, args, peak: dict, gflop: float, bound: float, path: str, img, paths: list) -> None:
    """VGG16 conv5_3 on the 768 x 1024 photo, exact vs Winograd; batches; end to end on UKBench (into ``res``)."""

    # ---- one 768 x 1024 photo, exact vs Winograd
    bb = load_backbone("vgg16", progress=False)
    engine = fast.winograd_trunk(bb)  # parallel='strips' (the default)
    engine_omp = fast.WinogradVGGTrunk(bb.net.features.named_children(), parallel="omp")
    x = bb.preprocess(img)[None]
    layers = ["conv5_3"]

    def run_exact(batch=x):
        with torch.inference_mode():
            return bb.net(batch, layers)["conv5_3"]

    def run_fast(batch=x):
        with torch.inference_mode():
            return engine(batch, layers)["conv5_3"]

    def run_fast_omp(batch=x):
        with torch.inference_mode():
            return engine_omp(batch, layers)["conv5_3"]

    t = interleaved_times({"exact": run_exact, "winograd": run_fast, "winograd_omp": run_fast_omp}, max(3, args.runs))
    exact_s, fast_s = t["exact"]["median_s"], t["winograd"]["median_s"]
    ref, out = run_exact()[0], run_fast()[0]
    d_ref, d_out = descriptors(ref), descriptors(out)
    acc = {
        "conv5_3_rel_err": rel_err(out, ref),
        "conv5_3_max_abs_err_over_max": float((out - ref).abs().max() / ref.abs().max()),
        "cos_mac": cos(d_out["mac"], d_ref["mac"]),
    }
    if "rmac" in d_ref:
        acc["cos_rmac"] = cos(d_out["rmac"], d_ref["rmac"])
        region_cos = F.cosine_similarity(d_out["region_macs"], d_ref["region_macs"], dim=-1)
        acc["cos_region_macs_min"] = float(region_cos.min())
    res["image_768x1024"] = {
        "photo": path,
        "input": list(x.shape),
        "exact": t["exact"],
        "winograd": t["winograd"],
        "winograd_omp": t["winograd_omp"],
        "speedup": exact_s / fast_s,
        "winograd_over_direct_bound": fast_s / bound,
        "exact_over_direct_bound": exact_s / bound,
        "winograd_effective_gflops": gflop / fast_s,
        "accuracy": acc,
        "engine_workspace_mb": engine.workspace_bytes() / 2**20,
    }
    print(f"exact eager fp32: {exact_s:.3f} s   winograd: {fast_s:.3f} s   speedup {exact_s / fast_s:.2f}x   "
          f"winograd / direct bound = {fast_s / bound:.2f}  ({gflop / fast_s:.0f} effective GFLOP/s)")
    print(f"winograd with OpenMP op-level parallelism instead of strip workers: {t['winograd_omp']['median_s']:.3f} s")
    print("accuracy: " + ", ".join(f"{k} {v:.3g}" if "err" in k else f"{k} {v:.7f}" for k, v in acc.items()))

    # ---- batches of same-size images
    batches = {}
    for b in [int(s) for s in args.batch.split(",") if s.strip()]:
        xb = x.expand(b, -1, -1, -1).contiguous()
        tb = interleaved_times({"winograd": lambda: run_fast(xb)}, max(3, args.runs))["winograd"]
        batches[str(b)] = {"per_image_s": tb["median_s"] / b, "batch_s": tb["median_s"]}
        print(f"winograd batch of {b}: {tb['median_s'] / b:.3f} s per image (batch 1: {fast_s:.3f} s)")
    res["image_768x1024"]["winograd_batches"] = batches

    # ---- end-to-end indexing throughput on UKBench
    e2e = end_to_end(bb, "conv5_3", "winograd", paths, "VGG16")
    e2e["image_size"] = list(load_image(paths[-1]).size)
    res["ukbench_end_to_end"] = e2e


if __name__ == "__main__":
    main()
