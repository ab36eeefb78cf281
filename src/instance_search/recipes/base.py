"""The Recipe protocol and its registry: one descriptor pipeline per name, each paper in its own module.

A :class:`Recipe` is the *settings* of a pipeline (a small serialisable dataclass stored in the index so that
queries are described exactly like the database); the maths lives in a :class:`Method` subclass that a paper
module registers under the recipe's name (:func:`register`). Everything above this layer -- ``Collection``,
``eval``, the sweeps, the CLI and the server -- goes through the registry; nothing switches on a recipe name.

=================  ===================================================================  ==================
recipe             what it computes                                                     module
=================  ===================================================================  ==================
``mac``            max over all positions (Tolias et al. 2016, Eq. 1)                   ``tolias.py``
``rmac``           R-MAC: MACs of an L-level grid of regions (Tolias et al. 2016, S. 4) ``tolias.py``
``spoc``, ``gem``  sum pooling (Babenko 2015); generalised mean (Radenović 2018)        ``tolias.py``
``ng-vlad``        VLAD of every conv cell, any layer and scale (Ng et al. 2015)         ``ng.py``
``selective``      masked conv features, embedding, aggregation (Hoang et al. 2017)      ``hoang.py``
``learned-rmac``   R-MAC as a trained network, grid or RPN regions (Gordo et al. 2016)   ``gordo.py``
``ipa``, ``rpa``   image- / region-wise pooling (Salvador et al. 2016)                   ``salvador.py``
=================  ===================================================================  ==================

The protocol (:class:`Method`):

- :meth:`Method.needs` -- which backbone layers and scales (and SIFT keypoints) the recipe reads;
- :meth:`Method.fit` -- learns what the method learns (codebooks, local PCA, rotation normalisation, ...) from
  a *training* collection's :class:`Features`; a method with ``needs_fit`` refuses to describe until fitted;
- :meth:`Method.local` -- the vectors the index stores for one image, (R, D), each L2-normalised;
- :meth:`Method.finalize` -- the global vector from them (default ``L2(sum_r L2(W(x_r)))``, Tolias Sec. 4);
- :meth:`Method.state_dict` / :meth:`Method.load_state_dict` -- the fitted state as plain arrays (stored
  inside the index folder with its sha256, never referenced by path).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import torch

from ..errors import ISearchError
from ..fitted.whitening import NotFittedError
from ..ops.normalize import l2n

BACKBONES = ("vgg16", "resnet50", "efficientnet-lite0", "googlenet")  # googlenet: user-supplied weights


class RecipeError(ISearchError, ValueError):
    """An unknown recipe, an option that does not belong to it, or a value it cannot take."""


@dataclass(frozen=True)
class Needs:
    """What a recipe reads from the backbone for one image."""

    layers: tuple[str, ...]
    scales: tuple[float, ...] = (1.0,)
    keypoints: bool = False  # SIFT keypoints of the image (Hoang et al. 2017, the SIFT mask)


@dataclass
class Features:
    """What the backbone gives a recipe for one image: conv maps keyed by (layer, scale), each (C, H, W)
    (a torch tensor or a numpy array), the image size (height, width) in pixels, and SIFT keypoints (N, 2) as
    (x, y) pixels when the recipe asked for them."""

    maps: dict[tuple[str, float], Any]
    image_hw: tuple[int, int] | None = None
    keypoints: np.ndarray | None = None

    def map(self, layer: str, scale: float = 1.0):
        try:
            return self.maps[(layer, float(scale))]
        except KeyError:
            have = ", ".join(f"{k[0]}@{k[1]:g}" for k in self.maps)
            raise RecipeError(f"no feature map for layer {layer!r} at scale {scale:g} (have: {have})") from None


class Method:
    """One paper's descriptor pipeline, built by the registry from a :class:`Recipe` (``self.spec``).

    Subclasses set ``name``, ``paper``, ``options`` (the recipe's ``extra`` keys it accepts, with their
    defaults), ``needs_fit`` and ``whitened`` (whether the collection's PCA-whitening applies to its local
    vectors: R-MAC's regions yes; an already projected VLAD no), and implement :meth:`local`.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    #: option keys whose value names a model file: the index copies the file in and keeps its sha256
    model_files: ClassVar[tuple[str, ...]] = ()
    needs_fit: ClassVar[bool] = False
    whitened: ClassVar[bool] = True
    #: how a window that AML localises in a map is described so that it compares with this recipe's global
    #: vector (Tolias et al. 2016, Sec. 6): "mac" (the window's MAC), "rmac" (the window's R-MAC), or "" (it
    #: does not compare: re-ranking keeps its own scores and query expansion uses the stored global vectors)
    window_vector: ClassVar[str] = ""
    #: the backbone a recipe gets when none is named: the papers' VGG16 for the recipes built on its named
    #: layers; the global descriptors (MAC, R-MAC, SPoC, GeM) take ResNet-50, chosen by measurement
    #: (docs/results.md#the-default-backbone-and-recipe)
    default_backbone: ClassVar[str] = "vgg16"

    def __init__(self, spec: "Recipe"):
        self.spec = spec

    @classmethod
    def from_cli(cls, *, backbone: str, layer: str | None, max_size: int, extra: dict[str, Any]) -> "Recipe":
        """The recipe the command line's flags describe (recipes whose settings live in a model file override
        this to read it)."""
        return Recipe(cls.name, backbone=backbone, layer=layer, max_size=max_size, extra=extra)

    # -------------------------------------------------------------- what the recipe reads
    def option(self, key: str) -> Any:
        return self.spec.extra.get(key, self.options[key])

    def validate(self) -> None:
        """Raise :class:`RecipeError` naming a bad setting (called when the recipe is made)."""

    def needs(self, default_layer: str) -> Needs:
        return Needs(layers=(self.spec.layer or default_layer,))

    def prepare_backbone(self, backbone) -> None:
        """Change the backbone before use (e.g. install trained conv layers); default: nothing."""

    def map_for_rerank(self, feats: Features, default_layer: str):
        """The (C, H, W) map kept in the index for re-ranking and localisation: the first layer at scale 1."""
        return feats.map(self.needs(default_layer).layers[0], 1.0)

    # -------------------------------------------------------------- fitting
    @property
    def fitted(self) -> bool:
        return True

    def require_fitted(self) -> None:
        if self.needs_fit and not self.fitted:
            raise NotFittedError(f"recipe {self.name!r} must be fitted on a training collection first "
                                 "(`isearch index ... --fit-on TRAIN_DIR`, or Recipe.fit)")

    def fit(self, train: Iterable[Features], *, trained_on: str = "") -> None:
        raise RecipeError(f"recipe {self.name!r} learns nothing from a training collection")

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise RecipeError(f"recipe {self.name!r} has no fitted state, got arrays {sorted(state)}")

    # -------------------------------------------------------------- the maths
    def local(self, feats: Features) -> np.ndarray:
        raise NotImplementedError

    def finalize(self, local: list[np.ndarray] | np.ndarray, whitening=None) -> np.ndarray:
        """Global vectors ``L2(sum_r L2(W(x_r)))`` (Tolias et al. 2016, Sec. 4); a list gives (N, D)."""
        single = isinstance(local, np.ndarray)
        items = [local] if single else list(local)
        if not items:
            dim = whitening.dim if whitening is not None else 0
            return np.zeros((0, dim), np.float32)
        counts = np.asarray([len(x) for x in items])
        rows = np.concatenate([np.asarray(x, np.float32) for x in items])
        rows = whitening.transform(rows) if whitening is not None else l2n(rows)
        owner = torch.from_numpy(np.repeat(np.arange(len(items)), counts))
        out = torch.zeros(len(items), rows.shape[1], dtype=torch.float64)
        out.index_add_(0, owner, torch.from_numpy(np.ascontiguousarray(rows, np.float64)))
        out = l2n(out.numpy().astype(np.float32))
        return out[0] if single else out


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the recipe called ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise RecipeError(f"recipe name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


def recipe_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(REGISTRY)}") from None


@dataclass
class Recipe:
    """A descriptor pipeline's settings; serialised into the index so that queries are described the same way.

    ``extra`` holds the options of the named recipe (``Method.options``); an option another recipe owns is
    refused. ``levels`` / ``gem_p`` are R-MAC's and GeM's (kept as fields: indexes store them)."""

    name: str = "rmac"
    backbone: str | None = None  # None: the recipe's Method.default_backbone (resnet50 for mac / rmac / spoc / gem)
    layer: str | None = None  # None: the backbone's default (VGG16 conv5_3, ResNet-50 res5)
    levels: int = 3
    gem_p: float = 3.0
    max_size: int = 1024
    whitening_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = method_class(self.name)
        if self.backbone is None:
            self.backbone = cls.default_backbone
        if self.backbone not in BACKBONES:
            raise RecipeError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.levels < 1:
            raise RecipeError("R-MAC needs at least one level")
        if self.max_size is not None and self.max_size < 32:
            raise RecipeError(f"max_size {self.max_size} is too small (need >= 32 pixels)")
        foreign = sorted(set(self.extra) - set(cls.options))
        if foreign:
            owners = {k: [n for n, c in REGISTRY.items() if k in c.options] for k in foreign}
            said = "; ".join(f"{k!r}" + (f" belongs to {', '.join(v)}" if v else "") for k, v in owners.items())
            allowed = ", ".join(cls.options) or "none"
            raise RecipeError(f"recipe {self.name!r} does not take option(s) {said} (its options: {allowed})")
        self._method = cls(self)
        self._method.validate()

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.setdefault("backbone", "vgg16")  # a recipe stored without one predates the ResNet-50 default
        return cls(**known)

    # -------------------------------------------------------------- delegation to the method
    @property
    def method(self) -> Method:
        return self._method

    @property
    def needs_fit(self) -> bool:
        return self._method.needs_fit

    @property
    def whitened(self) -> bool:
        return self._method.whitened

    @property
    def fitted(self) -> bool:
        return self._method.fitted

    def needs(self, default_layer: str) -> Needs:
        return self._method.needs(default_layer)

    def fit(self, train: Iterable[Features], *, trained_on: str = "") -> "Recipe":
        self._method.fit(train, trained_on=trained_on)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return self._method.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> "Recipe":
        self._method.load_state_dict(state)
        return self

    def local(self, feats: Features) -> np.ndarray:
        """Pre-whitening local vectors (R, D), each L2-normalised, of one image's :class:`Features`."""
        self._method.require_fitted()
        return self._method.local(feats)

    def local_from_map(self, fmap) -> np.ndarray:
        """:meth:`local` of one (C, H, W) map at the recipe's layer, scale 1 (single-map recipes)."""
        if fmap.ndim != 3:
            raise RecipeError(f"expected a (C, H, W) feature map, got shape {tuple(fmap.shape)}")
        return self.local(Features({(self.layer or "", 1.0): fmap}))

    def finalize(self, local: list[np.ndarray] | np.ndarray, whitening=None) -> np.ndarray:
        """Global vectors from local ones; a list gives an (N, D) array."""
        return self._method.finalize(local, whitening if self.whitened else None)


def only_map(feats: Features, layer: str | None):
    """The map a single-map recipe reads: ``layer`` at scale 1, or the only map given."""
    if layer and (layer, 1.0) in feats.maps:
        return feats.maps[(layer, 1.0)]
    if len(feats.maps) == 1:
        return next(iter(feats.maps.values()))
    return feats.map(layer or "", 1.0)


def as_tensor(fmap) -> torch.Tensor:
    t = fmap if isinstance(fmap, torch.Tensor) else torch.from_numpy(np.asarray(fmap))
    if t.ndim != 3:
        raise RecipeError(f"expected a (C, H, W) feature map, got shape {tuple(t.shape)}")
    return t.float()
