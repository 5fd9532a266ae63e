"""Prometheus metrics of Tether, all prefixed ``tether_``.

Domain code calls the small ``record_*`` / ``observe_*`` functions below with plain values;
only this module knows Prometheus. Label sets are fixed and low-cardinality: routes are
templates (``/jobs/{job_id}``), statuses are classes (``2xx``), and no tenant id or job id is
ever a label.

Prefork processes (Celery workers, several uvicorn workers) write to
``PROMETHEUS_MULTIPROC_DIR`` when it is set; :func:`render_latest` then aggregates every
process's files.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

PREFIX = "tether"
#: Request latency buckets (seconds): fast reads to slow uploads.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# --- API ------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests_total",
    documentation="HTTP requests served by the API, by method, route template and status class.",
    labelnames=("method", "route", "status"),
)
HTTP_LATENCY = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    documentation="Time to answer an HTTP request, by method and route template.",
    labelnames=("method", "route"),
    buckets=LATENCY_BUCKETS,
)
JOBS_CREATED = Counter(
    f"{PREFIX}_jobs_created_total",
    documentation="Fine-tuning jobs accepted, by base model and safety preset.",
    labelnames=("model", "preset"),
)
FILES_UPLOADED = Counter(
    f"{PREFIX}_files_uploaded_total",
    documentation="Training files accepted, and rejected by validation, by outcome.",
    labelnames=("outcome",),
)

#: The route label of requests that matched no route (a 404 for a random path must not
#: create a new series).
UNMATCHED_ROUTE = "<unmatched>"


def status_class(status_code: int) -> str:
    """``404`` -> ``"4xx"``."""
    return f"{status_code // 100}xx"


def observe_request(method: str, route: str, status_code: int, seconds: float) -> None:
    """Count one HTTP request and its latency (``route`` is the template, not the path)."""
    HTTP_REQUESTS.labels(method, route, status_class(status_code)).inc()
    HTTP_LATENCY.labels(method, route).observe(seconds)


def record_job_created(model: str, preset: str) -> None:
    """Count one accepted job."""
    JOBS_CREATED.labels(model, preset).inc()


def record_file_upload(accepted: bool) -> None:
    """Count one upload, accepted or rejected by validation."""
    FILES_UPLOADED.labels("accepted" if accepted else "rejected").inc()


# --- worker ---------------------------------------------------------------------------------
# (worker metrics are defined here too, by the worker side)


# --- exposition -----------------------------------------------------------------------------


def render_latest() -> tuple[bytes, str]:
    """The text exposition of every metric and its content type.

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) the figures of all processes are
    aggregated; otherwise this process's registry is rendered.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
