"""The Python SDK against a running API server (uvicorn, PostgreSQL); nothing is mocked.

Jobs are moved through their states as a worker would (``tests.api.conftest.drive_job``) in a
thread while the SDK follows them. Retries are checked with a real server behind a proxy-like
ASGI wrapper that answers 503 on cue.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.app import create_app
from client import (
    Client,
    Conflict,
    ConnectionFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    ValidationFailed,
    parse_sse,
)
from core import jobs
from core.db import session_scope
from core.storage import ObjectStore
from tests.api.conftest import SAMPLE, Tenant, drive_job, make_tenant
from tests.api.test_openai_compat import serve
from tests.dbutil import RecordingDispatcher, settings_for, shared_pg_url

Rule = Callable[[Scope], bool]


@dataclass
class Flaky:
    """An ASGI wrapper that answers 503 to requests matching a rule, a set number of times."""

    app: ASGIApp
    rules: list[list[Any]] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)

    def fail(self, rule: Rule, times: int) -> None:
        self.rules.append([rule, times])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.hits[f"{scope['method']} {scope['path']}"] += 1
            for rule in self.rules:
                if rule[1] > 0 and rule[0](scope):
                    rule[1] -= 1
                    body = {"error": {"code": "unavailable", "message": "try again"}}
                    await JSONResponse(body, status_code=503)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def request_to(method: str, path_end: str, query: str = "") -> Rule:
    return lambda scope: (
        scope["method"] == method
        and scope["path"].endswith(path_end)
        and query in scope["query_string"].decode()
    )


@dataclass
class Server:
    url: str
    db_url: str
    store: ObjectStore
    dispatcher: RecordingDispatcher
    flaky: Flaky
    tenant: Tenant

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("backoff", 0.01)
        return Client(self.url, self.tenant.key, **kwargs)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    db_url = shared_pg_url()
    settings = settings_for(db_url, tmp_path, max_upload_bytes=64 * 1024, max_examples=200)
    dispatcher = RecordingDispatcher()
    app = create_app(settings, dispatcher=dispatcher)
    app.state.sse_poll_seconds = 0.02
    flaky = Flaky(app)
    with serve(flaky) as url:
        yield Server(url, db_url, app.state.store, dispatcher, flaky, make_tenant(db_url))


@pytest.fixture
def tether(server: Server) -> Iterator[Client]:
    with server.client() as sdk:
        yield sdk


def work_on(server: Server, job_id: str, outcome: str = "succeeded", delay: float = 0.2) -> None:
    """In a thread: report three training steps, then finish the job as a worker would."""

    def run() -> None:
        time.sleep(delay)
        with session_scope(server.db_url) as session:
            for step in (1, 2, 3):
                data = {"step": step, "total_steps": 3, "loss": 2.0 / step, "beta": 0.1}
                jobs.update_progress(session, job_id, data)
                jobs.add_event(session, job_id, "progress", f"step {step}/3", data)
        drive_job(server.db_url, server.store, job_id, outcome=outcome)

    threading.Thread(target=run, daemon=True).start()


def test_files_and_jobs_round_trip(tether: Client, server: Server):
    file = tether.files.upload(SAMPLE)
    assert file["filename"] == SAMPLE.name and file["num_examples"] > 0
    assert tether.files.get(file["id"]) == file
    again = tether.files.upload(SAMPLE.read_bytes(), idempotency_key="upload-1")
    assert tether.files.upload(SAMPLE.read_bytes(), idempotency_key="upload-1") == again
    assert [f["id"] for f in tether.files.list(page_size=1)] == [again["id"], file["id"]]

    created = [
        tether.jobs.create(
            "tiny-random", file["id"], preset="paper", hyperparameters={"max_steps": 5}
        )
        for _ in range(3)
    ]
    assert created[0]["status"] == "queued" and created[0]["preset"] == "paper"
    assert created[0]["hyperparameters"]["max_steps"] == 5
    assert server.dispatcher.submitted == [job["id"] for job in created]
    assert tether.jobs.get(created[0]["id"])["id"] == created[0]["id"]
    newest_first = [job["id"] for job in reversed(created)]
    assert [job["id"] for job in tether.jobs.list(page_size=1)] == newest_first
    assert [job["id"] for job in tether.jobs.list(limit=2, page_size=1)] == newest_first[:2]

    cancelled = tether.jobs.cancel(created[0]["id"])
    assert cancelled["status"] == "cancelled"
    assert [job["id"] for job in tether.jobs.list(status="cancelled")] == [created[0]["id"]]
    with pytest.raises(Conflict) as finished:
        tether.jobs.cancel(created[0]["id"])
    assert finished.value.code == "job_finished" and finished.value.status == 409

    events = tether.jobs.events(created[0]["id"])
    assert events[0]["type"] == "created" and events[-1]["type"] == "status"
    assert tether.jobs.events(created[0]["id"], after=events[0]["id"]) == events[1:]


def test_errors_are_typed_from_the_server_body(tether: Client, server: Server):
    with pytest.raises(NotFound) as missing:
        tether.jobs.get("ftjob-000000000000000000000000")
    assert missing.value.code == "job_not_found" and missing.value.param == "job_id"

    with pytest.raises(ValidationFailed) as invalid:
        tether.files.upload(b'{"messages": []}\nnot json\n')
    assert invalid.value.line == 1 and len(invalid.value.details) == 2
    assert "line 1" in str(invalid.value)

    with pytest.raises(PayloadTooLarge):
        tether.files.upload(b"x" * (64 * 1024 + 1))

    file_id = tether.files.upload(SAMPLE)["id"]
    tether.jobs.create("tiny-random", file_id, idempotency_key="job-1")
    with pytest.raises(Conflict) as reused:
        tether.jobs.create("tiny-random", file_id, preset="off", idempotency_key="job-1")
    assert reused.value.code == "idempotency_key_reused"
    with pytest.raises(ValidationFailed) as preset:
        tether.jobs.create("tiny-random", file_id, preset="yolo")
    assert preset.value.param == "preset"

    limited = make_tenant(server.db_url, max_jobs=0)
    with Client(server.url, limited.key) as other:
        other_file = other.files.upload(SAMPLE)["id"]
        with pytest.raises(RateLimited):
            other.jobs.create("tiny-random", other_file)
        with pytest.raises(NotFound):  # tenant isolation holds through the SDK too
            other.files.get(file_id)
    with Client(server.url, "tth_000000000000_nope") as stranger, pytest.raises(Unauthorized):
        stranger.jobs.get("ftjob-x")


def test_idempotent_requests_are_retried_and_others_are_not(server: Server):
    flaky = server.flaky
    with server.client(max_retries=3) as tether:
        flaky.fail(request_to("GET", "/models"), times=2)
        assert tether.request("GET", "/models")["data"]
        assert flaky.hits["GET /models"] == 3

        flaky.fail(request_to("POST", "/files"), times=2)
        first = tether.files.upload(SAMPLE, idempotency_key="retry-me")
        assert flaky.hits["POST /files"] == 3
        assert tether.files.upload(SAMPLE, idempotency_key="retry-me")["id"] == first["id"]

        flaky.fail(request_to("POST", "/jobs"), times=1)
        with pytest.raises(ServerError) as once:
            tether.jobs.create("tiny-random", first["id"])  # no key: never sent twice
        assert once.value.status == 503 and flaky.hits["POST /jobs"] == 1

    dead = Client("http://127.0.0.1:9", "tth_000000000000_x", max_retries=1, backoff=0.01)
    with dead, pytest.raises(ConnectionFailed) as down:
        dead.jobs.get("ftjob-x")
    assert down.value.status == 0


def test_wait_follows_the_event_stream_and_downloads_the_adapter(
    tether: Client, server: Server, tmp_path: Path
):
    job = tether.jobs.create("tiny-random", tether.files.upload(SAMPLE)["id"])
    work_on(server, job["id"])
    streamed = list(tether.jobs.stream_events(job["id"]))
    steps = [e["data"]["step"] for e in streamed if e["type"] == "progress"]
    assert steps == [1, 2, 3] and streamed[-1]["data"]["status"] == "succeeded"

    final = tether.jobs.wait(job["id"], progress=True, timeout=20)
    assert final["status"] == "succeeded" and final["adapter_released"]
    assert tether.jobs.risk_report(job["id"])["examples"]
    assert tether.jobs.audit(job["id"])["asr"] == pytest.approx(0.02)
    paths = tether.jobs.download_adapter(job["id"], tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in paths}
    assert all(p.is_file() and p.is_relative_to(tmp_path / "adapter") for p in paths)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert weights.read_bytes() == b"weights-" + job["id"].encode()


def test_wait_falls_back_to_polling_when_the_stream_fails(tether: Client, server: Server):
    job = tether.jobs.create("tiny-random", tether.files.upload(SAMPLE)["id"])
    server.flaky.fail(request_to("GET", "/events", "stream=true"), times=100)
    work_on(server, job["id"], outcome="rejected")
    final = tether.jobs.wait(job["id"], progress=False, timeout=20, poll_interval=0.05)
    assert final["status"] == "rejected" and not final["adapter_released"]
    assert server.flaky.hits[f"GET /jobs/{job['id']}"] >= 2
    with pytest.raises(NotFound):
        tether.jobs.download_adapter(job["id"], "unused")
    with pytest.raises(NotFound):
        tether.jobs.wait("ftjob-000000000000000000000000", progress=False)


def test_wait_times_out_on_a_job_that_does_not_move(tether: Client):
    job = tether.jobs.create("tiny-random", tether.files.upload(SAMPLE)["id"])
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        tether.jobs.wait(job["id"], progress=False, timeout=0.3)
    assert time.monotonic() - started < 5


def test_parse_sse_joins_data_lines_and_reports_comments():
    lines = [": keep-alive", "", "id: 3", 'data: {"a":', "data: 1}", "", "event: end", "data: {}"]
    assert list(parse_sse(lines)) == [
        ("comment", "keep-alive"),
        ("message", '{"a":\n1}'),
        ("end", "{}"),
    ]


def test_client_needs_an_api_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TETHER_API_KEY", raising=False)
    with pytest.raises(ValueError, match="TETHER_API_KEY"):
        Client("http://127.0.0.1:9")
    monkeypatch.setenv("TETHER_API_KEY", "tth_000000000000_x")
    monkeypatch.setenv("TETHER_API_URL", "http://example.invalid:1/")
    assert Client().base_url == "http://example.invalid:1"
