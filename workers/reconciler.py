"""The reconciler: no accepted job is lost, whatever happened to workers or to Redis.

It runs in every ``tether worker`` (and once when ``tether serve`` starts the in-process
worker) and repairs three situations:

* a job a worker was running whose heartbeat went stale: the worker died (OOM, kill -9, lost
  machine). The job goes back to ``queued`` and is sent again; the next worker resumes it from
  its newest checkpoint. Without this, Redis would redeliver only after the visibility timeout,
  which must exceed the longest job.
* a job in ``queued`` whose message is in neither the broker's queue nor its unacknowledged
  set: the message was lost (Redis restarted empty, flushed). It is sent again.
* a job left in ``validating`` by an API process that died between recording and queueing it.

Duplicates are harmless: a delivery of a job that another live worker holds, or that has
finished, returns at once (``workers.pipeline.run_job`` claims a lease first).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from core import jobs, metrics
from core.db import get_engine, session_scope
from core.dispatch import Dispatcher
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: A queued job younger than this may still be on its way to the broker.
QUEUED_GRACE_SECONDS = 10.0


@dataclass
class ReconcileReport:
    """What one pass did (job ids)."""

    requeued_stale: list[str] = field(default_factory=list)
    resent_lost: list[str] = field(default_factory=list)
    queue_depth: int | None = None


def broker_job_ids(redis_url: str, queue: str) -> tuple[set[str], int]:
    """Job ids with a message in the broker (waiting or delivered-but-unacked), and the depth.

    Reads kombu's Redis layout: the queue is a list of JSON messages whose base64 body is the
    Celery protocol-2 payload ``[args, kwargs, embed]``; unacked deliveries sit in the
    ``unacked`` hash as ``[message, exchange, routing_key]``.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    waiting = client.lrange(queue, 0, -1)
    unacked = [json.loads(raw)[0] for raw in client.hvals("unacked")]
    ids = {_job_id(json.loads(raw)) for raw in waiting} | {_job_id(msg) for msg in unacked}
    ids.discard(None)
    return {i for i in ids if i}, len(waiting)


def _job_id(message: dict) -> str | None:
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (KeyError, ValueError, TypeError, IndexError):
        return None


def reconcile_once(
    dispatcher: Dispatcher,
    settings: Settings | None = None,
    *,
    in_broker: Callable[[], tuple[set[str], int]] | None = None,
    stale_after_seconds: float | None = None,
) -> ReconcileReport:
    """One pass over the jobs table; see the module docstring.

    Args:
        dispatcher: how to send a job again.
        in_broker: returns the job ids with a message in the broker and the queue depth;
            ``None`` (in-process mode) treats every queued job as lost, which is right at the
            start of a process that is the only worker.
        stale_after_seconds: heartbeat age that counts as dead; default from settings. The
            in-process worker passes 0 at start-up: no other process can hold its jobs.
    """
    settings = settings or get_settings()
    report = ReconcileReport()
    db = get_engine(settings.resolved_database_url)
    with session_scope(db) as session:
        stale_after = (
            settings.job_stale_after_seconds if stale_after_seconds is None else stale_after_seconds
        )
        for job in jobs.stale_jobs(session, stale_after):
            try:
                jobs.requeue(session, job.id, f"worker {job.worker_id or '?'} stopped responding")
            except jobs.IllegalTransition:
                continue  # it moved on meanwhile
            dispatcher.submit(job.id)
            report.requeued_stale.append(job.id)
        for job in jobs.jobs_in(session, ["validating"], QUEUED_GRACE_SECONDS * 6):
            try:
                jobs.transition(session, job.id, "queued", "recovered by the reconciler")
            except jobs.IllegalTransition:
                continue
        present: set[str] = set()
        if in_broker is not None:
            present, report.queue_depth = in_broker()
            metrics.QUEUE_DEPTH.set(report.queue_depth)
        for job in jobs.jobs_in(session, ["queued"], QUEUED_GRACE_SECONDS):
            if job.id in present or job.id in report.requeued_stale:
                continue
            jobs.add_event(session, job.id, "requeued", "message lost; sent again", level="warning")
            dispatcher.submit(job.id)
            report.resent_lost.append(job.id)
    if report.requeued_stale or report.resent_lost:
        log.warning(
            "reconciler: requeued %s (stale), resent %s (lost)",
            report.requeued_stale,
            report.resent_lost,
        )
    return report


def start_reconciler(
    dispatcher: Dispatcher, settings: Settings, in_broker: Callable[[], tuple[set[str], int]]
) -> threading.Event:
    """Run :func:`reconcile_once` every ``reconcile_interval_seconds`` in a daemon thread.

    Returns:
        An event; set it to stop the loop.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.reconcile_interval_seconds):
            try:
                reconcile_once(dispatcher, settings, in_broker=in_broker)
            except Exception:  # the database or Redis may be briefly away; try next round
                log.warning("reconciler pass failed", exc_info=True)

    threading.Thread(target=loop, name="tether-reconciler", daemon=True).start()
    return stop
