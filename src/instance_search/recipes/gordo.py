"""Learned R-MAC (Gordo, Almazán, Revaud & Larlus 2016, "Deep image retrieval: learning global representations
for image search"): R-MAC as a network whose conv layers, shift and FC (the whitening) are trained with a triplet
ranking loss (``isearch train-rmac``), over the rigid grid or a region proposal network's boxes (Sec. 3.2)."""
from __future__ import annotations

import numpy as np

from .base import Features, Method, RecipeError, as_tensor, only_map, register


@register
class LearnedRMAC(Method):
    """The index's local vectors are the learned region vectors ``L2(W(L2(f_R) + s))`` of the trained conv5_3
    map (Gordo et al. 2016, Sec. 3.1, Fig. 1); their L2-normalised sum is the learned R-MAC. No further
    whitening: the trained head whitens."""

    name = "learned-rmac"
    paper = "Gordo et al. 2016, Sec. 3"
    options = {"model": None, "sha256": "", "regions": "grid", "rpn": None, "rpn_sha256": "", "proposals": 256}
    model_files = ("model", "rpn")
    whitened = False

    def validate(self) -> None:
        if not self.spec.extra.get("model"):
            raise RecipeError("recipe 'learned-rmac' needs a trained model (--model FILE from `isearch train-rmac`)")
        if self.spec.backbone != "vgg16":
            raise RecipeError(f"recipe 'learned-rmac' is trained on vgg16, not {self.spec.backbone!r}")
        if self.option("regions") not in ("grid", "rpn"):
            raise RecipeError(f"recipe 'learned-rmac': regions must be 'grid' or 'rpn', got {self.option('regions')!r}")
        if self.option("regions") == "rpn" and not self.spec.extra.get("rpn"):
            raise RecipeError("recipe 'learned-rmac' with regions 'rpn' needs an RPN model (--rpn FILE)")

    def prepare_backbone(self, backbone) -> None:
        from ..nets.rmac_head import prepare_backbone

        prepare_backbone(backbone, self.spec.extra)

    def local(self, feats: Features) -> np.ndarray:
        from ..nets.rmac_head import recipe_region_vectors

        return recipe_region_vectors(self.spec.extra, as_tensor(only_map(feats, self.spec.layer)))
