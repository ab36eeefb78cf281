"""Named descriptor pipelines: a backbone layer, a pooling and a whitening, as in the papers.

Every recipe turns a conv feature map X (C, H, W) into a small set of *local* vectors (R, C), each
L2-normalised, that are stored in the index; the global vector is then

    v = L2( sum_r L2( W(x_r) ) )          (W = PCA-whitening, identity when absent)

which is exactly R-MAC (Tolias et al. 2016, Sec. 4) for R-MAC's regions, and MAC / SPoC / GeM followed by
whitening and L2 (Tolias Sec. 3; Babenko & Lempitsky 2015; Radenović et al. 2018) for R = 1. Keeping the
pre-whitening local vectors lets a whitening be learned or replaced without running the network again.

=========  =================================================================  ==============
recipe     local vectors                                                      paper
=========  =================================================================  ==============
``mac``    max over all positions                                             Tolias 2016 Eq. 1
``rmac``   max over each region of the L-level grid (L=3, ~40 % overlap)      Tolias 2016 Sec. 4
``spoc``   sum over all positions                                             Babenko 2015
``gem``    generalised mean, p = 3                                            Radenović 2018
=========  =================================================================  ==============

``learned-rmac`` (Gordo et al. 2016, Sec. 3.1) describes images with a network trained by ``isearch train-rmac``
(:mod:`instance_search.nets.rmac_head`): its local vectors are the learned region vectors ``L2(W(L2(f_R) + s))``
of the trained conv5 maps, so the global vector is the learned R-MAC; it needs no further whitening.

``ipa`` / ``rpa`` (Salvador et al. 2016, "Faster R-CNN features for instance search", Sec. 3.1): image-wise
pooling of the last conv layer (``extra["pooling"]``: ``"sum"`` -> L2, whitening, L2; ``"max"`` -> MAC, meant
without whitening) and region-wise pooling: the MACs of the top ``extra["proposals"]`` boxes of a trained region
proposal network (``extra["rpn"]``, :mod:`instance_search.nets.rpn`), aggregated like R-MAC's regions -- R-MAC
pooled over the proposals instead of the grid (Gordo et al. 2016, Sec. 3.2).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..ops.normalize import l2n
from ..ops.pooling import gem, mac, region_macs, rmac_regions, spoc

RECIPES = ("mac", "rmac", "spoc", "gem", "learned-rmac", "ipa", "rpa")
BACKBONES = ("vgg16", "resnet50", "efficientnet-lite0", "googlenet")  # googlenet: user-supplied weights


@dataclass
class Recipe:
    """A descriptor pipeline; serialised into the index so that queries are described the same way."""

    name: str = "rmac"
    backbone: str = "vgg16"
    layer: str | None = None  # None: the backbone's default (VGG16 conv5_3, ResNet-50 res5)
    levels: int = 3
    gem_p: float = 3.0
    max_size: int = 1024
    whitening_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}; choose one of {', '.join(RECIPES)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.levels < 1:
            raise ValueError("R-MAC needs at least one level")
        if self.max_size is not None and self.max_size < 32:
            raise ValueError(f"max_size {self.max_size} is too small (need >= 32 pixels)")
        if self.name == "learned-rmac":  # Gordo et al. 2016: the trained model travels in ``extra``
            if not self.extra.get("model"):
                raise ValueError("recipe 'learned-rmac' needs a trained model (--model FILE from `isearch train-rmac`)")
            if self.backbone != "vgg16":
                raise ValueError(f"recipe 'learned-rmac' is trained on vgg16, not {self.backbone!r}")
        # --- ipa / rpa (Salvador et al. 2016, Sec. 3.1) ---
        if self.name == "ipa" and self.extra.get("pooling", "sum") not in ("sum", "max"):
            raise ValueError(f"recipe 'ipa': pooling must be 'sum' or 'max', got {self.extra.get('pooling')!r}")
        if self.name == "rpa":
            if not self.extra.get("rpn"):
                raise ValueError("recipe 'rpa' needs a trained region proposal network (extra['rpn'], see "
                                 "instance_search.nets.rpn.rpa_recipe)")
            if int(self.extra.get("proposals", 256)) < 1:
                raise ValueError(f"recipe 'rpa': proposals must be >= 1, got {self.extra.get('proposals')!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    # ------------------------------------------------------------------ maths
    def local_from_map(self, fmap: torch.Tensor) -> np.ndarray:
        """Pre-whitening local vectors (R, C), each L2-normalised, of one feature map (C, H, W)."""
        if fmap.ndim != 3:
            raise ValueError(f"expected a (C, H, W) feature map, got shape {tuple(fmap.shape)}")
        fmap = fmap.float()
        if self.name == "learned-rmac":  # already projected and L2-normalised by the trained head
            from ..nets.rmac_head import recipe_region_vectors

            return recipe_region_vectors(self.extra, fmap)
        if self.name == "ipa":  # Salvador et al. 2016, Sec. 3.1: image-wise pooling (sum or max)
            vecs = (spoc(fmap) if self.extra.get("pooling", "sum") == "sum" else mac(fmap))[None]
            return l2n(vecs.detach().cpu().numpy().astype(np.float32))
        if self.name == "rpa":  # Salvador et al. 2016, Sec. 3.1 / Gordo et al. 2016, Sec. 3.2: RPN regions
            from ..nets.rpn import rpa_local_vectors

            return l2n(rpa_local_vectors(self.extra, fmap))
        if self.name == "rmac":
            regions = rmac_regions(fmap.shape[1], fmap.shape[2], levels=self.levels)
            vecs = region_macs(fmap, regions)
        elif self.name == "mac":
            vecs = mac(fmap)[None]
        elif self.name == "spoc":
            vecs = spoc(fmap)[None]
        else:
            vecs = gem(fmap, p=self.gem_p)[None]
        return l2n(vecs.detach().cpu().numpy().astype(np.float32))

    def finalize(self, local: list[np.ndarray] | np.ndarray, whitening=None) -> np.ndarray:
        """Global vectors from local ones: ``L2(sum_r L2(W(x_r)))``; a list gives an (N, D) array."""
        single = isinstance(local, np.ndarray)
        items = [local] if single else list(local)
        if not items:
            dim = whitening.dim if whitening is not None else 0
            return np.zeros((0, dim), np.float32)
        counts = np.asarray([len(x) for x in items])
        rows = np.concatenate([np.asarray(x, np.float32) for x in items])
        if whitening is not None:
            rows = whitening.transform(rows)  # projects and L2-normalises each row
        else:
            rows = l2n(rows)
        owner = torch.from_numpy(np.repeat(np.arange(len(items)), counts))
        out = torch.zeros(len(items), rows.shape[1], dtype=torch.float64)
        out.index_add_(0, owner, torch.from_numpy(np.ascontiguousarray(rows, np.float64)))
        out = l2n(out.numpy().astype(np.float32))
        return out[0] if single else out
