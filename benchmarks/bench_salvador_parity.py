"""Side by side with the authors' code (Salvador, Giró-i-Nieto, Marqués & Satoh 2016, github
imatge-upc/retrieval-2016-deepvision): their numpy feature, ranking and re-ranking code (features.py, ranker.py,
rerank.py) run unchanged under Python 3 -- Caffe replaced by a numpy transcription of its ROIPooling layer and a
fake ``im_detect`` that returns synthetic conv5_3 maps, proposals and class probabilities -- and the package's
functions on the same inputs. Prints and writes the agreement per stage (benchmarks/results/salvador_parity.json).

Fetch their code first (it is not vendored here), then:

    git clone https://github.com/imatge-upc/retrieval-2016-deepvision /tmp/deepvision
    .venv/bin/python benchmarks/bench_salvador_parity.py --authors /tmp/deepvision

Edits made to their source before running it (each named in the JSON): Python 2 ``print`` statements become calls;
the query vector of ``rerank_one_query`` is shaped (1, C) only after query expansion (the released code adds (C,)
vectors to a (C, 1) column: a crash in stage ``rerank2nd``); the class-score branch of ``rerank_top_n`` reads the
class probabilities that ``im_detect`` returns (the released code indexes the ``pool5`` blob: a crash); params.py is
replaced by a dict. Synthetic world: images of exactly 16x the map size (``im_scale`` 1), so the box frames agree.
Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from instance_search.fitted.whitening import PCAWhitening  # noqa: E402
from instance_search.ops.boxes import boxes_to_cells, roi_pool  # noqa: E402
from instance_search.ops.normalize import l2n  # noqa: E402
from instance_search.ops.pooling import mac, spoc  # noqa: E402
from instance_search.rerank.ca_sr import (ca_sr_regions, crop_vectors, proposal_descriptors,  # noqa: E402
                                          query_descriptor)
from instance_search.rerank.cs_sr import cs_sr, expanded_query  # noqa: E402
from instance_search.rerank.aml import region_vectors  # noqa: E402
from reference_caffe import caffe_roi_pool  # noqa: E402  (line-by-line transcription of Caffe's layer)

C, STRIDE, N_DB, N_OTHER, R, K = 32, 16, 30, 100, 40, 3
CLASSES = ["alpha", "beta", "gamma"]


# ------------------------------------------------------------------------------------------------ synthetic world
def make_world(seed: int):
    rng = np.random.default_rng(seed)

    def one(name):
        H, W = int(rng.integers(9, 15)), int(rng.integers(9, 15))
        X = np.maximum(rng.standard_normal((C, H, W)) + rng.standard_normal((C, 1, 1)), 0).astype(np.float32)
        xy = rng.uniform(0, [W * STRIDE - 32, H * STRIDE - 32], size=(R, 2))  # as RPN boxes: >= 16 px, clipped
        wh = rng.uniform(16, [W * STRIDE, H * STRIDE], size=(R, 2))
        b = np.concatenate([xy, np.minimum(xy + wh, [W * STRIDE, H * STRIDE])], 1).astype(np.float32)
        logits = rng.standard_normal((R, K + 1)) * 2
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return {"name": name, "map": X, "boxes": b, "probs": p.astype(np.float32), "hw": (H, W)}

    db = [one(f"paris_{CLASSES[i % K]}_{i:06d}") for i in range(N_DB)]
    # a few database images share content with the queries (so that rankings are not noise)
    for i in range(K, N_DB, 4):
        src = db[i % K]["map"]
        H, W = db[i]["hw"]
        h, w = min(H, src.shape[1]), min(W, src.shape[2])
        db[i]["map"][:, :h, :w] = 0.7 * src[:, :h, :w] + 0.3 * db[i]["map"][:, :h, :w]
    other = [one(f"oxford_{i:06d}") for i in range(N_OTHER)]
    queries = []
    for k in range(2 * K):  # query image = database image k, two per class; its box in integer pixels (as the files)
        H, W = db[k]["hw"]
        x1, y1 = int(rng.integers(0, W * 8)), int(rng.integers(0, H * 8))
        x2, y2 = int(rng.integers(x1 + 40, W * STRIDE)), int(rng.integers(y1 + 40, H * STRIDE))
        queries.append({"image": k, "class": k % K, "box": [x1, y1, x2, y2],
                        "file": f"{CLASSES[k % K]}_{k // K + 1}_query.txt"})
    return db, other, queries


# ------------------------------------------------------------------------------------------------ fakes
class FakeNet:
    def __init__(self):
        self.blobs = {}


class World:
    current = None
    by_name: dict = {}


def fake_imread(path):
    item = World.by_name[Path(path).stem]
    World.current = item
    H, W = item["hw"]
    return np.zeros((H * STRIDE, W * STRIDE, 3), np.uint8)


class Pool5Blob:
    """Caffe's ``pool5`` blob of one image, computed when read (the transcription loops in Python) and kept."""

    def __init__(self, item):
        self.item = item

    @property
    def data(self):
        if "pool5" not in self.item:
            self.item["pool5"] = caffe_roi_pool(self.item["map"], self.item["boxes"], 7, 7, 1.0 / STRIDE)
        return self.item["pool5"].copy()


def fake_im_detect(net, im, boxes=None, REG_BOXES=False):
    it = World.current
    net.blobs["conv5_3"] = types.SimpleNamespace(data=it["map"][None].copy())
    net.blobs["pool5"] = Pool5Blob(it)
    if REG_BOXES:
        raise NotImplementedError("the synthetic detector has no box regression")
    return it["probs"].copy(), np.tile(it["boxes"], (1, K + 1))


def fake_modules(params):
    mods = {}
    caffe = types.ModuleType("caffe")
    caffe.TEST = 0
    caffe.set_mode_gpu = caffe.set_mode_cpu = caffe.set_device = lambda *a: None
    caffe.Net = lambda *a, **k: FakeNet()
    mods["caffe"] = caffe
    fr = types.ModuleType("fast_rcnn")
    cfgm = types.ModuleType("fast_rcnn.config")
    cfgm.cfg = types.SimpleNamespace(TEST=types.SimpleNamespace(HAS_RPN=True))
    mods["fast_rcnn"], mods["fast_rcnn.config"] = fr, cfgm
    t = types.ModuleType("test")
    t.im_detect = fake_im_detect
    mods["test"] = t
    pm = types.ModuleType("params")
    pm.get_params = lambda: dict(params)
    mods["params"] = pm
    cv = types.ModuleType("cv2")
    cv.imread = fake_imread
    mods["cv2"] = cv
    return mods


PATCHES = {
    "py2 print statements -> print()": (re.compile(r"^(\s*)print\s+(?!\()(.*)$", re.M), r"\1print(\2)"),
    "rerank.py: query vector shaped (1, C) after QE (released: (C,1) += (C,) crashes in rerank2nd)": (
        re.compile(r"^(\s*)query_feats = query_feats\.reshape\(-1, 1\)\s*$", re.M), r"\1pass"),
    "rerank.py: ... and transposed to a row there": (
        re.compile(r"^(\s*)query_feats = query_feats\.T\s*$", re.M), r"\1query_feats = query_feats.reshape(1, -1)"),
    "rerank.py: class scores from im_detect's probabilities (released: indexes the pool5 blob, crashes)": (
        re.compile(r"scores = feats\[:,cls_ind\]"), "scores = scores[:,cls_ind]"),
}


def load_authors(folder: Path, name: str, params) -> dict:
    src = (folder / f"{name}.py").read_text()
    applied = []
    for what, (rx, rep) in PATCHES.items():
        src, n = rx.subn(rep, src)
        if n:
            applied.append(f"{what} ({n}x)")
    saved = {k: sys.modules.get(k) for k in ("caffe", "fast_rcnn", "fast_rcnn.config", "test", "params", "cv2")}
    sys.modules.update(fake_modules(params))
    try:
        ns = {"__name__": f"authors_{name}", "__file__": str(folder / f"{name}.py")}
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # their `x is 'max'` comparisons
            exec(compile(src, str(folder / f"{name}.py"), "exec"), ns)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    ns["_patches"] = applied
    return ns


def with_fakes(fn, params):
    saved = {k: sys.modules.get(k) for k in ("cv2",)}
    sys.modules.update({"cv2": fake_modules(params)["cv2"]})
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# ------------------------------------------------------------------------------------------------ the comparison
def run(authors: Path, pooling: str, seed: int, work: Path) -> dict:
    db, other, queries = make_world(seed)
    World.by_name = {it["name"]: it for it in db + other}
    img = work / "images"
    for it in db:
        (img / it["name"].split("_")[1]).mkdir(parents=True, exist_ok=True)
    qdir = work / "queries"
    qdir.mkdir(exist_ok=True)
    for q in queries:
        b = q["box"]
        (qdir / q["file"]).write_text(f"{db[q['image']]['name']} {b[0]} {b[1]} {b[2]} {b[3]}\n")
    frames = [str(img / it["name"].split("_")[1] / (it["name"] + ".jpg")) for it in db]
    (work / "frames.txt").write_text("\n".join(frames) + "\n")
    (work / "queries.txt").write_text("\n".join(str(qdir / q["file"]) for q in queries) + "\n")
    for d in ("rankings", "reranking", "pca"):
        (work / d).mkdir(exist_ok=True)
    params = {"dataset": "paris", "stage": "rerank", "use_regressed_boxes": False, "use_class_scores": False,
              "gpu": False, "distance": "cosine", "pooling": pooling, "fast_rcnn_path": "", "net": "", "net_proto": "",
              "layer": "conv5_3", "dimension": C, "num_rerank": 12, "N_QE": 5, "query_names": CLASSES,
              "database_images": str(img), "query_list": str(work / "queries.txt"),
              "frame_list": str(work / "frames.txt"), "rankings_dir": str(work / "rankings"),
              "database_feats": str(work / f"feats_{pooling}.pkl"), "pca_model": str(work / "pca" / f"c5_{pooling}"),
              "reranking_path": str(work / "reranking")}
    out: dict = {"pooling": pooling}
    # their string comparisons are `is`: hand them the interned literals
    pooling = {"max": "max", "sum": "sum"}[pooling]
    params["pooling"] = pooling
    feats_mod = load_authors(authors, "features", params)
    rank_mod = load_authors(authors, "ranker", params)
    rr_mod = load_authors(authors, "rerank", params)
    out["patches"] = sorted(set(feats_mod["_patches"] + rank_mod["_patches"] + rr_mod["_patches"]))

    # ---- IPA: their Extractor + learn_transform (PCA learned on the other dataset, as they do)
    E = object.__new__(feats_mod["Extractor"])
    E.pooling, E.layer = pooling, "conv5_3"
    E.net = FakeNet()
    theirs_raw = with_fakes(lambda: np.stack([E.pool_feats(E.extract_feat_image(f).squeeze()) for f in frames]), params)
    other_raw = with_fakes(lambda: np.stack([E.pool_feats(E.extract_feat_image(
        str(img / "x" / (o["name"] + ".jpg"))).squeeze()) for o in other]), params)
    feats_mod["learn_transform"](dict(params, dataset="oxford"), other_raw)
    pickle.dump(theirs_raw, open(params["database_feats"], "wb"))
    Rk = rank_mod["Ranker"](dict(params))
    ours_raw = np.stack([(spoc if pooling == "sum" else mac)(torch.from_numpy(it["map"])).numpy() for it in db])
    W = PCAWhitening().fit(l2n(np.stack([(spoc if pooling == "sum" else mac)(torch.from_numpy(o["map"])).numpy()
                                         for o in other])).astype(np.float32), dim=C, shrinkage=0.0)
    ours = l2n(ours_raw.astype(np.float64))
    if pooling == "sum":
        ours = l2n(W.transform(ours.astype(np.float32)).astype(np.float64))
    out["ipa_vectors_max_abs_diff"] = float(np.abs(ours - Rk.db_feats).max())

    # ---- first-stage ranking (the query = the whole query image's database vector, the paper's first stage)
    Rk.get_query_vectors()
    Rk.rank()
    theirs_rank = [Path(os.path.join(params["rankings_dir"], q["file"].split("_query")[0] + ".txt")).read_text()
                   .split() for q in queries]
    name_pos = {it["name"]: i for i, it in enumerate(db)}
    ours_S = ours[[q["image"] for q in queries]] @ ours.T
    ours_rank = [np.argsort(-s, kind="stable") for s in ours_S]
    out["first_stage_rankings_identical"] = sum(
        [name_pos[n] for n in t] == o.tolist() for t, o in zip(theirs_rank, ours_rank))
    out["queries"] = len(queries)
    # first-stage QE (their stage 'QE': the top 5 of the ranking, the query image itself among them)
    Rk.stage = "QE"
    Rk.get_query_vectors()
    qe_ours = l2n(np.stack([ours[q["image"]] + ours[o[:5]].sum(0) for q, o in zip(queries, ours_rank)]))
    out["first_stage_qe_vectors_max_abs_diff"] = float(np.abs(qe_ours - Rk.query_feats).max())
    Rk.stage = "rerank"
    Rk.get_query_vectors()
    Rk.rank()

    # ---- CA-SR (their rerank.py, use_class_scores False) over the short list of the first stage
    RR = with_fakes(lambda: rr_mod["Reranker"](dict(params)), params)
    whitening = W if pooling == "sum" else None
    diffs, same_best, same_order, q_cos, q_cells_same = [], 0, 0, [], 0
    ours_first = {}
    for j, q in enumerate(queries):
        Xq = db[q["image"]]["map"]
        theirs_q = with_fakes(lambda: RR.get_query_local_feat(str(qdir / q["file"])), params)
        cells = boxes_to_cells(np.array([q["box"]], np.float64), STRIDE, *Xq.shape[1:])[0]
        ours_q = query_descriptor(torch.from_numpy(Xq), pooling, cells)
        q_cos.append(float(l2n(ours_q.astype(np.float64)) @ l2n(theirs_q.astype(np.float64))))
        x1, y1, x2, y2 = [int(v / STRIDE) for v in q["box"]]  # theirs: int() of the scaled ints, end-exclusive
        q_cells_same += int(list(cells) == [x1, y1, x2 - x1, y2 - y1])
        Rk.rank()  # their re-ranking rewrites the ranking file: start each from the first stage's
        with_fakes(lambda: RR.rerank_one_query(str(qdir / q["file"]), 1), params)
        with open(Path(params["reranking_path"]) / (q["file"].split("_query")[0] + ".pkl"), "rb") as f:
            dist, locs, frs, _ = (pickle.load(f) for _ in range(4))
        sl = [name_pos[n] for n in theirs_rank[j][:params["num_rerank"]]]
        for qvec, tag in ((theirs_q, "their_query"), (ours_q, "our_query")):
            regs = [proposal_descriptors(torch.from_numpy(db[i]["map"]), db[i]["boxes"], pooling).numpy() for i in sl]
            res = ca_sr_regions(qvec, regs, whitening=whitening)
            if tag == "their_query":
                diffs.append(float(np.abs(res.scores - (1 - np.asarray(dist))).max()))
                qv = region_vectors(qvec, whitening)[0].numpy()
                best = [int(np.argmax(region_vectors(r, whitening).numpy() @ qv)) for r in regs]
                same_best += sum(np.allclose(db[i]["boxes"][b], l) for i, b, l in zip(sl, best, locs))
                same_order += int(list(np.argsort(-res.scores, kind="stable")) == list(np.argsort(dist)))
            else:
                ours_first[j] = (sl, regs, res, ours_q)
    out["query_box_vector_cosine_min"] = min(q_cos)
    out["query_box_cells_same_as_theirs"] = q_cells_same
    out["ca_sr_score_max_abs_diff"] = max(diffs)
    out["ca_sr_best_proposal_same"] = f"{same_best} of {len(queries) * params['num_rerank']}"
    out["ca_sr_rerank_order_identical"] = same_order

    # ---- QE after re-ranking (their stage 'rerank2nd': raw query box vector + the top-5 re-cropped boxes)
    RR.stage = "rerank2nd"
    qe_diffs, qe_same, recrop_same = {}, {}, 0
    for j, q in enumerate(queries):
        with open(Path(params["reranking_path"]) / (q["file"].split("_query")[0] + ".pkl"), "rb") as f:
            dist, locs, frs, _ = (pickle.load(f) for _ in range(4))
        Rk.rank()  # their re-ranking rewrites the ranking file: start each from the first stage's
        with_fakes(lambda: RR.rerank_one_query(str(qdir / q["file"]), 1), params)
        with open(Path(params["reranking_path"]) / (q["file"].split("_query")[0] + ".pkl"), "rb") as f:
            dist2 = pickle.load(f)
        sl = [name_pos[n] for n in theirs_rank[j][:params["num_rerank"]]]
        theirs_q = with_fakes(lambda: RR.get_query_local_feat(str(qdir / q["file"])), params)
        top = np.argsort(dist)[:5]
        # ours: the boxes that won, re-cropped (cells of the one RoI projection), raw, averaged with the query
        top_maps = [torch.from_numpy(db[sl[t]]["map"]) for t in top]
        top_cells = [boxes_to_cells(np.asarray(locs[t], np.float64)[None], STRIDE, *db[sl[t]]["hw"])[0] for t in top]
        regs = [proposal_descriptors(torch.from_numpy(db[i]["map"]), db[i]["boxes"], pooling).numpy() for i in sl]
        # their re-crop: floor(x1 * mult) .. ceil(x2 * mult), end-exclusive (mult = map / image size = 1/16 here)
        their_cells = [[int(np.floor(l[0] / STRIDE)), int(np.floor(l[1] / STRIDE)),
                        int(np.ceil(l[2] / STRIDE)) - int(np.floor(l[0] / STRIDE)),
                        int(np.ceil(l[3] / STRIDE)) - int(np.floor(l[1] / STRIDE))] for l in (locs[t] for t in top)]
        for cells_used, key in ((top_cells, ""), (their_cells, "_with_their_recrop_cells")):
            v = expanded_query(theirs_q, crop_vectors(top_maps, np.stack(cells_used), pooling), whitening)
            sc = np.array([float((region_vectors(r, whitening).numpy() @ v).max()) for r in regs])
            qe_diffs.setdefault(key, []).append(float(np.abs(sc - (1 - np.asarray(dist2))).max()))
            qe_same[key] = qe_same.get(key, 0) + int(list(np.argsort(-sc, kind="stable")) == list(np.argsort(dist2)))
        recrop_same += sum(list(a) == list(b) for a, b in zip(top_cells, their_cells))
    for key in qe_diffs:
        out[f"qe_after_rerank_score_max_abs_diff{key}"] = max(qe_diffs[key])
        out[f"qe_after_rerank_order_identical{key}"] = qe_same[key]
    out["qe_recrop_cells_same_as_theirs"] = f"{recrop_same} of {5 * len(queries)}"
    RR.stage = "rerank"

    # ---- CS-SR (use_class_scores True, patched): best proposal by the query class's probability
    RR.class_scores = True
    cs_diff, cs_box, cs_order = [], 0, 0
    for j, q in enumerate(queries):
        Rk.rank()  # their re-ranking rewrites the ranking file: start each from the first stage's
        with_fakes(lambda: RR.rerank_one_query(str(qdir / q["file"]), 1), params)
        with open(Path(params["reranking_path"]) / (q["file"].split("_query")[0] + ".pkl"), "rb") as f:
            dist, locs = pickle.load(f), pickle.load(f)
        sl = [name_pos[n] for n in theirs_rank[j][:params["num_rerank"]]]

        class StubDetector:  # what cs_sr reads of a Detector: detect(), the class count, the RPN's stride
            head = types.SimpleNamespace(num_classes=K)
            rpn = types.SimpleNamespace(stride=STRIDE)

            def detect(self, fmap, proposals):
                it = next(d for d in db if d["map"].shape == tuple(fmap.shape)
                          and np.array_equal(d["map"], fmap.numpy()))
                b = torch.from_numpy(it["boxes"])
                return b, torch.from_numpy(it["probs"]), b[:, None, :].expand(R, K + 1, 4)

        res = cs_sr(StubDetector(), q["class"], [torch.from_numpy(db[i]["map"]) for i in sl])
        cs_diff.append(float(np.abs(res.scores - np.asarray(dist)).max()))
        cs_box += sum(np.array_equal(boxes_to_cells(np.asarray(l, np.float64)[None], STRIDE, *db[i]["hw"])[0], b)
                      for i, l, b in zip(sl, locs, res.boxes))
        cs_order += int(list(res.order) == list(np.argsort(-np.asarray(dist), kind="stable")))
    out["cs_sr_score_max_abs_diff"] = max(cs_diff)
    out["cs_sr_box_same"] = f"{cs_box} of {len(queries) * params['num_rerank']}"
    out["cs_sr_order_identical"] = cs_order

    # ---- the RoI pooling itself: the package's roi_pool against the transcription of Caffe's layer
    rd = max(float(np.abs(roi_pool(torch.from_numpy(it["map"]), it["boxes"], 7, STRIDE).numpy()
                          - it["pool5"]).max()) for it in db if "pool5" in it)
    out["roi_pool_max_abs_diff_vs_caffe_transcription"] = rd
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors", type=Path, required=True,
                    help="a checkout of github.com/imatge-upc/retrieval-2016-deepvision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "salvador_parity.json")
    args = ap.parse_args()
    missing = [n for n in ("features.py", "ranker.py", "rerank.py") if not (args.authors / n).is_file()]
    if missing:
        sys.exit(f"{args.authors}: not a checkout of imatge-upc/retrieval-2016-deepvision "
                 f"(missing {', '.join(missing)})")
    rows = []
    for pooling in ("max", "sum"):
        with tempfile.TemporaryDirectory(prefix="salvador-parity-") as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                rows.append(run(args.authors.resolve(), pooling, args.seed, Path(tmp)))
            finally:
                os.chdir(cwd)
        print(json.dumps(rows[-1], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"authors_code": str(args.authors), "seed": args.seed,
                                    "world": {"channels": C, "database": N_DB, "pca_images": N_OTHER,
                                              "proposals": R, "classes": K, "stride": STRIDE},
                                    "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
