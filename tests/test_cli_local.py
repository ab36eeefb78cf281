"""The Ng et al. sweep and the Hoang et al. grid through the CLI, on tiny real subsets (cheap settings)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from instance_search.cli import app


def test_sweep_cli_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sweep's cache goes under ./benchmarks/cache
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    res = CliRunner().invoke(app, ["sweep", "--benchmark", "holidays", "--benchmark", "ukbench",
                                   "--limit", "holidays=24", "--limit", "ukbench=24", "--max-size", "96",
                                   "--layer", "conv4_3", "--layer", "conv5_3", "--scale", "1", "--k", "8",
                                   "--out-dim", "16", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "conv4_3" in res.output and "conv5_3" in res.output
    assert png.stat().st_size > 5_000 and json.loads(out.read_text())
