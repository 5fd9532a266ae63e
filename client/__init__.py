"""The Tether Python SDK (httpx + standard library; no server code).

>>> from client import Client
>>> tether = Client("http://127.0.0.1:8000", api_key="tth_...")  # doctest: +SKIP
"""

from client.client import DEFAULT_BASE_URL, TERMINAL_STATUSES, Client, Files, Jobs, parse_sse
from client.errors import (
    Conflict,
    ConnectionFailed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    TetherError,
    Unauthorized,
    ValidationFailed,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "TERMINAL_STATUSES",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Files",
    "Jobs",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "TetherError",
    "Unauthorized",
    "ValidationFailed",
    "parse_sse",
]
