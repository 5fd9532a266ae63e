"""Operator routes: admin keys only; tenants and keys; all jobs; the release override."""

from __future__ import annotations

from core import jobs
from core.db import session_scope
from core.storage import quarantine_prefix
from tests.api.conftest import Tenant, create_job, drive_job
from tests.dbutil import unique


def test_tenant_keys_cannot_use_admin_routes(client, tenant_a: Tenant):
    for method, path in [
        ("GET", "/admin/jobs"),
        ("GET", "/admin/tenants"),
        ("POST", "/admin/tenants"),
        ("POST", f"/admin/tenants/{tenant_a.id}/keys"),
        ("POST", "/admin/jobs/ftjob-x/release"),
    ]:
        response = client.request(method, path, headers=tenant_a.headers, json={})
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "admin_required"


def test_admin_creates_a_tenant_whose_new_key_works(client, admin: Tenant):
    name = unique("acme")
    tenant = client.post("/admin/tenants", headers=admin.headers, json={"name": name}).json()
    issued = client.post(f"/admin/tenants/{tenant['id']}/keys", headers=admin.headers, json={})
    duplicate = client.post("/admin/tenants", headers=admin.headers, json={"name": name})
    missing = client.post("/admin/tenants/tenant-nope/keys", headers=admin.headers, json={})

    assert issued.status_code == 201
    key = issued.json()["key"]
    assert key.startswith("tth_") and issued.json()["is_admin"] is False
    listed = client.get("/jobs", headers={"Authorization": f"Bearer {key}"})
    assert listed.status_code == 200 and listed.json()["data"] == []
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "tenant_exists"
    assert missing.status_code == 404
    names = [t["name"] for t in client.get("/admin/tenants", headers=admin.headers).json()["data"]]
    assert name in names


def test_admin_sees_jobs_of_every_tenant(client, admin, tenant_a: Tenant, tenant_b: Tenant):
    job_a = create_job(client, tenant_a).json()["id"]
    job_b = create_job(client, tenant_b).json()["id"]

    everything = client.get("/admin/jobs?limit=100", headers=admin.headers).json()["data"]
    only_b = client.get(f"/admin/jobs?tenant_id={tenant_b.id}", headers=admin.headers).json()

    owners = {job["id"]: job["tenant_id"] for job in everything}
    assert owners[job_a] == tenant_a.id and owners[job_b] == tenant_b.id
    assert [job["id"] for job in only_b["data"]] == [job_b]


def test_release_override_records_who_and_why(client, admin, tenant_a: Tenant, db_url, store):
    job_id = create_job(client, tenant_a).json()["id"]
    drive_job(db_url, store, job_id, outcome="rejected")
    reason = "false positive on the ASR audit, reviewed by the safety team"

    no_reason = client.post(f"/admin/jobs/{job_id}/release", headers=admin.headers, json={})
    response = client.post(
        f"/admin/jobs/{job_id}/release", headers=admin.headers, json={"reason": reason}
    )
    twice = client.post(
        f"/admin/jobs/{job_id}/release", headers=admin.headers, json={"reason": reason}
    )

    assert no_reason.status_code == 422 and no_reason.json()["error"]["param"] == "reason"
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "rejected" and job["adapter_released"] is True
    override = job["release_override"]
    assert (override["by_key_id"], override["reason"]) == (admin.key_id, reason)
    assert override["from_prefix"] == quarantine_prefix(tenant_a.id, job_id) + "adapter/"
    assert twice.status_code == 409
    adapter = client.get(f"/jobs/{job_id}/adapter", headers=tenant_a.headers)
    assert adapter.status_code == 200
    assert store.list(quarantine_prefix(tenant_a.id, job_id))  # the quarantined copy stays
    with session_scope(db_url) as session:
        events = jobs.list_events(session, job_id).items
    assert events[-1].type == "release_override" and events[-1].data["by_key_id"] == admin.key_id


def test_release_override_needs_a_rejected_job(client, admin, tenant_a: Tenant, db_url, store):
    job_id = create_job(client, tenant_a).json()["id"]
    drive_job(db_url, store, job_id, outcome="succeeded")

    response = client.post(
        f"/admin/jobs/{job_id}/release", headers=admin.headers, json={"reason": "because"}
    )
    unknown = client.post(
        "/admin/jobs/ftjob-unknown/release", headers=admin.headers, json={"reason": "because"}
    )

    assert response.status_code == 409
    assert "only rejected jobs" in response.json()["error"]["message"]
    assert unknown.status_code == 404
