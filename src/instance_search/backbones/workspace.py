"""Named flat tensors reused across layers, strips and calls by the CPU engines (grown on demand).

Shared by :mod:`instance_search.backbones.fast` (Winograd VGG16, folded ResNet-50) and
:mod:`instance_search.backbones.fast_lite` (folded EfficientNet-Lite0); a module of its own so that both engine
modules import it without importing each other. A fresh multi-megabyte tensor per layer costs more in page
faults than the work that fills it, hence the reuse.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["Workspace"]


class Workspace:
    """Flat tensors of one ``dtype`` by name; :meth:`get` returns a view of at least the asked shape."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        numel = math.prod(int(s) for s in shape)
        buf = self._flat.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtype)
            self._flat[name] = buf
        return buf[:numel].view(*shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())

    def clear(self) -> None:
        self._flat.clear()
