"""The Ng et al. sweep and the Hoang et al. grid through the CLI, on tiny real subsets (cheap settings)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from instance_search.cli.main import app


@pytest.mark.slow
def test_sweep_cli_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sweep's cache goes under ./benchmarks/cache
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    # the spelling (comma-separated lists); the repeated form is tested in test_googlenet.py
    res = CliRunner().invoke(app, ["sweep", "--benchmarks", "holidays,ukbench",
                                   "--limit", "holidays=24", "--limit", "ukbench=24", "--max-size", "96",
                                   "--layers", "conv4_3,conv5_3", "--scales", "1,2", "--k", "8",
                                   "--out-dim", "16", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "conv4_3" in res.output and "conv5_3" in res.output
    assert png.stat().st_size > 5_000
    rows = json.loads(out.read_text())["rows"]
    got = {(r["benchmark"], r["layer"], str(r["scale"])) for r in rows}
    assert {(b, la) for b, la, _ in got} == {(b, la) for b in ("holidays", "ukbench") for la in ("conv4_3", "conv5_3")}
    assert {sc for _, _, sc in got} == {"1", "2", "1+2"}, got  # scale 1, scale 2, and the two concatenated
    assert all(0.0 <= r["map"] <= 100.0 for r in rows)


def test_sweep_cli_refuses_bad_scales():
    for bad, why in (("1,x", "'x' is not a number"), ("1,0", "'0' must be positive")):
        res = CliRunner().invoke(app, ["sweep", "--scales", bad])
        assert res.exit_code == 2 and why in res.output, res.output


@pytest.mark.slow
def test_selective_grid_cli_tiny(tmp_path, monkeypatch):
    """Hoang et al. Table 3 through `isearch selective-grid` on 24 Holidays images fitted on 212 UKBench images
    (the rotation normalisation drops up to 200 components, so it needs more training images than that):
    every mask x (embedding, aggregation) cell, the kept shares, the printed table, and one cell recomputed
    through the `selective` recipe from the same cached maps (the grid shares the local models between
    aggregations; that must not change the result)."""
    import numpy as np

    from instance_search.eval.sweeps import DEFAULT_PAIRS, MASKS, BenchSpec, _evaluate, conv_maps, selective_recipe
    from instance_search.recipes import Features

    monkeypatch.chdir(tmp_path)  # the cache goes under ./benchmarks/cache
    out = tmp_path / "g.json"
    res = CliRunner().invoke(app, ["selective-grid", "--benchmarks", "holidays,ukbench", "--evaluate", "holidays",
                                   "--limit", "holidays=24", "--limit", "ukbench=212", "--max-size", "96",
                                   "--config", "1024", "--json", str(out)])
    assert res.exit_code == 0, res.output
    grid = json.loads(out.read_text())
    rows = {(r["benchmark"], r["mask"], r["embedding"], r["aggregation"]): r for r in grid["rows"]}
    assert set(rows) == {("holidays", m, e, a) for m in MASKS for e, a in DEFAULT_PAIRS}
    assert all(r["dim"] == 1024 and 0.0 <= r["map"] <= 100.0 for r in rows.values())
    kept = grid["kept"]["holidays"]
    assert kept["none"] == 100.0 and 50.0 <= kept["sum"] < 100.0 and 0.0 < kept["max"] < 100.0
    assert 0.0 < kept["sift"] <= 100.0
    for line in ("| none (100) |", "| max (", "temb+democratic (1024-D)", "trained on ukbench"):
        assert line in res.output, line

    hol = BenchSpec("holidays", limit=24, max_size=96)
    ukb = BenchSpec("ukbench", limit=212, max_size=96)
    # the CLI's default engine (auto) is Winograd for VGG16 on the CPU: the same maps here
    tmaps, tkps, thws = conv_maps(ukb, "conv5_3", 1.0, keypoints=True, log=None, engine="winograd")
    qmaps, qkps, qhws = conv_maps(hol, "conv5_3", 1.0, keypoints=True, log=None, engine="winograd")
    recipe = selective_recipe(1024, "sift", "temb", "democratic")
    recipe.fit([Features({("conv5_3", 1.0): m}, thws[i], tkps[i]) for i, m in enumerate(tmaps)])
    vecs = np.concatenate([recipe.local(Features({("conv5_3", 1.0): m}, qhws[i], qkps[i]))
                           for i, m in enumerate(qmaps)])
    assert vecs.shape == (24, 1024) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    want = _evaluate(hol.bench, vecs)["map"]
    assert abs(rows[("holidays", "sift", "temb", "democratic")]["map"] - want) < 1e-6, want


@pytest.mark.slow
def test_selective_speed_tiny(tmp_path):
    """Fig. 6-style timing on cached real maps: every mask, R-MAC and SIFT detection get a positive figure, and
    the masks keep fewer features than no mask."""
    from instance_search.eval.sweeps import MASKS, BenchSpec, selective_speed

    # 140 training images: the 512-D model's rotation normalisation drops 128 components
    out = selective_speed(BenchSpec("ukbench", limit=140, max_size=96), BenchSpec("holidays", limit=24, max_size=96),
                          dim=512, n_images=6, cache_dir=tmp_path, log=None)
    assert out["n_images"] == 6 and out["dim"] == 512
    assert set(out["ms_per_image"]) == set(MASKS) | {"rmac", "sift_detection"}
    assert all(v > 0 for v in out["wall_ms_per_image"].values())
    kept = out["kept_features"]
    assert kept["sum"] < kept["none"] and kept["max"] < kept["none"]


def test_grid_and_sweep_cli_refuse_bad_settings_naming_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("abc", "777"):
        res = CliRunner().invoke(app, ["selective-grid", "--config", bad])
        assert res.exit_code == 2 and f"--config '{bad}'" in res.output and "8064" in res.output, res.output
    res = CliRunner().invoke(app, ["sweep", "--benchmarks", "holidays,ukbench", "--layers", "conv9_9", "--limit",
                                   "4", "--max-size", "64"])
    assert res.exit_code == 2 and "error: vgg16 has no layer 'conv9_9'" in res.output, res.output
    res = CliRunner().invoke(app, ["sweep", "--benchmarks", "holidays,nope", "--limit", "4"])
    assert res.exit_code == 2 and "unknown benchmark 'nope'" in res.output, res.output


@pytest.mark.slow
def test_eval_cli_ng_vlad_equals_the_sweeps_cell(tmp_path, monkeypatch):
    """`isearch eval holidays --recipe ng-vlad ... --fit-on TRAIN_DIR` gives the sweep's cell for the same
    configuration to 1e-6 (12 Holidays images, 5 queries, fitted on 24 UKBench images; conv5_1 at scales 1+2;
    the sweep's mAP taken before its rounding to 2 decimals)."""
    import numpy as np

    from instance_search.eval.datasets import find_shared_data
    from instance_search.eval.sweeps import BenchSpec, layer_scale_sweep

    data = find_shared_data()
    if data is None:
        pytest.skip("no shared data folder")
    hol, ukb = tmp_path / "hol", tmp_path / "ukb"
    for folder, files in ((hol, sorted((data / "holidays811" / "jpg").glob("*.jpg"))[:12]),
                          (ukb, sorted((data / "ukbench1000").glob("ukbench*.jpg"))[:24])):
        folder.mkdir()
        for f in files:
            (folder / f.name).symlink_to(f)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "holidays", "--images", str(hol), "--recipe", "ng-vlad", "--layer",
                                   "conv5_1", "--scales", "1,2", "--k", "8", "--dim", "16", "--max-size", "96",
                                   "--fit-on", str(ukb), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["database_images"] == 12 and got["queries"] == 5 and got["recipe"]["name"] == "ng-vlad"
    from instance_search.eval import sweeps

    def unrounded(bench, vecs):  # the sweep's _evaluate without its rounding to 2 decimals
        q = vecs[np.asarray(bench.query_indices, dtype=np.int64)]
        return {"map": float(bench.evaluate((q @ vecs.T).astype(np.float32))["map"])}

    monkeypatch.setattr(sweeps, "_evaluate", unrounded)
    sweep = layer_scale_sweep([BenchSpec("holidays", None, 96, images_dir=str(hol)),
                               BenchSpec("ukbench", None, 96, images_dir=str(ukb))],
                              train_on={"holidays": "ukbench"}, layers=["conv5_1"], scales=(1, 2), k=8, out_dim=16,
                              cache_dir=tmp_path / "cache", save_maps=(), keypoints=False, log=None,
                              engine="winograd")  # the CLI's default engine (auto) for VGG16 on the CPU
    cell = next(r["map"] for r in sweep["rows"] if r["scale"] == "1+2")
    assert abs(got["map"] - cell) < 1e-6, (got["map"], cell)
    assert 0.0 < cell < 100.0  # 37.61 when measured: neither empty nor trivially perfect
