"""GoogLeNet (Inception v1) for Ng et al. 2015: architecture, user-supplied and hub weights, taps, the sweep.

No GoogLeNet ImageNet weights reach this machine, so every test uses a random state dict with torchvision's key
names (aux classifiers included, as torchvision's checkpoint ships them) -- no ImageNet accuracy is claimed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from instance_search.backbones import load_backbone
from instance_search.backbones import weights as W
from instance_search.backbones.weights import convert as WC
from instance_search.backbones.googlenet import (GOOGLENET_CHANNELS, GOOGLENET_INCEPTIONS, GOOGLENET_LAYERS,
                                                 GOOGLENET_PARAMS, GoogLeNet)
from instance_search.cli.main import app

HUB_NAME = "googlenet-1378be20.pth"


def _random_torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout GoogLeNet checkpoint: our keys + the two aux classifiers, no num_batches_tracked,
    random BN statistics with small variances (so that BN's eps = 1e-3 matters)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in GoogLeNet().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) * 0.02 + 0.001
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
    for k, shape in WC._googlenet_aux_shapes().items():
        if not k.endswith("num_batches_tracked"):
            sd[k] = torch.randn(shape, generator=g) * 0.01
    return sd


@pytest.fixture(scope="module")
def tv_state():
    return _random_torchvision_state()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ISEARCH_CACHE", str(d))
    return d


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """A temporary torch hub dir; any download attempt fails the test."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def refuse(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def photo(ukbench) -> Image.Image:
    return Image.open(ukbench / "ukbench00004.jpg").convert("RGB")  # 640 x 480


# slow reference ------------------------------------------------------------------------------------------------
def _ref_basic(sd, name, x, stride=1, padding=0):
    """BasicConv2d by hand: F.conv2d without bias, BatchNorm with eps 1e-3 written out, ReLU."""
    y = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    mean, var = sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"]
    w, b = sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"]
    y = (y - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-3) * w.view(1, -1, 1, 1) \
        + b.view(1, -1, 1, 1)
    return torch.clamp(y, min=0)


def _ref_inception(sd, m, x):
    """Szegedy et al. 2015 Fig. 2b as torchvision lays it out: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool3->1x1."""
    b1 = _ref_basic(sd, f"{m}.branch1", x)
    b2 = _ref_basic(sd, f"{m}.branch2.1", _ref_basic(sd, f"{m}.branch2.0", x), padding=1)
    b3 = _ref_basic(sd, f"{m}.branch3.1", _ref_basic(sd, f"{m}.branch3.0", x), padding=1)
    b4 = _ref_basic(sd, f"{m}.branch4.1", F.max_pool2d(x, 3, stride=1, padding=1))
    return torch.cat([b1, b2, b3, b4], dim=1)


def _ref_inception_3a(sd, img: Image.Image) -> torch.Tensor:
    """PIL image -> inception_3a, from the raw tensors of the file: 2*pixel/255-1 (what torchvision's
    normalisation + transform_input amount to), stem, maxpools in ceil mode, the first inception module."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0 * 2.0 - 1.0
    x = _ref_basic(sd, "conv1", x, stride=2, padding=3)
    x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
    x = _ref_basic(sd, "conv3", _ref_basic(sd, "conv2", x), padding=1)
    x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
    return _ref_inception(sd, "inception3a", x)[0]


# tests ---------------------------------------------------------------------------------------------------------
def test_architecture_matches_torchvision_tables():
    net = GoogLeNet()
    # torchvision documents num_params = 6,624,904 for GoogLeNet_Weights.IMAGENET1K_V1 (aux classifiers removed)
    assert sum(p.numel() for p in net.parameters()) == GOOGLENET_PARAMS == 6_624_904
    sd = net.state_dict()
    assert not any(k.startswith("aux") for k in sd)
    assert tuple(sd["inception3a.branch3.1.conv.weight"].shape) == (32, 16, 3, 3)  # torchvision's 3x3 "5x5"
    assert tuple(sd["inception5b.branch4.1.conv.weight"].shape) == (128, 832, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 1024) and "conv1.conv.bias" not in sd
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert [GOOGLENET_CHANNELS[t[0]] for t in GOOGLENET_INCEPTIONS] == [256, 480, 512, 512, 512, 528, 832, 832, 1024]


def test_local_file_round_trip_matches_slow_reference(tv_state, tmp_path, tmp_cache, no_network, photo):
    f = tmp_path / "my_googlenet.pth"
    torch.save(tv_state, f)
    wf = W.fetch_weights("googlenet", path=str(f), progress=False)
    assert (wf.source, wf.origin, wf.preprocessing, wf.config) == ("local", str(f), W.TORCHVISION,
                                                                  {"transform_input": True})
    assert wf.path == tmp_cache / "weights" / "googlenet.local.pt"  # cached: later loads need no path
    bb = load_backbone("googlenet")
    assert bb.weights.path == wf.path and bb.weights.state_sha256 == wf.state_sha256
    assert load_backbone("googlenet", weights="local").weights.path == wf.path
    row = next(r for r in W.list_weights() if r["arch"] == "googlenet")
    assert row["sources"] == ["torchvision", "local"] and row["source"] == "local"

    # features at inception_3a == the slow reference computed from the file's raw tensors
    raw = torch.load(f, map_location="cpu", weights_only=True)
    crop = photo.crop((200, 150, 328, 262))  # 128 x 112
    got = bb.features(crop, "inception_3a")[("inception_3a", 1.0)]
    ref = _ref_inception_3a(raw, crop)
    assert got.shape == ref.shape == (256, 14, 16)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), float((got - ref).abs().max())
    assert float(ref.abs().max()) > 0.1  # not a trivially zero map

    # one deeper inception module, fed the network's own 4d output, against the reference
    x4d = bb.features(crop, "inception_4d")[("inception_4d", 1.0)][None]
    assert torch.allclose(bb.net.inception4e(x4d), _ref_inception(raw, "inception4e", x4d), rtol=1e-4, atol=1e-4)

    # transform_input + torchvision normalisation == Inception-style [-1, 1] input without it
    plain = W.model_from_state_dict("googlenet", {"transform_input": False}, W.load_state_dict(wf))
    with torch.no_grad():
        a = bb.net(bb.preprocess(crop)[None], "inception_4a")["inception_4a"]
        b = plain(W.INCEPTION.apply(torch.from_numpy(np.asarray(crop, np.float32)).permute(2, 0, 1))[None],
                  "inception_4a")["inception_4a"]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    # ... and a record next to the user's file saying so is kept with the cached copy
    f.with_suffix(".json").write_text(json.dumps({"arch": "googlenet", "preprocessing": W.INCEPTION.to_dict(),
                                                  "config": {"transform_input": False}}))
    wf2 = W.fetch_weights("googlenet", path=str(f), progress=False)
    bb2 = load_backbone("googlenet")
    assert (bb2.weights.preprocessing, bb2.weights.config) == (W.INCEPTION, {"transform_input": False})
    assert wf2.path == wf.path and not bb2.net.transform_input
    assert torch.allclose(bb2.features(crop, "inception_3a")[("inception_3a", 1.0)], got, rtol=1e-4, atol=1e-4)
    f.with_suffix(".json").unlink()

    # classifier: fc of the global average of inception_5b
    assert bb.has_classifier
    x = bb.preprocess(photo.resize((224, 224)))
    logits = bb.classify(x)
    x5 = bb.features(x, "inception_5b")[("inception_5b", 1.0)]
    assert logits.shape == (1000,)
    assert torch.allclose(logits, raw["fc.weight"] @ x5.mean(dim=(1, 2)) + raw["fc.bias"], rtol=1e-4, atol=1e-4)


def _pool_out(n: int, k: int, s: int) -> int:
    """Output size of a ceil-mode max-pool without padding (a window may not start past the input)."""
    out = math.ceil((n - k) / s) + 1
    return out - 1 if (out - 1) * s >= n else out


def test_shapes_strides_on_a_real_image(tv_state, tmp_path, tmp_cache, photo):
    f = tmp_path / "g.pth"
    torch.save(tv_state, f)
    bb = load_backbone("googlenet", weights=str(f))
    maps = bb.features(photo, list(GOOGLENET_LAYERS))
    h, w = photo.height, photo.width  # 480 x 640
    # expected sizes, layer by layer, from the definitions (conv1 7x7/2 pad 3, ceil-mode pools)
    size = [(n + 6 - 7) // 2 + 1 for n in (h, w)]
    size = [_pool_out(n, 3, 2) for n in size]  # maxpool1
    size = [_pool_out(n, 3, 2) for n in size]  # maxpool2
    expected = {}
    for tap, mod, *_ in GOOGLENET_INCEPTIONS:
        if mod == "inception4a":
            size = [_pool_out(n, 3, 2) for n in size]
        if mod == "inception5a":
            size = [_pool_out(n, 2, 2) for n in size]
        expected[tap] = tuple(size)
    expected["pool5"] = (size[0] - 6, size[1] - 6)
    assert expected["inception_3a"] == (60, 80) and expected["inception_5b"] == (15, 20)
    strides = {"inception_3a": 8, "inception_3b": 8, "inception_4a": 16, "inception_4e": 16, "inception_5b": 32,
               "pool5": 32}
    for layer in GOOGLENET_LAYERS:
        m = maps[(layer, 1.0)]
        assert tuple(m.shape) == (bb.channels(layer), *expected[layer]), layer
        assert bb.stride(layer) == strides.get(layer, bb.stride(layer))
        if layer != "pool5":
            assert tuple(m.shape[1:]) == (math.ceil(h / bb.stride(layer)), math.ceil(w / bb.stride(layer)))
        assert float(m.min()) >= 0.0  # post-ReLU (pool5 averages post-ReLU maps)
    assert bb.layers == list(GOOGLENET_LAYERS) and bb.default_layer == "inception_5b"
    assert bb.receptive_field("inception_3a") == 43 and bb.receptive_field("inception_5b") == 379
    # pool5 is Caffe's 7x7/1 average pool over inception_5b
    ref = F.avg_pool2d(maps[("inception_5b", 1.0)][None], 7, stride=1)[0]
    assert torch.allclose(maps[("pool5", 1.0)], ref, atol=1e-5)
    # a second scale, and the clear errors
    half = bb.features(photo, "inception_4c", scales=(0.5,))[("inception_4c", 0.5)]
    assert tuple(half.shape) == (512, 15, 20)
    with pytest.raises(ValueError, match="pool5"):
        bb.features(photo.resize((120, 90)), "pool5")
    with pytest.raises(KeyError, match="inception_3a"):
        bb.features(photo, "conv5_3")


def test_bad_files_are_refused_by_name(tv_state, tmp_path, tmp_cache):
    f = tmp_path / "bad_googlenet.pth"
    wrong = dict(tv_state)
    wrong["inception4c.branch2.1.conv.weight"] = torch.zeros(256, 128, 5, 5)  # a real 5x5 (Caffe) kernel
    torch.save(wrong, f)
    with pytest.raises(W.WeightsError) as e:
        W.fetch_weights("googlenet", path=str(f), progress=False)
    assert str(f) in str(e.value) and "inception4c.branch2.1.conv.weight (256, 128, 5, 5)" in str(e.value)

    missing = {k: v for k, v in tv_state.items() if not k.startswith("inception5b.branch4")}
    torch.save(missing, f)
    with pytest.raises(W.WeightsError, match="missing: inception5b.branch4.1.conv.weight") as e:
        load_backbone("googlenet", weights=str(f))
    assert str(f) in str(e.value)

    aux = dict(tv_state)
    aux["aux1.fc1.weight"] = torch.zeros(1024, 1024)
    torch.save(aux, f)
    with pytest.raises(W.WeightsError, match="aux1.fc1.weight") as e:
        W.fetch_weights("googlenet", path=str(f), progress=False)
    assert str(f) in str(e.value)

    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, f)  # a VGG16 file
    with pytest.raises(W.WeightsError, match="no known layout") as e:
        W.fetch_weights("googlenet", path=str(f), progress=False)
    assert str(f) in str(e.value)
    f.write_bytes(b"garbage")
    with pytest.raises(W.WeightsError, match="cannot be read"):
        W.fetch_weights("googlenet", path=str(f), progress=False)
    assert not (tmp_cache / "weights" / "googlenet.local.pt").exists()  # nothing bad was cached


def test_without_weights_the_error_says_how_to_supply_them(tmp_cache, no_network):
    with pytest.raises(W.WeightsError) as e:
        load_backbone("googlenet")
    msg = str(e.value)
    assert "No package registry carries googlenet weights" in msg
    assert "isearch weights fetch googlenet --path FILE" in msg and HUB_NAME in msg
    with pytest.raises(W.WeightsError, match="no file was supplied"):
        W.fetch_weights("googlenet", source="local", progress=False)
    assert W.canon_arch("inception-v1") == "googlenet"


def test_hub_checkpoint_from_the_hub_cache_without_network(tv_state, tmp_cache, no_network, monkeypatch):
    """As tests/backbones/test_weights.py does for ResNet-50: torchvision's file name carries the first 8 hex digits of its
    sha256, so a fake placed under the real name is rejected and one under its own hash's name is used."""
    buf = io.BytesIO()
    torch.save(tv_state, buf)
    data = buf.getvalue()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    no_network.mkdir(parents=True)
    (no_network / HUB_NAME).write_bytes(data)
    (no_network / f"googlenet-{prefix}.pth").write_bytes(data)

    tv_src, local_src = W.SOURCES["googlenet"]
    assert tv_src.kind == "hub" and tv_src.url == f"https://download.pytorch.org/models/{HUB_NAME}"
    assert not any(s.kind == "package" for s in W.SOURCES["googlenet"])
    with pytest.raises(W.WeightsError, match="1378be20"):
        W.fetch_weights("googlenet", source="torchvision", progress=False)

    moved = dataclasses.replace(tv_src, url=tv_src.url.replace("1378be20", prefix))
    monkeypatch.setitem(W.SOURCES, "googlenet", (moved, local_src))
    wf = W.fetch_weights("googlenet", source="hub", progress=False)
    assert wf.source == "torchvision" and wf.preprocessing == W.TORCHVISION
    assert wf.config == {"transform_input": True} and wf.path == tmp_cache / "weights" / "googlenet.torchvision.pt"
    sd = W.load_state_dict(wf)
    assert not any(k.startswith("aux") for k in sd) and "conv1.bn.num_batches_tracked" in sd
    bb = load_backbone("googlenet")  # now from our cache
    assert bb.weights.path == wf.path and bb.net.transform_input
    assert torch.equal(bb.net.fc.weight, tv_state["fc.weight"])


@pytest.mark.slow
def test_ng_sweep_accepts_googlenet(tv_state, tmp_path, tmp_cache, monkeypatch):
    """`isearch weights fetch googlenet --path FILE` then `isearch sweep --backbone googlenet` on 24+24 real
    images (random weights: the figures are only checked to be mAPs)."""
    monkeypatch.chdir(tmp_path)  # the sweep's cache goes under ./benchmarks/cache
    f = tmp_path / "random_googlenet.pth"
    torch.save(tv_state, f)
    runner = CliRunner()
    res = runner.invoke(app, ["weights", "fetch", "googlenet", "--path", str(f)])
    assert res.exit_code == 0, res.output
    assert "googlenet.local.pt" in res.output
    out = tmp_path / "s.json"
    res = runner.invoke(app, ["sweep", "--backbone", "googlenet", "--layer", "inception_3a", "--layer",
                              "inception_4e", "--benchmark", "holidays", "--benchmark", "ukbench", "--limit",
                              "holidays=24", "--limit", "ukbench=24", "--max-size", "128", "--scale", "1", "--k",
                              "8", "--out-dim", "16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    rows = {(r["benchmark"], r["layer"]) for r in result["rows"]}
    assert rows == {(b, la) for b in ("holidays", "ukbench") for la in ("inception_3a", "inception_4e")}
    assert all(0.0 <= r["map"] <= 100.0 for r in result["rows"])
    sha = W.fetch_weights("googlenet", progress=False).state_sha256
    assert result["settings"]["weights"] == f"googlenet-{sha[:12]}"
    cached = list((tmp_path / "benchmarks" / "cache" / "ngvlad").iterdir())
    assert cached and all(p.name.split("_")[1] == f"googlenet-{sha[:12]}" for p in cached)
    # a layer GoogLeNet does not have is refused by name
    res = runner.invoke(app, ["sweep", "--backbone", "googlenet", "--layer", "conv5_3", "--benchmark", "holidays",
                              "--benchmark", "ukbench", "--limit", "holidays=8", "--limit", "ukbench=8",
                              "--max-size", "128", "--scale", "1", "--k", "4", "--out-dim", "4"])
    assert res.exit_code != 0 and "conv5_3" in res.output
