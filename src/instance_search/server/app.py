"""The server's earlier single module, split into :mod:`.guard` (request guard, upload checks, decode gate),
:mod:`.service` (the search service) and :mod:`.routes` (FastAPI routes); its names stay importable here."""
from __future__ import annotations

from .guard import (DEFAULT_MAX_UPLOAD_BYTES, UPLOAD_FORMATS, BadRequest, DecodeGate, Guard, UploadRate,  # noqa: F401
                    client_name, probe_image, sanitize_stem, verify_image)
from .routes import create_app, serve  # noqa: F401
from .service import CACHED_THUMB_SIZES, UPLOAD_FOLDER, GroundTruth, SearchService  # noqa: F401
