"""Every error class of the package derives from ISearchError (issue 12, section 2), so the CLI and the server
catch one type; each keeps its builtin base so that code catching ValueError / RuntimeError still works."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import instance_search
from instance_search.errors import CorruptIndexError, FileFormatError, InputError, ISearchError, NotFittedError

# Exception classes that are not errors of the package's API: raised and caught inside one module for control
# flow, never reaching a caller.
PRIVATE_CONTROL_FLOW = {
    # the web server's request checks: raised by the upload / body guards and turned into an HTTP status and a
    # message by the route or middleware that called them (deriving them from ISearchError would let a generic
    # handler between the two answer them)
    "instance_search.server.guard.BadRequest": "answered by the routes as an HTTP error (status carried)",
    "instance_search.server.guard.BodyTooLarge": "caught by the body-limit middleware, answered 413",
    # a map file vanished under a reader (a compaction replaced it): caught in store.py, which reloads the
    # catalogue once and otherwise raises CorruptIndexError naming the file
    "instance_search.index.store._MapFileGone": "caught inside IndexStore, re-raised as CorruptIndexError",
}


def _package_exceptions():
    """Every exception class defined in a module of the package: each ``.py`` file under the package folder is
    imported (``pkgutil.walk_packages`` would skip the modules of a folder without ``__init__.py``)."""
    root = Path(instance_search.__file__).parent
    found = {}
    for f in sorted(root.rglob("*.py")):
        parts = ("instance_search",) + f.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found[f"{name}.{obj.__qualname__}"] = obj
    return found


def test_every_package_error_derives_from_isearch_error():
    found = _package_exceptions()
    assert len(found) >= 20 and "instance_search.index.compact.CompactMapError" in found, sorted(found)
    stray = [name for name, cls in found.items()
             if not issubclass(cls, ISearchError) and name not in PRIVATE_CONTROL_FLOW]
    assert not stray, f"error classes outside the ISearchError hierarchy: {stray}"
    assert any(name in found for name in PRIVATE_CONTROL_FLOW)  # the exemptions name real classes


def test_builtin_bases_are_kept():
    from instance_search.backbones.weights import WeightsError
    from instance_search.fitted.codebook import CodebookFileError
    from instance_search.fitted.whitening import WhiteningFileError
    from instance_search.images import BoxError, ImageError
    from instance_search.index.compact import CompactMapError
    from instance_search.index.store import CorruptIndexError as StoreCorrupt

    for cls in (ImageError, BoxError, InputError):
        assert issubclass(cls, ValueError) and issubclass(cls, InputError)
    for cls in (CodebookFileError, WhiteningFileError, CompactMapError, FileFormatError):
        assert issubclass(cls, ValueError) and issubclass(cls, FileFormatError)
    assert StoreCorrupt is CorruptIndexError and issubclass(CorruptIndexError, RuntimeError)
    assert issubclass(NotFittedError, RuntimeError)
    assert issubclass(WeightsError, ISearchError)
    assert not hasattr(importlib.import_module("instance_search.index.store"), "IndexError_")


def test_cli_turns_a_package_error_into_one_line(tmp_path):
    from typer.testing import CliRunner

    from instance_search.cli import app

    res = CliRunner().invoke(app, ["search", str(tmp_path / "q.jpg"), "--index", str(tmp_path / "none")])
    assert res.exit_code != 0
    assert "Traceback" not in res.output and str(tmp_path / "none") in res.output


@pytest.mark.parametrize("cls", [InputError, FileFormatError, CorruptIndexError, NotFittedError])
def test_one_except_clause_catches_them_all(cls):
    with pytest.raises(ISearchError, match="named"):
        raise cls("the input named here")
