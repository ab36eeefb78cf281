"""The Ng et al. sweep and the Hoang et al. grid through the CLI, on tiny real subsets (cheap settings)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from instance_search.cli import app


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
