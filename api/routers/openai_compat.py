"""OpenAI-compatible routes: ``/v1/files`` and ``/v1/fine_tuning/jobs``.

The official ``openai`` SDK works against them (``OpenAI(base_url=".../v1", api_key="tth_...")``).
They call the same domain code as the native routes and only reshape what goes in and out:

* statuses map onto OpenAI's six: ``validating`` -> ``validating_files``; ``prescreening``,
  ``running`` and ``auditing`` -> ``running``; ``rejected`` -> ``failed`` with an ``error``
  object saying which safety check refused the job. Tether's own status stays in
  ``tether_status``;
* hyperparameters map as ``n_epochs`` -> ``epochs`` and ``learning_rate_multiplier`` -> a
  multiple of Tether's default learning rate; ``"auto"`` means Tether's default;
* the safety preset is a Tether extension, a top-level ``preset`` field the SDK sends with
  ``extra_body={"preset": "adaptive"}``;
* ``fine_tuned_model`` stays ``null`` until the adapter passes the audit and is released.

Timestamps are Unix seconds and event ids strings (``ftevent-<n>``), as OpenAI has them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import (
    DispatcherDep,
    IdempotencyKeyDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
)
from api.errors import ApiError
from api.routers import files as native_files
from api.routers.jobs import max_concurrent_jobs
from api.schemas import error_responses
from core import jobs
from core.dbmodels import File as FileRow
from core.dbmodels import Job, JobEvent
from core.dispatch import dispatch_job
from core.specs import DEFAULT_PRESET, Hyperparameters, JobSpec, PresetName

router = APIRouter(prefix="/v1", tags=["openai-compatible"])
FILES_ROUTE_ID = "POST /v1/files"
JOBS_ROUTE_ID = "POST /v1/fine_tuning/jobs"
#: Tether's default learning rate: ``learning_rate_multiplier`` multiplies it.
BASE_LEARNING_RATE: float = Hyperparameters.model_fields["learning_rate"].default
#: Tether's learning rate is capped at 1.0.
MAX_LR_MULTIPLIER = 1.0 / BASE_LEARNING_RATE
#: Event type that keeps a job's ``suffix`` (the job row has no column for it).
SUFFIX_EVENT = "model_suffix"
EVENT_ID_PREFIX = "ftevent-"
_MAX_EVENT_ID = 2**62

OpenAIStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
_STATUS_MAP: dict[str, OpenAIStatus] = {
    "validating": "validating_files",
    "queued": "queued",
    "prescreening": "running",
    "running": "running",
    "auditing": "running",
    "succeeded": "succeeded",
    "rejected": "failed",
    "failed": "failed",
    "cancelled": "cancelled",
}
_LEVELS: dict[str, Literal["info", "warn", "error"]] = {
    "info": "info",
    "warning": "warn",
    "error": "error",
}


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


# --- schemas ---------------------------------------------------------------------------------


class OpenAIFile(BaseModel):
    """A training file as OpenAI's ``file`` object (plus ``num_examples`` and ``sha256``)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = Field(
        "processed", description="Always processed: files are validated before they are stored."
    )
    status_details: str | None = None
    expires_at: int | None = None
    num_examples: int
    sha256: str

    @classmethod
    def from_row(cls, file: FileRow) -> OpenAIFile:
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=int(file.created_at.timestamp()),
            filename=file.filename,
            purpose=file.purpose,
            num_examples=file.num_examples,
            sha256=file.sha256,
        )


class OpenAIFileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIFile]
    has_more: bool
    first_id: str | None
    last_id: str | None


Auto = Literal["auto"]


class OpenAIHyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters; ``"auto"`` (or absent) means Tether's default."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=100)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=1024)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER)] = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIHyperparameters | None = None


class OpenAIMethod(BaseModel):
    """OpenAI's ``method``; Tether trains supervised LoRA adapters only."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class OpenAIJobCreate(BaseModel):
    """Body of ``POST /v1/fine_tuning/jobs``: OpenAI's fields and Tether's ``preset``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-random",
                    "training_file": "file-0123456789abcdef01234567",
                    "hyperparameters": {"n_epochs": 1},
                    "preset": "adaptive",
                }
            ]
        },
    )

    model: str = Field(min_length=1, max_length=512, description="Base model id (GET /models).")
    training_file: str = Field(min_length=1, max_length=64, description="A file-... id.")
    hyperparameters: OpenAIHyperparameters | None = None
    method: OpenAIMethod | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    suffix: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Added to fine_tuned_model, as OpenAI does.",
    )
    validation_file: str | None = Field(None, max_length=64, description="Not supported.")
    integrations: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    metadata: dict[str, str] | None = Field(None, description="Not supported.")
    preset: PresetName = Field(
        DEFAULT_PRESET,
        description="Tether extension: the safety regularization preset (send it with "
        "extra_body={'preset': ...} from the openai SDK).",
    )


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class HyperparametersOut(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class OpenAIJob(BaseModel):
    """A job as OpenAI's ``fine_tuning.job`` object, with Tether's fields after OpenAI's."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None = Field(description="Set once the adapter is released.")
    finished_at: int | None
    hyperparameters: HyperparametersOut
    method: dict[str, Any]
    model: str
    organization_id: str = Field(description="The tenant id.")
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: OpenAIStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None
    tether_status: jobs.JobStatus = Field(description="Tether's own, finer status.")
    status_reason: str | None
    preset: PresetName
    progress: dict[str, Any]


class OpenAIJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIJob]
    has_more: bool


class OpenAIEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None
    tether_type: str = Field(description="Tether's event type (status, progress, ...).")


class OpenAIEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class OpenAICheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class OpenAICheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAICheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


# --- mapping ---------------------------------------------------------------------------------


def _hyperparameters_out(hp: Hyperparameters) -> HyperparametersOut:
    return HyperparametersOut(
        n_epochs=hp.epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=round(hp.learning_rate / BASE_LEARNING_RATE, 6),
    )


def _job_error(job: Job) -> JobError | None:
    reason = job.status_reason or "no reason was recorded"
    if job.status == jobs.JobStatus.REJECTED:
        # started_at is set on entering `running`: a job rejected without it never trained,
        # so the intake policy (pre-screening) refused it rather than the post-training audit.
        if job.started_at is None:
            return JobError(
                code="rejected_by_intake_policy",
                message=f"the training file was refused by the safety pre-screening: {reason}",
                param="training_file",
            )
        return JobError(
            code="rejected_by_safety_audit",
            message=f"the trained adapter failed the safety audit and is quarantined: {reason} "
            "(GET /jobs/{id}/audit has the report)",
        )
    if job.status == jobs.JobStatus.FAILED:
        return JobError(code="job_failed", message=reason)
    return None


def fine_tuned_model_name(job: Job, suffix: str | None) -> str:
    """OpenAI's naming, ``ft:<base>:<organization>:<suffix>:<job id>`` (suffix may be empty)."""
    return f"ft:{job.model}:{job.tenant_id}:{suffix or ''}:{job.id}"


def to_openai_job(job: Job, suffix: str | None) -> OpenAIJob:
    """The OpenAI ``fine_tuning.job`` object of a job row."""
    spec = JobSpec.model_validate(job.spec)
    hyperparameters = _hyperparameters_out(spec.hyperparameters)
    released = job.released_at is not None
    result = job.result or {}
    trained_tokens = result.get("trained_tokens")
    return OpenAIJob(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        error=_job_error(job),
        fine_tuned_model=fine_tuned_model_name(job, suffix) if released else None,
        finished_at=_unix(job.finished_at),
        hyperparameters=hyperparameters,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": hyperparameters.model_dump()},
        },
        model=job.model,
        organization_id=job.tenant_id,
        seed=spec.hyperparameters.seed,
        status=_STATUS_MAP[job.status],
        trained_tokens=trained_tokens if isinstance(trained_tokens, int) else None,
        training_file=job.training_file_id,
        user_provided_suffix=suffix,
        tether_status=jobs.JobStatus(job.status),
        status_reason=job.status_reason,
        preset=spec.preset,
        progress=job.progress or {},
    )


def _suffixes(session: Session, job_ids: list[str]) -> dict[str, str]:
    if not job_ids:
        return {}
    rows = session.execute(
        select(JobEvent.job_id, JobEvent.data).where(
            JobEvent.job_id.in_(job_ids), JobEvent.type == SUFFIX_EVENT
        )
    )
    return {job_id: data["suffix"] for job_id, data in rows if data and data.get("suffix")}


def _public_job(session: Session, job: Job) -> OpenAIJob:
    return to_openai_job(job, _suffixes(session, [job.id]).get(job.id))


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", f"{param} is not supported by Tether: {what}")


def _hyperparameters_in(body: OpenAIJobCreate) -> OpenAIHyperparameters:
    method = body.method
    if method is not None and method.type != "supervised":
        raise ApiError(
            400,
            "unsupported_method",
            f"method.type {method.type!r} is not supported; Tether trains supervised LoRA "
            "adapters (method.type 'supervised')",
            param="method.type",
        )
    from_method = method.supervised.hyperparameters if method and method.supervised else None
    if from_method is not None and body.hyperparameters is not None:
        raise ApiError(
            400,
            "conflicting_hyperparameters",
            "give hyperparameters either at the top level or in method.supervised, not both",
            param="hyperparameters",
        )
    return from_method or body.hyperparameters or OpenAIHyperparameters()


def to_job_spec(body: OpenAIJobCreate) -> JobSpec:
    """The Tether job spec of an OpenAI create request.

    Raises:
        ApiError: a field Tether does not support, or a spec the native validation refuses.
    """
    if body.validation_file:
        raise _unsupported("validation_file", "validation loss is not computed; leave it out")
    if body.integrations:
        raise _unsupported("integrations", "leave it out")
    if body.metadata:
        raise _unsupported("metadata", "it is not stored; leave it out")
    openai_hp = _hyperparameters_in(body)
    hp: dict[str, Any] = {}
    if openai_hp.n_epochs != "auto":
        hp["epochs"] = openai_hp.n_epochs
    if openai_hp.batch_size != "auto":
        hp["batch_size"] = openai_hp.batch_size
    if openai_hp.learning_rate_multiplier != "auto":
        hp["learning_rate"] = BASE_LEARNING_RATE * openai_hp.learning_rate_multiplier
    if body.seed is not None:
        hp["seed"] = body.seed
    try:
        return JobSpec(
            model=body.model,
            training_file=body.training_file,
            preset=body.preset,
            hyperparameters=Hyperparameters(**hp),
        )
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ApiError(422, "invalid_request", message, param=param) from None


def _event_cursor(after: str | None) -> int | None:
    if after is None:
        return None
    digits = after.removeprefix(EVENT_ID_PREFIX)
    if not digits.isdigit() or int(digits) > _MAX_EVENT_ID:
        raise ApiError(
            400,
            "invalid_cursor",
            f"unknown cursor {after!r}; pass the id of the last event of the previous page",
            param="after",
        )
    return int(digits)


def _to_openai_event(event: JobEvent) -> OpenAIEvent:
    return OpenAIEvent(
        id=f"{EVENT_ID_PREFIX}{event.id}",
        created_at=int(event.created_at.timestamp()),
        level=_LEVELS.get(event.level, "info"),
        message=event.message,
        type="metrics" if event.type == "progress" else "message",
        data=event.data,
        tether_type=event.type,
    )


def events_newest_first(
    session: Session, job_id: str, *, before: int | None, limit: int
) -> jobs.Page[JobEvent]:
    """A job's events newest first, as OpenAI lists them (``before``: older than that id)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if before is not None:
        stmt = stmt.where(JobEvent.id < before)
    rows = list(session.scalars(stmt.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return jobs.Page(rows[:limit], len(rows) > limit)


def _checkpoints(job: Job, suffix: str | None) -> list[OpenAICheckpoint]:
    # Intermediate training checkpoints are resume state, not models a customer may use: only
    # the released adapter (which passed the audit) is shown, at the job's last step.
    if job.released_at is None:
        return []
    progress = job.progress or {}
    result = job.result or {}
    step = progress.get("step") or result.get("steps") or 0
    loss = progress.get("loss", result.get("final_loss"))
    return [
        OpenAICheckpoint(
            id=f"ftckpt-{job.id.removeprefix('ftjob-')}-{int(step)}",
            created_at=int(job.released_at.timestamp()),
            fine_tuned_model_checkpoint=fine_tuned_model_name(job, suffix),
            fine_tuning_job_id=job.id,
            metrics=CheckpointMetrics(step=float(step), train_loss=loss),
            step_number=int(step),
        )
    ]


# --- files -----------------------------------------------------------------------------------


@router.post(
    "/files",
    responses=error_responses(400, 401, 409, 413, 422),
    summary="Upload a training file (OpenAI-compatible)",
)
def upload_file(
    principal: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="Chat JSONL, one example per line.")],
    purpose: Annotated[str, Form(max_length=64, description="Must be 'fine-tune'.")],
    idempotency_key: IdempotencyKeyDep = None,
) -> OpenAIFile:
    """Validate and store a JSONL file, answering with OpenAI's ``file`` object."""
    if purpose not in jobs.FILE_PURPOSES:
        raise ApiError(
            400,
            "invalid_purpose",
            f"purpose must be 'fine-tune', got {purpose!r}; Tether stores training files only",
            param="purpose",
        )
    row, _ = native_files.store_upload(
        principal, session, store, settings, file, purpose, idempotency_key, FILES_ROUTE_ID
    )
    return OpenAIFile.from_row(row)


@router.get("/files", responses=error_responses(400, 401))
def list_files(
    principal: TenantDep,
    session: SessionDep,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> OpenAIFileList:
    """The tenant's files, newest first."""
    if purpose is not None and purpose not in jobs.FILE_PURPOSES:
        items: list[OpenAIFile] = []
        has_more = False
    else:
        page = jobs.list_files(session, principal.tenant_id, limit=limit, after=after)
        items, has_more = [OpenAIFile.from_row(f) for f in page.items], page.has_more
    return OpenAIFileList(
        data=items,
        has_more=has_more,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
    )


@router.get("/files/{file_id}", responses=error_responses(401, 404))
def get_file(file_id: str, principal: TenantDep, session: SessionDep) -> OpenAIFile:
    """One file."""
    return OpenAIFile.from_row(jobs.get_file(session, file_id, principal.tenant_id))


# --- fine-tuning jobs ------------------------------------------------------------------------


@router.post("/fine_tuning/jobs", responses=error_responses(400, 401, 404, 409, 422, 429, 503))
def create_job(
    body: OpenAIJobCreate,
    principal: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> OpenAIJob:
    """Create a fine-tuning job (OpenAI answers 200, not 201, and so does this route)."""
    spec = to_job_spec(body)
    idem = None
    if idempotency_key:
        digest = jobs.body_digest(body.model_dump(mode="json"))
        idem = jobs.Idempotency(JOBS_ROUTE_ID, idempotency_key, digest)
    job, created = jobs.create_job(
        session,
        principal.tenant_id,
        spec,
        default_max_concurrent_jobs=max_concurrent_jobs(settings),
        idempotency=idem,
    )
    if created:
        if body.suffix:
            message = f"fine-tuned model suffix: {body.suffix}"
            jobs.add_event(session, job.id, SUFFIX_EVENT, message, {"suffix": body.suffix})
        dispatch_job(session, dispatcher, job.id)
    return _public_job(session, jobs.get_job(session, job.id))


@router.get("/fine_tuning/jobs", responses=error_responses(400, 401))
def list_jobs(
    principal: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="Last job id of the previous page.")
    ] = None,
) -> OpenAIJobList:
    """The tenant's jobs, newest first."""
    page = jobs.list_jobs(session, principal.tenant_id, limit=limit, after=after)
    suffixes = _suffixes(session, [job.id for job in page.items])
    return OpenAIJobList(
        data=[to_openai_job(job, suffixes.get(job.id)) for job in page.items],
        has_more=page.has_more,
    )


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}", responses=error_responses(401, 404))
def get_job(fine_tuning_job_id: str, principal: TenantDep, session: SessionDep) -> OpenAIJob:
    """One job."""
    return _public_job(session, jobs.get_job(session, fine_tuning_job_id, principal.tenant_id))


@router.post(
    "/fine_tuning/jobs/{fine_tuning_job_id}/cancel", responses=error_responses(401, 404, 409)
)
def cancel_job(fine_tuning_job_id: str, principal: TenantDep, session: SessionDep) -> OpenAIJob:
    """Cancel a job: at once if no worker holds it yet, else at the worker's next check."""
    return _public_job(session, jobs.cancel_job(session, fine_tuning_job_id, principal.tenant_id))


@router.get(
    "/fine_tuning/jobs/{fine_tuning_job_id}/events", responses=error_responses(400, 401, 404)
)
def list_events(
    fine_tuning_job_id: str,
    principal: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="Last event id of the previous page.")
    ] = None,
) -> OpenAIEventList:
    """The job's events, newest first (``after`` pages towards older ones)."""
    jobs.get_job(session, fine_tuning_job_id, principal.tenant_id)
    page = events_newest_first(
        session, fine_tuning_job_id, before=_event_cursor(after), limit=limit
    )
    return OpenAIEventList(
        data=[_to_openai_event(event) for event in page.items], has_more=page.has_more
    )


@router.get(
    "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", responses=error_responses(400, 401, 404)
)
def list_checkpoints(
    fine_tuning_job_id: str,
    principal: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    after: Annotated[str | None, Query(max_length=128)] = None,
) -> OpenAICheckpointList:
    """The job's usable checkpoints: the released adapter, once there is one."""
    job = jobs.get_job(session, fine_tuning_job_id, principal.tenant_id)
    checkpoints = _checkpoints(job, _suffixes(session, [job.id]).get(job.id))
    if after is not None:
        ids = [checkpoint.id for checkpoint in checkpoints]
        checkpoints = checkpoints[ids.index(after) + 1 :] if after in ids else []
    page = checkpoints[:limit]
    return OpenAICheckpointList(
        data=page,
        has_more=len(checkpoints) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
