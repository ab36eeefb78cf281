"""Region proposal network (Gordo et al. 2016, "Deep Image Retrieval", Sec. 3.2; Ren et al. 2015) on frozen VGG16
conv5_3 features: trained on the training split's automatically estimated boxes, checked on held-out images with
ground-truth boxes, and used as R-MAC's regions.

1. Frozen features: VGG16 pool4 at max side ``--size`` (shared cache with bench_learned_rmac.py under
   benchmarks/cache/learned_rmac/), conv5_3 computed once from it with the ImageNet conv5 block and cached under
   benchmarks/cache/rpn/.
2. Training: the kept images of benchmarks/results/train_boxes.json (bench_cleaning.py; Holidays-811 + UKBench
   0-499 only -- the split is asserted disjoint from the evaluation images); ``--val-groups`` of the groups are held
   out for a validation loss / recall on automatic boxes. The samples and the trainer are the product's
   (``isearch train-rpn BOXES --out rpn.pt``: instance_search.train.rpn); the training maps are cached under
   benchmarks/cache/rpn/maps/. Checkpoint per epoch; the final model is written to
   benchmarks/cache/rpn/rpn.pt (+ .json), which bench_salvador.py uses.
3. Detection recall at IoU 0.5 / 0.7 of the top-k proposals vs the rigid R-MAC grid (Gordo Fig. 4 middle) on the
   held-out check: the 12 Paris-250 query images and the 10 Oxford query images with their ground-truth boxes
   (never trained on), and on the held-out training groups (automatic boxes).
4. mAP on the evaluation split (UKBench 500-999; Paris-250 revisited E/M/H, queries cropped to their box): R-MAC
   off the shelf (PCA-whitening learned on the training split's regions) over the grid vs over k RPN proposals,
   and the learned R-MAC of bench_learned_rmac.py (``--learned-model``) over the grid vs over the proposals.

Writes benchmarks/results/rpn.json and benchmarks/results/rpn_recall.png; prints the tables.

    OMP_NUM_THREADS=1 ISEARCH_THREADS=1 python benchmarks/bench_rpn.py
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ISEARCH_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from instance_search.eval.datasets import splits  # noqa: E402
from instance_search.eval.datasets.benchmarks import find_shared_data, load_gnd_pickle  # noqa: E402
from instance_search.io import atomic_write_bytes  # noqa: E402
from instance_search.nets.rpn import RPN, save_rpn  # noqa: E402
from instance_search.ops import boxes as B  # noqa: E402
from instance_search.train import rpn as TR  # noqa: E402
from instance_search.train.triplet import InputCache  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_learned_rmac import evaluate, print_map_table  # noqa: E402

RESULTS = HERE / "results"
CACHE = HERE / "cache" / "rpn"
POOL4_ROOT = HERE / "cache" / "learned_rmac"  # the frozen pool4 maps, shared with bench_learned_rmac.py
KS = (16, 32, 64, 128, 256)

PAPER = ("Gordo et al. 2016 (Fig. 4 middle; Sec. 3.2; RPN trained on the boxes of the cleaned Landmarks set): "
         "the RPN's top proposals cover the objects better than the rigid grid (higher recall at IoU 0.5 and 0.7 with "
         "fewer regions), and R-MAC pooled over the proposals instead of the grid adds a small mAP gain to learned "
         "R-MAC on Oxford/Paris. (Read the exact figures in the paper; they are not copied here.)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ frozen features
class MapCache(InputCache):
    """conv5_3 maps (fp16 ``.npy`` per image) computed from a pool4 :class:`InputCache` by a conv5 block."""

    @classmethod
    def build(cls, pool4, trunk, root: Path, tag: str, desc: str) -> "MapCache":
        from tqdm.auto import tqdm

        folder = Path(root) / f"{tag}-{Path(pool4.folder).name}"
        folder.mkdir(parents=True, exist_ok=True)
        cache = cls(folder, len(pool4))
        todo = [i for i in range(len(pool4)) if not cache.file(i).exists()]
        if todo:
            trunk.eval()
            with torch.no_grad():
                for i in tqdm(todo, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True):
                    arr = trunk(pool4[i][None])[0].numpy().astype(np.float16)
                    tmp = folder / f".{i:06d}.tmp.npy"
                    np.save(tmp, arr)
                    os.replace(tmp, cache.file(i))
        return cache


class Features:
    """Frozen VGG16 maps at one size: ``pool4(items)`` / ``conv5(items)`` for lists of (path, box or None)."""

    def __init__(self, size: int, engine: str = "winograd"):
        from instance_search.backbones import load_backbone
        from instance_search.backbones.fast import use_engine
        from instance_search.nets.detector import conv5_block

        self.size = int(size)
        self.bb = load_backbone("vgg16")
        use_engine(self.bb, engine)
        self.trunk = conv5_block(self.bb).eval()

    def pool4(self, items, desc: str):
        return InputCache.build(items, self.bb, "pool4", self.size, POOL4_ROOT, desc=f"{desc} -> pool4")

    def conv5(self, items, desc: str) -> MapCache:
        return MapCache.build(self.pool4(items, desc), self.trunk, CACHE, "conv5_3", f"{desc} -> conv5_3")


def training_samples(feat: Features, boxes_file: Path, val_groups: float, seed: int = 0):
    """(train samples, validation samples, summary) from the boxes file, as ``isearch train-rpn`` builds them
    (:func:`instance_search.train.rpn.boxes_file_samples`: kept images, boxes mapped to the map frame,
    ``val_groups`` of the groups held out by a hash of the label); the split is asserted disjoint from the
    evaluation images first."""
    data = find_shared_data()
    ts = splits.training_set(data)
    splits.assert_disjoint(ts.paths, splits.evaluation_paths(data))
    train, val, summary = TR.boxes_file_samples(boxes_file, data, feat.bb, max_size=feat.size,
                                                cache_dir=CACHE / "maps", val_groups=val_groups, seed=seed)
    summary["training_split_images"] = len(ts)
    return train, val, summary


def heldout_check(feat: Features):
    """The held-out images with ground-truth boxes: Paris-250 queries (rparis6k gnd) and the 10 Oxford queries
    (roxford5k gnd), full images. Returns [(name, conv5 map, gt boxes (1, 4) map frame)]."""
    data = find_shared_data()
    paris = splits.paris_eval(data)
    items = [(Path(p), b) for p, b in zip(paris.query_paths, paris.query_boxes)]
    g = load_gnd_pickle(data / "gnd" / "oxford5k" / "gnd_roxford5k.pkl")
    ox = {n: g["gnd"][k]["bbx"] for k, n in enumerate(g["qimlist"])}
    oxp = sorted((data / "oxford5k-queries10").glob("*.jpg"))
    items += [(p, ox[p.stem]) for p in oxp if p.stem in ox]
    pc = feat.conv5([(p, None) for p in paris.query_paths], "Paris queries (full)")
    oc = feat.conv5([(p, None) for p in oxp], "Oxford queries (full)")
    maps = [pc[i] for i in range(len(pc))] + [oc[i] for i, p in enumerate(oxp) if p.stem in ox]
    out = []
    for (p, b), m in zip(items, maps):
        out.append((p.name, m, B.to_map_frame(b, TR.original_size(p), tuple(m.shape[-2:]), 16)))
    return out


def grid_recall(maps_gt, levels=(1, 2, 3, 4, 5)) -> list[dict]:
    rows = []
    for L in levels:
        props = [B.grid_boxes(m.shape[-2], m.shape[-1], L) for _, m, _ in maps_gt]
        rec = TR.detection_recall(props, [g for _, _, g in maps_gt])["all"]
        rows.append({"regions": "grid", "levels": L, "mean_count": float(np.mean([len(p) for p in props])),
                     "recall@0.5": rec["0.5"], "recall@0.7": rec["0.7"]})
    return rows


def rpn_recall(rpn, maps_gt, ks=KS) -> list[dict]:
    props = [rpn.propose(m, max(ks))[0].numpy() for _, m, _ in maps_gt]
    rec = TR.detection_recall(props, [g for _, _, g in maps_gt], ks=ks)
    return [{"regions": "rpn", "k": k, "mean_count": float(np.mean([min(k, len(p)) for p in props])),
             "recall@0.5": rec[str(k)]["0.5"], "recall@0.7": rec[str(k)]["0.7"]} for k in ks]


def plot_recall(tables: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 3.8), squeeze=False)
    for ax, (name, t) in zip(axes[0], tables.items()):
        for kind, mk in (("rpn", "o-"), ("untrained rpn", "x:"), ("grid", "s--")):
            rows = [r for r in t if r["regions"] == kind]
            if not rows:
                continue
            for thr, col in (("0.5", "C0"), ("0.7", "C3")):
                ax.plot([r["mean_count"] for r in rows], [r[f"recall@{thr}"] for r in rows], mk, color=col,
                        label=f"{kind}, IoU {thr}")
        ax.set_xscale("log")
        ax.set_xlabel("regions per image")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ retrieval
def rmac_vectors(maps, regions_fn, whitening) -> np.ndarray:
    """R-MAC ``L2(sum_r L2(W(L2 f_r)))`` of each map over the regions ``regions_fn(i, map)`` (cells)."""
    from instance_search.ops.pooling import region_macs
    from instance_search.recipes.base import Recipe

    rec = Recipe("rmac")
    local = []
    for i in range(len(maps)):
        m = maps[i]
        v = region_macs(m, regions_fn(i, m)).numpy().astype(np.float32)
        local.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6))
    return rec.finalize(local, whitening)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=384, help="max image side for every image (train and test)")
    ap.add_argument("--boxes", type=Path, default=RESULTS / "train_boxes.json")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-drop-epoch", type=int, default=4)
    ap.add_argument("--mid", type=int, default=256,
                    help="channels of the RPN's 3x3 conv (Ren et al. use 512 with VGG16; 256 halves the CPU time)")
    ap.add_argument("--sizes", type=float, nargs="+", default=list(B.DEFAULT_SIZES))
    ap.add_argument("--val-groups", type=float, default=0.1)
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS))
    ap.add_argument("--learned-model", default="auto",
                    help="learned R-MAC model (.pt) of bench_learned_rmac.py; 'auto': the last epoch of the newest "
                         "run under benchmarks/cache/learned_rmac; 'none': skip")
    ap.add_argument("--engine", default="winograd")
    ap.add_argument("--no-map", action="store_true", help="skip the retrieval (mAP) part")
    ap.add_argument("--out", type=Path, default=RESULTS / "rpn.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ISEARCH_THREADS", "1")))
    torch.manual_seed(0)
    t_start, c_start = time.perf_counter(), time.process_time()
    timings = {}

    feat = Features(args.size, args.engine)
    t0 = time.perf_counter()
    train, val, data_summary = training_samples(feat, args.boxes, args.val_groups)
    log(f"training: {data_summary}")
    held = heldout_check(feat)
    timings["features_s"] = round(time.perf_counter() - t0, 1)
    log(f"held-out check: {len(held)} images with ground-truth boxes")

    # ---------------------------------------------------------------- training
    rpn = RPN(mid_channels=args.mid, sizes=args.sizes, max_size=args.size)
    untrained = RPN(mid_channels=args.mid, sizes=args.sizes, max_size=args.size)
    untrained.load_state_dict(rpn.state_dict())
    untrained.eval()
    cfg = TR.RPNTrainConfig(epochs=args.epochs, lr=args.lr, lr_drop_epoch=args.lr_drop_epoch)
    key = hashlib.sha256(json.dumps({"cfg": vars(cfg), "rpn": rpn.config(), "n": len(train),
                                     "boxes": str(args.boxes.stat().st_mtime_ns)}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    ckdir = CACHE / f"run-{key}"
    t0 = time.perf_counter()
    history = TR.train_rpn(rpn, train, cfg, ckdir, val_samples=val, resume=True)
    timings["training_s_this_run"] = round(time.perf_counter() - t0, 1)
    for e in history["epochs"]:
        log(f"epoch {e['epoch']}: {e['seconds']:.0f} s wall, {e['cpu_seconds']:.0f} s CPU, train cls "
            f"{e['train_cls']:.4f} reg {e['train_reg']:.4f}; val cls {e.get('val_cls', float('nan')):.4f} "
            f"reg {e.get('val_reg', float('nan')):.4f}")
    model_path = save_rpn(rpn, CACHE / "rpn.pt", trained_on=data_summary, history=history,
                            checkpoints=str(ckdir))

    # ---------------------------------------------------------------- recall
    val_maps = [(s.name, s.map(), np.asarray(s.boxes)) for s in val]
    tables = {}
    for name, mg in (("held-out: Paris-250 + Oxford queries, ground-truth boxes", held),
                     ("held-out training groups, automatic boxes", val_maps)):
        rows = rpn_recall(rpn, mg, args.ks)
        rows += [dict(r, regions="untrained rpn") for r in rpn_recall(untrained, mg, args.ks)]
        rows += grid_recall(mg)
        tables[name] = rows
        log(name)
        print(f"  {'regions':<14} {'k/L':>4} {'count':>7} {'R@0.5':>6} {'R@0.7':>6}")
        for r in rows:
            print(f"  {r['regions']:<14} {r.get('k', r.get('levels')):>4} {r['mean_count']:>7.1f} "
                  f"{r['recall@0.5']:>6.3f} {r['recall@0.7']:>6.3f}")
    plot_recall(tables, RESULTS / "rpn_recall.png")
    per_image = []
    for (name, m, g) in held:
        p = rpn.propose(m, max(args.ks))[0]
        per_image.append({"image": name, "best_iou_top16": round(float(B.box_iou(g, p[:16]).max()), 3),
                          "best_iou_top256": round(float(B.box_iou(g, p).max()), 3),
                          "best_iou_grid_L3": round(float(B.box_iou(g, B.grid_boxes(m.shape[-2], m.shape[-1], 3))
                                                          .max()), 3)})

    # ---------------------------------------------------------------- retrieval with proposals as R-MAC regions
    maps_results = []
    if not args.no_map:
        from instance_search.collection import fit_whitening
        from instance_search.nets.rmac_head import load_model
        from instance_search.ops.boxes import boxes_to_cells
        from instance_search.ops.pooling import region_macs, rmac_regions

        data = find_shared_data()
        ukb, paris = splits.ukbench_eval(data), splits.paris_eval(data)
        t0 = time.perf_counter()
        ukb_items = [(p, None) for p in ukb.images]
        pdb_items = [(p, None) for p in paris.images]
        pq_items = list(zip(paris.query_paths, paris.query_boxes))
        ukb_c = feat.conv5(ukb_items, "UKBench 500-999")
        pdb_c = feat.conv5(pdb_items, "Paris-250")
        pq_c = feat.conv5(pq_items, "Paris queries (box crops)")
        # PCA-whitening of regional MACs (grid) of the training split (off-the-shelf R-MAC, Tolias et al. 2016)
        tr_c = feat.conv5([(p, None) for p in splits.training_set(data).paths], "training split")
        rows = []
        for i in range(len(tr_c)):
            m = tr_c[i]
            v = region_macs(m, rmac_regions(m.shape[-2], m.shape[-1])).numpy()
            rows.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6))
        wh = fit_whitening(np.concatenate(rows), trained_on=f"training split grid regions at {args.size} px")
        timings["eval_features_s"] = round(time.perf_counter() - t0, 1)

        sets = {"ukb": ukb_c, "pdb": pdb_c, "pq": pq_c}
        t0 = time.perf_counter()
        props = {k: [rpn.propose(c[i], max(args.ks))[0].numpy() for i in range(len(c))] for k, c in sets.items()}
        timings["proposals_s"] = round(time.perf_counter() - t0, 1)
        n_img = sum(len(c) for c in sets.values())
        timings["proposals_ms_per_image"] = round(1000 * timings["proposals_s"] / n_img, 1)

        def grid_fn(i, m):
            return rmac_regions(m.shape[-2], m.shape[-1])

        def prop_fn(key, k):
            return lambda i, m: boxes_to_cells(props[key][i][:k], 16, m.shape[-2], m.shape[-1])

        def run(name, mapsets, whitening, fn_for):
            u = rmac_vectors(mapsets["ukb"], fn_for("ukb"), whitening)
            d = rmac_vectors(mapsets["pdb"], fn_for("pdb"), whitening)
            q = rmac_vectors(mapsets["pq"], fn_for("pq"), whitening)
            row = {"method": name, "ukbench_500_999": evaluate(ukb, u, u), "paris250": evaluate(paris, d, q)}
            maps_results.append(row)
            log(json.dumps(row))

        for wname, w in (("no whitening", None), ("PCA-whitening (training split)", wh)):
            run(f"R-MAC off the shelf, {wname}, grid L=3", sets, w, lambda key: grid_fn)
            for k in args.ks:
                run(f"R-MAC off the shelf, {wname}, RPN top-{k}", sets, w, lambda key, k=k: prop_fn(key, k))

        # learned R-MAC (bench_learned_rmac.py): its own conv5 maps, regions = grid or proposals of the frozen RPN
        lm = args.learned_model
        if lm == "auto":
            cands = sorted(POOL4_ROOT.glob("run-*/epoch-*.pt"), key=lambda p: (p.stat().st_mtime, p.name))
            lm = str(cands[-1]) if cands else "none"
        if lm != "none" and Path(lm).is_file():
            net, ncfg = load_model(lm)
            log(f"learned R-MAC model: {lm} ({ncfg.get('train_layers')})")
            if net.input_layer != "pool4":
                log("  skipped: the proposals experiment here needs a model whose input is pool4 (conv5 trained)")
            else:
                p4 = {"ukb": feat.pool4(ukb_items, "UKBench 500-999"), "pdb": feat.pool4(pdb_items, "Paris-250"),
                      "pq": feat.pool4(pq_items, "Paris queries (box crops)")}
                learned = {k: MapCache.build(v, net.trunk, CACHE, f"learned-{Path(lm).parent.name}-{Path(lm).stem}",
                                             f"learned conv5 {k}") for k, v in p4.items()}

                def run_learned(name, fn_for):
                    out = {}
                    with torch.no_grad():
                        for k, c in learned.items():
                            fn = fn_for(k)
                            out[k] = np.stack([net.head(c[i], fn(i, c[i])).numpy() for i in range(len(c))])
                    row = {"method": name, "ukbench_500_999": evaluate(ukb, out["ukb"], out["ukb"]),
                           "paris250": evaluate(paris, out["pdb"], out["pq"]), "model": lm}
                    maps_results.append(row)
                    log(json.dumps(row))

                # proposals of the RPN on the learned conv5_3 maps, as the recipe does
                # (recipes.gordo.learned_rmac_recipe(model, rpn=...): the index only has the trained network's maps)
                for k, c in learned.items():
                    props[f"learned-{k}"] = [rpn.propose(c[i], max(args.ks))[0].numpy() for i in range(len(c))]
                run_learned("learned R-MAC, grid L=3", lambda key: grid_fn)
                for k in args.ks:
                    run_learned(f"learned R-MAC, RPN top-{k}", lambda key, k=k: prop_fn(f"learned-{key}", k))
        else:
            log(f"learned R-MAC: no model ({args.learned_model}); skipped")

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(), "size": args.size,
        "rpn": rpn.config(), "train_config": vars(cfg), "data": data_summary, "model": str(model_path),
        "seconds_per_epoch": [e["seconds"] for e in history["epochs"]],
        "cpu_seconds_per_epoch": [e["cpu_seconds"] for e in history["epochs"]],
        "history": history["epochs"], "timings": timings, "this_run_wall_s": round(time.perf_counter() - t_start, 1),
        "this_run_cpu_s": round(time.process_time() - c_start, 1), "paper": PAPER, "comparable": False,
        "note": "subsets (UKBench 500-999, Paris-250 with 12 queries, 10 Oxford queries): real measurements, not "
                "comparable with published tables; every image at max side %d px" % args.size,
    }
    doc = {"meta": meta, "recall": tables, "heldout_per_image": per_image, "retrieval": maps_results}
    atomic_write_bytes(args.out, json.dumps(doc, indent=1, default=str).encode())

    if maps_results:
        print()
        print_map_table(maps_results)
    print(f"seconds per epoch (wall): {meta['seconds_per_epoch']}; CPU: {meta['cpu_seconds_per_epoch']}")
    print(f"paper: {PAPER}")
    print(f"wrote {args.out}, {RESULTS / 'rpn_recall.png'} and {model_path}")


if __name__ == "__main__":
    main()
