"""`isearch demo` on a machine without ../shared/data (issue 15): the photos shipped in the scikit-image wheel,
4 views each, indexed and scored; and a clear message when neither source is there."""
from __future__ import annotations

import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from instance_search.cli import app
from instance_search.demo import SKIMAGE_PHOTOS, offline_photos


def test_offline_photos_are_groups_of_views(tmp_path):
    paths, train = offline_photos(tmp_path / "p", 12, n_train=5)
    assert [p.name for p in paths] == [f"demo{i:05d}.jpg" for i in range(12)] and len(train) == 5
    sizes = [Image.open(p).size for p in paths]
    assert len(set(sizes[:4])) == 4  # four different views of one photo
    assert all(min(s) >= 64 for s in sizes)
    again, _ = offline_photos(tmp_path / "q", 12)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # deterministic
    assert len(offline_photos(tmp_path / "r", 400)[0]) == 4 * len(SKIMAGE_PHOTOS)


def test_demo_without_shared_data_uses_the_wheel_photos(tmp_path, monkeypatch):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("ISEARCH_DATA", str(empty))
    out = tmp_path / "demo-index"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--images", "12", "--recipe", "mac", "--max-size", "160"])
    assert r.exit_code == 0, r.output
    assert "no UKBench photos in ISEARCH_DATA" in r.output and "scikit-image wheel" in r.output
    assert "N-S score (4 views per photo) on these 12 images" in r.output
    ns = float(r.output.split("on these 12 images: ")[1].split(" /")[0])
    assert ns >= 2.0, r.output  # each photo's views find each other (chance: about 1.1)
    assert (out / "demo-ranked.png").is_file() and (tmp_path / "demo-index-photos" / "demo00011.jpg").is_file()


def test_demo_without_any_photos_says_what_to_do(tmp_path, monkeypatch):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("ISEARCH_DATA", str(empty))
    monkeypatch.setitem(sys.modules, "skimage", None)  # as if scikit-image were not installed
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--images", "8"])
    assert r.exit_code == 2
    assert "ukbench1000 is not here" in r.stderr and "pip install scikit-image" in r.stderr, r.output
