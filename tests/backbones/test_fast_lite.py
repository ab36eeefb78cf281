"""The ``folded`` EfficientNet-Lite0 engine (instance_search.backbones.fast_lite) against the unfolded network."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from instance_search.backbones import fast
from instance_search.backbones.efficientnet_lite import LITE0_LAYERS, EfficientNetLite0
from instance_search.backbones.fast_lite import FoldedLite0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _random_lite0(padding: str = "same") -> EfficientNetLite0:
    """A Lite0 with a fixed random init and non-trivial BatchNorm statistics and affine parameters (so that folding
    them matters), scaled so the activations neither vanish nor all saturate at 6."""
    torch.manual_seed(0)
    net = EfficientNetLite0(padding=padding)
    g = torch.Generator().manual_seed(1)
    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):
            fan_in = mod.weight[0].numel()
            mod.weight.data.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def lite0():
    """The pretrained backbone when its weights are at hand (cache or registry), else a random-init network wrapped
    the same way (the equality of the engine with the network does not depend on the weights)."""
    from instance_search import backbones

    try:
        return backbones.load_backbone("efficientnet-lite0", progress=False)
    except backbones.WeightsError:
        wf = backbones.WeightsFile(arch="efficientnet-lite0", path=Path("random-init"), sha256="", source="random",
                                   preprocessing=backbones.INCEPTION, config={"padding": "same", "bn_eps": 1e-3})
        return backbones.Backbone("efficientnet-lite0", _random_lite0(), wf)


def _photo(ukbench, size):
    from instance_search.images import load_image

    h, w = size
    return load_image(ukbench / "ukbench00004.jpg").resize((w, h))


@pytest.mark.parametrize("padding", ["same", "symmetric"])
@pytest.mark.parametrize("shape", [(1, 3, 241, 317), (2, 3, 64, 96), (1, 3, 33, 32)])
def test_folded_lite0_equals_unfolded_random_weights(padding, shape):
    """Every tap of the fp32 engine equals the float64 network (random weights, non-trivial BatchNorm), at odd and
    even sizes (TF "SAME" padding asymmetric at stride 2 on even sides) and with a batch of two; the float64
    engine equals it to rounding (the folding itself is exact)."""
    net = _random_lite0(padding)
    net64 = copy.deepcopy(net).double()
    eng, eng64 = FoldedLite0(net), FoldedLite0(net, dtype=torch.float64)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net64(x.double(), list(LITE0_LAYERS))
        exact = net(x, list(LITE0_LAYERS))
    out = eng(x, list(reversed(LITE0_LAYERS)))
    out64 = eng64(x, list(LITE0_LAYERS))
    assert set(out) == set(LITE0_LAYERS)
    for k, r in ref.items():
        assert out[k].shape == r.shape and out[k].dtype == torch.float32, k
        assert out[k].is_contiguous(), k
        assert r.abs().max() > 0.1 and (r > 0).float().mean() > 0.05, k  # the taps are not degenerate
        # as close to the float64 truth as the fp32 network itself (both ~1e-6 .. 2e-5 with these weights)
        assert _rel(out[k], r) < 1e-4 and _rel(out[k], r) < 5 * max(_rel(exact[k], r), 1e-6), (k, _rel(out[k], r))
        assert _rel(out64[k], r) < 1e-12, (k, _rel(out64[k], r))
    # a shallow tap stops there; the default is head; a second size reuses the buffers correctly
    assert set(eng(x, "stage3")) == {"stage3"}
    assert _rel(eng(x)["head"], ref["head"]) < 1e-4
    assert eng.workspace_bytes() > 0
    eng.release()
    assert eng.workspace_bytes() == 0
    with pytest.raises(KeyError, match="efficientnet-lite0"):
        eng(x, "res5")


@pytest.mark.parametrize("size", [(241, 317), (384, 512)])
def test_folded_lite0_matches_float64_on_real_photos(lite0, ukbench, size):
    """The engine, through ``Backbone.features``, gives the float64 network's head map and MAC vector on a real
    photo (the pretrained weights when cached), and every tap agrees."""
    from instance_search.ops.pooling import mac

    img = _photo(ukbench, size)
    net64 = copy.deepcopy(lite0.net).double().eval()
    x = lite0.preprocess(img)[None]
    with torch.no_grad():
        ref = net64(x.double(), list(LITE0_LAYERS))
    try:
        fast.use_engine(lite0, "folded")
        assert isinstance(lite0.trunk, FoldedLite0) and fast.engine_of(lite0) == "folded"
        out = lite0.features(img, list(LITE0_LAYERS))
        assert not out[("head", 1.0)].is_inference()  # ordinary tensors, as from the exact network
        fast.use_engine(lite0, "exact")
        exact = lite0.features(img, list(LITE0_LAYERS))
    finally:
        fast.use_engine(lite0, "exact")
    for k in LITE0_LAYERS:
        a, r = out[(k, 1.0)], ref[k][0]
        assert a.shape == r.shape, k
        # as close to float64 as the fp32 network (pretrained weights: ~1e-6 both; random ones: up to ~2e-5)
        err, err_exact = _rel(a, r), _rel(exact[(k, 1.0)], r)
        assert err < 1e-4 and err < 5 * max(err_exact, 1e-6), (k, err, err_exact)
    a, r = out[("head", 1.0)], ref["head"][0]
    # max abs error small against the map's scale (6, ReLU6): measured 2e-5 with the pretrained weights; with random
    # ones the fp32 network itself is off by ~7e-4, and the engine by as much
    worst, worst_exact = float((a.double() - r).abs().max()), float((exact[("head", 1.0)].double() - r).abs().max())
    assert worst <= max(1e-4 * float(r.abs().max()), 3 * worst_exact), (worst, worst_exact)
    cos = float(F.cosine_similarity(mac(a).double(), mac(r.float()).double(), dim=0))
    assert cos >= 0.99999, cos


def test_engine_plumbing_for_lite0(lite0):
    """``auto`` is ``folded`` for EfficientNet-Lite0 on the CPU (exact on a GPU); ``winograd`` is refused naming the
    backbone; ``use_engine`` / ``engine_of`` round trip and keep one engine per backbone."""
    r = fast.resolve_engine
    assert r("efficientnet-lite0") == "folded" and r("efficientnet-lite0", "cpu", "folded") == "folded"
    assert r("efficientnet-lite0", "cuda") == "exact" and r("efficientnet-lite0", "cpu", "exact") == "exact"
    with pytest.raises(fast.EngineError, match="efficientnet-lite0"):
        r("efficientnet-lite0", "cpu", "winograd")
    with pytest.raises(fast.EngineError, match="CPU only"):
        r("efficientnet-lite0", "cuda", "folded")
    with pytest.raises(fast.EngineError, match="googlenet"):
        r("googlenet", "cpu", "folded")
    try:
        assert fast.engine_of(lite0) == "exact" and lite0.trunk is lite0.net
        fast.use_engine(lite0, "auto")
        assert fast.engine_of(lite0) == "folded"
        first = lite0.trunk
        fast.use_engine(lite0, "exact")
        assert fast.engine_of(lite0) == "exact" and lite0.trunk is lite0.net
        fast.use_engine(lite0, "folded")
        assert lite0.trunk is first  # built once, kept on the backbone
        with pytest.raises(fast.EngineError, match="efficientnet-lite0"):
            fast.use_engine(lite0, "winograd")
        assert "trunk" not in "".join(lite0.state_dict())  # the engine stays out of the module tree
    finally:
        fast.use_engine(lite0, "exact")
    assert fast.engine_of(lite0) == "exact"
