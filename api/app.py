"""The Tether REST API: :func:`create_app` builds the FastAPI application.

Run it with ``uvicorn --factory api.app:create_app`` (or ``tether serve``). The database must be
migrated first (:func:`core.db.migrate`); the app never creates tables itself.
"""

from __future__ import annotations

import time
from importlib import metadata

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_body, install_error_handlers
from api.routers import admin, downloads, files, health, jobs, models, openai_compat
from core import metrics
from core.db import get_engine, session_factory
from core.dispatch import Dispatcher
from core.settings import Settings, get_settings
from core.storage import ObjectStore, get_store

#: Room for multipart boundaries and part headers on top of the file size limit.
MULTIPART_ALLOWANCE = 64 * 1024
#: Seconds between database polls of an event stream.
SSE_POLL_SECONDS = 0.5


def _version() -> str:
    try:
        return metadata.version("tether")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def create_app(
    settings: Settings | None = None,
    *,
    dispatcher: Dispatcher | None = None,
    store: ObjectStore | None = None,
) -> FastAPI:
    """Build the API application.

    Args:
        settings: the deployment settings; default :func:`core.settings.get_settings`.
        dispatcher: how new jobs reach a worker; default the process-wide one
            (:func:`core.dispatch.get_dispatcher`), resolved at the first job.
        store: the object store; default the one ``settings`` configure. Local download links
            are made absolute with the address each request came in on.
    """
    settings = settings or get_settings()

    app = FastAPI(
        title="Tether",
        version=_version(),
        description="Managed LoRA fine-tuning with adaptive KL safety regularization.",
    )
    app.state.settings = settings
    app.state.sessionmaker = session_factory(get_engine(settings.resolved_database_url))
    app.state.store = store or get_store(settings, public_base_url="")
    app.state.dispatcher = dispatcher
    app.state.sse_poll_seconds = SSE_POLL_SECONDS
    install_error_handlers(app)
    for module in (health, models, files, jobs, downloads, admin, openai_compat):
        app.include_router(module.router)
    # Added last = outermost: metrics see every response, the 413 of the body limit included.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_ALLOWANCE
    )
    app.add_middleware(MetricsMiddleware)
    return app


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, counting while they stream in.

    A declared ``Content-Length`` over the limit is refused before the app runs; a chunked or
    lying body fails as soon as the running count passes the limit, so an upload never has to
    be held in full to be refused.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> ApiError:
        return ApiError(
            413,
            "request_too_large",
            f"the request body is larger than {self.max_bytes} bytes (the upload limit plus "
            "multipart overhead); split the file",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            error = self._error()
            body = error_body(413, error.code, error.message)
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class MetricsMiddleware:
    """Count requests and time them by method, route template and status class."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.observe_request(
                scope["method"], _route_template(scope), status, time.perf_counter() - start
            )


def _route_template(scope: Scope) -> str:
    # The matched route's template; ``path_format`` drops converters ("{key:path}" -> "{key}").
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else metrics.UNMATCHED_ROUTE
