"""Recipes: one module per paper; :mod:`.base` holds the protocol and the registry."""
from .base import Recipe

__all__ = ["Recipe"]
