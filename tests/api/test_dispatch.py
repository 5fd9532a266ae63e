"""How the API hands jobs to workers: by task name over Redis, or to an in-process runner."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
import redis

from core.dispatch import QUEUE_NAME, TASK_NAME, CeleryDispatcher, InProcessDispatcher

#: A Redis database of its own, so no running worker consumes what this test sends.
TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


def test_celery_dispatcher_sends_the_task_by_name_to_the_jobs_queue():
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis is not reachable")
    client.delete(QUEUE_NAME)

    CeleryDispatcher(TEST_REDIS_URL).submit("ftjob-abc")

    raw = client.lpop(QUEUE_NAME)
    client.close()
    assert raw is not None
    message = json.loads(raw)
    assert message["headers"]["task"] == TASK_NAME
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == (["ftjob-abc"], {})


def test_in_process_dispatcher_runs_jobs_one_at_a_time_in_the_background():
    running, seen, overlap = threading.Event(), [], []
    release = threading.Event()

    def runner(job_id: str) -> None:
        if running.is_set():
            overlap.append(job_id)
        running.set()
        seen.append(job_id)
        release.wait(5)
        running.clear()

    dispatcher = InProcessDispatcher(runner)
    started = time.monotonic()
    dispatcher.submit("ftjob-1")
    dispatcher.submit("ftjob-2")
    assert time.monotonic() - started < 1  # submit returns at once
    release.set()
    dispatcher.shutdown(wait=True)

    assert seen == ["ftjob-1", "ftjob-2"] and overlap == []


def test_in_process_worker_thread_does_not_hold_up_exit_and_survives_a_failing_job():
    # A daemon thread: Ctrl-C on `tether serve` must not wait for a long job (start-up recovery
    # requeues it). One job raising must not stop the next one.
    seen: list[str] = []

    def runner(job_id: str) -> None:
        seen.append(job_id)
        if job_id == "ftjob-bad":
            raise RuntimeError("boom")

    dispatcher = InProcessDispatcher(runner)
    dispatcher.submit("ftjob-bad")
    dispatcher.submit("ftjob-good")
    assert dispatcher._thread is not None and dispatcher._thread.daemon
    dispatcher.shutdown(wait=True)

    assert seen == ["ftjob-bad", "ftjob-good"]
    with pytest.raises(RuntimeError, match="shut down"):
        dispatcher.submit("ftjob-late")


def test_in_process_runner_can_be_named_by_path():
    dispatcher = InProcessDispatcher("json:dumps")
    dispatcher.submit("ftjob-1")
    dispatcher.shutdown(wait=True)

    assert dispatcher._resolve() is json.dumps
