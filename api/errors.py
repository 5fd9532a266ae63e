"""One error body for every failure: ``{"error": {"code", "message", "type", "param", "line"}}``.

The shape follows the OpenAI API's (``type`` included, so the official SDK reads our errors);
``code`` is a stable snake_case identifier, ``param`` names the field at fault, ``line`` the line
of an uploaded file, and ``details`` (when present) lists every problem, e.g. every bad line of
a training file. Handlers here turn domain errors, FastAPI's validation errors, routing 404/405s
and unexpected exceptions into that body; a 500 never carries internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import jobs
from core.auth import AuthenticationError, TenantExistsError, TenantNotFoundError
from core.dispatch import DispatchError

log = logging.getLogger(__name__)

#: OpenAI-style error ``type`` by status code.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}
_LOCATIONS = ("body", "query", "path", "header", "cookie")


class ApiError(StarletteHTTPException):
    """An HTTP error with the Tether error body.

    It subclasses Starlette's ``HTTPException`` so that FastAPI re-raises it untouched even
    when it comes out of reading the request body (the upload size limit).
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        line: int | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.param = param
        self.line = line
        self.details = details


def error_body(
    status_code: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    line: int | None = None,
    details: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON body of an error response."""
    error: dict[str, Any] = {
        "code": code,
        "message": message,
        "type": ERROR_TYPES.get(status_code, "api_error" if status_code >= 500 else "error"),
        "param": param,
        "line": line,
    }
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(error: ApiError) -> JSONResponse:
    """The response for an :class:`ApiError`."""
    body = error_body(
        error.status_code,
        error.code,
        error.message,
        param=error.param,
        line=error.line,
        details=error.details,
    )
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def _domain_status(error: jobs.JobsError) -> int:
    if isinstance(error, jobs.TrainingFileError):
        return 413 if error.too_large else 422
    statuses: list[tuple[type[jobs.JobsError], int]] = [
        (jobs.NotFoundError, 404),
        (jobs.IllegalTransition, 409),
        (jobs.ConflictError, 409),
        (jobs.AttemptsExhaustedError, 409),
        (jobs.QuotaExceededError, 429),
    ]
    return next((status for cls, status in statuses if isinstance(error, cls)), 400)


def from_domain(error: jobs.JobsError) -> ApiError:
    """The API error for a domain error (404, 409, 413, 422, 429 or 400)."""
    if isinstance(error, jobs.TrainingFileError):
        return ApiError(
            _domain_status(error),
            error.code,
            error.message,
            param=error.param,
            line=error.headline.line,
            details=[issue.to_dict() for issue in error.issues],
        )
    return ApiError(_domain_status(error), error.code, error.message, param=error.param)


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _validation_details(error: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {
            "param": _param(item.get("loc", ())),
            # pydantic prefixes messages of custom validators; ours are sentences already.
            "message": str(item.get("msg", "")).removeprefix("Value error, "),
            "type": item.get("type"),
        }
        for item in error.errors()
    ]


async def _handle_api_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(error)


async def _handle_domain_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, jobs.JobsError)
    return error_response(from_domain(error))


async def _handle_auth_error(_request: Request, error: Exception) -> JSONResponse:
    return error_response(
        ApiError(401, "invalid_api_key", str(error), headers={"WWW-Authenticate": "Bearer"})
    )


async def _handle_tenant_error(_request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, TenantExistsError):
        return error_response(ApiError(409, "tenant_exists", str(error), param="name"))
    return error_response(ApiError(404, "tenant_not_found", str(error), param="tenant_id"))


async def _handle_dispatch_error(_request: Request, _error: Exception) -> JSONResponse:
    return error_response(
        ApiError(
            503, "dispatch_failed", "the job could not be queued (broker unavailable); retry later"
        )
    )


async def _handle_validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    details = _validation_details(error)
    first = details[0] if details else {"param": None, "message": "invalid request"}
    where = f"{first['param']}: " if first["param"] else ""
    return error_response(
        ApiError(
            422,
            "invalid_request",
            f"{where}{first['message']}",
            param=first["param"],
            details=details,
        )
    )


async def _handle_http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    status = error.status_code
    message = str(error.detail)
    if status == 404 and message == "Not Found":
        message = f"no route matches {request.method} {request.url.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    code = _DEFAULT_CODES.get(status, "error")
    return error_response(ApiError(status, code, message, headers=error.headers))


async def _handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    body = error_body(500, "internal_error", "internal server error; the incident was logged")
    return JSONResponse(body, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every kind of failure through the Tether error body."""
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(jobs.JobsError, _handle_domain_error)
    app.add_exception_handler(AuthenticationError, _handle_auth_error)
    app.add_exception_handler(TenantNotFoundError, _handle_tenant_error)
    app.add_exception_handler(TenantExistsError, _handle_tenant_error)
    app.add_exception_handler(DispatchError, _handle_dispatch_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_exception_handler(Exception, _handle_unexpected)
