"""Automatic cleaning and box estimation (Gordo et al. 2016, Sec. 4.1) on real UKBench and Paris photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from instance_search.eval.datasets.splits import TrainingSet
from instance_search.train import cleaning as cl

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------------------
# Geometric median, box projection, components, diffusion: against slow, obviously correct references
# ---------------------------------------------------------------------------------------------------------

def _gm_objective(y, x, w):
    return float((w * np.linalg.norm(x - y, axis=1)).sum())


@pytest.mark.parametrize("n,d,weighted", [(5, 2, False), (12, 4, False), (9, 4, True), (40, 3, True)])
def test_geometric_median_matches_scipy_minimiser(n, d, weighted):
    from scipy.optimize import minimize

    x = RNG.normal(size=(n, d)) * [50.0] * d + 100.0
    w = RNG.uniform(0.2, 3.0, size=n) if weighted else np.ones(n)
    y = cl.geometric_median(x, w if weighted else None)
    best = None
    for start in [x.mean(0), np.median(x, 0), *x[:5]]:  # several starts: the objective is convex anyway
        r = minimize(_gm_objective, start, args=(x, w), method="Nelder-Mead",
                     options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 40000, "maxfev": 40000})
        best = r if best is None or r.fun < best.fun else best
    assert _gm_objective(y, x, w) <= best.fun + 1e-6 * best.fun
    assert np.allclose(y, best.x, atol=1e-3 * 50)


def test_geometric_median_brute_force_grid_2d():
    x = np.array([[0.0, 0.0], [10.0, 0.0], [3.0, 8.0], [7.0, 9.0], [4.0, 2.0]])
    y = cl.geometric_median(x)
    g = np.linspace(0, 10, 1001)
    gx, gy = np.meshgrid(g, g)
    cand = np.stack([gx.ravel(), gy.ravel()], 1)
    obj = np.linalg.norm(cand[:, None, :] - x[None], axis=2).sum(1)
    assert _gm_objective(y, x, np.ones(5)) <= obj.min() + 1e-9
    assert np.linalg.norm(y - cand[obj.argmin()]) < 0.02


def test_geometric_median_at_a_data_point():
    # Collinear points 0, 1, 10: the minimiser is the middle data point (plain Weiszfeld would stall near it).
    y = cl.geometric_median(np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]]))
    assert np.allclose(y, [1.0, 0.0], atol=1e-6)
    # A point carrying more than half the weight is the minimiser.
    y = cl.geometric_median(np.array([[0.0, 0.0], [5.0, 1.0], [2.0, 7.0]]), weights=[5.0, 1.0, 1.0])
    assert np.allclose(y, [0.0, 0.0], atol=1e-9)
    assert np.allclose(cl.geometric_median(np.array([[3.0, 4.0, 5.0, 6.0]])), [3, 4, 5, 6])
    with pytest.raises(ValueError, match="weights"):
        cl.geometric_median(np.ones((3, 2)), weights=[1, -1, 1])
    with pytest.raises(ValueError, match="points"):
        cl.geometric_median(np.zeros((0, 4)))


def test_geometric_median_batch_equals_single():
    x = RNG.normal(size=(6, 7, 4)) * 30
    w = (RNG.uniform(size=(6, 7)) > 0.3).astype(float)
    w[:, 0] = 1.0
    got = cl.geometric_median_batch(x, w)
    for m in range(6):
        keep = w[m] > 0
        assert np.allclose(got[m], cl.geometric_median(x[m][keep]), atol=1e-6)


def _random_affine():
    th = RNG.uniform(-np.pi, np.pi)
    L = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.diag(RNG.uniform(0.5, 2.0, 2))
    return np.hstack([L, RNG.uniform(-100, 100, (2, 1))])


def test_project_box_against_sampled_parallelogram():
    for _ in range(5):
        A = _random_affine()
        box = np.array([10.0, 20.0, 110.0, 70.0])
        # corners: rectangle around densely sampled boundary points of the mapped box
        t = np.linspace(0, 1, 401)
        edge = np.concatenate([np.stack([10 + 100 * t, np.full_like(t, 20)], 1),
                               np.stack([10 + 100 * t, np.full_like(t, 70)], 1),
                               np.stack([np.full_like(t, 10), 20 + 50 * t], 1),
                               np.stack([np.full_like(t, 110), 20 + 50 * t], 1)])
        q = edge @ A[:, :2].T + A[:, 2]
        ref = [q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()]
        assert np.allclose(cl.project_box(box, A, mode="corners"), ref, atol=1e-6)
        # moments: a uniform sample inside the box, mapped; centre = mean, side = sqrt(12 var)
        u = np.stack([RNG.uniform(10, 110, 200000), RNG.uniform(20, 70, 200000)], 1) @ A[:, :2].T + A[:, 2]
        c, side = u.mean(0), np.sqrt(12 * u.var(0))
        got = cl.project_box(box, A, mode="moments")
        assert np.allclose(got, [*(c - side / 2), *(c + side / 2)], atol=0.01 * side.max())
    # scaling + translation: both modes are exact
    A = np.array([[2.0, 0, 5], [0, 0.5, -3]])
    for mode in ("corners", "moments"):
        assert np.allclose(cl.project_box([1, 2, 3, 4], A, mode=mode), [7, -2, 11, -1])
    with pytest.raises(ValueError, match="mode"):
        cl.project_box([0, 0, 1, 1], A, mode="nope")


def _components_bfs(n, pairs):
    adj = {i: set() for i in range(n)}
    for i, j in pairs:
        adj[i].add(j)
        adj[j].add(i)
    seen, comps = set(), []
    for s in range(n):
        if s in seen:
            continue
        stack, comp = [s], set()
        while stack:
            v = stack.pop()
            if v not in comp:
                comp.add(v)
                stack.extend(adj[v] - comp)
        seen |= comp
        comps.append(sorted(comp))
    return comps


def test_largest_component_against_bfs():
    for trial in range(20):
        n = int(RNG.integers(1, 15))
        pairs = [(int(i), int(j)) for i, j in RNG.integers(0, n, size=(int(RNG.integers(0, 12)), 2)) if i != j]
        comps = _components_bfs(n, pairs)
        nodes, sizes = cl.largest_component(n, pairs)
        assert len(nodes) == max(len(c) for c in comps)
        assert sorted(nodes.tolist()) in comps
        for c in comps:
            assert all(sizes[v] == len(c) for v in c)


def _edge(i, j, A):
    return cl.Edge(i, j, 20, np.asarray(A, float), np.zeros(4), np.zeros(4))


def test_diffusion_two_nodes_closed_form():
    # Identity affine between two images: B1 <- 0.9 B1 + 0.1 B2 and vice versa, so both go to the mean and
    # their difference shrinks by (1 - 2 alpha) = 0.8 per round.
    b1, b2 = np.array([10.0, 10, 50, 60]), np.array([20.0, 0, 70, 40])
    out, rounds, ok = cl.diffuse_boxes([b1, b2], [_edge(0, 1, [[1, 0, 0], [0, 1, 0]])], [(100, 100)] * 2,
                                       alpha=0.1, tol=1e-6, max_iter=10000)
    assert ok
    assert np.allclose(out[0], (b1 + b2) / 2, atol=1e-5) and np.allclose(out[1], (b1 + b2) / 2, atol=1e-5)
    expect = np.ceil(np.log(1e-6 / (0.1 * np.abs(b1 - b2).max())) / np.log(0.8)) + 1
    assert abs(rounds - expect) <= 1


def test_diffusion_reaches_a_consistent_consensus():
    # A chain of consistent scale+translation transforms: the fixed point satisfies B_j = A_ij B_i exactly.
    T = [np.array([[1.0, 0, 0], [0, 1, 0]]), np.array([[0.8, 0, 30], [0, 0.8, 10]]),
         np.array([[1.25, 0, -20], [0, 1.25, 5]])]
    true = [cl.project_box([100, 100, 300, 250], A) for A in T]  # the object in each image
    def rel(a, b):  # transform from image a to image b
        Ta, Tb = np.vstack([T[a], [0, 0, 1]]), np.vstack([T[b], [0, 0, 1]])
        return (Tb @ np.linalg.inv(Ta))[:2]
    edges = [_edge(0, 1, rel(0, 1)), _edge(1, 2, rel(1, 2)), _edge(0, 2, rel(0, 2))]
    noisy = [t + RNG.normal(0, 15, 4) for t in true]
    out, rounds, ok = cl.diffuse_boxes(noisy, edges, [(1000, 1000)] * 3, tol=1e-4)
    assert ok
    for e in edges:
        assert np.allclose(cl.project_box(out[e.i], e.affine), out[e.j], atol=0.05)
    # the consensus is no further from the truth than the noisy starts, on average
    err0 = np.mean([np.abs(n - t).mean() for n, t in zip(noisy, true)])
    err1 = np.mean([np.abs(o - t).mean() for o, t in zip(out, true)])
    assert err1 < err0
    with pytest.raises(ValueError, match="no initial box"):
        cl.diffuse_boxes([None, true[1]], edges[:1], [(1000, 1000)] * 2)


# ---------------------------------------------------------------------------------------------------------
# SIFT matching on real photos
# ---------------------------------------------------------------------------------------------------------

def test_ratio_matches_equal_opencv_bruteforce(ukbench):
    import cv2

    fa = cl.sift_features(ukbench / "ukbench00000.jpg")
    fb = cl.sift_features(ukbench / "ukbench00001.jpg")
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(fa.descriptors, fb.descriptors, k=2)
    best = {}
    for m in knn:
        if m[0].distance < 0.8 * m[1].distance and (m[0].trainIdx not in best or
                                                     m[0].distance < best[m[0].trainIdx][0]):
            best[m[0].trainIdx] = (m[0].distance, m[0].queryIdx)
    ref = sorted((q, t) for t, (_, q) in best.items())
    q, t = cl.ratio_matches(fa.descriptors, fb.descriptors, 0.8)
    assert len(ref) > 50
    assert sorted(zip(q.tolist(), t.tolist())) == ref


def test_match_pair_recovers_a_known_affine(ukbench, tmp_path):
    """A UKBench photo against a copy warped by a known affine: the recovered transform (in ORIGINAL pixels,
    although SIFT ran on 512-px copies) maps the image corners where the true one does."""
    import cv2
    from PIL import Image

    img = np.asarray(Image.open(ukbench / "ukbench00040.jpg").convert("RGB"))
    th = np.deg2rad(12)
    A = np.array([[0.8 * np.cos(th), -0.8 * np.sin(th), 90], [0.8 * np.sin(th), 0.8 * np.cos(th), 20]])
    warped = cv2.warpAffine(img, A, (800, 560), borderValue=(0, 0, 0))
    Image.fromarray(warped).save(tmp_path / "warped.png")
    fa = cl.sift_features(ukbench / "ukbench00040.jpg", max_side=512)
    fb = cl.sift_features(tmp_path / "warped.png", max_side=512)
    assert fa.size == (640, 480) and fb.size == (800, 560)
    m = cl.match_pair(fa, fb)
    assert m.score > 100 and m.affine is not None
    corners = np.array([[0, 0, 1], [640, 0, 1], [0, 480, 1], [640, 480, 1]], float)
    err = np.linalg.norm(corners @ m.affine.T - corners @ A.T, axis=1)
    assert err.max() < 4.0, err
    # inliers really satisfy the model, in original pixels
    pred = m.inliers_a @ m.affine[:, :2].T + m.affine[:, 2]
    assert np.median(np.linalg.norm(pred - m.inliers_b, axis=1)) < 2.0
    # a mirrored copy has no plausible (orientation-preserving) affine
    mirror = cl.sift_features(Image.fromarray(np.ascontiguousarray(img[:, ::-1])))
    assert cl.match_pair(fa, mirror).score < 10


def _ukb_set(ukbench, numbers, labels):
    return TrainingSet([ukbench / f"ukbench{n:05d}.jpg" for n in numbers], np.asarray(labels),
                       ["ukbench"] * len(numbers))


@pytest.mark.slow
def test_clean_and_box_drops_an_injected_image(ukbench, data_dir, tmp_path):
    """Three UKBench training objects (4 views each); a view of another object is injected into the first
    group and must be dropped, the true views kept with boxes inside their images."""
    views = [0, 1, 2, 3, 4, 5, 6, 7, 28, 29, 30, 31]  # objects 0, 1 and 7
    numbers = views + [403]  # object 100's last view injected into object 0's group
    labels = [n // 4 for n in views] + [0]
    res = cl.clean_and_box(_ukb_set(ukbench, numbers, labels), root=data_dir, cache_dir=tmp_path / "sift",
                           progress=False)
    recs = res.images
    injected = recs["ukbench1000/ukbench00403.jpg"]
    assert injected["kept"] is False and injected["box"] is None and injected["group"] == 0
    for n in views:
        r = recs[f"ukbench1000/ukbench{n:05d}.jpg"]
        assert r["kept"], (n, r)
        assert r["component_size"] == 4 and r["group"] == n // 4
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert (x1 - x0) * (y1 - y0) > 0.05 * 640 * 480  # a real object region, not a sliver
    assert res.stats["pairs_matched"] == 5 * 4 // 2 + 2 * 6
    assert res.stats["per_source"]["ukbench"] == {"images": 13, "kept": 12, "groups": 3, "groups_kept": 3}
    # SIFT cache: a second run reads every image from disk
    res2 = cl.clean_and_box(_ukb_set(ukbench, numbers, labels), root=data_dir, cache_dir=tmp_path / "sift",
                            progress=False)
    assert res2.stats["sift_computed"] == 0 and res2.stats["sift_from_cache"] == 13
    assert res2.images == recs


@pytest.mark.slow
def test_paris_landmark_group_boxes(paris, data_dir):
    """Paris photos grouped by landmark: Moulin Rouge views (the query paris_moulinrouge_000004 and six photos
    it verifies with in the full landmark graph) with a Louvre photo injected, and four Louvre photos.  The
    intruder is dropped, every other photo kept, and the boxes of the three ground-truth query images
    overlap their query boxes (rparis6k) by IoU > 0.45 (measured: 0.60, 0.58, 0.60; the whole image: 0.44,
    0.11, 0.46)."""
    from instance_search.eval.datasets.benchmarks import load_benchmark
    from instance_search.eval.metrics import iou

    bench = load_benchmark("rparis6k")
    gt = {p.name: b for p, b in zip(bench.query_paths, bench.query_boxes)}
    mr = ["paris_moulinrouge_000004.jpg"] + [f"paris_moulinrouge_{n:06d}.jpg" for n in (255, 283, 113, 11, 866, 235)]
    lv = [f"paris_louvre_{n:06d}.jpg" for n in (50, 181, 35, 332)]
    names = mr + ["paris_louvre_000176.jpg"] + lv
    labels = [0] * (len(mr) + 1) + [1] * len(lv)
    ts = TrainingSet([paris / n for n in names], np.asarray(labels), ["paris"] * len(names))
    res = cl.clean_and_box(ts, root=data_dir, progress=False)
    recs = {Path(k).name: v for k, v in res.images.items()}
    assert recs["paris_louvre_000176.jpg"]["kept"] is False and recs["paris_louvre_000176.jpg"]["group"] == 0
    assert all(recs[n]["kept"] for n in mr + lv)
    assert {recs[n]["component_size"] for n in mr} == {7} and {recs[n]["component_size"] for n in lv} == {4}
    for q in ("paris_moulinrouge_000004.jpg", "paris_louvre_000050.jpg", "paris_louvre_000035.jpg"):
        assert iou(gt[q], recs[q]["box"]) > 0.45, (q, recs[q], gt[q])
    assert res.stats["groups_not_converged"] == 0


# ---------------------------------------------------------------------------------------------------------
# The boxes file and the CLI
# ---------------------------------------------------------------------------------------------------------

def _tiny_result():
    imgs = {"a/1.jpg": {"group": 3, "kept": True, "box": [1.0, 2.0, 30.0, 40.0], "initial_box": [0, 0, 31, 41],
                        "component_size": 2},
            "a/2.jpg": {"group": 3, "kept": True, "box": [5.0, 5.0, 20.0, 25.0], "initial_box": [4, 4, 21, 26],
                        "component_size": 2},
            "b/3.jpg": {"group": 4, "kept": False, "box": None, "initial_box": None, "component_size": 1}}
    return cl.CleaningResult("/data", cl.CleaningParams(), imgs, {})


def test_boxes_file_roundtrip_and_validation(tmp_path):
    f = cl.save_boxes(_tiny_result(), tmp_path / "boxes.json")
    header, imgs = cl.load_boxes(f)
    assert header["format"] == cl.BOXES_FORMAT and header["params"]["alpha"] == 0.1
    assert imgs == _tiny_result().images
    _, kept = cl.load_boxes(f, kept_only=True)
    assert set(kept) == {"a/1.jpg", "a/2.jpg"}
    with pytest.raises(cl.BoxesFileError, match="not found under"):
        cl.load_boxes(f, root=tmp_path)

    def broken(edit, match):
        doc = json.loads(f.read_text())
        edit(doc)
        g = tmp_path / "broken.json"
        g.write_text(json.dumps(doc))
        with pytest.raises(cl.BoxesFileError, match=match) as ei:
            cl.load_boxes(g)
        assert "broken.json" in str(ei.value)

    broken(lambda d: d["images"]["a/1.jpg"].__setitem__("box", [30, 2, 1, 40]), r"images\['a/1.jpg'\].*inverted")
    broken(lambda d: d["images"]["a/1.jpg"].__setitem__("box", [1, 2, 3]), "four numbers")
    broken(lambda d: d["images"]["a/2.jpg"].__setitem__("box", None), "kept image needs a box")
    broken(lambda d: d["images"]["b/3.jpg"].pop("group"), "expected keys")
    broken(lambda d: d["images"]["b/3.jpg"].__setitem__("kept", "yes"), "kept must be")
    broken(lambda d: d["header"].__setitem__("version", 99), "unsupported version")
    broken(lambda d: d["images"].__setitem__("/abs/x.jpg", d["images"]["b/3.jpg"]), "relative")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(cl.BoxesFileError, match="bad.json: not valid JSON"):
        cl.load_boxes(tmp_path / "bad.json")
    with pytest.raises(cl.BoxesFileError, match="not found"):
        cl.load_boxes(tmp_path / "missing.json")


def test_cli_clean_folder_of_groups(ukbench, tmp_path):
    from typer.testing import CliRunner

    from instance_search.cli.main import app

    root = tmp_path / "groups"
    for g, numbers in {"mug": [44, 45, 46, 47], "cd": [48, 49, 50, 51]}.items():
        (root / g).mkdir(parents=True)
        for n in numbers:
            shutil.copy(ukbench / f"ukbench{n:05d}.jpg", root / g / f"{n}.jpg")
    shutil.copy(ukbench / "ukbench00300.jpg", root / "mug" / "intruder.jpg")
    out = tmp_path / "boxes.json"
    r = CliRunner().invoke(app, ["clean", str(root), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    header, imgs = cl.load_boxes(out, root=root)
    assert header["root"] == str(root.resolve()) or header["root"] == str(root)
    assert imgs["mug/intruder.jpg"]["kept"] is False
    assert all(imgs[f"mug/{n}.jpg"]["kept"] for n in (44, 45, 46, 47))
    assert {imgs[f"cd/{n}.jpg"]["group"] for n in (48, 49, 50, 51)} == {0} and imgs["mug/44.jpg"]["group"] == 1
    kept = sum(e["kept"] for e in imgs.values())
    assert f"kept {kept} of 9 images in 2 groups" in r.output
    r = CliRunner().invoke(app, ["clean", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code != 0 and "nope" in r.output


def test_bad_input_is_named(ukbench, tmp_path):
    with pytest.raises(ValueError, match="ratio=1.5"):
        cl.CleaningParams(ratio=1.5)
    with pytest.raises(ValueError, match="min_inliers=2"):
        cl.CleaningParams(min_inliers=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cl.groups_from_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    shutil.copy(ukbench / "ukbench00000.jpg", tmp_path / "flat" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="one sub-folder per group"):
        cl.groups_from_folder(tmp_path / "flat")
    ts = _ukb_set(ukbench, [0, 1], [0, 0])
    with pytest.raises(ValueError, match="not inside the root folder"):
        cl.clean_and_box(ts, root=tmp_path, progress=False)
    # an unreadable image is reported and dropped, the rest goes on
    (tmp_path / "g" / "x").mkdir(parents=True)
    (tmp_path / "g" / "x" / "broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(ukbench / "ukbench00000.jpg", tmp_path / "g" / "x" / "a.jpg")
    res = cl.clean_and_box(cl.groups_from_folder(tmp_path / "g"), root=tmp_path / "g", progress=False)
    assert res.images["x/broken.jpg"]["kept"] is False and "broken.jpg" in res.stats["failed"][0]
