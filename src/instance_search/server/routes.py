"""FastAPI app over one index folder: search by uploaded image (+ box) or by an indexed image, add images,
thumbnails, stats, and the single search page.

Endpoints (all JSON except ``/`` and thumbnails; errors are ``{"detail": "..."}``):

* ``POST /api/search``  multipart: ``image`` (file) *or* ``query_id`` (an indexed id); optional ``box``
  ``"x1,y1,x2,y2"`` in pixels of the query image (or of a scaled copy of size ``box_frame`` ``"W,H"``), ``top``
  (1..max_top) and ``options`` (a JSON object of extra keyword arguments that ``Collection.search`` accepts).
* ``POST /api/images``  multipart: one or more ``files``; each is checked to be a decodable image, stored
  under ``<index>/uploads/`` with a sanitised name and indexed (all-or-nothing validation); at most
  ``max_files`` per request, ``uploads_per_minute`` per minute (429).
* ``GET /api/images``   a page of indexed images (id, name, group, thumbnail URL) to pick queries from;
  ``offset``, ``limit``, ``name`` (file names containing it).
* ``DELETE /api/images/{id}``  take an image out of the index (403 read-only, cross-origin refused by the guard).
* ``GET /api/original/{id}``   the indexed image's file, full size.
* ``GET /api/stats``    what the index holds and the server's limits.
* ``GET /api/thumbnail/{id}?size=256``  JPEG thumbnail of an *indexed* image, looked up by id only (at most
  512 px; made once from the original and stored in ``<index>/thumbs/``).
* ``GET /``             the page; ``GET /openapi.json`` the OpenAPI description; ``GET /docs`` Swagger UI (assets
  from the ``swagger-ui-bundle`` package, offline).

``POST /api/search`` answers ``timings`` per stage in ms: ``upload_ms``, ``wait_ms``, ``decode_ms``,
``network_ms`` (none for an indexed query without a box: its stored vector and map are used), ``search_ms``,
``rerank_ms``, ``qe_ms``, ``server_ms``.

Nothing here unpickles, evals or opens a client-supplied path. Searches and additions share one lock (the
backbone and FAISS index are not meant for concurrent mutation); every decode runs under the decode gate
(server/guard.py). Images added by other processes (``isearch index``) are picked up on the next request.
"""
from __future__ import annotations

import ipaddress
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response

from ..images import BoxError, ImageError, parse_box
from ..index.store import WriterBusyError
from .guard import (DEFAULT_MAX_DECODES, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PIXEL_BUDGET, DEFAULT_UPLOADS_PER_MINUTE,
                    BadRequest, Guard, copy_limited, parse_frame, client_name, limit_native_memory,
                    probe_image)
from .service import SearchService

STATIC = Path(__file__).resolve().parent / "static"


def create_app(index_dir: str | os.PathLike, *, ground_truth=None, allow_uploads: bool = True,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_files: int = 32, max_top: int = 100,
               show_paths: bool = False, allowed_hosts: list[str] | None = None, weights: str | None = None,
               device: str = "cpu", token: str | None = None, max_decodes: int = DEFAULT_MAX_DECODES,
               pixel_budget: int = DEFAULT_PIXEL_BUDGET, uploads_per_minute: int = DEFAULT_UPLOADS_PER_MINUTE,
               engine: str = "auto"):
    """A FastAPI app serving the index at ``index_dir``.

    ``ground_truth``: ``None``, ``"ukbench"``, a dict or a JSON file ``{"groups": {path_or_name: group}}``;
    with it every hit says whether it shows the query's object and the response carries precision@k.
    ``allow_uploads=False`` opens the index read-only and refuses ``POST /api/images`` (403).
    ``max_upload_bytes`` caps every request body (413). ``show_paths`` adds server file paths to responses
    (off by default: clients see ids and file names). ``allowed_hosts``: Host header allow-list (``serve``
    sets it for loopback addresses against DNS rebinding). ``token``: every API request must carry it
    (``Authorization: Bearer``, or the cookie ``/?token=...`` sets). ``max_decodes`` / ``pixel_budget``: how many
    images, and how many pixels in all, are decoded at once (bounded memory); ``uploads_per_minute``: 429 beyond.
    ``engine``: the network engine of queries and uploads (``auto``: see ``backbones.fast.resolve_engine``).
    """
    from .. import __version__

    svc = SearchService(index_dir, ground_truth=ground_truth, allow_uploads=allow_uploads,
                        max_upload_bytes=max_upload_bytes, max_files=max_files, max_top=max_top,
                        show_paths=show_paths, weights=weights, device=device, max_decodes=max_decodes,
                        pixel_budget=pixel_budget, uploads_per_minute=uploads_per_minute, engine=engine)
    page = (STATIC / "index.html").read_bytes()
    svc.native_memory = limit_native_memory()

    app = FastAPI(title="instance-search", version=__version__, docs_url=None, redoc_url=None,
                  description="Instance-level image search over one index folder: query by image and box, "
                              "add images, thumbnails. The page is at /.")
    app.state.service = svc
    app.add_middleware(Guard, max_body=svc.max_upload_bytes, allowed_hosts=allowed_hosts,
                       token=token if token else None)

    def fail(status: int, msg: str):
        raise HTTPException(status_code=status, detail=msg)

    _docs_routes(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    @app.get("/api/stats", summary="What the index holds and the server's limits")
    def stats() -> dict:
        return svc.stats()

    @app.get("/api/images", summary="A page of indexed images (to pick a query from)")
    def list_images(offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=500),
                    name: str | None = Query(None, max_length=200,
                                             description="only file names containing this (any case)")) -> dict:
        return svc.list_images(offset, limit, name)

    def image_id_of(image_id: str) -> int:
        if not re.fullmatch(r"[0-9]{1,18}", image_id):
            fail(404, f"no image with id {image_id!r} in this index (ids are whole numbers)")
        return int(image_id)

    @app.get("/api/original/{image_id}", summary="The file of an indexed image (full size)",
             responses={200: {"content": {"image/*": {}}}, 404: {"description": "no such indexed id"}})
    def original(image_id: str):
        i = image_id_of(image_id)
        try:
            got = svc.original(i)
        except ImageError as exc:
            fail(404, str(exc))
        if got is None:
            fail(404, f"no image with id {i} in this index")
        data, media, name = got
        safe = re.sub(r'[^A-Za-z0-9._-]', "_", name) or "image"
        return Response(data, media_type=media, headers={"cache-control": "private, max-age=300",
                                                          "content-disposition": f'inline; filename="{safe}"'})

    @app.delete("/api/images/{image_id}", summary="Remove an image from the index (its file stays on disk)")
    def remove_image(image_id: str) -> dict:
        i = image_id_of(image_id)
        try:
            return svc.remove(i)
        except BadRequest as exc:
            fail(exc.status, str(exc))
        except WriterBusyError as exc:
            fail(503, str(exc).replace(str(svc.index_dir), "<index>"))

    @app.get("/api/thumbnail/{image_id}", summary="JPEG thumbnail of an indexed image",
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such indexed id"}})
    def thumbnail(image_id: str, size: int = Query(256, ge=16, le=1024)):
        if not re.fullmatch(r"[0-9]{1,18}", image_id):
            fail(404, "no such image id")
        try:
            data = svc.thumbnail(int(image_id), size)
        except BadRequest as exc:
            fail(exc.status, str(exc))
        except ImageError:
            fail(404, f"image {image_id}: its file is missing or no longer readable")
        if data is None:
            fail(404, f"no image with id {image_id} in this index")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=300"})

    @app.post("/api/search", summary="Rank the indexed images by similarity to a query image (+ box)")
    def search(image: UploadFile | None = File(None, description="query image (or give query_id)"),
               query_id: int | None = Form(None, description="search with an indexed image instead"),
               box: str | None = Form(None, description="x1,y1,x2,y2 in pixels of the query (or of box_frame)"),
               box_frame: str | None = Form(None, description="W,H of the scaled copy the box was drawn on"),
               top: int = Form(10, description="number of results"),
               options: str | None = Form(None, description="JSON object of extra Collection.search options")):
        t0 = time.perf_counter()
        if not 1 <= top <= svc.max_top:
            fail(422, f"top must be between 1 and {svc.max_top}, got {top}")
        try:
            b = parse_box(box) if box not in (None, "") else None
            frame = parse_frame(box_frame)
        except BoxError as exc:
            fail(422, str(exc))
        try:
            opts = svc.parse_options(options)
        except ValueError as exc:
            fail(422, str(exc))
        if (image is None) == (query_id is None):
            fail(422, "give exactly one of 'image' (a file) or 'query_id' (an indexed image id)")
        with tempfile.TemporaryDirectory(prefix="isearch-query-") as tmpdir:
            try:
                if image is not None:
                    name = client_name(image.filename)
                    qpath = Path(tmpdir) / "query"
                    _, sha = copy_limited(image.file, qpath, svc.max_upload_bytes, name)
                    probe_image(qpath, name)
                    group = svc.gt.group_of(name) if svc.gt is not None else None
                else:
                    svc.refresh()
                    rec = svc.record(int(query_id))
                    if rec is None:
                        fail(404, f"no image with id {query_id} in this index (removed, or never indexed)")
                    qpath, name, sha = Path(rec["path"]), Path(rec["path"]).name, rec["sha256"]
                    group = svc.groups.get(int(query_id))
                    try:
                        probe_image(qpath, name)
                    except BadRequest:
                        fail(404, f"image {query_id}: its file is missing or no longer readable")
                t1 = time.perf_counter()
                return svc.search(qpath, name, sha, group, b, frame, top, opts,
                                  {"upload_ms": (t1 - t0) * 1e3}, query_id=None if image is not None else int(query_id))
            except BadRequest as exc:
                fail(exc.status, str(exc))
            except BoxError as exc:
                fail(422, str(exc).replace(str(qpath), name))
            except ImageError as exc:
                msg = str(exc).replace(str(qpath), name)
                if image is None:
                    fail(404, f"image {query_id}: its file is missing or no longer readable")
                fail(413 if "decompression bomb" in msg else 415, msg)
            except KeyError:  # the image was removed between the check and the search
                fail(404, f"no image with id {query_id} in this index (removed, or never indexed)")
            except (TypeError, ValueError) as exc:
                if opts:
                    fail(422, f"options: {exc}")
                raise

    @app.post("/api/images", summary="Upload images and add them to the index", status_code=200)
    def add_images(files: list[UploadFile] = File(..., description="image files")):
        if not svc.allow_uploads:
            fail(403, "this server was started read-only (uploads are off)")
        try:
            return svc.add_uploads([(f.file, f.filename) for f in files])
        except BadRequest as exc:
            fail(exc.status, str(exc))
        except WriterBusyError as exc:
            fail(503, str(exc).replace(str(svc.index_dir), "<index>"))

    return app


def _docs_routes(app: FastAPI) -> None:
    """``/docs``: Swagger UI over ``/openapi.json`` with its script and style served from the installed
    ``swagger-ui-bundle`` package (no CDN: works offline)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    assets = Path(str(swagger_ui_path))
    files = {n: assets / n for n in ("swagger-ui-bundle.js", "swagger-ui.css")}
    media = {".js": "text/javascript", ".css": "text/css"}

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="instance-search API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css", swagger_favicon_url="data:,")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str):
        if name not in files:
            raise HTTPException(status_code=404, detail=f"no docs asset {name!r}")
        return Response(files[name].read_bytes(), media_type=media[Path(name).suffix],
                        headers={"cache-control": "public, max-age=86400"})


def serve(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *, ground_truth=None,
          allow_uploads: bool = True, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, show_paths: bool = False,
          log_level: str = "info", token: str | None = None, uploads_per_minute: int = DEFAULT_UPLOADS_PER_MINUTE,
          max_decodes: int = DEFAULT_MAX_DECODES, pixel_budget: int = DEFAULT_PIXEL_BUDGET,
          device: str = "cpu", engine: str = "auto") -> None:
    """Serve the index with uvicorn (one process; the app holds the model and the FAISS index in memory).

    Without ``token`` there is no authentication: keep the default ``host="127.0.0.1"`` unless you trust the
    network, or set a token.
    """
    import uvicorn

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    allowed = ["127.0.0.1", "localhost", "::1", host.strip("[]")] if loopback else None
    app = create_app(index_dir, ground_truth=ground_truth, allow_uploads=allow_uploads,
                     max_upload_bytes=max_upload_bytes, show_paths=show_paths, allowed_hosts=allowed, token=token,
                     uploads_per_minute=uploads_per_minute, max_decodes=max_decodes, pixel_budget=pixel_budget,
                     device=device, engine=engine)
    if not loopback and not token:
        print(f"warning: serving {index_dir} on {host}:{port} without authentication; anyone who can reach it "
              f"can search{' and add images' if allow_uploads else ''}", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1, server_header=False,
                timeout_keep_alive=5, limit_concurrency=64)
