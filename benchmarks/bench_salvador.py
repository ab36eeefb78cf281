"""Faster R-CNN-style features and spatial re-ranking (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, "Faster R-CNN
features for instance search", CVPRW, Sec. 3-4) on the evaluation split, with our own RPN and detector heads.

Everything runs on frozen VGG16 maps at max side ``--size`` (cached once, shared with bench_rpn.py and
bench_learned_rmac.py); the RPN is the one bench_rpn.py trained on the training split (benchmarks/cache/rpn/rpn.pt).

* IPA (Sec. 3.1): image-wise pooling of conv5_3 -- sum (L2 -> PCA-whitening learned on the training split -> L2)
  or max (L2). The query is pooled over its box in the full query image (Paris) or the whole image (UKBench).
* CA-SR (Sec. 3.3): the IPA-sum short list (top ``--shortlist``) re-scored by the best cosine between the query box
  vector and the vectors of each image's top ``--proposals`` RPN boxes (Caffe's RoI rounding), as the authors'
  rerank.py: "CA-SR" max-pooled, L2 only; "CA-SR sum" the sum of the 7x7 RoI bins, L2 -> the IPA-sum PCA -> L2;
  "CA-SR whitened (earlier)" max-pooled, L2 -> whitening of grid region MACs -> L2 (this package's earlier rows).
* CS-SR (Sec. 3.2-3.3): a detector head (RoI pooling -> fc6 -> fc7 -> classes + boxes) first trained as a *base
  detector* on the training split (its groups as classes, the automatic boxes of bench_cleaning.py as ground
  truth) -- no trained detector weights exist here -- then fine-tuned on the query instances: every query object
  a class (Paris: the landmark; UKBench: the object) plus background, the query images and their horizontal
  flips as training data. Strategy #1 trains the FC layers only; #2 (``--s2-trainable``) "all layers after the
  first two conv layers" as the paper names them, conv2_1 ... conv5_3 + the RPN + FC from pool1 maps (default), or
  the package's earlier #2, conv5_1-3 + RPN + FC from pool4 maps. The short list is re-ranked by the best
  proposal's probability of the query's class. Schedule (the same budget for both strategies): phase 1
  ``--ft-epochs`` passes training the new output layers and fc6/fc7 (lr 3e-3; the same for both strategies,
  cached and shared unless #2 adds the layers below conv5, which changes the checkpoint key); phase 2,
  ``--ft-epochs-2`` more passes training the FC layers only (#1) or also the conv layers + RPN (#2; ~28x the CPU
  of #1 per step for conv2 upwards, bench_salvador_ft_cost.py), lr 1e-3. Detection with a conv2 #2 detector runs
  its conv2_1 ... conv5_3 on every database image (pool1 computed on the fly). Salvador fine-tunes each strategy
  directly; the first FC phase keeps #2 affordable here. ``--runs paris:1 ukb:1 paris:2`` picks the
  (benchmark, strategy) pairs and their order; ``--casr-variants CA-SR`` computes only the default CA-SR rows. lr 3e-3: at 1e-3 the 126-way UKBench classifier had not fitted its own training (query) images after
  4-6 passes (a training-set criterion; no evaluation image was used to choose it).
* Detector check (per benchmark and strategy, ``diagnostics`` in the JSON): the best proposal's probability of
  the own class on the training (query + flipped) images and on the query's positives, how often the own class
  is the arg-max, the negatives' probability of the query's class, and the mAP of ranking the whole database by
  that probability alone -- whether CS-SR's scores recognise the instances at all.
* QE after re-ranking (Sec. 4.3; rerank.py stage rerank2nd): the mean of the raw query box vector and the raw
  vectors of the boxes of the top ``--qe`` re-ranked images (re-cropped from their maps), L2 (sum: PCA, L2), then
  CA-SR of the short list with it; for IPA alone, average QE on the global vectors. CS-SR takes the best
  proposal itself (the authors' ``use_regressed_boxes = False``), its QE re-ranks with max-pooled regions.

Evaluation split: Paris-250 (238 database images, 12 queries of 5 landmarks, revisited Easy/Medium/Hard) and
UKBench 500-999 in a query-instance protocol: one query per object (its first view, images 500, 504, ...: 125
queries, 125 classes), the other three views are the positives and the query image itself is ignored (junk),
since it is a training image of the fine-tuned detector. IPA on all 500 UKBench queries (N-S, mAP) is reported
for reference. ``--ukb-train-views 2``: the first two views of each object train the detector (Salvador's setting
of several query images per instance) and are junk; the other two are the positives. Writes
benchmarks/results/salvador.json (after every row, so that a run cut short keeps its figures).

``--rpa-only`` (issue 17): the IPA rows, then recipe ``rpa`` (Gordo et al.'s R-MAC over the top ``--proposals``
boxes of the same RPN, region MACs with Caffe's RoI rounding, L2 -> PCA-whitening learned on the training split's
RPA region vectors -> L2, summed, L2; the package's ``rpa_local_vectors`` / ``Recipe.finalize``) and RPA + average
QE (``--qe``) of the global vectors, on Paris-250 (query: the box's cells of the full query image's map, as the
IPA rows; also the whole query image, the product's first stage for ``rpa``) and UKB-125; nothing else. Writes
benchmarks/results/salvador_rpa.json unless ``--out``.

    OMP_NUM_THREADS=1 ISEARCH_THREADS=1 python benchmarks/bench_salvador.py
    OMP_NUM_THREADS=1 ISEARCH_THREADS=1 python benchmarks/bench_salvador.py --benches ukb --strategies 1 \
        --ukb-train-views 2 --ft-epochs 10 --ft-epochs-2 1 --out benchmarks/results/salvador_ukb_2views.json
    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 ISEARCH_THREADS=1 python benchmarks/bench_salvador.py --rpa-only \
        --train-maps direct
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ISEARCH_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_rpn import CACHE as RPN_CACHE, Features, log  # noqa: E402

from instance_search.eval import metrics as ev  # noqa: E402
from instance_search.eval.datasets import splits  # noqa: E402
from instance_search.eval.datasets.benchmarks import find_shared_data  # noqa: E402
from instance_search.io import atomic_write_bytes  # noqa: E402
from instance_search.nets import detector as ND  # noqa: E402
from instance_search.nets.rpn import load_rpn  # noqa: E402
from instance_search.ops.boxes import boxes_to_cells, to_map_frame  # noqa: E402
from instance_search.train import detector as FT  # noqa: E402
from instance_search.train.rpn import original_size  # noqa: E402
from instance_search.ops.pooling import region_macs, rmac_regions  # noqa: E402
from instance_search.rerank import cs_sr as CS  # noqa: E402
from instance_search.rerank.ca_sr import ca_sr_regions, crop_vectors, proposal_descriptors  # noqa: E402
from instance_search.rerank.expansion import average_qe  # noqa: E402

RESULTS = HERE / "results"
CACHE = HERE / "cache" / "salvador"

PAPER = ("Salvador et al. 2016 (Sec. 4; Faster R-CNN VGG16 trained on PASCAL, full Oxford 5k / Paris 6k): IPA-sum "
         "beats IPA-max as a first stage; CA-SR over the RPN proposals improves on IPA; CS-SR with the detector "
         "fine-tuned on the queries improves further, strategy #2 (conv layers + RPN too) more than #1; QE after "
         "re-ranking adds more on top. (Read the exact figures in the paper; they are not copied here.)")


# ------------------------------------------------------------------------------------------------ features
def flipped_maps(feat: Features, paths, desc: str):
    """pool4 and conv5_3 maps of horizontally flipped images (cached under benchmarks/cache/salvador/)."""
    from PIL import Image

    from instance_search.images import load_image

    key = hashlib.sha256(json.dumps([[Path(p).name, Path(p).stat().st_size] for p in paths] +
                                    [feat.size, str(getattr(feat.bb.weights, "sha256", ""))]).encode()).hexdigest()[:16]
    folder = CACHE / f"flip-{feat.size}-{len(paths)}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(paths)) if not (folder / f"{i:06d}.c5.npy").exists()]
    for i in tqdm(todo, desc=f"{desc} (flipped) -> pool4, conv5_3", unit="img", file=sys.stderr, disable=not todo):
        img = load_image(paths[i], max_size=feat.size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        p4 = feat.bb.features(img, layers=["pool4"])[("pool4", 1.0)]
        with torch.no_grad():
            c5 = feat.trunk(p4[None])[0]
        for tag, arr in (("p4", p4), ("c5", c5)):
            tmp = folder / f".{i:06d}.{tag}.tmp.npy"
            np.save(tmp, arr.numpy().astype(np.float16))
            os.replace(tmp, folder / f"{i:06d}.{tag}.npy")

    def get(i, tag):
        return lambda: torch.from_numpy(np.load(folder / f"{i:06d}.{tag}.npy").astype(np.float32))

    return [(get(i, "p4"), get(i, "c5")) for i in range(len(paths))]


def pool1_maps(feat: Features, paths, desc: str, flip: bool = False):
    """pool1 maps (64 x H/2 x W/2; CS-SR strategy #2's input as the paper names it, conv2_1 upwards) of images or
    of their horizontal flips, cached as fp16 under benchmarks/cache/salvador/; a list of loaders."""
    from PIL import Image

    from instance_search.images import load_image

    key = hashlib.sha256(json.dumps([[Path(p).name, Path(p).stat().st_size] for p in paths] +
                                    [feat.size, flip, str(getattr(feat.bb.weights, "sha256", ""))]).encode()
                         ).hexdigest()[:16]
    folder = CACHE / f"pool1-{'flip-' if flip else ''}{feat.size}-{len(paths)}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(paths)) if not (folder / f"{i:06d}.npy").exists()]
    for i in tqdm(todo, desc=f"{desc}{' (flipped)' if flip else ''} -> pool1", unit="img", file=sys.stderr,
                  disable=not todo):
        img = load_image(paths[i], max_size=feat.size)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        p1 = feat.bb.features(img, layers=["pool1"])[("pool1", 1.0)]
        tmp = folder / f".{i:06d}.tmp.npy"
        np.save(tmp, p1.detach().cpu().numpy().astype(np.float16))
        os.replace(tmp, folder / f"{i:06d}.npy")
    return [(lambda i=i: torch.from_numpy(np.load(folder / f"{i:06d}.npy").astype(np.float32)))
            for i in range(len(paths))]


def pool1_of(feat: Features, path) -> torch.Tensor:
    """pool1 map of one image at ``feat.size`` (not cached: detection with a strategy-#2 detector)."""
    from instance_search.images import load_image

    return feat.bb.features(load_image(path, max_size=feat.size), layers=["pool1"])[("pool1", 1.0)].detach().float()


class DirectConv5:
    """conv5_3 maps of the training split taken straight from the backbone (``--train-maps direct``): the images
    kept in a boxes file are read from the map cache that bench_rpn.py / ``isearch train-rpn`` fill
    (benchmarks/cache/rpn/maps/), the others computed once into the same folder; ``[i]`` and ``file(i)`` as
    :class:`~instance_search.train.triplet.MapCache`. (The default, ``pool4``, runs pool4 -> conv5 block on cached
    pool4 maps; the two differ only by the engine of the conv5 layers.)"""

    def __init__(self, feat: Features, paths, boxes_file: Path = RESULTS / "train_boxes.json"):
        from instance_search.train.cleaning import load_boxes
        from instance_search.train.triplet import InputCache

        data = find_shared_data()
        _, recs = load_boxes(boxes_file, root=data, kept_only=True)
        kept = sorted(recs)
        rel = [Path(p).resolve().relative_to(data.resolve()).as_posix() for p in paths]

        def build(items, desc):
            return InputCache.build(items, feat.bb, "conv5_3", feat.size, RPN_CACHE / "maps", desc=desc)

        a = build([(data / r, None) for r in kept], f"conv5_3 maps of {len(kept)} images")
        rest = [i for i, r in enumerate(rel) if r not in recs]
        b = build([(paths[i], None) for i in rest], "training split, the rest -> conv5_3") if rest else None
        pos = {r: j for j, r in enumerate(kept)}
        where = {i: (b, k) for k, i in enumerate(rest)}
        self.index = [where.get(i, (a, pos.get(r))) for i, r in enumerate(rel)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        c, j = self.index[i]
        return c[j]

    def file(self, i):
        c, j = self.index[i]
        return c.file(j)


def box_cells(box_px, image_wh, map_hw) -> np.ndarray:
    """Cells (x, y, w, h) covering a box given in original-image pixels."""
    fb = to_map_frame(box_px, image_wh, map_hw, 16)
    return boxes_to_cells(fb, 16, *map_hw)


def l2(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------------ evaluation
def ukb_instance_gnd(n_db: int, query_idx: list[int], train_views: int = 1) -> list[dict]:
    """UKBench query-instance protocol: junk = the views of the query's object that train the detector (the first
    ``train_views``, the query among them), positives = its other views."""
    return [{"ok": np.array([j for j in range(4 * (q // 4), 4 * (q // 4) + 4) if j % 4 >= train_views]),
             "junk": np.array([j for j in range(4 * (q // 4), 4 * (q // 4) + 4) if j % 4 < train_views])}
            for q in query_idx]


def detector_diagnostics(db_scores: np.ndarray, train_scores: np.ndarray, train_labels, q_class, positives,
                         ignore) -> dict:
    """Does the fine-tuned detector recognise its classes? (the check behind CS-SR's figures).

    ``db_scores`` (N, K): per database image the best proposal's probability of every object class;
    ``train_scores`` (T, K) the same on the training (query + flipped) images with classes ``train_labels``
    (1..K); per query: its class ``q_class[j]`` (0-based), its positives and ignored (junk) database indices.
    Reports P(own class) on the training images and on the positives, how often the own class is the arg-max,
    the negatives' P(class), and the mAP of ranking the whole database by P(query's class) alone."""
    tl = np.asarray(train_labels).reshape(-1) - 1
    own_tr = train_scores[np.arange(len(tl)), tl]
    pos_p, pos_top, neg_p, aps = [], [], [], []
    for j, k in enumerate(q_class):
        pos = np.asarray(positives[j], dtype=np.int64)
        bad = np.zeros(len(db_scores), bool)
        bad[pos] = True
        bad[np.asarray(ignore[j], dtype=np.int64)] = True
        pos_p += db_scores[pos, k].tolist()
        pos_top += (db_scores[pos].argmax(1) == k).tolist()
        neg_p += db_scores[~bad, k].tolist()
        s = db_scores[:, k].copy()
        s[np.asarray(ignore[j], dtype=np.int64)] = -np.inf
        order = np.argsort(-s, kind="stable")
        order = order[np.isfinite(s[order])]
        ranks = np.nonzero(np.isin(order, pos))[0]
        aps.append(float(np.mean((np.arange(len(ranks)) + 1) / (ranks + 1))) if len(ranks) else 0.0)
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    return {"classes": int(db_scores.shape[1]), "uniform_probability": r4(1.0 / (db_scores.shape[1] + 1)),
            "train_p_own_mean": r4(own_tr.mean()), "train_own_is_argmax": r4(np.mean(train_scores.argmax(1) == tl)),
            "positives_p_own_mean": r4(np.mean(pos_p)), "positives_p_own_median": r4(np.median(pos_p)),
            "positives_own_is_argmax": r4(np.mean(pos_top)), "negatives_p_mean": r4(np.mean(neg_p)),
            "negatives_p_99th_percentile": r4(np.percentile(neg_p, 99)),
            "map_ranking_whole_database_by_class_probability": round(100 * float(np.mean(aps)), 2)}


def score_ranks(ranks_cols: list[np.ndarray], bench_name: str, paris, ukb_gnd) -> dict:
    ranks = np.stack(ranks_cols, axis=1)
    if bench_name == "paris":
        r = ev.evaluate_revisited(ranks, paris.gnd)
        return {k: round(float(r[k]), 2) for k in ("map_easy", "map_medium", "map_hard")}
    m, aps, _, _ = ev.compute_map(ranks, ukb_gnd)
    return {"map": round(float(m) * 100, 2)}


def rpa_rows(args, tr_c5, paris_db, paris_queries, ukb_c5, ukb_q, add_first_stage, add_ukb500) -> dict:
    """Recipe ``rpa`` (Gordo et al. 2016, Sec. 3.2, R-MAC over proposals; Salvador et al.'s region pooling) on the
    evaluation split, with the package's own functions: ``rpa_recipe`` (the ``--rpn`` file, ``--proposals``
    boxes), ``Recipe.local_from_map`` (``rpa_local_vectors``: region MACs, Caffe's RoI rounding, L2) and
    ``Recipe.finalize`` (whitening -> L2, sum, L2). The whitening is learned on the RPA region vectors of the
    training split (``tr_c5``, the images the IPA-sum whitening uses), as ``isearch index --fit-on`` learns it.
    ``paris_queries``: (full query map, box cells) pairs; rows with the box's cells of the map (as the IPA rows) and
    with the whole query image (the product's first stage for ``rpa``). Adds the rows (``add_first_stage``: a
    ranking and its QE row, ``add_ukb500``: every image a query, as for IPA); returns timings / info."""
    from instance_search.collection import fit_whitening
    from instance_search.recipes.salvador import rpa_recipe

    rec = rpa_recipe(args.rpn, args.proposals, max_size=args.size)
    info: dict = {"recipe": rec.to_dict()}
    t0 = time.perf_counter()
    tr_local = [rec.local_from_map(tr_c5[i]) for i in tqdm(range(len(tr_c5)), desc="training split: RPA regions",
                                                           unit="img", file=sys.stderr)]
    rows = np.concatenate(tr_local)
    del tr_local
    info["training_images"], info["training_region_vectors"] = len(tr_c5), int(len(rows))
    info["training_regions_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    w = fit_whitening(rows, dim=rec.whitening_dim, trained_on="training split RPA region vectors")
    del rows
    info["whitening_s"] = round(time.perf_counter() - t0, 1)

    def vectors(maps, desc):
        return rec.finalize([rec.local_from_map(m) for m in tqdm(maps, desc=f"{desc}: RPA", unit="img",
                                                                 file=sys.stderr)], w)

    t0 = time.perf_counter()
    pdb = vectors([paris_db[i] for i in range(len(paris_db))], "Paris-250")
    q_box = vectors([m[:, y:y + h, x:x + w_] for m, (x, y, w_, h) in
                     ((m, [int(v) for v in c]) for m, c in paris_queries)], "Paris queries (box)")
    q_img = vectors([m for m, _ in paris_queries], "Paris queries (whole image)")
    udb = vectors([ukb_c5[i] for i in range(len(ukb_c5))], "UKBench 500-999")
    info["evaluation_vectors_s"] = round(time.perf_counter() - t0, 1)

    add_ukb500("RPA", udb)
    for bench, name, db, q in (("paris", "RPA", pdb, q_box), ("ukb", "RPA", udb, udb[ukb_q]),
                               ("paris", "RPA (query: whole image)", pdb, q_img)):
        add_first_stage(name, bench, q, db)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--rpn", type=Path, default=RPN_CACHE / "rpn.pt", help="RPN trained by bench_rpn.py")
    ap.add_argument("--boxes", type=Path, default=RESULTS / "train_boxes.json")
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--proposals", type=int, default=256)
    ap.add_argument("--qe", type=int, default=5)
    ap.add_argument("--pool", type=int, default=3, help="RoI pooling output size of the detector head")
    ap.add_argument("--hidden", type=int, default=1024, help="fc6/fc7 width")
    ap.add_argument("--base-epochs", type=int, default=2)
    ap.add_argument("--base-lr", type=float, default=1e-2)
    ap.add_argument("--ft-epochs", type=int, default=20,
                    help="fine-tuning phase 1 (both strategies): passes over the query images + flips, FC layers")
    ap.add_argument("--ft-lr", type=float, default=3e-3)
    ap.add_argument("--ft-epochs-2", type=int, default=4,
                    help="phase 2: more passes, FC only (strategy #1) or conv layers + RPN + FC (strategy #2, "
                         "--s2-trainable)")
    ap.add_argument("--ft-lr-2", type=float, default=1e-3)
    ap.add_argument("--ukb-train-views", type=int, default=1, choices=(1, 2, 3),
                    help="UKBench: views per object (+ flips) that train the detector; 1 = the query image alone, "
                         "as for Paris; 2 = Salvador's setting of several query images per instance")
    ap.add_argument("--strategies", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    ap.add_argument("--benches", nargs="+", default=["paris", "ukb"], choices=("paris", "ukb"),
                    help="where to fine-tune and run CS-SR")
    ap.add_argument("--no-detector", action="store_true",
                    help="only the rows that need no detector training: IPA, CA-SR (+ QE); skips the base detector, "
                         "the fine-tuning and the flipped query maps")
    ap.add_argument("--s2-trainable", default="conv2+rpn+fc", choices=tuple(FT.TRAINABLE),
                    help="what strategy #2's phase 2 trains: conv2+rpn+fc (the paper's layers, the product's default; "
                         "input pool1 maps of the query images and flips, cached under benchmarks/cache/salvador/; "
                         "detection runs conv2_1..conv5_3 of the fine-tuned detector on every database image; "
                         "~5x the CPU of conv5 per step, bench_salvador_ft_cost.py) or conv5+rpn+fc (the package's "
                         "earlier #2, from pool4 maps)")
    ap.add_argument("--runs", nargs="+", default=None, metavar="BENCH:STRATEGY",
                    help="fine-tuning runs in this order, e.g. paris:1 ukb:1 paris:2 (default: every --benches x "
                         "--strategies, bench by bench)")
    ap.add_argument("--casr-variants", nargs="+", default=None,
                    choices=("CA-SR", "CA-SR sum", "CA-SR whitened (earlier)", "none"),
                    help="which CA-SR rows to compute (default: all three; none: only IPA and CS-SR)")
    ap.add_argument("--train-maps", default="pool4", choices=("pool4", "direct"),
                    help="conv5_3 maps of the training split (whitening, base detector): pool4 -> conv5 block "
                         "(default) or straight from the backbone, re-using bench_rpn.py's map cache (DirectConv5)")
    ap.add_argument("--rpa-only", action="store_true",
                    help="only the IPA rows and recipe rpa (R-MAC over the RPN's proposals, + average QE); no "
                         "CA-SR, no detector; writes salvador_rpa.json unless --out (issue 17)")
    ap.add_argument("--engine", default="winograd")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default benchmarks/results/salvador.json; salvador_rpa.json with --rpa-only)")
    args = ap.parse_args()
    if args.out is None:
        args.out = RESULTS / ("salvador_rpa.json" if args.rpa_only else "salvador.json")
    if args.rpa_only:
        args.no_detector = True
    torch.set_num_threads(int(os.environ.get("ISEARCH_THREADS", "1")))
    torch.manual_seed(0)
    t_start, c_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()
    timings: dict[str, float] = {}
    data = find_shared_data()

    rpn, rpn_cfg = load_rpn(args.rpn)
    if rpn.max_size and rpn.max_size != args.size:
        log(f"note: the RPN was trained at {rpn.max_size} px, images here are described at {args.size} px")
    feat = Features(args.size, args.engine)

    # ---------------------------------------------------------------- data (the one split, asserted disjoint)
    ts = splits.training_set(data)
    ukb, paris = splits.ukbench_eval(data), splits.paris_eval(data)
    splits.assert_disjoint(ts.paths, list(ukb.images) + list(paris.images) + list(paris.query_paths))
    t0 = time.perf_counter()
    tr_c5 = (feat.conv5([(p, None) for p in ts.paths], "training split") if args.train_maps == "pool4"
             else DirectConv5(feat, ts.paths))
    ukb_p4 = feat.pool4([(p, None) for p in ukb.images], "UKBench 500-999")
    ukb_c5 = feat.conv5([(p, None) for p in ukb.images], "UKBench 500-999")
    pdb_p4 = feat.pool4([(p, None) for p in paris.images], "Paris-250")
    pdb_c5 = feat.conv5([(p, None) for p in paris.images], "Paris-250")
    pq_p4 = feat.pool4([(p, None) for p in paris.query_paths], "Paris queries (full)")
    pq_c5 = feat.conv5([(p, None) for p in paris.query_paths], "Paris queries (full)")
    ukb_q = list(range(0, len(ukb.images), 4))  # first view of every object
    ukb_train = [i for i in range(len(ukb.images)) if i % 4 < args.ukb_train_views]  # detector training views
    if not args.no_detector:
        pq_flip = flipped_maps(feat, list(paris.query_paths), "Paris queries")
        uq_flip = flipped_maps(feat, [ukb.images[i] for i in ukb_train], "UKBench queries")
    timings["features_s"] = round(time.perf_counter() - t0, 1)
    ukb_gnd = ukb_instance_gnd(len(ukb.images), ukb_q, args.ukb_train_views)

    # query boxes (map frame) and query vectors (box MAC / box sum on the full query map)
    pq_boxes, pq_cells = [], []
    for i, (p, b) in enumerate(zip(paris.query_paths, paris.query_boxes)):
        hw = tuple(pq_c5[i].shape[-2:])
        pq_boxes.append(to_map_frame(b, original_size(p), hw, 16)[0])
        pq_cells.append(box_cells(b, original_size(p), hw)[0])
    uq_boxes = [np.array([0.0, 0.0, ukb_c5[i].shape[-1] * 16, ukb_c5[i].shape[-2] * 16]) for i in ukb_train]
    marks = sorted({Path(p).stem.split("_")[1] for p in paris.query_paths})
    pq_class = [marks.index(Path(p).stem.split("_")[1]) for p in paris.query_paths]
    uq_class = list(range(len(ukb_q)))

    def q_pool(c5, cell, how):
        x, y, w, h = [int(v) for v in cell]
        win = c5[:, y:y + h, x:x + w]
        return (win.sum(dim=(1, 2)) if how == "sum" else win.amax(dim=(1, 2))).numpy()

    # ---------------------------------------------------------------- IPA (Salvador Sec. 3.1)
    from instance_search.collection import fit_whitening

    t0 = time.perf_counter()
    tr_sum = np.stack([tr_c5[i].sum(dim=(1, 2)).numpy() for i in range(len(tr_c5))])
    w_ipa = fit_whitening(l2(tr_sum).astype(np.float32), trained_on="training split IPA-sum")
    grid_rows = []
    for i in range(len(tr_c5) if not args.rpa_only else 0):  # the grid whitening serves CA-SR only
        m = tr_c5[i]
        grid_rows.append(l2(region_macs(m, rmac_regions(m.shape[-2], m.shape[-1])).numpy()))
    w_reg = (fit_whitening(np.concatenate(grid_rows).astype(np.float32), trained_on="training split grid region MACs")
             if not args.rpa_only else None)
    timings["whitening_s"] = round(time.perf_counter() - t0, 1)

    def ipa_db(c5s, how):
        v = np.stack([(c5s[i].sum(dim=(1, 2)) if how == "sum" else c5s[i].amax(dim=(1, 2))).numpy()
                      for i in range(len(c5s))])
        v = l2(v)
        return l2(w_ipa.transform(v.astype(np.float32))) if how == "sum" else v

    def ipa_q(vecs, how):
        v = l2(np.stack(vecs))
        return l2(w_ipa.transform(v.astype(np.float32))) if how == "sum" else v

    ipa = {}
    for how in ("sum", "max"):
        ipa[("paris", how)] = (ipa_db(pdb_c5, how), ipa_q([q_pool(pq_c5[i], pq_cells[i], how)
                                                           for i in range(len(pq_c5))], how))
        u = ipa_db(ukb_c5, how)
        ipa[("ukb", how)] = (u, u[ukb_q])
        ipa[("ukb500", how)] = (u, u)

    results = []

    def add(method, bench, ranks_cols, extra=None):
        row = {"method": method, "dataset": bench,
               **score_ranks(ranks_cols, "paris" if bench == "paris" else "ukb", paris, ukb_gnd), **(extra or {})}
        results.append(row)
        log(json.dumps(row))
        # partial file after every row (a run cut short keeps its figures); the full meta comes at the end
        atomic_write_bytes(args.out, json.dumps({"meta": {"partial": True, "args": vars(args), "date": time.strftime(
            "%Y-%m-%d %H:%M")}, "results": results}, indent=1, default=str).encode())

    def add_ukb500(method, db):
        """The standard UKBench protocol on images 500-999: every image a query (N-S and mAP)."""
        r = ukb.evaluate(db @ db.T)
        results.append({"method": method, "dataset": "ukbench-500-every-image-a-query",
                        "ns": round(float(r["ns"]), 3), "map": round(float(r["map"]), 2)})
        log(json.dumps(results[-1]))

    def add_first_stage(method, bench, q, db):
        """The rows of a global-vector first stage: ``q`` ranked against ``db``, then with average QE of its top
        ``--qe``; returns the first ranking."""
        S = q @ db.T
        order = [np.argsort(-S[j], kind="stable") for j in range(len(q))]
        add(method, bench, order)
        qe = average_qe(q, db, S, top=args.qe)
        S2 = qe @ db.T
        add(f"{method} + QE{args.qe}", bench, [np.argsort(-S2[j], kind="stable") for j in range(len(q))])
        return order

    for how in ("sum", "max"):
        add_ukb500(f"IPA-{how}", ipa[("ukb500", how)][0])

    first_order = {}
    for bench in ("paris", "ukb"):
        for how in ("sum", "max"):
            db, q = ipa[(bench, how)]
            order = add_first_stage(f"IPA-{how}", bench, q, db)
            if how == "sum":
                first_order[bench] = order

    if args.rpa_only:
        rpa = rpa_rows(args, tr_c5, pdb_c5, list(zip(pq_c5, pq_cells)), ukb_c5, ukb_q, add_first_stage, add_ukb500)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "load_average_at_start": load_start,
                "load_average_at_end": os.getloadavg(), "size": args.size, "rpn": str(args.rpn),
                "rpn_sha256": rpn_cfg["state_sha256"], "proposals": args.proposals, "qe": args.qe,
                "train_maps": args.train_maps, "argv": sys.argv[1:], "rpa": rpa, "timings": timings,
                "this_run_wall_s": round(time.perf_counter() - t_start, 1),
                "this_run_cpu_s": round(time.process_time() - c_start, 1),
                "protocols": {"paris": "rparis6k restricted to Paris-250: 238 database images, 12 queries, revisited "
                                       "E/M/H mAP; 'RPA': the query box's cells (Caffe's RoI rounding) of the full "
                                       "query image's conv5_3 map, RPN proposals on that crop (as the IPA rows pool "
                                       "the box); 'RPA (query: whole image)': the whole query image's RPA vector",
                              "ukb": "UKBench 500-999, 125 queries (first view of each object), positives: the other "
                                     "3 views, the query junk",
                              "ukbench-500-every-image-a-query": "standard UKBench protocol on images 500-999"},
                "note": "subsets: real measurements, not comparable with published tables; the IPA rows are the "
                        "bench's own (same code as salvador_faithful.json)"}
        atomic_write_bytes(args.out, json.dumps({"meta": meta, "results": results}, indent=1, default=str).encode())
        print(f"\n{'method':<34} {'Paris E':>8} {'M':>6} {'H':>6} {'UKB-125 mAP':>12}")
        for n in dict.fromkeys(r["method"] for r in results if r["dataset"] in ("paris", "ukb")):
            p = next((r for r in results if r["method"] == n and r["dataset"] == "paris"), None)
            u = next((r for r in results if r["method"] == n and r["dataset"] == "ukb"), None)
            pe = f"{p['map_easy']:>8.2f} {p['map_medium']:>6.2f} {p['map_hard']:>6.2f}" if p else f"{'-':>26}"
            print(f"{n:<34} {pe} {u['map'] if u else float('nan'):>12.2f}")
        print(f"wall {meta['this_run_wall_s']} s, CPU {meta['this_run_cpu_s']} s; wrote {args.out}")
        return

    # ---------------------------------------------------------------- RPN proposals and region vectors of the databases
    t0 = time.perf_counter()

    def regions_of(c5s, desc):
        """(boxes, cells, region MACs) of the top proposals of every map; the boxes are cached on disk."""
        key = hashlib.sha256(f"{rpn_cfg['state_sha256']}|{Path(c5s.folder).name}|{args.proposals}".encode())
        f = CACHE / f"proposals-{key.hexdigest()[:16]}.npz"
        boxes = None
        if f.is_file():
            z = np.load(f)
            boxes = [z[f"b{i}"] for i in range(len(c5s))]
        out = []
        for i in tqdm(range(len(c5s)), desc=f"{desc}: RPN proposals + region MACs", unit="img", file=sys.stderr):
            m = c5s[i]
            b = boxes[i] if boxes is not None else rpn.propose(m, args.proposals)[0].numpy()
            cells = boxes_to_cells(b, 16, m.shape[-2], m.shape[-1])
            out.append((b, cells, region_macs(m, cells).numpy().astype(np.float32)))
        if boxes is None:
            CACHE.mkdir(parents=True, exist_ok=True)
            np.savez(f, **{f"b{i}": o[0] for i, o in enumerate(out)})
        return out

    regs = {"paris": regions_of(pdb_c5, "Paris-250"), "ukb": regions_of(ukb_c5, "UKBench 500-999")}
    timings["proposals_and_regions_s"] = round(time.perf_counter() - t0, 1)
    qbox = {(b, how): v for how in ("max", "sum") for b, v in (
        ("paris", [q_pool(pq_c5[i], pq_cells[i], how) for i in range(len(pq_c5))]),
        ("ukb", [(ukb_c5[i].amax(dim=(1, 2)) if how == "max" else ukb_c5[i].sum(dim=(1, 2))).numpy()
                 for i in ukb_q]))}
    db_c5s = {"paris": pdb_c5, "ukb": ukb_c5}
    # region vectors of the stored proposals (Salvador Sec. 3.3, rerank.py): max-pooled, L2 only (the authors');
    # sum of the 7x7 Caffe RoI bins, L2 -> the image-level IPA-sum PCA -> L2 (the authors' sum pooling); and the
    # earlier variant of this package, max-pooled, L2 -> whitening learned on grid region MACs -> L2
    VARIANTS = {"CA-SR": ("max", None), "CA-SR sum": ("sum", w_ipa), "CA-SR whitened (earlier)": ("max", w_reg)}
    if args.casr_variants:
        VARIANTS = {k: v for k, v in VARIANTS.items() if k in args.casr_variants}  # "none": no CA-SR rows
    sum_regs = ({b: [proposal_descriptors(db_c5s[b][i], r[0], "sum").numpy() for i, r in enumerate(regs[b])]
                 for b in regs} if "CA-SR sum" in VARIANTS else {})

    def raw_regions(bench, how):
        return [r[2] for r in regs[bench]] if how == "max" else sum_regs[bench]

    def rerank_all(bench, scorer, name, how="max", whitening=None, extra=None, global_qe=False):
        """scorer(j, shortlist) -> RerankResult; adds the re-ranked and the re-ranked + QE rows. QE after re-ranking
        as the authors average: the raw query box vector and the raw vectors of the top ``--qe`` images' boxes
        (re-cropped from their maps), then CA-SR of the short list with the expanded query. ``global_qe``: also the
        product's earlier QE after CA-SR (average QE, Chum et al.: the sum of the unit IPA-sum vectors of the query
        and the top ``--qe`` re-ranked images, then the whole database ranked again by it, not re-ranked)."""
        plain, withqe, withgqe = [], [], []
        dbv, qv = ipa[(bench, "sum")]
        R = raw_regions(bench, how)
        for j, order in enumerate(first_order[bench]):
            sl = order[:args.shortlist]
            res = scorer(j, sl)
            plain.append(CS.full_ranking(order, args.shortlist, res.order))
            top = res.order[:args.qe]
            box_vecs = crop_vectors([db_c5s[bench][sl[t]] for t in top], res.boxes[top], how)
            qe = CS.qe_after_rerank(qbox[(bench, how)][j], box_vecs, [R[i] for i in sl], whitening)
            withqe.append(CS.full_ranking(order, args.shortlist, qe.order))
            if global_qe:
                g = average_qe(qv[j], dbv, plain[-1][:args.qe], top=args.qe)
                withgqe.append(np.argsort(-(dbv @ g), kind="stable"))
        add(f"IPA-sum + {name}", bench, plain, extra)
        add(f"IPA-sum + {name} + QE{args.qe}", bench, withqe, extra)
        if global_qe:
            add(f"IPA-sum + {name} + global avg QE{args.qe} (earlier product path)", bench, withgqe, extra)

    # ---------------------------------------------------------------- CA-SR (Salvador Sec. 3.3)
    t0 = time.perf_counter()
    for bench in ("paris", "ukb"):
        for name, (how, wh) in VARIANTS.items():
            R = raw_regions(bench, how)
            rerank_all(bench, lambda j, sl, bench=bench, how=how, wh=wh, R=R: ca_sr_regions(
                qbox[(bench, how)][j], [R[i] for i in sl], whitening=wh,
                cells=[regs[bench][i][1] for i in sl]), name, how, wh, global_qe=name in ("CA-SR", "CA-SR sum"))
    timings["ca_sr_s"] = round(time.perf_counter() - t0, 1)

    groups, base_samples, base_hist, fcfg, ft_info = [], [], {"epochs": []}, None, {}
    if not args.no_detector:
        # ---------------------------------------------------------------- base detector on the training split
        from instance_search.train.cleaning import load_boxes

        _, recs = load_boxes(args.boxes, root=data, kept_only=True)
        base_items = []
        for i, p in enumerate(ts.paths):
            rel = Path(p).resolve().relative_to(data.resolve()).as_posix()
            if rel in recs:
                base_items.append((i, rel, int(ts.labels[i])))
        groups = sorted({g for _, _, g in base_items})
        log(f"base detector: {len(base_items)} training images with boxes, {len(groups)} groups as classes")
        t0 = time.perf_counter()
        base_samples = []
        for i, rel, g in base_items:
            hw = tuple(np.load(tr_c5.file(i), mmap_mode="r").shape[-2:])
            box = to_map_frame(recs[rel]["box"], original_size(ts.paths[i]), hw, 16)
            base_samples.append(FT.DetectorSample(box, np.array([groups.index(g) + 1]), None,
                                                  (lambda i=i: tr_c5[i]), rel))
        torch.manual_seed(0)
        base = ND.Detector(copy.deepcopy(rpn), len(groups), [str(g) for g in groups], pool=args.pool,
                           hidden=args.hidden, trunk=ND.conv5_block(feat.bb))
        base.backbone_weights_sha256 = str(getattr(feat.bb.weights, "sha256", ""))
        fcfg = FT.FinetuneConfig(base_epochs=args.base_epochs, base_lr=args.base_lr, pool=args.pool, hidden=args.hidden,
                                 epochs=args.ft_epochs, lr=args.ft_lr, epochs_2=args.ft_epochs_2, lr_2=args.ft_lr_2)
        base_hist = FT.train_base_detector(base, base_samples, fcfg, CACHE)  # as `isearch finetune --boxes` does
        timings["base_detector_s_this_run"] = round(time.perf_counter() - t0, 1)
        for e in base_hist["epochs"]:
            log(f"base detector epoch {e['epoch']}: {e['seconds']:.0f} s wall ({e['images']} images), "
                f"cls {e['train_cls']:.3f} reg {e['train_reg']:.4f}")

        # ---------------------------------------------------------------- fine-tuning on the queries, CS-SR
        ft_info = {}
        runs = ([(r.split(":")[0], int(r.split(":")[1])) for r in args.runs] if args.runs else
                [(b, st) for b in args.benches for st in args.strategies])
        for bench, strategy in runs:
            if bench not in ("paris", "ukb") or strategy not in (1, 2):
                raise SystemExit(f"--runs: bad run {bench}:{strategy} (paris|ukb : 1|2)")
        for bench, strategy in runs:
            conv2 = strategy == 2 and "lower" in FT.TRAINABLE[args.s2_trainable]
            if bench == "paris":
                qs = [{"name": Path(p).name, "label": pq_class[i] + 1, "box": pq_boxes[i], "pool4": pq_p4[i],
                       "conv5": pq_c5[i], "pool4_flip": pq_flip[i][0], "conv5_flip": pq_flip[i][1]}
                      for i, p in enumerate(paris.query_paths)]
                classes, q_class, db_p4, db_c5 = marks, pq_class, pdb_p4, pdb_c5
                q_paths, db_paths = list(paris.query_paths), list(paris.images)
            else:
                qs = [{"name": Path(ukb.images[i]).name, "label": i // 4 + 1, "box": uq_boxes[k], "pool4": ukb_p4[i],
                       "conv5": ukb_c5[i], "pool4_flip": uq_flip[k][0], "conv5_flip": uq_flip[k][1]}
                      for k, i in enumerate(ukb_train)]
                classes, q_class, db_p4, db_c5 = [f"object {k}" for k in range(len(ukb_q))], uq_class, ukb_p4, ukb_c5
                q_paths, db_paths = [ukb.images[i] for i in ukb_train], list(ukb.images)
            t0 = time.perf_counter()
            if conv2:  # strategy #2 as the paper names it: conv2_1 upwards train, from pool1 maps
                for q, a, b in zip(qs, pool1_maps(feat, q_paths, f"{bench} queries"),
                                   pool1_maps(feat, q_paths, f"{bench} queries", flip=True)):
                    q["pool1"], q["pool1_flip"] = a, b
            t_pool1 = time.perf_counter() - t0
            samples = FT.query_samples(qs)
            # phase 1 (FC layers; a second run with the same detector loads it from the checkpoint cache) and
            # phase 2 (strategy #1: FC layers; #2: --s2-trainable), as `isearch finetune` does
            t0 = time.perf_counter()
            det, hists = FT.finetune_detector(base, samples, classes, dataclasses.replace(
                fcfg, strategy=strategy, trainable_2=args.s2_trainable if strategy == 2 else None), CACHE,
                backbone=feat.bb if conv2 else None)
            hist1, hist = hists["phase1"], hists["phase2"]
            # the histories' seconds are those of the run that trained (a phase loaded from the checkpoint cache
            # keeps its original history); t_all: the wall time of both phases in this run, cache loads included
            t_p1 = sum(e["seconds"] for e in hist1["epochs"])
            t_ft = sum(e["seconds"] for e in hist["epochs"])
            t_all = time.perf_counter() - t0
            trainable = dataclasses.replace(fcfg, strategy=strategy, trainable_2=args.s2_trainable
                                            if strategy == 2 else None).phase2
            # detections on every database image, once (all classes at a time)
            t0 = time.perf_counter()
            K = len(classes)
            det_scores = np.zeros((len(db_c5), K))
            det_boxes = np.zeros((len(db_c5), K, 4))
            hw = []
            for i in tqdm(range(len(db_c5)), desc=f"CS-SR #{strategy} detections on {bench}", unit="img",
                          file=sys.stderr):
                with torch.no_grad():
                    m = (db_c5[i] if strategy == 1 else det.trunk(det.lower(pool1_of(feat, db_paths[i])[None]))[0]
                         if conv2 else det.conv_map(db_p4[i]))
                det_scores[i], det_boxes[i] = ND.class_detections(det, m, 300)
                hw.append(tuple(m.shape[-2:]))
            t_det = time.perf_counter() - t0
            tr_scores = np.zeros((len(samples), K))
            for t, s in enumerate(samples):
                with torch.no_grad():
                    m = (FT.DetectorSample._get(s.conv5) if strategy == 1
                         else det.trunk(det.lower(FT.DetectorSample._get(s.pool1)[None]))[0] if conv2
                         else det.conv_map(FT.DetectorSample._get(s.pool4)))
                tr_scores[t] = ND.class_detections(det, m, 300)[0]
            if bench == "paris":
                positives = [np.concatenate([g["easy"], g["hard"]]) for g in paris.gnd]
                ignore = [g["junk"] for g in paris.gnd]
            else:
                positives, ignore = [g["ok"] for g in ukb_gnd], [g["junk"] for g in ukb_gnd]
            diag = detector_diagnostics(det_scores, tr_scores, [int(s.labels[0]) for s in samples], q_class,
                                        positives, ignore)
            log(f"{bench} CS-SR #{strategy} detector check: {json.dumps(diag)}")
            info = {"strategy": strategy, "training_images": len(samples), "diagnostics": diag,
                    "phase1_fc": {"epochs": len(hist1["epochs"]), "lr": args.ft_lr,
                                  "seconds_per_epoch": [e["seconds"] for e in hist1["epochs"]],
                                  "cpu_seconds_per_epoch": [e["cpu_seconds"] for e in hist1["epochs"]],
                                  "train_cls_per_epoch": [round(e["train_cls"], 4) for e in hist1["epochs"]],
                                  "s_trained": round(t_p1, 1)},
                    "phase2": {"trainable": trainable, "epochs": len(hist["epochs"]), "lr": args.ft_lr_2,
                               "seconds_per_epoch": [e["seconds"] for e in hist["epochs"]],
                               "cpu_seconds_per_epoch": [e["cpu_seconds"] for e in hist["epochs"]],
                               "train_cls_per_epoch": [round(e["train_cls"], 4) for e in hist["epochs"]],
                               "s_trained": round(t_ft, 1)},
                    "finetune_s_this_run": round(t_all, 1),
                    "pool1_maps_s": round(t_pool1, 1) if conv2 else None,
                    "detection_s": round(t_det, 1),
                    "detection_ms_per_image": round(1000 * t_det / len(db_c5), 1)}
            ft_info[f"{bench}#{strategy}"] = info
            log(f"{bench} CS-SR #{strategy}: {json.dumps(info)}")

            def scorer(j, sl, bench=bench, K=K):
                k = q_class[j]  # the best proposal itself (the authors' default; class_detections' box)
                return CS.cs_sr_scores(det_scores[sl, k], det_boxes[sl, k], np.arange(len(sl))[::-1] * 1.0,
                                       [hw[i] for i in sl], 16)

            rerank_all(bench, scorer, f"CS-SR #{strategy}")

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(), "size": args.size,
        "rpn": str(args.rpn), "rpn_config": {k: rpn_cfg[k] for k in ("sizes", "ratios", "mid_channels", "max_size")},
        "shortlist": args.shortlist, "proposals": args.proposals, "qe": args.qe, "no_detector": args.no_detector,
        "s2_trainable": args.s2_trainable, "runs": args.runs, "casr_variants": list(VARIANTS),
        "train_maps": args.train_maps, "load_average_at_start": load_start, "argv": sys.argv[1:],
        "detector": {"pool": args.pool, "hidden": args.hidden, "base_classes": len(groups),
                     "base_images": len(base_samples), "base_config": vars(fcfg) if fcfg is not None else None,
                     "base_history": base_hist["epochs"],
                     "fine_tuning": ft_info, "phase1": {"epochs": args.ft_epochs, "lr": args.ft_lr},
                     "phase2": {"epochs": args.ft_epochs_2, "lr": args.ft_lr_2}},
        "paris_classes": marks, "timings": timings, "this_run_wall_s": round(time.perf_counter() - t_start, 1),
        "this_run_cpu_s": round(time.process_time() - c_start, 1), "paper": PAPER, "comparable": False,
        "protocols": {"paris": "rparis6k restricted to Paris-250: 238 database images, 12 queries (box pooled on the "
                               "full query image), revisited E/M/H mAP",
                      "ukb": f"UKBench 500-999, 125 queries (first view of each object); the first "
                             f"{args.ukb_train_views} view(s) of each object train the CS-SR detector and are junk; "
                             f"positives: the other {4 - args.ukb_train_views} views",
                      "ukbench-500-every-image-a-query": "standard UKBench protocol on images 500-999 (IPA only)"},
        "note": "subsets: real measurements, not comparable with published tables",
    }
    atomic_write_bytes(args.out, json.dumps({"meta": meta, "results": results}, indent=1, default=str).encode())
    print()
    print(f"{'method':<34} {'Paris E':>8} {'M':>6} {'H':>6} {'UKB-125 mAP':>12}")
    names = list(dict.fromkeys(r["method"] for r in results if r["dataset"] in ("paris", "ukb")))
    for n in names:
        p = next((r for r in results if r["method"] == n and r["dataset"] == "paris"), None)
        u = next((r for r in results if r["method"] == n and r["dataset"] == "ukb"), None)
        pe = f"{p['map_easy']:>8.2f} {p['map_medium']:>6.2f} {p['map_hard']:>6.2f}" if p else f"{'-':>8} {'-':>6} {'-':>6}"
        print(f"{n:<34} {pe} {u['map'] if u else float('nan'):>12.2f}")
    for r in results:
        if r["dataset"] == "ukbench-500-every-image-a-query":
            print(f"{r['method']} on all 500 UKBench queries: N-S {r['ns']:.3f}, mAP {r['map']:.2f}")
    print(f"paper: {PAPER}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
