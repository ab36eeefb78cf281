"""VGG16 (Simonyan & Zisserman 2015) convolutional trunk in plain torch: conv1_1 .. conv5_3 and pool5.

The trunk is one ``nn.Sequential`` named ``features`` whose children are named ``conv1_1, relu1_1, conv1_2,
relu1_2, pool1, ..., conv5_3, relu5_3, pool5`` -- 3x3/stride 1/padding 1 convolutions, ReLUs and 2x2/stride 2
max-pools -- so that other engines (e.g. :class:`instance_search.backbones.fast.WinogradVGGTrunk`) can be built
from ``features.named_children()``.

Taps: a conv's name gives its output *after* its ReLU (the usual meaning of "conv5_3" in the retrieval
literature); ``relu*`` names give the same tensors; ``pool1`` .. ``pool5`` the pooled maps. No classifier.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["VGG16", "VGG16_CONVS", "VGG16_LAYERS", "VGG16_CHANNELS", "VGG16_STRIDES", "VGG16_RECEPTIVE_FIELD"]

#: (name, in channels, out channels); a 2x2 max-pool follows the last conv of each block.
VGG16_CONVS: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)
_LAST_OF_BLOCK = {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}

VGG16_LAYERS: tuple[str, ...] = tuple(n for n, _, _ in VGG16_CONVS) + ("pool5",)


def _tables() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    channels, strides, rf = {}, {}, {}
    stride, field = 1, 1
    for name, _, cout in VGG16_CONVS:
        field += 2 * stride
        channels[name] = channels["relu" + name[4:]] = cout
        strides[name] = strides["relu" + name[4:]] = stride
        rf[name] = rf["relu" + name[4:]] = field
        if name in _LAST_OF_BLOCK:
            field += stride
            stride *= 2
            pool = "pool" + name[4]
            channels[pool], strides[pool], rf[pool] = cout, stride, field
    return channels, strides, rf


VGG16_CHANNELS, VGG16_STRIDES, VGG16_RECEPTIVE_FIELD = _tables()


class VGG16(nn.Module):
    """VGG16 conv trunk. ``forward(x, layers)``: preprocessed (B, 3, H, W) -> ``{layer: (B, C, h, w)}``.

    Runs only as far as the deepest requested layer (default ``conv5_3``).
    """

    layer_names = VGG16_LAYERS

    def __init__(self) -> None:
        super().__init__()
        mods: "OrderedDict[str, nn.Module]" = OrderedDict()
        for name, cin, cout in VGG16_CONVS:
            mods[name] = nn.Conv2d(cin, cout, 3, padding=1)
            mods["relu" + name[4:]] = nn.ReLU(inplace=True)
            if name in _LAST_OF_BLOCK:
                mods["pool" + name[4]] = nn.MaxPool2d(2, 2)
        self.features = nn.Sequential(mods)
        self._order = list(mods)

    def _position(self, name: str) -> int:
        """Index of the child whose output is the tap ``name`` (a conv tap is read after its ReLU)."""
        if name.startswith("conv") and name in self._order:
            name = "relu" + name[4:]
        try:
            return self._order.index(name)
        except ValueError:
            raise KeyError(f"vgg16 has no layer {name!r}; known: {', '.join(VGG16_LAYERS)}") from None

    def forward(self, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers) if layers is not None else ["conv5_3"]
        want: dict[int, list[str]] = {}
        for name in layers:
            want.setdefault(self._position(name), []).append(name)
        deepest = max(want)
        out: dict[str, torch.Tensor] = {}
        for i, mod in enumerate(self.features):
            x = mod(x)  # the in-place ReLUs only overwrite conv outputs, which are never returned
            if i in want:
                for name in want[i]:
                    out[name] = x
            if i == deepest:
                break
        return out
