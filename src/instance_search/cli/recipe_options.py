"""The recipe flags shared by `isearch index` and `isearch eval`: each flag is an option of the recipes that
take it (``Method.options``); a flag given to a recipe that does not take it is refused, naming the flag."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..recipes.base import REGISTRY, Recipe, RecipeError, method_class

RECIPE = typer.Option("rmac", "--recipe", help="Recipe name: " + " | ".join(REGISTRY)
                      + " (see `isearch recipes`).")
BACKBONE = typer.Option(None, help="resnet50 | vgg16 | efficientnet-lite0 | googlenet (user-supplied weights); "
                                   "default: the recipe's -- resnet50 for mac / rmac / spoc / gem (measured the most "
                                   "accurate and fastest, docs/results.md), vgg16 (the papers' network) for the others")
LAYER = typer.Option(None, help="Backbone layer (default: the last conv layer); ng-vlad: one or more, comma "
                                "separated (e.g. conv4_3,conv5_1).")
MAX_SIZE = typer.Option(1024, "--max-size", help="Longer image side in pixels (revisitop: 1024).")
SCALES = typer.Option(None, help="Image scales, comma separated: ng-vlad 1 | 2 | 1,2; mac / rmac / spoc / gem "
                                 "multi-scale descriptors, e.g. 1,0.7071,0.5 (must include 1).")
SCALE_POOL = typer.Option(None, "--scale-pool", help="mac / rmac / spoc / gem with --scales: sum (then L2) | gem "
                                                     "(GeM over scales; one-vector recipes).")
SCALE_P = typer.Option(None, "--scale-p", help="--scale-pool gem: the exponent p (3).")
K = typer.Option(None, "--k", help="ng-vlad: VLAD codebook size (paper: 100).")
DIM = typer.Option(None, "--dim", help="ng-vlad: PCA-whitening dimension (paper: 128); selective: the "
                                       "final dimension (Table 2 / Table 4: 512 ... 8064).")
MASK = typer.Option(None, help="selective: none | sift | sum | max (Hoang et al. 2017, Sec. 3).")
EMBEDDING = typer.Option(None, help="selective: fv | vlad | temb | ffaemb.")
AGGREGATION = typer.Option(None, help="selective: sum | mean | democratic.")
POOLING = typer.Option(None, help="ipa: sum | max (Salvador et al. 2016, Sec. 3.1).")
MODEL = typer.Option(None, "--model", help="learned-rmac: a model.pt from `isearch train-rmac`.")
REGIONS = typer.Option(None, help="learned-rmac: R-MAC regions, 'grid' (default) or 'rpn' (needs --rpn).")
RPN = typer.Option(None, "--rpn", help="rpa, learned-rmac --regions rpn: an RPN model from `isearch train-rpn`.")
PROPOSALS = typer.Option(None, help="rpa, learned-rmac --regions rpn: top-k proposals used as regions (256).")
FIT_ON = typer.Option(None, "--fit-on", help="ng-vlad, selective: the TRAINING collection the recipe learns its "
                                             "codebook / PCA / rotation from (a folder, or a benchmark name).")


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"{flag} {text!r}: expected numbers separated by commas, e.g. 1,2") from None
    if not vals or any(not v > 0 for v in vals):
        raise RecipeError(f"{flag} {text!r}: scales must be positive numbers")
    return vals


def build_recipe(recipe: str, backbone: Optional[str], layer: Optional[str], max_size: int, *, scales: Optional[str] = None,
                 scale_pool: Optional[str] = None, scale_p: Optional[float] = None,
                 k: Optional[int] = None, dim: Optional[int] = None, mask: Optional[str] = None,
                 embedding: Optional[str] = None, aggregation: Optional[str] = None, pooling: Optional[str] = None,
                 model: Optional[Path] = None, regions: Optional[str] = None, rpn: Optional[Path] = None,
                 proposals: Optional[int] = None) -> Recipe:
    """A :class:`Recipe` from the command line's flags; a flag that does not belong to ``recipe`` is refused."""
    name = recipe
    cls = method_class(name)
    layers = [x.strip() for x in layer.split(",") if x.strip()] if layer else []
    flags: dict[str, tuple[str, Any]] = {  # option key -> (flag, value)
        "scales": ("--scales", None if scales is None else _floats(scales, "--scales")),
        "scale_pool": ("--scale-pool", scale_pool), "scale_p": ("--scale-p", scale_p),
        "k": ("--k", k), "dim": ("--dim", dim), "mask": ("--mask", mask), "embedding": ("--embedding", embedding),
        "aggregation": ("--aggregation", aggregation), "pooling": ("--pooling", pooling),
        "model": ("--model", None if model is None else str(model)), "regions": ("--regions", regions),
        "rpn": ("--rpn", None if rpn is None else str(rpn)), "proposals": ("--proposals", proposals),
    }
    if len(layers) > 1 or "layers" in cls.options:
        flags["layers"] = ("--layer", layers or None)
    extra: dict[str, Any] = {}
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        if key not in cls.options:
            owners = [n for n, c in REGISTRY.items() if key in c.options]
            raise RecipeError(f"{flag} does not apply to recipe {name!r}"
                              + (f" (it is an option of {', '.join(owners)})" if owners else ""))
        extra[key] = value
    return cls.from_cli(backbone=backbone, layer=layers[0] if layers else None, max_size=max_size, extra=extra)


#: the flags :func:`recipe_flags` adds to a command: (name, type, typer option)
FLAGS: tuple[tuple[str, Any, Any], ...] = (
    ("recipe", str, RECIPE), ("backbone", Optional[str], BACKBONE), ("layer", Optional[str], LAYER),
    ("scales", Optional[str], SCALES), ("scale_pool", Optional[str], SCALE_POOL),
    ("scale_p", Optional[float], SCALE_P), ("k", Optional[int], K), ("dim", Optional[int], DIM),
    ("mask", Optional[str], MASK), ("embedding", Optional[str], EMBEDDING),
    ("aggregation", Optional[str], AGGREGATION), ("pooling", Optional[str], POOLING),
    ("model", Optional[Path], MODEL), ("regions", Optional[str], REGIONS), ("rpn", Optional[Path], RPN),
    ("proposals", Optional[int], PROPOSALS),
)


def recipe_flags(command: Callable) -> Callable:
    """Decorator: give a typer command every recipe flag of :data:`FLAGS`; the command receives them as one
    argument ``recipe_flags`` (a dict) and makes the recipe with ``build_recipe(max_size=..., **recipe_flags)``."""
    sig = inspect.signature(command)
    if "recipe_flags" not in sig.parameters:
        raise TypeError(f"{command.__name__}: a command using @recipe_flags takes a 'recipe_flags' argument")
    own = [p for name, p in sig.parameters.items() if name != "recipe_flags"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=typ)
             for name, typ, opt in FLAGS]
    names = [name for name, _, _ in FLAGS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        flags = {name: kwargs.pop(name) for name in names}
        return command(recipe_flags=flags, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
                                        + added)
    hints = {k: v for k, v in getattr(command, "__annotations__", {}).items() if k != "recipe_flags"}
    wrapper.__annotations__ = {**hints, **{name: typ for name, typ, _ in FLAGS}}
    del wrapper.__wrapped__  # typer must read the new signature, not the command's
    return wrapper
