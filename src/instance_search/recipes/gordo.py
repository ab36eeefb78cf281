"""Learned R-MAC (Gordo, Almazán, Revaud & Larlus 2016, "Deep image retrieval: learning global representations
for image search"): R-MAC as a network whose conv layers, shift and FC (the whitening) are trained with a triplet
ranking loss (``isearch train-rmac``), over the rigid grid or a region proposal network's boxes (Sec. 3.2).

The trained network (and the RPN) are model files; the recipe holds their paths and sha256 (options ``model`` /
``sha256``, ``rpn`` / ``rpn_sha256``), the index keeps verified copies and rewrites the paths to them on open."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nets.rmac_head import ModelFileError, RMACNet, apply_to_backbone, load_model, read_config
from .base import Features, Method, Recipe, RecipeError, as_tensor, only_map, register
from .salvador import load_recipe_rpn, proposals_option, rpa_recipe

__all__ = ["LearnedRMAC", "learned_rmac_recipe", "load_recipe_model", "learned_region_vectors"]


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
        proposals_option(self.option("proposals"), "learned-rmac")

    @classmethod
    def from_cli(cls, *, backbone: str, layer: str | None, max_size: int, extra: dict[str, Any]) -> Recipe:
        """``isearch index --recipe learned-rmac --model FILE [--regions rpn --rpn FILE --proposals N]``: the
        backbone, layer and levels come from the model file."""
        if not extra.get("model"):
            raise RecipeError("--recipe learned-rmac needs --model FILE (a model.pt from `isearch train-rmac`)")
        regions = extra.get("regions", "grid")
        if regions not in ("grid", "rpn") or (regions == "rpn") != bool(extra.get("rpn")):
            raise RecipeError(f"--recipe learned-rmac: --regions must be 'grid' or 'rpn' (got {regions!r}), and "
                              "--regions rpn goes with --rpn FILE")
        return learned_rmac_recipe(extra["model"], max_size=max_size, rpn=extra.get("rpn"),
                                   proposals=extra.get("proposals", 256))

    def prepare_backbone(self, backbone) -> None:
        """Install the trained conv layers in the backbone, so that its conv5_3 maps are the network's."""
        apply_to_backbone(load_recipe_model(self.spec.extra), backbone)

    def local(self, feats: Features) -> np.ndarray:
        return learned_region_vectors(self.spec.extra, as_tensor(only_map(feats, self.spec.layer)))


_LOADED: dict[tuple[str, str], RMACNet] = {}


def load_recipe_model(extra: dict[str, Any]) -> RMACNet:
    """The trained network a ``learned-rmac`` recipe names (loaded once per process); refuses a model file that
    changed since the index was built with it (its state's sha256 differs from ``extra['sha256']``)."""
    path = extra.get("model") if isinstance(extra, dict) else None
    if not path:
        raise RecipeError("recipe 'learned-rmac' needs a trained model (--model FILE from `isearch train-rmac`)")
    key = (str(path), str(extra.get("sha256", "")))
    net = _LOADED.get(key)
    if net is None:
        net, cfg = load_model(path)
        if extra.get("sha256") and cfg["state_sha256"] != extra["sha256"]:
            raise ModelFileError(f"{path}: this model file changed since the index was built with it "
                                 f"(sha256 {cfg['state_sha256'][:16]}… instead of {str(extra['sha256'])[:16]}…)")
        _LOADED[key] = net
    return net


def learned_rmac_recipe(model: str | os.PathLike, max_size: int = 1024, rpn: str | os.PathLike | None = None,
                        proposals: int = 256) -> Recipe:
    """A :class:`~instance_search.recipes.base.Recipe` ``"learned-rmac"`` describing images with a trained model
    (``isearch index --recipe learned-rmac --model FILE``): the model's path and sha256 travel in the recipe.
    With ``rpn`` (a model of ``isearch train-rpn``), the regions are its top ``proposals`` boxes on the trained
    conv5_3 map instead of the rigid grid (Gordo et al. 2016, Sec. 3.2)."""
    path = Path(model).expanduser().resolve()
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    cfg = read_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: learned R-MAC model file not found")
    extra: dict[str, Any] = {"model": str(path), "sha256": cfg["state_sha256"]}
    if rpn is not None:
        r = rpa_recipe(rpn, proposals).extra  # loads and checks the RPN file and the number of proposals
        extra.update(regions="rpn", rpn=r["rpn"], rpn_sha256=r["sha256"], proposals=r["proposals"])
    return Recipe("learned-rmac", backbone=cfg.get("backbone", "vgg16"), layer="conv5_3", levels=int(cfg["levels"]),
                  max_size=max_size, extra=extra)


@torch.no_grad()
def learned_region_vectors(extra: dict[str, Any], fmap: torch.Tensor) -> np.ndarray:
    """(R, D) learned region vectors ``L2(W(L2(f_R) + s))`` of one conv5_3 map (from a backbone prepared with
    :meth:`LearnedRMAC.prepare_backbone`): the index's local vectors; their L2-normalised sum is the learned
    R-MAC (Gordo et al. 2016, Sec. 3.1), over the grid or the RPN's top proposals (Sec. 3.2)."""
    net = load_recipe_model(extra)
    fmap = fmap.float().to(net.head.shift.device)
    regions = None  # the rigid grid
    if extra.get("regions") == "rpn":
        rpn = load_recipe_rpn(extra.get("rpn"), extra.get("rpn_sha256", ""))
        regions = rpn.proposal_cells(fmap, int(extra.get("proposals", 256)))
    elif extra.get("regions", "grid") != "grid":
        raise RecipeError(f"recipe 'learned-rmac': regions must be 'grid' or 'rpn', got {extra.get('regions')!r}")
    return net.head.region_vectors(fmap, regions).cpu().numpy().astype(np.float32)
