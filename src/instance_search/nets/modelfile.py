"""Trained models on disk: a plain state dict (``.pt``, read with ``torch.load(weights_only=True)``: no pickled
code) and a JSON config beside it (``.json``) holding the architecture, the format and the state file's sha256.
Shared by the learned R-MAC (:mod:`.rmac_net`), the RPN (:mod:`.rpn`) and the detector (:mod:`.finetune`)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..io import atomic_write_bytes, file_sha256

__all__ = ["save_state", "read_config", "read_state"]


def save_state(module: nn.Module, path: str | os.PathLike, config: dict[str, Any], **info: Any) -> Path:
    """Write ``module``'s plain state dict (``.pt``) and ``config`` as JSON beside it (``.json``), with the state
    file's name and sha256 and any ``info`` (e.g. the training summary). Both writes are atomic."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{path}: give the .pt path of the model (its config is written next to it)")
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    cfg = dict(config, state_file=path.name, state_sha256=file_sha256(path), **info)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(cfg, indent=1, default=str).encode())
    return path


def read_config(path: str | os.PathLike, fmt: str, error: type[Exception], what: str, version: int = 1,
                hint: str = "") -> dict[str, Any]:
    """The JSON config of a model written by :func:`save_state` (``path``: the ``.pt`` file or its ``.json``);
    it must have format ``fmt`` and version <= ``version``. Errors (``error``) name the file; ``hint`` says where
    such models come from."""
    cpath = Path(path).with_suffix(".json")
    if not cpath.is_file():
        raise FileNotFoundError(f"{cpath}: {what} config not found (a model is a .pt file with a .json beside "
                                f"it{', ' + hint if hint else ''})")
    try:
        cfg = json.loads(cpath.read_text())
    except (OSError, ValueError) as exc:
        raise error(f"{cpath}: unreadable {what} config ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        raise error(f"{cpath}: not a {what} config (format {fmt!r} expected)")
    if int(cfg.get("format_version", 0)) > version:
        raise error(f"{cpath}: {what} format {cfg.get('format_version')} is newer than supported")
    return cfg


def read_state(path: str | os.PathLike, fmt: str, error: type[Exception], what: str, version: int = 1,
               map_location: str | torch.device = "cpu", hint: str = ""
               ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model written by :func:`save_state`: ``(path of the .pt, config, state dict)``. The config is
    checked by :func:`read_config` and the state file against its sha256. Errors (``error``) name the file."""
    path = Path(path).with_suffix(".pt")
    cfg = read_config(path, fmt, error, what, version, hint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} model file not found")
    if file_sha256(path) != cfg.get("state_sha256"):
        raise error(f"{path}: the state file does not match its config {path.with_suffix('.json').name} "
                    f"(sha256 differs): damaged, or from another training run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling / zip errors
        raise error(f"{path}: not a readable {what} state dict ({type(exc).__name__}: {exc})") from exc
    return path, cfg, state
