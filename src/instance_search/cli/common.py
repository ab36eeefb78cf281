"""What every ``isearch`` command shares: the errors it turns into one line on stderr and exit code 2 (every
package error, :class:`~instance_search.errors.ISearchError`, and the builtins the library still raises for a
user's input: a missing file, an unknown name, a bad value)."""
from __future__ import annotations

from typing import NoReturn

import typer

from ..errors import ISearchError

__all__ = ["ENGINE", "ENGINE_HELP", "EXPECTED_ERRORS", "expected_errors", "message", "fail"]

#: ``--engine`` of the commands that run a network (resolved by ``backbones.fast.resolve_engine``)
ENGINE_HELP = ("auto (winograd for VGG16 and ResNet-50 on the CPU, folded for EfficientNet-Lite0 on the CPU, exact "
               "otherwise) | exact (the fp32 network) | winograd (VGG16: Winograd F(4x4,3x3); ResNet-50: BatchNorm "
               "folded + Winograd 3x3 convs; descriptors agree with exact to cosine >= 0.99999) | folded (ResNet-50: "
               "BatchNorm folded, direct convs; EfficientNet-Lite0: BatchNorm folded, 1x1 convs as matmuls)")
ENGINE = typer.Option("auto", "--engine", help=ENGINE_HELP)

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ISearchError, FileNotFoundError, KeyError, ValueError)


def expected_errors() -> tuple[type[BaseException], ...]:
    """:data:`EXPECTED_ERRORS` (for ``except expected_errors() as exc``)."""
    return EXPECTED_ERRORS


def message(exc: BaseException) -> str:
    """The message of an error; a KeyError's without the quotes that ``str`` adds."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print ``error: msg`` in red on stderr and leave with ``code``."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
