"""The OpenAI-compatible routes, driven by the official ``openai`` SDK against a running server.

:func:`serve` (uvicorn in a thread on a free port) is shared with the SDK and CLI tests.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from api.routers.openai_compat import BASE_LEARNING_RATE
from core import jobs
from core.db import session_scope
from tests.api.conftest import SAMPLE, Tenant, create_job, drive_job, upload


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.fixture
def base_url(app: FastAPI) -> Iterator[str]:
    with serve(app) as url:
        yield url


@pytest.fixture
def sdk(base_url: str, tenant_a: Tenant) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=tenant_a.key, max_retries=0) as c:
        yield c


def extra(obj: openai.BaseModel) -> dict[str, Any]:
    """The fields Tether adds to OpenAI's objects."""
    return obj.model_extra or {}


def test_openai_sdk_drives_files_and_jobs(
    sdk: openai.OpenAI, base_url: str, dispatcher, tenant_a: Tenant
):
    uploaded = sdk.files.create(file=("train.jsonl", SAMPLE.read_bytes()), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    assert uploaded.bytes == len(SAMPLE.read_bytes()) and uploaded.status == "processed"
    assert sdk.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert uploaded.id in [f.id for f in sdk.files.list()]

    job = sdk.fine_tuning.jobs.create(
        model="tiny-random",
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5},
        seed=7,
        suffix="support-bot",
        extra_body={"preset": "paper"},
    )
    assert job.object == "fine_tuning.job" and job.status == "queued"
    assert dispatcher.submitted == [job.id]
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    assert job.seed == 7 and job.organization_id == tenant_a.id
    assert job.fine_tuned_model is None and job.error is None
    assert extra(job)["preset"] == "paper" and extra(job)["tether_status"] == "queued"
    assert extra(job)["user_provided_suffix"] == "support-bot"

    # The native API sees the same job, with OpenAI's hyperparameters mapped onto Tether's.
    native = httpx.get(f"{base_url}/jobs/{job.id}", headers=tenant_a.headers).json()
    assert native["preset"] == "paper"
    hyperparameters = native["hyperparameters"]
    assert (hyperparameters["epochs"], hyperparameters["batch_size"]) == (2, 4)
    assert hyperparameters["learning_rate"] == pytest.approx(0.5 * BASE_LEARNING_RATE)
    assert hyperparameters["seed"] == 7
    retrieved = sdk.fine_tuning.jobs.retrieve(job.id)
    assert retrieved.id == job.id and retrieved.training_file == uploaded.id
    assert job.id in [j.id for j in sdk.fine_tuning.jobs.list(limit=5)]

    events = list(sdk.fine_tuning.jobs.list_events(job.id))
    assert [extra(e)["tether_type"] for e in events][:2] == ["status", "model_suffix"]
    assert extra(events[-1])["tether_type"] == "created"  # newest first
    assert all(e.id.startswith("ftevent-") for e in events)

    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert list(sdk.fine_tuning.jobs.checkpoints.list(job.id)) == []

    with pytest.raises(openai.NotFoundError) as missing:
        sdk.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    assert missing.value.code == "job_not_found"
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.cancel(job.id)


def test_method_hyperparameters_and_pagination(sdk: openai.OpenAI, client, tenant_a: Tenant):
    file_id = upload(client, tenant_a).json()["id"]
    created = [
        sdk.fine_tuning.jobs.create(
            model="tiny-random",
            training_file=file_id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
        )
        for _ in range(3)
    ]
    assert created[0].hyperparameters.n_epochs == 3
    assert extra(created[0])["preset"] == "adaptive"
    page = sdk.fine_tuning.jobs.list(limit=2)
    assert page.has_more and [j.id for j in page.data] == [created[2].id, created[1].id]
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=2, after=created[1].id).data] == [
        created[0].id
    ]
    everything = [j.id for j in sdk.fine_tuning.jobs.list(limit=1)]  # auto-paginates
    assert everything == [c.id for c in reversed(created)]


def test_released_and_rejected_jobs_map_to_openai(
    sdk: openai.OpenAI, client, tenant_a: Tenant, db_url, store
):
    ok = create_job(client, tenant_a).json()["id"]
    with session_scope(db_url) as session:
        jobs.update_progress(session, ok, {"step": 12, "total_steps": 12, "loss": 1.25})
    drive_job(db_url, store, ok)
    done = sdk.fine_tuning.jobs.retrieve(ok)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == f"ft:tiny-random:{tenant_a.id}::{ok}"
    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(ok))
    assert [(c.step_number, c.metrics.train_loss) for c in checkpoints] == [(12, 1.25)]
    assert checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model

    bad = create_job(client, tenant_a).json()["id"]
    drive_job(db_url, store, bad, outcome="rejected")
    rejected = sdk.fine_tuning.jobs.retrieve(bad)
    assert rejected.status == "failed" and rejected.fine_tuned_model is None
    assert rejected.error is not None and rejected.error.code == "rejected_by_safety_audit"
    assert extra(rejected)["tether_status"] == "rejected"


def test_errors_have_openai_shape(sdk: openai.OpenAI, client, tenant_a: Tenant):
    with pytest.raises(openai.BadRequestError) as purpose:
        sdk.files.create(file=("train.jsonl", SAMPLE.read_bytes()), purpose="assistants")
    assert purpose.value.code == "invalid_purpose" and purpose.value.param == "purpose"

    with pytest.raises(openai.UnprocessableEntityError) as bad_file:
        sdk.files.create(file=("bad.jsonl", b'{"messages": 3}\n'), purpose="fine-tune")
    assert bad_file.value.body["line"] == 1  # type: ignore[index]

    file_id = upload(client, tenant_a).json()["id"]
    with pytest.raises(openai.BadRequestError) as method:
        sdk.fine_tuning.jobs.create(
            model="tiny-random", training_file=file_id, method={"type": "dpo"}
        )
    assert method.value.code == "unsupported_method"
    with pytest.raises(openai.NotFoundError) as model:
        sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=file_id)
    assert model.value.code == "model_not_found" and model.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.fine_tuning.jobs.create(
            model="tiny-random", training_file=file_id, extra_body={"preset": "yolo"}
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(sdk.base_url), api_key="nope", max_retries=0).files.list()
