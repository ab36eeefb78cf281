"""`isearch eval` on a small real UKBench folder: the standard figures come out as JSON."""
from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from instance_search.cli.main import app


def test_eval_ukbench_subset(ukbench, tmp_path):
    for i in range(8):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", tmp_path)
    out = tmp_path / "res.json"
    res = CliRunner().invoke(app, ["eval", "ukbench", "--images", str(tmp_path), "--recipe", "rmac",
                                   "--backbone", "vgg16", "--max-size", "160", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    figures = json.loads(out.read_text())
    assert figures["database_images"] == 8 and figures["queries"] == 8
    assert 3.0 <= figures["ns"] <= 4.0 and figures["map"] > 70
    assert figures["comparable"] is False
    bad = CliRunner().invoke(app, ["eval", "roxford5k"])
    assert bad.exit_code == 2 and "error" in bad.output
