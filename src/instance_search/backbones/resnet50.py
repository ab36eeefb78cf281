"""ResNet-50 (He et al. 2016) in plain torch, in its two published variants.

* ``variant='caffe'`` -- the original MSRA release (Caffe), also what Keras' ``ResNet50`` ships: every conv
  has a bias, BatchNorm eps is 1e-3 (Keras), and a down-sampling bottleneck puts its stride 2 in the *first*
  1x1 conv (``conv1``) and in the 1x1 projection shortcut.
* ``variant='pytorch'`` -- torchvision's ResNet-50 ("v1.5"): no conv biases, BatchNorm eps 1e-5, stride 2 in
  the 3x3 conv (``conv2``) of the down-sampling bottleneck.

Module names follow the usual torch convention (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, each bottleneck
``conv1..3``/``bn1..3``/``downsample.0,1``; ``fc``), so a torchvision state dict loads as it is.

Taps: ``conv1`` (after the stem conv + BN + ReLU, stride 2, 64 channels), ``res2`` .. ``res5`` (output of each
stage, after the last block's ReLU; strides 4, 8, 16, 32; 256, 512, 1024, 2048 channels).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .taps import requested_taps

__all__ = ["ResNet50", "RESNET50_LAYERS", "RESNET50_CHANNELS", "RESNET50_STRIDES", "VARIANTS"]

VARIANTS = ("caffe", "pytorch")
RESNET50_LAYERS: tuple[str, ...] = ("conv1", "res2", "res3", "res4", "res5")
RESNET50_CHANNELS = {"conv1": 64, "res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
RESNET50_STRIDES = {"conv1": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}
_BLOCKS = (3, 4, 6, 3)
_WIDTHS = (64, 128, 256, 512)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, variant: str, eps: float, bias: bool):
        super().__init__()
        cout = width * 4
        s1, s2 = (stride, 1) if variant == "caffe" else (1, stride)
        self.conv1 = nn.Conv2d(cin, width, 1, stride=s1, bias=bias)
        self.bn1 = nn.BatchNorm2d(width, eps=eps)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s2, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(width, eps=eps)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias),
                                            nn.BatchNorm2d(cout, eps=eps))
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class ResNet50(nn.Module):
    """ResNet-50 trunk + ImageNet classifier.

    ``forward(x, layers)`` maps a preprocessed (B, 3, H, W) batch to ``{layer: (B, C, h, w)}`` for the
    requested taps (default ``res5``), stopping after the deepest one. ``logits(x)`` gives the (B, 1000)
    ImageNet logits (global average pool of ``res5`` then ``fc``).
    """

    layer_names = RESNET50_LAYERS

    def __init__(self, variant: str = "caffe", num_classes: int = 1000):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ResNet-50 variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        caffe = variant == "caffe"
        eps = 1e-3 if caffe else 1e-5
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=caffe)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        cin = 64
        for i, (n, width) in enumerate(zip(_BLOCKS, _WIDTHS)):
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(_Bottleneck(cin, width, stride, variant, eps, caffe))
                cin = width * 4
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        layers, deepest = requested_taps("resnet50", layers, RESNET50_LAYERS, "res5")
        out: dict[str, torch.Tensor] = {}
        x = F.relu(self.bn1(self.conv1(x)))
        if "conv1" in layers:
            out["conv1"] = x
        if deepest == 0:
            return out
        # Keras pads with zeros before its 3x3/2 max-pool; after the ReLU that equals torch's implicit padding.
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            name = RESNET50_LAYERS[i + 1]
            if name in layers:
                out[name] = x
            if i + 1 == deepest:
                break
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        r5 = self.forward(x, ["res5"])["res5"]
        return self.fc(r5.mean(dim=(2, 3)))
