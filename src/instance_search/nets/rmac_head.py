"""Learned R-MAC: R-MAC written as differentiable network layers (Gordo, Almazán, Revaud & Larlus 2016,
"Deep Image Retrieval: Learning global representations for image search", ECCV, Sec. 3.1, Fig. 2).

The non-learned R-MAC of Tolias et al. (2016, Sec. 3) -- regional MACs, L2, PCA-whitening, L2, sum, L2 --
becomes a chain of layers whose weights can be trained with a ranking loss (see :mod:`instance_search.train.triplet`):

    conv layers ─▶ RoI max-pooling of each region R ─▶ L2 ─▶ shift + fully connected (W (x + s)) ─▶ L2
               ─▶ sum over regions ─▶ L2                                        (Gordo Sec. 3.1)

The shift ``s`` and the FC weights ``W`` are initialised from a PCA-whitening (``s = -mean``,
``W = diag(scale) V^T`` of :class:`~instance_search.fitted.whitening.PCAWhitening`), so that before training
the network's output equals :func:`instance_search.ops.pooling.rmac` with that whitening (tests/nets/test_rmac_net.py:
to 1e-5 on real images). With the default identity initialisation it is the unwhitened R-MAC.

Regions are an argument: ``None`` gives the rigid R-MAC grid (:func:`~instance_search.ops.pooling.rmac_regions`)
of each map; an (R, 4) array of ``(x, y, w, h)`` feature-map cells is shared by a batch; a list gives each image
its own regions (e.g. region proposals, converted from image pixels by
:func:`~instance_search.ops.boxes.boxes_to_cells`).

Which layers train is a choice (``train_layers``): the part of VGG16 below the trainable layers is frozen and
not part of this module -- its output (the *input tap*, e.g. pool4 for ``"conv5"``) is computed once by the
backbone and can be cached (:class:`~instance_search.train.triplet.InputCache`), so that a training epoch only
runs the trainable layers. A trained model is saved as a plain state dict (``.pt``, read back with
``torch.load(weights_only=True)``) plus a JSON config next to it (``.json``).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import FileFormatError
from ..backbones.vgg16 import VGG16, VGG16_CHANNELS, VGG16_STRIDES
from ..ops.pooling import region_macs, rmac_regions
from ..io import read_config as _read_config
from ..io import read_state, save_state
from ..fitted.whitening import PCAWhitening

__all__ = ["TRAIN_LAYERS", "INPUT_LAYER", "RMACHead", "RMACNet", "learned_rmac_regions", "learned_rmac",
           "fit_head_whitening", "save_model", "load_model", "read_config", "ModelFileError", "apply_to_backbone"]

_FORMAT = "instance_search.LearnedRMAC"
_FORMAT_VERSION = 1

#: ``train_layers`` option -> the VGG16 tap whose output is the network's input (everything below is frozen).
INPUT_LAYER: dict[str, str] = {
    "head": "conv5_3",  # only shift + FC train; the conv5_3 maps are fixed
    "conv5_3": "conv5_2",  # conv5_3 + head
    "conv5": "pool4",  # conv5_1..conv5_3 + head (the default here)
    "conv4": "pool3",  # conv4_1..conv5_3 + head
    "all": "image",  # every conv layer + head; the input is the preprocessed image
}
TRAIN_LAYERS = tuple(INPUT_LAYER)


class ModelFileError(FileFormatError):
    """A learned R-MAC model file (``.pt`` + ``.json``) that is missing parts, damaged or inconsistent."""


# ------------------------------------------------------------------------------------------------ functional core
def _l2(x: torch.Tensor, eps: float) -> torch.Tensor:
    """L2 normalisation inside the trained head, with the head's own ``eps`` (stored with the model, part of what
    was trained); torch's ``F.normalize``. Everything outside networks uses :func:`~instance_search.ops.l2n`."""
    return torch.nn.functional.normalize(x, p=2, dim=-1, eps=eps)


def learned_rmac_regions(X: torch.Tensor, regions, shift: torch.Tensor | None = None,
                         weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Projected region vectors ``L2( W (L2(f_R) + s) )`` (Gordo et al. 2016, Sec. 3.1).

    ``X``: (B, C, H, W) or (C, H, W); ``regions``: (R, 4) cells shared by the batch; ``shift``: (C,) or None
    (no shift); ``weight``: (D, C) or None (identity). Returns (B, R, D) or (R, D)."""
    v = _l2(region_macs(X, regions), eps)  # RoI max-pooling with a 1x1 output: the MAC of each region
    if shift is not None:
        v = v + shift
    if weight is not None:
        v = v @ weight.T
    return _l2(v, eps)


def learned_rmac(X: torch.Tensor, regions=None, shift: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Learned R-MAC vector ``L2( sum_R L2( W (L2(f_R) + s) ) )`` (Gordo et al. 2016, Sec. 3.1, Fig. 2).

    ``X``: (B, C, H, W) -> (B, D), or (C, H, W) -> (D,). ``regions``: None (the R-MAC grid of Tolias et al.
    2016 with ``levels`` scales), an (R, 4) cell array shared by the batch, or a list of per-image arrays.
    With ``s = -mean`` and ``W`` the PCA-whitening projection this is :func:`~instance_search.ops.pooling.rmac`."""
    single = X.ndim == 3
    if single:
        X = X[None]
        if regions is not None and not isinstance(regions, (list, tuple)):
            regions = [regions]
    if X.ndim != 4:
        raise ValueError(f"expected a (C, H, W) or (B, C, H, W) feature map, got shape {tuple(X.shape)}")
    if isinstance(regions, (list, tuple)):
        if len(regions) != X.shape[0]:
            raise ValueError(f"got {len(regions)} region lists for a batch of {X.shape[0]} maps")
        out = torch.stack([_l2(learned_rmac_regions(X[b], r, shift, weight, eps).sum(dim=0), eps)
                           for b, r in enumerate(regions)])
    else:
        if regions is None:
            regions = rmac_regions(X.shape[-2], X.shape[-1], levels=levels)
        out = _l2(learned_rmac_regions(X, regions, shift, weight, eps).sum(dim=1), eps)
    return out[0] if single else out


# ------------------------------------------------------------------------------------------------ modules
class RMACHead(nn.Module):
    """RoI max-pooling + L2 + shift + FC + L2 + sum + L2 on a conv map (Gordo et al. 2016, Sec. 3.1).

    Parameters: ``shift`` (C,) and ``fc.weight`` (D, C) (no bias: the shift plays its role, ``W (x + s)``).
    Initialised to zero shift and identity (the unwhitened R-MAC) when ``D == C``; use
    :meth:`init_from_whitening` for the PCA-whitening initialisation of the paper."""

    def __init__(self, in_dim: int = 512, out_dim: int = 512, levels: int = 3, eps: float = 1e-6):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"RMACHead: dimensions must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        if levels < 1:
            raise ValueError(f"R-MAC needs at least one level, got levels={levels}")
        self.in_dim, self.out_dim, self.levels, self.eps = int(in_dim), int(out_dim), int(levels), float(eps)
        self.shift = nn.Parameter(torch.zeros(in_dim))
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            k = min(in_dim, out_dim)
            self.fc.weight[:k, :k] = torch.eye(k)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, levels={self.levels}"

    @torch.no_grad()
    def init_from_whitening(self, whitening: PCAWhitening) -> "RMACHead":
        """``s = -mean``, ``W = diag(scale) V^T``: the head then computes R-MAC with this PCA-whitening."""
        if not getattr(whitening, "is_fitted", False):
            raise ValueError("RMACHead.init_from_whitening: the whitening is not fitted")
        if whitening.in_dim != self.in_dim or whitening.dim != self.out_dim:
            raise ValueError(f"whitening {whitening.in_dim}->{whitening.dim} does not fit a head "
                             f"{self.in_dim}->{self.out_dim}")
        self.shift.copy_(torch.as_tensor(-whitening.mean, dtype=self.shift.dtype))
        self.fc.weight.copy_(torch.as_tensor(whitening.projection, dtype=self.fc.weight.dtype))
        return self

    def region_vectors(self, fmap: torch.Tensor, regions=None) -> torch.Tensor:
        """(R, D) projected, L2-normalised region vectors of one (C, H, W) map (the grid when ``regions`` is None)."""
        if fmap.ndim != 3:
            raise ValueError(f"expected one (C, H, W) feature map, got shape {tuple(fmap.shape)}")
        if regions is None:
            regions = rmac_regions(fmap.shape[-2], fmap.shape[-1], levels=self.levels)
        return learned_rmac_regions(fmap, regions, self.shift, self.fc.weight, self.eps)

    def forward(self, fmap: torch.Tensor, regions=None) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) (or (C, H, W) -> (D,)) learned R-MAC vectors."""
        if fmap.shape[-3] != self.in_dim:
            raise ValueError(f"RMACHead expects {self.in_dim}-channel maps, got shape {tuple(fmap.shape)}")
        return learned_rmac(fmap, regions, self.shift, self.fc.weight, levels=self.levels, eps=self.eps)


def _tap_position(order: list[str], tap: str) -> int:
    if tap.startswith("conv"):
        tap = "relu" + tap[4:]
    return order.index(tap)


class RMACNet(nn.Module):
    """The trainable part of learned R-MAC on VGG16: the conv layers above the frozen part + :class:`RMACHead`.

    ``forward(x, regions=None)``: ``x`` (B, C_in, H, W) is the output of the frozen part at :attr:`input_layer`
    (pool4 for ``train_layers="conv5"``; the preprocessed image for ``"all"``) -> (B, D) descriptors.
    The conv weights come from :meth:`init_from_backbone` (ImageNet VGG16) or a saved state dict."""

    def __init__(self, train_layers: str = "conv5", out_dim: int = 512, levels: int = 3):
        super().__init__()
        if train_layers not in INPUT_LAYER:
            raise ValueError(f"unknown train_layers {train_layers!r}; choose one of {', '.join(TRAIN_LAYERS)}")
        self.train_layers = train_layers
        self.input_layer = INPUT_LAYER[train_layers]
        vgg = VGG16()
        order = list(vgg._order)
        start = 0 if self.input_layer == "image" else _tap_position(order, self.input_layer) + 1
        end = order.index("relu5_3") + 1
        children = dict(vgg.features.named_children())
        self.trunk = nn.Sequential(OrderedDict((n, children[n]) for n in order[start:end]))
        self.head = RMACHead(512, out_dim, levels)
        self.backbone_weights_sha256 = ""  # of the VGG16 weights whose frozen part feeds this network

    @property
    def in_channels(self) -> int:
        return 3 if self.input_layer == "image" else VGG16_CHANNELS[self.input_layer]

    @property
    def input_stride(self) -> int:
        """Pixels of the image per cell of the input map."""
        return 1 if self.input_layer == "image" else VGG16_STRIDES[self.input_layer]

    @property
    def conv_names(self) -> list[str]:
        return [n for n, m in self.trunk.named_children() if isinstance(m, nn.Conv2d)]

    def config(self) -> dict[str, Any]:
        return {"format": _FORMAT, "format_version": _FORMAT_VERSION, "backbone": "vgg16",
                "backbone_weights_sha256": self.backbone_weights_sha256, "train_layers": self.train_layers,
                "input_layer": self.input_layer, "levels": self.head.levels, "in_dim": self.head.in_dim,
                "out_dim": self.head.out_dim, "output_layer": "conv5_3"}

    @torch.no_grad()
    def init_from_backbone(self, backbone) -> "RMACNet":
        """Copy the ImageNet weights of the trainable conv layers from a loaded VGG16 backbone."""
        if getattr(backbone, "name", None) != "vgg16":
            raise ValueError(f"learned R-MAC is built on vgg16, got backbone {getattr(backbone, 'name', backbone)!r}")
        src = dict(backbone.net.features.named_children())
        for name in self.conv_names:
            mine = getattr(self.trunk, name)
            mine.weight.copy_(src[name].weight)
            mine.bias.copy_(src[name].bias)
        self.backbone_weights_sha256 = str(getattr(backbone.weights, "sha256", "") or "")
        return self

    def conv_map(self, x: torch.Tensor) -> torch.Tensor:
        """conv5_3 (post-ReLU) maps of a batch of input-tap maps."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RMACNet({self.train_layers}) expects (B, {self.in_channels}, H, W) "
                             f"{self.input_layer} maps, got shape {tuple(x.shape)}")
        return self.trunk(x) if len(self.trunk) else x

    def forward(self, x: torch.Tensor, regions=None) -> torch.Tensor:
        return self.head(self.conv_map(x), regions)

    def conv_maps(self, inputs: Sequence[torch.Tensor], batch: int = 16):
        """Yield ``(i, conv5_3 map (C, H, W))`` for every input map, running maps of equal size as one batch
        (at most ``batch`` at a time); the order follows the size groups."""
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(inputs):
            groups.setdefault(tuple(t.shape), []).append(i)
        dev = self.head.shift.device
        step = max(1, int(batch))
        for idx in groups.values():
            for k in range(0, len(idx), step):
                part = idx[k:k + step]
                x = torch.stack([torch.as_tensor(inputs[i]) for i in part]).to(dev, torch.float32)
                for i, fmap in zip(part, self.conv_map(x)):
                    yield i, fmap

    def embed(self, inputs: Sequence[torch.Tensor], regions: Sequence | None = None, batch: int = 16) -> torch.Tensor:
        """(N, D) descriptors of N input maps (C_in, H, W) of any sizes (equal sizes run as one batch of at most
        ``batch``); ``regions``: None (grid) or one (R_i, 4) cell array per input. Gradients flow when enabled
        (training); wrap in ``torch.no_grad()`` to describe."""
        n = len(inputs)
        if regions is not None and len(regions) != n:
            raise ValueError(f"embed: {len(regions)} region arrays for {n} inputs")
        if n == 0:
            return torch.zeros(0, self.head.out_dim)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(inputs):
            groups.setdefault(tuple(t.shape), []).append(i)
        dev = self.head.shift.device
        step = max(1, int(batch))
        out: list = [None] * n
        for idx in groups.values():
            for k in range(0, len(idx), step):
                part = idx[k:k + step]
                x = torch.stack([torch.as_tensor(inputs[i]) for i in part]).to(dev, torch.float32)
                regs = None if regions is None else [regions[i] for i in part]
                for i, v in zip(part, self(x, regs)):
                    out[i] = v
        return torch.stack(out)


# ------------------------------------------------------------------------------------------------ initialisation
@torch.no_grad()
def fit_head_whitening(net: RMACNet, inputs: Sequence[torch.Tensor], trained_on: str = "", batch: int = 16,
                       progress: bool = True) -> PCAWhitening:
    """Learn PCA-whitening on the L2-normalised regional MACs (grid regions) of ``inputs`` with the network's
    current conv layers and install it in the head (Gordo et al. 2016, Sec. 3.1: the shift + FC layers are
    initialised from PCA-whitening). Returns the whitening."""
    from tqdm.auto import tqdm

    rows: list = [None] * len(inputs)
    bar = tqdm(total=len(inputs), desc="regional MACs for PCA", disable=not progress, unit="img", dynamic_ncols=True)
    for i, fmap in net.conv_maps(inputs, batch=batch):
        regs = rmac_regions(fmap.shape[-2], fmap.shape[-1], levels=net.head.levels)
        rows[i] = _l2(region_macs(fmap, regs), net.head.eps).cpu().numpy()
        bar.update(1)
    bar.close()
    X = np.concatenate(rows)
    shrink = "auto" if len(X) < 2 * X.shape[1] else 0.0  # Ledoit-Wolf when the regions are few for the dimension
    w = PCAWhitening().fit(X.astype(np.float32), dim=net.head.out_dim, shrinkage=shrink,
                           trained_on=trained_on or f"{len(inputs)} images, {len(X)} regions")
    net.head.init_from_whitening(w)
    return w


# ------------------------------------------------------------------------------------------------ files
def save_model(net: RMACNet, path: str | os.PathLike, **info: Any) -> Path:
    """Save ``net`` as a plain state dict at ``path`` (``.pt``) and its JSON config at ``path`` with ``.json``
    (architecture, backbone weights, the state file's sha256, and any ``info`` such as the training summary)."""
    return save_state(net, path, net.config(), **info)


_WHAT, _HINT = "learned R-MAC", "written by `isearch train-rmac`"


def _check_keys(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    for key in ("train_layers", "levels", "out_dim", "state_sha256"):
        if key not in cfg:
            raise ModelFileError(f"{path.with_suffix('.json')}: model config lacks {key!r}")
    return cfg


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a saved model (``path`` is the ``.pt`` file or its ``.json``)."""
    return _check_keys(Path(path), _read_config(path, _FORMAT, ModelFileError, _WHAT, _FORMAT_VERSION, _HINT))


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[RMACNet, dict[str, Any]]:
    """Read a model written by :func:`save_model` (``torch.load(weights_only=True)``: no pickled code).
    Returns ``(net, config)``. Errors name the file."""
    path, cfg, state = read_state(path, _FORMAT, ModelFileError, _WHAT, _FORMAT_VERSION, map_location, _HINT)
    _check_keys(path, cfg)
    try:
        net = RMACNet(cfg["train_layers"], out_dim=int(cfg["out_dim"]), levels=int(cfg["levels"]))
    except ValueError as exc:
        raise ModelFileError(f"{path.with_suffix('.json')}: {exc}") from exc
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: state dict does not fit the config ({str(exc)[:300]})") from exc
    net.backbone_weights_sha256 = str(cfg.get("backbone_weights_sha256", ""))
    net.eval()
    return net.to(map_location), cfg


@torch.no_grad()
def apply_to_backbone(net: RMACNet, backbone) -> None:
    """Copy the trained conv layers of ``net`` into a loaded VGG16 ``backbone`` (``backbone.net``), so that its
    conv5_3 maps are the trained network's. The backbone must carry the ImageNet weights the model was trained
    on (the frozen part of the network)."""
    if getattr(backbone, "name", None) != "vgg16":
        raise ValueError(f"a learned R-MAC model needs the vgg16 backbone, got {getattr(backbone, 'name', backbone)!r}")
    have = str(getattr(backbone.weights, "sha256", "") or "")
    if net.backbone_weights_sha256 and have and have != net.backbone_weights_sha256:
        raise ValueError(f"the model was trained on VGG16 weights {net.backbone_weights_sha256[:16]}…, but the "
                         f"backbone has {have[:16]}… ({backbone.weights.path}); load the same weights")
    dst = dict(backbone.net.features.named_children())
    for name in net.conv_names:
        dst[name].weight.copy_(getattr(net.trunk, name).weight.to(dst[name].weight.device))
        dst[name].bias.copy_(getattr(net.trunk, name).bias.to(dst[name].bias.device))
