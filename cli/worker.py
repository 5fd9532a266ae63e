"""``tether worker``: a Celery GPU worker with its reconciler and metrics endpoint."""

from __future__ import annotations

import os
import tempfile
from typing import Annotated

import typer


def worker(
    queue: Annotated[str | None, typer.Option(help="Queue to consume (default: settings).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs at once: one per GPU.")] = 1,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port; 0 = off.")] = None,
    reconcile: Annotated[bool, typer.Option(help="Run the reconciler loop.")] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Start a worker: consumes jobs, resumes lost ones, and serves worker metrics."""
    # Prefork children write metrics to files the parent's endpoint aggregates; the directory
    # must be known before prometheus_client is imported anywhere.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="tether-metrics-"))
    if device:
        os.environ["TETHER_DEVICE"] = device

    from core.dispatch import CeleryDispatcher
    from core.settings import get_settings
    from workers.celery_app import make_celery
    from workers.reconciler import broker_job_ids, start_reconciler

    settings = get_settings()
    queue = queue or settings.worker_queue
    port = settings.worker_metrics_port if metrics_port is None else metrics_port
    if port:
        _serve_metrics(port)
    if reconcile:
        dispatcher = CeleryDispatcher(settings.redis_url, queue)
        start_reconciler(
            dispatcher, settings, in_broker=lambda: broker_job_ids(settings.redis_url, queue)
        )
    app = make_celery(settings)
    app.worker_main(
        [
            "worker",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
            "--prefetch-multiplier",
            "1",
            "--hostname",
            "worker@%h",
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _serve_metrics(port: int) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr="0.0.0.0", registry=registry)
