"""``--device auto|cpu|cuda`` of ``isearch clean``, ``train-rmac`` and ``train-rpn`` (issue 15) on tiny real
inputs: ``cpu`` and ``auto`` train as before on a machine without a GPU, and ``cuda`` there is refused with
resolve_device's message before anything is written. The CUDA runs themselves: tests/train/test_train_device.py
(skipped without a GPU)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from instance_search.cli.main import app

REPO = Path(__file__).resolve().parents[2]
NO_GPU_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: --device cuda "
                                                                   "is not refused here")
#: what --device auto (the default) picks here; on a GPU machine auto runs on cuda and only the cpu runs are
#: compared with the CPU references below (the cuda runs: tests/train/test_train_device.py)
AUTO = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = 128
RPN_ARGS = ["--epochs", "1", "--mid", "16", "--sizes", "32,64,128", "--max-size", str(SIZE), "--val-groups", "0",
            "--quiet"]
RMAC_ARGS = ["--train-layers", "head", "--max-size", str(SIZE), "--epochs", "1", "--batch", "4", "--micro-batch", "4",
             "--remine-every", "1", "--anchors-per-epoch", "8", "--no-resume", "--quiet"]


def _run(args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def groups(ukbench, tmp_path_factory):
    """A folder of 2 groups of 3 UKBench views each (for `isearch clean`)."""
    root = tmp_path_factory.mktemp("groups")
    for g, numbers in {"mug": [44, 45, 46], "cd": [48, 49, 50]}.items():
        (root / g).mkdir()
        for n in numbers:
            shutil.copy(ukbench / f"ukbench{n:05d}.jpg", root / g / f"{n}.jpg")
    return root


@pytest.fixture(scope="module")
def boxes(data_dir, tmp_path_factory):
    """The first two kept images of 3 groups of the real boxes file of `isearch clean` (benchmarks/results)."""
    doc = json.loads((REPO / "benchmarks" / "results" / "train_boxes.json").read_text())
    by_group: dict[int, list[str]] = {}
    for rel, e in doc["images"].items():
        if e["kept"] and rel.startswith("ukbench") and (e["group"] in by_group or len(by_group) < 3):
            by_group.setdefault(e["group"], []).append(rel)
    keep = [r for v in by_group.values() for r in v[:2]]
    assert len(keep) == 6
    doc["images"] = {r: doc["images"][r] for r in keep}
    doc["header"]["root"] = str(data_dir)
    path = tmp_path_factory.mktemp("boxes") / "boxes.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def tiny_split(ukbench, monkeypatch):
    """train-rmac's training split replaced by UKBench objects 0-2 (12 images): a run of seconds."""
    from instance_search.eval.datasets import splits

    ts = splits.TrainingSet([ukbench / f"ukbench{i:05d}.jpg" for i in range(12)],
                            np.arange(12, dtype=np.int64) // 4, ["ukbench"] * 12)
    monkeypatch.setattr(splits, "training_set", lambda data_dir=None: ts)
    return ts


# ------------------------------------------------------------------------------------------------ refused
@NO_GPU_HERE
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(groups, boxes, tiny_split, tmp_path):
    want = "--device cuda: torch sees no CUDA GPU on this machine"
    cases = [("clean", ["clean", groups, "--out", tmp_path / "b.json"], [tmp_path / "b.json"]),
             ("train-rmac", ["train-rmac", "--checkpoint-dir", tmp_path / "rmac"] + RMAC_ARGS, [tmp_path / "rmac"]),
             ("train-rpn", ["train-rpn", boxes, "--out", tmp_path / "r.pt"] + RPN_ARGS,
              [tmp_path / "r.pt", tmp_path / "r-run"])]
    for name, args, outputs in cases:
        res = _run(args + ["--device", "cuda"])
        assert res.exit_code == 2, (name, res.output)
        assert want in res.output and "use --device cpu or --device auto" in res.output, (name, res.output)
        assert not any(p.exists() for p in outputs), name
        res = _run(args + ["--device", "tpu"])
        assert res.exit_code == 2, (name, res.output)
        assert "--device 'tpu': expected one of auto, cpu, cuda" in res.output, (name, res.output)
        assert not any(p.exists() for p in outputs), name
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ cpu / auto
@pytest.mark.slow
def test_clean_on_cpu_and_auto_as_before(groups, tmp_path):
    from instance_search.train import cleaning as cl

    results = {}
    for flag in (None, "cpu"):  # no flag = the default, --device auto
        out = tmp_path / f"{flag}.json"
        res = _run(["clean", groups, "--out", out, "--max-side", "256", "--cache", tmp_path / "sift", "--quiet"]
                   + ([] if flag is None else ["--device", flag]))
        assert res.exit_code == 0, res.output
        results[flag] = cl.load_boxes(out, root=groups)[1]
    assert sum(e["kept"] for e in results[None].values()) >= 4  # the groups were matched, boxes estimated
    assert results["cpu"] == results[None]


@pytest.mark.slow
def test_train_rmac_on_cpu_and_auto_as_before(tiny_split, tmp_path):
    from instance_search.nets.rmac_head import load_model

    runs = {}
    for flag in (None, "cpu"):  # no flag = the default, --device auto
        ck = tmp_path / f"run-{flag}"
        res = _run(["train-rmac", "--checkpoint-dir", ck, "--cache-dir", tmp_path / "inputs"] + RMAC_ARGS
                   + ([] if flag is None else ["--device", flag]))
        assert res.exit_code == 0, res.output
        hist = torch.load(ck / "checkpoint.pt", weights_only=True)["history"]
        net, cfg = load_model(ck / "model.pt")
        runs[flag] = ([u["loss"] for u in hist["updates"]], net.state_dict(), cfg)
    losses, state, cfg = runs["cpu"]
    assert len(losses) >= 2 and max(losses) > 0  # hard triplets were trained on
    assert cfg["training"]["device"] == "cpu" and cfg["training"]["engine"] == "winograd"  # --engine auto on a CPU
    assert runs[None][2]["training"]["device"] == AUTO
    for flag in (("cpu",) if AUTO == "cpu" else ()):  # same device, same seed: the same losses, update by update, and the same weights
        assert runs[flag][0] == runs[None][0], flag
        for k, v in runs[None][1].items():
            assert torch.equal(runs[flag][1][k], v), (flag, k)


@pytest.mark.slow
def test_train_rpn_on_cpu_and_auto_as_before(boxes, tmp_path):
    """The command's model with --device cpu / auto equals the library's trainer without a device (the code
    path from before --device existed), on maps of the same engine (--engine auto: winograd on a CPU)."""
    from instance_search.backbones import load_backbone
    from instance_search.backbones.fast import use_engine
    from instance_search.nets.rpn import RPN, load_rpn
    from instance_search.train import rpn as TR

    models = {}
    for flag in ("cpu", "auto"):
        out = tmp_path / f"{flag}.pt"
        res = _run(["train-rpn", boxes, "--out", out] + RPN_ARGS + ["--device", flag])
        assert res.exit_code == 0, res.output
        models[flag] = load_rpn(out)
    bb = use_engine(load_backbone("vgg16", progress=False), "winograd")
    train, _, _ = TR.boxes_file_samples(boxes, None, bb, max_size=SIZE,
                                        cache_dir=tmp_path / "cpu-run" / "maps", val_groups=0.0, progress=False)
    torch.manual_seed(0)
    ref = RPN(mid_channels=16, sizes=(32, 64, 128), max_size=SIZE)
    hist = TR.train_rpn(ref, train, TR.RPNTrainConfig(epochs=1), progress=False)
    assert hist["epochs"][0]["train_cls"] > 0
    assert models["auto"][1]["device"] == AUTO
    for flag, (rpn, cfg) in models.items():
        if cfg["device"] != "cpu":
            continue  # auto on a GPU machine: compared with a CPU run in tests/train/test_train_device.py
        assert cfg["trained_on"]["engine"] == "winograd"
        assert [e["train_cls"] for e in cfg["history"]["epochs"]] == [e["train_cls"] for e in hist["epochs"]], flag
        for k, v in ref.state_dict().items():
            assert torch.equal(rpn.state_dict()[k], v), (flag, k)
