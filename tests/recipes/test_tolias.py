"""Multi-scale MAC / R-MAC / SPoC / GeM (recipes/tolias.py, issue 14 item 4): the multi-scale descriptor equals
the combination of the single-scale descriptors computed separately, on random maps and on real VGG16 maps of a
photo described by the backbone at scales 1, 1/sqrt(2), 1/2."""
from __future__ import annotations

import numpy as np
import pytest

from instance_search.recipes import Features, Recipe, RecipeError

SCALES = [1.0, 0.7071, 0.5]


def l2(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _feats(seed=0, layer="conv5_3"):
    rng = np.random.default_rng(seed)
    maps = {}
    for s in SCALES:
        h, w = max(2, int(round(12 * s))), max(2, int(round(16 * s)))
        maps[(layer, s)] = np.maximum(rng.standard_normal((32, h, w)).astype(np.float32) - 0.5, 0.0)
    return Features(maps)


def single(name, fmap, **kw):
    return Recipe(name, layer="conv5_3", **kw).local(Features({("conv5_3", 1.0): fmap}))


class _Whiten:  # an affine whitening-like transform with the interface finalize uses
    def __init__(self, d, seed=1):
        rng = np.random.default_rng(seed)
        self.P, self.m, self.dim = np.eye(d) + 0.1 * rng.standard_normal((d, d)), 0.01 * rng.standard_normal(d), d

    def transform(self, X):
        return l2((l2(np.asarray(X, np.float64)) - self.m) @ self.P).astype(np.float32)


@pytest.mark.parametrize("name", ["mac", "spoc", "gem"])
def test_one_vector_recipes_sum_and_gem_over_scales(name):
    feats = _feats()
    per = np.concatenate([single(name, feats.maps[("conv5_3", s)]) for s in SCALES]).astype(np.float64)
    r = Recipe(name, layer="conv5_3", extra={"scales": SCALES})
    assert r.needs("conv5_3").scales == tuple(SCALES)
    got = r.local(feats)
    assert got.shape == (1, 32)
    np.testing.assert_allclose(got[0], l2(per.sum(0)), rtol=1e-5, atol=1e-6)
    rg = Recipe(name, layer="conv5_3", extra={"scales": SCALES, "scale_pool": "gem", "scale_p": 2.0})
    want = l2(np.sqrt(np.mean(per ** 2, axis=0)))
    np.testing.assert_allclose(rg.local(feats)[0], want, rtol=1e-5, atol=1e-6)
    # whitening applies to the combined vector
    wh = _Whiten(32)
    np.testing.assert_allclose(r.finalize(got, wh), l2(wh.transform(l2(per.sum(0))[None])[0]), rtol=1e-5, atol=1e-6)


def test_rmac_multiscale_is_the_regions_of_every_scale():
    feats = _feats(3)
    per = [single("rmac", feats.maps[("conv5_3", s)]) for s in SCALES]
    r = Recipe("rmac", layer="conv5_3", extra={"scales": SCALES})
    got = r.local(feats)
    np.testing.assert_array_equal(got, np.concatenate(per))
    wh = _Whiten(32)
    # global = L2(sum over scales of each scale's un-normalised R-MAC sum)
    sums = [np.asarray(wh.transform(p), np.float64).sum(0) for p in per]
    np.testing.assert_allclose(r.finalize(got, wh), l2(np.sum(sums, 0)), rtol=1e-5, atol=1e-6)
    # single scale unchanged
    one = Features({("conv5_3", 1.0): feats.maps[("conv5_3", 1.0)]})
    np.testing.assert_array_equal(Recipe("rmac", layer="conv5_3").local(one), per[0])


def test_refusals():
    with pytest.raises(RecipeError, match="include 1"):
        Recipe("mac", extra={"scales": [0.5, 0.25]})
    with pytest.raises(RecipeError, match="distinct positive"):
        Recipe("mac", extra={"scales": [1, 1]})
    with pytest.raises(RecipeError, match="distinct positive"):
        Recipe("gem", extra={"scales": [1, -0.5]})
    with pytest.raises(RecipeError, match="scale_pool"):
        Recipe("mac", extra={"scales": [1, 0.5], "scale_pool": "max"})
    with pytest.raises(RecipeError, match="one vector per scale"):
        Recipe("rmac", extra={"scales": [1, 0.5], "scale_pool": "gem"})
    with pytest.raises(RecipeError, match="scale 0.5"):
        one = Features({("conv5_3", 1.0): np.ones((4, 3, 3), np.float32)})
        Recipe("mac", layer="conv5_3", extra={"scales": [1, 0.5]}).local(one)


def test_real_photo_multiscale_equals_separate_passes(data_dir):
    """On a real photo: the backbone's maps at three scales, one call, give the sum of the three single-scale
    descriptors computed from three separate backbone calls on the image resized by hand."""
    from PIL import Image

    backbones = pytest.importorskip("instance_search.backbones")
    try:
        bb = backbones.load_backbone("vgg16", progress=False)
    except backbones.WeightsError as exc:
        pytest.skip(f"VGG16 weights unavailable: {exc}")
    img = Image.open(data_dir / "oxford5k-queries10" / "bodleian_000132.jpg").convert("RGB")
    img.thumbnail((160, 160))
    r = Recipe("mac", extra={"scales": SCALES})
    needs = r.needs(bb.default_layer)
    maps = bb.features(img, layers=list(needs.layers), scales=needs.scales)
    got = r.local(Features(maps))[0]
    sep = []
    for s in SCALES:
        m = bb.features(img, layers=list(needs.layers), scales=(s,))[(needs.layers[0], s)]
        sep.append(Recipe("mac").local(Features({(needs.layers[0], 1.0): m}))[0])
    np.testing.assert_allclose(got, l2(np.sum(sep, 0)), rtol=1e-5, atol=1e-6)
    assert min(float(a @ b) for a in sep for b in sep) < 0.999  # the scales do see different things
