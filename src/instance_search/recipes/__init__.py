"""Recipes: one module per paper (tolias, ng, hoang, gordo, salvador); :mod:`.base` holds the protocol and the
registry. Importing this package registers every recipe."""
from . import tolias  # noqa: F401,I001  (register the recipes, in the papers' order)
from . import ng  # noqa: F401
from . import hoang  # noqa: F401
from . import gordo  # noqa: F401
from . import salvador  # noqa: F401
from .base import REGISTRY, Features, Method, Needs, Recipe, RecipeError, recipe_names

__all__ = ["Recipe", "Method", "Features", "Needs", "RecipeError", "REGISTRY", "recipe_names"]
