"""Faster R-CNN features for instance search (Salvador, Giró-i-Nieto, Marqués & Satoh 2016): image-wise pooling
(IPA) of the last conv layer; and ``rpa``, Gordo et al.'s R-MAC aggregated over a region proposal network's boxes
(Salvador et al. pool proposals only to re-rank, see :mod:`instance_search.rerank.ca_sr`).

The RPN is a model file (``isearch train-rpn``); the recipe holds its path and sha256 (options ``rpn`` and
``sha256``), the index keeps a verified copy and rewrites the path to it on open (``Method.model_files``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nets.rpn import RPN, RPNFileError, load_rpn
from ..ops.normalize import l2n
from ..ops.pooling import mac, region_macs, spoc
from .base import Features, Method, Recipe, RecipeError, as_tensor, only_map, register

__all__ = ["IPA", "RPA", "rpa_recipe", "load_recipe_rpn", "rpa_local_vectors", "proposals_option"]


@register
class IPA(Method):
    """IPA (Salvador et al. 2016, Sec. 3.1): sum pooling (then L2, whitening, L2) or max pooling (MAC, meant
    without whitening) of the whole conv map."""

    name = "ipa"
    paper = "Salvador et al. 2016, Sec. 3.1"
    options = {"pooling": "sum"}
    #: a query box: the first stage ranks with the whole query image, re-ranking uses the box (Salvador Sec. 4.2)
    first_stage = "image"

    def validate(self) -> None:
        if self.option("pooling") not in ("sum", "max"):
            raise RecipeError(f"recipe 'ipa': pooling must be 'sum' or 'max', got {self.option('pooling')!r}")

    def local(self, feats: Features) -> np.ndarray:
        fmap = as_tensor(only_map(feats, self.spec.layer))
        vec = spoc(fmap) if self.option("pooling") == "sum" else mac(fmap)
        return l2n(vec[None].detach().cpu().numpy().astype(np.float32))


def proposals_option(value: Any, what: str) -> int:
    """The ``proposals`` option of recipe ``what`` as an int >= 1, or a :class:`RecipeError` naming the value."""
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise RecipeError(f"recipe {what!r}: proposals must be an integer >= 1, got {value!r}") from None
    if k < 1 or k != value:
        raise RecipeError(f"recipe {what!r}: proposals must be an integer >= 1, got {value!r}")
    return k


@register
class RPA(Method):
    """Gordo et al.'s R-MAC over region proposals (Gordo, Almazán, Revaud & Larlus 2016, Sec. 3.2), named ``rpa``
    after Salvador et al.'s region-wise pooling (Sec. 3.1): the MACs of the top ``proposals`` boxes of a trained
    region proposal network, each L2 → whitening → L2, summed into one global vector as R-MAC sums its grid regions.
    Salvador et al. pool the proposals only to re-rank (CA-SR, :mod:`instance_search.rerank.ca_sr`); the
    aggregation into a global vector is Gordo's. The local vectors are the proposals' region MACs, RoI-projected
    with Caffe's rounding (:func:`~instance_search.ops.boxes.boxes_to_cells`)."""

    name = "rpa"
    paper = "Gordo et al. 2016, Sec. 3.2 (R-MAC over proposals); Salvador et al. 2016, Sec. 3.1 (region pooling)"
    first_stage = "image"
    options = {"rpn": None, "sha256": "", "proposals": 256}
    model_files = ("rpn",)

    @classmethod
    def from_cli(cls, *, backbone: str, layer: str | None, max_size: int, extra: dict[str, Any]) -> Recipe:
        """``isearch index --recipe rpa --rpn FILE [--proposals N]``: the layer comes from the RPN file."""
        if not extra.get("rpn"):
            raise RecipeError("--recipe rpa needs --rpn FILE (a region proposal network from `isearch train-rpn`)")
        return rpa_recipe(extra["rpn"], extra.get("proposals", 256), max_size=max_size)

    def validate(self) -> None:
        if not self.spec.extra.get("rpn"):
            raise RecipeError("recipe 'rpa' needs a trained region proposal network (--rpn FILE from "
                              "`isearch train-rpn`)")
        proposals_option(self.option("proposals"), "rpa")

    def local(self, feats: Features) -> np.ndarray:
        return l2n(rpa_local_vectors(self.spec.extra, as_tensor(only_map(feats, self.spec.layer))))


# ------------------------------------------------------------------------------------------------ the model files
_LOADED: dict[tuple[str, str], RPN] = {}


def load_recipe_rpn(path: str | os.PathLike | None, sha256: str = "") -> RPN:
    """The RPN a recipe names (loaded once per process); refuses a file whose state differs from ``sha256``
    (the model changed since the index was built with it)."""
    if not path:
        raise RecipeError("the recipe needs a trained region proposal network (--rpn FILE from `isearch train-rpn`)")
    key = (str(path), str(sha256 or ""))
    rpn = _LOADED.get(key)
    if rpn is None:
        rpn, cfg = load_rpn(path)
        if sha256 and cfg["state_sha256"] != sha256:
            raise RPNFileError(f"{path}: this RPN file changed since the index was built with it (sha256 "
                               f"{cfg['state_sha256'][:16]}… instead of {str(sha256)[:16]}…)")
        _LOADED[key] = rpn
    return rpn


def rpa_recipe(rpn_model: str | os.PathLike, proposals: int = 256, max_size: int = 1024) -> Recipe:
    """A :class:`~instance_search.recipes.base.Recipe` ``"rpa"``: Gordo et al.'s R-MAC pooled over the top
    ``proposals`` RPN boxes instead of the rigid grid (Gordo et al. 2016, Sec. 3.2; the region-wise pooling of
    Salvador et al. 2016, Sec. 3.1, aggregated). The model's path and sha256 travel in the recipe."""
    path = Path(rpn_model).expanduser().resolve()
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    _, cfg = load_rpn(path)
    extra = {"rpn": str(path), "sha256": cfg["state_sha256"], "proposals": proposals_option(proposals, "rpa")}
    return Recipe("rpa", backbone="vgg16", layer=cfg.get("layer", "conv5_3"), max_size=max_size, extra=extra)


@torch.no_grad()
def rpa_local_vectors(extra: dict[str, Any], fmap: torch.Tensor) -> np.ndarray:
    """(R, C) MACs of the top ``extra['proposals']`` RPN boxes of one conv map (the regions of Gordo et al.'s R-MAC
    over proposals, Sec. 3.2; Salvador et al.'s region-wise max pooling, Sec. 3.1), not normalised."""
    rpn = load_recipe_rpn(extra.get("rpn"), extra.get("sha256", ""))
    cells = rpn.proposal_cells(fmap, int(extra.get("proposals", 256)))
    return region_macs(fmap.float(), cells).cpu().numpy().astype(np.float32)
