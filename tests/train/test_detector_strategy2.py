"""CS-SR fine-tuning strategy #2 as Salvador et al. 2016 name it (Sec. 3.2: "all layers after the first two conv
layers"): on VGG16, conv1_1 / conv1_2 frozen (the input is their pool1 map), conv2_1..conv5_3, the RPN and the
FC head trained; the package's earlier #2 (conv5 + RPN + FC) by name; the file keeps the trained lower layers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instance_search.backbones.vgg16 import VGG16
from instance_search.nets import detector as ND
from instance_search.nets.rpn import RPN
from instance_search.train import detector as FT

LOWER_CONVS = ["conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3"]


def _tiny():
    """A random VGG16 as the 'backbone', a detector on it, and two samples: pool1 maps 64 x 48 x 64 (conv5_3
    maps 6 x 8 cells), one box each."""
    torch.manual_seed(0)
    vgg = VGG16()
    bb = SimpleNamespace(net=vgg, name="vgg16")
    det = ND.Detector(RPN(mid_channels=16), 2, ["a", "b"], pool=2, hidden=16, trunk=ND.vgg16_block("conv5_1",
                                                                                                     "relu5_3", bb))
    g = torch.Generator().manual_seed(1)
    samples = []
    for k in range(2):
        img = torch.rand(1, 3, 96, 128, generator=g) * 100
        with torch.no_grad():
            p1 = vgg(img, layers=["pool1"])["pool1"][0]
        box = np.array([[16.0 + 8 * k, 16.0, 96.0, 80.0]])
        samples.append(FT.DetectorSample(box, np.array([k + 1]), None, None, f"s{k}.jpg", p1))
    return vgg, bb, det, samples


def _changed(before: dict, after: dict) -> set:
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def test_strategy_2_trains_everything_after_conv1_and_nothing_else():
    vgg, bb, det, samples = _tiny()
    assert FT.STRATEGIES[2] == "conv2+rpn+fc" and FT.LOWER_LAYERS == ("conv2_1", "pool4")
    FT.with_lower_layers(det, bb)
    src = dict(vgg.features.named_children())
    for n in LOWER_CONVS:  # starts from the backbone's weights
        assert torch.equal(getattr(det.lower, n).weight, src[n].weight)
    assert "conv1_1" not in det.lower._modules and "conv1_2" not in det.lower._modules
    conv1 = {k: v.clone() for k, v in vgg.state_dict().items() if k.startswith("features.conv1_")}
    before = {k: v.clone() for k, v in det.state_dict().items()}
    cfg = FT.DetectorTrainConfig(trainable="conv2+rpn+fc", iterations=1, images_per_batch=2, lr=1e-2,
                                 rois_per_image=8, train_proposals=20)
    FT.train_detector(det, samples, cfg, progress=False, device="cpu")
    changed = _changed(before, det.state_dict())
    expect = ({f"lower.{n}.{w}" for n in LOWER_CONVS for w in ("weight", "bias")}
              | {f"trunk.conv5_{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")}
              | {k for k in before if k.startswith(("rpn.", "head."))})
    expect -= {k for k in before if not before[k].is_floating_point()}
    assert changed == expect
    assert all(torch.equal(v, vgg.state_dict()[k]) for k, v in conv1.items())  # conv1_x: never in the graph
    assert not any(p.requires_grad for p in det.parameters())
    assert all(p.device.type == "cpu" for p in det.parameters())


def test_strategy_2_by_name_and_the_earlier_conv5_variant():
    vgg, bb, det, samples = _tiny()
    # the earlier #2 (conv5 + RPN + FC, from pool4 maps) stays reachable: the lower layers are not needed / kept
    p4 = [ND.vgg16_block("conv2_1", "pool4", bb)(s.pool1[None])[0].detach() for s in samples]
    s5 = [FT.DetectorSample(s.boxes, s.labels, p, None, s.name) for s, p in zip(samples, p4)]
    before = {k: v.clone() for k, v in det.state_dict().items()}
    cfg = FT.DetectorTrainConfig(trainable="conv5+rpn+fc", iterations=1, images_per_batch=2, lr=1e-2,
                                 rois_per_image=8, train_proposals=20)
    FT.train_detector(det, s5, cfg, progress=False)
    changed = _changed(before, det.state_dict())
    assert {f"trunk.conv5_{i}.weight" for i in (1, 2, 3)} <= changed and det.lower is None
    # finetune_detector: #2 = the paper's layers by default; trainable_2 picks the earlier variant
    fc = FT.FinetuneConfig(strategy=2, epochs=1, epochs_2=1, pool=2, hidden=16, rois_per_image=8, proposals=20)
    assert fc.phase2 == "conv2+rpn+fc"
    assert FT.FinetuneConfig(strategy=2, trainable_2="conv5+rpn+fc").validate().phase2 == "conv5+rpn+fc"
    with pytest.raises(ValueError, match="trainable_2"):
        FT.FinetuneConfig(strategy=2, trainable_2="conv1+everything").validate()
    for s, p in zip(samples, p4):
        s.conv5 = det.trunk(p[None])[0].detach()
    with pytest.raises(ValueError, match="backbone"):
        FT.finetune_detector(det, samples, ["x", "y"], fc, progress=False)
    ft, hist = FT.finetune_detector(det, samples, ["x", "y"], fc, progress=False, backbone=bb, device="cpu")
    assert ft.lower is not None and det.lower is None and len(hist["phase2"]["epochs"]) == 1
    assert not torch.equal(ft.lower.conv2_1.weight, dict(vgg.features.named_children())["conv2_1"].weight)
    with pytest.raises(ValueError, match="pool1"):  # conv2 cannot train without its input
        FT.train_detector(ft, s5, FT.DetectorTrainConfig(trainable="conv2+rpn+fc", iterations=1), progress=False)


def test_a_strategy_2_detector_file_keeps_its_lower_layers(tmp_path):
    vgg, bb, det, samples = _tiny()
    FT.with_lower_layers(det, bb)
    with torch.no_grad():
        det.lower.conv3_1.weight.mul_(1.5)
    path = ND.save_detector(det, tmp_path / "d.pt", strategy=2)
    back, cfg = ND.load_detector(path)
    assert cfg["lower"][0] == "conv2_1" and cfg["lower"][-1] == "pool4"
    assert torch.equal(back.lower.conv3_1.weight, det.lower.conv3_1.weight)
    plain = ND.Detector(RPN(mid_channels=16), 2, ["a", "b"], pool=2, hidden=16)
    assert "lower" not in plain.config()
    assert ND.load_detector(ND.save_detector(plain, tmp_path / "p.pt"))[0].lower is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_finetune_cli_device_cuda_is_refused_without_a_gpu(tmp_path):
    from typer.testing import CliRunner

    from instance_search.cli.main import app

    q = tmp_path / "q.json"
    q.write_text('{"queries": []}')
    res = CliRunner().invoke(app, ["finetune", str(q), "--out", str(tmp_path / "d.pt"), "--base", "b.pt",
                                   "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda" in res.output and not (tmp_path / "d.pt").exists()
