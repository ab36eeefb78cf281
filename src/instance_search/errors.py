"""The package's one error base class: every error instance-search raises for bad input derives from it."""
from __future__ import annotations


class ISearchError(Exception):
    """Base of every instance-search error (the CLI and the server catch this one type)."""
