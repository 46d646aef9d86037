"""The HTTP face of the advisor service: Starlette routes over `AdvisorService`, run by uvicorn.

Only transport lives here: the body size limit, multipart parsing, JSON replies, start-up and shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mondrian_assets.core.serving.service import AdvisorService, AnalyzeForm
from mondrian_assets.core.serving.uploads import UploadRejected

FORM_FIELDS = ("advisor", "job_id", "mode", "enable_rag")


class _BodyTooLarge(Exception):
    pass


def _limited(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """`receive` that stops a body past `limit` bytes (chunked uploads carry no Content-Length to check)."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
        return message

    return wrapped


async def _read_form(request: Request, limit: int) -> AnalyzeForm:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadRejected(413, "request_too_large", f"the request is {int(declared):,} bytes; the limit is {limit:,}")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRejected(415, "not_multipart", "send multipart/form-data with an `image` file part")
    limited = Request(request.scope, _limited(request.receive, limit))
    try:
        form = await limited.form(max_files=2, max_fields=16, max_part_size=64 * 1024)
    except _BodyTooLarge:
        raise UploadRejected(413, "request_too_large", f"the request body exceeds {limit:,} bytes") from None
    except (MultiPartException, HTTPException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise UploadRejected(400, "bad_multipart", f"the multipart body cannot be read: {detail}") from None
    try:
        fields = {k: form.get(k) for k in FORM_FIELDS}
        text = {k: v if isinstance(v, str) else None for k, v in fields.items()}
        image = form.get("image")
        if image is None:
            raise UploadRejected(400, "no_image", "the request has no `image` part")
        if isinstance(image, str):
            raise UploadRejected(400, "image_not_a_file", "send the image as a file part (curl -F image=@photo.jpg)")
        data = await image.read()
        return AnalyzeForm(image=data, filename=image.filename, **text)
    finally:
        await form.close()


def build_app(service: AdvisorService) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    async def analyze(request: Request) -> JSONResponse:
        try:
            form = await _read_form(request, service.config.max_upload_bytes)
        except UploadRejected as rejected:
            status, body = await service.reject(rejected, request.query_params.get("advisor"))
        else:
            status, body = await service.analyze(form)
        return JSONResponse(body, status_code=status)

    async def usage(request: Request) -> JSONResponse:
        return JSONResponse(service.usage_summary())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await service.start()
        try:
            yield {}
        finally:
            await service.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/analyze", analyze, methods=["POST"]),
        Route("/usage", usage, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(service: AdvisorService, host: str = "127.0.0.1", port: int = 5100, *, grace_s: float = 30.0) -> None:
    """Run until SIGINT/SIGTERM; on the signal, queued requests are refused (503) and running ones finish
    (within `grace_s`) before the workers stop."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(build_app(service), host=host, port=port, timeout_graceful_shutdown=int(grace_s),
                            log_level="info", access_log=False)  # fmt: skip
    _Server(config).run()
