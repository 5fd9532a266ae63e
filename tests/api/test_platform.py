"""Health, readiness, metrics, error bodies, and the embedded (SQLite) default."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.app import create_app
from core import auth
from core.db import session_scope
from tests.api.conftest import Tenant, create_job, upload
from tests.dbutil import RecordingDispatcher, settings_for, sqlite_url

ERROR_KEYS = {"code", "message", "type", "param", "line"}


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok"}


def test_readiness_names_what_is_down(tmp_path):
    settings = settings_for(
        "postgresql+psycopg://postgres@127.0.0.1:1/nothing",
        tmp_path,
        worker_mode="celery",
        redis_url="redis://127.0.0.1:1/0",
    )
    with TestClient(create_app(settings, dispatcher=RecordingDispatcher())) as client:
        response = client.get("/readyz")

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert "broker" in error["message"] and "database" in error["message"]
    states = {d["check"]: d["state"] for d in error["details"]}
    assert states["storage"] == "ok" and states["database"].startswith("error")


def test_metrics_use_route_templates_never_ids(client, tenant_a: Tenant):
    job_id = create_job(client, tenant_a).json()["id"]
    client.get(f"/jobs/{job_id}", headers=tenant_a.headers)
    client.get("/no/such/path")

    text = client.get("/metrics").text

    assert 'tether_http_requests_total{method="GET",route="/jobs/{job_id}",status="2xx"}' in text
    assert 'tether_http_requests_total{method="POST",route="/jobs",status="2xx"}' in text
    assert 'route="<unmatched>",status="4xx"' in text
    assert 'tether_http_request_duration_seconds_bucket{le="0.005",method="GET"' in text
    assert 'tether_jobs_created_total{model="tiny-random",preset="adaptive"}' in text
    assert job_id not in text and tenant_a.id not in text


def test_every_error_has_the_same_shape(client, tenant_a: Tenant):
    responses = {
        404: client.get("/no/such/path"),
        405: client.delete("/jobs", headers=tenant_a.headers),
        401: client.get("/jobs"),
        422: client.get("/jobs?limit=0", headers=tenant_a.headers),
        400: client.post(
            "/jobs",
            headers={**tenant_a.headers, "Content-Type": "application/json"},
            content=b"{broken",
        ),
    }
    for status, response in responses.items():
        body = response.json()
        assert set(body) == {"error"}, status
        assert set(body["error"]) >= ERROR_KEYS, status
        assert response.status_code in (status, 422), status
    assert responses[422].json()["error"]["param"] == "limit"


def test_server_errors_do_not_leak_internals(app, tenant_a: Tenant):
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("password=hunter2 at db.internal:5432")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "hunter2" not in response.text and "RuntimeError" not in response.text


def test_embedded_sqlite_default_serves_the_job_path(tmp_path):
    url = sqlite_url(tmp_path)
    with session_scope(url) as session:
        tenant = auth.create_tenant(session, "solo")
        key = auth.create_api_key(session, tenant.id)
    dispatcher = RecordingDispatcher()
    settings = settings_for(url, tmp_path)
    tenant_obj = Tenant(tenant.id, key.id, key.plaintext)

    with TestClient(create_app(settings, dispatcher=dispatcher)) as client:
        file_id = upload(client, tenant_obj).json()["id"]
        jobs = [create_job(client, tenant_obj, file_id).json()["id"] for _ in range(3)]
        page = client.get("/jobs?limit=2", headers=tenant_obj.headers).json()
        rest = client.get(f"/jobs?after={page['next_cursor']}", headers=tenant_obj.headers)
        cancelled = client.post(f"/jobs/{jobs[0]}/cancel", headers=tenant_obj.headers)

    assert dispatcher.submitted == jobs
    assert [j["id"] for j in page["data"] + rest.json()["data"]] == jobs[::-1]
    assert cancelled.json()["status"] == "cancelled"


def test_the_api_process_imports_neither_torch_nor_workers():
    import subprocess
    import sys

    code = (
        "import sys; from api.app import create_app; create_app(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers', 'workers', 'safety'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == "[]"
