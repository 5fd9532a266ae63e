"""The Celery app of the GPU workers: delivery policy lives here, the work in workers.pipeline.

Policy, and why:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the
  job function returns, so a worker that dies mid-job leaves the message to be delivered again.
* ``worker_prefetch_multiplier=1`` and concurrency 1: one job per GPU; a worker never holds
  queued jobs that an idle worker could run.
* the Redis visibility timeout exceeds the longest job, or Redis would hand a running job to a
  second worker. A worker killed outright therefore redelivers late; the reconciler
  (``workers.reconciler``) notices the stale heartbeat much sooner and re-enqueues.
* a job's attempts are counted in the database, not by Celery, so a job that kills its worker
  every time ends ``failed`` instead of looping.
"""

from __future__ import annotations

from celery import Celery

from core.dispatch import TASK_NAME
from core.settings import Settings, get_settings

RUN_JOB_TASK = TASK_NAME  # the API sends it by name; it never imports workers


def make_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app from settings (broker = Redis)."""
    settings = settings or get_settings()
    app = Celery("tether", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue=settings.worker_queue,
        task_routes={RUN_JOB_TASK: {"queue": settings.worker_queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_seconds},
        worker_hijack_root_logger=False,
    )
    return app


app = make_celery()
