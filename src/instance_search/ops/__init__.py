"""Pure tensor/array operations: normalisations and pooling of convolutional feature maps.

Other modules of this package (``aggregation``, ``embeddings``, ``masks``) are imported directly by
their users, e.g. ``from instance_search.ops.aggregation import democratic``.
"""
from __future__ import annotations

from .normalize import l2n, power_law
from .pooling import gem, mac, region_macs, rmac, rmac_regions, spoc

__all__ = ["l2n", "power_law", "mac", "spoc", "gem", "rmac_regions", "region_macs", "rmac"]
