"""The sweep runners' shared helpers (instance_search.eval.sweeps): benchmark subsets, the sweep table and plot.
Ng et al.'s VLAD is tested in tests/recipes/test_ng.py, Hoang et al.'s selective features in
tests/recipes/test_hoang.py."""
from __future__ import annotations

import pytest

from instance_search.eval.sweeps import plot_sweep, subset_benchmark, sweep_table


# ------------------------------------------------------------------------------------------ runners


def test_subset_benchmark_and_table(tmp_path):
    from instance_search.eval.datasets import find_shared_data, load_benchmark

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    ukb = subset_benchmark(load_benchmark("ukbench"), 42)
    assert ukb.n_images == 40 and ukb.n_queries == 40 and not ukb.comparable
    hol = subset_benchmark(load_benchmark("holidays"), 60)
    assert hol.n_images == 60 and all(len(g["ok"]) for g in hol.gnd)
    assert max(max(g["ok"]) for g in hol.gnd) < 60
    fake = {"rows": [{"benchmark": "holidays", "train": "ukbench", "layer": l, "scale": s, "map": m}
                     for l, s, m in [("conv4_3", "1", 50.0), ("conv5_3", "1", 40.0), ("conv4_3", "2", 45.0),
                                     ("conv5_3", "2", 48.0)]],
            "settings": {"backbone": "vgg16", "k": 100, "out_dim": 128, "benchmarks": {"holidays": "holidays"}}}
    table = sweep_table(fake)
    assert "| conv4_3 | **50.0** | 45.0 |" in table
    png = plot_sweep(fake, tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
