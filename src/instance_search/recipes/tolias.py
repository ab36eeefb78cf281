"""MAC and R-MAC (Tolias, Sicre & Jégou 2016, "Particular object retrieval with integral max-pooling of CNN
activations"), with SPoC (Babenko & Lempitsky 2015) and GeM (Radenović et al. 2018) as extras.

Each recipe turns a conv map X (C, H, W) into local vectors (R, C), each L2-normalised, that the index stores;
the global vector is ``L2(sum_r L2(W(x_r)))`` (:meth:`Method.finalize`): R-MAC for the grid's regions (Sec. 4:
per-region L2 - PCA-whitening - L2, then sum and L2), MAC / SPoC / GeM followed by whitening and L2 for R = 1.

Multi-scale (issue 14; the multi-scale descriptors of Radenović et al. 2018, Sec. 5.2 and Gordo et al. 2017):
option ``scales`` (e.g. ``[1, 0.7071, 0.5]``; the backbone resizes the image, one forward pass per scale; 1
must be one of them: its map is the one kept for re-ranking) and ``scale_pool``:

* ``"sum"``: MAC / SPoC / GeM: ``L2(Σ_s L2(v_s))`` of the per-scale vectors, one local vector (the whitening
  then applies to the combined vector, as Radenović et al.); R-MAC: the regions of every scale together, so the
  global vector is ``L2(Σ_s Σ_r L2(W(L2 x_{s,r})))``;
* ``"gem"``: ``L2((mean_s L2(v_s)^p)^{1/p})``, p = ``scale_p`` (3), for the one-vector recipes (R-MAC's
  scales have different region counts: refused).
"""
from __future__ import annotations

import math

import numpy as np

from ..ops.normalize import l2n
from ..ops.pooling import gem, mac, region_macs, rmac_regions, spoc
from .base import Features, Method, Needs, RecipeError, as_tensor, only_map, register

SCALE_POOLS = ("sum", "gem")


def scale_map(feats: Features, layer: str | None, scale: float):
    """The map at ``scale`` (of ``layer`` when given, else the only layer at that scale)."""
    if scale == 1.0:
        hit = [k for k in feats.maps if k[1] == 1.0 and (not layer or k[0] == layer)]
        if len(hit) != 1:
            return only_map(feats, layer)
    hit = [k for k in feats.maps if k[1] == float(scale) and (not layer or k[0] == layer)]
    if len(hit) != 1:
        have = ", ".join(f"{k[0]}@{k[1]:g}" for k in feats.maps)
        raise RecipeError(f"need exactly one feature map at scale {scale:g}"
                          f"{f' of layer {layer!r}' if layer else ''} (have: {have})")
    return feats.maps[hit[0]]


class _SingleMap(Method):
    paper = "Tolias et al. 2016"
    options = {"scales": [1.0], "scale_pool": "sum", "scale_p": 3.0}
    one_vector = True  # one local vector per image (R-MAC: one per region)
    default_backbone = "resnet50"  # measured: more accurate on all three sets and faster than VGG16 (docs/results.md)

    def pool(self, fmap):
        raise NotImplementedError

    def scales(self) -> tuple[float, ...]:
        value = self.option("scales")
        try:
            out = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        except (TypeError, ValueError):
            raise RecipeError(f"{self.name}: scales must be numbers, got {value!r}") from None
        return out

    def validate(self) -> None:
        sc = self.scales()
        if not sc or any(not (v > 0 and math.isfinite(v)) for v in sc) or len(set(sc)) != len(sc):
            raise RecipeError(f"{self.name}: scales must be distinct positive numbers, got {list(sc)}")
        if 1.0 not in sc:
            raise RecipeError(f"{self.name}: scales must include 1 (its map is kept for re-ranking), got {list(sc)}")
        pool = self.option("scale_pool")
        if pool not in SCALE_POOLS:
            raise RecipeError(f"{self.name}: scale_pool must be one of {', '.join(SCALE_POOLS)}, got {pool!r}")
        p = self.option("scale_p")
        if not (isinstance(p, (int, float)) and p > 0 and math.isfinite(p)):
            raise RecipeError(f"{self.name}: scale_p must be a positive number, got {p!r}")
        if pool == "gem" and len(sc) > 1 and not self.one_vector:
            raise RecipeError(f"{self.name}: scale_pool 'gem' needs one vector per scale (mac, spoc, gem); "
                              f"use scale_pool 'sum' (the regions of every scale together)")

    def needs(self, default_layer: str) -> Needs:
        return Needs(layers=(self.spec.layer or default_layer,), scales=self.scales())

    def _one_scale(self, fmap) -> np.ndarray:
        return l2n(self.pool(as_tensor(fmap)).detach().cpu().numpy().astype(np.float32))

    def local(self, feats: Features) -> np.ndarray:
        sc = self.scales()
        if sc == (1.0,):
            return self._one_scale(only_map(feats, self.spec.layer))
        per = [self._one_scale(scale_map(feats, self.spec.layer, s)) for s in sc]
        if not self.one_vector:  # R-MAC: the regions of every scale
            return np.concatenate(per)
        V = np.concatenate(per).astype(np.float64)  # (S, D), each row L2-normalised
        if self.option("scale_pool") == "sum":
            v = V.sum(0)
        else:
            p = float(self.option("scale_p"))
            v = np.mean(np.maximum(V, 0.0) ** p, axis=0) ** (1.0 / p)
        return l2n(v[None]).astype(np.float32)


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
    one_vector = False

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
