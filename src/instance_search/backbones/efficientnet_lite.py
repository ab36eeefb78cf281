"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant for mobile CPUs) in plain torch.

Lite differs from EfficientNet-B0 by: ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32
channels) and head (1280 channels) that are not scaled. The network is a stem conv (stride 2), seven stages
of MBConv blocks and a 1x1 head conv:

======  ======  ======  ========  =======  =========  ========
stage   blocks  kernel  stride    expand   channels   total stride
======  ======  ======  ========  =======  =========  ========
stage1  1       3       1         1        16         2
stage2  2       3       2         6        24         4
stage3  2       5       2         6        40         8
stage4  3       3       2         6        80         16
stage5  3       5       1         6        112        16
stage6  4       5       2         6        192        32
stage7  1       3       1         6        320        32
head    -       1       1         -        1280       32
======  ======  ======  ========  =======  =========  ========

``padding='same'`` reproduces TensorFlow's "SAME" padding (the image is padded so that the output has
``ceil(size / stride)`` pixels, with the extra pixel at the bottom/right), which is what weights converted
from TensorFlow checkpoints need; ``padding='symmetric'`` pads ``k // 2`` on every side (PyTorch style).

Module key names (``stem_conv``, ``stages.S.B.expand_conv``, ``head_bn``, ``fc`` ...) are this library's own;
:mod:`instance_search.backbones.weights` converts the published checkpoints to them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .taps import requested_taps

__all__ = ["EfficientNetLite0", "LITE0_STAGES", "LITE0_LAYERS", "LITE0_CHANNELS", "LITE0_STRIDES", "tf_same_padding"]

#: (blocks, kernel, stride, expand ratio, output channels) per stage.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

LITE0_LAYERS: tuple[str, ...] = tuple(f"stage{i + 1}" for i in range(len(LITE0_STAGES))) + ("head",)


def _strides_and_channels() -> tuple[dict[str, int], dict[str, int]]:
    strides, channels = {}, {}
    total = 2  # stem
    for i, (_, _, s, _, c) in enumerate(LITE0_STAGES):
        total *= s
        strides[f"stage{i + 1}"] = total
        channels[f"stage{i + 1}"] = c
    strides["head"] = total
    channels["head"] = HEAD_CHANNELS
    return strides, channels


LITE0_STRIDES, LITE0_CHANNELS = _strides_and_channels()


def tf_same_padding(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one side of length ``size`` for a ``k``-wide kernel with stride ``s``:
    ``(before, after)``, so that the output has ``ceil(size / s)`` pixels, the extra pixel (if any) after."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class _Conv(nn.Conv2d):
    """A bias-free conv with either TensorFlow "SAME" padding or symmetric ``k // 2`` padding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, padding: str = "same"):
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        tf_same = padding == "same"
        super().__init__(cin, cout, k, stride=stride, padding=0 if tf_same else k // 2, groups=groups, bias=False)
        self.tf_same = tf_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = tf_same_padding(x.shape[-2], k, s)
            left, right = tf_same_padding(x.shape[-1], k, s)
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN (+ identity)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, padding: str, eps: float):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.expand_conv = _Conv(cin, mid, 1, padding=padding)
            self.expand_bn = nn.BatchNorm2d(mid, eps=eps)
        self.dw_conv = _Conv(mid, mid, k, stride=stride, groups=mid, padding=padding)
        self.dw_bn = nn.BatchNorm2d(mid, eps=eps)
        self.project_conv = _Conv(mid, cout, 1, padding=padding)
        self.project_bn = nn.BatchNorm2d(cout, eps=eps)
        self.has_expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self.expand_bn(self.expand_conv(y)))
        y = F.relu6(self.dw_bn(self.dw_conv(y)))
        y = self.project_bn(self.project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk (+ the 1000-way ImageNet classifier ``fc``).

    ``forward(x, layers)`` maps a preprocessed (B, 3, H, W) batch to ``{layer: (B, C, h, w)}`` for the
    requested taps (``stage1`` .. ``stage7``, ``head``; default ``head``) and stops after the deepest one.
    """

    layer_names = LITE0_LAYERS

    def __init__(self, padding: str = "same", bn_eps: float = 1e-3, num_classes: int = 1000):
        super().__init__()
        self.padding = padding
        self.stem_conv = _Conv(3, STEM_CHANNELS, 3, stride=2, padding=padding)
        self.stem_bn = nn.BatchNorm2d(STEM_CHANNELS, eps=bn_eps)
        stages = []
        cin = STEM_CHANNELS
        for n, k, s, e, c in LITE0_STAGES:
            blocks = []
            for j in range(n):
                blocks.append(_MBConv(cin, c, k, s if j == 0 else 1, e, padding, bn_eps))
                cin = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head_conv = _Conv(cin, HEAD_CHANNELS, 1, padding=padding)
        self.head_bn = nn.BatchNorm2d(HEAD_CHANNELS, eps=bn_eps)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        layers, deepest = requested_taps("efficientnet-lite0", layers, LITE0_LAYERS, "head")
        out: dict[str, torch.Tensor] = {}
        x = F.relu6(self.stem_bn(self.stem_conv(x)))
        for i, stage in enumerate(self.stages):
            x = stage(x)
            name = LITE0_LAYERS[i]
            if name in layers:
                out[name] = x
            if i == deepest:
                return out
        x = F.relu6(self.head_bn(self.head_conv(x)))
        out["head"] = x
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) of a preprocessed batch: head -> global average pool -> fc."""
        h = self.forward(x, ["head"])["head"]
        return self.fc(h.mean(dim=(2, 3)))
