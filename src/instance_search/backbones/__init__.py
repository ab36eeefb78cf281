"""Pretrained conv backbones (VGG16, ResNet-50, EfficientNet-Lite0) with real ImageNet weights, and GoogLeNet
with weights the user supplies (no registry package carries them).

``load_backbone(name, weights=None, device='cpu') -> Backbone``; weights are fetched, converted and verified by
:mod:`instance_search.backbones.weights` (``fetch_weights``, ``list_weights``, ``cache_dir``).
"""
from __future__ import annotations

from .base import BACKBONES, Backbone, load_backbone
from .weights import (CAFFE, INCEPTION, TORCHVISION, Preprocessing, WeightsError, WeightsFile, cache_dir,
                      fetch_weights, list_weights)

__all__ = [
    "BACKBONES",
    "Backbone",
    "CAFFE",
    "INCEPTION",
    "Preprocessing",
    "TORCHVISION",
    "WeightsError",
    "WeightsFile",
    "cache_dir",
    "fetch_weights",
    "list_weights",
    "load_backbone",
]
