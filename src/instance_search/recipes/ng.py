"""Ng, Yang & Davis 2015, "Exploiting local features from deep networks for image retrieval" (CVPR workshops):
the recipe ``ng-vlad``.

Sec. 3: every cell of a conv map (any layer, Sec. 4.1 and Fig. 2) is a local feature; VLAD (Jégou et al. 2010,
Eq. 1) with a k-means codebook (k = 100) learned on a held-out collection: residuals to the nearest centroid
summed per centroid, each block L2-normalised (intra-normalisation, Arandjelović & Zisserman 2013), the whole
vector L2-normalised; then PCA + whitening to 128 dimensions and L2 (Sec. 3.2; Jégou & Chum 2012). Scale 2 is
the input enlarged 2x (Sec. 4.2; the backbone resizes the image, one forward pass per scale); several scales
(and, here, several layers) are *parts*: their VLADs are concatenated before the PCA, one codebook per part.

The global vector is already PCA-whitened and L2-normalised by the method, so the recipe is ``whitened =
False`` and :meth:`NgVLAD.local` returns it as one row.

Choices where the paper leaves room (shared with ``isearch sweep``, which computes its cells through the
functions here):

* codebook sample: ``features_per_image`` random cells of ``codebook_images`` evenly spaced training images,
  one random stream per scale (drawn image by image, layer by layer), kept at half precision. The sweep draws
  its sample the same way over the layers it sweeps, so a recipe reproduces a sweep's cell exactly when the
  sweep ran the recipe's layers (``isearch sweep --layers conv4_3`` for ``--recipe ng-vlad --layer
  conv4_3``); a sweep over more layers samples other cells for the same layer (same distribution);
* raw VLADs are rounded to half precision before the PCA, in ``fit`` and when describing alike (the sweep
  caches them so; the rounding moves a descriptor by less than 1e-3);
* whitening: component i scaled by ``(lambda_i + 1e-9 lambda_0 + whiten_reg * mean(lambda))^-1/2``
  (``whiten_reg = 0``: the paper's plain whitening).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import NotFittedError
from ..fitted.codebook import KMeansCodebook
from ..ops.embeddings import vlad
from ..ops.normalize import l2n
from .base import Features, Method, Needs, RecipeError, register
from ..fitted.whitening import pca_basis

__all__ = ["NgVLAD", "cells", "codebook_image_indices", "fit_codebook", "ng_vlad", "raw_vlad", "sample_cells"]

_WHITEN_EPS = 1e-9


def cells(fmap) -> np.ndarray:
    """Every cell of a ``(C, H, W)`` map as a local feature: ``(H*W, C)`` float32, row-major cells."""
    m = fmap.detach().cpu().numpy() if isinstance(fmap, torch.Tensor) else np.asarray(fmap)
    if m.ndim != 3:
        raise RecipeError(f"a conv feature map must be (C, H, W), got shape {m.shape}")
    return np.ascontiguousarray(m.reshape(m.shape[0], -1).T, dtype=np.float32)


def ng_vlad(fmap, centroids, intra_norm: bool = True) -> np.ndarray:
    """VLAD (k*C,) float32 of all cells of one conv map (Ng et al. 2015, Sec. 3.2): residuals to the nearest of
    ``centroids`` (k, C) summed per centroid, each block L2-normalised (intra-normalisation), then L2."""
    return raw_vlad(cells(fmap), centroids, intra_norm, half=False)


def raw_vlad(x: np.ndarray, centroids, intra_norm: bool = True, *, half: bool = True) -> np.ndarray:
    """VLAD of local features ``x`` (N, C) (see :func:`ng_vlad`), float16 when ``half`` (the precision the
    recipe and the sweep keep raw VLADs in)."""
    v = vlad(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
             torch.as_tensor(np.asarray(centroids, np.float32)), intra_norm=intra_norm).numpy()
    return v.astype(np.float16) if half else v


def codebook_image_indices(n: int, codebook_images: int) -> np.ndarray:
    """The ``min(codebook_images, n)`` evenly spaced images (of ``n``) whose cells train the codebooks."""
    return np.unique(np.linspace(0, n - 1, min(int(codebook_images), n)).round().astype(int))


def sample_cells(fmaps: Iterable, per_image: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``per_image`` random cells (sorted positions) of each map in turn, float16 (one (n, C) per map)."""
    out = []
    for fmap in fmaps:
        x = cells(fmap)
        if x.shape[0] > per_image:
            x = x[np.sort(rng.choice(x.shape[0], per_image, replace=False))]
        out.append(x.astype(np.float16))
    return out


def fit_codebook(sample, k: int, niter: int = 20, seed: int = 1234) -> np.ndarray:
    """k-means centroids (k, C) float32 of sampled cells (N, C) (faiss k-means, fixed seed)."""
    return KMeansCodebook(k, niter=niter, seed=seed).fit(np.asarray(sample, np.float32)).centroids


def _strings(value, what: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(x).strip() for x in items]
    if not items or any(not x for x in items) or len(set(items)) != len(items):
        raise RecipeError(f"ng-vlad: {what} must be distinct non-empty names, got {value!r}")
    return items


def _scales(value) -> tuple[float, ...]:
    items = value.split(",") if isinstance(value, str) else (list(value) if isinstance(value, (list, tuple))
                                                             else [value])
    try:
        out = tuple(float(s) for s in items)
    except (TypeError, ValueError):
        raise RecipeError(f"ng-vlad: scales must be numbers, got {value!r}") from None
    if not out or len(set(out)) != len(out) or any(not (s > 0 and math.isfinite(s)) for s in out):
        raise RecipeError(f"ng-vlad: scales must be distinct positive numbers, got {value!r}")
    return out


def _positive_int(m: Method, key: str, minimum: int = 1) -> int:
    v = m.option(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise RecipeError(f"ng-vlad: option {key!r} must be an integer >= {minimum}, got {v!r}")
    return int(v)


@register
class NgVLAD(Method):
    """VLAD of conv-layer cells, any layer(s) and scale(s), PCA-whitened (Ng, Yang & Davis 2015, Sec. 3).

    Options: ``layers`` (list; default the recipe's ``layer``, else the backbone's default), ``scales``
    (``[1]``, ``[2]`` or ``[1, 2]``, ...), ``k`` (100), ``dim`` (128, the PCA-whitening's output),
    ``intra_norm`` (True), and the fitting's ``codebook_images`` (50), ``features_per_image`` (200), ``niter``
    (20), ``seed`` (1234), ``whiten_reg`` (0). Parts are (layer, scale) pairs, layer-major.
    """

    name = "ng-vlad"
    paper = "Ng, Yang & Davis 2015, Sec. 3"
    options = {"layers": None, "scales": [1.0], "k": 100, "dim": 128, "intra_norm": True, "codebook_images": 50,
               "features_per_image": 200, "niter": 20, "seed": 1234, "whiten_reg": 0.0}
    needs_fit = True
    whitened = False

    def __init__(self, spec):
        super().__init__(spec)
        self.parts: list[tuple[str, float]] | None = None  # fixed when fitted (or state loaded)
        self.codebooks: list[np.ndarray] | None = None  # one (k, C) per part
        self.mean: np.ndarray | None = None  # (D,)
        self.projection: np.ndarray | None = None  # (dim, D), whitening folded in
        self.eigvals: np.ndarray | None = None  # (dim,)
        self.trained_on = ""

    # -------------------------------------------------------------- settings
    def validate(self) -> None:
        layers = self.option("layers")
        if layers is not None:
            layers = _strings(layers, "layers")
            if self.spec.layer and layers[0] != self.spec.layer:
                raise RecipeError(f"ng-vlad: the recipe's layer {self.spec.layer!r} must be the first of its "
                                  f"layers {layers}")
        self._layers = layers
        self.scales = _scales(self.option("scales"))
        self.k, self.dim = _positive_int(self, "k"), _positive_int(self, "dim")
        self.codebook_images = _positive_int(self, "codebook_images")
        self.features_per_image = _positive_int(self, "features_per_image")
        self.niter, self.seed = _positive_int(self, "niter"), _positive_int(self, "seed", 0)
        self.intra_norm = self.option("intra_norm")
        if not isinstance(self.intra_norm, (bool, np.bool_)):
            raise RecipeError(f"ng-vlad: option 'intra_norm' must be true or false, got {self.intra_norm!r}")
        reg = self.option("whiten_reg")
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not (reg >= 0 and math.isfinite(reg)):
            raise RecipeError(f"ng-vlad: option 'whiten_reg' must be a number >= 0, got {reg!r}")
        self.whiten_reg = float(reg)
        if self.spec.whitening_dim is not None:
            raise RecipeError("ng-vlad whitens its own VLADs: set its output dimension with the option 'dim' "
                              f"(--dim), not whitening_dim={self.spec.whitening_dim}")

    def layers(self, default_layer: str | None = None) -> list[str]:
        if self._layers is not None:
            return list(self._layers)
        if self.spec.layer:
            return [self.spec.layer]
        if self.parts is not None:
            return list(dict.fromkeys(la for la, _ in self.parts))
        if default_layer:
            return [default_layer]
        raise RecipeError("ng-vlad: no layer given (set the recipe's layer or the option 'layers')")

    def needs(self, default_layer: str) -> Needs:
        """The recipe's layers at its scales, plus scale 1 when it is not one of them: the index keeps the first
        layer's scale-1 map for re-ranking and localisation (whose boxes are in scale-1 map cells)."""
        scales = self.scales if 1.0 in self.scales else (1.0, *self.scales)
        return Needs(layers=tuple(self.layers(default_layer)), scales=scales)

    def _parts_for(self, feats: Features) -> list[tuple[str, float]]:
        if self.parts is not None:
            return self.parts
        if self._layers is None and not self.spec.layer:  # the backbone's default: the one layer given
            layers = list(dict.fromkeys(la for la, _ in feats.maps))
            if len(layers) != 1:
                raise RecipeError(f"ng-vlad: no layer set and the features hold layers {layers}; set one")
        else:
            layers = self.layers()
        return [(la, s) for la in layers for s in self.scales]

    # -------------------------------------------------------------- fitted state
    @property
    def fitted(self) -> bool:
        return self.codebooks is not None and self.projection is not None

    @property
    def raw_dim(self) -> int:
        """Dimension of the concatenated VLADs before the PCA (``k * sum of the parts' channels``)."""
        self._need_codebooks()
        return int(sum(c.size for c in self.codebooks))

    def _need_codebooks(self) -> None:
        if self.codebooks is None:
            raise NotFittedError(f"recipe {self.name!r} must be fitted on a training collection first "
                                 "(`isearch index ... --fit-on TRAIN_DIR`, or Recipe.fit)")

    # -------------------------------------------------------------- learning
    def fit(self, train: Iterable[Features], *, trained_on: str = "") -> None:
        """Learn one k-means codebook per part, then the PCA-whitening of the training images' raw VLADs.

        ``train`` is walked twice (codebook images, then every image), so it must be a sized collection that
        can be iterated again (a list, or a sequence that loads each image's :class:`Features` lazily)."""
        if iter(train) is train or not hasattr(train, "__len__"):
            raise RecipeError("ng-vlad: fit walks the training images twice; pass a sequence of Features "
                              f"(a list, or one that loads lazily), not a one-shot {type(train).__name__}")
        n = len(train)
        if n < 2:
            raise RecipeError(f"ng-vlad: fit needs at least 2 training images, got {n}")
        idx = codebook_image_indices(n, self.codebook_images).tolist()
        chosen = set(idx)
        picked = ((train[i] for i in idx) if hasattr(train, "__getitem__")
                  else (f for i, f in enumerate(train) if i in chosen))
        rngs = {s: np.random.default_rng(self.seed) for s in self.scales}
        parts = None
        samples: dict[tuple[str, float], list[np.ndarray]] = {}
        for feats in picked:
            parts = parts or self._parts_for(feats)
            for s in self.scales:  # one stream per scale, drawn layer by layer (as the sweep does)
                layers = [la for la, q in parts if q == s]
                for la, x in zip(layers, sample_cells([feats.map(la, s) for la in layers],
                                                      self.features_per_image, rngs[s])):
                    samples.setdefault((la, s), []).append(x)
        where = trained_on or "the training collection"
        try:
            self.set_codebooks({p: fit_codebook(np.concatenate(samples[p]), self.k, self.niter, self.seed)
                                for p in parts}, parts)
        except ValueError as exc:  # e.g. fewer sampled cells than k
            raise RecipeError(f"ng-vlad: cannot learn the codebooks from {where}: {exc}") from None
        raw = np.stack([self.raw(feats) for feats in train])
        self.fit_whitening(raw, trained_on=trained_on)

    def set_codebooks(self, codebooks: Mapping[tuple[str, float], np.ndarray],
                      parts: Sequence[tuple[str, float]] | None = None) -> None:
        """Use given codebooks ``{(layer, scale): (k, C)}``; the whitening must then be (re)fitted."""
        parts = [(str(la), float(s)) for la, s in (parts if parts is not None else codebooks)]
        cbs = []
        for p in parts:
            c = np.asarray(codebooks[p], np.float32)
            if c.ndim != 2 or c.shape[0] != self.k:
                raise RecipeError(f"ng-vlad: the codebook of {p[0]} at scale {p[1]:g} must be ({self.k}, C), "
                                  f"got {c.shape}")
            cbs.append(c)
        self.parts, self.codebooks = parts, cbs
        self.mean = self.projection = self.eigvals = None

    def fit_whitening(self, raw, trained_on: str = "") -> None:
        """PCA + whitening to ``dim`` (Sec. 3.2; Jégou & Chum 2012) of training raw VLADs (M, raw_dim)."""
        self._need_codebooks()
        raw = np.asarray(raw, np.float32)
        if raw.ndim != 2 or raw.shape[1] != self.raw_dim:
            raise RecipeError(f"ng-vlad: training VLADs must be (M, {self.raw_dim}), got {raw.shape}")
        try:
            mean, comps, lam = pca_basis(raw, self.dim)
        except ValueError as exc:  # identical training vectors
            raise RecipeError(f"ng-vlad: cannot learn the PCA-whitening from {trained_on or 'these images'}: "
                              f"{exc}") from None
        if comps.shape[0] < self.dim:
            raise RecipeError(f"ng-vlad: cannot whiten to {self.dim} dimensions: {raw.shape[0]} training images "
                              f"span only {comps.shape[0]} directions; use more training images or a smaller dim")
        floor = _WHITEN_EPS * lam[0] + self.whiten_reg * float(lam.mean())
        self.mean = mean.astype(np.float32)
        self.projection = (comps / np.sqrt(lam + floor)[:, None]).astype(np.float32)
        self.eigvals = lam.astype(np.float32)
        self.trained_on = str(trained_on)

    # -------------------------------------------------------------- describing
    def raw(self, feats: Features) -> np.ndarray:
        """The parts' VLADs concatenated (raw_dim,), float16, before the PCA (each part has norm 1)."""
        self._need_codebooks()
        return np.concatenate([raw_vlad(cells(feats.map(la, s)), c, self.intra_norm)
                               for (la, s), c in zip(self.parts, self.codebooks)])

    def project(self, raw) -> np.ndarray:
        """PCA-whitening + L2 of raw VLADs: (M, raw_dim) -> (M, dim) float32."""
        self.require_fitted()
        r = np.asarray(raw, np.float32)
        if r.ndim != 2 or r.shape[1] != self.mean.shape[0]:
            raise RecipeError(f"ng-vlad: raw VLADs must be (M, {self.mean.shape[0]}), got {r.shape}")
        return l2n((r - self.mean) @ self.projection.T)

    def local(self, feats: Features) -> np.ndarray:
        """The global vector (1, dim): VLADs of the parts, concatenated, PCA-whitened, L2-normalised."""
        self.require_fitted()
        return self.project(self.raw(feats)[None])

    # -------------------------------------------------------------- state
    _KEYS = ("recipe", "layers", "scales", "mean", "projection", "eigvals", "trained_on")

    def state_dict(self) -> dict[str, np.ndarray]:
        self.require_fitted()
        out = {"recipe": np.array(self.name), "layers": np.array([la for la, _ in self.parts]),
               "scales": np.array([s for _, s in self.parts], np.float64), "mean": self.mean,
               "projection": self.projection, "eigvals": self.eigvals, "trained_on": np.array(self.trained_on)}
        out.update({f"codebook_{i}": c for i, c in enumerate(self.codebooks)})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s arrays; refuses another recipe's state or arrays that do not fit."""
        keys = set(state)
        n_cb = len([k for k in keys if k.startswith("codebook_")])
        want = set(self._KEYS) | {f"codebook_{i}" for i in range(n_cb)}
        if "recipe" in keys and str(np.asarray(state["recipe"])) != self.name:
            raise RecipeError(f"ng-vlad: the fitted state belongs to recipe {str(np.asarray(state['recipe']))!r}")
        if keys != want:
            raise RecipeError(f"ng-vlad: the fitted state is not an ng-vlad state: missing "
                              f"{sorted(want - keys) or 'nothing'}, unexpected {sorted(keys - want) or 'nothing'}")
        try:
            layers = [str(x) for x in np.asarray(state["layers"]).reshape(-1)]
            scales = [float(x) for x in np.asarray(state["scales"], np.float64).reshape(-1)]
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"ng-vlad: unreadable layers / scales in the fitted state ({exc})") from None
        parts = list(zip(layers, scales))
        if len(layers) != len(scales) or len(parts) != n_cb:
            raise RecipeError(f"ng-vlad: the fitted state has {len(layers)} layers, {len(scales)} scales and "
                              f"{n_cb} codebooks; they must agree")
        mine = self._layers or ([self.spec.layer] if self.spec.layer else list(dict.fromkeys(layers)))
        expect = [(la, s) for la in mine for s in self.scales]
        if parts != expect:
            raise RecipeError(f"ng-vlad: the fitted state was learned for parts "
                              f"{[f'{la}@{s:g}' for la, s in parts]}, this recipe reads "
                              f"{[f'{la}@{s:g}' for la, s in expect]}")
        cbs = [np.asarray(state[f"codebook_{i}"]) for i in range(n_cb)]
        for (la, s), c in zip(parts, cbs):
            if c.ndim != 2 or c.shape[0] != self.k:
                raise RecipeError(f"ng-vlad: codebook of {la}@{s:g} has shape {c.shape}, expected ({self.k}, C) "
                                  f"for k={self.k}")
        d = sum(c.size for c in cbs)
        mean, proj, eig = (np.asarray(state[k]) for k in ("mean", "projection", "eigvals"))
        for key, arr, shape in (("mean", mean, (d,)), ("projection", proj, (self.dim, d)),
                                ("eigvals", eig, (self.dim,))):
            if arr.shape != shape:
                raise RecipeError(f"ng-vlad: fitted array {key!r} has shape {arr.shape}, expected {shape} "
                                  f"(k={self.k}, dim={self.dim})")
            if not np.all(np.isfinite(arr)):
                raise RecipeError(f"ng-vlad: fitted array {key!r} holds NaN or infinite values")
        self.parts, self.codebooks = parts, [c.astype(np.float32) for c in cbs]
        self.mean, self.projection = mean.astype(np.float32), proj.astype(np.float32)
        self.eigvals, self.trained_on = eig.astype(np.float32), str(np.asarray(state["trained_on"]))
