"""Hoang et al.'s local-feature pipeline as a fitted object (fit on a TRAINING collection, then encode);
Ng et al. 2015's VLAD is in :mod:`.ng`.

* :class:`Selective` -- Hoang, Do, Le Tan & Cheung 2017, "Selective deep convolutional features for image
  retrieval" (ACM MM): a mask (SIFT / SUM / MAX, Sec. 3.1) selects cells of a conv map; the kept features are
  PCA-reduced to ``d`` and L2-normalised, embedded one by one (FV, VLAD, T-emb and F-FAemb with their learned
  whitening), aggregated (sum / mean / democratic), rotation-normalised (a rotation learned on the aggregated
  vectors of a held-out set, dropping the leading components), power-law 0.5 and L2 (Sec. 3.2). Registered as
  the recipe ``selective`` (:class:`SelectiveMethod`).

Maps are ``(C, H, W)`` numpy arrays or torch tensors (non-negative, post-ReLU). All heavy work is vectorised
(no Python loop over local features). Models save to one ``.npz`` (no pickles, written atomically) and refuse
to encode before they are fitted (:class:`~instance_search.errors.NotFittedError`).

Where the paper leaves room, the authors' code (github hnanhtuan/selectiveConvFeatures_ACMMM_reproducibility)
decides: the ``(d, k, drop)`` of every named dimension (:data:`TABLE2`, :data:`TABLE4`), the embedding
whitening's eigenvalue floor, the mask conventions (:mod:`instance_search.ops.masks`); see docs/papers/hoang.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import FileFormatError, NotFittedError
from ..fitted.codebook import GMMCodebook, KMeansCodebook, LocalPCA
from ..fitted.rotation import RotationNormalisation
from ..fitted.whitening import eigh_desc, pca_basis
from ..io import atomic_save_npz, load_npz
from ..ops import embeddings as _emb
from ..ops.aggregation import aggregate as _aggregate
from ..ops.masks import masked_features, max_mask, sift_mask, sum_mask
from ..ops.normalize import l2n
from .base import Features, Method, Needs, RecipeError, only_map, register

__all__ = [
    "AGGREGATIONS",
    "EMBEDDINGS",
    "MASKS",
    "TABLE2",
    "TABLE4",
    "DIM1024",
    "LocalModelFileError",
    "NotFittedError",
    "RotationNormalisation",
    "Selective",
    "SelectiveMethod",
    "embedding_dim",
    "default_drop",
    "map_features",
    "mask_cells",
    "pca_basis",
    "resolve_config",
]

_FORMAT_VERSION = 1
MASKS = ("none", "sift", "sum", "max")
EMBEDDINGS = ("fv", "vlad", "temb", "ffaemb")
AGGREGATIONS = ("sum", "mean", "democratic")

#: Hoang et al. 2017, Table 2: every embedding at D = 4224 = D0 - drop. T-emb and F-FAemb as the authors'
#: scripts set them (``option.m``: T-emb drops 128, F-FAemb d(d+1) = 1056 with d = 32, k = 10); FV (2kd) and
#: VLAD (kd) drop nothing, their (d, k) solve the dimension formula (the authors' scripts do not give them).
TABLE2: dict[str, dict[str, int]] = {
    "fv": {"d": 48, "k": 44},  # 2 * 44 * 48 = 4224
    "vlad": {"d": 64, "k": 66},  # 66 * 64 = 4224
    "temb": {"d": 64, "k": 68},  # 68 * 64 - 128 = 4224
    "ffaemb": {"d": 32, "k": 10},  # 10 * 528 - 1056 = 4224
}
#: Hoang et al. 2017, Table 4 (dimensions 512 ... 8064), T-emb: ``k d - 128 = D``, (d, k) of the authors'
#: ``option.m`` ("Recommending values for retained PCA components and codebook size").
TABLE4: dict[int, dict[str, Any]] = {
    512: {"embedding": "temb", "d": 32, "k": 20},
    1024: {"embedding": "temb", "d": 64, "k": 18},
    2048: {"embedding": "temb", "d": 64, "k": 34},
    4096: {"embedding": "temb", "d": 64, "k": 66},
    8064: {"embedding": "temb", "d": 128, "k": 64},
}
#: Every embedding at D = 1024 (this project's comparison size; the paper gives Table 3 at 4224-D only):
#: FV 2kd, VLAD kd, T-emb kd - 128 (= Table 4's 1024-D row). F-FAemb cannot hit 1024 with its d(d+1) drop
#: (k d(d+1)/2 - d(d+1) is never a power of two), so it keeps d = 16, k = 9 and drops 200 leading components.
DIM1024: dict[str, dict[str, int]] = {
    "fv": {"d": 32, "k": 16},  # 2 * 16 * 32 = 1024
    "vlad": {"d": 64, "k": 16},  # 16 * 64 = 1024
    "temb": {"d": 64, "k": 18},  # 18 * 64 - 128 = 1024
    "ffaemb": {"d": 16, "k": 9, "drop": 200},  # 9 * 136 - 200 = 1024
}


class LocalModelFileError(FileFormatError):
    """A saved Selective file is unreadable, damaged, or holds another kind of model."""


# --------------------------------------------------------------------------------------------------
# small helpers


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _map(fmap) -> np.ndarray:
    m = _np(fmap)
    if m.ndim != 3:
        raise ValueError(f"a conv feature map must be (C, H, W), got shape {m.shape}")
    return m


def map_features(fmap) -> np.ndarray:
    """Every cell of a ``(C, H, W)`` map as a local feature: ``(H*W, C)`` float32, row-major cells."""
    m = _map(fmap)
    return np.ascontiguousarray(m.reshape(m.shape[0], -1).T, dtype=np.float32)


def _sample_rows(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0 or x.shape[0] <= n:
        return x
    return x[np.sort(rng.choice(x.shape[0], n, replace=False))]


def _atomic_save(path, arrays: dict[str, np.ndarray]) -> Path:
    return atomic_save_npz(path, **arrays)


def _load(path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    data = load_npz(path, LocalModelFileError, f"{kind} file")
    try:
        found = str(data.get("kind", ""))
        version = int(data.get("format_version", -1))
        settings = json.loads(str(data["settings"]))
    except Exception as exc:  # BadZipFile, ValueError, KeyError, OSError, JSONDecodeError ...
        raise LocalModelFileError(f"{path}: corrupt or unreadable {kind} file ({type(exc).__name__}: {exc})") from exc
    if found != kind:
        raise LocalModelFileError(f"{path}: holds {found or 'no model kind'!r}, expected {kind}")
    if version != _FORMAT_VERSION:
        raise LocalModelFileError(f"{path}: format version {version}, this code reads {_FORMAT_VERSION}")
    return data, settings


# --------------------------------------------------------------------------------------------------
# Hoang et al. 2017


def embedding_dim(embedding: str, d: int, k: int) -> int:
    """Dimension D0 of one embedded feature (and of the aggregated vector) before the rotation normalisation
    drops its leading components: FV 2kd, VLAD and T-emb kd, F-FAemb k d(d+1)/2."""
    if embedding == "fv":
        return 2 * k * d
    if embedding in ("vlad", "temb"):
        return k * d
    if embedding == "ffaemb":
        return _emb.ffaemb_dim(k, d)
    raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")


def default_drop(embedding: str, d: int) -> int:
    """Leading components the rotation normalisation removes (the authors' ``option.m``, "truncate"): 128 for
    T-emb, ``d (d + 1)`` for F-FAemb, none for FV and VLAD."""
    if embedding == "temb":
        return 128
    if embedding == "ffaemb":
        return d * (d + 1)
    if embedding in ("fv", "vlad"):
        return 0
    raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")


def resolve_config(embedding: str, dim: int) -> dict[str, int]:
    """``(d, k, drop)`` of a named output dimension: 4224 = Table 2 (every embedding), 1024 = :data:`DIM1024`
    (every embedding), 512 / 2048 / 4096 / 8064 = Table 4 (T-emb's ``(d, k)``; another embedding keeps them
    and gets its own dimension)."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    dim = int(dim)
    if dim == 4224:
        cfg = dict(TABLE2[embedding])
    elif dim == 1024:
        cfg = dict(DIM1024[embedding])
    elif dim in TABLE4:
        cfg = {"d": TABLE4[dim]["d"], "k": TABLE4[dim]["k"]}
    else:
        raise ValueError(f"no named configuration of {dim} dimensions; choose one of "
                         f"{sorted({4224, 1024, *TABLE4})} or give d and k")
    cfg.setdefault("drop", default_drop(embedding, cfg["d"]))
    return cfg


def mask_cells(fmap, mask: str, keypoints=None, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean (H, W) selection of Hoang et al. 2017 (Sec. 3.1): ``'max'`` (Eq. 2), ``'sum'`` (Eq. 3),
    ``'sift'`` (Eq. 1: the 3x3 cells around each SIFT keypoint; needs ``keypoints`` (N, 2) as (x, y) pixels of
    the image of size ``image_hw`` = (H, W) that produced the map) or ``'none'`` (all cells)."""
    m = _map(fmap)
    if mask == "max":
        return np.asarray(max_mask(m))
    if mask == "sum":
        return np.asarray(sum_mask(m))
    if mask == "sift":
        if keypoints is None or image_hw is None:
            raise ValueError("the SIFT mask needs the image's keypoints and its (H, W) size")
        return sift_mask(keypoints, image_hw, m.shape[1:])
    if mask == "none":
        return np.ones(m.shape[1:], dtype=bool)
    raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS)}")


#: the authors' eigenvalue floor of the embedding whitening: the smallest ``n + 1`` eigenvalues are set to the
#: ``(n + 1)``-th smallest (``param.eigval(end-32:end) = param.eigval(end-32)`` in their ``main.m``); embeddings
#: of fewer than ``4 n`` dimensions (tiny test configurations) floor their smallest quarter instead. F-FAemb
#: needs it: its coefficients sum to 1, so one direction of the centred embedding has no variance at all.
_EIG_FLOOR = {"temb": 32, "ffaemb": 128}


class Selective:
    """Selective conv features (Hoang, Do, Le Tan & Cheung 2017, Sec. 3), as the paper and the authors' code
    define them: mask -> local PCA + L2 -> embedding -> aggregation -> L2 -> rotation normalisation (dropping
    the leading components) -> power-law -> L2.

    ``Selective(mask, embedding, aggregation, d, k, drop=None)``; :meth:`table2` / :meth:`table4` /
    :meth:`dim1024` build the named configurations. ``fit(maps, keypoints=None, image_hws=None)`` learns, on a
    TRAINING collection:

    1. the local PCA to ``d`` (no whitening; features L2-normalised after it) on up to ``features_per_image``
       masked cells per image;
    2. the codebook: k-means centroids (VLAD), anchors (T-emb; F-FAemb: the best of ``anchor_runs`` k-means
       runs by the coding objective, as the authors' ``init_B_by_kmeans.m``), a diagonal GMM (FV);
    3. T-emb and F-FAemb: the embedding whitening of Jégou & Zisserman 2014 (Sec. 2),
       ``phi(x) = Sigma^-1/2 (R(x) - R0)``, with ``R0`` and ``Sigma`` the mean and covariance of the embedded
       training features (up to ``emb_samples`` of them; the authors' eigenvalue floor, :data:`_EIG_FLOOR`);
    4. the rotation normalisation (:class:`~instance_search.fitted.rotation.RotationNormalisation`: a rotation
       onto the leading ``rn_components`` principal axes of the training images' aggregated vectors, completed
       to a full basis) that removes the first ``drop`` coordinates (:func:`default_drop`).

    Per image, vectorised: kept cells ``X`` (N, C) -> ``L2(PCA_d(X))`` -> ``phi`` (N, D0) -> ``psi`` (sum / mean:
    ``sum_i phi_i``; democratic: ``sum_i lambda_i L2(phi_i)``, Murray et al. / J&Z Sec. 3) -> ``L2`` -> RN ->
    ``sign(x)|x|^alpha`` -> ``L2``: ``dim = D0 - drop``. ``'sum'`` and ``'mean'`` give the same vector. When a
    mask keeps no cell every cell is used.
    """

    KIND = "Selective"

    def __init__(self, mask: str = "max", embedding: str = "temb", aggregation: str = "democratic", d: int = 64,
                 k: int = 18, *, drop: int | None = None, alpha: float = 0.5, mu: float = 1e-2,
                 rn_components: int = 1024, features_per_image: int = 100, max_train_features: int = 60_000,
                 emb_samples: int = 20_000, gmm_max_features: int = 10_000, gmm_iter: int = 30,
                 kmeans_iter: int = 20, anchor_runs: int = 5, seed: int = 1234, layer: str = "conv5_3",
                 backbone: str = "vgg16"):
        if mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS)}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        if d < 1 or k < 1 or not alpha > 0 or not mu > 0:
            raise ValueError(f"need d >= 1, k >= 1, alpha > 0, mu > 0; got d={d}, k={k}, alpha={alpha}, mu={mu}")
        self.mask, self.embedding, self.aggregation = mask, embedding, aggregation
        self.d, self.k = int(d), int(k)
        self.drop = default_drop(embedding, self.d) if drop is None else int(drop)
        if not 0 <= self.drop < self.embed_dim:
            raise ValueError(f"cannot drop {self.drop} of {self.embed_dim} dimensions ({embedding}, d={d}, k={k})")
        self.alpha, self.mu, self.rn_components = float(alpha), float(mu), int(rn_components)
        self.features_per_image, self.max_train_features = int(features_per_image), int(max_train_features)
        self.emb_samples, self.gmm_max_features = int(emb_samples), int(gmm_max_features)
        self.gmm_iter, self.kmeans_iter, self.anchor_runs = int(gmm_iter), int(kmeans_iter), int(anchor_runs)
        if self.anchor_runs < 1:
            raise ValueError(f"anchor_runs must be >= 1, got {anchor_runs}")
        self.seed, self.layer, self.backbone = int(seed), str(layer), str(backbone)
        self.pca: LocalPCA | None = None
        self.codebook: KMeansCodebook | GMMCodebook | None = None
        self.emb_mean: np.ndarray | None = None  # (D0,) R0 (T-emb, F-FAemb)
        self.emb_proj: np.ndarray | None = None  # (D0, D0) P_emb = diag(lambda^-1/2) V^T
        self.rot: RotationNormalisation | None = None
        self.trained_on = ""

    # ---------------------------------------------------------------- configurations
    @classmethod
    def table2(cls, embedding: str, mask: str = "max", aggregation: str = "democratic", **kw) -> "Selective":
        """A Table-2 configuration (D = 4224) of Hoang et al. 2017 for ``embedding``."""
        if embedding not in TABLE2:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(TABLE2)}")
        return cls(mask, embedding, aggregation, **{**TABLE2[embedding], **kw})

    @classmethod
    def table4(cls, dim: int, mask: str = "max", aggregation: str = "democratic", **kw) -> "Selective":
        """A Table-4 configuration (D in 512, 1024, 2048, 4096, 8064) of Hoang et al. 2017 (T-emb)."""
        if dim not in TABLE4:
            raise ValueError(f"no Table-4 configuration of {dim} dimensions; choose one of {sorted(TABLE4)}")
        cfg = {**TABLE4[dim], **kw}
        return cls(mask, cfg.pop("embedding"), aggregation, **cfg)

    @classmethod
    def dim1024(cls, embedding: str, mask: str = "max", aggregation: str = "democratic", **kw) -> "Selective":
        """``embedding`` at D = 1024 (:data:`DIM1024`), for the 1024-D version of Table 3."""
        if embedding not in DIM1024:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {', '.join(DIM1024)}")
        return cls(mask, embedding, aggregation, **{**DIM1024[embedding], **kw})

    def __repr__(self) -> str:
        return (f"Selective(mask={self.mask!r}, embedding={self.embedding!r}, aggregation={self.aggregation!r}, "
                f"d={self.d}, k={self.k}, drop={self.drop}, dim={self.dim}, "
                f"{'fitted' if self.fitted else 'unfitted'})")

    @property
    def embed_dim(self) -> int:
        """Dimension D0 of one embedded feature."""
        return embedding_dim(self.embedding, self.d, self.k)

    @property
    def dim(self) -> int:
        """Output dimension ``D0 - drop``."""
        return self.embed_dim - self.drop

    @property
    def whitens_embedding(self) -> bool:
        return self.embedding in ("temb", "ffaemb")

    @property
    def local_fitted(self) -> bool:
        return self.pca is not None and self.codebook is not None and (
            not self.whitens_embedding or self.emb_proj is not None)

    @property
    def fitted(self) -> bool:
        return self.local_fitted and self.rot is not None

    def _need(self, full: bool = True) -> None:
        if not self.local_fitted or (full and not self.fitted):
            raise NotFittedError(f"{self!r}: call fit(train_maps) (or Selective.load / the recipe's "
                                 "load_state_dict) first")

    # ---------------------------------------------------------------- steps
    def select(self, fmap, keypoints=None, image_hw=None) -> np.ndarray:
        """Kept local features (N, C) float32 of one map (all cells when the mask keeps none)."""
        m = _map(fmap)
        keep = mask_cells(m, self.mask, keypoints, image_hw)
        if not keep.any():
            keep = np.ones_like(keep)
        return np.asarray(masked_features(m.astype(np.float32, copy=False), keep), dtype=np.float32)

    def _embed_raw(self, y: torch.Tensor) -> torch.Tensor:
        """Embedding of PCA-reduced, L2-normalised features, before the embedding whitening."""
        cb = self.codebook
        if self.embedding == "vlad":
            return _emb.vlad_embed(y, torch.from_numpy(cb.centroids))
        if self.embedding == "temb":
            return _emb.temb(y, torch.from_numpy(cb.centroids))
        if self.embedding == "ffaemb":
            return _emb.ffaemb(y, torch.from_numpy(cb.centroids), mu=self.mu)
        return _emb.fv_embed(y, cb.means, cb.variances, cb.weights)

    def embed(self, feats) -> torch.Tensor:
        """Local PCA + L2, embedding and (T-emb / F-FAemb) whitening ``P_emb (R(x) - R0)``: (N, C) -> (N, D0)."""
        self._need(full=False)
        y = self.pca.transform(torch.as_tensor(np.asarray(_np(feats), np.float32)))
        e = self._embed_raw(y)
        if self.whitens_embedding:
            e = (e - torch.from_numpy(self.emb_mean)) @ torch.from_numpy(self.emb_proj).T
        return e

    def aggregate(self, E, aggregation: str | None = None) -> np.ndarray:
        """Aggregated, L2-normalised vector (D0,) of embedded features (N, D0). Democratic aggregation
        weighs the L2-normalised embedded features (the authors' ``qdemocratic(L2(phi))``); sum and mean add
        the embedded features as they are."""
        agg = aggregation or self.aggregation
        e = E if isinstance(E, torch.Tensor) else torch.from_numpy(np.asarray(E, np.float32))
        if agg == "democratic":
            e = l2n(e)
        return np.asarray(_np(l2n(_aggregate(e, agg))), np.float32)

    def raw(self, fmap, keypoints=None, image_hw=None) -> np.ndarray:
        """Aggregated vector (D0,) of one map, before rotation normalisation."""
        return self.aggregate(self.embed(self.select(fmap, keypoints, image_hw)))

    def finalize(self, raw) -> np.ndarray:
        """RN (rotation, leading components dropped), power-law and L2: (D0,) -> (dim,), (M, D0) -> (M, dim)."""
        self._need()
        y = self.rot.transform(np.asarray(_np(raw), np.float32))
        return l2n(np.sign(y) * np.abs(y) ** self.alpha).astype(np.float32)

    def encode(self, fmap, keypoints=None, image_hw=None) -> np.ndarray:
        """Global descriptor (dim,) float32, L2-normalised, of one conv map."""
        self._need()
        return self.finalize(self.raw(fmap, keypoints, image_hw))

    def encode_many(self, maps: Sequence, keypoints: Sequence | None = None,
                    image_hws: Sequence | None = None) -> np.ndarray:
        """Descriptors (n, dim) of several maps (with per-map keypoints / image sizes for the SIFT mask)."""
        self._need()
        raws = [self.raw(m, None if keypoints is None else keypoints[i], None if image_hws is None else image_hws[i])
                for i, m in enumerate(maps)]
        return self.finalize(np.stack(raws)) if raws else np.zeros((0, self.dim), np.float32)

    # ---------------------------------------------------------------- learning
    def select_all(self, maps: Sequence, keypoints: Sequence | None = None,
                   image_hws: Sequence | None = None) -> list[np.ndarray]:
        if self.mask == "sift" and (keypoints is None or image_hws is None):
            raise ValueError("fitting with the SIFT mask needs keypoints and image sizes for every training map")
        return [self.select(m, None if keypoints is None else keypoints[i], None if image_hws is None else image_hws[i])
                for i, m in enumerate(maps)]

    def fit(self, maps: Sequence, keypoints: Sequence | None = None, image_hws: Sequence | None = None,
            trained_on: str = "") -> "Selective":
        """Learn every model from a TRAINING collection of conv maps."""
        return self.fit_selected(self.select_all(maps, keypoints, image_hws), trained_on=trained_on)

    def fit_selected(self, selected: Sequence[np.ndarray], trained_on: str = "") -> "Selective":
        """:meth:`fit` from the masked features (N_i, C) of every training image."""
        self.fit_local_selected(selected)
        self.fit_rn(np.stack([self.aggregate(self.embed(s)) for s in selected]))
        self.trained_on = str(trained_on)
        return self

    def fit_local(self, maps: Sequence, keypoints: Sequence | None = None,
                  image_hws: Sequence | None = None) -> "Selective":
        """Steps 1-3 of the class doc from the training maps."""
        return self.fit_local_selected(self.select_all(maps, keypoints, image_hws))

    def fit_local_selected(self, selected: Iterable[np.ndarray]) -> "Selective":
        """Steps 1-3 of the class doc, from sampled masked features of the training images (walked once, in
        order: a generator will do)."""
        rng = np.random.default_rng(self.seed)
        rows = [_sample_rows(np.asarray(s, np.float32), self.features_per_image, rng) for s in selected]
        x = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        x = _sample_rows(x, self.max_train_features, rng)
        need = max(self.k, self.d + 1, 2)
        if x.shape[0] < need:
            raise ValueError(f"only {x.shape[0]} training features: need at least {need}")
        self.pca = LocalPCA(self.d).fit(x)
        y = self.pca.transform(x)
        if self.embedding == "fv":
            self.codebook = GMMCodebook(self.k, max_iter=self.gmm_iter, seed=self.seed).fit(
                _sample_rows(y, self.gmm_max_features, rng))
        elif self.embedding == "ffaemb":  # the authors' init_B_by_kmeans: the best of anchor_runs k-means runs
            runs = [KMeansCodebook(self.k, niter=self.kmeans_iter, seed=self.seed + t).fit(y)
                    for t in range(self.anchor_runs)]
            score = [_emb.ffaemb_objective(y, cb.centroids, _emb.ffaemb_coefficients(y, cb.centroids, self.mu), self.mu)
                     for cb in runs]
            self.codebook = runs[int(np.argmin(score))]
        else:
            self.codebook = KMeansCodebook(self.k, niter=self.kmeans_iter, seed=self.seed).fit(y)
        self.emb_mean = self.emb_proj = None
        if self.whitens_embedding:
            self._fit_embedding_whitening(torch.from_numpy(_sample_rows(y, self.emb_samples, rng)))
        self.rot = None
        return self

    def _fit_embedding_whitening(self, y: torch.Tensor, chunk: int = 2000) -> None:
        """``R0`` and ``P_emb = diag(lambda^-1/2) V^T`` of the embedded features of ``y`` (J&Z 2014, Sec. 2),
        the smallest eigenvalues floored as the authors do; mean and covariance accumulated in float64."""
        n, dim = y.shape[0], self.embed_dim
        total = torch.zeros(dim, dtype=torch.float64)
        for i in range(0, n, chunk):
            total += self._embed_raw(y[i:i + chunk]).double().sum(0)
        mean = total / n
        cov = torch.zeros(dim, dim, dtype=torch.float64)
        for i in range(0, n, chunk):
            e = self._embed_raw(y[i:i + chunk]).double() - mean
            cov += e.T @ e
        lam, vec = eigh_desc((cov / n).numpy())
        floor = _EIG_FLOOR[self.embedding] if dim > 4 * _EIG_FLOOR[self.embedding] else dim // 4
        lam[-(floor + 1):] = lam[-(floor + 1)]
        if not lam[-1] > 1e-12 * lam[0]:
            raise ValueError(f"the {n} embedded training features span too few of the {dim} dimensions to whiten "
                             f"the {self.embedding} embedding; use more training images or a smaller d / k")
        self.emb_mean = mean.float().numpy()
        self.emb_proj = np.ascontiguousarray((vec / np.sqrt(lam)[None, :]).T, dtype=np.float32)

    def fit_rn(self, raw) -> "Selective":
        """Rotation normalisation learned on the aggregated vectors (M, D0) of training images."""
        self._need(full=False)
        r = np.asarray(_np(raw), np.float32)
        if r.ndim != 2 or r.shape[1] != self.embed_dim:
            raise ValueError(f"training vectors must be (M, {self.embed_dim}), got {r.shape}")
        try:
            self.rot = RotationNormalisation(self.drop, components=self.rn_components).fit(r)
        except ValueError as exc:
            raise ValueError(f"{self!r}: {exc}; the rotation normalisation drops {self.drop} components, so it "
                             f"needs more than {self.drop} training images") from exc
        return self

    def with_aggregation(self, aggregation: str) -> "Selective":
        """A copy with another aggregation that shares the fitted local models (its RN must be fitted)."""
        st = self._settings()
        st["aggregation"] = aggregation
        twin = Selective(**st)
        twin.pca, twin.codebook, twin.emb_mean, twin.emb_proj = self.pca, self.codebook, self.emb_mean, self.emb_proj
        return twin

    # ---------------------------------------------------------------- state
    def _settings(self) -> dict[str, Any]:
        return {"mask": self.mask, "embedding": self.embedding, "aggregation": self.aggregation, "d": self.d,
                "k": self.k, "drop": self.drop, "alpha": self.alpha, "mu": self.mu,
                "rn_components": self.rn_components, "features_per_image": self.features_per_image,
                "max_train_features": self.max_train_features, "emb_samples": self.emb_samples,
                "gmm_max_features": self.gmm_max_features, "gmm_iter": self.gmm_iter,
                "kmeans_iter": self.kmeans_iter, "anchor_runs": self.anchor_runs, "seed": self.seed,
                "layer": self.layer, "backbone": self.backbone}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything :meth:`fit` learned, as plain arrays (the settings live with the caller)."""
        self._need()
        arrays = {"pca_mean": self.pca.mean, "pca_components": self.pca.components, "pca_eigvals": self.pca.eigvals}
        if isinstance(self.codebook, KMeansCodebook):
            arrays["cb_centroids"] = self.codebook.centroids
        else:
            arrays.update(cb_means=self.codebook.means, cb_variances=self.codebook.variances,
                          cb_weights=self.codebook.weights)
        if self.whitens_embedding:
            arrays.update(emb_mean=self.emb_mean, emb_proj=self.emb_proj)
        arrays.update(self.rot.state_dict())
        return {k: np.asarray(v) for k, v in arrays.items()}

    def expected_arrays(self) -> dict[str, tuple[int, ...] | None]:
        """Names and shapes of :meth:`state_dict` (None: shape checked by its owner)."""
        want: dict[str, tuple[int, ...] | None] = {"pca_mean": None, "pca_components": None, "pca_eigvals": (self.d,)}
        if self.embedding == "fv":
            want.update(cb_means=(self.k, self.d), cb_variances=(self.k, self.d), cb_weights=(self.k,))
        else:
            want["cb_centroids"] = (self.k, self.d)
        if self.whitens_embedding:
            want.update(emb_mean=(self.embed_dim,), emb_proj=(self.embed_dim, self.embed_dim))
        want.update(rn_mean=(self.embed_dim,), rn_basis=None)
        return want

    def load_state_dict(self, data: Mapping[str, np.ndarray]) -> "Selective":
        """Restore :meth:`state_dict` arrays; ``ValueError`` naming the array that is missing, extra or wrong."""
        want = self.expected_arrays()
        missing = [k for k in want if k not in data]
        extra = sorted(set(data) - set(want))
        if missing or extra:
            raise ValueError(f"state arrays missing {missing} / unexpected {extra} for {self!r}")
        for key, shape in want.items():
            a = np.asarray(data[key])
            if shape is not None and a.shape != shape:
                raise ValueError(f"state array {key!r} has shape {a.shape}, {self!r} needs {shape}")
            if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
                raise ValueError(f"state array {key!r} is not finite numbers")
        pca = LocalPCA(self.d)
        pca.mean = np.asarray(data["pca_mean"], np.float64)
        pca.components = np.asarray(data["pca_components"], np.float64)
        pca.eigvals = np.asarray(data["pca_eigvals"], np.float64)
        pca._validate()
        if self.embedding == "fv":
            cb = GMMCodebook(self.k, max_iter=self.gmm_iter, seed=self.seed)
            cb.means, cb.variances, cb.weights = (np.asarray(data[k], np.float32)
                                                  for k in ("cb_means", "cb_variances", "cb_weights"))
        else:
            cb = KMeansCodebook(self.k, niter=self.kmeans_iter, seed=self.seed)
            cb.centroids = np.asarray(data["cb_centroids"], np.float32)
        cb._validate()
        rot = RotationNormalisation(self.drop, components=self.rn_components).load_state_dict(data)
        self.pca, self.codebook, self.rot = pca, cb, rot
        if self.whitens_embedding:
            self.emb_mean = np.asarray(data["emb_mean"], np.float32)
            self.emb_proj = np.ascontiguousarray(data["emb_proj"], dtype=np.float32)
        return self

    def save(self, path) -> Path:
        """Write the fitted model to ``path`` (.npz, no pickles, atomic)."""
        self._need()
        arrays = {"kind": np.array(self.KIND), "format_version": np.array(_FORMAT_VERSION),
                  "settings": np.array(json.dumps(self._settings())), "trained_on": np.array(self.trained_on),
                  **self.state_dict()}
        return _atomic_save(path, arrays)

    @classmethod
    def load(cls, path) -> "Selective":
        data, st = _load(path, cls.KIND)
        try:
            obj = cls(**st)
            obj.load_state_dict({k: v for k, v in data.items()
                                 if k not in ("kind", "format_version", "settings", "trained_on")})
            obj.trained_on = str(data["trained_on"])
        except (KeyError, ValueError, TypeError) as exc:
            raise LocalModelFileError(f"{path}: inconsistent {cls.KIND} file ({exc})") from exc
        return obj


# --------------------------------------------------------------------------------------------------
# the `selective` recipe


def _int_or_none(v, name: str) -> int | None:
    if v is None:
        return None
    try:
        out = int(v)
    except (TypeError, ValueError):
        raise RecipeError(f"recipe 'selective': {name} must be an integer, got {v!r}") from None
    if out != v and not (isinstance(v, str) and str(out) == v.strip()):
        raise RecipeError(f"recipe 'selective': {name} must be an integer, got {v!r}")
    return out


@register
class SelectiveMethod(Method):
    """``selective``: Hoang et al. 2017's selective conv features as a product recipe (one global vector per
    image, already rotation-normalised, so the collection's PCA-whitening does not apply).

    Options: ``mask`` (none / sift / sum / max), ``embedding`` (fv / vlad / temb / ffaemb), ``aggregation``
    (sum / mean / democratic), ``dim`` (a named configuration, :func:`resolve_config`: 4224 = Table 2,
    1024, 512 / 2048 / 4096 / 8064 = Table 4) or explicit ``d`` and ``k`` (with ``drop`` defaulting to
    :func:`default_drop`), and the fitting budget (``features_per_image``, ``max_train_features``,
    ``emb_samples``, ``rn_components``, ``gmm_iter``, ``kmeans_iter``, ``anchor_runs``, ``seed``), ``alpha``
    (power law),
    ``mu`` (F-FAemb locality). Must be fitted on a training collection (``--fit-on``).
    """

    name = "selective"
    paper = "Hoang et al. 2017, Sec. 3"
    options = {"mask": "max", "embedding": "temb", "aggregation": "democratic", "dim": 1024, "d": None, "k": None,
               "drop": None, "alpha": 0.5, "mu": 1e-2, "rn_components": 1024, "features_per_image": 100,
               "max_train_features": 60_000, "emb_samples": 20_000, "gmm_max_features": 10_000, "gmm_iter": 30,
               "kmeans_iter": 20, "anchor_runs": 5, "seed": 1234}
    needs_fit = True
    whitened = False

    def __init__(self, spec):
        super().__init__(spec)
        self.model: Selective | None = None

    def settings(self) -> dict[str, Any]:
        """The :class:`Selective` settings of this recipe (``dim`` / ``d, k, drop`` resolved)."""
        o = {key: self.option(key) for key in self.options}
        d, k, drop = (_int_or_none(o[x], x) for x in ("d", "k", "drop"))
        dim = _int_or_none(o["dim"], "dim")
        if (d is None) != (k is None):
            raise RecipeError("recipe 'selective': give both d and k, or neither (then dim names a configuration)")
        try:
            if d is None:
                if dim is None:
                    raise ValueError("give dim (a named configuration) or d and k")
                cfg = resolve_config(o["embedding"], dim)
                if drop is not None:
                    cfg["drop"] = drop
            else:
                cfg = {"d": d, "k": k, "drop": default_drop(o["embedding"], d) if drop is None else drop}
        except ValueError as exc:
            raise RecipeError(f"recipe 'selective': {exc}") from None
        rest = {x: o[x] for x in ("mask", "embedding", "aggregation", "alpha", "mu")}
        ints = {x: _int_or_none(o[x], x) for x in ("rn_components", "features_per_image", "max_train_features",
                                                   "emb_samples", "gmm_max_features", "gmm_iter", "kmeans_iter",
                                                   "anchor_runs", "seed")}
        return {**rest, **cfg, **ints, "layer": self.spec.layer or "conv5_3", "backbone": self.spec.backbone}

    def validate(self) -> None:
        try:
            self.model = Selective(**self.settings())
        except ValueError as exc:
            raise RecipeError(f"recipe 'selective': {exc}") from None
        dim = _int_or_none(self.option("dim"), "dim")
        explicit = self.spec.extra.get("dim") is not None and self.spec.extra.get("d") is not None
        if explicit and dim != self.model.dim:
            raise RecipeError(f"recipe 'selective': d={self.model.d}, k={self.model.k}, drop={self.model.drop} give "
                              f"{self.model.dim} dimensions, not dim={dim}")

    def needs(self, default_layer: str) -> Needs:
        return Needs(layers=(self.spec.layer or default_layer,), scales=(1.0,), keypoints=self.option("mask") == "sift")

    @property
    def fitted(self) -> bool:
        return self.model is not None and self.model.fitted

    def _inputs(self, feats: Features):
        fmap = only_map(feats, self.spec.layer)
        if self.model.mask == "sift" and (feats.keypoints is None or feats.image_hw is None):
            raise RecipeError("recipe 'selective' with mask 'sift' needs the image's SIFT keypoints and size "
                              "(Needs.keypoints)")
        return fmap, feats.keypoints, feats.image_hw

    def fit(self, train: Iterable[Features], *, trained_on: str = "") -> None:
        """Fit on a training collection. A re-iterable sequence (e.g. the collection's lazily computed
        ``TrainingFeatures``) is walked twice -- local models, then the aggregated vectors of the rotation
        normalisation -- and nothing but the sampled features is kept; a one-shot iterable is walked once,
        keeping every image's masked features."""
        model = self.model
        try:
            if isinstance(train, Sequence):
                if not len(train):
                    raise RecipeError("recipe 'selective': the training collection is empty")
                model.fit_local_selected(model.select(*self._inputs(f)) for f in train)
                model.fit_rn(np.stack([model.aggregate(model.embed(model.select(*self._inputs(f)))) for f in train]))
                model.trained_on = str(trained_on)
            else:
                selected = [model.select(*self._inputs(f)) for f in train]
                if not selected:
                    raise RecipeError("recipe 'selective': the training collection is empty")
                model.fit_selected(selected, trained_on=trained_on)
        except ValueError as exc:
            if isinstance(exc, RecipeError):
                raise
            raise RecipeError(f"recipe 'selective' cannot be fitted on {trained_on or 'this collection'}: {exc}") from None

    def state_dict(self) -> dict[str, np.ndarray]:
        self.require_fitted()
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        fresh = Selective(**self.settings())
        try:
            fresh.load_state_dict(state)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"recipe 'selective': fitted state does not match {fresh!r}: {exc}") from None
        self.model = fresh

    def local(self, feats: Features) -> np.ndarray:
        self.require_fitted()
        return self.model.encode(*self._inputs(feats))[None]
