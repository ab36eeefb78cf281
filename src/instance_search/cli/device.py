"""``--device auto|cpu|cuda`` of the commands that run a network (index, search, serve, eval)."""
from __future__ import annotations

import typer

DEVICES = ("auto", "cpu", "cuda")

DEVICE = typer.Option("auto", "--device", help="auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda.")


def resolve_device(name: str) -> str:
    """The torch device for ``name``: ``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``;
    ``cuda`` without a visible GPU is refused (ValueError naming the option), never silently run on the CPU."""
    key = str(name).strip().lower()
    if key not in DEVICES:
        raise ValueError(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    if key == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if key == "cuda" and not available:
        raise ValueError("--device cuda: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                         "False); use --device cpu or --device auto")
    return "cuda" if available else "cpu"
