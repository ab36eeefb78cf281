"""The benchmark helpers' map extraction: what the localisation / re-ranking benchmarks use as the reference."""
from __future__ import annotations

import numpy as np
import pytest

from instance_search.eval import runner as benchmarking
from instance_search.eval.runner import extract_maps
from instance_search.collection import Describer
from instance_search.images import Box, load_image
from instance_search.recipes.base import Recipe


def test_extract_maps_equals_one_forward_per_crop_and_is_cached(ukbench, tmp_path, monkeypatch):
    recipe = Recipe(max_size=128)
    items = [(ukbench / "ukbench00000.jpg", None), (ukbench / "ukbench00001.jpg", Box(100, 60, 500, 420)),
             (ukbench / "ukbench00004.jpg", None)]
    got = extract_maps(items, recipe, progress=False, cache_dir=tmp_path)
    d = Describer(recipe)
    assert len(got) == 3
    for (path, box), m in zip(items, got):
        want = d.feature_map(load_image(path, max_size=128, box=box)).numpy().astype(np.float16)
        assert m.dtype == np.float16 and m.shape == want.shape
        np.testing.assert_array_equal(m, want)
    assert got[1].shape[1:] != got[0].shape[1:]  # the box crop was used
    assert len(list(tmp_path.glob("maps-*.npz"))) == 1

    def no_network(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(benchmarking, "Describer", no_network)
    again = extract_maps(items, recipe, progress=False, cache_dir=tmp_path)
    for a, b in zip(got, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="cache should have answered"):  # other items: not from the cache
        extract_maps(items[:2], recipe, progress=False, cache_dir=tmp_path)
