"""HTTP API and a one-page search UI over an index folder (`isearch serve --index DIR`).

>>> from instance_search.server import create_app, serve
>>> app = create_app("my-index")            # a FastAPI app; OpenAPI description at /openapi.json
>>> serve("my-index", port=8000)            # uvicorn on 127.0.0.1:8000

Modules: :mod:`.routes` (the FastAPI routes, ``create_app``, ``serve``), :mod:`.service` (the search service:
index, ground truth, thumbnails, uploads), :mod:`.guard` (what a request may carry: body and upload limits,
token, decode gate). FastAPI, uvicorn and python-multipart are imported only here, so the rest of the library
works without them.
"""
from __future__ import annotations

from .guard import DEFAULT_MAX_UPLOAD_BYTES
from .routes import create_app, serve
from .service import GroundTruth

__all__ = ["create_app", "serve", "GroundTruth", "DEFAULT_MAX_UPLOAD_BYTES"]
