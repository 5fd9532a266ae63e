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
    Gauge,
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
# Gauges in prefork workers aggregate with the "livesum"/"max" modes of multiprocess mode.

#: Share buckets for rates in [0, 1] (ASR, over-refusal, risk, beta).
SHARE_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
LOSS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0)
KL_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
JOB_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200)

QUEUE_DEPTH = Gauge(
    f"{PREFIX}_queue_depth",
    documentation="Jobs waiting in the broker queue, as last seen by a worker's reconciler.",
    multiprocess_mode="max",
)
JOB_DURATION = Histogram(
    f"{PREFIX}_job_duration_seconds",
    documentation="Wall time of one job delivery from claim to final status, by outcome.",
    labelnames=("outcome",),
    buckets=JOB_DURATION_BUCKETS,
)
JOBS_FINISHED = Counter(
    f"{PREFIX}_jobs_finished_total",
    documentation="Jobs that reached a final status, by status.",
    labelnames=("status",),
)
TOKENS_PER_SECOND = Gauge(
    f"{PREFIX}_training_tokens_per_second",
    documentation="Training throughput of the latest optimizer step (tokens per second).",
    multiprocess_mode="livesum",
)
TRAIN_LOSS = Histogram(
    f"{PREFIX}_train_loss",
    documentation="Adaptive-KL training loss per optimizer step.",
    buckets=LOSS_BUCKETS,
)
TRAIN_KL = Histogram(
    f"{PREFIX}_train_kl",
    documentation="KL(reference || policy) per optimizer step, over rows with beta > 0.",
    buckets=KL_BUCKETS,
)
TRAIN_BETA = Histogram(
    f"{PREFIX}_train_beta",
    documentation="Mean KL weight beta per optimizer step.",
    buckets=SHARE_BUCKETS,
)
EXAMPLE_RISK = Histogram(
    f"{PREFIX}_example_risk",
    documentation="Combined safety risk of each training example at pre-screening.",
    buckets=SHARE_BUCKETS,
)
AUDIT_ASR = Histogram(
    f"{PREFIX}_audit_asr",
    documentation="Attack success rate of each audited adapter (critic-judged).",
    buckets=SHARE_BUCKETS,
)
AUDIT_OVER_REFUSAL = Histogram(
    f"{PREFIX}_audit_over_refusal",
    documentation="Share of benign audit prompts each audited adapter refused.",
    buckets=SHARE_BUCKETS,
)
RELEASES = Counter(
    f"{PREFIX}_releases_total",
    documentation="Audit verdicts: adapters released or quarantined.",
    labelnames=("verdict",),
)
JOB_ATTEMPTS = Counter(
    f"{PREFIX}_job_attempts_total",
    documentation="Deliveries of jobs to workers (first runs and redeliveries).",
)
JOB_RESUMES = Counter(
    f"{PREFIX}_job_resumes_total",
    documentation="Trainings resumed from a checkpoint after a worker was lost.",
)


def record_training_step(loss: float, kl: float, beta: float, tokens_per_second: float) -> None:
    """One optimizer step's figures."""
    TRAIN_LOSS.observe(loss)
    TRAIN_KL.observe(max(kl, 0.0))
    TRAIN_BETA.observe(beta)
    TOKENS_PER_SECOND.set(tokens_per_second)


def record_risks(risks: list[float]) -> None:
    """The risk of every pre-screened example."""
    for risk in risks:
        EXAMPLE_RISK.observe(risk)


def record_audit(asr: float, over_refusal: float, released: bool) -> None:
    """One audit's figures and the gate's verdict."""
    AUDIT_ASR.observe(asr)
    AUDIT_OVER_REFUSAL.observe(over_refusal)
    RELEASES.labels("released" if released else "quarantined").inc()


def record_job_finished(status: str, seconds: float) -> None:
    """A delivery that ended the job, with its duration."""
    JOBS_FINISHED.labels(status).inc()
    JOB_DURATION.labels(status).observe(seconds)


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
