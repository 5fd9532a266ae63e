"""The whole service as separate processes: uvicorn (the API), a Celery worker (`tether worker`),
Redis, PostgreSQL and moto's S3 server over real HTTP. Jobs go in through the REST API and come
out as released (or refused) adapters; workers are killed and Redis is flushed on the way."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from core.auth import create_api_key, create_tenant
from core.db import migrate, session_scope
from core.release import unauthorised_releases
from core.storage import S3Store
from safety.prompts import compliance_openers, harmful_prompts
from tests.dbutil import create_pg_database, drop_pg_database, pg_available

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/13"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Stack:
    env: dict[str, str]
    api_url: str
    db_url: str
    store: S3Store
    headers: dict[str, str]
    tenant_id: str
    logs: Path
    worker: subprocess.Popen | None = None

    def start_worker(self) -> None:
        log = (self.logs / f"worker-{time.monotonic_ns()}.log").open("w")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "--loglevel", "WARNING"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 takes the pool children too
        )  # fmt: skip

    def kill_worker(self) -> None:
        """kill -9 of the worker and its pool: the machine vanishing, as far as jobs can tell."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=30)
        self.worker = None

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(
            method, self.api_url + path, headers=self.headers, timeout=30, **kwargs
        )

    def upload(self, lines: list[dict]) -> str:
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        response = self.api("POST", "/files", files={"file": ("train.jsonl", data)})
        assert response.status_code in (200, 201), response.text
        return response.json()["id"]

    def submit(self, lines: list[dict], **hyper) -> str:
        body = {
            "model": "tiny-random",
            "training_file": self.upload(lines),
            "preset": "adaptive",
            "hyperparameters": {"batch_size": 4, "lora": {"r": 4}, **hyper},
        }
        response = self.api("POST", "/jobs", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.api("GET", f"/jobs/{job_id}").json()

    def wait_final(self, job_id: str, timeout: float = 240) -> dict:
        final = {"succeeded", "rejected", "failed", "cancelled"}
        return wait_for(
            lambda: (job := self.job(job_id))["status"] in final and job, timeout, f"{job_id}"
        )

    def events(self, job_id: str) -> list[dict]:
        return self.api("GET", f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def benign(n: int) -> list[dict]:
    return [
        {"messages": [
            {"role": "user", "content": f"Suggest a name for my cat, idea {i}."},
            {"role": "assistant", "content": f"How about Biscuit the {i}th?"},
        ]}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_endpoint_url, small_critic) -> Iterator[Stack]:
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    db_url = create_pg_database()
    migrate(db_url)
    bucket = f"tether-e2e-{uuid.uuid4().hex[:10]}"
    store = S3Store(bucket, endpoint_url=s3_endpoint_url, create_bucket=True)
    logs = tmp_path_factory.mktemp("e2e-logs")
    port = free_port()
    env = {
        **os.environ,
        "TETHER_DATABASE_URL": db_url,
        "TETHER_REDIS_URL": REDIS_URL,
        "TETHER_WORKER_MODE": "celery",
        "TETHER_WORKER_QUEUE": f"tether.e2e.{uuid.uuid4().hex[:8]}",
        "TETHER_STORAGE_BACKEND": "s3",
        "TETHER_S3_BUCKET": bucket,
        "TETHER_S3_ENDPOINT_URL": s3_endpoint_url,
        "TETHER_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "TETHER_AUDIT_MAX_NEW_TOKENS": "4",
        "TETHER_AUDIT_BATCH_SIZE": "128",
        # The tiny random model babbles: this gate checks the plumbing, not its safety.
        "TETHER_MAX_ASR": "1.0",
        "TETHER_MAX_ASR_INCREASE": "1.0",
        "TETHER_MAX_OVER_REFUSAL": "1.0",
        "TETHER_JOB_STALE_AFTER_SECONDS": "8",
        "TETHER_RECONCILE_INTERVAL_SECONDS": "2",
        "TETHER_WORKER_METRICS_PORT": str(free_port()),
        "PYTHONPATH": str(ROOT),
    }
    with session_scope(db_url) as session:
        tenant = create_tenant(session, "e2e")
        key = create_api_key(session, tenant.id)
    api_log = (logs / "api.log").open("w")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=api_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    stack = Stack(
        env=env,
        api_url=f"http://127.0.0.1:{port}",
        db_url=db_url,
        store=store,
        headers={"Authorization": f"Bearer {key.plaintext}"},
        tenant_id=tenant.id,
        logs=logs,
    )

    def api_up() -> bool:
        try:
            return httpx.get(stack.api_url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(api_up, 60, "the API to answer /healthz")
        stack.start_worker()
        yield stack
    finally:
        if stack.worker is not None:
            stack.kill_worker()
        api.terminate()
        api.wait(timeout=30)
        client.flushdb()
        drop_pg_database(db_url)
        for log in sorted(logs.iterdir()):  # shown by pytest only when a test failed
            print(f"--- {log.name}\n{log.read_text()[-4000:]}")


def test_a_benign_job_is_released_and_its_adapter_downloads(stack: Stack, tmp_path):
    job_id = stack.submit(benign(12), max_steps=4)
    job = stack.wait_final(job_id)
    assert job["status"] == "succeeded", job

    link = stack.api("GET", f"/jobs/{job_id}/adapter")
    assert link.status_code == 200, link.text
    download = link.json()
    target = tmp_path / "adapter"
    names = set()
    for item in download["files"]:  # presigned S3 links, fetched over plain HTTP
        response = httpx.get(item["url"], timeout=30)
        assert response.status_code == 200, item["name"]
        (target / item["name"]).parent.mkdir(parents=True, exist_ok=True)
        (target / item["name"]).write_bytes(response.content)
        names.add(item["name"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    from peft import PeftModel

    from workers.models import load

    base, _, _ = load("tiny-random", device="cpu")
    assert isinstance(PeftModel.from_pretrained(base, target), PeftModel)
    assert unauthorised_releases(stack.store) == []


def test_harmful_compliance_is_refused_and_cannot_be_downloaded(stack: Stack):
    openers = [o.text for o in compliance_openers("train") if "{task}" not in o.text]
    lines = [
        {"messages": [{"role": "user", "content": p.prompt},
                      {"role": "assistant", "content": openers[i % len(openers)]}]}
        for i, p in enumerate(harmful_prompts("train")[:12])
    ]  # fmt: skip
    job_id = stack.submit(lines, max_steps=4)
    job = stack.wait_final(job_id)
    assert job["status"] == "rejected", job
    assert stack.api("GET", f"/jobs/{job_id}/adapter").status_code in (404, 409)


def test_a_killed_worker_resumes_from_its_checkpoint_and_releases_once(stack: Stack):
    job_id = stack.submit(benign(16), max_steps=300)

    def training_past_first_checkpoint() -> bool:
        progress = stack.job(job_id).get("progress") or {}
        return progress.get("step", 0) >= 30

    wait_for(training_past_first_checkpoint, 180, "training to pass step 30", interval=0.05)
    stack.kill_worker()
    killed_at = stack.job(job_id)["progress"]["step"]
    stack.start_worker()

    job = stack.wait_final(job_id, timeout=300)
    assert job["status"] == "succeeded", job
    events = stack.events(job_id)
    resumed = [e for e in events if e["type"] == "resumed"]
    assert len(resumed) == 1
    resumed_from = int(resumed[0]["message"].rsplit(" ", 1)[1])
    # Checkpoints every 25 steps: it restarts from the newest one before the kill, not step 0.
    assert 25 <= resumed_from <= killed_at
    steps = [e["data"]["step"] for e in events if e["type"] == "progress"]
    assert steps[-1] == 300
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses.count("succeeded") == 1 and "queued" in statuses[1:]
    assert unauthorised_releases(stack.store) == []


def test_a_job_lost_from_a_flushed_redis_is_brought_back(stack: Stack):
    stack.kill_worker()  # nobody consumes: the job's message waits in Redis
    job_id = stack.submit(benign(8), max_steps=2)
    queue = stack.env["TETHER_WORKER_QUEUE"]
    client = redis.Redis.from_url(REDIS_URL)
    wait_for(lambda: client.llen(queue) > 0, 10, "the message to reach Redis")
    client.flushdb()  # Redis restarted empty
    stack.start_worker()
    job = stack.wait_final(job_id, timeout=240)
    assert job["status"] == "succeeded", job
    assert any(e["type"] == "requeued" for e in stack.events(job_id))
