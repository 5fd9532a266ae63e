"""Operator routes (admin API keys only): every tenant's jobs, release overrides, tenants, keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminDep, SessionDep, StoreDep
from api.schemas import (
    AdminJobList,
    AdminJobPublic,
    KeyCreate,
    KeyCreated,
    ReleaseRequest,
    TenantCreate,
    TenantList,
    TenantPublic,
    error_responses,
)
from core import auth, jobs

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    responses=error_responses(401, 403),
)


@router.get("/jobs", responses=error_responses(400, 422))
def list_all_jobs(
    _admin: AdminDep,
    session: SessionDep,
    tenant_id: Annotated[str | None, Query(max_length=64)] = None,
    status: jobs.JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> AdminJobList:
    """Jobs of every tenant (or of one), newest first."""
    page = jobs.list_jobs(session, tenant_id, status=status, limit=limit, after=after)
    return AdminJobList(
        data=[AdminJobPublic.from_row(job) for job in page.items],
        has_more=page.has_more,
        next_cursor=page.last_id,
    )


@router.post("/jobs/{job_id}/release", responses=error_responses(404, 409, 422))
def release_job(
    job_id: str, body: ReleaseRequest, admin: AdminDep, session: SessionDep, store: StoreDep
) -> AdminJobPublic:
    """Release a rejected job's quarantined adapter by hand; records who (key id) and why."""
    job = jobs.release_override(session, store, job_id, by_key_id=admin.key_id, reason=body.reason)
    return AdminJobPublic.from_row(job)


@router.get("/tenants")
def list_tenants(_admin: AdminDep, session: SessionDep) -> TenantList:
    """Every tenant."""
    return TenantList(data=[TenantPublic.from_row(t) for t in auth.list_tenants(session)])


@router.post("/tenants", status_code=201, responses=error_responses(409, 422))
def create_tenant(body: TenantCreate, _admin: AdminDep, session: SessionDep) -> TenantPublic:
    """Create a tenant."""
    tenant = auth.create_tenant(session, body.name, max_concurrent_jobs=body.max_concurrent_jobs)
    return TenantPublic.from_row(tenant)


@router.post("/tenants/{tenant_id}/keys", status_code=201, responses=error_responses(404, 422))
def create_key(
    tenant_id: str, body: KeyCreate, _admin: AdminDep, session: SessionDep
) -> KeyCreated:
    """Create an API key for a tenant; the plaintext key is in this response only."""
    issued = auth.create_api_key(session, tenant_id, name=body.name, admin=body.admin)
    return KeyCreated.from_issued(issued)
