"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, StoreDep
from api.errors import error_body
from api.schemas import Health, error_responses
from core import metrics
from core.settings import Settings
from core.storage import ObjectStore

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
#: A key no object has; asking whether it exists proves the store answers.
_PROBE_KEY = "health/readyz-probe"


@router.get("/healthz")
def healthz() -> Health:
    """The process is up (no dependency is checked)."""
    return Health()


@router.get("/readyz", responses=error_responses(503))
def readyz(session: SessionDep, store: StoreDep, settings: SettingsDep) -> Health:
    """The database, the object store and (in celery mode) the broker all answer."""
    checks = {
        "database": _check(lambda: _ping_database(session)),
        "storage": _check(lambda: _ping_store(store)),
    }
    if settings.worker_mode == "celery":
        checks["broker"] = _check(lambda: _ping_broker(settings))
    failing = sorted(name for name, state in checks.items() if state != "ok")
    if failing:
        body = error_body(
            503,
            "not_ready",
            f"not ready: {', '.join(failing)} unavailable",
            details=[{"check": name, "state": state} for name, state in checks.items()],
        )
        return JSONResponse(body, status_code=503)  # type: ignore[return-value]
    return Health(checks=checks)


def _check(probe: Callable[[], object]) -> str:
    try:
        probe()
    except Exception as error:
        log.warning("readiness check failed: %s", error)
        # Only the exception type: messages may carry hosts or credentials.
        return f"error: {type(error).__name__}"
    return "ok"


def _ping_database(session: Session) -> None:
    session.execute(text("SELECT 1"))


def _ping_store(store: ObjectStore) -> None:
    store.exists(_PROBE_KEY)


def _ping_broker(settings: Settings) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics() -> Response:
    """Prometheus text exposition of the API's metrics (prefix `tether_`)."""
    payload, content_type = metrics.render_latest()
    return Response(payload, media_type=content_type)
