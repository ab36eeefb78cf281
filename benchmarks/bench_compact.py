"""Compact conv maps: bytes per image vs fidelity of R-MAC + AML re-ranking (Tolias, Sicre & Jégou 2016, Sec. 7).

On the 238 Paris-250 database maps (VGG16 conv5_3, images at max side 1024 px, 64×48×512, float maps cached by
bench_aml.py), for each compact setting ``RHO:TOP:LEVELS[:geo][:log8][:cellB][:floorF]`` (``geo``: geometric
level spacing, ``log8``: channel maxima as 8-bit log codes, ``cellB``/``floorF``: also the cells >= B × the
strongest channel at that cell, down to F × their channel's maximum; all format CMP3) against the float maps:

* size: mean / max bytes per map, encode and decode single-thread CPU time (``time.process_time``);
* STANDARD PROTOCOL: revisited Paris E / M / H mAP of R-MAC + AML re-ranking of a short list (bench_aml.py's
  ``rerank_map``, the 12 box-cropped queries of Paris-250; the same re-ranking is repeated here per query and
  checked to give rerank_map's figures on the float maps), with per-query AP differences (one query moves
  Easy mAP by up to 8 points: a noisy measure of fidelity);
* PROXY (many queries, not a standard protocol): every database image that is a positive of some query, used
  as a query (the full image; float map on the query side, as at search time), relevant = the positives
  (easy + hard) of the queries of its landmark, junk = their junk and the query itself; R-MAC ranking, then
  AML re-ranking of the short list with float vs compact database maps; mAP, mean AP difference with its
  standard error, and the number of queries whose AP moved;
* window vectors: on the windows AML found with the float maps, the cosine between the window R-MAC (whitened,
  L2) pooled from the float map and from the compact map.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compact.py --whitening-index IDX \\
        --compact 0.3:64:8 0.25:64:8 [--proxy-every 1] [--out benchmarks/results/compact.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_aml import CACHE, RESULTS, _finalizer, first_stage, rerank_map, rerank_ranks  # noqa: E402

from instance_search.eval.runner import benchmark_items, extract_maps  # noqa: E402
from instance_search.eval.datasets.benchmarks import load_benchmark  # noqa: E402
from instance_search.eval.metrics import compute_map  # noqa: E402
from instance_search.index.compact import decode_sparse, encode_map  # noqa: E402
from instance_search.ops.integral import sparse_batch  # noqa: E402
from instance_search.ops.pooling import rmac_regions  # noqa: E402
from instance_search.recipes.base import Recipe  # noqa: E402


def parse_setting(s: str) -> dict:
    """``RHO:TOP:LEVELS[:geo][:log8][:v2][:cellB][:floorF]`` (TOP ``none``: no cap; ``cellB``: also keep cells
    >= B × the strongest channel at that cell, down to ``floorF`` × the channel max) → :func:`encode_map`
    keyword arguments."""
    p = s.split(":")
    if len(p) < 3:
        raise ValueError(f"compact setting {s!r}: expected RHO:TOP:LEVELS[:geo][:log8][:v2][:cellB][:floorF]")
    kw = {"rho": float(p[0]), "top": None if p[1] == "none" else int(p[1]), "levels": int(p[2]),
          "spacing": "linear", "log_max": False, "version": 3}
    for f in p[3:]:
        if f == "geo":
            kw["spacing"] = "geometric"
        elif f == "log8":
            kw["log_max"] = True
        elif f == "v2":
            kw["version"] = 2
        elif f.startswith("cell"):
            kw["cell_rho"] = float(f[4:])
        elif f.startswith("floor"):
            kw["floor"] = float(f[5:])
        else:
            raise ValueError(f"compact setting {s!r}: unknown flag {f!r}")
    return kw


def window_vectors(maps, wins, recipe, wh) -> np.ndarray:
    """Window R-MAC (finalized: L2, whitening, sum, L2) of ``wins[i]`` (x, y, w, h) in ``maps[i]`` (one image
    each), pooled with the α = 10 approximation from the map's non-zeros as AML scores them."""
    out = []
    for m, (x, y, w, h) in zip(maps, wins):
        r = rmac_regions(int(h), int(w), levels=recipe.levels) + np.array([x, y, 0, 0])
        v = sparse_batch([m]).window_vectors(r[None]).numpy()[0]
        out.append(v)
    return np.asarray(_finalizer(recipe, wh)(out), dtype=np.float64)


def landmark_proxy(bench):
    """Proxy queries: (database index, {'ok', 'junk'}) for every database image that is an easy/hard positive
    of some query; relevant = the positives of all queries of the same landmark(s)."""
    lm = [Path(p).stem.split("_")[1] for p in bench.query_paths]
    pos, junk = {}, {}
    for name, g in zip(lm, bench.gnd):
        pos.setdefault(name, set()).update(int(i) for i in list(g.get("easy", [])) + list(g.get("hard", [])))
        junk.setdefault(name, set()).update(int(i) for i in g.get("junk", []))
    out = []
    for i in sorted(set().union(*pos.values())):
        names = [n for n in pos if i in pos[n]]
        ok = set().union(*(pos[n] for n in names)) - {i}
        jk = (set().union(*(junk[n] for n in names)) - ok) | {i}
        out.append((i, {"ok": np.array(sorted(ok), np.int64), "junk": np.array(sorted(jk), np.int64)}))
    return out


def ap_diff_stats(ap_c: np.ndarray, ap_f: np.ndarray) -> dict:
    d = 100 * (ap_c - ap_f)
    return {"mean_ap_diff": round(float(d.mean()), 3),
            "stderr_ap_diff": round(float(d.std(ddof=1) / np.sqrt(len(d))), 3) if len(d) > 1 else None,
            "queries_up": int((d > 1e-9).sum()), "queries_down": int((d < -1e-9).sum()),
            "queries_same": int((np.abs(d) <= 1e-9).sum()), "largest_drop": round(float(d.min()), 2),
            "largest_gain": round(float(d.max()), 2)}


def meets_goal(row: dict) -> bool:
    """The issue's goal: <= 16 kB per map on average, and no mAP loss beyond 0.2 against the float maps on each
    of E / M / H (standard protocol) and on the proxy."""
    return bool(row["bytes_per_image_mean"] <= 16000 and min(row["standard_protocol_diff"].values()) >= -0.2
                and row["proxy_map_diff"] >= -0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compact", nargs="*", default=["0.3:64:8"],
                    metavar="RHO:TOP:LEVELS[:geo][:log8][:cellB][:floorF]")
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--whitening-index", type=Path, default=None,
                    help="index of ANOTHER collection whose R-MAC regions train the whitening (as bench_aml.py)")
    ap.add_argument("--proxy-every", type=int, default=1, help="use every n-th proxy query")
    ap.add_argument("--cos-every", type=int, default=4, help="window cosines on every n-th proxy query ...")
    ap.add_argument("--cos-top", type=int, default=20, help="... and its top n re-ranked images")
    ap.add_argument("--max-size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=RESULTS / "compact.json")
    ap.add_argument("--append", action="store_true", help="keep the other settings already in --out")
    ap.add_argument("--merge", nargs="*", default=[], type=Path,
                    help="also keep the settings of these result files (same float reference required)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = [(s, parse_setting(s)) for s in args.compact]
    bench = load_benchmark("rparis6k")
    recipe = Recipe("rmac", backbone="vgg16", max_size=args.max_size)
    db, queries, _ = benchmark_items(bench)
    qmaps = extract_maps(queries, recipe, cache_dir=CACHE, desc="query crops")
    dbmaps = extract_maps(db, recipe, cache_dir=CACHE, desc="database")
    qlocal, dblocal, wh, scores, qglobal = first_stage(recipe, qmaps, dbmaps, args.whitening_index)
    protocols = ("easy", "medium", "hard")
    out = {"benchmark": bench.summary(), "maps": len(dbmaps), "map_shape_example": list(dbmaps[0].shape),
           "whitening": "none" if wh is None else wh.trained_on, "shortlist": args.shortlist,
           "float16_bytes_per_image": int(np.mean([m.size * 2 for m in dbmaps]))}
    # proxy: database images as full-image queries against the other database images
    proxy = landmark_proxy(bench)[::args.proxy_every]
    pq = np.array([i for i, _ in proxy])
    pgnd = [g for _, g in proxy]
    dbg = recipe.finalize(dblocal, wh)
    pscores = dbg[pq] @ dbg.T
    pscores[np.arange(len(pq)), pq] = -np.inf  # the query itself last (and junk)
    pqmaps = [dbmaps[i] for i in pq]
    key = hashlib.sha256(json.dumps([out["whitening"], args.shortlist, args.proxy_every, args.cos_every, args.cos_top,
                                     args.max_size, pq.tolist()]).encode()).hexdigest()[:16]
    cache = CACHE / f"compact-float-{key}.npz"
    if cache.exists():  # the float-map reference of an earlier run with the same protocol
        z = np.load(cache)
        ref = {k: z[k] for k in z.files}
        fl = json.loads(str(ref.pop("summary")))
        print(f"float-map reference from {cache}")
    else:
        t0 = time.process_time()
        std_float = rerank_map(bench, scores, qglobal, qmaps, dbmaps, recipe, wh, args.shortlist)
        ranks_f, _, _ = rerank_ranks(scores, qglobal, qmaps, dbmaps, recipe, wh, args.shortlist, "standard, float")
        ref = {f"aps_{p}": compute_map(ranks_f.T, bench.ok_gnd(p))[1] for p in protocols}
        check = {p: round(100 * float(np.nanmean(ref[f"aps_{p}"])), 2) for p in protocols}
        if check != std_float:
            raise RuntimeError(f"per-query re-ranking {check} differs from bench_aml.rerank_map {std_float}")
        base_p = compute_map(np.argsort(-pscores, axis=1, kind="stable").T, pgnd)
        ranks_pf, heads_p, boxes_p = rerank_ranks(pscores, dbg[pq], pqmaps, dbmaps, recipe, wh, args.shortlist,
                                                  "proxy, float")
        map_pf, ref["aps_proxy"] = compute_map(ranks_pf.T, pgnd)[:2]
        ref["ranks_proxy"] = ranks_pf
        # windows for the cosine check: the float-map AML windows of the top cos_top of every cos_every-th query
        cos_items = []
        for k in range(0, len(pq), args.cos_every):
            order = [int(np.flatnonzero(heads_p[k] == j)[0]) for j in ranks_pf[k, :args.cos_top]]
            cos_items += [(int(heads_p[k][i]), boxes_p[k][i]) for i in order]
        ref["cos_img"] = np.array([j for j, _ in cos_items])
        ref["cos_win"] = np.array([b for _, b in cos_items])
        ref["G_float"] = window_vectors([dbmaps[j] for j in ref["cos_img"]], ref["cos_win"], recipe, wh)
        fl = {"standard_protocol_map": std_float, "standard_rmac_only": {
            p: round(100 * compute_map(np.argsort(-scores, axis=1).T, bench.ok_gnd(p))[0], 2) for p in protocols},
            "proxy_map": round(100 * map_pf, 2), "proxy_rmac_only_map": round(100 * base_p[0], 2),
            "proxy_queries": len(pq), "cpu_seconds": round(time.process_time() - t0, 1)}
        np.savez(cache, summary=json.dumps(fl), **ref)
    out["float"] = fl
    std_float = fl["standard_protocol_map"]
    aps_f = {p: ref[f"aps_{p}"] for p in protocols}
    aps_pf, ranks_pf, G_float = ref["aps_proxy"], ref["ranks_proxy"], ref["G_float"]
    cos_img, cos_win = ref["cos_img"], ref["cos_win"]
    map_pf = float(np.nanmean(aps_pf))
    print(f"float maps: STANDARD E/M/H {std_float}; PROXY ({len(pq)} queries) mAP {fl['proxy_map']} "
          f"(R-MAC alone {fl['proxy_rmac_only_map']})", flush=True)
    old = json.loads(args.out.read_text()) if args.append and args.out.exists() else {}
    same = ("standard_protocol_map", "proxy_map", "proxy_queries")
    if old and any(old.get("float", {}).get(k) != out["float"][k] for k in same):
        raise SystemExit(f"--append: {args.out} was measured with another float reference; use another --out")
    out["settings"] = [r for r in old.get("settings", []) if r["setting"] not in dict(settings)]
    for path in args.merge:  # rows of other runs against the same float reference (e.g. run side by side)
        other = json.loads(Path(path).read_text())
        if any(other.get("float", {}).get(k) != out["float"][k] for k in same):
            raise SystemExit(f"--merge: {path} was measured with another float reference")
        names = {r["setting"] for r in out["settings"]} | set(dict(settings))
        out["settings"] += [r for r in other.get("settings", []) if r["setting"] not in names]
    for name, kw in settings:
        t = time.process_time()
        codes = [encode_map(m.astype(np.float32), **kw) for m in tqdm(dbmaps, desc=f"encode {name}", leave=False)]
        t_enc = time.process_time() - t
        t, w, load = time.process_time(), time.perf_counter(), os.getloadavg()[0]
        dec = [decode_sparse(c) for c in codes]
        t_dec, w_dec = time.process_time() - t, time.perf_counter() - w
        # the same re-ranking as bench_aml.rerank_map (checked equal on the float maps above), kept per query
        ranks_c, _, _ = rerank_ranks(scores, qglobal, qmaps, dec, recipe, wh, args.shortlist, f"standard, {name}")
        aps_c = {p: compute_map(ranks_c.T, bench.ok_gnd(p))[1] for p in protocols}
        std = {p: round(100 * float(np.nanmean(aps_c[p])), 2) for p in protocols}
        per_query = {p: [round(float(100 * d), 2) for d in aps_c[p] - aps_f[p]] for p in protocols}
        ranks_pc, _, _ = rerank_ranks(pscores, dbg[pq], pqmaps, dec, recipe, wh, args.shortlist, f"proxy, {name}")
        map_pc, aps_pc = compute_map(ranks_pc.T, pgnd)[:2]
        tau = [kendalltau(np.argsort(ranks_pf[k, :args.shortlist]), np.argsort(ranks_pc[k, :args.shortlist]))[0]
               if set(ranks_pf[k, :args.shortlist]) == set(ranks_pc[k, :args.shortlist]) else np.nan
               for k in range(len(pq))]
        G = window_vectors([dec[j] for j in cos_img], cos_win, recipe, wh)
        cos = (G * G_float).sum(1)
        row = {"setting": name, "encode_kwargs": kw,
               "bytes_per_image_mean": round(float(np.mean([len(c) for c in codes]))),
               "bytes_per_image_max": int(max(len(c) for c in codes)),
               "nonzeros_per_image_mean": round(float(np.mean([len(d.value) for d in dec]))),
               "encode_cpu_ms_per_map": round(1e3 * t_enc / len(codes), 2),
               "decode_cpu_ms_per_map": round(1e3 * t_dec / len(codes), 2),
               "decode_wall_ms_per_map": round(1e3 * w_dec / len(codes), 2), "loadavg_1min": round(load, 2),
               "standard_protocol_map": std,
               "standard_protocol_diff": {p: round(std[p] - std_float[p], 2) for p in protocols},
               "standard_per_query_ap_diff": per_query,
               "proxy_map": round(100 * map_pc, 2), "proxy_map_diff": round(100 * (map_pc - map_pf), 3),
               "proxy_ap_diff": ap_diff_stats(aps_pc, aps_pf),
               "proxy_shortlist_kendall_tau_mean": round(float(np.nanmean(tau)), 4),
               "window_cosine": {"pairs": len(cos), "mean": round(float(cos.mean()), 5),
                                 "p1": round(float(np.percentile(cos, 1)), 5), "min": round(float(cos.min()), 5)}}
        row["meets_goal"] = meets_goal(row)
        out["settings"].append(row)
        print(f"{name}: {row['bytes_per_image_mean']} B/map (max {row['bytes_per_image_max']}), encode "
              f"{row['encode_cpu_ms_per_map']} / decode {row['decode_cpu_ms_per_map']} ms CPU per map; STANDARD "
              f"E/M/H {std} (diff {row['standard_protocol_diff']}); PROXY mAP {row['proxy_map']} (diff "
              f"{row['proxy_map_diff']}, mean AP diff {row['proxy_ap_diff']['mean_ap_diff']} ± "
              f"{row['proxy_ap_diff']['stderr_ap_diff']}, {row['proxy_ap_diff']['queries_down']} down / "
              f"{row['proxy_ap_diff']['queries_up']} up); window cosine mean {row['window_cosine']['mean']} "
              f"(p1 {row['window_cosine']['p1']}); goal met: {row['meets_goal']}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    for row in out["settings"]:  # rows kept from earlier runs too
        row["meets_goal"] = meets_goal(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
