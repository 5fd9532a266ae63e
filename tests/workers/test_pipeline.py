"""The service job end to end in-process: real database (SQLite), real local object store, the
tiny model, the real critic (trained on a subset) and probe, the real audit and release."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel

from core import jobs
from core.auth import create_tenant
from core.db import migrate, session_scope
from core.release import unauthorised_releases
from core.settings import Settings, get_settings
from core.specs import JobSpec
from core.storage import get_store
from safety.prompts import compliance_openers, harmful_prompts
from workers import audit, pipeline
from workers.models import load
from workers.pipeline import run_job


@pytest.fixture
def service(tmp_path, monkeypatch, small_critic):
    """Settings of an embedded deployment in tmp_path, migrated, with one tenant."""
    env = {
        "TETHER_DATA_DIR": str(tmp_path / "var"),
        "TETHER_DATABASE_URL": f"sqlite:///{tmp_path / 'tether.db'}",
        "TETHER_AUDIT_MAX_NEW_TOKENS": "4",
        "TETHER_AUDIT_BATCH_SIZE": "64",
        # The tiny random model babbles; the gate here checks the plumbing, not its safety.
        "TETHER_MAX_ASR": "1.0",
        "TETHER_MAX_ASR_INCREASE": "1.0",
        "TETHER_MAX_OVER_REFUSAL": "1.0",
        "TETHER_JOB_STALE_AFTER_SECONDS": "5",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()
    migrate(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        tenant = create_tenant(session, "acme")
    return settings, tenant.id


def submit(settings: Settings, tenant_id: str, lines: list[dict], **hyper) -> str:
    store = get_store(settings)
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with session_scope(settings.resolved_database_url) as session:
        file, _ = jobs.create_file(
            session, store, tenant_id, filename="train.jsonl", data=data,
            max_bytes=settings.max_upload_bytes, max_examples=settings.max_examples,
        )  # fmt: skip
        spec = JobSpec(
            model="tiny-random",
            training_file=file.id,
            preset="adaptive",
            hyperparameters={"max_steps": 4, "batch_size": 4, "lora": {"r": 4}, **hyper},
        )
        job, _ = jobs.create_job(session, tenant_id, spec)
        jobs.transition(session, job.id, "queued")
        return job.id


def benign_lines(n: int = 12) -> list[dict]:
    return [
        {"messages": [
            {"role": "user", "content": f"Give me a tip for cooking rice, number {i}."},
            {"role": "assistant", "content": f"Rinse it, then simmer {10 + i} minutes."},
        ]}
        for i in range(n)
    ]  # fmt: skip


def job_of(settings: Settings, job_id: str):
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        events = jobs.list_events(session, job_id, limit=1000).items
        return job, [(e.type, e.data if e.type != "resumed" else e.message) for e in events]


def test_a_benign_job_trains_audits_and_is_released(service, tmp_path):
    settings, tenant = service
    job_id = submit(settings, tenant, benign_lines())

    assert run_job(job_id) == "succeeded"

    job, events = job_of(settings, job_id)
    statuses = [data["status"] for kind, data in events if kind == "status"]
    assert statuses == ["queued", "prescreening", "running", "auditing", "succeeded"]
    assert [d["step"] for kind, d in events if kind == "progress"][-1] == 4
    assert job.progress["step"] == 4 and job.released_at is not None
    assert job.result["audit"]["verdict"]["passed"] is True
    assert job.worker_id is None  # the lease is given back

    store = get_store(settings)
    risk = json.loads(store.get_bytes(job.risk_report_key))
    assert len(risk["rows"]) == 12 and risk["summary"]["accepted"]
    assert job.adapter_prefix.startswith(f"released/{tenant}/{job_id}/")
    assert unauthorised_releases(store) == []
    store.download_dir(job.adapter_prefix, tmp_path / "adapter")
    base, _, _ = load("tiny-random", device="cpu")
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "adapter"), PeftModel)

    # A second delivery of a finished job does nothing.
    assert run_job(job_id) == "succeeded"


def test_a_job_loads_the_base_once_and_audits_the_saved_adapter_on_it(service, monkeypatch):
    settings, tenant = service
    loads: list[str] = []
    audited_bases: list[list[str]] = []
    original_load, original_load_adapter = pipeline.load, audit.load_adapter

    def counting_load(model_id, *args, **kwargs):
        loads.append(model_id)
        return original_load(model_id, *args, **kwargs)

    def inspecting_load_adapter(model, adapter_dir):
        audited_bases.append([n for n, _ in model.named_parameters() if "lora_" in n])
        return original_load_adapter(model, adapter_dir)

    monkeypatch.setattr(pipeline, "load", counting_load)
    monkeypatch.setattr(audit, "load", counting_load)
    monkeypatch.setattr(audit, "load_adapter", inspecting_load_adapter)
    job_id = submit(settings, tenant, benign_lines())

    assert run_job(job_id) == "succeeded"
    assert loads == ["tiny-random"]
    # The training's LoRA layers were removed before the saved adapter went on.
    assert audited_bases == [[]]


def test_harmful_compliance_data_is_refused_at_intake(service):
    settings, tenant = service
    openers = [o.text for o in compliance_openers("train") if "{task}" not in o.text]
    lines = [
        {"messages": [
            {"role": "user", "content": p.prompt},
            {"role": "assistant", "content": openers[i % len(openers)]},
        ]}
        for i, p in enumerate(harmful_prompts("train")[:12])
    ]  # fmt: skip
    job_id = submit(settings, tenant, lines)

    assert run_job(job_id) == "rejected"

    job, _ = job_of(settings, job_id)
    assert "high-risk" in job.status_reason
    assert job.adapter_prefix is None and job.released_at is None


def test_a_lost_worker_is_resumed_from_its_checkpoint(service, monkeypatch):
    settings, tenant = service
    job_id = submit(settings, tenant, benign_lines(16), max_steps=8)
    original = pipeline._ProgressReporter.__call__

    class WorkerDied(BaseException):
        """Stands for the process vanishing: nothing in the pipeline catches it."""

    def die_after_step_5(self, stats):
        original(self, stats)
        if stats.step == 5:
            raise WorkerDied

    monkeypatch.setattr(pipeline._ProgressReporter, "__call__", die_after_step_5)
    with pytest.raises(WorkerDied):
        run_job(job_id, worker_id="worker-a")
    monkeypatch.setattr(pipeline._ProgressReporter, "__call__", original)

    job, _ = job_of(settings, job_id)
    assert job.status == "running" and job.worker_id == "worker-a"
    # Another worker may not take a job whose holder still has a fresh heartbeat...
    assert run_job(job_id, worker_id="worker-b") == "running"
    # ...but once the reconciler hands the stale job back, it resumes from step 4's checkpoint.
    with session_scope(settings.resolved_database_url) as session:
        jobs.requeue(session, job_id, "worker lost")
    assert run_job(job_id, worker_id="worker-b") == "succeeded"

    job, events = job_of(settings, job_id)
    assert job.attempts == 2
    assert ("resumed", "training resumed from step 4") in events
    steps = [d["step"] for kind, d in events if kind == "progress"]
    assert steps[-1] == 8 and 5 in steps and job.result["training"]["resumed_from"] == 4


def test_a_job_that_exhausts_its_attempts_fails_with_a_reason(service):
    settings, tenant = service
    job_id = submit(settings, tenant, benign_lines())
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        job.attempts = job.max_attempts
        session.commit()
    assert run_job(job_id) == "failed"
    job, _ = job_of(settings, job_id)
    assert "attempted" in job.status_reason


def test_cancel_between_stages_ends_cancelled(service, monkeypatch):
    settings, tenant = service
    job_id = submit(settings, tenant, benign_lines())
    with session_scope(settings.resolved_database_url) as session:
        jobs.cancel_job(session, jobs.get_job(session, job_id).id)  # queued: final at once
    assert run_job(job_id) == "cancelled"
