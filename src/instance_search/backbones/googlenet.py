"""GoogLeNet / Inception v1 (Szegedy et al. 2015, Table 1) in plain torch, laid out as torchvision's ``GoogLeNet``.

Ng, Yang & Davis 2015 (Sec. 3-4, Fig. 2) pool local features from every inception module of GoogLeNet. No
registry package carries GoogLeNet ImageNet weights; they come from torchvision's hub checkpoint or a file the
user supplies (see :mod:`instance_search.backbones.weights`), so the module and key names follow torchvision:

* ``BasicConv2d`` = conv (no bias) + BatchNorm (eps 1e-3) + ReLU, keys ``<name>.conv.weight``, ``<name>.bn.*``;
* stem ``conv1`` 7x7/2, ``maxpool1`` 3/2, ``conv2`` 1x1, ``conv3`` 3x3, ``maxpool2`` 3/2 (max-pools in
  ``ceil_mode``), then ``inception3a``, ``3b``, ``maxpool3`` 3/2, ``inception4a`` .. ``4e``, ``maxpool4`` 2/2,
  ``inception5a``, ``5b`` and ``fc`` (1024 -> 1000) after a global average pool; no auxiliary classifiers;
* an inception module concatenates ``branch1`` (1x1), ``branch2`` (1x1 -> 3x3), ``branch3`` (1x1 -> 3x3: the
  paper's 5x5 branch, which torchvision's port implements with a 3x3 kernel -- kept so its weights load) and
  ``branch4`` (3x3/1 max-pool -> 1x1);
* ``transform_input`` (torchvision's IMAGENET1K_V1 weights): the network takes torchvision-normalised RGB
  and first maps it back to ``2 * pixel/255 - 1``, the input range of the weights it was ported from.

Taps, named as in the Caffe model and the paper: ``inception_3a`` .. ``inception_5b`` (module outputs, i.e. the
Caffe ``inception_*/output`` blobs, post-ReLU; strides 8, 16, 32) and ``pool5`` (Caffe ``pool5/7x7_s1``: 7x7
average pool with stride 1 and no padding over ``inception_5b``; a 224-px input gives 1x1).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .taps import requested_taps

__all__ = ["GoogLeNet", "GOOGLENET_INCEPTIONS", "GOOGLENET_LAYERS", "GOOGLENET_CHANNELS", "GOOGLENET_STRIDES",
           "GOOGLENET_RECEPTIVE_FIELD", "GOOGLENET_PARAMS"]

#: (tap name, module name, in, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool proj) -- Szegedy et al. Table 1.
GOOGLENET_INCEPTIONS: tuple[tuple[str, str, int, int, int, int, int, int, int], ...] = (
    ("inception_3a", "inception3a", 192, 64, 96, 128, 16, 32, 32),
    ("inception_3b", "inception3b", 256, 128, 128, 192, 32, 96, 64),
    ("inception_4a", "inception4a", 480, 192, 96, 208, 16, 48, 64),
    ("inception_4b", "inception4b", 512, 160, 112, 224, 24, 64, 64),
    ("inception_4c", "inception4c", 512, 128, 128, 256, 24, 64, 64),
    ("inception_4d", "inception4d", 512, 112, 144, 288, 32, 64, 64),
    ("inception_4e", "inception4e", 528, 256, 160, 320, 32, 128, 128),
    ("inception_5a", "inception5a", 832, 256, 160, 320, 32, 128, 128),
    ("inception_5b", "inception5b", 832, 384, 192, 384, 48, 128, 128),
)
#: max-pool (kernel, stride) applied before the inception module of that name
_POOL_BEFORE = {"inception3a": ("maxpool2", 3, 2), "inception4a": ("maxpool3", 3, 2), "inception5a": ("maxpool4", 2, 2)}
GOOGLENET_LAYERS: tuple[str, ...] = tuple(t[0] for t in GOOGLENET_INCEPTIONS) + ("pool5",)
#: parameters of the classifier-bearing net (torchvision's documented num_params for IMAGENET1K_V1)
GOOGLENET_PARAMS = 6_624_904
_POOL5 = 7  # Caffe pool5/7x7_s1
_TV_MEAN = (0.485, 0.456, 0.406)
_TV_STD = (0.229, 0.224, 0.225)


def _tables() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Channels, total strides and theoretical receptive fields of the taps (largest branch per module)."""
    channels, strides, rf = {}, {}, {}
    field, stride = 7, 2  # conv1 7x7/2
    for k, s in ((3, 2), (1, 1), (3, 1), (3, 2)):  # maxpool1, conv2, conv3, maxpool2 (its field only)
        field += (k - 1) * stride
        stride *= s
    for tap, mod, _, c1, _, c3, _, c5, cp in GOOGLENET_INCEPTIONS:
        if mod in _POOL_BEFORE and mod != "inception3a":  # maxpool2 is already counted above
            _, k, s = _POOL_BEFORE[mod]
            field += (k - 1) * stride
            stride *= s
        field += 2 * stride  # the 3x3 branches (and the 3x3 max-pool branch) grow the field by one cell per side
        channels[tap], strides[tap], rf[tap] = c1 + c3 + c5 + cp, stride, field
    channels["pool5"], strides["pool5"], rf["pool5"] = channels["inception_5b"], stride, field + (_POOL5 - 1) * stride
    return channels, strides, rf


GOOGLENET_CHANNELS, GOOGLENET_STRIDES, GOOGLENET_RECEPTIVE_FIELD = _tables()


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """One inception module (Szegedy et al. 2015, Fig. 2b): four branches concatenated along channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), BasicConv2d(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class GoogLeNet(nn.Module):
    """GoogLeNet trunk + ImageNet classifier with torchvision's state-dict keys (aux classifiers absent).

    ``forward(x, layers)``: a preprocessed (B, 3, H, W) batch -> ``{tap: (B, C, h, w)}`` (default
    ``inception_5b``), stopping after the deepest requested tap. ``logits(x)``: (B, 1000) ImageNet logits
    (global average pool of ``inception_5b``, then ``fc``; dropout is the identity at inference).
    """

    layer_names = GOOGLENET_LAYERS

    def __init__(self, transform_input: bool = True, num_classes: int = 1000):
        super().__init__()
        self.transform_input = bool(transform_input)
        self.conv1 = BasicConv2d(3, 64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3, padding=1)
        for _, mod, *cfg in GOOGLENET_INCEPTIONS:
            if mod in _POOL_BEFORE:
                pool, k, s = _POOL_BEFORE[mod]
                self.add_module(pool, nn.MaxPool2d(k, stride=s, ceil_mode=True))
            self.add_module(mod, Inception(*cfg))
        self.fc = nn.Linear(1024, num_classes)

    def extra_repr(self) -> str:
        return f"transform_input={self.transform_input}"

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision-normalised RGB -> ``2 * pixel/255 - 1`` (undo mean/std, then map 0..1 to -1..1)."""
        if not self.transform_input:
            return x
        scale = torch.tensor([s / 0.5 for s in _TV_STD], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        shift = torch.tensor([(m - 0.5) / 0.5 for m in _TV_MEAN], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x * scale + shift

    def forward(self, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        layers, deepest = requested_taps("googlenet", layers, GOOGLENET_LAYERS, "inception_5b")
        x = self._transform(x)
        x = self.conv3(self.conv2(self.maxpool1(self.conv1(x))))
        out: dict[str, torch.Tensor] = {}
        for i, (tap, mod, *_) in enumerate(GOOGLENET_INCEPTIONS):
            if mod in _POOL_BEFORE:
                x = getattr(self, _POOL_BEFORE[mod][0])(x)
            x = getattr(self, mod)(x)
            if tap in layers:
                out[tap] = x
            if i == deepest:
                return out
        if min(x.shape[-2:]) < _POOL5:
            raise ValueError(f"googlenet: pool5 (7x7 average pool) needs an inception_5b map of at least 7x7 "
                             f"cells, got {tuple(x.shape[-2:])}: give an input of at least ~200 px per side")
        out["pool5"] = F.avg_pool2d(x, _POOL5, stride=1)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x5 = self.forward(x, ["inception_5b"])["inception_5b"]
        return self.fc(x5.mean(dim=(2, 3)))
