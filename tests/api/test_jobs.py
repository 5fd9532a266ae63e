"""Job routes: create (validation, quota, idempotency), list, cancel, events, outputs."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

from fastapi.testclient import TestClient

from api.app import create_app
from core import jobs
from core.db import session_scope
from core.storage import download_signature
from tests.api.conftest import Tenant, create_job, drive_job, make_tenant, upload
from tests.dbutil import FailingDispatcher


def test_create_queues_the_job_and_dispatches_it(client, tenant_a, dispatcher):
    response = create_job(
        client, tenant_a, preset="paper", hyperparameters={"lora": {"r": 4}, "max_steps": 3}
    )

    assert response.status_code == 201
    job = response.json()
    assert job["id"].startswith("ftjob-") and job["status"] == "queued"
    assert job["preset"] == "paper"
    assert job["hyperparameters"]["lora"] == {"r": 4, "alpha": 32.0, "dropout": 0.0}
    assert job["hyperparameters"]["max_steps"] == 3
    assert dispatcher.submitted == [job["id"]]
    assert client.get(f"/jobs/{job['id']}", headers=tenant_a.headers).json() == job
    events = client.get(f"/jobs/{job['id']}/events", headers=tenant_a.headers).json()["data"]
    assert [event["type"] for event in events] == ["created", "status"]


def test_invalid_specs_are_422_naming_the_field(client, tenant_a: Tenant):
    file_id = upload(client, tenant_a).json()["id"]
    cases = {
        "hyperparameters.lora.r": {"hyperparameters": {"lora": {"r": 0}}},
        "preset": {"preset": "maximum"},
        "hyperparameters.learning_rate": {"hyperparameters": {"learning_rate": -1}},
        "surprise": {"surprise": True},
    }
    for param, extra in cases.items():
        response = create_job(client, tenant_a, file_id, **extra)
        error = response.json()["error"]
        assert response.status_code == 422, param
        assert (error["code"], error["param"]) == ("invalid_request", param)


def test_unknown_model_and_foreign_file_are_404(client, tenant_a: Tenant, tenant_b: Tenant):
    file_a = upload(client, tenant_a).json()["id"]

    model = create_job(client, tenant_a, file_a, model="gpt-9")
    foreign = create_job(client, tenant_b, file_a)

    assert model.status_code == 404
    assert (model.json()["error"]["code"], model.json()["error"]["param"]) == (
        "model_not_found",
        "model",
    )
    assert "tiny-random" in model.json()["error"]["message"]
    assert foreign.status_code == 404
    assert foreign.json()["error"]["code"] == "file_not_found"


def test_idempotent_create_returns_the_same_job_and_dispatches_once(
    client, tenant_a: Tenant, dispatcher
):
    file_id = upload(client, tenant_a).json()["id"]
    body = {"model": "tiny-random", "training_file": file_id}
    headers = {**tenant_a.headers, "Idempotency-Key": "job-1"}

    first = client.post("/jobs", headers=headers, json=body)
    again = client.post("/jobs", headers=headers, json=body)
    other = client.post("/jobs", headers=headers, json={**body, "preset": "off"})

    assert first.status_code == 201
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert dispatcher.submitted == [first.json()["id"]]


def test_quota_counts_unfinished_jobs(client, db_url: str):
    tenant = make_tenant(db_url, max_jobs=2)
    file_id = upload(client, tenant).json()["id"]
    first, _ = (create_job(client, tenant, file_id).json() for _ in range(2))

    refused = create_job(client, tenant, file_id)
    client.post(f"/jobs/{first['id']}/cancel", headers=tenant.headers)
    accepted = create_job(client, tenant, file_id)

    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert accepted.status_code == 201


def test_list_pages_newest_first_and_filters_by_status(client, tenant_a: Tenant):
    file_id = upload(client, tenant_a).json()["id"]
    ids = [create_job(client, tenant_a, file_id).json()["id"] for _ in range(3)]
    client.post(f"/jobs/{ids[1]}/cancel", headers=tenant_a.headers)

    first = client.get("/jobs?limit=2", headers=tenant_a.headers).json()
    second = client.get(
        f"/jobs?limit=2&after={first['next_cursor']}", headers=tenant_a.headers
    ).json()
    cancelled = client.get("/jobs?status=cancelled", headers=tenant_a.headers).json()

    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    assert [j["id"] for j in second["data"]] == [ids[0]] and not second["has_more"]
    assert [j["id"] for j in cancelled["data"]] == [ids[1]]
    bad = client.get("/jobs?after=ftjob-nope", headers=tenant_a.headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"


def test_cancel_before_a_worker_starts_is_final_at_once(client, tenant_a: Tenant):
    job = create_job(client, tenant_a).json()

    response = client.post(f"/jobs/{job['id']}/cancel", headers=tenant_a.headers)
    again = client.post(f"/jobs/{job['id']}/cancel", headers=tenant_a.headers)

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["cancel_requested"] is True
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"


def test_cancel_of_a_running_job_only_flags_it(client, tenant_a: Tenant, db_url: str):
    job_id = create_job(client, tenant_a).json()["id"]
    with session_scope(db_url) as session:
        for status in ("prescreening", "running"):
            jobs.transition(session, job_id, status)

    response = client.post(f"/jobs/{job_id}/cancel", headers=tenant_a.headers)

    assert response.status_code == 200
    assert (response.json()["status"], response.json()["cancel_requested"]) == ("running", True)
    with session_scope(db_url) as session:
        assert jobs.is_cancel_requested(session, job_id)


def test_events_page_with_an_after_cursor(client, tenant_a: Tenant, db_url: str, store):
    job_id = create_job(client, tenant_a).json()["id"]
    drive_job(db_url, store, job_id)

    everything = client.get(f"/jobs/{job_id}/events", headers=tenant_a.headers).json()
    cursor = everything["data"][2]["id"]
    rest = client.get(f"/jobs/{job_id}/events?after={cursor}", headers=tenant_a.headers).json()

    statuses = [e["data"]["status"] for e in everything["data"] if e["type"] == "status"]
    assert statuses == ["queued", "prescreening", "running", "auditing", "succeeded"]
    assert [e["id"] for e in rest["data"]] == [e["id"] for e in everything["data"][3:]]


def _read_sse(response) -> list[tuple[str, dict]]:
    frames, event = [], {"event": "message"}
    for line in response.iter_lines():
        if not line:
            if "data" in event:
                frames.append((event["event"], json.loads(event["data"])))
            event = {"event": "message"}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            event[field] = value
    return frames


def test_event_stream_follows_a_live_job_and_ends_when_it_finishes(
    client, tenant_a: Tenant, db_url: str, store
):
    job_id = create_job(client, tenant_a).json()["id"]
    timer = threading.Timer(0.3, drive_job, args=(db_url, store, job_id))
    timer.start()
    started = time.monotonic()

    with client.stream(
        "GET",
        f"/jobs/{job_id}/events",
        headers={**tenant_a.headers, "Accept": "text/event-stream"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = _read_sse(response)
    timer.join()

    assert time.monotonic() - started < 10
    assert frames[0][1]["type"] == "created"
    assert frames[-1] == ("end", {"job_id": job_id, "status": "succeeded"})
    statuses = [data["data"]["status"] for _, data in frames if data.get("type") == "status"]
    assert statuses == ["queued", "prescreening", "running", "auditing", "succeeded"]


def test_event_stream_resumes_after_a_cursor(client, tenant_a: Tenant, db_url: str, store):
    job_id = create_job(client, tenant_a).json()["id"]
    drive_job(db_url, store, job_id)
    events = client.get(f"/jobs/{job_id}/events", headers=tenant_a.headers).json()["data"]

    with client.stream(
        "GET",
        f"/jobs/{job_id}/events?stream=true&after={events[-2]['id']}",
        headers=tenant_a.headers,
    ) as response:
        frames = _read_sse(response)

    assert [data.get("id") for _, data in frames[:-1]] == [events[-1]["id"]]
    assert frames[-1][0] == "end"


def test_reports_are_404_until_written_then_served(client, tenant_a: Tenant, db_url, store):
    job_id = create_job(client, tenant_a).json()["id"]
    before = {
        route: client.get(f"/jobs/{job_id}/{route}", headers=tenant_a.headers)
        for route in ("risk-report", "audit")
    }

    drive_job(db_url, store, job_id)

    assert before["risk-report"].status_code == 404
    assert before["risk-report"].json()["error"]["code"] == "risk_report_not_ready"
    assert before["audit"].json()["error"]["code"] == "audit_report_not_ready"
    risk = client.get(f"/jobs/{job_id}/risk-report", headers=tenant_a.headers)
    audit = client.get(f"/jobs/{job_id}/audit", headers=tenant_a.headers)
    assert risk.json() == {"examples": [{"line": 1, "risk": 0.1}]}
    assert audit.json()["asr"] == 0.02 and audit.json()["verdict"]["passed"] is True


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_released_adapter_downloads_through_a_signed_link(
    client, tenant_a: Tenant, db_url, store, settings
):
    job_id = create_job(client, tenant_a).json()["id"]
    not_yet = client.get(f"/jobs/{job_id}/adapter", headers=tenant_a.headers)
    drive_job(db_url, store, job_id)

    response = client.get(f"/jobs/{job_id}/adapter", headers=tenant_a.headers)

    assert not_yet.status_code == 404
    assert not_yet.json()["error"]["code"] == "adapter_not_released"
    assert response.status_code == 200
    body = response.json()
    assert sorted(f["name"] for f in body["files"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert body["url"].startswith("http://testserver/downloads/released/")
    downloaded = client.get(_path_and_query(body["url"]))
    assert downloaded.status_code == 200
    assert downloaded.content == b"weights-" + job_id.encode()


def test_tampered_or_expired_download_links_are_403(client, tenant_a, db_url, store, settings):
    job_id = create_job(client, tenant_a).json()["id"]
    drive_job(db_url, store, job_id)
    url = client.get(f"/jobs/{job_id}/adapter", headers=tenant_a.headers).json()["url"]
    path, query = _path_and_query(url).split("?")
    key = path.removeprefix("/downloads/")
    expired = int(time.time()) - 1
    other_key = key.replace("adapter_model.safetensors", "adapter_config.json")

    tampered_signature = client.get(f"{path}?{query[:-4]}beef")
    tampered_key = client.get(f"/downloads/{other_key}?{query}")
    expired_link = client.get(
        f"{path}?expires={expired}&signature="
        f"{download_signature(settings.secret_key, key, expired)}"
    )

    for response in (tampered_signature, tampered_key, expired_link):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "invalid_signature"


def test_rejected_adapter_is_not_downloadable(client, tenant_a: Tenant, db_url, store):
    job_id = create_job(client, tenant_a).json()["id"]
    drive_job(db_url, store, job_id, outcome="rejected")

    response = client.get(f"/jobs/{job_id}/adapter", headers=tenant_a.headers)

    assert response.status_code == 404
    assert "rejected" in response.json()["error"]["message"]


def test_unreachable_broker_fails_the_job_with_503(settings, tenant_a: Tenant, db_url):
    app = create_app(settings, dispatcher=FailingDispatcher())
    with TestClient(app) as client:
        response = create_job(client, tenant_a)
        listed = client.get("/jobs", headers=tenant_a.headers).json()["data"]

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "dispatch_failed"
    assert listed[0]["status"] == "failed"
