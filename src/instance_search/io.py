"""Files and loops shared by the whole package: crash-safe writes, checksums, the one ``.npz`` reader (never
unpickles), trained-model state files (a plain state dict + a JSON config with its sha256), and the prefetching
map and progress bar of the extraction loops. Imports nothing of the package but :mod:`.errors`; torch and tqdm
are imported only by the functions that need them."""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import FileFormatError, ISearchError

__all__ = ["fsync_dir", "atomic_write_bytes", "atomic_save_npz", "file_sha256", "load_npz", "save_state",
           "read_config", "read_state", "prefetch", "progress_bar"]


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees either the old or the new content, never a mix:
    a temporary file in the same folder, fsynced, renamed over ``path``, then the folder fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``np.savez`` through :func:`atomic_write_bytes` (load it back with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def load_npz(source: str | os.PathLike | bytes, error: type[ISearchError] = FileFormatError, what: str = "file",
             name: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (``source``: its path, or its bytes), read with ``allow_pickle=False`` (an object
    array is refused, never unpickled). A missing, truncated or damaged file, or one holding pickles, raises
    ``error`` (a package error; default :class:`~.errors.FileFormatError`) whose message names the file (``name``,
    default the path) and ``what`` it should be."""
    if not (isinstance(error, type) and issubclass(error, ISearchError)):
        raise TypeError(f"load_npz: error must be a subclass of ISearchError, got {error!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if name is None:
            raise TypeError("load_npz: name the file whose bytes are given (name=...)")
        src = io.BytesIO(bytes(source))
    else:
        src = source
    label = source if name is None else name
    try:
        z = np.load(src, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise error(f"{label}: {what} missing") from exc
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickles, bad header), OSError, EOFError ...
        raise error(f"{label}: {what} corrupt or unreadable ({exc.__class__.__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------------------- model state files
def save_state(module, path: str | os.PathLike, config: dict[str, Any], **info: Any) -> Path:
    """Write ``module``'s plain state dict (``.pt``) and ``config`` as JSON beside it (``.json``), with the state
    file's name and sha256 and any ``info`` (e.g. the training summary). Both writes are atomic."""
    import torch

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
               map_location="cpu", hint: str = "") -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Read a model written by :func:`save_state`: ``(path of the .pt, config, state dict)``. The config is
    checked by :func:`read_config` and the state file against its sha256; the state is read with
    ``torch.load(weights_only=True)`` (no pickled code). Errors (``error``) name the file."""
    import torch

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


# ---------------------------------------------------------------------------------------------- loops
def prefetch(fn: Callable, items: Iterable, ahead: int = 4, workers: int = 2) -> Iterator:
    """``map(fn, items)`` in order, computing up to ``ahead`` results in ``workers`` threads (JPEG decoding
    releases the GIL, so it overlaps with the forward pass). An exception of ``fn`` is raised when its item's
    turn comes."""
    if ahead < 1 or workers < 1:
        raise ValueError(f"prefetch: ahead and workers must be >= 1, got ahead={ahead}, workers={workers}")
    end = object()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = []
        it = iter(items)
        for x in it:
            futures.append(pool.submit(fn, x))
            if len(futures) >= ahead:
                break
        while futures:
            f = futures.pop(0)
            nxt = next(it, end)
            if nxt is not end:
                futures.append(pool.submit(fn, nxt))
            yield f.result()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    """A tqdm bar on stderr (``enabled=False``: a silent one with the same methods)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
