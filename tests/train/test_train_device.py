"""The training code on a chosen device (``--device`` of clean / train-rmac / train-rpn, issue 15): on the CPU
``device="cpu"`` trains exactly as without it; on a CUDA GPU (skipped without one) a tiny training step runs
there, matches the CPU run, and writes files that hold CPU tensors only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.nets import rmac_head as rn
from instance_search.nets.rpn import RPN, load_rpn, save_rpn
from instance_search.train import cleaning as cl
from instance_search.train import rpn as TR
from instance_search.train import triplet as tr

NO_CUDA = "torch.cuda.is_available() is False on this machine: the CUDA path runs on a GPU machine only"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ------------------------------------------------------------------------------------------------ triplets
def _triplet_data():
    """12 conv5_3-like maps (512 x 4 x 4, two sizes) in 4 groups: a group shares a random pattern plus noise."""
    g = torch.Generator().manual_seed(0)
    base = [torch.rand(512, 4, 4, generator=g) for _ in range(4)]
    inputs, labels = [], []
    for i in range(12):
        x = base[i % 4] + 0.8 * torch.rand(512, 4, 4, generator=g)
        inputs.append(x if i < 8 else x[:, :, :3].contiguous())
        labels.append(i % 4)
    return inputs, np.asarray(labels)


def _triplet_run(device, folder=None):
    inputs, labels = _triplet_data()
    torch.manual_seed(0)
    net = rn.RMACNet("head", out_dim=64)
    net.head.fc.weight.data.normal_(0, 0.05)
    cfg = tr.TrainConfig(epochs=2, lr=0.05, batch=4, micro_batch=2, remine_every=1, skip_easy=False, seed=3)
    trainer = tr.TripletTrainer(net, inputs, labels, cfg, folder, progress=False, device=device)
    hist = trainer.fit(resume=False)
    return trainer, hist


def test_triplet_trainer_on_cpu_device_trains_as_before(tmp_path):
    base, h0 = _triplet_run(None)
    for dev in ("cpu", torch.device("cpu")):
        t, h = _triplet_run(dev)
        assert t.device.type == "cpu"
        assert [u["loss"] for u in h["updates"]] == [u["loss"] for u in h0["updates"]]
        assert [u["active"] for u in h["updates"]] == [u["active"] for u in h0["updates"]]
        for k, v in base.net.state_dict().items():
            assert torch.equal(t.net.state_dict()[k], v), k
    assert len(h0["updates"]) >= 4 and h0["updates"][0]["loss"] > 0  # something was trained


@needs_cuda
def test_triplet_trainer_on_cuda(tmp_path):
    cpu, h_cpu = _triplet_run("cpu")
    gpu, h_gpu = _triplet_run("cuda", tmp_path / "run")
    assert gpu.device.type == "cuda" and all(p.device.type == "cuda" for p in gpu.net.parameters())
    assert [u["active"] for u in h_gpu["updates"]] == [u["active"] for u in h_cpu["updates"]]
    assert [u["loss"] for u in h_gpu["updates"]] == pytest.approx([u["loss"] for u in h_cpu["updates"]], abs=1e-4)
    # what is written holds CPU tensors only: it loads on a machine without a GPU
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # no map_location on purpose
    assert ck["optimizer"]["state"] and all(t.device.type == "cpu" for t in _tensors(ck))
    sd = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in sd.values())
    net, _ = rn.load_model(tmp_path / "run" / "model.pt")
    for k, v in gpu.net.state_dict().items():
        assert torch.equal(net.state_dict()[k], v.cpu()), k
    # and a checkpoint written on the GPU resumes on the CPU
    inputs, labels = _triplet_data()
    cfg = tr.TrainConfig(epochs=3, lr=0.05, batch=4, micro_batch=2, remine_every=1, skip_easy=False, seed=3)
    again = tr.TripletTrainer(rn.RMACNet("head", out_dim=64), inputs, labels, cfg, tmp_path / "run",
                              progress=False, device="cpu")
    assert again.load_checkpoint() and again.epoch == 2
    again.fit(resume=True)
    assert again.epoch == 3


# ------------------------------------------------------------------------------------------------ RPN
def _rpn_samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(4):
        fmap = torch.rand(64, 6, 8, generator=g)
        box = np.array([[16.0 + 4 * i, 8.0, 96.0, 80.0 - 2 * i]], dtype=np.float32)
        out.append(TR.RPNSample(fmap=fmap, boxes=box, name=f"s{i}"))
    return out


def _rpn_run(device, folder=None):
    torch.manual_seed(0)
    rpn = RPN(in_channels=64, mid_channels=16, sizes=(32, 64), max_size=128)
    cfg = TR.RPNTrainConfig(epochs=2, lr=0.01, images_per_batch=2, anchors_per_image=64)
    hist = TR.train_rpn(rpn, _rpn_samples(), cfg, folder, val_samples=_rpn_samples()[:1], progress=False,
                        device=device)
    return rpn, hist


def test_train_rpn_on_cpu_device_trains_as_before():
    base, h0 = _rpn_run(None)
    rpn, h = _rpn_run("cpu")
    keys = ("train_cls", "train_reg", "val_cls", "val_reg")
    assert [[e[k] for k in keys] for e in h["epochs"]] == [[e[k] for k in keys] for e in h0["epochs"]]
    for k, v in base.state_dict().items():
        assert torch.equal(rpn.state_dict()[k], v), k
    assert h0["epochs"][0]["train_cls"] > 0


@needs_cuda
def test_train_rpn_on_cuda(tmp_path):
    cpu, h_cpu = _rpn_run("cpu")
    gpu, h_gpu = _rpn_run("cuda", tmp_path / "ck")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    for a, b in zip(h_gpu["epochs"], h_cpu["epochs"]):
        for k in ("train_cls", "train_reg", "val_cls", "val_reg"):
            assert a[k] == pytest.approx(b[k], abs=1e-4), k
    ck = torch.load(tmp_path / "ck" / "epoch-002.pt", weights_only=True)  # no map_location on purpose
    assert ck["optimizer"]["state"] and all(t.device.type == "cpu" for t in _tensors(ck))
    path = save_rpn(gpu, tmp_path / "rpn.pt")  # the writer train_rpn_on_boxes uses
    assert all(t.device.type == "cpu" for t in torch.load(path, weights_only=True).values())
    back, _ = load_rpn(path)
    for k, v in gpu.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.cpu()), k


# ------------------------------------------------------------------------------------------------ cleaning
def test_ratio_test_distances_with_torch_equal_numpy(ukbench):
    """The torch path of the ratio test (what runs on ``cuda``) computes the same two nearest neighbours and
    distances as NumPy, here on the CPU, on real SIFT descriptors (integer-valued: exact in float32)."""
    fa = cl.sift_features(ukbench / "ukbench00000.jpg")
    fb = cl.sift_features(ukbench / "ukbench00001.jpg")
    a, b = fa.descriptors.astype(np.float32), fb.descriptors.astype(np.float32)
    i_np, d_np = cl._two_nearest(a, b)
    i_t, d_t = cl._two_nearest_torch(a, b, "cpu")
    assert i_t.shape == i_np.shape == (len(a), 2) and i_t.dtype == np.int64
    s_np, s_t = np.sort(d_np, axis=1), np.sort(d_t, axis=1)
    assert np.array_equal(s_np, s_t)
    near_np = i_np[np.arange(len(a)), np.argmin(d_np, axis=1)]
    near_t = i_t[np.arange(len(a)), np.argmin(d_t, axis=1)]
    clear = s_np[:, 0] < s_np[:, 1]  # no tie for the nearest
    assert clear.mean() > 0.9 and np.array_equal(near_np[clear], near_t[clear])


@needs_cuda
def test_ratio_matches_on_cuda_equal_cpu(ukbench):
    fa = cl.sift_features(ukbench / "ukbench00000.jpg")
    fb = cl.sift_features(ukbench / "ukbench00001.jpg")
    q, t = cl.ratio_matches(fa.descriptors, fb.descriptors, 0.8)
    qg, tg = cl.ratio_matches(fa.descriptors, fb.descriptors, 0.8, device="cuda")
    assert len(q) > 50 and np.array_equal(q, qg) and np.array_equal(t, tg)
    m, mg = cl.match_pair(fa, fb), cl.match_pair(fa, fb, device="cuda")
    assert m.score == mg.score and np.allclose(m.affine, mg.affine)


# ------------------------------------------------------------------------------------------------ refused devices
def test_unknown_devices_are_refused_naming_them():
    from instance_search.errors import ISearchError

    for bad in ("banana", "tpu", 3.5):
        with pytest.raises(ISearchError, match="device"):
            tr.check_device(bad)
    assert tr.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'banana'"):
        TR.train_rpn(RPN(in_channels=64, mid_channels=16, sizes=(32, 64)), _rpn_samples(), progress=False,
                     device="banana")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: 'cuda' is not refused here")
def test_cuda_without_a_gpu_is_refused_by_the_library(tmp_path):
    from instance_search.eval.datasets.splits import TrainingSet

    with pytest.raises(ValueError, match="device 'cuda': torch sees no CUDA GPU"):
        tr.check_device("cuda")
    rpn = RPN(in_channels=64, mid_channels=16, sizes=(32, 64))
    with pytest.raises(ValueError, match="device 'cuda': torch sees no CUDA GPU"):
        TR.train_rpn(rpn, _rpn_samples(), checkpoint_dir=tmp_path / "ck", progress=False, device="cuda")
    inputs, labels = _triplet_data()
    with pytest.raises(ValueError, match="device 'cuda': torch sees no CUDA GPU"):
        tr.TripletTrainer(rn.RMACNet("head"), inputs, labels, device="cuda")
    missing = TrainingSet([tmp_path / "a.jpg", tmp_path / "b.jpg"], np.zeros(2, np.int64), ["x", "x"])
    with pytest.raises(ValueError, match="device 'cuda': torch sees no CUDA GPU"):  # before the (missing) images
        cl.clean_and_box(missing, root=tmp_path, progress=False, device="cuda")
    assert sorted(tmp_path.iterdir()) == []
