"""The job state machine and the job/event/file domain functions, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from core import auth, jobs
from core.db import session_factory, session_scope
from core.jobs import IllegalTransition, JobStatus
from core.specs import JobSpec
from core.storage import LocalStore
from tests.dbutil import db_url_for, shared_pg_url, unique

LINE = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
).encode()
PIPELINE = ["queued", "prescreening", "running", "auditing", "succeeded"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    return db_url_for(request.param, tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects", "test-secret-key-0123456789")


@pytest.fixture
def new_job(db_url: str, store: LocalStore) -> Callable[..., str]:
    """Makes a job (with its tenant and file) and returns its id."""

    def make(tenant_id: str | None = None, **spec) -> str:
        with session_scope(db_url) as session:
            if tenant_id is None:
                tenant_id = auth.create_tenant(session, unique()).id
            file, _ = jobs.create_file(
                session,
                store,
                tenant_id,
                filename="a.jsonl",
                data=LINE,
                max_bytes=10_000,
                max_examples=10,
            )
            job, _ = jobs.create_job(
                session,
                tenant_id,
                JobSpec(model="tiny-random", training_file=file.id, **spec),
                default_max_concurrent_jobs=100,
            )
            return job.id

    return make


def _walk(db_url: str, job_id: str, statuses: list[str]) -> jobs.Job:
    with session_scope(db_url) as session:
        for status in statuses:
            jobs.transition(session, job_id, status)
        return jobs.get_job(session, job_id)


def test_the_state_machine_is_closed_and_terminal_states_are_final():
    assert set(jobs.TRANSITIONS) == set(JobStatus)
    for status in jobs.TERMINAL_STATUSES:
        assert jobs.TRANSITIONS[status] == frozenset()
    for status in jobs.ACTIVE_STATUSES:
        assert {JobStatus.FAILED, JobStatus.CANCELLED} <= jobs.TRANSITIONS[status]


def test_a_job_walks_the_pipeline_with_timestamps_and_events(db_url, new_job):
    job_id = new_job()

    job = _walk(db_url, job_id, PIPELINE)

    assert job.status == "succeeded"
    assert job.started_at is not None and job.finished_at is not None
    assert job.created_at <= job.started_at <= job.finished_at
    with session_scope(db_url) as session:
        events = jobs.list_events(session, job_id).items
    assert [e.type for e in events] == ["created"] + ["status"] * len(PIPELINE)
    assert [(e.data["previous"], e.data["status"]) for e in events[1:]] == list(
        zip(["validating", *PIPELINE[:-1]], PIPELINE, strict=True)
    )


@pytest.mark.parametrize(
    ("path", "target"),
    [([], "running"), (["queued"], "succeeded"), (PIPELINE, "running"), (["failed"], "queued")],
)
def test_illegal_transitions_raise_naming_both_states(db_url, new_job, path, target):
    job_id = new_job()
    _walk(db_url, job_id, path)
    current = path[-1] if path else "validating"

    with session_scope(db_url) as session:
        with pytest.raises(IllegalTransition) as caught:
            jobs.transition(session, job_id, target)
        assert jobs.get_job(session, job_id).status == current

    assert (caught.value.current, caught.value.target) == (current, target)
    assert repr(current) in str(caught.value) and repr(target) in str(caught.value)


@pytest.mark.parametrize("stop", ["failed", "cancelled"])
def test_failed_and_cancelled_are_reachable_from_every_unfinished_state(db_url, new_job, stop):
    for depth in range(len(PIPELINE)):
        job_id = new_job()
        _walk(db_url, job_id, PIPELINE[:depth])
        assert _walk(db_url, job_id, [stop]).status == stop


def test_redelivery_re_enters_a_stage_or_goes_back_to_the_queue(db_url, new_job):
    job_id = new_job()

    _walk(db_url, job_id, ["queued", "prescreening", "prescreening", "queued", "prescreening"])
    job = _walk(db_url, job_id, ["running", "running", "queued", "prescreening", "running"])

    assert job.status == "running"


def test_a_strict_claim_fails_when_another_worker_claimed_first(db_url, new_job):
    job_id = new_job()
    _walk(db_url, job_id, ["queued"])

    with session_scope(db_url) as session:
        jobs.transition(session, job_id, "prescreening", from_=["queued"])
        with pytest.raises(IllegalTransition):
            jobs.transition(session, job_id, "prescreening", from_=["queued"])


def test_a_stale_copy_cannot_move_a_job_backwards(db_url, new_job):
    job_id = new_job()
    _walk(db_url, job_id, ["queued", "prescreening", "running", "auditing"])
    factory = session_factory(db_url)
    with factory() as stale, factory() as fresh:
        stale_job = jobs.get_job(stale, job_id)
        assert stale_job.status == "auditing"
        jobs.transition(fresh, job_id, "succeeded")

        with pytest.raises(IllegalTransition, match="from 'succeeded' to 'queued'"):
            jobs.transition(stale, job_id, "queued")
        assert jobs.get_job(fresh, job_id).status == "succeeded"


def test_concurrent_update_waits_for_the_row_lock_and_then_loses(store):
    url = shared_pg_url()
    factory = session_factory(url)
    with session_scope(url) as session:
        tenant = auth.create_tenant(session, unique())
    job_id = _pg_job(url, tenant.id, store)
    _walk(url, job_id, ["queued", "prescreening", "running", "auditing"])
    outcome: dict[str, object] = {}

    def reject() -> None:
        with factory() as session:
            try:
                jobs.transition(session, job_id, "rejected")
                outcome["result"] = "moved"
            except IllegalTransition as error:
                outcome["result"] = error

    with factory() as holder:
        # Another worker has updated the row but not committed yet.
        holder.execute(
            text("UPDATE jobs SET status = 'succeeded' WHERE id = :id AND status = 'auditing'"),
            {"id": job_id},
        )
        contender = threading.Thread(target=reject)
        contender.start()
        time.sleep(0.3)
        assert contender.is_alive(), "the second update must wait for the first one's lock"
        holder.commit()
    contender.join(timeout=10)

    error = outcome["result"]
    assert isinstance(error, IllegalTransition)
    assert (error.current, error.target) == ("succeeded", "rejected")


def test_many_racing_finishers_exactly_one_wins(store):
    url = shared_pg_url()
    with session_scope(url) as session:
        tenant = auth.create_tenant(session, unique())
    job_id = _pg_job(url, tenant.id, store)
    _walk(url, job_id, ["queued", "prescreening", "running", "auditing"])
    factory = session_factory(url)
    targets = ["succeeded", "rejected", "failed", "cancelled"] * 2
    barrier = threading.Barrier(len(targets))
    won: list[str] = []

    def finish(target: str) -> None:
        with factory() as session:
            barrier.wait()
            try:
                jobs.transition(session, job_id, target)
                won.append(target)
            except IllegalTransition:
                pass

    threads = [threading.Thread(target=finish, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert len(won) == 1
    with session_scope(url) as session:
        assert jobs.get_job(session, job_id).status == won[0]
        statuses = [e for e in jobs.list_events(session, job_id).items if e.type == "status"]
    assert len(statuses) == 5


def _pg_job(url: str, tenant_id: str, store: LocalStore) -> str:
    with session_scope(url) as session:
        file, _ = jobs.create_file(
            session,
            store,
            tenant_id,
            filename="a.jsonl",
            data=LINE,
            max_bytes=10_000,
            max_examples=10,
        )
        job, _ = jobs.create_job(
            session, tenant_id, JobSpec(model="tiny-random", training_file=file.id)
        )
    return job.id


def test_cancel_is_immediate_before_a_worker_and_a_flag_after(db_url, new_job):
    queued, running = new_job(), new_job()
    _walk(db_url, queued, ["queued"])
    _walk(db_url, running, ["queued", "prescreening", "running"])

    with session_scope(db_url) as session:
        assert jobs.cancel_job(session, queued).status == "cancelled"
        flagged = jobs.cancel_job(session, running)
        assert (flagged.status, flagged.cancel_requested) == ("running", True)
        assert jobs.is_cancel_requested(session, running)
        with pytest.raises(jobs.JobFinishedError):
            jobs.cancel_job(session, queued)
        assert jobs.transition(session, running, "cancelled").status == "cancelled"


def test_attempts_are_capped(db_url, new_job):
    job_id = new_job()
    with session_scope(db_url) as session:
        counts = [jobs.begin_attempt(session, job_id) for _ in range(jobs.DEFAULT_MAX_ATTEMPTS)]
        with pytest.raises(jobs.AttemptsExhaustedError, match="max_attempts 3"):
            jobs.begin_attempt(session, job_id)
    assert counts == [1, 2, 3]


def test_progress_and_results(db_url, new_job):
    job_id = new_job()
    _walk(db_url, job_id, ["queued", "prescreening", "running"])
    with session_scope(db_url) as session:
        assert jobs.update_progress(session, job_id, {"step": 3, "total_steps": 10, "loss": 1.5})
        jobs.set_result(session, job_id, risk_report_key="reports/t/j/risk.json")
        jobs.set_result(session, job_id, result={"final_loss": 0.9})
        job = jobs.get_job(session, job_id)
        assert job.progress == {"step": 3, "total_steps": 10, "loss": 1.5}
        assert (job.risk_report_key, job.result) == ("reports/t/j/risk.json", {"final_loss": 0.9})
        jobs.transition(session, job_id, "failed", "out of memory")
        assert not jobs.update_progress(session, job_id, {"step": 4})
        assert jobs.get_job(session, job_id).status_reason == "out of memory"
        with pytest.raises(jobs.JobNotFoundError):
            jobs.update_progress(session, "ftjob-missing", {})


def test_lists_page_by_cursor(db_url, new_job):
    with session_scope(db_url) as session:
        tenant_id = auth.create_tenant(session, unique()).id
    ids = [new_job(tenant_id) for _ in range(5)]
    with session_scope(db_url) as session:
        jobs.add_event(session, ids[0], "metrics", "step 1", {"loss": 2.0})
        first = jobs.list_jobs(session, tenant_id, limit=3)
        second = jobs.list_jobs(session, tenant_id, limit=3, after=first.last_id)
        events = jobs.list_events(
            session, ids[0], after=jobs.list_events(session, ids[0]).items[0].id
        )

    assert [j.id for j in first.items + second.items] == ids[::-1]
    assert first.has_more and not second.has_more
    assert [(e.type, e.data) for e in events.items] == [("metrics", {"loss": 2.0})]


def test_quota_and_idempotency_at_the_domain_level(db_url, store):
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, unique(), max_concurrent_jobs=1)
        file, _ = jobs.create_file(
            session,
            store,
            tenant.id,
            filename="a.jsonl",
            data=LINE,
            max_bytes=10_000,
            max_examples=10,
        )
        spec = JobSpec(model="tiny-random", training_file=file.id)
        idem = jobs.Idempotency("test", "k1", jobs.body_digest(spec.model_dump(mode="json")))
        job, created = jobs.create_job(session, tenant.id, spec, idempotency=idem)
        replay, created_again = jobs.create_job(session, tenant.id, spec, idempotency=idem)
        with pytest.raises(jobs.QuotaExceededError, match="limit is 1"):
            jobs.create_job(session, tenant.id, spec)
        with pytest.raises(jobs.IdempotencyConflictError):
            jobs.create_job(
                session,
                tenant.id,
                spec,
                idempotency=jobs.Idempotency("test", "k1", jobs.body_digest({"other": 1})),
            )

    assert (created, created_again, replay.id) == (True, False, job.id)
