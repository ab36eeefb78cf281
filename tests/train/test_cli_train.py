"""``isearch train-rpn`` and ``isearch finetune`` (cli/train.py) on a few real images: tiny runs (one epoch,
small images) that write model files which load back, match the library's trainer, and refuse bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from instance_search.cli.main import app
from instance_search.nets.detector import load_detector
from instance_search.nets.rpn import load_rpn
from instance_search.io import file_sha256

SIZE = 128
RPN_ARGS = ["--epochs", "1", "--mid", "16", "--sizes", "32,64,128", "--max-size", str(SIZE), "--quiet"]


def _share(group: int, seed: int = 0) -> float:
    """Where a group falls in [0, 1) for the validation hold-out (hash of ``seed:group``, train/rpn.py)."""
    import hashlib

    return int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


@pytest.fixture(scope="module")
def boxes(data_dir, tmp_path_factory):
    """The first kept images of 4 groups of the real boxes file of `isearch clean` (benchmarks/results)."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "train_boxes.json"
    doc = json.loads(src.read_text())
    groups: dict[int, list[str]] = {}
    for rel, e in doc["images"].items():
        if e["kept"] and rel.startswith("ukbench") and (e["group"] in groups or len(groups) < 4):
            groups.setdefault(e["group"], []).append(rel)
    keep = [r for v in groups.values() for r in v[:2]]
    assert len(keep) == 8
    doc["images"] = {r: doc["images"][r] for r in keep}
    doc["header"]["root"] = str(data_dir)
    path = tmp_path_factory.mktemp("boxes") / "boxes.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def val_share(boxes):
    """A --val-groups value that holds out exactly the group with the lowest share."""
    shares = sorted(_share(g) for g in {e["group"] for e in json.loads(boxes.read_text())["images"].values()})
    return (shares[0] + shares[1]) / 2


@pytest.fixture(scope="module")
def rpn_model(boxes, val_share, tmp_path_factory):
    out = tmp_path_factory.mktemp("rpn") / "rpn.pt"
    res = CliRunner().invoke(app, ["train-rpn", str(boxes), "--out", str(out), "--val-groups", str(val_share)]
                             + RPN_ARGS)
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.mark.slow
def test_train_rpn_writes_the_trainers_model(rpn_model, boxes, val_share):
    """The command's model equals training the same samples with train.rpn.train_rpn directly."""
    from instance_search.backbones import load_backbone
    from instance_search.backbones.fast import engine_of, use_engine
    from instance_search.nets.rpn import RPN
    from instance_search.train import rpn as TR

    out, output = rpn_model
    rpn, cfg = load_rpn(out)
    assert cfg["state_sha256"] == file_sha256(out) and cfg["max_size"] == SIZE and cfg["mid_channels"] == 16
    assert cfg["trained_on"]["kept_images"] == 8 and cfg["trained_on"]["boxes_file"] == str(boxes.resolve())
    assert len(cfg["history"]["epochs"]) == 1
    assert "epoch 1:" in output and f"sha256 {cfg['state_sha256'][:16]}" in output
    assert f"{cfg['trained_on']['train_images']} images ({cfg['trained_on']['validation_images']} held out)" in output
    assert cfg["trained_on"]["validation_images"] == 2 and cfg["trained_on"]["train_images"] == 6
    assert "val_cls" in cfg["history"]["epochs"][0] and "validation cls" in output

    bb = use_engine(load_backbone("vgg16", progress=False), "auto")  # the command's default engine
    assert cfg["trained_on"]["engine"] == engine_of(bb)
    train, val, summary = TR.boxes_file_samples(boxes, None, bb, max_size=SIZE,
                                                cache_dir=out.parent / "rpn-run" / "maps", val_groups=val_share,
                                                progress=False)
    assert summary["train_images"] == cfg["trained_on"]["train_images"]
    for s in train:  # boxes mapped from original pixels to the map frame: inside the map, same aspect
        fm = s.map()
        assert np.all(s.boxes[:, 2:] <= np.array([fm.shape[-1], fm.shape[-2]]) * 16 + 1e-6)
    torch.manual_seed(0)
    ref = RPN(mid_channels=16, sizes=(32, 64, 128), max_size=SIZE)
    TR.train_rpn(ref, train, TR.RPNTrainConfig(epochs=1), progress=False)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(rpn.state_dict()[k], v)


@pytest.mark.slow
def test_train_rpn_refuses_bad_input(boxes, tmp_path):
    run = CliRunner().invoke
    res = run(app, ["train-rpn", str(tmp_path / "none.json"), "--out", str(tmp_path / "r.pt")] + RPN_ARGS)
    assert res.exit_code == 2 and "boxes file not found" in res.output and "none.json" in res.output
    res = run(app, ["train-rpn", str(boxes), "--out", str(tmp_path / "r.bin")] + RPN_ARGS)
    assert res.exit_code == 2 and "r.bin: the model file must end in .pt" in res.output
    res = run(app, ["train-rpn", str(boxes), "--out", str(tmp_path / "r.pt"), "--sizes", "32,big"])
    assert res.exit_code == 2 and "--sizes '32,big'" in res.output
    res = run(app, ["train-rpn", str(boxes), "--out", str(tmp_path / "r.pt"), "--val-groups", "1"] + RPN_ARGS)
    assert res.exit_code == 2 and "val_groups must be in [0, 1)" in res.output
    assert not (tmp_path / "r.pt").exists()


@pytest.fixture(scope="module")
def queries(data_dir, tmp_path_factory):
    """Two UKBench objects (images 500-507, evaluation half), one query view each, with a box of the object."""
    folder = tmp_path_factory.mktemp("queries")
    qs = [{"image": str(data_dir / "ukbench1000" / f"ukbench{i:05d}.jpg"), "box": [80, 60, 560, 420],
           "class": f"object {i // 4}"} for i in (500, 504)]
    path = folder / "queries.json"
    path.write_text(json.dumps({"queries": qs}))
    return path


@pytest.mark.slow
def test_finetune_strategies_write_detectors(rpn_model, boxes, queries, tmp_path):
    rpn_path, _ = rpn_model
    common = ["--epochs", "1", "--epochs-2", "1", "--base-epochs", "1", "--hidden", "32", "--max-size", str(SIZE),
              "--quiet"]
    out2 = tmp_path / "det2.pt"
    res = CliRunner().invoke(app, ["finetune", str(queries), "--out", str(out2), "--strategy", "2", "--boxes",
                                   str(boxes), "--rpn", str(rpn_path)] + common)
    assert res.exit_code == 0, res.output
    det, cfg = load_detector(out2)
    assert det.classes == ["object 125", "object 126"] and cfg["strategy"] == 2
    assert cfg["state_sha256"] == file_sha256(out2) and len(cfg["history"]["phase2"]) == 1
    base_path = tmp_path / "det2-base.pt"
    base, bcfg = load_detector(base_path)
    assert bcfg["trained_on"]["kept_images"] == 8 and len(base.classes) == 4
    assert "strategy #2: 2 queries, 2 classes" in res.output and f"{cfg['state_sha256'][:16]}" in res.output
    # strategy #2 trains conv5 and the RPN; #1 keeps the base detector's
    assert not torch.equal(det.rpn.head.conv.weight, base.rpn.head.conv.weight)
    out1 = tmp_path / "det1.pt"
    res = CliRunner().invoke(app, ["finetune", str(queries), "--out", str(out1), "--base", str(base_path)] + common)
    assert res.exit_code == 0, res.output
    det1, cfg1 = load_detector(out1)
    assert cfg1["strategy"] == 1 and cfg1["base"]["file"] == str(base_path.resolve())
    assert torch.equal(det1.rpn.head.conv.weight, base.rpn.head.conv.weight)
    assert torch.equal(det1.trunk.conv5_1.weight, base.trunk.conv5_1.weight)
    assert not torch.equal(det1.head.fc6.weight, base.head.fc6.weight)


@pytest.mark.slow
def test_finetune_refuses_bad_input(rpn_model, boxes, queries, tmp_path):
    rpn_path, _ = rpn_model
    run = CliRunner().invoke
    out = str(tmp_path / "d.pt")
    res = run(app, ["finetune", str(queries), "--out", out])
    assert res.exit_code == 2 and "--base FILE" in res.output and "--boxes FILE" in res.output
    res = run(app, ["finetune", str(queries), "--out", out, "--boxes", str(boxes)])  # no --rpn
    assert res.exit_code == 2 and "--rpn FILE" in res.output
    res = run(app, ["finetune", str(queries), "--out", out, "--strategy", "3", "--base", "b.pt"])
    assert res.exit_code == 2 and "strategy must be 1" in res.output
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"queries": [{"image": "missing.jpg", "box": [0, 0, 5, 5], "class": "a"}]}))
    res = run(app, ["finetune", str(bad), "--out", out, "--boxes", str(boxes), "--rpn", str(rpn_path)])
    assert res.exit_code == 2 and "query 0: image" in res.output and "missing.jpg not found" in res.output
    bad.write_text(json.dumps({"queries": [{"image": str(queries), "box": [5, 0, 5, 5], "class": "a"}]}))
    res = run(app, ["finetune", str(bad), "--out", out, "--boxes", str(boxes), "--rpn", str(rpn_path)])
    assert res.exit_code == 2 and "box [5.0, 0.0, 5.0, 5.0] is empty or inverted" in res.output
    assert not (tmp_path / "d.pt").exists()
