"""Faster R-CNN features for instance search (Salvador, Giró-i-Nieto, Marqués & Satoh 2016): image-wise pooling
(IPA) of the last conv layer, and region-wise pooling (RPA) over a region proposal network's boxes."""
from __future__ import annotations

import numpy as np

from ..ops.normalize import l2n
from ..ops.pooling import mac, spoc
from .base import Features, Method, RecipeError, as_tensor, only_map, register


@register
class IPA(Method):
    """IPA (Salvador et al. 2016, Sec. 3.1): sum pooling (then L2, whitening, L2) or max pooling (MAC, meant
    without whitening) of the whole conv map."""

    name = "ipa"
    paper = "Salvador et al. 2016, Sec. 3.1"
    options = {"pooling": "sum"}

    def validate(self) -> None:
        if self.option("pooling") not in ("sum", "max"):
            raise RecipeError(f"recipe 'ipa': pooling must be 'sum' or 'max', got {self.option('pooling')!r}")

    def local(self, feats: Features) -> np.ndarray:
        fmap = as_tensor(only_map(feats, self.spec.layer))
        vec = spoc(fmap) if self.option("pooling") == "sum" else mac(fmap)
        return l2n(vec[None].detach().cpu().numpy().astype(np.float32))


@register
class RPA(Method):
    """RPA (Salvador et al. 2016, Sec. 3.1): the MACs of the top ``proposals`` boxes of a trained region proposal
    network, aggregated like R-MAC's regions (Gordo et al. 2016, Sec. 3.2)."""

    name = "rpa"
    paper = "Salvador et al. 2016, Sec. 3.1; Gordo et al. 2016, Sec. 3.2"
    options = {"rpn": None, "sha256": "", "proposals": 256}
    model_files = ("rpn",)

    def validate(self) -> None:
        if not self.spec.extra.get("rpn"):
            raise RecipeError("recipe 'rpa' needs a trained region proposal network (--rpn FILE)")
        if int(self.option("proposals")) < 1:
            raise RecipeError(f"recipe 'rpa': proposals must be >= 1, got {self.option('proposals')!r}")

    def local(self, feats: Features) -> np.ndarray:
        from ..nets.rpn import rpa_local_vectors

        return l2n(rpa_local_vectors(self.spec.extra, as_tensor(only_map(feats, self.spec.layer))))
