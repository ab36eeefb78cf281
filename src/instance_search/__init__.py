"""instance-search: instance-level image retrieval with convolutional networks."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Collection", "Recipe", "Hit", "load_image", "__version__"]


def __getattr__(name):  # lazy: `import instance_search` stays cheap (no torch import)
    if name in ("Collection", "Hit"):
        from . import collection

        return getattr(collection, name)
    if name == "Recipe":
        from .recipes.base import Recipe

        return Recipe
    if name == "load_image":
        from .images import load_image

        return load_image
    raise AttributeError(name)
