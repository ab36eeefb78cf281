"""MAC and R-MAC (Tolias, Sicre & Jégou 2016, "Particular object retrieval with integral max-pooling of CNN
activations"), with SPoC (Babenko & Lempitsky 2015) and GeM (Radenović et al. 2018) as extras.

Each recipe turns a conv map X (C, H, W) into local vectors (R, C), each L2-normalised, that the index stores;
the global vector is ``L2(sum_r L2(W(x_r)))`` (:meth:`Method.finalize`): R-MAC for the grid's regions (Sec. 4:
per-region L2 - PCA-whitening - L2, then sum and L2), MAC / SPoC / GeM followed by whitening and L2 for R = 1.
"""
from __future__ import annotations

import numpy as np

from ..ops.normalize import l2n
from ..ops.pooling import gem, mac, region_macs, rmac_regions, spoc
from .base import Features, Method, as_tensor, only_map, register


class _SingleMap(Method):
    paper = "Tolias et al. 2016"

    def pool(self, fmap):
        raise NotImplementedError

    def local(self, feats: Features) -> np.ndarray:
        fmap = as_tensor(only_map(feats, self.spec.layer))
        return l2n(self.pool(fmap).detach().cpu().numpy().astype(np.float32))


@register
class MAC(_SingleMap):
    """MAC: max over all positions of each channel (Tolias et al. 2016, Eq. 1)."""

    name = "mac"
    paper = "Tolias et al. 2016, Sec. 3, Eq. 1"
    window_vector = "mac"

    def pool(self, fmap):
        return mac(fmap)[None]


@register
class RMAC(_SingleMap):
    """R-MAC: the MACs of the regions of an L-level square grid with ~40 % overlap (Tolias et al. 2016,
    Sec. 4); each region vector is L2-normalised, whitened and L2-normalised again before the sum."""

    name = "rmac"
    paper = "Tolias et al. 2016, Sec. 4"
    window_vector = "rmac"

    def pool(self, fmap):
        return region_macs(fmap, rmac_regions(fmap.shape[1], fmap.shape[2], levels=self.spec.levels))


@register
class SPoC(_SingleMap):
    """SPoC: sum pooling (Babenko & Lempitsky 2015)."""

    name = "spoc"
    paper = "Babenko & Lempitsky 2015"

    def pool(self, fmap):
        return spoc(fmap)[None]


@register
class GeM(_SingleMap):
    """GeM: generalised mean pooling, ``(mean x^p)^(1/p)`` with p = ``gem_p`` (Radenović et al. 2018, Eq. 2)."""

    name = "gem"
    paper = "Radenović et al. 2018, Eq. 2"

    def pool(self, fmap):
        return gem(fmap, p=self.spec.gem_p)[None]
