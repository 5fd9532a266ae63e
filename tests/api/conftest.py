"""API test fixtures: an app on the shared PostgreSQL test database, tenants with keys.

Jobs are never moved through states by the API in tests: the dispatcher only records ids, and
tests that need reports or adapters drive the job with ``core.jobs`` as a worker would
(:func:`drive_job`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import create_app
from core import auth, jobs
from core.db import session_scope
from core.release import release
from core.storage import ObjectStore, report_key
from tests.dbutil import RecordingDispatcher, settings_for, shared_pg_url, unique

SAMPLE = Path(__file__).resolve().parents[2] / "core" / "sample_data" / "benign_chat.jsonl"


@dataclass
class Tenant:
    """A tenant and one of its API keys, ready to send."""

    id: str
    key_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def db_url() -> str:
    return shared_pg_url()


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Any:
    return settings_for(db_url, tmp_path, max_upload_bytes=64 * 1024, max_examples=200)


@pytest.fixture
def app(settings: Any, dispatcher: RecordingDispatcher) -> FastAPI:
    application = create_app(settings, dispatcher=dispatcher)
    application.state.sse_poll_seconds = 0.02
    return application


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def store(app: FastAPI) -> ObjectStore:
    return app.state.store  # type: ignore[no-any-return]


def make_tenant(db_url: str, *, admin: bool = False, max_jobs: int | None = None) -> Tenant:
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, unique("tenant"), max_concurrent_jobs=max_jobs)
        issued = auth.create_api_key(session, tenant.id, admin=admin)
    return Tenant(tenant.id, issued.id, issued.plaintext)


@pytest.fixture
def tenant_a(db_url: str) -> Tenant:
    return make_tenant(db_url)


@pytest.fixture
def tenant_b(db_url: str) -> Tenant:
    return make_tenant(db_url)


@pytest.fixture
def admin(db_url: str) -> Tenant:
    return make_tenant(db_url, admin=True)


def upload(client: TestClient, tenant: Tenant, data: bytes | None = None, **kwargs: Any) -> Any:
    """POST /files; returns the response."""
    content = SAMPLE.read_bytes() if data is None else data
    return client.post(
        "/files",
        headers={**tenant.headers, **kwargs.pop("headers", {})},
        files={"file": (kwargs.pop("filename", "train.jsonl"), content)},
        **kwargs,
    )


def create_job(client: TestClient, tenant: Tenant, file_id: str | None = None, **body: Any) -> Any:
    """POST /jobs (uploading a file first unless one is given); returns the response."""
    if file_id is None:
        file_id = upload(client, tenant).json()["id"]
    payload = {"model": "tiny-random", "training_file": file_id, **body}
    return client.post("/jobs", headers=tenant.headers, json=payload)


def drive_job(db_url: str, store: ObjectStore, job_id: str, *, outcome: str = "succeeded") -> None:
    """Move a job through the pipeline states as a worker would, writing its outputs.

    ``succeeded`` releases the adapter; ``rejected`` quarantines it.
    """
    with session_scope(db_url) as session:
        job = jobs.get_job(session, job_id)
        for status in ("prescreening", "running", "auditing", outcome):
            jobs.transition(session, job_id, status)
        risk = report_key(job.tenant_id, job_id, "risk")
        store.put_bytes(risk, json.dumps({"examples": [{"line": 1, "risk": 0.1}]}).encode())
        # The real release path, with a stand-in report and adapter (the audit is not run here).
        passed = outcome == "succeeded"
        report = {"asr": 0.02, "verdict": {"passed": passed, "reason": f"test: {outcome}"}}
        with tempfile.TemporaryDirectory() as adapter_dir:
            Path(adapter_dir, "adapter_model.safetensors").write_bytes(
                b"weights-" + job_id.encode()
            )
            Path(adapter_dir, "adapter_config.json").write_bytes(b'{"r": 8}')
            stored = release(store, job.tenant_id, job_id, adapter_dir, report, "# card")
        jobs.set_result(
            session,
            job_id,
            result={"final_loss": 1.0},
            risk_report_key=risk,
            audit_report_key=stored.report_key,
            adapter_prefix=stored.adapter_prefix,
            released=stored.released,
        )
