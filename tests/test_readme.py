"""The README's first lines and its Python snippet are what a new user runs: check both."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_opens_with_setup_and_test_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert block[0].startswith("./setup.sh") and "pytest" in block[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./setup.sh" in ci and ".venv/bin/python -m pytest -q" in ci
    setup = (REPO / "setup.sh").read_text()
    assert "isearch weights fetch" in setup and "isearch demo" in setup


def test_readme_python_snippet_runs(ukbench, tmp_path, capsys):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", photos)
    env = {"INDEX_DIR": tmp_path / "index", "PHOTOS": photos, "QUERY": photos / "ukbench00004.jpg"}
    exec(compile(snippet, "README.md", "exec"), env)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("1 ") and int(Path(lines[0].split()[-1]).stem[-5:]) // 4 == 1
    assert sum(int(Path(l.split()[-1]).stem[-5:]) // 4 == 1 for l in lines) >= 3


def test_demo_command_runs(tmp_path):
    from typer.testing import CliRunner

    from instance_search.cli.main import app

    res = CliRunner().invoke(app, ["demo", "--images", "4", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "N-S score on these 4 images: 4.00" in res.output
    assert (tmp_path / "demo" / "demo-ranked.png").stat().st_size > 10_000
