"""Which CA-SR region vectors (Salvador et al. 2016, Sec. 3.3; rerank/ca_sr.py REGION_VECTORS) rank better, on the
cached VGG16 conv5_3 maps of 160 INRIA Holidays images (benchmarks/cache/maps, full size 325x243 -> 15x20 maps):

* first stage IPA-sum (sum-pool, L2, PCA-whitening learned on these 160 images' IPA-sum vectors, L2);
* the top ``--shortlist`` re-ranked by CA-SR over multi-scale sliding windows (no trained RPN is cached here);
  the query is the whole query image (Holidays has no boxes), its max / sum over the map;
* region vectors: ``max`` (L2 only, the authors'), ``sum`` (sum of the 7x7 Caffe RoI bins, L2, the IPA-sum PCA,
  L2, the authors'), ``max-whitened`` (L2, a whitening, L2: the earlier variant) with the whitening learned on
  R-MAC grid region MACs (as bench_salvador.py did) and with the image-level IPA-sum PCA (what an ipa index's
  whitening would give the casr re-ranker).

Holidays protocol: queries = images whose id % 100 == 0, positives = the other images of the group, the query
removed from its own ranking; mAP. The whitenings are learned on the evaluated images themselves (no other
collection is cached): the same for every variant, but optimistic. Writes results/salvador_casr_vectors.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_salvador_casr_vectors.py
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from instance_search.fitted.whitening import PCAWhitening  # noqa: E402
from instance_search.ops.normalize import l2n  # noqa: E402
from instance_search.ops.pooling import region_macs, rmac_regions  # noqa: E402
from instance_search.rerank.ca_sr import ca_sr_regions, region_descriptors, sliding_windows  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "maps" / "vgg16_conv5_3_s1_holidays160-mfull_76545606d7ac.npz"


def load_maps(path: Path):
    z = np.load(path)
    data, shapes, names = z["data"], z["shapes"], [str(n) for n in z["names"]]
    out, o = [], 0
    for c, h, w in shapes.tolist():
        out.append(torch.from_numpy(data[o:o + c * h * w].astype(np.float32).reshape(c, h, w)))
        o += c * h * w
    return out, names


def average_precision(order: np.ndarray, positives: set[int]) -> float:
    hits = np.nonzero(np.isin(order, list(positives)))[0]
    return float(np.mean((np.arange(len(hits)) + 1) / (hits + 1))) if len(hits) else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "salvador_casr_vectors.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    maps, names = load_maps(CACHE)
    ids = [int(Path(n).stem) for n in names]
    queries = [i for i, v in enumerate(ids) if v % 100 == 0]
    groups = [v // 100 for v in ids]
    ipa_sum = l2n(np.stack([m.sum(dim=(1, 2)).numpy() for m in maps]).astype(np.float64))
    w_ipa = PCAWhitening().fit(ipa_sum.astype(np.float32), shrinkage="auto")
    db = l2n(w_ipa.transform(ipa_sum.astype(np.float32)).astype(np.float64))
    grid = np.concatenate([l2n(region_macs(m, rmac_regions(*m.shape[1:])).numpy().astype(np.float64)) for m in maps])
    w_grid = PCAWhitening().fit(grid.astype(np.float32), shrinkage="auto")
    cells = [sliding_windows(*m.shape[1:]) for m in maps]
    regions = {p: [region_descriptors(m, c, p).numpy() for m, c in zip(maps, cells)] for p in ("max", "sum")}
    qvec = {"max": [maps[q].amax(dim=(1, 2)).numpy() for q in queries],
            "sum": [maps[q].sum(dim=(1, 2)).numpy() for q in queries]}
    variants = {"max (L2 only; authors)": ("max", None), "sum (IPA-sum PCA; authors)": ("sum", w_ipa),
                "max-whitened (grid-region whitening; earlier bench)": ("max", w_grid),
                "max-whitened (IPA-sum PCA; earlier casr on an ipa index)": ("max", w_ipa)}
    rows = {}
    first_aps = []
    per = {k: [] for k in variants}
    for j, q in enumerate(queries):
        pos = {i for i, g in enumerate(groups) if g == groups[q] and i != q}
        s = db @ db[q]
        s[q] = -np.inf
        order = np.argsort(-s, kind="stable")[:-1]  # the query itself last, dropped
        first_aps.append(average_precision(order, pos))
        sl = order[:args.shortlist]
        for name, (p, w) in variants.items():
            res = ca_sr_regions(qvec[p][j], [regions[p][i] for i in sl], shortlist_scores=s[sl], whitening=w)
            per[name].append(average_precision(np.concatenate([sl[res.order], order[args.shortlist:]]), pos))
    rows["IPA-sum"] = round(100 * float(np.mean(first_aps)), 2)
    for name in variants:
        rows[f"IPA-sum + CA-SR {name}"] = round(100 * float(np.mean(per[name])), 2)
    out = {"dataset": "Holidays, 160 cached images", "queries": len(queries), "shortlist": args.shortlist,
           "windows_per_image_mean": round(float(np.mean([len(c) for c in cells])), 1), "map": rows,
           "seconds": round(time.perf_counter() - t0, 1), "load_average": os.getloadavg(),
           "note": "whitenings learned on the evaluated images (none other cached); a small subset, not comparable "
                   "with published tables"}
    print(json.dumps(out, indent=1))
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
