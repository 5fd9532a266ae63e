"""The reconciler against a real database and a real Redis broker."""

from __future__ import annotations

import uuid

import pytest
import redis

from core import jobs
from core.db import session_scope
from core.dbmodels import File, Job, Tenant
from core.dispatch import CeleryDispatcher
from core.settings import Settings
from tests.dbutil import RecordingDispatcher, sqlite_url
from workers.reconciler import broker_job_ids, reconcile_once

REDIS_URL = "redis://127.0.0.1:6379/12"


def make_job(db_url: str, job_id: str, status: str, **fields) -> None:
    with session_scope(db_url) as session:
        tenant_id = "tenant-r"
        if session.get(Tenant, tenant_id) is None:
            session.add(Tenant(id=tenant_id, name="r"))
            session.flush()
            session.add(
                File(
                    id="file-r",
                    tenant_id=tenant_id,
                    filename="f",
                    purpose="fine-tune",
                    bytes=1,
                    num_examples=1,
                    sha256="0",
                    storage_key="files/tenant-r/file-r.jsonl",
                )
            )
        old = jobs.utcnow().replace(year=2020)
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant_id,
                model="tiny-random",
                training_file_id="file-r",
                preset="adaptive",
                spec={},
                status=status,
                progress={},
                created_at=old,
                updated_at=old,
                **fields,
            )
        )
        session.commit()


@pytest.fixture
def db_url(tmp_path) -> str:
    return sqlite_url(tmp_path)


def test_stale_jobs_are_requeued_and_lost_messages_resent(db_url):
    settings = Settings(database_url=db_url, job_stale_after_seconds=60)
    old = jobs.utcnow().replace(year=2020)
    make_job(db_url, "ftjob-dead", "running", worker_id="gone:1", heartbeat_at=old)
    make_job(db_url, "ftjob-live", "running", worker_id="here:1", heartbeat_at=jobs.utcnow())
    make_job(db_url, "ftjob-lost", "queued")
    make_job(db_url, "ftjob-waiting", "queued")
    make_job(db_url, "ftjob-done", "succeeded")
    dispatcher = RecordingDispatcher()

    report = reconcile_once(dispatcher, settings, in_broker=lambda: ({"ftjob-waiting"}, 1))

    assert report.requeued_stale == ["ftjob-dead"]
    assert report.resent_lost == ["ftjob-lost"]
    assert sorted(dispatcher.submitted) == ["ftjob-dead", "ftjob-lost"]
    with session_scope(db_url) as session:
        dead = jobs.get_job(session, "ftjob-dead")
        assert dead.status == "queued" and dead.worker_id is None
        assert jobs.get_job(session, "ftjob-live").status == "running"


def test_start_up_recovery_takes_every_held_job(db_url):
    settings = Settings(database_url=db_url, job_stale_after_seconds=600)
    make_job(db_url, "ftjob-held", "auditing", worker_id="old:1", heartbeat_at=jobs.utcnow())
    dispatcher = RecordingDispatcher()
    reconcile_once(dispatcher, settings, in_broker=None, stale_after_seconds=0)
    assert dispatcher.submitted == ["ftjob-held"]


def test_broker_job_ids_reads_real_celery_messages():
    client = redis.Redis.from_url(REDIS_URL)
    queue = f"tether.test.{uuid.uuid4().hex[:8]}"
    try:
        CeleryDispatcher(REDIS_URL, queue).submit("ftjob-in-redis")
        ids, depth = broker_job_ids(REDIS_URL, queue)
        assert "ftjob-in-redis" in ids and depth == 1
    finally:
        client.delete(queue)
