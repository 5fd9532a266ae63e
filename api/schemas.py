"""Request and response bodies of the native API (``XCreate`` in, ``XPublic`` out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.auth import IssuedKey
from core.catalog import ModelSpec
from core.dbmodels import File, Job, JobEvent, Tenant
from core.jobs import JobStatus
from core.specs import Hyperparameters, JobSpec, PresetName

# --- errors ---------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable snake_case identifier, e.g. job_not_found.")
    message: str = Field(description="What is wrong and, where useful, what to do.")
    type: str = Field(description="OpenAI-style error class, e.g. invalid_request_error.")
    param: str | None = Field(None, description="The request field at fault.")
    line: int | None = Field(None, description="Line of an uploaded file, 1-based.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Every problem found (e.g. each bad line of a training file)."
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorInfo


# --- files ----------------------------------------------------------------------------------


class FilePublic(BaseModel):
    """An uploaded, validated training file."""

    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    num_examples: int
    sha256: str
    created_at: datetime

    @classmethod
    def from_row(cls, file: File) -> FilePublic:
        return cls(
            id=file.id,
            filename=file.filename,
            purpose=file.purpose,
            bytes=file.bytes,
            num_examples=file.num_examples,
            sha256=file.sha256,
            created_at=file.created_at,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    next_cursor: str | None = Field(None, description="Pass as `after` for the next page.")


# --- jobs -----------------------------------------------------------------------------------


class JobCreate(JobSpec):
    """Body of ``POST /jobs``: base model, training file, safety preset, hyperparameters."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-random",
                    "training_file": "file-0123456789abcdef01234567",
                    "preset": "adaptive",
                    "hyperparameters": {"lora": {"r": 8, "alpha": 16}, "max_steps": 20},
                }
            ]
        },
    )


class JobPublic(BaseModel):
    """A fine-tuning job as the API shows it."""

    id: str
    object: Literal["job"] = "job"
    model: str
    training_file: str
    preset: PresetName
    hyperparameters: Hyperparameters
    status: JobStatus
    status_reason: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    progress: dict[str, Any]
    result: dict[str, Any] | None
    has_risk_report: bool
    has_audit_report: bool
    adapter_released: bool
    released_at: datetime | None
    release_override: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        spec = JobSpec.model_validate(job.spec)
        return cls(
            id=job.id,
            model=job.model,
            training_file=job.training_file_id,
            preset=spec.preset,
            hyperparameters=spec.hyperparameters,
            status=JobStatus(job.status),
            status_reason=job.status_reason,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            progress=job.progress or {},
            result=job.result,
            has_risk_report=job.risk_report_key is not None,
            has_audit_report=job.audit_report_key is not None,
            adapter_released=job.released_at is not None,
            released_at=job.released_at,
            release_override=job.release_override,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class AdminJobPublic(JobPublic):
    """A job with its tenant, for operators."""

    tenant_id: str

    @classmethod
    def from_row(cls, job: Job) -> AdminJobPublic:
        return cls(**JobPublic.from_row(job).model_dump(), tenant_id=job.tenant_id)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    next_cursor: str | None = Field(None, description="Pass as `after` for the next page.")


class AdminJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdminJobPublic]
    has_more: bool
    next_cursor: str | None = None


class EventPublic(BaseModel):
    """One entry of a job's history."""

    id: int
    object: Literal["job.event"] = "job.event"
    job_id: str
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, event: JobEvent) -> EventPublic:
        return cls(
            id=event.id,
            job_id=event.job_id,
            created_at=event.created_at,
            level=event.level,
            type=event.type,
            message=event.message,
            data=event.data,
        )


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool
    next_cursor: int | None = Field(None, description="Pass as `after` for newer events.")


class AdapterFile(BaseModel):
    name: str = Field(description="Path of the file inside the adapter directory.")
    url: str


class AdapterDownload(BaseModel):
    """Expiring links to a released adapter's files."""

    job_id: str
    url: str = Field(description="Link to the adapter weights (adapter_model.safetensors).")
    expires_at: datetime
    files: list[AdapterFile]


# --- models, health -------------------------------------------------------------------------


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    description: str
    source: str

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelPublic:
        return cls(id=spec.model_id, description=spec.description, source=spec.source)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    checks: dict[str, str] = Field(default_factory=dict)


# --- admin ----------------------------------------------------------------------------------


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Unique tenant name.")
    max_concurrent_jobs: int | None = Field(
        None, ge=0, le=10_000, description="Most unfinished jobs at once (default: deployment's)."
    )


class TenantPublic(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    max_concurrent_jobs: int | None
    created_at: datetime

    @classmethod
    def from_row(cls, tenant: Tenant) -> TenantPublic:
        return cls(
            id=tenant.id,
            name=tenant.name,
            max_concurrent_jobs=tenant.max_concurrent_jobs,
            created_at=tenant.created_at,
        )


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantPublic]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", min_length=1, max_length=200)
    admin: bool = Field(False, description="Admin keys may use the /admin routes.")


class KeyCreated(BaseModel):
    """A new API key; ``key`` is shown this once and cannot be recovered."""

    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    key: str

    @classmethod
    def from_issued(cls, issued: IssuedKey) -> KeyCreated:
        return cls(
            id=issued.id,
            tenant_id=issued.tenant_id,
            name=issued.name,
            prefix=issued.prefix,
            is_admin=issued.is_admin,
            created_at=issued.created_at,
            key=issued.plaintext,
        )


class ReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=3, max_length=2000, description="Why the rejected adapter is released."
    )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error body for ``statuses``."""
    return {status: {"model": ErrorResponse} for status in statuses}
