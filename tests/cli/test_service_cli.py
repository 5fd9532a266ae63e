"""``tether serve``, ``tether keys`` and ``tether jobs``: keys against the database, jobs against a
running API server (uvicorn, PostgreSQL), serve's wiring with uvicorn's loop left out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from cli.service import jobs_app, keys_app, serve
from core import auth
from core.db import current_revision, session_scope
from core.dispatch import InProcessDispatcher, set_dispatcher
from core.settings import get_settings
from tests.api.conftest import SAMPLE, Tenant, drive_job, make_tenant
from tests.api.test_openai_compat import serve as serve_in_thread
from tests.dbutil import RecordingDispatcher, settings_for, shared_pg_url, unique

cli = typer.Typer()
cli.add_typer(keys_app, name="keys")
cli.add_typer(jobs_app, name="jobs")
cli.command("serve")(serve)
runner = CliRunner()


class StandInWorker(RecordingDispatcher):
    """Records jobs; with ``finish`` set, moves each to ``succeeded`` shortly after it arrives."""

    def __init__(self, db_url: str, store: Any) -> None:
        super().__init__()
        self.db_url = db_url
        self.store = store
        self.finish = False

    def submit(self, job_id: str) -> None:
        super().submit(job_id)
        if self.finish:
            threading.Timer(0.2, drive_job, (self.db_url, self.store, job_id)).start()


@dataclass
class Api:
    app: Any
    tenant: Tenant
    worker: StandInWorker


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """A running API; TETHER_API_URL / TETHER_API_KEY point the CLI at it as a tenant."""
    db_url = shared_pg_url()
    app = create_app(settings_for(db_url, tmp_path))
    app.state.dispatcher = worker = StandInWorker(db_url, app.state.store)
    app.state.sse_poll_seconds = 0.02
    tenant = make_tenant(db_url)
    with serve_in_thread(app) as url:
        monkeypatch.setenv("TETHER_API_URL", url)
        monkeypatch.setenv("TETHER_API_KEY", tenant.key)
        yield Api(app, tenant, worker)


def test_keys_create_makes_the_tenant_once_and_prints_a_working_key(
    monkeypatch: pytest.MonkeyPatch,
):
    db_url = shared_pg_url()
    monkeypatch.setenv("TETHER_DATABASE_URL", db_url)
    name = unique("acme")
    first = runner.invoke(cli, ["keys", "create", "--tenant", name])
    assert first.exit_code == 0, first.output
    second = runner.invoke(cli, ["keys", "create", "--tenant", name, "--admin"])
    assert second.exit_code == 0, second.output
    assert "new tenant" in first.stderr and "new tenant" not in second.stderr
    with session_scope(db_url) as session:
        user = auth.authenticate(session, first.stdout.strip())
        operator = auth.authenticate(session, second.stdout.strip())
    assert user.tenant_id == operator.tenant_id
    assert not user.is_admin and operator.is_admin


def test_keys_create_explains_an_unmigrated_database(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TETHER_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    result = runner.invoke(cli, ["keys", "create", "--tenant", "acme"])
    assert result.exit_code == 1 and "migrated" in result.stderr


def test_jobs_commands_submit_list_get_cancel_download(api: Api, tmp_path: Path):
    submitted = runner.invoke(cli, ["jobs", "submit", str(SAMPLE), "--model", "tiny-random"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    assert job_id.startswith("ftjob-")

    listed = runner.invoke(cli, ["jobs", "list"])
    assert listed.exit_code == 0 and job_id in listed.stdout and "queued" in listed.stdout
    got = runner.invoke(cli, ["jobs", "get", job_id])
    assert got.exit_code == 0 and '"preset": "adaptive"' in got.stdout
    cancelled = runner.invoke(cli, ["jobs", "cancel", job_id])
    assert cancelled.stdout.strip() == f"{job_id} cancelled"
    again = runner.invoke(cli, ["jobs", "cancel", job_id])
    assert again.exit_code == 1 and "job_finished" in again.stderr

    other = runner.invoke(
        cli, ["jobs", "submit", str(SAMPLE), "--model", "tiny-random", "--max-steps", "3"]
    )
    other_id = other.stdout.strip()
    drive_job(shared_pg_url(), api.app.state.store, other_id)
    out = tmp_path / "adapter"
    downloaded = runner.invoke(cli, ["jobs", "download", other_id, "--out", str(out)])
    assert downloaded.exit_code == 0, downloaded.output
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights-" + other_id.encode()

    missing = runner.invoke(cli, ["jobs", "get", "ftjob-000000000000000000000000"])
    assert missing.exit_code == 1 and "job_not_found" in missing.stderr
    bad_key = runner.invoke(cli, ["jobs", "list", "--api-key", "tth_000000000000_nope"])
    assert bad_key.exit_code == 1 and "HTTP 401" in bad_key.stderr


def test_jobs_submit_wait_exits_with_the_outcome(api: Api):
    api.worker.finish = True
    result = runner.invoke(cli, ["jobs", "submit", str(SAMPLE), "--model", "tiny-random", "--wait"])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.stderr


def test_serve_migrates_then_runs_the_app_with_an_inprocess_worker(tmp_path: Path, monkeypatch):
    db_url = f"sqlite:///{tmp_path / 'tether.db'}"
    monkeypatch.setenv("TETHER_DATABASE_URL", db_url)
    monkeypatch.setenv("TETHER_DATA_DIR", str(tmp_path))
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))

    skipped = runner.invoke(cli, ["serve", "--no-migrate"])
    assert skipped.exit_code == 0, skipped.output
    assert current_revision(db_url) is None
    get_settings.cache_clear()
    try:
        result = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "8123"])
        assert result.exit_code == 0, result.output
        assert current_revision(db_url) is not None
        app = calls[-1]["app"]
        assert (calls[-1]["host"], calls[-1]["port"]) == ("0.0.0.0", 8123)
        assert isinstance(app.state.dispatcher, InProcessDispatcher)
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        for call in calls:
            if isinstance(call["app"].state.dispatcher, InProcessDispatcher):
                call["app"].state.dispatcher.shutdown(wait=False)
        set_dispatcher(None)
