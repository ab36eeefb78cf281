"""The README's first lines and the demo are what a new user runs first. (Every other block of the README and
of docs/ is run or explicitly skipped by tests/integration/test_docs.py.)"""
from __future__ import annotations

import pytest

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_opens_with_setup_and_test_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert block[0].startswith("./setup.sh") and "pytest" in block[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./setup.sh" in ci and ".venv/bin/python -m pytest -q" in ci
    setup = (REPO / "setup.sh").read_text()
    assert "isearch weights fetch" in setup and "isearch demo" in setup


@pytest.mark.slow
def test_demo_command_runs(tmp_path):
    from typer.testing import CliRunner

    from instance_search.cli.main import app

    res = CliRunner().invoke(app, ["demo", "--images", "4", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "N-S score on these 4 images: 4.00" in res.output
    assert (tmp_path / "demo" / "demo-ranked.png").stat().st_size > 10_000
