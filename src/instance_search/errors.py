"""The package's errors. Every error instance-search raises on purpose derives from :class:`ISearchError`, so the
CLI and the server catch one type; each class also keeps a builtin base (``ValueError`` or ``RuntimeError``) so
code that catches the builtin keeps working.

* :class:`InputError` — an argument, image, box or option a user gave is unusable.
* :class:`FileFormatError` — a file is missing parts, damaged, of another format or version, or does not match
  its checksum. The per-file errors of the modules (``ModelFileError``, ``CodebookFileError``, ...) derive from it.
* :class:`CorruptIndexError` — an index folder is missing, damaged or not an index.
* :class:`NotFittedError` — a fitted model (whitening, codebook, ...) was used before ``fit``.

Every message names the input or the file at fault.
"""
from __future__ import annotations

__all__ = ["ISearchError", "InputError", "FileFormatError", "CorruptIndexError", "NotFittedError"]


class ISearchError(Exception):
    """Base of every instance-search error (the CLI and the server catch this one type)."""


class InputError(ISearchError, ValueError):
    """An input given by the user (argument, image, box, option) cannot be used; the message names it."""


class FileFormatError(ISearchError, ValueError):
    """A file is unreadable, damaged, of another format or version, or fails its checksum; the message names it."""


class CorruptIndexError(ISearchError, RuntimeError):
    """An index folder is missing, damaged, or not an instance-search index; the message names the file."""


class NotFittedError(ISearchError, RuntimeError):
    """A model that learns from data (whitening, codebook, ...) was used before it was fitted."""
