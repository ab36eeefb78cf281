"""Side by side with the authors' code: Hoang et al. 2017's selective features here and in
github hnanhtuan/selectiveConvFeatures_ACMMM_reproducibility (MATLAB + C), run under GNU Octave.

Not part of the test suite (needs Octave, its MEX compiler and the authors' code, which the user fetches):

    apt-get install octave octave-vlfeat liboctave-dev
    git clone https://github.com/hnanhtuan/selectiveConvFeatures_ACMMM_reproducibility /tmp/hoang-authors
    .venv/bin/python benchmarks/bench_hoang_parity.py --authors /tmp/hoang-authors      # -> results/hoang_parity.json
    .venv/bin/python benchmarks/bench_hoang_parity.py --authors /tmp/hoang-authors --sift 20   # + detector density

Same inputs on both sides: VGG16 conv5_3 maps of Holidays-811 photos and their SIFT keypoints (this project's
detector; the authors' ``apply_mask.m`` gets them as 1-based vl_sift frames), and this project's fitted local
PCA, codebook and embedding whitening (``param.desc_mean, Ud, C, Xmean, Pemb`` / ``B, mu``) given to the
authors' ``embedding.m``. Per test image it reports: the kept cells of the MAX / SUM / SIFT masks (equal sets?),
the cosine of the T-emb per-feature ``L2(P_emb (R(x) - R0))``, of the democratic aggregate, of the rotation
normalisation's leading coordinates (the authors' ``learn_rn.m`` fitted on the same aggregated training vectors;
absolute values, eigenvector signs being a convention) and of the F-FAemb aggregate (the authors' closed-form
coefficients and ``fa_embedding.c``). ``--sift N`` also counts vl_sift's keypoints on N images against OpenCV's
(the measurement behind ``ops.masks.VLSIFT_LIKE``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _octave(script: str, cwd: Path) -> None:
    (cwd / "run.m").write_text(script)
    proc = subprocess.run(["octave-cli", "-q", "--no-gui", "run.m"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0 and "ignoring const execution_exception" not in proc.stderr:
        raise RuntimeError(f"octave failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _compile_mex(authors: Path, out: Path) -> None:
    for name, srcs in (("triemb_res", ["utils/triemb/triemb_res.c", "utils/triemb/triemb.c"]),
                       ("fa_embedding", ["utils/faemb_mex/fa_embedding.c", "utils/faemb_mex/faemb.c"])):
        if not (out / f"{name}.mex").exists():
            subprocess.run(["mkoctfile", "--mex", "-o", str(out / f"{name}.mex"), *[str(authors / s) for s in srcs]],
                           check=True, capture_output=True)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def parity(authors: Path, n_test: int, n_train: int, work: Path) -> dict:
    from scipy.io import loadmat, savemat

    from instance_search.eval.sweeps import BenchSpec, conv_maps
    from instance_search.fitted.rotation import RotationNormalisation
    from instance_search.ops.masks import masked_features
    from instance_search.recipes.hoang import Selective, mask_cells

    spec = BenchSpec("holidays", limit=100 + n_train, max_size=None)
    maps, kps, hws = conv_maps(spec, "conv5_3", 1.0, keypoints=True, engine="exact")
    maps = [np.asarray(m, np.float32) for m in maps]
    test, train = list(range(n_test)), list(range(100, 100 + n_train))  # training images: other scenes
    d, k, drop = 32, 10, 16  # drop < n_train - 1: the RN of n_train images spans n_train - 1 axes
    temb = Selective("max", "temb", "democratic", d=d, k=k, drop=drop)
    temb.fit([maps[i] for i in train], [kps[i] for i in train], [hws[i] for i in train])
    ffa = Selective("max", "ffaemb", "democratic", d=8, k=6, drop=8)
    ffa.fit([maps[i] for i in train], [kps[i] for i in train], [hws[i] for i in train])
    ltrain = np.stack([temb.raw(maps[i], kps[i], hws[i]) for i in train])  # aggregated, L2 (vecpostproc)
    param = {"desc_mean": temb.pca.mean[:, None], "Ud": temb.pca.components.T, "C": temb.codebook.centroids.T,
             "Xmean": temb.emb_mean[:, None], "Pemb": temb.emb_proj, "d": d, "k": k}
    paramf = {"desc_mean": ffa.pca.mean[:, None], "Ud": ffa.pca.components.T, "B": ffa.codebook.centroids.T,
              "Xmean": ffa.emb_mean[:, None], "Pemb": ffa.emb_proj, "mu": ffa.mu, "d": 8, "k": 6}
    savemat(work / "param.mat", {"param": {a: np.asarray(b, np.float32) for a, b in param.items()},
                                 "paramf": {a: np.asarray(b, np.float32) for a, b in paramf.items()},
                                 "Ltrain": ltrain.T.astype(np.float32)})
    for i in test:
        savemat(work / f"img{i}_fea.mat", {"fea": np.ascontiguousarray(maps[i].transpose(1, 2, 0))})
        f = (np.asarray(kps[i], np.float64) + 1.0).T  # 1-based (x; y) frames
        savemat(work / f"img{i}_sift.mat", {"f": f, "H": float(hws[i][0]), "W": float(hws[i][1])})
    lines = [f"addpath('{work}'); addpath(genpath('{authors / 'utils'}')); addpath('{work}');",
             "load('param.mat'); param.d = double(param.d); param.k = double(param.k);",
             "paramf.mu = double(paramf.mu);",
             f"param = learn_rn(double(Ltrain), param);"]
    for i in test:
        fn = f"img{i}_fea.mat"
        lines += [f"Xmax = apply_mask('{fn}', 'max'); Xsum = apply_mask('{fn}', 'sum'); Xsift = apply_mask('{fn}', 'sift');",
                  "xe = yael_vecs_normalize(param.Ud' * bsxfun(@minus, Xmax, param.desc_mean), 2, 0);",
                  "phi = yael_vecs_normalize(triemb_map(single(xe), param.C, param.Pemb, param.Xmean));",
                  "v = vecpostproc(embedding(single(Xmax), param, 'tembsink'));",
                  "r = param.P' * bsxfun(@minus, double(v), param.Xm);",
                  "vf = vecpostproc(embedding(single(Xmax), paramf, 'faemb'));",
                  f"save('-v7', 'out{i}.mat', 'Xmax', 'Xsum', 'Xsift', 'phi', 'v', 'r', 'vf');"]
    _octave("\n".join(lines) + "\n", work)
    rot = RotationNormalisation(0, components=1024).fit(ltrain)
    out, finals = {}, {}
    for i in test:
        o = loadmat(work / f"out{i}.mat")
        row = {}
        for mask, key in (("max", "Xmax"), ("sum", "Xsum"), ("sift", "Xsift")):
            ours = {tuple(np.round(x, 4)) for x in masked_features(maps[i], mask_cells(maps[i], mask, kps[i], hws[i]))}
            theirs = {tuple(np.round(x, 4)) for x in o[key].T}
            row[f"mask_{mask}"] = {"ours": len(ours), "authors": len(theirs), "same_cells": ours == theirs}
        x = temb.select(maps[i], kps[i], hws[i])
        phi = temb.embed(o["Xmax"].T.astype(np.float32)).numpy()  # the authors' cell order (column-major)
        phi /= np.linalg.norm(phi, axis=1, keepdims=True)
        row["temb_phi_cosine_min"] = min(_cos(a, b) for a, b in zip(phi, o["phi"].T))
        v = temb.aggregate(temb.embed(x))
        row["temb_aggregate_cosine"] = _cos(v, o["v"])
        r_ours, r_auth = rot.transform(v), o["r"].ravel()
        lead = rot.basis.shape[1]
        row["rn_leading_abs_cosine"] = _cos(np.abs(r_ours[:lead]), np.abs(r_auth[:lead]))
        row["ffaemb_aggregate_cosine"] = _cos(ffa.aggregate(ffa.embed(x)), o["vf"])
        finals[i] = (_final(r_ours[drop:]), _final(r_auth[drop:]))
        out[str(spec.images[i].name)] = row
        print(spec.images[i].name, json.dumps(row), flush=True)
    # final descriptors (RN with `drop` leading coordinates removed, power law 0.5, L2): the image-to-image
    # cosines on both sides (the complements of the learned RN axes differ, see docs/papers/hoang.md)
    pairs = {}
    for a in test:
        for b in test:
            if a < b:
                pairs[f"{spec.images[a].name}-{spec.images[b].name}"] = {
                    "ours": round(float(finals[a][0] @ finals[b][0]), 6),
                    "authors": round(float(finals[a][1] @ finals[b][1]), 6)}
    print(json.dumps(pairs), flush=True)
    return {"per_image": out, "final_pairwise_cosines": pairs}


def _final(y) -> np.ndarray:
    y = np.sign(y) * np.abs(y) ** 0.5
    return y / max(np.linalg.norm(y), 1e-12)


def sift_density(vlfeat: Path, n: int, work: Path) -> dict:
    from instance_search.eval.datasets import load_benchmark
    from instance_search.images import load_image
    from instance_search.ops.masks import sift_keypoints

    bench = load_benchmark("holidays")
    idx = np.linspace(0, len(bench.images) - 1, n).astype(int)
    imgs = {}
    for i in idx:
        g = load_image(bench.images[i], max_size=1024).convert("L")
        imgs[int(i)] = g
        np.asarray(g, np.uint8).T.tofile(work / f"g{i}.raw")
    lst = "\n".join(f"{i} {imgs[i].height} {imgs[i].width}" for i in imgs)
    (work / "list.txt").write_text(lst + "\n")
    _octave(f"addpath('{vlfeat}');\n" + "L = load('list.txt'); fo = fopen('vl_counts.txt', 'w');\n"
            "for i = 1:size(L,1)\n fid = fopen(sprintf('g%d.raw', L(i,1)), 'r');\n"
            " I = fread(fid, [L(i,3), L(i,2)], 'uint8')'; fclose(fid);\n"
            " [f, ~] = vl_sift(single(I), 'PeakThresh', 4, 'edgethresh', 10);\n"
            " fprintf(fo, '%d %d\\n', L(i,1), size(f,2));\nend\nfclose(fo);\n", work)
    vl = dict(np.loadtxt(work / "vl_counts.txt", dtype=int).reshape(-1, 2))
    res = {"vl_sift": int(sum(vl.values())), "images": len(imgs)}
    for name, kw in (("opencv_defaults", {"contrast_threshold": 0.04, "first_octave": -1}), ("VLSIFT_LIKE", {})):
        res[name] = int(sum(len(sift_keypoints(im, **kw)) for im in imgs.values()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors", type=Path, required=True, help="checkout of the authors' repository")
    ap.add_argument("--images", type=int, default=3, help="test images compared")
    ap.add_argument("--train", type=int, default=60, help="training images (fit on both sides' inputs)")
    ap.add_argument("--sift", type=int, default=0, help="also count vl_sift keypoints on this many images")
    ap.add_argument("--vlfeat", type=Path, help="folder of vl_sift.mex (default: Debian's octave-vlfeat)",
                    default=Path("/usr/lib/x86_64-linux-gnu/octave/site/oct/x86_64-pc-linux-gnu/vlfeat/toolbox"))
    args = ap.parse_args()
    if shutil.which("octave-cli") is None or shutil.which("mkoctfile") is None:
        raise SystemExit("needs octave-cli and mkoctfile: apt-get install octave octave-vlfeat liboctave-dev")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _compile_mex(args.authors, work)
        out = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "authors": str(args.authors),
               **parity(args.authors.resolve(), args.images, args.train, work)}
        if args.sift:
            out["sift_keypoints"] = sift_density(args.vlfeat, args.sift, work)
            print(json.dumps(out["sift_keypoints"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hoang_parity.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
