"""Hoang et al. 2017's selective conv features (instance_search.recipes.hoang, the `selective` recipe).

The maths is checked against direct transcriptions of the equations on minimal inputs (Jégou & Zisserman 2014
T-emb whitening, Murray et al. / J&Z democratic aggregation as the authors' ``sinkhornm.m``, the authors' RN of
``learn_rn.m``; F-FAemb's and the masks' transcriptions are in tests/ops/test_embeddings.py, tests/ops/test_masks.py); the grid of
``isearch selective-grid`` is checked to equal ``evaluate_recipe`` through the recipe on the same maps.
Random non-negative maps keep it cheap (shared 2-core machine).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.errors import NotFittedError
from instance_search.eval.sweeps import _make_selective, limit_threads
from instance_search.fitted.rotation import RotationNormalisation
from instance_search.ops import embeddings as emb
from instance_search.recipes import Features, Recipe, RecipeError
from instance_search.recipes.hoang import (DIM1024, TABLE2, TABLE4, LocalModelFileError, Selective, default_drop,
                                           embedding_dim, mask_cells, resolve_config)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with limit_threads(1):
        yield


def _maps(n, c=96, h=9, w=12, seed=0):
    rng = np.random.default_rng(seed)
    return [np.maximum(rng.standard_normal((c, h, w)).astype(np.float32) - 0.3, 0.0) for _ in range(n)]


def _feats(m, layer="conv5_3"):
    return Features({(layer, 1.0): m})


# ------------------------------------------------------------------------------ named configurations


def test_named_configurations_are_the_authors():
    # option.m: T-emb (d, k) per dimension, 128 leading components dropped; F-FAemb d = 32, k = 10, d(d+1) dropped
    assert {dim: (c["d"], c["k"]) for dim, c in TABLE4.items()} == {
        512: (32, 20), 1024: (64, 18), 2048: (64, 34), 4096: (64, 66), 8064: (128, 64)}
    for dim in TABLE4:
        s = Selective.table4(dim)
        assert s.dim == dim and s.drop == 128 and s.embed_dim == s.d * s.k
    assert resolve_config("ffaemb", 4224) == {"d": 32, "k": 10, "drop": 1056}
    assert resolve_config("temb", 4224) == {"d": 64, "k": 68, "drop": 128}
    assert Selective(embedding="temb", d=32, k=20).dim == 512  # the (32, 20): 512-D, not 608-D
    for e in TABLE2:
        assert Selective.table2(e).dim == 4224
        assert Selective.dim1024(e).dim == 1024
        assert Selective.dim1024(e).embed_dim == embedding_dim(e, DIM1024[e]["d"], DIM1024[e]["k"])
    assert (default_drop("fv", 8), default_drop("vlad", 8), default_drop("ffaemb", 8)) == (0, 0, 72)
    assert _make_selective(512, "max", "vlad", "sum").d == 32  # Table-4 sizes keep T-emb's (d, k)


# ------------------------------------------------------------------------------ transcriptions


def _sinkhorn_reference(X):
    """The authors' qdemocratic(x, 'sinkhorn') / sinkhornm.m, literally (columns of X are the features)."""
    kn = X.T @ X
    kn = (kn + np.abs(kn)) / 2
    lam = np.ones(kn.shape[0])
    for _ in range(10):
        delta = 1.0 / kn.sum(0) ** 0.5
        kn = kn * delta[None, :]
        kn = kn * delta[:, None]
        lam = delta * lam
    return (X * lam[None, :]).sum(1)


def test_temb_whitening_and_democratic_match_transcription():
    maps = _maps(40)
    s = Selective("none", "temb", "democratic", d=4, k=3, drop=2, features_per_image=1000).fit(maps[:30])  # all cells
    x = s.select(maps[33])
    # J&Z 2014, Sec. 2: y = L2(PCA_d(x)); R(y) = [(y - c_j) / ||y - c_j||]_j; phi = Sigma^-1/2 (R - R0)
    pca = s.pca
    y = (x.astype(np.float64) - pca.mean) @ pca.components.T
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    c = s.codebook.centroids.astype(np.float64)
    R = np.concatenate([(y - cj) / np.linalg.norm(y - cj, axis=1, keepdims=True) for cj in c], axis=1)
    phi = (R - s.emb_mean) @ s.emb_proj.T.astype(np.float64)
    np.testing.assert_allclose(s.embed(x).numpy(), phi, atol=1e-4)
    # the learned P_emb whitens the embedded training features (all but the floored smallest eigenvalues)
    ytr = pca.transform(np.concatenate(s.select_all(maps[:30])))
    Rtr = emb.temb(ytr.astype(np.float64), c)
    np.testing.assert_allclose(Rtr.mean(0), s.emb_mean, atol=1e-5)
    w = (Rtr - Rtr.mean(0)) @ s.emb_proj.T.astype(np.float64)
    cov = w.T @ w / len(w)
    floored = s.embed_dim // 4 + 1  # 12-D embedding: its smallest quarter (+1) shares one eigenvalue
    np.testing.assert_allclose(np.diag(cov)[:-floored], 1.0, atol=1e-3)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0.0, atol=1e-3)
    # democratic aggregation of the L2-normalised phi: the authors' Sinkhorn, then L2
    ref = _sinkhorn_reference((phi / np.linalg.norm(phi, axis=1, keepdims=True)).T)
    np.testing.assert_allclose(s.aggregate(s.embed(x)), ref / np.linalg.norm(ref), atol=1e-5)
    # sum aggregation: P_emb sum(R - R0), the authors' 'temb' (no per-feature L2)
    ref = phi.sum(0)
    np.testing.assert_allclose(s.aggregate(s.embed(x), "sum"), ref / np.linalg.norm(ref), atol=1e-5)


def test_rotation_normalisation_is_the_authors_rotation():
    rng = np.random.default_rng(3)
    train, test = rng.standard_normal((60, 10)) @ rng.standard_normal((10, 10)), rng.standard_normal((5, 10))
    rot = RotationNormalisation(drop=3).fit(train)
    # learn_rn.m with D <= dpca: P = eigenvectors of the covariance (decreasing), x -> (P^T (x - mean))[drop:]
    lam, V = np.linalg.eigh(np.cov(train.T, bias=True))
    V = V[:, ::-1]
    ref = ((test - train.mean(0)) @ V)[:, 3:]
    y = rot.transform(test)
    assert y.shape == (5, 7)
    np.testing.assert_allclose(np.abs(y), np.abs(ref), atol=1e-4)  # eigenvector signs are a convention
    # fewer training vectors than dimensions: the learned axes are completed to a full rotation as learn_rn.m
    # does, [P, ~] = qr([eigvec, eye(D, D - r)])
    small = RotationNormalisation(drop=0).fit(train[:6])
    z = small.transform(test)
    xc = test - train[:6].mean(0)
    np.testing.assert_allclose(z @ z.T, xc @ xc.T, rtol=1e-4, atol=1e-4)  # a rotation keeps inner products
    V = small.basis.astype(np.float64)
    P, _ = np.linalg.qr(np.hstack([V, np.eye(10, 10 - V.shape[1])]))
    np.testing.assert_allclose(np.abs(z), np.abs(xc @ P), atol=1e-4)  # equal up to the signs of P's columns
    with pytest.raises(ValueError, match="cannot drop"):
        RotationNormalisation(drop=8).fit(train[:6])
    back = RotationNormalisation(drop=0).load_state_dict(small.state_dict())
    np.testing.assert_array_equal(back.transform(test), z)
    with pytest.raises(ValueError, match="rn_basis"):
        RotationNormalisation().load_state_dict({k: v for k, v in small.state_dict().items() if k != "rn_basis"})
    with pytest.raises(ValueError, match="orthonormal"):
        RotationNormalisation().load_state_dict({"rn_mean": small.mean, "rn_basis": 2 * small.basis})
    with pytest.raises(NotFittedError):
        RotationNormalisation().transform(test)


# ------------------------------------------------------------------------------ masks


def test_sift_mask_3x3_one_based_as_the_authors():
    # the case: one keypoint at 0-based (100.3, 200.7) in a 384x512 image, 24x32 map
    m = mask_cells(np.zeros((1, 24, 32), np.float32), "sift", np.array([[100.3, 200.7]]), (384, 512))
    rows, cols = np.nonzero(m)
    assert sorted(set(rows)) == [11, 12, 13] and sorted(set(cols)) == [4, 5, 6] and m.sum() == 9


def test_max_mask_conventions_as_the_authors():
    X = np.zeros((3, 3, 4), np.float32)
    X[0, 2, 0] = X[0, 0, 1] = 5.0  # tie: column-major first is (2, 0) (column 0 before column 1)
    X[1, 1, 3] = 1.0
    # channel 2 is zero everywhere: its first cell (0, 0) is marked
    m = mask_cells(X, "max")
    assert {tuple(p) for p in np.argwhere(m)} == {(2, 0), (1, 3), (0, 0)}


# ------------------------------------------------------------------------------ the recipe


def test_recipe_fit_state_roundtrip_and_refusals(tmp_path):
    maps = _maps(40)
    r = Recipe("selective", extra={"mask": "sum", "embedding": "temb", "aggregation": "democratic",
                                   "d": 8, "k": 5, "drop": 4})
    assert not r.whitened and r.needs_fit and r.needs("conv5_3").keypoints is False
    with pytest.raises(NotFittedError):
        r.local(_feats(maps[0]))
    r.fit([_feats(m) for m in maps[:30]], trained_on="random maps")
    v = r.local(_feats(maps[35]))
    assert v.shape == (1, 36) and np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
    np.testing.assert_allclose(r.finalize([v])[0], v[0], atol=1e-6)  # the global vector is the local one
    # a one-shot iterable (walked once, masked features kept) fits the same model as a sequence (walked twice)
    once = Recipe.from_dict(r.to_dict())
    once.fit(iter([_feats(m) for m in maps[:30]]))
    np.testing.assert_array_equal(once.local(_feats(maps[35])), v)
    with pytest.raises(RecipeError, match="empty"):
        Recipe.from_dict(r.to_dict()).fit([])
    state = r.state_dict()
    assert all(isinstance(a, np.ndarray) for a in state.values())
    back = Recipe.from_dict(r.to_dict()).load_state_dict(state)
    np.testing.assert_array_equal(back.local(_feats(maps[35])), v)
    with pytest.raises(RecipeError, match="emb_proj"):
        Recipe.from_dict(r.to_dict()).load_state_dict({k: a for k, a in state.items() if k != "emb_proj"})
    other = Recipe("selective", extra={"mask": "sum", "embedding": "temb", "d": 8, "k": 6, "drop": 4})
    with pytest.raises(RecipeError, match="cb_centroids"):
        other.load_state_dict(state)
    # the model file API gives the same vectors
    sel = r.method.model
    np.testing.assert_allclose(Selective.load(sel.save(tmp_path / "s.npz")).encode(maps[35]), v[0], atol=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(LocalModelFileError):
        Selective.load(tmp_path / "bad.npz")


def test_recipe_options_refused_with_their_name():
    with pytest.raises(RecipeError, match="dimensions"):
        Recipe("selective", extra={"dim": 1000})
    with pytest.raises(RecipeError, match="both d and k"):
        Recipe("selective", extra={"d": 8})
    with pytest.raises(RecipeError, match="mask"):
        Recipe("selective", extra={"mask": "min"})
    with pytest.raises(RecipeError, match="not dim=1024"):
        Recipe("selective", extra={"dim": 1024, "d": 8, "k": 5, "drop": 4})
    with pytest.raises(RecipeError, match="does not take"):
        Recipe("selective", extra={"levels2": 3})
    sift = Recipe("selective", extra={"mask": "sift", "d": 8, "k": 5, "drop": 4})
    assert sift.needs("conv5_3").keypoints
    with pytest.raises(RecipeError, match="keypoints"):
        sift.fit([_feats(m) for m in _maps(3)])
    maps = _maps(20)
    rng = np.random.default_rng(5)
    kps = [np.column_stack([rng.uniform(0, 96, 30), rng.uniform(0, 72, 30)]) for _ in maps]
    sift.fit([Features({("conv5_3", 1.0): m}, (72, 96), kps[i]) for i, m in enumerate(maps)])
    assert sift.local(Features({("conv5_3", 1.0): maps[0]}, (72, 96), kps[0])).shape == (1, 36)


@pytest.mark.slow
def test_all_embeddings_and_aggregations_run():
    maps = _maps(30, c=48)
    for e, d, k in (("fv", 4, 3), ("vlad", 6, 4), ("ffaemb", 4, 4)):
        base = Selective("max", e, "sum", d=d, k=k, drop=4 if e == "ffaemb" else 0, gmm_iter=5).fit_local(maps[:24])
        out = {}
        for a in ("sum", "mean", "democratic"):
            m = base.with_aggregation(a)
            m.fit_rn(np.stack([m.raw(x) for x in maps[:24]]))
            out[a] = m.encode_many(maps[24:])
            assert out[a].shape == (6, m.dim) and np.isfinite(out[a]).all()
        # same vectors up to the RN axes' signs (each model fits its own): same image-to-image similarities
        np.testing.assert_allclose(out["sum"] @ out["sum"].T, out["mean"] @ out["mean"].T, atol=1e-4)
        assert not np.allclose(out["sum"] @ out["sum"].T, out["democratic"] @ out["democratic"].T, atol=1e-3)


# ------------------------------------------------------------------------------ grid == recipe


class _StubBackbone:
    """Deterministic 'conv maps' of the image content (4x4 patches through a fixed random ReLU layer), already
    rounded to float16 as the grid's map cache stores them."""

    default_layer = "conv5_3"

    def __init__(self):
        self.w = np.random.default_rng(0).standard_normal((96, 48)).astype(np.float32)

    def features(self, img, layers, scales):
        a = np.asarray(img.convert("RGB"), np.float32) / 255.0
        h, w = a.shape[0] // 4, a.shape[1] // 4
        p = a[:h * 4, :w * 4].reshape(h, 4, w, 4, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 48)
        m = np.maximum(p @ self.w.T - 0.5, 0.0).transpose(2, 0, 1).astype(np.float16).astype(np.float32)
        return {(layer, float(s)): torch.from_numpy(m) for layer in layers for s in scales}


@pytest.mark.slow
def test_grid_cell_equals_evaluate_recipe(tmp_path):
    """`isearch selective-grid`'s cell (T-emb + democratic + MAX, 1024-D) equals `evaluate_recipe` with
    `fit_on` for the same recipe, on a Holidays subset fitted on a UKBench subset (same maps)."""
    from instance_search.collection import Describer
    from instance_search.eval.datasets import find_shared_data
    from instance_search.eval.runner import evaluate_recipe
    from instance_search.eval.sweeps import BenchSpec, conv_maps, selective_grid, selective_recipe

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    stub = _StubBackbone()
    hol, ukb = BenchSpec("holidays", 24, 96), BenchSpec("ukbench", 132, 96)  # > 128 images: RN drops 128
    for spec in (hol, ukb):
        conv_maps(spec, "conv5_3", 1.0, cache_dir=tmp_path, keypoints=False, backbone_obj=stub, log=None)
    opts = {"features_per_image": 40, "emb_samples": 3000, "kmeans_iter": 5}
    res = selective_grid([hol, ukb], evaluate=["holidays"], masks=["max"], pairs=[("temb", "democratic")],
                         config=1024, cache_dir=tmp_path, selective_kw=opts, log=None)
    (cell,) = res["rows"]
    assert cell["dim"] == 1024 and (cell["d"], cell["k"], cell["drop"]) == (64, 18, 128)
    recipe = selective_recipe(1024, "max", "temb", "democratic", **opts)
    recipe.max_size = 96
    describer = Describer(recipe)
    describer._backbone = stub
    out = evaluate_recipe(hol.bench, recipe, fit_on=ukb.bench, describer=describer, progress=False)
    assert abs(out["map"] - cell["map_unrounded"]) < 1e-6, (out["map"], cell["map_unrounded"])
    assert out["map"] > 0


def test_per_image_ms_counts_cpu_not_sleep():
    import time

    from instance_search.eval.sweeps import _per_image_ms

    cpu, wall = _per_image_ms(lambda i, x: time.sleep(0.01), [0, 1, 2], repeats=2)
    assert wall >= 9.0 and cpu < 5.0


# ------------------------------------------------------------------------------ real VGG16 maps


@pytest.fixture(scope="module")
def real_maps():
    """conv5_3 maps (max side 160) + SIFT keypoints of the first 48 Holidays images: the first 24 are the test
    collection, images 24-47 (other scenes) the held-out training collection."""
    from instance_search.eval.datasets import find_shared_data, load_benchmark
    from instance_search.eval.sweeps import subset_benchmark
    from instance_search.images import load_image
    from instance_search.ops.masks import sift_keypoints

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    try:
        from instance_search.backbones import load_backbone

        bb = load_backbone("vgg16", progress=False)
    except Exception as exc:  # weights not cached and no registry reachable
        pytest.skip(f"VGG16 weights unavailable: {exc}")
    full = load_benchmark("holidays")
    maps, kps, hws = [], [], []
    with limit_threads(1):
        for p in full.images[:48]:
            img = load_image(p, max_size=160)
            maps.append(bb.features(img, ["conv5_3"], (1.0,))[("conv5_3", 1.0)].numpy())
            kps.append(sift_keypoints(img))
            hws.append((img.height, img.width))
    return subset_benchmark(full, 24), (maps[:24], kps[:24], hws[:24]), (maps[24:], kps[24:], hws[24:])


def _pair_accuracy(bench, vecs):
    """Share of (same-scene, other) image pairs a query ranks in the right order (chance: 0.5), and P@1."""
    q = np.asarray(bench.query_indices)
    s = vecs[q] @ vecs.T
    acc, p1 = [], []
    for i, g in enumerate(bench.gnd):
        pos = np.asarray(g["ok"])
        neg = np.setdiff1d(np.arange(bench.n_images), np.concatenate([pos, [q[i]]]))
        acc.append(float((s[i, pos][:, None] > s[i, neg][None, :]).mean()))
        row = s[i].copy()
        row[q[i]] = -np.inf
        p1.append(float(row.argmax() in set(pos.tolist())))
    return float(np.mean(acc)), float(np.mean(p1))


@pytest.mark.slow
def test_mask_shares_and_end_to_end_on_real_maps(real_maps):
    bench, (maps, kps, hws), (tmaps, tkps, thws) = real_maps  # everything learned on held-out images
    share = {m: float(np.mean([mask_cells(x, m, kps[i], hws[i]).mean() for i, x in enumerate(maps)]))
             for m in ("sift", "sum", "max")}
    assert 0.45 <= share["sum"] <= 0.56  # >= median: half of the cells by construction
    assert 0.05 < share["max"] < 0.95 and 0.05 < share["sift"] <= 1.0
    # 24 training images span at most 23 RN axes: drop 16 instead of the authors' 128
    sel = Selective("max", "temb", "democratic", d=32, k=20, drop=16, features_per_image=50)
    sel.fit(tmaps, tkps, thws)
    acc, p1 = _pair_accuracy(bench, sel.encode_many(maps, kps, hws))
    assert acc > 0.75 and p1 > 0.3, (acc, p1)  # chance: 0.5 and ~0.06


def test_ffaemb_anchors_are_the_best_of_several_kmeans_runs():
    from instance_search.fitted.codebook import KMeansCodebook

    maps = _maps(12, c=32)
    s = Selective("none", "ffaemb", "democratic", d=4, k=4, drop=4, anchor_runs=3, features_per_image=1000)
    s.fit_local(maps)
    y = s.pca.transform(np.concatenate(s.select_all(maps)))

    def objective(b):
        return emb.ffaemb_objective(y, b, emb.ffaemb_coefficients(y, b, s.mu), s.mu)

    runs = [objective(KMeansCodebook(4, niter=s.kmeans_iter, seed=s.seed + t).fit(y).centroids) for t in range(3)]
    assert objective(s.codebook.centroids) == pytest.approx(min(runs))


def test_grid_reports_cells_whose_rotation_cannot_be_learned(tmp_path):
    """A cell whose rotation normalisation drops more components than the training images span (T-emb 1024-D
    drops 128; here 20 training images give at most 19 axes) is not fitted: the grid records it under
    ``skipped`` with the reason and prints it under its table, instead of failing the whole grid."""
    from instance_search.eval.datasets import find_shared_data
    from instance_search.eval.sweeps import BenchSpec, conv_maps, grid_table, selective_grid

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    stub = _StubBackbone()
    hol, ukb = BenchSpec("holidays", 8, 64), BenchSpec("ukbench", 20, 64)
    for spec in (hol, ukb):
        conv_maps(spec, "conv5_3", 1.0, cache_dir=tmp_path, keypoints=False, backbone_obj=stub, log=None)
    res = selective_grid([hol, ukb], evaluate=["holidays"], masks=["none"], pairs=[("temb", "democratic"), ("temb", "sum")],
                         config=1024, cache_dir=tmp_path, selective_kw={"features_per_image": 20, "emb_samples": 300,
                                                                      "kmeans_iter": 2}, log=None)
    assert res["rows"] == []
    assert [(r["embedding"], r["aggregation"]) for r in res["skipped"]] == [("temb", "democratic"), ("temb", "sum")]
    assert "drops 128 components; 20 training images (ukbench) give at most 19" in res["skipped"][0]["reason"]
    assert "not computable: temb+democratic (1024-D)" in grid_table(res)
