"""`isearch search` over many queries in one process (a folder, a CSV or JSON list of image + box) written as JSON
lines or CSV, and `--device auto|cpu|cuda` (issue 15). The index is the 12-photo UKBench one of the server tests."""
from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import build_server_index
from instance_search.cli import app
from instance_search.cli.device import resolve_device
from instance_search.cli.search import read_queries


@pytest.fixture(scope="module")
def built(ukbench, tmp_path_factory):
    return build_server_index(ukbench, tmp_path_factory)


def _single(index, path, box=None, top=4, extra=()):
    args = ["search", str(path), "--index", str(index), "--top", str(top), "--json", "--device", "cpu", *extra]
    if box:
        args += ["--box", box]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.slow
def test_folder_batch_as_json_lines_equals_single_queries(built, tmp_path):
    photos, index = built
    folder = tmp_path / "q"
    folder.mkdir()
    for i in (0, 5, 9):
        shutil.copy(photos / f"ukbench{i:05d}.jpg", folder / f"ukbench{i:05d}.jpg")
    (folder / "notes.txt").write_text("not an image")  # not an image file name: not a query
    r = CliRunner().invoke(app, ["search", str(folder), "--index", str(index), "--top", "4", "--no-progress",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["query"] for x in lines] == [str(folder / f"ukbench{i:05d}.jpg") for i in (0, 5, 9)]
    for i, line in zip((0, 5, 9), lines):
        assert line["hits"][0]["path"].endswith(f"ukbench{i:05d}.jpg") and line["box"] is None
        single = _single(index, folder / f"ukbench{i:05d}.jpg")
        assert [h["id"] for h in line["hits"]] == [h["id"] for h in single["hits"]]
        assert [h["score"] for h in line["hits"]] == pytest.approx([h["score"] for h in single["hits"]], abs=1e-5)
    assert "3 queries in" in r.stderr


def test_csv_list_with_boxes_to_csv_file(built, tmp_path):
    photos, index = built
    shutil.copy(photos / "ukbench00004.jpg", tmp_path / "a.jpg")
    lst = tmp_path / "list.csv"
    lst.write_text('image,box\na.jpg,"100,60,540,420"\n' f"{photos / 'ukbench00008.jpg'},\n")
    out = tmp_path / "res.csv"
    r = CliRunner().invoke(app, ["search", str(lst), "--index", str(index), "--top", "3", "--out", str(out),
                                 "--rerank", "aml", "--shortlist", "5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 6 and list(rows[0]) == ["query", "qx1", "qy1", "qx2", "qy2", "rank", "id", "path", "score",
                                                "x1", "y1", "x2", "y2", "error"]
    assert [r_["query"] for r_ in rows] == [str(tmp_path / "a.jpg")] * 3 + [str(photos / "ukbench00008.jpg")] * 3
    assert [float(rows[0][k]) for k in ("qx1", "qy1", "qx2", "qy2")] == [100, 60, 540, 420] and rows[3]["qx1"] == ""
    single = _single(index, tmp_path / "a.jpg", box="100,60,540,420", top=3,
                     extra=("--rerank", "aml", "--shortlist", "5"))
    assert [int(x["id"]) for x in rows[:3]] == [h["id"] for h in single["hits"]]
    assert [[float(x[k]) for k in ("x1", "y1", "x2", "y2")] for x in rows[:3]] == \
        [pytest.approx(h["box"], abs=0.051) for h in single["hits"]]
    assert all(x["x1"] != "" and x["error"] == "" for x in rows)  # re-ranked: each hit has its box
    # x1,y1,x2,y2 columns, JSON list: the same queries
    lst2 = tmp_path / "list2.csv"
    lst2.write_text("image,x1,y1,x2,y2\na.jpg,100,60,540,420\n")
    assert read_queries(lst2) == read_queries(lst)[:1]
    lst3 = tmp_path / "list.json"
    lst3.write_text(json.dumps([{"image": "a.jpg", "box": [100, 60, 540, 420]}, str(photos / "ukbench00008.jpg")]))
    assert read_queries(lst3) == read_queries(lst)


def test_bad_lists_are_refused_naming_the_entry(built, tmp_path):
    _, index = built
    runner = CliRunner()
    cases = {
        "missing.csv": ("image,box\nnope.jpg,\n", "missing.csv:2: image nope.jpg not found"),
        "nohead.csv": ("a.jpg,1,2,3,4\n", "the first row must name the columns"),
        "badbox.csv": ("image,box\na.jpg,\"1,2,x,4\"\n", "badbox.csv:2:"),
        "bad.json": ("{not json", "not valid JSON"),
        "item.json": ('["a.jpg", 3]', "item 1: expected an image path"),
        "keys.json": ('[{"image": "a.jpg", "bx": [1, 2, 3, 4]}]', "unknown keys ['bx']"),
        "empty.json": ("[]", "no queries in it"),
    }
    (tmp_path / "a.jpg").write_bytes(b"")  # exists; never searched: every list below is refused first
    for name, (text, want) in cases.items():
        (tmp_path / name).write_text(text)
        r = runner.invoke(app, ["search", str(tmp_path / name), "--index", str(index), "--device", "cpu"])
        assert r.exit_code == 2 and want in r.stderr, (name, r.output)
    r = runner.invoke(app, ["search", str(tmp_path / "item.json"), "--index", str(index), "--box", "1,2,3,4"])
    assert r.exit_code == 2 and "--box and --show are for one query image" in r.stderr
    (tmp_path / "ok.json").write_text('["a.jpg"]')
    r = runner.invoke(app, ["search", str(tmp_path / "ok.json"), "--index", str(index), "--format", "xml"])
    assert r.exit_code == 2 and "--format 'xml'" in r.stderr


def test_a_failing_query_is_reported_and_the_rest_go_on(built, tmp_path):
    photos, index = built
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps(["broken.jpg", str(photos / "ukbench00001.jpg"),
                               {"image": str(photos / "ukbench00002.jpg"), "box": "900,900,950,950"}]))
    r = CliRunner().invoke(app, ["search", str(lst), "--index", str(index), "--top", "2", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 3 and "broken.jpg" in lines[0]["error"] and "hits" not in lines[0]
    assert lines[1]["hits"][0]["path"].endswith("ukbench00001.jpg")
    assert "error" in lines[2] and lines[2]["box"] == [900, 900, 950, 950]
    assert "2 failed" in r.stderr


def test_device_option():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("AUTO") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'tpu'"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
    runner = CliRunner()
    for cmd in (["search", "x.jpg", "--index", "nowhere"], ["index", "nowhere", "--index", "nowhere2"],
                ["serve", "--index", "nowhere"], ["eval", "ukbench"]):
        r = runner.invoke(app, cmd + ["--device", "tpu"])
        assert r.exit_code == 2 and "--device 'tpu'" in r.stderr, (cmd, r.output)
