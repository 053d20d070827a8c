"""``smi-hub serve INDEX_DIR``: a JSON search API over an index folder (FastAPI + uvicorn).

Endpoints (all under ``/v1/``; OpenAPI schema at ``/v1/openapi.json``, docs at ``/v1/docs``):

- ``POST /v1/search``: multipart form with ``image`` (a file) or ``id`` (a gallery id), ``k``
  (1-100, default 10) and optional ``min_score``; answers ``results`` (``id``, ``path``,
  ``label``, ``score``), ``top_score``, ``in_domain`` and ``percentile`` (see
  :mod:`smi_hub.ood`).
- ``GET /v1/items/{id}``: the image file of a gallery item (only files the index holds).
- ``GET /v1/healthz``; ``GET /v1/info``: model, preprocessing, index kind, size, recall@10.

Bad input is answered with a 4xx JSON ``{"detail": ...}`` naming the problem: bodies over
``max_upload`` bytes (413, refused from the header or while streaming, before any decoding),
images over the pixel limit (413, from the image header), unreadable images (400). An
unexpected failure of one request is a 500 and the server goes on. All workers
(``--workers N``) memory-map the same index file, so its pages are shared.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from smi_hub import __version__
from smi_hub.errors import ImageLoadError
from smi_hub.search_service import MAX_K, ItemNotFound, SearchService

MAX_UPLOAD = 20 << 20  # request bodies above this are refused (413)
ENV_PREFIX = "SMI_HUB_SERVE_"


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, from their
    Content-Length header or, for chunked bodies, as soon as the count passes it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        seen = 0
        over = started = False

        async def counted() -> dict:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise _TooLarge
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            if over:  # whatever the app answers to the cut body, the answer is 413
                if not started:
                    started = True
                    await self._refuse(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        response = JSONResponse(
            {
                "detail": f"request body over the limit of {self.limit:,} bytes; send a smaller image."
            },
            status_code=413,
        )
        await response({"type": "http"}, None, send)


def create_app(service: SearchService, max_upload: int = MAX_UPLOAD) -> FastAPI:
    """The API over ``service`` (see the module docstring)."""
    app = FastAPI(
        title="smi-hub search API",
        version=__version__,
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
    )
    app.state.service = service

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); details in the server log."},
            status_code=500,
        )

    @app.get("/v1/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "items": len(service)}

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.post("/v1/search")
    def search(
        image: Annotated[UploadFile | None, File(description="query image file")] = None,
        id: Annotated[int | None, Form(description="gallery id to search with")] = None,  # noqa: A002
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        min_score: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
    ) -> dict[str, Any]:
        if (image is None) == (id is None):
            raise HTTPException(400, "send exactly one of `image` (a file) or `id` (gallery id).")
        try:
            if image is not None:
                data = image.file.read(max_upload + 1)
                if len(data) > max_upload:
                    raise HTTPException(413, f"image over the limit of {max_upload:,} bytes.")
                answer = service.search_image(data, k, min_score)
            else:
                answer = service.search_item(int(id), k, min_score)  # type: ignore[arg-type]
        except ItemNotFound as e:
            raise HTTPException(404, str(e.args[0])) from None
        except ImageLoadError as e:
            status = 413 if "limit" in str(e) or "budget" in str(e) else 400
            raise HTTPException(status, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return {"k": k, **answer}

    @app.get("/v1/items/{item}", response_class=FileResponse)
    def item(item: int) -> FileResponse:
        try:
            path = service.item_path(item)
        except ItemNotFound as e:
            raise HTTPException(404, str(e.args[0])) from None
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media)

    return app


def app_from_env() -> Any:
    """The app of one uvicorn worker, configured by ``SMI_HUB_SERVE_*`` variables (set by
    :func:`run`), with the body limit in front."""
    env = os.environ
    service = SearchService(
        env[ENV_PREFIX + "INDEX"],
        model=env.get(ENV_PREFIX + "MODEL") or None,
        device=env.get(ENV_PREFIX + "DEVICE") or None,
        max_pixels=int(env.get(ENV_PREFIX + "MAX_PIXELS", "40000000")),
    )
    limit = int(env.get(ENV_PREFIX + "MAX_UPLOAD", str(MAX_UPLOAD)))
    return BodyLimit(create_app(service, limit), limit)


def run(
    index_dir: str,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    device: str | None = None,
    max_pixels: int | None = None,
    max_upload: int = MAX_UPLOAD,
) -> None:
    """Serve ``index_dir`` with ``workers`` uvicorn processes until interrupted."""
    import uvicorn

    SearchService(index_dir, model=model, device=device)  # fail here, before forking workers
    os.environ[ENV_PREFIX + "INDEX"] = str(index_dir)
    os.environ[ENV_PREFIX + "MODEL"] = model or ""
    os.environ[ENV_PREFIX + "DEVICE"] = device or ""
    os.environ[ENV_PREFIX + "MAX_UPLOAD"] = str(max_upload)
    if max_pixels:
        os.environ[ENV_PREFIX + "MAX_PIXELS"] = str(max_pixels)
    uvicorn.run(
        "smi_hub.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        timeout_graceful_shutdown=5,
        timeout_worker_healthcheck=600,  # a worker loads the model and the index first
    )
