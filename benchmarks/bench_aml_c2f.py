"""Coarse-to-fine AML (``--rerank aml-c2f``) against exact AML: speed per query and revisited-Paris mAP.

After Tolias, Sicre & Jégou 2016, Sec. 5-6; issue 14, item 1: goal <= 0.3 s CPU per query (one thread, a
1000-map short list of 1024-px VGG16 conv5_3 maps, decoding included or the cache and its RAM per image stated)
at <= 0.3 mAP below exact AML on each of Easy / Medium / Hard, without and with whitening. Same data and first
stage as ``bench_aml.py`` (Paris-250, R-MAC, maps in the default compact code decoded to their non-zeros):

* speed: per-query single-thread CPU time (``time.process_time``) of re-ranking a 1000-map short list (the
  database maps repeated) with window R-MAC scoring, for each (top, radius, refinement rounds), from the fine
  maps kept in RAM (:class:`~instance_search.rerank.aml_c2f.AMLFineMaps`: no decoding; their RAM per image is
  reported, as are the coarse store's; the window R-MAC reads no maps) and, with ``--uncached``, from decoded
  maps, their fine maps built per query (decoding timed separately), and decoding (timed) only the maps the
  fine stage reads, as the re-ranker does when the fine maps exceed its ``ram_mb``; the search itself is compiled
  (``ops/aml_kernel.py``, Numba; compiled before timing); exact AML on the same short list with
  ``--exact-speed`` (seconds per query);
* accuracy: revisited E/M/H mAP (query = box crop) of R-MAC, R-MAC + exact AML and R-MAC + AML-c2f per
  setting, short list ``--shortlist``; without whitening and, with ``--whitening-index`` (an index of another
  collection, e.g. Holidays-811, as the product learns it), with it; the difference to exact AML per protocol.

Writes ``benchmarks/results/aml_c2f.json``. The maps come from ``benchmarks/cache`` (extracted on first use:
Paris-250 at 1024 px, ~1 h on the loaded 2-core machine); the whitening index is built with
``isearch index ../shared/data/holidays811 --index benchmarks/cache/holidays-index --no-maps --whitening none``.
Accuracy (does not depend on load), then speed alone (< 5 minutes; run it on the idle machine):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_aml_c2f.py --no-speed --tops 3 --radii 8 \\
        --whitening-index benchmarks/cache/holidays-index --out benchmarks/results/aml_c2f_accuracy_grid.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_aml_c2f.py --no-accuracy --tops 3 --radii 8 \\
        --uncached --exact-speed --stages --out benchmarks/results/aml_c2f_speed.json

Smoke run on tiny inputs (checks the script, figures meaningless):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_aml_c2f.py --max-size 256 --db-limit 40 \\
        --queries 3 --speed-shortlist 40 --speed-queries 1 --tops 2 --radii 4 --uncached --out /tmp/aml_c2f_smoke.json
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

from instance_search.eval.datasets.benchmarks import load_benchmark
from instance_search.eval.metrics import compute_map
from instance_search.eval.runner import benchmark_items, extract_maps
from instance_search.index.compact import decode_sparse, encode_map
from instance_search.recipes.base import Recipe
from instance_search.rerank.aml import rerank_aml
from instance_search.rerank.aml_c2f import AMLFineMaps, rerank_aml_c2f
from instance_search.rerank.aml_fast import AMLInvertedMaps

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_aml import _finalizer, first_stage  # noqa: E402  (same first stage and window R-MAC as bench_aml.py)

RESULTS = HERE / "results"
CACHE = HERE / "cache"
GOAL_SECONDS = 0.3
GOAL_MAP_DROP = 0.3


def _map(ranks, bench, qsel):
    gnd = {p: [bench.ok_gnd(p)[i] for i in qsel] for p in ("easy", "medium", "hard")}
    return {p: round(100 * compute_map(ranks.T, gnd[p])[0], 2) for p in gnd}


class _Dense:
    """A stored sparse map that becomes dense (float32) when ``first_stage`` asks (``astype``), one at a time."""

    def __init__(self, m):
        self.m = m

    def astype(self, dtype):
        return self.m.dense().astype(dtype)


def _sparse_bytes(m) -> int:
    return int(sum(np.asarray(a).nbytes for a in (m.channel, m.position, m.value)))


def rerank_ranks(method, scores, qglobal, qmaps, dec, store, recipe, wh, shortlist, **kw):
    """R-MAC order re-ranked on the short list by ``method`` ("exact" or "c2f"), window R-MAC scoring."""
    ranks = np.argsort(-scores, axis=1, kind="stable")
    new = ranks.copy()
    for qi, qm in enumerate(qmaps):
        head = ranks[qi, :shortlist]
        q = qm.astype(np.float32).max(axis=(1, 2))
        common = dict(shortlist_scores=scores[qi, head], query_aspect=qm.shape[2] / qm.shape[1],
                      finalize=_finalizer(recipe, wh), finalize_batch=True, query_global=qglobal[qi],
                      levels=recipe.levels)
        if method == "exact":
            res = rerank_aml(q, [dec[j] for j in head], **common)
        else:
            res = rerank_aml_c2f(q, [dec[j] for j in head], store, head, **common, **kw)
        new[qi, :shortlist] = head[res.order]
    return new


def stage_profile(q, aspect, finalize, query_global, store, fine, dec, rows, top, radius, K, step, verify,
                  rounds) -> dict:
    """Per-stage CPU time (``time.process_time``, ms per map) of one query through the same steps as
    ``rerank_aml_c2f``'s cached path (``fine=``, maps not read)."""
    from instance_search.rerank.aml import prepare_rerank, score_windows
    from instance_search.rerank.aml_c2f import _FineWindows, fine_candidates
    from instance_search.rerank.aml_fast import aml_fast_search

    T: dict[str, float] = {}

    def t(k, f):
        c0 = time.process_time()
        r = f()
        T[k] = T.get(k, 0.0) + time.process_time() - c0
        return r

    n = len(rows)
    qt, _, _, qg, _ = prepare_rerank(q, [], finalize, query_global, None)
    *_, props, pok = t("coarse search", lambda: aml_fast_search(store, rows, q, K=K, query_aspect=aspect, step=step,
                                                                exact_score=False, top=top))
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(int(v) for v in store.shapes[r]), []).append(i)
    parts = {hw: t("candidate lists", lambda: fine_candidates(*hw, props[idx], pok[idx], radius, 3, aspect, 1.1))
             for hw, idx in groups.items()}
    m = max(c.shape[1] for c, _ in parts.values())
    cand, ncand = np.zeros((n, m, 4), np.int64), np.zeros(n, np.int64)
    for hw, idx in groups.items():
        cand[idx, :parts[hw][0].shape[1]], ncand[idx] = parts[hw]
    edges, best, _, _ = t("fine search (compiled: candidates, verify, refinement)",
                          lambda: fine.search(rows, q, cand, ncand, 3, rounds, verify))
    wins = np.stack([edges[:, 0], edges[:, 1], edges[:, 2] - edges[:, 0], edges[:, 3] - edges[:, 1]], 1)
    scores, vectors = np.zeros(n), [None] * n
    for idx in groups.values():
        t("window R-MAC scoring", lambda: score_windows([None] * n, idx, wins[idx], best[idx],
                                                        _FineWindows(fine, rows[idx]), qt, scores, vectors,
                                                        finalize=finalize, query_global=qg, levels=3,
                                                        finalize_batch=True))
    out = {k: round(1e3 * v / n, 3) for k, v in T.items()}
    out["total"] = round(1e3 * sum(T.values()) / n, 3)
    out["candidates_per_map"] = round(float(ncand.mean()), 1)
    out["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tops", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--radii", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rounds", type=int, nargs="+", default=[15],
                    help="refinement rounds (exact AML: 15)")
    ap.add_argument("--fine-tops", nargs="+", default=["200"],
                    help="maps of the short list that go through the fine stage, best coarse score first "
                         "('none': all); one run per value")
    ap.add_argument("--fine-rules", nargs="+", default=["mixed"], choices=["mixed", "coarse", "shortlist"],
                    help="how the fine_top maps are chosen (rerank_aml_c2f's fine_rule); one run per value")
    ap.add_argument("--distractors", type=Path, default=None,
                    help="accuracy: an index of ANOTHER collection (same backbone, stored maps) whose images join "
                         "the database as distractors, e.g. benchmarks/cache/ukbench-index")
    ap.add_argument("--distractor-count", type=int, default=762,
                    help="how many of its images (238 + 762 = a 1000-map short list)")
    ap.add_argument("--verify", type=int, default=8,
                    help="fine candidates scored exactly per map after the fast ranking (0: all)")
    ap.add_argument("--no-accuracy", action="store_true", help="speed part only")
    ap.add_argument("--stages", action="store_true",
                    help="also time each stage of one query (first setting, cached path), ms per map")
    ap.add_argument("--uncached", action="store_true",
                    help="also time each setting from decoded maps (their fine maps built per query) and from "
                         "compact codes decoded on demand")
    ap.add_argument("--no-speed", action="store_true", help="accuracy part only")
    ap.add_argument("--K", type=int, default=512)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--speed-shortlist", type=int, default=1000)
    ap.add_argument("--speed-queries", type=int, default=3)
    ap.add_argument("--exact-speed", action="store_true", help="also time exact AML on the speed short list")
    ap.add_argument("--whitening-index", type=Path, default=None,
                    help="index of ANOTHER collection whose R-MAC regions train the whitening (as the product)")
    ap.add_argument("--max-size", type=int, default=1024)
    ap.add_argument("--backbone", default="vgg16", help="the maps' backbone (vgg16: conv5_3, the figures in docs)")
    ap.add_argument("--db-limit", type=int, default=None, help="smoke runs: first N database images only")
    ap.add_argument("--queries", type=int, default=None, help="smoke runs: first N queries only")
    ap.add_argument("--out", type=Path, default=RESULTS / "aml_c2f.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = load_benchmark("rparis6k")
    recipe = Recipe("rmac", backbone=args.backbone, max_size=args.max_size)
    db, queries, _ = benchmark_items(bench)
    qsel = list(range(len(queries) if args.queries is None else min(args.queries, len(queries))))
    if args.db_limit is not None:
        db = db[:args.db_limit]
    qmaps = [m.astype(np.float32) for m in extract_maps([queries[i] for i in qsel], recipe, cache_dir=CACHE,
                                                        desc="query crops")]
    dbmaps = extract_maps(db, recipe, cache_dir=CACHE, desc="database")
    codes = [encode_map(m.astype(np.float32)) for m in dbmaps]  # the default compact code, as the index stores
    dec = [decode_sparse(c) for c in codes]
    fine_tops = [None if v == "none" else int(v) for v in args.fine_tops]
    settings = [(t, r, k, (f, rule)) for t in args.tops for r in args.radii for k in args.rounds for f in fine_tops
                for rule in (args.fine_rules if f is not None else args.fine_rules[:1])]
    n_paris = len(dec)  # the speed short list repeats these (1024-px maps)
    distractors = None
    if args.distractors is not None:
        from instance_search.collection import Collection

        dcol = Collection.open(args.distractors)
        if dcol.recipe.backbone != recipe.backbone or dcol.recipe.layer != recipe.layer:
            raise SystemExit(f"{args.distractors}: {dcol.recipe.backbone} maps, the benchmark uses {recipe.backbone}")
        dids = [int(i) for i in dcol.store.ids()[:args.distractor_count]]
        dsparse = dcol.store.feature_maps(dids, sparse=True)
        dec = dec + list(dsparse)
        dbmaps = list(dbmaps) + [_Dense(m) for m in dsparse]
        distractors = {"index": str(args.distractors), "images": len(dids),
                       "map_cells": sorted({tuple(int(v) for v in m.shape[1:]) for m in dsparse})}
    out = {"benchmark": bench.summary(), "backbone": f"{args.backbone} {recipe.layer or '(default layer)'}", "max_size": args.max_size,
           "maps": "compact default", "threads": 1, "goal_seconds": GOAL_SECONDS, "goal_map_drop": GOAL_MAP_DROP,
           "coarse": {"K": args.K, "g": args.g, "step": args.step}, "verify": args.verify,
           "db_images": len(db), "queries": len(qsel), "distractors": distractors,
           "loadavg_1min_start": round(os.getloadavg()[0], 2)}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    # ---- speed: a speed_shortlist-map short list (the database maps repeated)
    n = args.speed_shortlist
    idx = np.asarray([i % n_paris for i in range(n)], np.int64)
    c0 = time.process_time()
    store = AMLInvertedMaps.build(dec[:n_paris], g=args.g)  # one row per database image; the short list repeats
    build = time.process_time() - c0
    c0 = time.process_time()
    fine = AMLFineMaps.build(dec[:n_paris])
    fine_build = time.process_time() - c0
    speed = {"shortlist": n, "store_build_cpu_ms_per_image": round(1e3 * build / len(dec), 3),
             "store_ram_bytes_per_image": round(store.nbytes / len(dec)),
             "fine_maps_build_cpu_ms_per_image": round(1e3 * fine_build / len(dec), 3),
             "fine_maps_ram_bytes_per_image": round(fine.nbytes / n_paris),
             "fine_cells_per_image": round(float(np.mean(np.diff(fine.offsets)))),
             "decoded_map_ram_bytes_per_image": round(float(np.mean([_sparse_bytes(m) for m in dec[:n_paris]]))),
             "compact_code_bytes_per_image": round(float(np.mean([len(c) for c in codes]))), "runs": []}
    rows = idx
    nq = min(args.speed_queries, len(qmaps))

    def timed(fn):
        cpu, loads = [], []
        for qi in range(nq):
            c0 = time.process_time()
            fn(qi)
            cpu.append(time.process_time() - c0)
            loads.append(os.getloadavg()[0])
        return round(float(np.median(cpu)), 4), round(float(np.median(loads)), 2)

    def kw(qi):
        qm = qmaps[qi]
        return dict(query_aspect=qm.shape[2] / qm.shape[1], finalize=_finalizer(recipe, None), finalize_batch=True,
                    query_global=qglobal0[qi], levels=recipe.levels)

    if not args.no_speed:
        qlocal, dblocal, _, scores0, qglobal0 = first_stage(recipe, qmaps, dbmaps, None)
        rerank_aml_c2f(qmaps[0].max(axis=(1, 2)), None, store, rows[:2], fine=fine, **kw(0))  # compile (Numba)
        decode_s, _ = timed(lambda qi: [decode_sparse(codes[i]) for i in idx])
        speed["decode_cpu_seconds_per_query"] = decode_s
        maps = [dec[i] for i in idx]
        for top, radius, rounds, ftop in settings:
            c = dict(top=top, radius=radius, K=args.K, step=args.step, refine_rounds=rounds, fine_top=ftop[0],
                     fine_rule=ftop[1])
            s, load = timed(lambda qi: rerank_aml_c2f(qmaps[qi].max(axis=(1, 2)), None, store, rows, fine=fine,
                                                      verify=args.verify, **c, **kw(qi)))
            run = {"top": top, "radius": radius, "refine_rounds": rounds, "fine_top": ftop[0], "fine_rule": ftop[1],
                   "verify": args.verify,
                   "cached_fine_maps_cpu_seconds_per_query": s, "loadavg_1min": load}
            msg = (f"c2f top={top} radius={radius} rounds={rounds} fine_top={ftop}: {s} s CPU/query from the cached "
                   f"fine maps")
            if args.uncached:
                s2, load2 = timed(lambda qi: rerank_aml_c2f(qmaps[qi].max(axis=(1, 2)), maps, store, rows,
                                                            verify=args.verify, **c, **kw(qi)))
                # the re-ranker's path without fine maps in RAM: only the maps the fine stage reads are decoded
                s3, load3 = timed(lambda qi: rerank_aml_c2f(qmaps[qi].max(axis=(1, 2)),
                                                            lambda pos: [decode_sparse(codes[idx[p]]) for p in pos],
                                                            store, rows, verify=args.verify, **c, **kw(qi)))
                run.update(decoded_maps_cpu_seconds_per_query=s2, with_decoding_cpu_seconds_per_query=
                           round(s2 + decode_s, 4), loadavg_1min_uncached=load2,
                           decoding_what_it_reads_cpu_seconds_per_query=s3, loadavg_1min_loader=load3)
                msg += (f"; {s2} s from decoded maps (fine maps built per query), {s2 + decode_s:.3f} s with decoding"
                        f"; {s3} s decoding only the maps the fine stage reads")
            speed["runs"].append(run)
            print(msg + f" (load {load})", flush=True)
            out["speed"] = speed
            save()
        if args.stages:
            top, radius, rounds, _ = settings[0]
            qm = qmaps[0]
            speed["stages_ms_per_map"] = {"top": top, "radius": radius, "refine_rounds": rounds, "fine_top": None,
                                          **stage_profile(
                qm.max(axis=(1, 2)), qm.shape[2] / qm.shape[1], _finalizer(recipe, None), qglobal0[0], store, fine, dec,
                rows, top, radius, args.K, args.step, args.verify, rounds)}
            print("stages (ms per map):", speed["stages_ms_per_map"], flush=True)
        if args.exact_speed:
            s, load = timed(lambda qi: rerank_aml(qmaps[qi].max(axis=(1, 2)), maps, **kw(qi)))
            speed["exact_aml"] = {"rerank_cpu_seconds_per_query": s, "with_decoding_cpu_seconds_per_query":
                                  round(s + decode_s, 4), "loadavg_1min": load}
            print(f"exact AML: {s} s CPU/query from decoded maps (load {load})", flush=True)
        out["speed"] = speed
        save()
    if args.no_accuracy:
        print(f"wrote {args.out}")
        return

    # ---- accuracy, without and with whitening (store and fine maps: one row per database image, distractors too)
    if len(dec) > n_paris:
        store, fine = AMLInvertedMaps.build(dec, g=args.g), AMLFineMaps.build(dec)
    sl = min(args.shortlist, len(dec))
    out["accuracy"] = []
    for wi in [None] + ([args.whitening_index] if args.whitening_index else []):
        _, _, wh, scores, qglobal = first_stage(recipe, qmaps, dbmaps, wi)
        row = {"whitening": "none" if wh is None else wh.trained_on, "shortlist": sl,
               "rmac": _map(np.argsort(-scores, axis=1, kind="stable"), bench, qsel)}
        row["exact_aml"] = _map(rerank_ranks("exact", scores, qglobal, qmaps, dec, store, recipe, wh, sl), bench, qsel)
        print(f"[{row['whitening']}] R-MAC {row['rmac']}, exact AML {row['exact_aml']}", flush=True)
        row["c2f"] = []
        for top, radius, rounds, ftop in settings:
            m = _map(rerank_ranks("c2f", scores, qglobal, qmaps, dec, store, recipe, wh, sl, top=top, radius=radius,
                                  K=args.K, step=args.step, refine_rounds=rounds, verify=args.verify, fine=fine,
                                  fine_top=ftop[0], fine_rule=ftop[1]), bench, qsel)
            drop = {p: round(row["exact_aml"][p] - m[p], 2) for p in m}
            row["c2f"].append({"top": top, "radius": radius, "refine_rounds": rounds, "fine_top": ftop[0],
                               "fine_rule": ftop[1],
                               "verify": args.verify, "map": m,
                               "drop_vs_exact": drop, "meets_map_goal": all(d <= GOAL_MAP_DROP for d in drop.values())})
            print(f"  c2f top={top} radius={radius} rounds={rounds} fine_top={ftop}: {m} (below exact AML by {drop})",
                  flush=True)
        out["accuracy"].append(row)
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
