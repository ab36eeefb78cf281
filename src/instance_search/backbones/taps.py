"""Which feature taps a forward pass must return (shared by the plain-torch networks)."""
from __future__ import annotations

from typing import Sequence


def requested_taps(arch: str, layers: Sequence[str] | str | None, known: Sequence[str],
                   default: str) -> tuple[list[str], int]:
    """``(layers as a list, index in known of the deepest)``; ``None`` means ``[default]``. An unknown name raises
    ``KeyError`` naming the architecture and the known taps."""
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers) if layers is not None else [default]
    for name in layers:
        if name not in known:
            raise KeyError(f"{arch} has no layer {name!r}; known: {', '.join(known)}")
    return layers, max(list(known).index(n) for n in layers)
