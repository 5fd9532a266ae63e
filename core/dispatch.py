"""How the API hands a job to a worker.

The API records a job and calls ``get_dispatcher().submit(job_id)``; only the id travels, and
the worker re-reads everything else from the database. Two dispatchers:

* :class:`CeleryDispatcher` sends the task by name (``tether.run_job`` on queue
  ``tether.jobs``), so the API process never imports ``workers`` (or torch).
* :class:`InProcessDispatcher` runs a callable in one daemon thread inside the API process:
  the embedded default, where the API process is also the worker.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.orm import Session

from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_NAME = "tether.run_job"
QUEUE_NAME = "tether.jobs"
#: The in-process runner, imported only when the first job is submitted in inprocess mode.
INPROCESS_RUNNER = "workers.pipeline:run_job"


class Dispatcher(Protocol):
    """Something that starts a job's pipeline somewhere."""

    def submit(self, job_id: str) -> None:
        """Hand ``job_id`` to a worker; returns once it is handed over (not when it is done)."""


class DispatchError(RuntimeError):
    """A job could not be handed to a worker (broker down); the job has been failed."""


def dispatch_job(session: Session, dispatcher: Dispatcher, job_id: str) -> None:
    """Queue a newly created job and hand it to a worker; if that fails, fail the job.

    Raises:
        DispatchError: the dispatcher raised (the API answers 503).
    """
    from core.jobs import transition

    # Queued first: a fast in-process worker must find the job already waiting for it.
    transition(session, job_id, "queued", "handed to a worker", from_={"validating"})
    try:
        dispatcher.submit(job_id)
    except Exception as error:
        log.exception("could not dispatch job %s", job_id)
        transition(session, job_id, "failed", f"could not enqueue the job: {type(error).__name__}")
        raise DispatchError(f"job {job_id} could not be queued: {type(error).__name__}") from error


class CeleryDispatcher:
    """Sends ``tether.run_job(job_id)`` to Celery through the broker at ``redis_url``."""

    def __init__(self, redis_url: str, queue: str = QUEUE_NAME) -> None:
        from celery import Celery

        self.redis_url = redis_url
        self.queue = queue
        self.app = Celery("tether-api", broker=redis_url)

    def submit(self, job_id: str) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=self.queue)


class InProcessDispatcher:
    """Runs ``runner(job_id)`` in a background thread, one job at a time, in submission order.

    The thread is a daemon: stopping the server (Ctrl-C) does not wait for a running job. The
    job is not lost: its lease stops being renewed, and the reconciler of the next start
    requeues it to resume from its last checkpoint.

    Args:
        runner: the pipeline entry point (``workers.pipeline.run_job``), or its
            ``"module:function"`` path, imported on first use.
    """

    _STOP = object()

    def __init__(self, runner: Callable[[str], None] | str) -> None:
        self._runner = runner
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _resolve(self) -> Callable[[str], None]:
        with self._lock:
            runner = self._runner
            if isinstance(runner, str):
                module, _, name = runner.partition(":")
                runner = self._runner = getattr(importlib.import_module(module), name)
            return runner

    def submit(self, job_id: str) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the in-process dispatcher is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="tether-job", daemon=True)
                self._thread.start()
        self._queue.put(job_id)

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not self._STOP:
            try:
                self._resolve()(job_id)
            except Exception:
                log.exception("in-process job runner failed on %s", job_id)

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs; with ``wait``, let the queued and running ones finish first."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._queue.put(self._STOP)
        if wait and thread is not None:
            thread.join()


_dispatcher: Dispatcher | None = None
_dispatcher_lock = threading.Lock()


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Install the process-wide dispatcher (``None`` goes back to the settings' default)."""
    global _dispatcher
    with _dispatcher_lock:
        _dispatcher = dispatcher


def get_dispatcher(settings: Settings | None = None) -> Dispatcher:
    """The process-wide dispatcher; by default the one ``settings.worker_mode`` names."""
    global _dispatcher
    with _dispatcher_lock:
        if _dispatcher is None:
            _dispatcher = default_dispatcher(settings or get_settings())
        return _dispatcher


def default_dispatcher(settings: Settings) -> Dispatcher:
    """Celery for ``worker_mode=celery``, otherwise the in-process runner."""
    if settings.worker_mode == "celery":
        return CeleryDispatcher(settings.redis_url, settings.worker_queue)
    return InProcessDispatcher(INPROCESS_RUNNER)
