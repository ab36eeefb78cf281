"""Off-the-shelf vs learned R-MAC (Gordo et al. 2016, "Deep Image Retrieval", Sec. 3.1) on the evaluation split.

Trains learned R-MAC (VGG16; conv5_1-3 + shift/FC trained, conv1-pool4 frozen and cached) with the triplet ranking
loss and hard triplets on the training split (Holidays-811 + UKBench images 0-499), then compares, on the
evaluation split (UKBench images 500-999, every image a query: N-S and mAP; Paris-250, queries cropped to their
boxes: revisited Easy/Medium/Hard mAP):

* R-MAC without whitening (ImageNet VGG16);
* R-MAC + PCA-whitening learned on the training split's regions = the network before training (off-the-shelf);
* learned R-MAC after each epoch.

The frozen layers' outputs are cached in benchmarks/cache/learned_rmac/ and training checkpoints kept there, so a
re-run only re-scores (or resumes an interrupted training). Prints the table and the seconds per epoch, writes
benchmarks/results/learned_rmac.json and benchmarks/results/loss_curve.png.

    OMP_NUM_THREADS=1 ISEARCH_THREADS=1 python benchmarks/bench_learned_rmac.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from instance_search.backbones import load_backbone
from instance_search.backbones.fast import use_engine
from instance_search.eval.datasets import splits
from instance_search.io import atomic_write_bytes
from instance_search.nets.rmac_head import RMACNet, fit_head_whitening, learned_rmac, load_model
from instance_search.train.triplet import InputCache, TrainConfig, TripletTrainer, plot_loss_curve

HERE = Path(__file__).resolve().parent


def describe(net: RMACNet, cache, plain: bool = False, desc: str = "") -> np.ndarray:
    """(N, D) descriptors of the cached inputs: the network's learned R-MAC, or (``plain``) also the unwhitened
    R-MAC of the same conv maps -> returns (learned, plain) then."""
    from tqdm.auto import tqdm

    net.eval()
    out = np.zeros((len(cache), net.head.out_dim), np.float32)
    raw = np.zeros((len(cache), 512), np.float32) if plain else None
    with torch.no_grad():
        for i, fmap in tqdm(net.conv_maps(cache, batch=8), total=len(cache), desc=desc, unit="img",
                            file=sys.stderr, dynamic_ncols=True):
            out[i] = net.head(fmap).numpy()
            if plain:
                raw[i] = learned_rmac(fmap, levels=net.head.levels).numpy()
    return (out, raw) if plain else out


def evaluate(bench, db: np.ndarray, q: np.ndarray) -> dict:
    res = bench.evaluate(q @ db.T)
    keep = ("ns", "map") if bench.protocol == "ukbench" else ("map_easy", "map_medium", "map_hard")
    return {k: round(float(res[k]), 4 if k == "ns" else 2) for k in keep}


def print_map_table(rows: list[dict], width: int = 62, epoch: bool = False) -> None:
    """The mAP table of rows ``{"method", "ukbench_500_999": {ns, map}, "paris250": {map_easy, ...}}``."""
    ep = f" {'ep':>3}" if epoch else ""
    print(f"{'method':<{width}}{ep} {'UKB N-S':>8} {'UKB mAP':>8} {'Paris E':>8} {'M':>6} {'H':>6}")
    for r in rows:
        u, p = r["ukbench_500_999"], r["paris250"]
        e = f" {'' if r.get('epoch') is None else r['epoch']:>3}" if epoch else ""
        print(f"{r['method']:<{width}}{e} {u['ns']:>8.3f} {u['map']:>8.2f} {p['map_easy']:>8.2f} "
              f"{p['map_medium']:>6.2f} {p['map_hard']:>6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=256, help="max side of the training images")
    ap.add_argument("--ukb-size", type=int, default=384, help="max side of the UKBench evaluation images")
    ap.add_argument("--paris-size", type=int, default=512, help="max side of the Paris images (and query crops)")
    ap.add_argument("--train-layers", default="conv5")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--remine-every", type=int, default=16, help="updates per mining if every mined triplet were active (about a quarter is: ~4 updates)")
    ap.add_argument("--mine-pool", type=int, default=0, help="0: negatives from the whole training split")
    ap.add_argument("--anchors-per-epoch", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="winograd", help="engine of the frozen layers (exact | winograd)")
    ap.add_argument("--cache", type=Path, default=HERE / "cache" / "learned_rmac")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "learned_rmac.json")
    ap.add_argument("--curve", type=Path, default=HERE / "results" / "loss_curve.png")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint of the same settings")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ISEARCH_THREADS", os.cpu_count() or 1)))
    t_start, c_start = time.perf_counter(), time.process_time()

    # ---------------------------------------------------------------- data: the one split, asserted disjoint
    ts = splits.training_set()
    ukb, paris = splits.ukbench_eval(), splits.paris_eval()
    splits.assert_disjoint(ts.paths, list(ukb.images) + list(paris.images) + list(paris.query_paths))
    print(f"training: {len(ts)} images, {len(set(ts.labels.tolist()))} groups; evaluation: {ukb.summary()}; "
          f"{paris.summary()}", flush=True)

    bb = load_backbone("vgg16")
    use_engine(bb, args.engine)
    layer = RMACNet(args.train_layers).input_layer
    timings = {}
    t0 = time.perf_counter()
    train_in = InputCache.build([(p, None) for p in ts.paths], bb, layer, args.train_size, args.cache,
                                desc=f"training images -> {layer}")
    ukb_in = InputCache.build([(p, None) for p in ukb.images], bb, layer, args.ukb_size, args.cache,
                              desc=f"UKBench 500-999 -> {layer}")
    par_db = InputCache.build([(p, None) for p in paris.images], bb, layer, args.paris_size, args.cache,
                              desc=f"Paris-250 -> {layer}")
    par_q = InputCache.build(list(zip(paris.query_paths, paris.query_boxes)), bb, layer, args.paris_size,
                             args.cache, desc=f"Paris queries (box crops) -> {layer}")
    timings["cache_frozen_layers_s"] = round(time.perf_counter() - t0, 1)

    def eval_net(net: RMACNet, plain: bool = False) -> dict:
        t = time.perf_counter()
        ukb_d = describe(net, ukb_in, plain, "UKBench 500-999")
        pdb = describe(net, par_db, plain, "Paris-250")
        pq = describe(net, par_q, plain, "Paris queries")
        rows = {}
        variants = [("learned", 0), ("plain", 1)] if plain else [("learned", None)]
        for name, k in variants:
            u, d, q = (ukb_d, pdb, pq) if k is None else (ukb_d[k], pdb[k], pq[k])
            rows[name] = {"ukbench_500_999": evaluate(ukb, u, u), "paris250": evaluate(paris, d, q)}
        rows["seconds"] = round(time.perf_counter() - t, 1)
        return rows

    # ---------------------------------------------------------------- the network before training
    net = RMACNet(args.train_layers).init_from_backbone(bb)
    t0 = time.perf_counter()
    w = fit_head_whitening(net, train_in, trained_on=f"training split ({len(ts)} images) at {args.train_size} px")
    timings["pca_s"] = round(time.perf_counter() - t0, 1)
    print(f"PCA-whitening: {w.n_samples} regional vectors of the training split -> {w.dim}-D", flush=True)
    before = eval_net(net, plain=True)
    results = [
        {"method": "R-MAC, no whitening (ImageNet VGG16)", "epoch": None, **before["plain"]},
        {"method": "R-MAC + PCA-whitening of the training split (= the network before training)", "epoch": 0,
         **before["learned"]},
    ]
    for r in results:
        print(json.dumps(r), flush=True)

    # ---------------------------------------------------------------- training
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                      margin=args.margin, batch=args.batch, micro_batch=args.micro_batch,
                      remine_every=args.remine_every, mine_pool=args.mine_pool,
                      anchors_per_epoch=args.anchors_per_epoch, seed=args.seed)
    key = hashlib.sha256(json.dumps({"cfg": cfg.comparable(), "layers": args.train_layers, "size": args.train_size,
                                     "engine": args.engine, "cache": str(train_in.folder.name)},
                                    sort_keys=True).encode()).hexdigest()[:12]
    ckpt_dir = args.cache / f"run-{key}"
    if args.fresh and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    info = {"trained_on": f"training split: Holidays-811 + UKBench 0-499 ({len(ts)} images)",
            "max_size": args.train_size, "engine": args.engine}
    trainer = TripletTrainer(net, train_in, ts.labels, cfg, ckpt_dir, info=info)
    history = trainer.fit(resume=True)
    for e in history["epochs"]:
        print(f"epoch {e['epoch'] + 1}: {e['seconds']:.0f} s wall, {e.get('cpu_seconds', 0):.0f} s CPU "
              f"({e['updates']} updates; mining {e['mine_seconds']:.0f} s, updates {e['train_seconds']:.0f} s); "
              f"mean batch loss {e['mean_batch_loss']:.4f}, mean mined loss {e['mean_mined_loss']:.4f}", flush=True)

    # ---------------------------------------------------------------- the trained network, after each epoch
    for e in range(1, args.epochs + 1):
        trained, _ = load_model(ckpt_dir / f"epoch-{e:03d}.pt")
        row = {"method": f"learned R-MAC (triplet loss, {args.train_layers} + shift/FC trained)", "epoch": e,
               **eval_net(trained)["learned"]}
        results.append(row)
        print(json.dumps(row), flush=True)

    args.curve.parent.mkdir(parents=True, exist_ok=True)
    plot_loss_curve(history, args.curve, title=f"learned R-MAC on the training split ({len(ts)} images, "
                                                f"{args.train_size} px): triplet loss, m={args.margin}")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
        "training_split": info["trained_on"], "evaluation": ["UKBench images 500-999 (every image a query)",
                                                             "Paris-250, 12 queries cropped to their boxes"],
        "sizes": {"train": args.train_size, "ukbench": args.ukb_size, "paris": args.paris_size},
        "frozen_layers_engine": args.engine, "train_layers": args.train_layers, "config": vars(cfg),
        "pca": f"{w.n_samples} regional vectors -> {w.dim}-D", "checkpoints": str(ckpt_dir),
        "seconds_per_epoch": [round(e["seconds"], 1) for e in history["epochs"]],
        "cpu_seconds_per_epoch": [round(e.get("cpu_seconds", 0.0), 1) for e in history["epochs"]],
        "updates_per_epoch": [e["updates"] for e in history["epochs"]],
        "mean_mined_loss_per_epoch": [round(e["mean_mined_loss"], 5) for e in history["epochs"]],
        "timings": timings, "this_run_wall_s": round(time.perf_counter() - t_start, 1),
        "this_run_cpu_s": round(time.process_time() - c_start, 1),
        "comparable": False,
        "note": "subsets of UKBench and Paris6k: real measurements, not comparable with published tables",
    }
    atomic_write_bytes(args.out, json.dumps({"meta": meta, "results": results}, indent=1, default=str).encode())

    print()
    print_map_table(results, 82, epoch=True)
    print(f"seconds per epoch (wall): {meta['seconds_per_epoch']}; CPU: {meta['cpu_seconds_per_epoch']}")
    print(f"wrote {args.out} and {args.curve}")


if __name__ == "__main__":
    main()
