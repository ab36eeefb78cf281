"""Ng, Yang & Davis 2015 as the recipe ``ng-vlad`` (instance_search.recipes.ng) and the layer x scale sweep that
computes its cells through it (instance_search.eval.sweeps.layer_scale_sweep).

Cheap by design (shared 2-core machine): random non-negative maps for the maths, the state and the refusals;
real VGG16 maps of 40 small Holidays / UKBench images for the recipe-equals-sweep check (skipped when the
weights or the shared data are not available).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.errors import NotFittedError
from instance_search.eval.sweeps import limit_threads
from instance_search.recipes import Features, Needs, Recipe, RecipeError
from instance_search.recipes.ng import codebook_image_indices, fit_codebook, ng_vlad, raw_vlad


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with limit_threads(1):  # oversubscribed BLAS / torch pools are many times slower on a shared CPU
        yield


def _maps(n, c=32, h=9, w=12, seed=0):
    rng = np.random.default_rng(seed)
    return [np.maximum(rng.standard_normal((c, h, w)).astype(np.float32) - 0.3, 0.0) for _ in range(n)]


def _feats(n=14, seed=0):
    """conv4_3 at scales 1 and 2 (the map enlarged 2x) and conv5_1 at scale 1 (other channels)."""
    out = []
    for m, m5 in zip(_maps(n, seed=seed), _maps(n, c=16, h=5, w=6, seed=seed + 1)):
        out.append(Features({("conv4_3", 1.0): m, ("conv4_3", 2.0): np.repeat(np.repeat(m, 2, 1), 2, 2),
                             ("conv5_1", 1.0): torch.from_numpy(m5)}))
    return out


def _recipe(**extra):
    base = {"layers": ["conv4_3", "conv5_1"], "scales": [1, 2], "k": 5, "dim": 8, "features_per_image": 40}
    base.update(extra)
    return Recipe("ng-vlad", layer=base["layers"][0] if base.get("layers") else None, extra=base)


# ------------------------------------------------------------------------------------------ the maths


def test_ng_vlad_matches_loop():
    rng = np.random.default_rng(1)
    fmap = rng.random((5, 3, 4)).astype(np.float32)
    cents = rng.random((3, 5)).astype(np.float32)
    v = np.zeros((3, 5))
    for x in fmap.reshape(5, -1).T:  # every cell: residual to its nearest centroid
        j = int(np.argmin(((cents - x) ** 2).sum(1)))
        v[j] += x - cents[j]
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # intra-normalisation
    v = v.ravel() / np.linalg.norm(v)
    np.testing.assert_allclose(ng_vlad(fmap, cents), v, atol=1e-5)
    assert raw_vlad(fmap.reshape(5, -1).T, cents).dtype == np.float16


def test_parts_concatenated_then_pca_whitened():
    """Every (layer, scale) part's VLAD under its own codebook, concatenated in the order layer-major; then
    ``L2(P (v - mu))`` with P the whitening learned on the training images' raw VLADs."""
    feats = _feats()
    assert _recipe().needs("conv5_3") == Needs(layers=("conv4_3", "conv5_1"), scales=(1.0, 2.0))
    # scale 2 alone: scale 1 is read too, for the map the index keeps for re-ranking (the VLAD ignores it)
    assert _recipe(scales=[2]).needs("conv5_3").scales == (1.0, 2.0)
    assert _recipe(layers=["conv4_3"], scales=[2]).fit(feats[:12]).method.parts == [("conv4_3", 2.0)]
    with pytest.raises(RecipeError, match="layer 'conv5_1' at scale 2"):  # not in the features: named
        _recipe().fit(feats[:12])
    r = _recipe(scales=[1]).fit(feats[:12])
    m, f = r.method, feats[13]
    assert m.parts == [("conv4_3", 1.0), ("conv5_1", 1.0)] and m.raw_dim == 5 * 32 + 5 * 16
    want = np.concatenate([ng_vlad(f.maps[("conv4_3", 1.0)], m.codebooks[0]),
                           ng_vlad(f.maps[("conv5_1", 1.0)], m.codebooks[1])])
    np.testing.assert_allclose(m.raw(f).astype(np.float32), want, atol=1e-3)
    r = _recipe(layers=["conv4_3"]).fit(feats[:12])
    m = r.method
    f = feats[13]
    want = np.concatenate([ng_vlad(f.maps[("conv4_3", 1.0)], m.codebooks[0]),
                           ng_vlad(f.maps[("conv4_3", 2.0)], m.codebooks[1])])
    raw = m.raw(f)
    assert raw.shape == (2 * 5 * 32,) and m.raw_dim == 320
    np.testing.assert_allclose(raw.astype(np.float32), want, atol=1e-3)  # raw VLADs are kept at half precision
    y = (raw.astype(np.float64) - m.mean) @ m.projection.T.astype(np.float64)
    np.testing.assert_allclose(r.local(f)[0], y / np.linalg.norm(y), atol=1e-5)
    assert r.local(f).shape == (1, 8)
    g = r.finalize([r.local(x) for x in feats[12:]])
    assert g.shape == (2, 8) and np.allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(g[1], r.local(f)[0], atol=1e-6)  # one row: the global vector is that row


def test_fit_learns_codebooks_and_whitening_as_specified():
    """Slow reference: codebook = k-means of ``features_per_image`` random cells of the evenly spaced training
    images (one random stream per scale); the whitening makes the training VLADs' covariance the identity."""
    feats = _feats(14)
    r = _recipe(layers=["conv4_3"], codebook_images=5, dim=6).fit(feats[:12])
    m = r.method
    idx = codebook_image_indices(12, 5)
    assert idx.tolist() == [0, 3, 6, 8, 11]
    for j, s in enumerate((1.0, 2.0)):
        rng = np.random.default_rng(1234)
        sample = []
        for i in idx:
            x = np.asarray(feats[i].maps[("conv4_3", s)]).reshape(32, -1).T
            sample.append(x[np.sort(rng.choice(len(x), 40, replace=False))].astype(np.float16))
        np.testing.assert_array_equal(m.codebooks[j], fit_codebook(np.concatenate(sample), 5, 20, 1234))
    raw = np.stack([m.raw(f) for f in feats[:12]]).astype(np.float64)
    y = (raw - m.mean) @ m.projection.T.astype(np.float64)
    np.testing.assert_allclose(y.T @ y / len(y), np.eye(6), atol=1e-3)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)


def test_state_round_trip_and_default_layer():
    feats = _feats()
    r = _recipe(layers=["conv4_3"]).fit(feats[:12], trained_on="twelve maps")
    state = r.state_dict()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in state.values())
    back = _recipe(layers=["conv4_3"]).load_state_dict(dict(state))
    assert back.fitted and back.method.trained_on == "twelve maps"
    np.testing.assert_array_equal(back.local(feats[13]), r.local(feats[13]))
    # no layer given: the backbone's default layer, fixed at fitting and kept in the state
    d = Recipe("ng-vlad", extra={"k": 4, "dim": 4})
    assert d.needs("conv5_3").layers == ("conv5_3",)
    only = [Features({("conv5_3", 1.0): f.maps[("conv4_3", 1.0)]}) for f in feats]
    d.fit(only[:12])
    d2 = Recipe("ng-vlad", extra={"k": 4, "dim": 4}).load_state_dict(d.state_dict())
    np.testing.assert_array_equal(d2.local(only[13]), d.local(only[13]))
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


# ------------------------------------------------------------------------------------------ refusals


def test_unfitted_recipe_refuses_naming_it():
    r = _recipe()
    assert r.needs_fit and not r.fitted and not r.whitened
    for call in (lambda: r.local(_feats(1)[0]), r.state_dict, lambda: r.method.project(np.zeros((1, 3)))):
        with pytest.raises(NotFittedError, match="'ng-vlad' must be fitted"):
            call()


def test_wrong_state_refused_naming_what_is_wrong():
    feats = _feats()
    good = _recipe(layers=["conv4_3"]).fit(feats[:12]).state_dict()
    sel = {"recipe": np.array("selective"), "pca_mean": np.zeros(3)}
    with pytest.raises(RecipeError, match="belongs to recipe 'selective'"):
        _recipe(layers=["conv4_3"]).load_state_dict(sel)
    with pytest.raises(RecipeError, match="missing .*'mean'.*unexpected .*'pca_mean'"):
        _recipe(layers=["conv4_3"]).load_state_dict({k: v for k, v in sel.items() if k != "recipe"} |
                                                     {k: v for k, v in good.items() if k != "mean"})
    bad = dict(good, projection=good["projection"][:, :-1])
    with pytest.raises(RecipeError, match=r"'projection' has shape \(8, 319\), expected \(8, 320\)"):
        _recipe(layers=["conv4_3"]).load_state_dict(bad)
    with pytest.raises(RecipeError, match="codebook of conv4_3@2 has shape"):
        _recipe(layers=["conv4_3"]).load_state_dict(dict(good, codebook_1=good["codebook_1"][:4]))
    with pytest.raises(RecipeError, match="NaN"):
        _recipe(layers=["conv4_3"]).load_state_dict(dict(good, mean=np.full_like(good["mean"], np.nan)))
    with pytest.raises(RecipeError, match=r"learned for parts \['conv4_3@1', 'conv4_3@2'\], this recipe reads "
                                          r"\['conv4_3@1'\]"):
        _recipe(layers=["conv4_3"], scales=[1]).load_state_dict(good)
    with pytest.raises(RecipeError, match="expected .*k=6"):
        _recipe(layers=["conv4_3"], k=6).load_state_dict(good)
    fresh = _recipe(layers=["conv4_3"])
    with pytest.raises(RecipeError):
        fresh.load_state_dict(bad)
    assert not fresh.fitted  # a refused state leaves the recipe as it was


@pytest.mark.parametrize("extra, why", [
    ({"scales": [1, 0]}, "distinct positive"), ({"scales": "1,x"}, "numbers"), ({"k": 0}, "'k' must be"),
    ({"dim": 2.5}, "'dim' must be"), ({"layers": ["conv5_1", "conv4_3"]}, "must be the first"),
    ({"layers": ["a", "a"]}, "distinct"), ({"intra_norm": "yes"}, "true or false"),
    ({"whiten_reg": -1}, "whiten_reg"), ({"mask": "max"}, "does not take option.*'mask'"),
])
def test_bad_options_refused_naming_them(extra, why):
    base = {"layers": ["conv4_3"], "scales": [1]}
    with pytest.raises(RecipeError, match=why):
        Recipe("ng-vlad", layer="conv4_3", extra={**base, **extra})


def test_whitening_dim_and_bad_training_refused():
    with pytest.raises(RecipeError, match="option 'dim'"):
        Recipe("ng-vlad", whitening_dim=64)
    feats = _feats()
    with pytest.raises(RecipeError, match="walks the training images twice"):
        _recipe().fit(iter(feats[:12]))
    with pytest.raises(RecipeError, match="span only 9 directions"):
        _recipe(layers=["conv4_3"], dim=20).fit(feats[:10])
    with pytest.raises(RecipeError, match="at least 2"):
        _recipe().fit(feats[:1])
    tiny = [Features({("conv4_3", 1.0): np.ones((4, 1, 1), np.float32)}) for _ in range(3)]
    with pytest.raises(RecipeError, match="cannot learn the codebooks from three 1x1 maps: .*k=5"):
        _recipe(layers=["conv4_3"], scales=[1]).fit(tiny, trained_on="three 1x1 maps")
    with pytest.raises(RecipeError, match="cannot learn the PCA-whitening from same: .*identical"):
        _recipe(layers=["conv4_3"], scales=[1], k=1, dim=1).fit(tiny, trained_on="same")


# ------------------------------------------------------------------------------------------ the sweep's cache


def test_vlad_pass_resumes_and_serves_limits(tmp_path):
    """A pass stopped after the first images (``limit``) goes on where it stopped and ends with the same VLADs
    as one uninterrupted pass; a limited request never runs more images than asked; rows are the recipe's raw
    VLADs."""
    from instance_search.eval.sweeps import BenchSpec, _vlad_pass
    from instance_search.eval.datasets import find_shared_data

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    calls = []

    def stub_map(img):
        a = np.asarray(img.resize((4, 3)), np.float32).transpose(2, 0, 1) / 255.0
        return np.concatenate([a, a ** 2])

    class Stub:  # deterministic 'conv maps' of the image content, counting forward passes
        def features(self, img, layers, scales):
            calls.append(1)
            return {(layer, s): torch.from_numpy(stub_map(img)) for layer in layers for s in scales}

    spec = BenchSpec("ukbench", 8, 64)
    rng = np.random.default_rng(0)
    cbs = {"ukbench": {"l": rng.random((5, 6)).astype(np.float32)}}
    args = (spec, ["l"], 1.0, cbs, lambda: Stub())
    kw = dict(backbone="stub", save_maps=(), keypoints=False, log=lambda m: None)
    part = _vlad_pass(*args, tmp_path / "a", **kw, limit=3)[("l", "ukbench")]
    assert len(calls) == 3 and np.abs(part[:3]).sum() > 0 and not part[3:].any()
    full = np.array(_vlad_pass(*args, tmp_path / "a", **kw)[("l", "ukbench")])
    assert len(calls) == 8  # resumed at image 3
    ref = np.array(_vlad_pass(*args, tmp_path / "b", **kw)[("l", "ukbench")])
    np.testing.assert_array_equal(full, ref)
    _vlad_pass(*args, tmp_path / "a", **kw, limit=5)
    assert len(calls) == 16  # the reference pass ran 8; nothing more for a request already served
    from instance_search.images import load_image

    img = load_image(spec.images[6], max_size=64)
    np.testing.assert_array_equal(full[6], raw_vlad(stub_map(img).reshape(6, -1).T, cbs["ukbench"]["l"]))


# ------------------------------------------------------------------------------------------ real images


def sweep_unrounded(monkeypatch):
    """The sweep's cells with mAP not rounded to 2 decimals (its ``_evaluate`` without the rounding)."""
    from instance_search.eval import sweeps

    def exact(bench, vecs):
        q = vecs[np.asarray(bench.query_indices, dtype=np.int64)]
        return {"map": float(bench.evaluate((q @ vecs.T).astype(np.float32))["map"])}

    monkeypatch.setattr(sweeps, "_evaluate", exact)


@pytest.mark.slow
def test_evaluate_recipe_equals_the_sweeps_cell(tmp_path, monkeypatch):
    """`evaluate_recipe` of ng-vlad (conv5_1, scales 1+2) on the first 40 Holidays images, fitted on the first 40
    UKBench images, gives the sweep's cell for the same configuration to 1e-6 (the sweep's mAP taken before its
    rounding to 2 decimals). Both draw the same codebook samples, learn the same codebooks and whitening, and
    run the backbone on the same images at the same scales (scale 2: the image enlarged 2x)."""
    from instance_search.eval.datasets import find_shared_data
    from instance_search.eval.runner import evaluate_recipe
    from instance_search.eval.sweeps import BenchSpec, layer_scale_sweep

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    try:
        from instance_search.backbones import load_backbone

        load_backbone("vgg16", progress=False)
    except Exception as exc:  # weights not cached and no registry reachable
        pytest.skip(f"VGG16 weights unavailable: {exc}")
    size, cfg = 96, {"k": 8, "dim": 16, "features_per_image": 50, "codebook_images": 50}
    hol, ukb = BenchSpec("holidays", 40, size), BenchSpec("ukbench", 40, size)
    sweep_unrounded(monkeypatch)
    sweep = layer_scale_sweep([hol, ukb], train_on={"holidays": "ukbench"}, layers=["conv5_1"], scales=(1, 2),
                              k=cfg["k"], out_dim=cfg["dim"], features_per_image=cfg["features_per_image"],
                              codebook_images=cfg["codebook_images"], cache_dir=tmp_path, save_maps=(),
                              keypoints=False, log=None, engine="winograd")
    cells = {r["scale"]: r["map"] for r in sweep["rows"]}
    assert {r["benchmark"] for r in sweep["rows"]} == {"holidays"} and set(cells) == {"1", "2", "1+2"}
    recipe = Recipe("ng-vlad", layer="conv5_1", max_size=size, extra={**cfg, "scales": [1, 2]})
    from instance_search.collection import Describer

    # the same engine on both sides (Winograd: what `auto` runs for VGG16 on the CPU, ~2x cheaper than exact)
    res = evaluate_recipe(hol.bench, recipe, fit_on=ukb.bench, progress=False,
                          describer=Describer(recipe, engine="winograd"))
    assert res["database_images"] == 40 and recipe.fitted
    assert abs(res["map"] - cells["1+2"]) < 1e-6, (res["map"], cells)
    assert res["map"] > 30.0, res["map"]  # chance on this subset is ~10 mAP
