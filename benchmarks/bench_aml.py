"""Approximate max-pooling and AML localisation on real Paris photos (Tolias, Sicre & Jégou 2016, Sec. 5-8).

Reproduces, on the 250 Paris images (VGG16 conv5_3, images at max side 1024 px, float maps cached):

* Fig. 3  — cosine(exact max-pooling, approximation) vs region size for several α, and its distribution at α=10;
* Table 1 (left) — IoU of the AML window with the exhaustive optimum and % of windows evaluated, for
  t = 1..5 and s ∈ {1.1, 1.5, 2.0}, on query/positive pairs (query = MAC of the query box);
* localisation against ground truth (Sec. 8): a query's object localised in the *other* query images of the
  same landmark, IoU with their ground-truth boxes (pixels);
* compact map storage (Sec. 7): bytes per image and the mAP of R-MAC + AML re-ranking with float vs compact maps;
* re-ranking speed: AML re-ranking of a 1000-image short list per query from compact maps decoded to their
  non-zeros (single-thread CPU seconds; decoding timed separately).

Writes ``benchmarks/results/aml.json`` and ``aml_fig3.png``. The Paris-250 subset is not comparable with the
paper's Paris6k figures (fewer images, VGG16 instead of AlexNet/VGG16 at the paper's settings).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_aml.py [--pairs-per-query 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from instance_search.eval.runner import benchmark_items, extract_maps
from instance_search.collection import Describer, fit_whitening
from instance_search.eval.datasets.benchmarks import load_benchmark
from instance_search.eval.metrics import compute_map, iou
from instance_search.index.compact import decode_map, decode_sparse, encode_map
from instance_search.ops import integral as I
from instance_search.recipes.base import Recipe
from instance_search.rerank.aml import cells_to_pixels, pixels_to_cells, rerank_aml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / "cache"


def fig3(maps, rng, n_images=30, n_windows=3000, alphas=(1, 2, 5, 10, 20)):
    """Approximation quality vs region size (Tolias Fig. 3)."""
    edges = np.array([0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0001])
    sums = {a: np.zeros(len(edges) - 1) for a in alphas}
    counts = np.zeros(len(edges) - 1)
    dist10 = []
    for k in rng.choice(len(maps), min(n_images, len(maps)), replace=False):
        X = maps[int(k)].astype(np.float32)
        C, H, W = X.shape
        wins = I.all_windows(H, W)
        wins = wins[rng.choice(len(wins), min(n_windows, len(wins)), replace=False)]
        exact = I.window_max(X, wins)
        frac = wins[:, 2] * wins[:, 3] / (H * W)
        b = np.digitize(frac, edges) - 1
        counts += np.bincount(b, minlength=len(edges) - 1)
        en = exact / np.maximum(np.linalg.norm(exact, axis=1, keepdims=True), 1e-12)
        for a in alphas:
            ap = I.window_maxpool_approx(I.power_integral(X, a), wins)
            cos = (ap * en).sum(1) / np.maximum(np.linalg.norm(ap, axis=1), 1e-12)
            sums[a] += np.bincount(b, weights=cos, minlength=len(edges) - 1)
            if a == 10:
                dist10.append(cos)
    d = np.concatenate(dist10)
    return {
        "bins_area_fraction": [[float(edges[i]), float(min(edges[i + 1], 1.0))] for i in range(len(edges) - 1)],
        "windows_per_bin": counts.astype(int).tolist(),
        "mean_cosine": {str(a): (sums[a] / np.maximum(counts, 1)).round(4).tolist() for a in alphas},
        "alpha10_cosine_percentiles": {p: float(np.percentile(d, p)) for p in (1, 5, 25, 50)},
        "alpha10_mean_cosine": float(d.mean()),
        "windows": int(d.size),
    }


def plot_fig3(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    mids = [np.sqrt(max(lo, 0.005) * hi) for lo, hi in res["bins_area_fraction"]]
    for a, ys in res["mean_cosine"].items():
        ax[0].plot(mids, ys, marker="o", label=f"α = {a}")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("region area / map area")
    ax[0].set_ylabel("mean cosine(exact MAC, approx.)")
    ax[0].legend()
    ax[0].set_title("Approximate max-pooling vs region size")
    p = res["alpha10_cosine_percentiles"]
    ax[1].bar([f"p{k}" for k in p], list(p.values()))
    ax[1].set_ylim(min(p.values()) - 0.02, 1.0)
    ax[1].set_title("α = 10: cosine percentiles over all regions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table1(bench, qmaps, dbmaps, per_query, max_pairs=None, ts=(1, 2, 3, 4, 5), ss=(1.1, 1.5, 2.0)):
    """AML vs exhaustive search on query/positive pairs (Tolias Table 1, left)."""
    pairs = []
    for qi, g in enumerate(bench.gnd):
        pos = list(g.get("easy", [])) + list(g.get("hard", []))
        pairs += [(qi, int(j)) for j in pos[:per_query]]
    pairs = pairs[:max_pairs] if max_pairs else pairs
    iou_sum = {(t, s): 0.0 for t in ts for s in ss}
    frac_sum = {(t, s): 0.0 for t in ts for s in ss}
    t_ex = t_aml = 0.0
    for qi, j in pairs:
        qm = qmaps[qi].astype(np.float32)
        q = qm.max(axis=(1, 2))
        aspect = qm.shape[2] / qm.shape[1]
        X = dbmaps[j].astype(np.float32)
        pi = I.power_integral(X, 10.0)
        t0 = time.perf_counter()
        wex, _, nall = I.exhaustive_search(pi, q)
        t_ex += time.perf_counter() - t0
        for t in ts:
            for s in ss:
                t0 = time.perf_counter()
                w, _, n = I.aml_search(pi, q, t=t, s=s, query_aspect=aspect)
                if (t, s) == (3, 1.1):
                    t_aml += time.perf_counter() - t0
                iou_sum[(t, s)] += float(I.window_iou(w, wex))
                frac_sum[(t, s)] += n / nall
    n = len(pairs)
    rows = [{"t": t, "s": s, "iou_with_exhaustive": round(iou_sum[(t, s)] / n, 3),
             "percent_windows": round(100 * frac_sum[(t, s)] / n, 3)} for t in ts for s in ss]
    return {"pairs": n, "rows": rows, "exhaustive_seconds_per_pair": round(t_ex / n, 3),
            "aml_t3_s1.1_ms_per_pair": round(1e3 * t_aml / n, 2)}


def localisation_gt(bench, qmaps, qfull_maps, full_sizes):
    """Query i's object localised (AML, t=3, s=1.1) in query image j of the same landmark; IoU with j's box."""
    landmark = [Path(p).stem.split("_")[1] if "_" in Path(p).stem else Path(p).stem for p in bench.query_paths]
    out = []
    for i in range(len(qmaps)):
        for j in range(len(qmaps)):
            if i == j or landmark[i] != landmark[j] or Path(bench.query_paths[i]) == Path(bench.query_paths[j]):
                continue
            q = qmaps[i].astype(np.float32).max(axis=(1, 2))
            aspect = qmaps[i].shape[2] / qmaps[i].shape[1]
            X = qfull_maps[j].astype(np.float32)
            (x, y, w, h), _, _ = I.aml_search(X, q, query_aspect=aspect)
            wh = full_sizes[j]
            pred = cells_to_pixels((x, y, w, h), X.shape[1:], wh)
            gt = np.asarray(bench.query_boxes[j], dtype=np.float64)
            # the cell grid limits precision: also report the IoU of the best cell-aligned box (upper bound)
            gcell = pixels_to_cells(gt, wh, X.shape[1:])
            bound = cells_to_pixels(gcell, X.shape[1:], wh)
            out.append({"query": Path(bench.query_paths[i]).stem, "in": Path(bench.query_paths[j]).stem,
                        "iou": round(float(iou(pred, gt)), 3), "cell_bound_iou": round(float(iou(bound, gt)), 3)})
    ious = [o["iou"] for o in out]
    return {"pairs": len(out), "mean_iou": round(float(np.mean(ious)), 3) if ious else None,
            "iou_ge_0.5": round(float(np.mean(np.asarray(ious) >= 0.5)), 3) if ious else None, "detail": out}


def _finalizer(recipe, whitening):
    """Window R-MAC of a list of (R_i, C) region-vector arrays at once (rerank_aml(finalize_batch=True))."""
    def l2(L):
        return L / np.maximum(np.linalg.norm(L, axis=1, keepdims=True), 1e-12)

    return lambda locals_: recipe.finalize([l2(L) for L in locals_], whitening)


def rmac_scores(recipe, q_local, db_local, whitening):
    d = recipe.finalize(db_local, whitening)
    q = recipe.finalize(q_local, whitening)
    return q @ d.T, q


def first_stage(recipe, qmaps, dbmaps, whitening_index=None):
    """R-MAC of the query crops and database maps, whitening learned on another collection's index (or none):
    ``(qlocal, dblocal, whitening, scores, qglobal)``."""
    qlocal = [recipe.local_from_map(torch.from_numpy(m.astype(np.float32))) for m in qmaps]
    dblocal = [recipe.local_from_map(torch.from_numpy(m.astype(np.float32))) for m in dbmaps]
    wh = None
    if whitening_index is not None:
        from instance_search.collection import Collection

        rows = np.concatenate(Collection.open(whitening_index).store.local_descriptors())
        wh = fit_whitening(rows, trained_on=f"R-MAC regions of the index {whitening_index}")
    scores, qglobal = rmac_scores(recipe, qlocal, dblocal, wh)
    return qlocal, dblocal, wh, scores, qglobal


def rerank_ranks(scores, qglobal, qmaps, maps, recipe, wh, shortlist, desc):
    """R-MAC order re-ranked by AML scoring the window's R-MAC (Tolias Sec. 6) on the short list, one row per
    query: ``(ranks (nq, ndb), heads, boxes in head order)``."""
    ranks = np.argsort(-scores, axis=1, kind="stable")
    new = ranks.copy()
    heads, boxes = [], []
    for qi in tqdm(range(len(qmaps)), desc=desc, leave=False):
        head = ranks[qi, :shortlist]
        q = qmaps[qi].astype(np.float32).max(axis=(1, 2))
        res = rerank_aml(q, [maps[j] for j in head], shortlist_scores=scores[qi, head],
                         query_aspect=qmaps[qi].shape[2] / qmaps[qi].shape[1], finalize=_finalizer(recipe, wh),
                         finalize_batch=True, query_global=qglobal[qi], levels=recipe.levels)
        new[qi, :shortlist] = head[res.order]
        heads.append(head)
        boxes.append(res.boxes)
    return new, heads, boxes


def rerank_map(bench, scores, qglobal, qmaps, dbmaps, recipe, whitening, shortlist):
    """mAP (revisited E/M/H) of R-MAC, re-ranked with AML scoring the window's R-MAC (Tolias Sec. 6)."""
    new = rerank_ranks(scores, qglobal, qmaps, dbmaps, recipe, whitening, shortlist, "AML re-ranking")[0]
    return {p: round(100 * compute_map(new.T, bench.ok_gnd(p))[0], 2) for p in ("easy", "medium", "hard")}


def _ranked_picture(bench, scores, qglobal, qmaps, dbmaps, recipe, wh, qi=0, n=11):
    from PIL import Image

    from instance_search.viz import draw_ranked

    head = np.argsort(-scores[qi])[:50]
    q = qmaps[qi].astype(np.float32).max(axis=(1, 2))
    res = rerank_aml(q, [dbmaps[j] for j in head], shortlist_scores=scores[qi, head],
                     query_aspect=qmaps[qi].shape[2] / qmaps[qi].shape[1], finalize=_finalizer(recipe, wh),
                     finalize_batch=True, query_global=qglobal[qi], levels=recipe.levels)
    top = [int(k) for k in res.order[:n]]
    boxes = []
    for k in top:
        with Image.open(bench.images[head[k]]) as im:
            boxes.append(tuple(cells_to_pixels(res.boxes[k], dbmaps[head[k]].shape[1:], im.size)))
    ok = set(int(i) for i in list(bench.gnd[qi].get("easy", [])) + list(bench.gnd[qi].get("hard", [])))
    draw_ranked(bench.query_paths[qi], [str(bench.images[head[k]]) for k in top], [res.scores[k] for k in top],
                RESULTS / "aml_ranked.png", query_box=bench.query_boxes[qi], boxes=boxes,
                relevant=[int(head[k]) in ok for k in top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs-per-query", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=RESULTS / "aml.json")
    ap.add_argument("--whitening-index", type=Path, default=None,
                    help="an index of ANOTHER collection (e.g. Holidays) whose R-MAC regions train the whitening "
                         "(the papers' protocol); default: no whitening (self-whitening on these 238 images of 5 "
                         "landmarks hurts, see README)")
    ap.add_argument("--max-pairs", type=int, default=None, help="Table 1: at most this many pairs")
    ap.add_argument("--shortlist", type=int, default=100, help="images re-ranked per query (mAP parts)")
    ap.add_argument("--compact", nargs="+", default=["0.3:64"], metavar="RHO:TOP[:LEVELS]",
                    help="compact-map settings compared with the float maps (levels default 8)")
    ap.add_argument("--speed-queries", type=int, default=1)
    ap.add_argument("--parts", nargs="+", default=["fig3", "localisation", "table1", "rerank", "speed"],
                    help="parts to run; the others are kept from an existing --out file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bench = load_benchmark("rparis6k")
    recipe = Recipe("rmac", backbone="vgg16", max_size=args.max_size)
    describer = Describer(recipe, engine="winograd")
    db, queries, _ = benchmark_items(bench)
    t0 = time.perf_counter()
    qmaps = extract_maps(queries, recipe, describer=describer, cache_dir=CACHE, desc="query crops")
    dbmaps = extract_maps(db, recipe, describer=describer, cache_dir=CACHE, desc="database")
    qfull = extract_maps([(Path(p), None) for p in bench.query_paths], recipe, describer=describer, cache_dir=CACHE,
                         desc="full query images")
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    out = {"benchmark": bench.summary(), "backbone": "vgg16 conv5_3", "max_size": args.max_size,
           "extract_seconds": round(time.perf_counter() - t0, 1), "threads": args.threads}
    print(bench.summary())

    for k, v in old.items():
        out.setdefault(k, v)
    if "fig3" in args.parts:
        out["fig3"] = fig3(dbmaps, rng)
        plot_fig3(out["fig3"], RESULTS / "aml_fig3.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every part, so that a long run keeps what it has
        args.out.write_text(json.dumps(out, indent=1))

    if "fig3" in out:
        save()
        print("Fig. 3: mean cosine by region size", json.dumps(out["fig3"]["mean_cosine"]))
        print(f"        alpha=10 over {out['fig3']['windows']} regions: mean {out['fig3']['alpha10_mean_cosine']:.4f}, "
              f"percentiles {out['fig3']['alpha10_cosine_percentiles']}")

    from PIL import Image

    sizes = []
    for p in bench.query_paths:
        with Image.open(p) as im:
            w, h = im.size
        sizes.append((w, h))
    # the boxes are in original pixels; the maps of the full query images cover the whole image, so
    # cells_to_pixels with the original size maps cells to original pixels
    if "localisation" in args.parts:
        out["localisation"] = localisation_gt(bench, qmaps, qfull, sizes)
        save()
        loc = out["localisation"]
        print(f"Localisation vs ground truth: {loc['pairs']} pairs, mean IoU {loc['mean_iou']}, IoU>=0.5 {loc['iou_ge_0.5']}")

    # pictures: Fig. 2 (receptive fields of the top-5 MAC components of a query / positive pair) and the ranked
    # list of query 0 after R-MAC + AML with the localised boxes
    from PIL import Image

    from instance_search.viz import draw_mac_receptive_fields

    g0 = bench.gnd[0]
    j0 = int((list(g0.get("easy", [])) + list(g0.get("hard", [])))[0])
    with Image.open(bench.query_paths[0]) as qa, Image.open(bench.images[j0]) as qb:
        draw_mac_receptive_fields(qa.convert("RGB"), qb.convert("RGB"), qfull[0].astype(np.float32),
                                  dbmaps[j0].astype(np.float32), RESULTS / "aml_fig2.png")

    if "table1" in args.parts:
        out["table1"] = table1(bench, qmaps, dbmaps, args.pairs_per_query, args.max_pairs)
        save()
        tab = out["table1"]
        print(f"Table 1 ({tab['pairs']} pairs; exhaustive {tab['exhaustive_seconds_per_pair']} s/pair, "
          f"AML t=3 s=1.1 {tab['aml_t3_s1.1_ms_per_pair']} ms/pair):")
        for r in tab["rows"]:
            print(f"  t={r['t']} s={r['s']}: IoU {r['iou_with_exhaustive']:.3f}, windows {r['percent_windows']:.3f}%")

    # R-MAC first stage (whitening from another collection's index, or none), then AML re-ranking with float vs
    # compact maps
    qlocal, dblocal, wh, scores, qglobal = first_stage(recipe, qmaps, dbmaps, args.whitening_index)
    out["whitening"] = "none" if wh is None else wh.trained_on
    if "rerank" not in args.parts and "speed" not in args.parts:
        args.out.write_text(json.dumps(out, indent=1))
        return
    base = bench.evaluate(scores)
    out["rmac"] = {p: round(base[f"map_{p}"], 2) for p in ("easy", "medium", "hard")}
    if "rerank" in args.parts:
        out["shortlist"] = args.shortlist
        out["rmac_aml_float"] = rerank_map(bench, scores, qglobal, qmaps, dbmaps, recipe, wh, args.shortlist)
        _ranked_picture(bench, scores, qglobal, qmaps, dbmaps, recipe, wh)
        storage = []
        for setting in args.compact:
            parts = setting.split(":")
            rho, top = float(parts[0]), int(parts[1])
            levels = int(parts[2]) if len(parts) > 2 else 8
            codes = [encode_map(m.astype(np.float32), rho=rho, top=top, levels=levels) for m in dbmaps]
            dec = [decode_sparse(c) for c in codes]
            cells = float(np.mean([m.shape[1] * m.shape[2] for m in dbmaps]))
            storage.append({"rho": rho, "top": top, "levels": levels,
                            "bytes_per_image_mean": round(float(np.mean([len(c) for c in codes]))),
                            "bytes_per_image_max": int(max(len(c) for c in codes)), "mean_cells": round(cells),
                            "nonzeros_per_image_mean": round(float(np.mean([len(d.value) for d in dec]))),
                            "float16_bytes_per_image": int(np.mean([m.size * 2 for m in dbmaps])),
                            "rmac_aml_map": rerank_map(bench, scores, qglobal, qmaps, dec, recipe, wh, args.shortlist)})
            print(f"compact rho={rho} top={top} levels={levels}: {storage[-1]['bytes_per_image_mean']} B/image "
                  f"(max {storage[-1]['bytes_per_image_max']}), AML mAP {storage[-1]['rmac_aml_map']}", flush=True)
        out["compact_storage"] = storage
        print(f"R-MAC {out['rmac']}  R-MAC+AML float maps {out['rmac_aml_float']}")
    if "speed" not in args.parts:
        args.out.write_text(json.dumps(out, indent=1))
        return

    # speed: a 1000-image short list (the database maps, repeated) stored in the default compact code, decoded
    # to non-zeros (decode_sparse, what re-ranking works from) and, for reference, to dense maps (decode_map);
    # single-thread CPU time is the figure (the machine is shared), wall time and load average beside it
    codes = [encode_map(m.astype(np.float32)) for m in dbmaps]
    short = [codes[i % len(codes)] for i in range(1000)]
    c0, w0 = time.process_time(), time.perf_counter()
    dec = [decode_sparse(c) for c in short]
    t_dec, w_dec = time.process_time() - c0, time.perf_counter() - w0
    c0 = time.process_time()
    for c in short[:100]:
        decode_map(c)
    t_dense = 10 * (time.process_time() - c0)
    cpu, wall, loads = [], [], []
    for qi in range(min(args.speed_queries, len(qmaps))):
        q = qmaps[qi].astype(np.float32).max(axis=(1, 2))
        c0, w0 = time.process_time(), time.perf_counter()
        rerank_aml(q, dec, query_aspect=qmaps[qi].shape[2] / qmaps[qi].shape[1], finalize=_finalizer(recipe, wh),
                   finalize_batch=True, query_global=qglobal[qi], levels=recipe.levels, progress=True)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        loads.append(os.getloadavg()[0])
    out["speed"] = {"shortlist": 1000, "queries": len(cpu), "cpu_count": os.cpu_count(),
                    "map_shape_example": list(dbmaps[0].shape), "threads": args.threads,
                    "rerank_cpu_seconds_per_query": round(float(np.median(cpu)), 3),
                    "rerank_wall_seconds_per_query": round(float(np.median(wall)), 3),
                    "loadavg_1min": round(float(np.median(loads)), 2),
                    "decode_sparse_cpu_seconds_per_1000": round(t_dec, 3),
                    "decode_sparse_wall_seconds_per_1000": round(w_dec, 3),
                    "decode_dense_cpu_seconds_per_1000": round(t_dense, 3),
                    "paper_seconds_per_1000": 2.9, "goal_seconds": 0.1}
    sp = out["speed"]
    print(f"Re-ranking 1000 images: {sp['rerank_cpu_seconds_per_query']} s CPU per query (wall "
          f"{sp['rerank_wall_seconds_per_query']} s, load {sp['loadavg_1min']}) + {sp['decode_sparse_cpu_seconds_per_1000']} s "
          f"CPU decoding the compact maps to non-zeros ({sp['decode_dense_cpu_seconds_per_1000']} s to dense maps); "
          "paper 2.9 s, goal 0.1 s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
