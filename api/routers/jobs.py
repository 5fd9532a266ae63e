"""Fine-tuning jobs: submit, list, inspect, cancel, follow, and fetch what they produced."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from api.deps import DispatcherDep, IdempotencyKeyDep, SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError
from api.schemas import (
    AdapterDownload,
    AdapterFile,
    EventList,
    EventPublic,
    JobCreate,
    JobList,
    JobPublic,
    error_responses,
)
from core import jobs
from core.dbmodels import Job
from core.dispatch import dispatch_job
from core.settings import Settings
from core.specs import JobSpec
from core.storage import LocalStore, ObjectNotFoundError, ObjectStore

router = APIRouter(prefix="/jobs", tags=["jobs"])
ROUTE_ID = "POST /jobs"
#: The adapter file the top-level ``url`` of an adapter download points at.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: An SSE comment is sent after this long without events, so proxies keep the stream open.
SSE_KEEPALIVE_SECONDS = 15.0


@router.post("", status_code=201, responses=error_responses(401, 404, 409, 422, 429, 503))
def create_job(
    body: JobCreate,
    principal: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    response: Response,
    idempotency_key: IdempotencyKeyDep = None,
) -> JobPublic:
    """Validate the spec, check the quota, record the job in `validating` and dispatch it."""
    spec = JobSpec.model_validate(body.model_dump())
    idem = None
    if idempotency_key:
        digest = jobs.body_digest(spec.model_dump(mode="json"))
        idem = jobs.Idempotency(ROUTE_ID, idempotency_key, digest)
    job, created = jobs.create_job(
        session,
        principal.tenant_id,
        spec,
        default_max_concurrent_jobs=max_concurrent_jobs(settings),
        idempotency=idem,
    )
    if created:
        dispatch_job(session, dispatcher, job.id)
    else:
        response.status_code = 200
    return JobPublic.from_row(jobs.get_job(session, job.id))


def max_concurrent_jobs(settings: Settings) -> int:
    """The deployment's default per-tenant limit (settings field, when the deployment has it)."""
    return settings.max_concurrent_jobs


@router.get("", responses=error_responses(400, 401, 422))
def list_jobs(
    principal: TenantDep,
    session: SessionDep,
    status: jobs.JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="Last id of the previous page.")
    ] = None,
) -> JobList:
    """The tenant's jobs, newest first (cursor pagination by `after`)."""
    page = jobs.list_jobs(session, principal.tenant_id, status=status, limit=limit, after=after)
    return JobList(
        data=[JobPublic.from_row(job) for job in page.items],
        has_more=page.has_more,
        next_cursor=page.last_id,
    )


@router.get("/{job_id}", responses=error_responses(401, 404))
def get_job(job_id: str, principal: TenantDep, session: SessionDep) -> JobPublic:
    """One job."""
    return JobPublic.from_row(jobs.get_job(session, job_id, principal.tenant_id))


@router.post("/{job_id}/cancel", responses=error_responses(401, 404, 409))
def cancel_job(job_id: str, principal: TenantDep, session: SessionDep) -> JobPublic:
    """Cancel a job: at once if no worker holds it yet, else at the worker's next check."""
    return JobPublic.from_row(jobs.cancel_job(session, job_id, principal.tenant_id))


@router.get(
    "/{job_id}/events",
    responses={
        **error_responses(401, 404),
        200: {"content": {"text/event-stream": {}}, "description": "Events (JSON or SSE)."},
    },
)
def list_events(
    job_id: str,
    request: Request,
    principal: TenantDep,
    session: SessionDep,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Last event id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: bool = False,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[int | None, Header(ge=0, le=2**62)] = None,
) -> Any:
    """The job's events, oldest first; with `stream=true` (or `Accept: text/event-stream`)
    a server-sent-events stream that ends once the job has finished."""
    jobs.get_job(session, job_id, principal.tenant_id)
    if stream or "text/event-stream" in (accept or ""):
        start = after if after is not None else last_event_id
        generator = event_stream(
            request.app.state.sessionmaker, job_id, start, request.app.state.sse_poll_seconds
        )
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(generator, media_type="text/event-stream", headers=headers)
    page = jobs.list_events(session, job_id, after=after, limit=limit)
    return EventList(
        data=[EventPublic.from_row(event) for event in page.items],
        has_more=page.has_more,
        next_cursor=page.items[-1].id if page.items else after,
    )


@dataclass
class _Batch:
    frames: list[str]
    cursor: int | None
    status: str
    finished: bool


def _poll(factory: sessionmaker[Session], job_id: str, after: int | None) -> _Batch:
    with factory() as session:
        # Status first, then events: once a terminal status is seen, every event committed
        # before it (the final status event included) is in the batch read after it.
        status = jobs.get_job(session, job_id).status
        page = jobs.list_events(session, job_id, after=after, limit=500)
        frames = [_sse_frame(EventPublic.from_row(event)) for event in page.items]
        cursor = page.items[-1].id if page.items else after
        return _Batch(frames, cursor, status, jobs.is_terminal(status) and not page.has_more)


def _sse_frame(event: EventPublic) -> str:
    return f"id: {event.id}\ndata: {event.model_dump_json()}\n\n"


async def event_stream(
    factory: sessionmaker[Session], job_id: str, after: int | None, poll_seconds: float
) -> AsyncIterator[str]:
    """SSE frames of a job's events (polling the database) until the job is terminal.

    Each event is a default (``message``) frame whose ``id`` is the event id, so a client can
    resume with ``Last-Event-ID``; the stream ends with an ``end`` event carrying the status.
    """
    cursor = after
    quiet = 0.0
    while True:
        batch = await anyio.to_thread.run_sync(_poll, factory, job_id, cursor)
        cursor = batch.cursor
        for frame in batch.frames:
            yield frame
        if batch.finished:
            end = json.dumps({"job_id": job_id, "status": batch.status})
            yield f"event: end\ndata: {end}\n\n"
            return
        quiet = 0.0 if batch.frames else quiet + poll_seconds
        if quiet >= SSE_KEEPALIVE_SECONDS:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await anyio.sleep(poll_seconds)


def _report(store: ObjectStore, job: Job, key: str | None, code: str, what: str) -> dict[str, Any]:
    missing = ApiError(
        404,
        code,
        f"job {job.id} has no {what} yet (status {job.status}); it is written when that stage "
        "finishes",
        param="job_id",
    )
    if key is None:
        raise missing
    try:
        report: dict[str, Any] = json.loads(store.get_bytes(key))
        return report
    except ObjectNotFoundError:
        raise missing from None


@router.get("/{job_id}/risk-report", responses=error_responses(401, 404))
def get_risk_report(
    job_id: str, principal: TenantDep, session: SessionDep, store: StoreDep
) -> dict[str, Any]:
    """The pre-screening risk report: a safety-risk score per training example."""
    job = jobs.get_job(session, job_id, principal.tenant_id)
    return _report(store, job, job.risk_report_key, "risk_report_not_ready", "risk report")


@router.get("/{job_id}/audit", responses=error_responses(401, 404))
def get_audit(
    job_id: str, principal: TenantDep, session: SessionDep, store: StoreDep
) -> dict[str, Any]:
    """The safety audit: attack success rate and over-refusal, with the release decision."""
    job = jobs.get_job(session, job_id, principal.tenant_id)
    return _report(store, job, job.audit_report_key, "audit_report_not_ready", "audit report")


@router.get("/{job_id}/adapter", responses=error_responses(401, 404))
def get_adapter(
    job_id: str,
    request: Request,
    principal: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> AdapterDownload:
    """Expiring download links for a released adapter (404 until the adapter is released)."""
    job = jobs.get_job(session, job_id, principal.tenant_id)
    if job.released_at is None or not job.adapter_prefix:
        why = "was rejected by the safety audit" if job.status == "rejected" else f"is {job.status}"
        raise ApiError(
            404,
            "adapter_not_released",
            f"job {job.id} has no released adapter: it {why}. Adapters are downloadable once "
            "they pass the audit",
            param="job_id",
        )
    keys = store.list(job.adapter_prefix)
    if not keys:
        raise ApiError(
            404, "adapter_not_found", f"the adapter of job {job.id} is missing from storage"
        )
    expires_in = settings.presign_expiry_seconds
    expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
    base = str(request.base_url).rstrip("/")
    files = [
        AdapterFile(
            name=key[len(job.adapter_prefix) :], url=download_url(store, key, expires_in, base)
        )
        for key in keys
    ]
    main = next((f for f in files if f.name == ADAPTER_WEIGHTS), files[0])
    return AdapterDownload(job_id=job.id, url=main.url, expires_at=expires_at, files=files)


def download_url(store: ObjectStore, key: str, expires_in: int, base_url: str) -> str:
    """A presigned URL; the local store's signed links are made absolute with the API's address."""
    url = store.presigned_url(key, expires_in)
    if isinstance(store, LocalStore) and url.startswith("/"):
        return base_url + url
    return url
