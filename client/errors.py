"""Typed errors of the Tether SDK, built from the server's error body.

Every API error answers ``{"error": {"code", "message", "type", "param", "line"}}``; the SDK
raises the :class:`TetherError` subclass of the status code with those fields, so callers catch
``NotFound`` or ``Conflict`` rather than inspect status codes.
"""

from __future__ import annotations

from typing import Any


class TetherError(Exception):
    """An error answered by the Tether API (or no answer at all: ``status`` 0).

    Attributes:
        status: HTTP status code; 0 when the server could not be reached.
        code: the server's stable snake_case identifier (``job_not_found``...).
        message: what is wrong and, where useful, what to do.
        param: the request field at fault, if any.
        line: the line of an uploaded file at fault, if any.
        details: every problem the server listed (e.g. each bad line of a file).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        line: int | None = None,
        *,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.line = line
        self.details = details or []

    def __str__(self) -> str:
        where = "".join(
            f" ({label} {value})"
            for label, value in (("param", self.param), ("line", self.line))
            if value is not None
        )
        return f"{self.message}{where} [{self.code}, HTTP {self.status}]"


class ValidationFailed(TetherError):
    """The request or the uploaded file is invalid (400, 422)."""


class Unauthorized(TetherError):
    """Missing, invalid or revoked API key (401)."""


class PermissionDenied(TetherError):
    """The key may not use this route, e.g. an admin route (403)."""


class NotFound(TetherError):
    """No such object for this tenant (404)."""


class Conflict(TetherError):
    """The request contradicts the object's state or reuses an Idempotency-Key (409)."""


class PayloadTooLarge(TetherError):
    """The upload is over the size or example limit (413)."""


class RateLimited(TetherError):
    """The tenant's quota is used up (429); ``retry_after`` is the server's hint in seconds."""

    retry_after: float | None = None


class ServerError(TetherError):
    """The server failed (5xx) and retries, where allowed, did not help."""


class ConnectionFailed(TetherError):
    """The server could not be reached (``status`` 0)."""


_BY_STATUS: dict[int, type[TetherError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
}


def error_from_response(status: int, body: Any, headers: Any = None) -> TetherError:
    """The typed error for a response's status and (parsed JSON, or text) body."""
    info = body.get("error") if isinstance(body, dict) else None
    if not isinstance(info, dict):
        text = body if isinstance(body, str) and body else f"HTTP {status}"
        info = {"code": "http_error", "message": text[:500]}
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else TetherError)
    line = info.get("line")
    details = info.get("details")
    error = cls(
        status,
        str(info.get("code") or "error"),
        str(info.get("message") or f"HTTP {status}"),
        info.get("param") if isinstance(info.get("param"), str) else None,
        line if isinstance(line, int) else None,
        details=details if isinstance(details, list) else None,
    )
    if isinstance(error, RateLimited) and headers is not None:
        error.retry_after = _retry_after(headers)
    return error


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
