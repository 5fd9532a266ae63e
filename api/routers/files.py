"""Training files: upload (validated line by line) and metadata."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from sqlalchemy.orm import Session

from api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError
from api.schemas import FileList, FilePublic, error_responses
from core import jobs, metrics
from core.auth import Principal
from core.dbmodels import File as FileRow
from core.settings import Settings
from core.storage import ObjectStore

router = APIRouter(prefix="/files", tags=["files"])
ROUTE_ID = "POST /files"


def upload_digest(filename: str, purpose: str, data: bytes) -> str:
    """What an Idempotency-Key is bound to for an upload: name, purpose and content."""
    return jobs.body_digest(filename.encode() + b"\0" + purpose.encode() + b"\0" + data)


def store_upload(
    principal: Principal,
    session: Session,
    store: ObjectStore,
    settings: Settings,
    file: UploadFile,
    purpose: str,
    idempotency_key: str | None,
    route_id: str,
) -> tuple[FileRow, bool]:
    """The upload both the native and the OpenAI-compatible routes run: size limit, line-by-line
    validation, storage, idempotency and metrics. Returns ``(file row, created)``."""
    # The request body is capped while it streams in (api.app); this reads at most one byte
    # past the file limit so the size check below is exact.
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413,
            "file_too_large",
            f"the file is larger than the limit of {settings.max_upload_bytes} bytes; split it",
            param="file",
        )
    filename = file.filename or "upload.jsonl"
    idem = None
    if idempotency_key:
        idem = jobs.Idempotency(route_id, idempotency_key, upload_digest(filename, purpose, data))
    try:
        row, created = jobs.create_file(
            session,
            store,
            principal.tenant_id,
            filename=filename,
            data=data,
            purpose=purpose,
            max_bytes=settings.max_upload_bytes,
            max_examples=settings.max_examples,
            idempotency=idem,
        )
    except jobs.TrainingFileError:
        metrics.record_file_upload(accepted=False)
        raise
    if created:
        metrics.record_file_upload(accepted=True)
    return row, created


@router.post(
    "",
    status_code=201,
    responses=error_responses(401, 409, 413, 422),
    summary="Upload a JSONL training file",
)
def upload_file(
    principal: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    file: Annotated[UploadFile, File(description="Chat JSONL, one example per line.")],
    purpose: Annotated[str, Form()] = "fine-tune",
    idempotency_key: IdempotencyKeyDep = None,
) -> FilePublic:
    """Validate every line (all problems are reported, with line numbers) and store the file."""
    row, created = store_upload(
        principal, session, store, settings, file, purpose, idempotency_key, ROUTE_ID
    )
    if not created:
        response.status_code = 200
    return FilePublic.from_row(row)


@router.get("", responses=error_responses(400, 401))
def list_files(
    principal: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> FileList:
    """The tenant's files, newest first."""
    page = jobs.list_files(session, principal.tenant_id, limit=limit, after=after)
    return FileList(
        data=[FilePublic.from_row(f) for f in page.items],
        has_more=page.has_more,
        next_cursor=page.last_id,
    )


@router.get("/{file_id}", responses=error_responses(401, 404))
def get_file(file_id: str, principal: TenantDep, session: SessionDep) -> FilePublic:
    """One file's metadata."""
    return FilePublic.from_row(jobs.get_file(session, file_id, principal.tenant_id))
