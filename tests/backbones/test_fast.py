"""The Winograd engine (instance_search.backbones.fast) against direct convolution."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from instance_search.backbones import fast


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference(x, w, b, relu=False, pool=False):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    if relu:
        y = F.relu(y)
    if pool:
        y = F.max_pool2d(y, 2)
    return y


_SHAPES = [((1, 8, 13, 17), 16), ((2, 5, 6, 9), 7), ((1, 3, 1, 1), 4), ((1, 16, 4, 4), 8), ((3, 32, 21, 11), 24)]
_CASES = [
    (shape, cout, relu, pool)
    for shape, cout in _SHAPES
    for relu, pool in [(False, False), (True, False), (True, True)]
    if not (pool and min(shape[2:]) < 2)  # F.max_pool2d needs 2x2
]


@pytest.mark.parametrize("shape,cout,relu,pool", _CASES)
def test_winograd_conv_matches_conv2d(shape, cout, relu, pool):
    g = torch.Generator().manual_seed(sum(shape) + cout)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(cout, shape[1], 3, 3, generator=g) / (9 * shape[1]) ** 0.5
    b = torch.randn(cout, generator=g)
    ref = _reference(x, w, b, relu, pool)
    out = fast.winograd_conv2d(x, w, b, relu=relu, pool=pool)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 2e-5
    # the fp32 direct convolution is about as far from the float64 truth as the Winograd one
    assert _rel(out, ref) < 20 * max(_rel(F.conv2d(x, w, b, padding=1), _reference(x, w, b)), 1e-7)


def test_winograd_conv_strips_and_no_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 30, 26, generator=g)
    w = torch.randn(10, 12, 3, 3, generator=g)
    ref = _reference(x, w, None)
    for strip in (1, 7, 10_000):  # one tile row per strip, several, everything at once
        assert _rel(fast.winograd_conv2d(x, w, None, strip_tiles=strip), ref) < 2e-5


def test_transform_weight_shape_and_errors():
    w = torch.randn(5, 4, 3, 3)
    assert fast.transform_weight(w).shape == (36, 4, 5)
    with pytest.raises(ValueError):
        fast.transform_weight(torch.randn(5, 4, 5, 5))
    with pytest.raises(ValueError):
        fast.winograd_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3))


def _mini_vgg(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, c, blk, i = [], 3, 1, 1
    for v in [16, 16, "M", 32, 32, "M", 48, 48, "M", 64, 64]:
        if v == "M":
            layers.append((f"pool{blk}", nn.MaxPool2d(2, 2)))
            blk, i = blk + 1, 1
            continue
        conv = nn.Conv2d(c, v, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight)
        nn.init.normal_(conv.bias, std=0.1)
        layers += [(f"conv{blk}_{i}", conv), (f"relu{blk}_{i}", nn.ReLU())]
        c, i = v, i + 1
    return nn.Sequential(OrderedDict(layers)).eval()


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 64, 80), (1, 3, 45, 45), (1, 3, 9, 10)])
def test_trunk_matches_sequential(shape):
    net = _mini_vgg()
    trunk = fast.WinogradVGGTrunk(net.named_children())
    x = torch.randn(*shape) * 50
    taps = {}
    with torch.no_grad():
        h = x
        for name, mod in net.named_children():
            h = mod(h)
            taps[name] = h.clone()
    names = ["relu1_2", "pool1", "relu3_2", "pool3", "conv4_2"]
    out = trunk(x, names)
    for name in names:
        ref = taps["relu4_2" if name == "conv4_2" else name]  # a conv's name is its output after its ReLU
        assert out[name].shape == ref.shape, name
        assert _rel(out[name], ref) < 1e-4, name
    # default: the last layer; a second call with another size reuses the buffers correctly
    assert _rel(trunk(x)["conv4_2"], taps["relu4_2"]) < 1e-4
    x2 = torch.randn(1, 3, 20, 31) * 50
    with torch.no_grad():
        ref2 = net(x2)
    assert _rel(trunk(x2, "relu4_2")["relu4_2"], ref2) < 1e-4
    assert _rel(trunk(x)["conv4_2"], taps["relu4_2"]) < 1e-4


def test_trunk_rejects_other_layers():
    with pytest.raises(ValueError):
        fast.WinogradVGGTrunk([("c", nn.Conv2d(3, 4, 3, padding=1, stride=2))])
    with pytest.raises(ValueError):
        fast.WinogradVGGTrunk([("c", nn.Conv2d(3, 4, 5, padding=2))])
    with pytest.raises(ValueError):
        fast.WinogradVGGTrunk([("c", nn.Conv2d(3, 4, 3, padding=1)), ("bn", nn.BatchNorm2d(4))])
    trunk = fast.WinogradVGGTrunk(_mini_vgg().named_children())
    with pytest.raises(KeyError):
        trunk(torch.randn(1, 3, 16, 16), "conv9_9")


# ------------------------------------------------------------------------------------------------------------
# the real network
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg16():
    try:
        from instance_search.backbones import load_backbone
    except ImportError as exc:  # pragma: no cover - only while the backbones package is being written
        pytest.skip(f"instance_search.backbones.load_backbone is not importable yet: {exc}")
    return load_backbone("vgg16", progress=False)


@pytest.mark.slow
def test_real_vgg16_descriptors_match_exact(vgg16, ukbench, paris):
    from instance_search.images import load_image
    from instance_search.ops.pooling import mac, rmac

    photos = [load_image(ukbench / "ukbench00000.jpg", max_size=400)]  # 400 x 300
    paris_jpg = sorted(paris.glob("*.jpg"))[0]
    photos.append(load_image(paris_jpg).crop((100, 50, 100 + 301, 50 + 233)))  # odd sizes, not multiples of 4
    layers = ["conv5_3", "pool5", "conv3_3"]
    try:
        for img in photos:
            fast.use_engine(vgg16, "exact")
            assert vgg16.trunk is vgg16.net and fast.engine_of(vgg16) == "exact"
            ref = vgg16.features(img, layers)
            fast.use_engine(vgg16, "winograd")
            assert isinstance(vgg16.trunk, fast.WinogradVGGTrunk) and fast.engine_of(vgg16) == "winograd"
            out = vgg16.features(img, layers)
            for key, r in ref.items():
                assert out[key].shape == r.shape, key
                assert _rel(out[key], r) < 1e-4, key  # measured ~3e-6
            a, b = ref[("conv5_3", 1.0)], out[("conv5_3", 1.0)]
            assert float(F.cosine_similarity(mac(a).double(), mac(b).double(), dim=0)) >= 0.99999
            assert float(F.cosine_similarity(rmac(a).double(), rmac(b).double(), dim=0)) >= 0.99999
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    finally:
        fast.use_engine(vgg16, "exact")
    assert vgg16.trunk is vgg16.net


def test_use_engine_rejects_unknown(vgg16):
    with pytest.raises(ValueError):
        fast.use_engine(vgg16, "turbo")
    assert fast.engine_of(vgg16) == "exact"


def test_trunk_strip_workers_match_sequential_and_release():
    """The default parallel path (strips shared out to worker threads) is taken only with more than one torch
    thread; some test modules set one thread at import, so this test sets two itself. Its output must equal the
    sequential network, and ``release`` must free the buffers and the workers, which come back on the next call."""
    net = _mini_vgg()
    x = torch.randn(1, 3, 45, 61) * 50
    with torch.no_grad():
        ref = net(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trunk = fast.WinogradVGGTrunk(net.named_children())
        assert trunk.parallel == "strips"
        out = trunk(x, "relu4_2")["relu4_2"]
        assert trunk._pool is not None and trunk._pool.workers == 2  # the workers did run
        assert _rel(out, ref) < 1e-4
        assert trunk.workspace_bytes() > 0
        trunk.release()
        assert trunk._pool is None and trunk.workspace_bytes() == 0
        assert _rel(trunk(x, "relu4_2")["relu4_2"], ref) < 1e-4  # works again after release
        omp = fast.WinogradVGGTrunk(net.named_children(), parallel="omp")
        assert _rel(omp(x, "relu4_2")["relu4_2"], ref) < 1e-4 and omp._pool is None
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="parallel must be"):
        fast.WinogradVGGTrunk(net.named_children(), parallel="gpu")


# ----------------------------------------------------------------------------- ResNet-50, BatchNorm folded
def test_fold_batchnorm_matches_conv_then_bn():
    torch.manual_seed(0)
    for bias in (True, False):
        conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=bias).double()
        bn = nn.BatchNorm2d(7, eps=1e-3).double()
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 2)
        bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
        bn.eval()
        x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
        w, b = fast.fold_batchnorm(conv, bn, torch.float64)
        torch.testing.assert_close(F.conv2d(x, w, b, 2, 1), bn(conv(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_folded_resnet50_equals_unfolded_on_real_photos(ukbench, paris):
    """Issue 14, item 3 (first part): ResNet-50 with BatchNorm folded, channels-last, equals the unfolded network:
    float64 folded = float64 unfolded to 1e-10, and the fp32 engine's res5 MAC / R-MAC have cosine >= 0.99999
    with the float64 reference on real photos."""
    from instance_search import backbones
    from instance_search.images import load_image
    from instance_search.ops.pooling import mac, rmac

    try:
        bb = backbones.load_backbone("resnet50", progress=False)
    except backbones.WeightsError as exc:
        pytest.skip(f"ResNet-50 weights unavailable: {exc}")
    photos = [load_image(ukbench / "ukbench00004.jpg", max_size=320),
              load_image(sorted(paris.glob("*.jpg"))[3], max_size=288)]
    net64 = __import__("copy").deepcopy(bb.net).double().eval()
    folded64 = fast.FoldedResNet50(bb.net, dtype=torch.float64, channels_last=False)
    try:
        for img in photos:
            x = bb.preprocess(img)[None]
            with torch.no_grad():
                ref = net64(x.double(), ["res3", "res5"])
            got64 = folded64(x, ["res3", "res5"])
            for k in ref:
                assert _rel(got64[k], ref[k]) < 1e-10, k
            fast.use_engine(bb, "folded")
            assert fast.engine_of(bb) == "folded"
            out = bb.features(img, ["res5", "res3"])
            fast.use_engine(bb, "exact")
            exact = bb.features(img, ["res5"])
            a, r = out[("res5", 1.0)], ref["res5"][0]
            assert a.shape == r.shape
            assert _rel(a, r) < 1e-4 and _rel(out[("res3", 1.0)], ref["res3"][0]) < 1e-4
            assert _rel(exact[("res5", 1.0)], r) < 1e-4
            for pool in (mac, rmac):
                assert float(F.cosine_similarity(pool(a).double(), pool(r.float()).double(), dim=0)) >= 0.99999
    finally:
        fast.use_engine(bb, "exact")


def test_folded_engine_refuses_vgg16(vgg16):
    with pytest.raises(ValueError, match="ResNet-50"):
        fast.use_engine(vgg16, "folded")
    assert fast.engine_of(vgg16) == "exact"


# ----------------------------------------------------------------------------- the default engine: auto
def test_resolve_engine_auto_and_explicit():
    """Issue 14 item 3 / issue 15: ``auto`` is winograd for VGG16 and ResNet-50 on the CPU, folded for
    EfficientNet-Lite0 on the CPU, exact for any other backbone or on a GPU; explicit engines come back as they are where they can run, else EngineError."""
    from instance_search.errors import ISearchError

    r = fast.resolve_engine
    assert r("vgg16", "cpu") == "winograd" and r("resnet50", torch.device("cpu"), "auto") == "winograd"
    assert r("efficientnet-lite0", "cpu") == "folded" and r("efficientnet-lite0", "cuda") == "exact"
    assert r("googlenet", "cpu") == "exact"
    for gpu in ("cuda", "cuda:1", torch.device("cuda", 0)):  # a name only: no GPU needed to resolve
        assert r("vgg16", gpu) == "exact" and r("resnet50", gpu) == "exact"
        assert r("vgg16", gpu, "exact") == "exact"
        with pytest.raises(fast.EngineError, match="CPU only"):
            r("vgg16", gpu, "winograd")
    assert r("vgg16", "cpu", "exact") == "exact" and r("googlenet", "cpu", "exact") == "exact"
    assert r("vgg16", "cpu", "winograd") == "winograd" and r("resnet50", "cpu", "winograd") == "winograd"
    assert r("resnet50", "cpu", "folded") == "folded"
    with pytest.raises(fast.EngineError, match="'turbo'") as exc:
        r("vgg16", "cpu", "turbo")
    assert isinstance(exc.value, ISearchError) and isinstance(exc.value, ValueError)
    with pytest.raises(fast.EngineError, match="efficientnet-lite0"):
        r("efficientnet-lite0", "cpu", "winograd")
    with pytest.raises(fast.EngineError, match="vgg16"):
        r("vgg16", "cpu", "folded")


def test_describer_and_commands_default_to_auto():
    """The engine is ``auto`` by default in the API (Describer, Collection.create / open, fit_recipe, the server,
    the Ray extractor) and on every ``isearch`` command that takes ``--engine``; a Describer resolves it for its
    backbone and device without loading a network, and refuses a bad engine when built."""
    import inspect

    import typer.main

    from instance_search import collection
    from instance_search.cli.main import app
    from instance_search.demo import run_demo
    from instance_search.eval.rerank_eval import evaluate_search
    from instance_search.index.distributed import RayExtractor, add_folder_ray
    from instance_search.recipes.base import Recipe
    from instance_search.server.routes import create_app, serve
    from instance_search.server.service import SearchService

    for fn in (collection.Describer, collection.Collection.create, collection.Collection.open,
               collection.Collection, collection.fit_recipe, RayExtractor, add_folder_ray, create_app, serve,
               SearchService, run_demo, evaluate_search):
        assert inspect.signature(fn).parameters["engine"].default == "auto", fn
    assert collection.Describer(Recipe("rmac", backbone="vgg16")).engine_name == "winograd"
    assert collection.Describer(Recipe("mac", backbone="resnet50")).engine_name == "winograd"
    assert collection.Describer(Recipe("mac", backbone="efficientnet-lite0")).engine_name == "folded"
    assert collection.Describer(Recipe("mac", backbone="vgg16"), device="cuda").engine_name == "exact"
    assert collection.Describer(Recipe("mac", backbone="vgg16"), engine="exact").engine_name == "exact"
    with pytest.raises(fast.EngineError, match="'fastest'"):
        collection.Describer(Recipe("mac", backbone="vgg16"), engine="fastest")

    import instance_search.cli.search  # noqa: F401 - registers `isearch search`

    cmd = typer.main.get_command(app)
    seen = set()
    for name, sub in cmd.commands.items():
        if getattr(sub.callback, "__module__", "") == "instance_search.cli.train":
            continue  # the training commands choose their own engine for the frozen layers (cli/train.py)
        for p in getattr(sub, "params", []):
            if p.name in ("engine", "worker_engine"):
                assert p.default == "auto", (name, p.name, p.default)
                seen.add(name)
    assert {"index", "search", "serve", "eval", "demo"} <= seen, seen


# ----------------------------------------------------------------------------- ResNet-50, Winograd
def _random_bn(net):
    g = torch.Generator().manual_seed(0)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
    return net.eval()


@pytest.mark.parametrize("variant", ["caffe", "pytorch"])
def test_winograd_resnet50_matches_float64_random_weights(variant):
    """Both variants (the Caffe one: every 3x3 conv stride 1; torchvision's: stride-2 3x3 convs, which stay
    direct) against the float64 network, at sizes that are not multiples of 4 and with a batch of two."""
    from instance_search.backbones.resnet50 import ResNet50

    torch.manual_seed(0)
    net = _random_bn(ResNet50(variant))
    net64 = __import__("copy").deepcopy(net).double()
    eng = fast.FoldedResNet50(net, winograd=True)
    assert eng.winograd and all(b.u2 is not None for row in eng._fast for b in row) == (variant == "caffe")
    for shape in [(1, 3, 70, 93), (2, 3, 64, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = net64(x.double(), ["conv1", "res2", "res4", "res5"])
        out = eng(x, ["res5", "res2", "conv1", "res4"])
        for k, r in ref.items():
            assert out[k].shape == r.shape and out[k].dtype == torch.float32, k
            assert out[k].is_contiguous(), k
            assert _rel(out[k], r) < 1e-5, (k, _rel(out[k], r))
    assert eng.workspace_bytes() > 0
    eng.release()
    assert eng.workspace_bytes() == 0
    with pytest.raises(ValueError, match="float32"):
        fast.FoldedResNet50(net, dtype=torch.float64, winograd=True)


@pytest.mark.slow
def test_winograd_resnet50_matches_exact_on_real_photos(ukbench, paris):
    """Issue 14 item 3: the ResNet-50 winograd engine (the default on the CPU) gives the descriptors of the exact
    fp32 network: MAC and R-MAC cosine >= 0.99999 on real photos (small sizes, one not a multiple of 32), with
    the strip workers (two threads) as in production; ``use_engine(bb, 'auto')`` picks it."""
    from instance_search import backbones
    from instance_search.images import load_image
    from instance_search.ops.pooling import mac, rmac

    try:
        bb = backbones.load_backbone("resnet50", progress=False)
    except backbones.WeightsError as exc:
        pytest.skip(f"ResNet-50 weights unavailable: {exc}")
    photos = [load_image(ukbench / "ukbench00008.jpg", max_size=320),
              load_image(sorted(paris.glob("*.jpg"))[5]).crop((40, 30, 40 + 301, 30 + 227))]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast.use_engine(bb, "auto")
        assert fast.engine_of(bb) == "winograd" and bb.trunk.winograd
        for img in photos:
            fast.use_engine(bb, "exact")
            ref = bb.features(img, ["res5", "res3"])
            fast.use_engine(bb, "auto")
            out = bb.features(img, ["res5", "res3"])
            for key, r in ref.items():
                assert out[key].shape == r.shape, key
                assert _rel(out[key], r) < 1e-4, key
            a, r = out[("res5", 1.0)], ref[("res5", 1.0)]
            for pool in (mac, rmac):
                assert float(F.cosine_similarity(pool(a).double(), pool(r).double(), dim=0)) >= 0.99999, pool
    finally:
        torch.set_num_threads(threads)
        fast.use_engine(bb, "exact")
