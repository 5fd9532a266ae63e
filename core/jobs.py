"""Jobs, their events and training files: the domain code the API and the workers share.

The job state machine lives here and only here::

    validating -> queued -> prescreening -> running -> auditing -> succeeded
                                 |                         |  \\-> rejected
                                 \\-> rejected (intake policy)
    any non-terminal state -> failed | cancelled

Retries and redelivery (a worker killed mid-job, Celery delivering the task again):

* ``prescreening``, ``running`` and ``auditing`` may re-enter themselves: the new worker resumes
  the stage in place (``running -> running`` resumes from the last checkpoint). Pass ``from_``
  to :func:`transition` to claim a stage strictly (``from_={"queued"}``) when two workers must
  not both succeed.
* The same three states may go back to ``queued``, for a reaper that hands a job whose worker
  died back to the queue. Nothing else moves backwards, and terminal states are final.

Every status change is a compare-and-set: ``UPDATE jobs SET status=:to WHERE id=:id AND
status=:seen`` with the row count checked, so a stale writer cannot move a job backwards (on
PostgreSQL the second of two concurrent updates waits for the first and then matches no row).

Public functions that change data commit before returning, so a worker's progress is visible to
the API at once. Files go to object storage before their row is committed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import metrics
from core.catalog import list_models
from core.chatdata import ValidationIssue, parse_jsonl
from core.dbmodels import File, IdempotencyRecord, Job, JobEvent, Tenant, new_id, utcnow
from core.specs import JobSpec
from core.storage import ObjectStore, upload_key

#: Concurrent non-terminal jobs per tenant when neither the tenant nor the caller says otherwise.
DEFAULT_MAX_CONCURRENT_JOBS = 4
#: Deliveries of one job before the pipeline gives up (an OOM kill must not loop forever).
DEFAULT_MAX_ATTEMPTS = 3
FILE_PURPOSES = ("fine-tune",)
_CAS_RETRIES = 8

T = TypeVar("T")


class JobStatus(StrEnum):
    """Where a job is in its life."""

    VALIDATING = "validating"
    QUEUED = "queued"
    PRESCREENING = "prescreening"
    RUNNING = "running"
    AUDITING = "auditing"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobStatus
TERMINAL_STATUSES = frozenset({S.SUCCEEDED, S.REJECTED, S.FAILED, S.CANCELLED})
ACTIVE_STATUSES = frozenset(S) - TERMINAL_STATUSES
#: States no worker holds yet: a cancel there is final at once.
NOT_STARTED_STATUSES = frozenset({S.VALIDATING, S.QUEUED})
_STOP = frozenset({S.FAILED, S.CANCELLED})
#: The legal moves, ``from -> {to}``; see the module docstring for the retry edges.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.VALIDATING: frozenset({S.QUEUED}) | _STOP,
    S.QUEUED: frozenset({S.PRESCREENING}) | _STOP,
    S.PRESCREENING: frozenset({S.PRESCREENING, S.RUNNING, S.REJECTED, S.QUEUED}) | _STOP,
    S.RUNNING: frozenset({S.RUNNING, S.AUDITING, S.QUEUED}) | _STOP,
    S.AUDITING: frozenset({S.AUDITING, S.SUCCEEDED, S.REJECTED, S.QUEUED}) | _STOP,
    **{status: frozenset() for status in TERMINAL_STATUSES},
}


# --- errors ---------------------------------------------------------------------------------


class JobsError(Exception):
    """Base of the domain errors; ``code`` is the stable identifier the API reports."""

    code = "error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFoundError(JobsError, LookupError):
    """No such object for this tenant (other tenants' objects are reported the same way)."""

    code = "not_found"


class JobNotFoundError(NotFoundError):
    code = "job_not_found"


class TrainingFileNotFoundError(NotFoundError):
    """No training file with that id for the tenant."""

    code = "file_not_found"


class InvalidCursorError(JobsError, ValueError):
    code = "invalid_cursor"


class ModelUnavailableError(NotFoundError):
    code = "model_not_found"


class IllegalTransition(JobsError):
    """A status change the state machine does not allow (or lost to a concurrent one)."""

    code = "illegal_transition"

    def __init__(self, job_id: str, current: str, target: str) -> None:
        current, target = JobStatus(current).value, JobStatus(target).value
        allowed = sorted(status.value for status in TRANSITIONS[JobStatus(current)])
        super().__init__(
            f"job {job_id} cannot go from {current!r} to {target!r}; from {current!r} it may "
            f"go to {allowed or 'nothing (terminal)'}"
        )
        self.job_id = job_id
        self.current = current
        self.target = target


class ConflictError(JobsError):
    """The request contradicts the object's state (the API answers 409)."""

    code = "conflict"


class JobFinishedError(ConflictError):
    code = "job_finished"


class IdempotencyConflictError(ConflictError):
    code = "idempotency_key_reused"


class QuotaExceededError(JobsError):
    """Too many concurrent jobs for the tenant (the API answers 429)."""

    code = "quota_exceeded"


class AttemptsExhaustedError(JobsError):
    """The job has been delivered ``max_attempts`` times already."""

    code = "attempts_exhausted"


#: Issues of core.chatdata that mean a limit was hit, and the API error code for each.
_LIMIT_CODES = {"file_too_large": "file_too_large", "too_many_lines": "too_many_examples"}


class TrainingFileError(JobsError, ValueError):
    """An upload with problems; ``issues`` lists every one with its line and field.

    ``too_large`` is set when a limit was hit (file size, number of examples); ``headline`` is
    then that issue, else the first one.
    """

    code = "invalid_training_file"

    def __init__(self, issues: Sequence[ValidationIssue]) -> None:
        limit = next((issue for issue in issues if issue.code in _LIMIT_CODES), None)
        self.headline = limit or issues[0]
        self.too_large = limit is not None
        count = len(issues)
        super().__init__(
            f"the training file has {count} problem{'s' if count != 1 else ''}; "
            f"{'over a limit' if limit else 'first'}: {self.headline}",
            param=self.headline.field or "file",
        )
        self.issues = list(issues)
        if limit is not None:
            self.code = _LIMIT_CODES[limit.code]


# --- small types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, newest first; ``has_more`` says whether another page follows."""

    items: list[T]
    has_more: bool

    @property
    def last_id(self) -> str | None:
        """The cursor for the next page (pass it as ``after``)."""
        return getattr(self.items[-1], "id", None) if self.items else None


@dataclass(frozen=True)
class Idempotency:
    """An ``Idempotency-Key`` with the route it was sent to and a digest of the request."""

    route: str
    key: str
    body_sha256: str


def body_digest(payload: bytes | dict[str, Any] | list[Any]) -> str:
    """Hex SHA-256 of a request body (JSON is canonicalised: sorted keys, no spaces)."""
    if not isinstance(payload, bytes):
        payload = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()


def is_terminal(status: str) -> bool:
    """Whether ``status`` is final."""
    return JobStatus(status) in TERMINAL_STATUSES


def can_transition(current: str, target: str) -> bool:
    """Whether the state machine allows ``current -> target``."""
    return JobStatus(target) in TRANSITIONS[JobStatus(current)]


# --- idempotency ----------------------------------------------------------------------------


def _replayed_id(session: Session, tenant_id: str, idem: Idempotency) -> str | None:
    record = session.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.tenant_id == tenant_id,
            IdempotencyRecord.route == idem.route,
            IdempotencyRecord.key == idem.key,
        )
    )
    if record is None:
        return None
    if record.body_sha256 != idem.body_sha256:
        raise IdempotencyConflictError(
            f"Idempotency-Key {idem.key!r} was already used with a different request body; "
            "use a new key for a new request",
            param="Idempotency-Key",
        )
    return record.resource_id


def _record_idempotency(
    session: Session, tenant_id: str, idem: Idempotency | None, resource_id: str
) -> None:
    if idem is not None:
        session.add(
            IdempotencyRecord(
                tenant_id=tenant_id,
                route=idem.route,
                key=idem.key,
                body_sha256=idem.body_sha256,
                resource_id=resource_id,
            )
        )


# --- files ----------------------------------------------------------------------------------


def create_file(
    session: Session,
    store: ObjectStore,
    tenant_id: str,
    *,
    filename: str,
    data: bytes,
    max_bytes: int,
    max_examples: int,
    purpose: str = "fine-tune",
    idempotency: Idempotency | None = None,
) -> tuple[File, bool]:
    """Validate a JSONL training file, store it and record it.

    Args:
        filename: the client's name for the file (kept for display only, never a storage path).
        data: the whole file.
        max_bytes: larger files are refused.
        max_examples: most examples per file.
        purpose: what the file is for; only ``fine-tune``.
        idempotency: replay protection; the digest should cover filename, purpose and content.

    Returns:
        ``(file, created)``; ``created`` is False when an idempotent replay returned the
        earlier file.

    Raises:
        TrainingFileError: every problem with its line number (``too_large`` set for the size
            and example-count limits).
        IdempotencyConflictError: the key was used with a different body.
    """
    if idempotency is not None and (earlier := _replayed_id(session, tenant_id, idempotency)):
        return get_file(session, earlier, tenant_id), False
    if purpose not in FILE_PURPOSES:
        raise JobsError(
            f"purpose must be one of {list(FILE_PURPOSES)}, got {purpose!r}", param="purpose"
        )
    conversations, issues = parse_jsonl(data, max_bytes=max_bytes, max_lines=max_examples)
    if issues:
        raise TrainingFileError(issues)
    file = File(
        id=new_id("file"),
        tenant_id=tenant_id,
        filename=filename[:255] or "upload.jsonl",
        purpose=purpose,
        bytes=len(data),
        num_examples=len(conversations),
        sha256=hashlib.sha256(data).hexdigest(),
        storage_key="",
        created_at=utcnow(),
    )
    file.storage_key = upload_key(tenant_id, file.id)
    store.put_bytes(file.storage_key, data, content_type="application/jsonl")
    session.add(file)
    _record_idempotency(session, tenant_id, idempotency, file.id)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won; answer with its file.
        session.rollback()
        store.delete(file.storage_key)
        if idempotency is not None and (earlier := _replayed_id(session, tenant_id, idempotency)):
            return get_file(session, earlier, tenant_id), False
        raise
    return file, True


def get_file(session: Session, file_id: str, tenant_id: str | None = None) -> File:
    """The file ``file_id``, if it belongs to ``tenant_id`` (any tenant when ``None``).

    Raises:
        TrainingFileNotFoundError: no such file for the tenant.
    """
    file = session.get(File, file_id)
    if file is None or (tenant_id is not None and file.tenant_id != tenant_id):
        raise TrainingFileNotFoundError(f"no file with id {file_id!r}", param="file_id")
    return file


def list_files(
    session: Session, tenant_id: str, *, limit: int = 20, after: str | None = None
) -> Page[File]:
    """A tenant's files, newest first; ``after`` is the last file id of the previous page."""
    stmt = select(File).where(File.tenant_id == tenant_id)
    if after is not None:
        anchor = session.get(File, after)
        if anchor is None or anchor.tenant_id != tenant_id:
            raise InvalidCursorError(f"unknown cursor {after!r}", param="after")
        stmt = stmt.where(_before(File, anchor.created_at, anchor.id))
    rows = list(
        session.scalars(stmt.order_by(File.created_at.desc(), File.id.desc()).limit(limit + 1))
    )
    return Page(rows[:limit], len(rows) > limit)


def _before(model: type[File] | type[Job], created_at: Any, row_id: str) -> Any:
    # (created_at, id) < (anchor.created_at, anchor.id), spelled out for SQLite.
    return or_(
        model.created_at < created_at,
        and_(model.created_at == created_at, model.id < row_id),
    )


# --- jobs -----------------------------------------------------------------------------------


def available_model_ids() -> list[str]:
    """Model ids a tenant may name: the catalog's built-in and derived models.

    Local directories that ``core.catalog.get_spec`` also accepts are left out on purpose: a
    tenant must not be able to point the service at paths on its machines.
    """
    return [spec.model_id for spec in list_models()]


def create_job(
    session: Session,
    tenant_id: str,
    spec: JobSpec,
    *,
    default_max_concurrent_jobs: int = DEFAULT_MAX_CONCURRENT_JOBS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    idempotency: Idempotency | None = None,
) -> tuple[Job, bool]:
    """Check a job spec against the catalog, the tenant's files and quota, and record the job.

    The job starts in ``validating`` with a ``created`` event; the caller hands it to a
    worker (``core.dispatch``) only when ``created`` is True.

    Returns:
        ``(job, created)``; ``created`` is False for an idempotent replay.

    Raises:
        ModelUnavailableError: the model is not in the catalog.
        TrainingFileNotFoundError: the training file is not the tenant's.
        QuotaExceededError: the tenant has its maximum of non-terminal jobs.
        IdempotencyConflictError: the key was used with a different body.
    """
    if idempotency is not None and (earlier := _replayed_id(session, tenant_id, idempotency)):
        return get_job(session, earlier, tenant_id), False
    models = available_model_ids()
    if spec.model not in models:
        raise ModelUnavailableError(
            f"unknown model {spec.model!r}; available: {', '.join(models)} (GET /models)",
            param="model",
        )
    try:
        get_file(session, spec.training_file, tenant_id)
    except TrainingFileNotFoundError as exc:
        raise TrainingFileNotFoundError(exc.message, param="training_file") from None
    _check_quota(session, tenant_id, default_max_concurrent_jobs)
    now = utcnow()
    job = Job(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        model=spec.model,
        training_file_id=spec.training_file,
        preset=spec.preset,
        spec=spec.model_dump(mode="json"),
        status=JobStatus.VALIDATING.value,
        attempts=0,
        max_attempts=max_attempts,
        cancel_requested=False,
        progress={},
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    session.add(_event(job.id, "created", f"job created for model {spec.model}", spec.model_dump()))
    _record_idempotency(session, tenant_id, idempotency, job.id)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency is not None and (earlier := _replayed_id(session, tenant_id, idempotency)):
            return get_job(session, earlier, tenant_id), False
        raise
    metrics.record_job_created(job.model, job.preset)
    return job, True


def _check_quota(session: Session, tenant_id: str, default_limit: int) -> None:
    # Lock the tenant row so two concurrent submissions cannot both take the last slot
    # (PostgreSQL; SQLite serialises writers anyway and ignores FOR UPDATE).
    tenant = session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update())
    limit = default_limit
    if tenant is not None and tenant.max_concurrent_jobs is not None:
        limit = tenant.max_concurrent_jobs
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_(list(ACTIVE_STATUSES)))
    )
    if (active or 0) >= limit:
        raise QuotaExceededError(
            f"the tenant already has {active} unfinished job(s), its limit is {limit}; wait for "
            "one to finish or cancel one"
        )


def get_job(session: Session, job_id: str, tenant_id: str | None = None) -> Job:
    """The job ``job_id``, if it belongs to ``tenant_id`` (any tenant when ``None``).

    The row is read from the database even if the session holds it already.

    Raises:
        JobNotFoundError: no such job for the tenant.
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise JobNotFoundError(f"no job with id {job_id!r}", param="job_id")
    return job


def list_jobs(
    session: Session,
    tenant_id: str | None,
    *,
    status: str | Iterable[str] | None = None,
    limit: int = 20,
    after: str | None = None,
) -> Page[Job]:
    """Jobs newest first, ordered by ``(created_at, id)``.

    Args:
        tenant_id: the tenant; ``None`` lists every tenant's jobs (admin).
        status: one status or several to keep.
        limit: page size.
        after: the last job id of the previous page.

    Raises:
        InvalidCursorError: ``after`` is not a job this caller can see.
    """
    stmt = select(Job)
    if tenant_id is not None:
        stmt = stmt.where(Job.tenant_id == tenant_id)
    if status is not None:
        wanted = [status] if isinstance(status, str) else list(status)
        stmt = stmt.where(Job.status.in_([JobStatus(s).value for s in wanted]))
    if after is not None:
        anchor = session.get(Job, after)
        if anchor is None or (tenant_id is not None and anchor.tenant_id != tenant_id):
            raise InvalidCursorError(f"unknown cursor {after!r}", param="after")
        stmt = stmt.where(_before(Job, anchor.created_at, anchor.id))
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return Page(rows[:limit], len(rows) > limit)


def _current_status(session: Session, job_id: str) -> JobStatus:
    value = session.scalar(select(Job.status).where(Job.id == job_id))
    if value is None:
        raise JobNotFoundError(f"no job with id {job_id!r}", param="job_id")
    return JobStatus(value)


def transition(
    session: Session,
    job_id: str,
    to: str,
    reason: str | None = None,
    *,
    from_: Iterable[str] | None = None,
) -> Job:
    """Move a job to status ``to`` with compare-and-set, record a ``status`` event, commit.

    Args:
        to: the new status.
        reason: why (kept on the job as ``status_reason`` and in the event).
        from_: accept only these current statuses (a stricter claim than the state machine's).

    The session's transaction ends either way: committed on success, rolled back on failure,
    so call it with no half-done work pending in the session.

    Returns:
        The job as stored after the change.

    Raises:
        IllegalTransition: the move is not allowed from the job's current status (checked
            against the database, so a stale copy in memory cannot move a job backwards).
        JobNotFoundError: no such job.
    """
    target = JobStatus(to)
    allowed_from = {JobStatus(s) for s in from_} if from_ is not None else None
    for _ in range(_CAS_RETRIES):
        current = _current_status(session, job_id)
        legal = target in TRANSITIONS[current]
        if not legal or (allowed_from is not None and current not in allowed_from):
            session.rollback()
            raise IllegalTransition(job_id, current, target)
        now = utcnow()
        values: dict[str, Any] = {
            "status": target.value,
            "status_reason": reason,
            "updated_at": now,
        }
        if target is JobStatus.RUNNING:
            values["started_at"] = func.coalesce(Job.started_at, now)
        if target in TERMINAL_STATUSES:
            values["finished_at"] = now
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == current.value)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            data = {"status": target.value, "previous": current.value, "reason": reason}
            message = f"status {current.value} -> {target.value}" + (
                f": {reason}" if reason else ""
            )
            session.add(_event(job_id, "status", message, data))
            session.commit()
            return get_job(session, job_id)
        # Another writer changed the status between our read and our update: end the
        # transaction (on SQLite it holds the write lock) and re-check against the winner.
        session.rollback()
    current = _current_status(session, job_id)
    session.rollback()
    raise IllegalTransition(job_id, current, target)


def begin_attempt(session: Session, job_id: str) -> int:
    """Count one more delivery of the job to a worker and commit; returns the attempt number.

    Raises:
        AttemptsExhaustedError: the job has had ``max_attempts`` deliveries already (the
            pipeline should then fail it).
        JobNotFoundError: no such job.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts < Job.max_attempts)
        .values(attempts=Job.attempts + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = get_job(session, job_id)
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise AttemptsExhaustedError(
            f"job {job_id} has been attempted {job.attempts} times (max_attempts "
            f"{job.max_attempts}); giving up"
        )
    return job.attempts


def cancel_job(
    session: Session,
    job_id: str,
    tenant_id: str | None = None,
    *,
    reason: str = "cancelled on request",
) -> Job:
    """Request cancellation: final at once if no worker holds the job yet.

    A job in ``validating`` or ``queued`` goes straight to ``cancelled``; a job a worker holds
    keeps running until the worker sees ``cancel_requested`` (:func:`is_cancel_requested`)
    and moves it to ``cancelled`` itself.

    Raises:
        ConflictError: the job has finished already (code ``job_finished``).
        JobNotFoundError: no such job for the tenant.
    """
    job = get_job(session, job_id, tenant_id)
    flagged = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_([s.value for s in ACTIVE_STATUSES]))
        .values(cancel_requested=True, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if flagged.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        job = get_job(session, job_id)
        raise JobFinishedError(
            f"job {job_id} has already finished ({job.status}); only unfinished jobs can be "
            "cancelled"
        )
    session.add(_event(job_id, "cancel_requested", reason, level="warning"))
    session.commit()
    try:
        return transition(session, job_id, JobStatus.CANCELLED, reason, from_=NOT_STARTED_STATUSES)
    except IllegalTransition:
        # A worker holds the job (or it just finished); the worker honours the flag.
        return get_job(session, job_id)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """Whether cancellation was requested (read fresh from the database).

    Raises:
        JobNotFoundError: no such job.
    """
    flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    if flag is None:
        raise JobNotFoundError(f"no job with id {job_id!r}", param="job_id")
    return bool(flag)


def update_progress(session: Session, job_id: str, progress: dict[str, Any]) -> bool:
    """Replace the job's progress (step, total_steps, loss, ...) and commit.

    Returns:
        False when the job is already terminal (a late report is dropped), else True.

    Raises:
        JobNotFoundError: no such job.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in ACTIVE_STATUSES]))
        .values(progress=dict(progress), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return True
    _current_status(session, job_id)  # raises when the job does not exist
    return False


_UNSET: Any = object()


def set_result(
    session: Session,
    job_id: str,
    *,
    result: dict[str, Any] | None = _UNSET,
    risk_report_key: str | None = _UNSET,
    audit_report_key: str | None = _UNSET,
    adapter_prefix: str | None = _UNSET,
    released: bool | None = None,
) -> Job:
    """Record what a job produced; arguments left out are kept as they are. Commits.

    Args:
        result: final metrics and the audit summary (JSON).
        risk_report_key: storage key of the pre-screening risk report.
        audit_report_key: storage key of the audit report.
        adapter_prefix: storage prefix of the adapter (quarantine or released).
        released: True marks the adapter released (``released_at`` = now), False clears it.

    Raises:
        JobNotFoundError: no such job.
    """
    job = get_job(session, job_id)
    fields = {
        "result": result,
        "risk_report_key": risk_report_key,
        "audit_report_key": audit_report_key,
        "adapter_prefix": adapter_prefix,
    }
    for name, value in fields.items():
        if value is not _UNSET:
            setattr(job, name, value)
    if released is not None:
        job.released_at = utcnow() if released else None
    job.updated_at = utcnow()
    session.commit()
    return job


def release_override(
    session: Session, store: ObjectStore, job_id: str, *, by_key_id: str, reason: str
) -> Job:
    """Release a rejected job's quarantined adapter by hand, recording who and why. Commits.

    The adapter is copied to the job's released prefix (the quarantined copy stays); the job
    keeps status ``rejected`` so its history stays true, and gains ``released_at`` and
    ``release_override`` = ``{"by_key_id", "reason", "at", "from_prefix"}``.

    Raises:
        ConflictError: the job is not rejected, is released already, or has no adapter.
        JobNotFoundError: no such job.
    """
    reason = reason.strip()
    if not reason:
        raise JobsError("a release override needs a reason", param="reason")
    job = get_job(session, job_id)
    problem = None
    if job.status != JobStatus.REJECTED:
        problem = f"job {job_id} is {job.status}; only rejected jobs can be released by override"
    elif job.released_at is not None:
        problem = f"job {job_id} was released already at {job.released_at.isoformat()}"
    elif not job.adapter_prefix:
        problem = f"job {job_id} has no quarantined adapter to release"
    if problem:
        raise ConflictError(problem)
    # core.release writes the override record beside the copied report and adapter, so the
    # "nothing under released/ without a passing report or an override record" invariant holds.
    from core.release import manual_override

    source = job.adapter_prefix
    outcome = manual_override(store, job.tenant_id, job.id, who=by_key_id, why=reason)
    now = utcnow()
    job.release_override = {
        "by_key_id": by_key_id,
        "reason": reason,
        "at": now.isoformat(),
        "from_prefix": source,
    }
    job.adapter_prefix = outcome.adapter_prefix
    job.audit_report_key = outcome.report_key
    job.released_at = now
    job.updated_at = now
    session.add(
        _event(
            job_id,
            "release_override",
            f"adapter released by override: {reason}",
            {"by_key_id": by_key_id, "reason": reason},
            level="warning",
        )
    )
    session.commit()
    return job


# --- events ---------------------------------------------------------------------------------


def _event(
    job_id: str,
    type: str,
    message: str,
    data: dict[str, Any] | None = None,
    level: str = "info",
) -> JobEvent:
    return JobEvent(
        job_id=job_id, type=type, message=message, data=data, level=level, created_at=utcnow()
    )


def add_event(
    session: Session,
    job_id: str,
    type: str,
    message: str,
    data: dict[str, Any] | None = None,
    level: str = "info",
) -> JobEvent:
    """Append an event to a job's history and commit.

    Args:
        type: short identifier (``status``, ``progress``, ``metrics``, ``warning``...).
        message: one human-readable line.
        data: JSON details (loss, beta, risk...).
        level: ``info``, ``warning`` or ``error``.
    """
    event = _event(job_id, type, message, data, level)
    session.add(event)
    session.commit()
    return event


def list_events(
    session: Session, job_id: str, *, after: int | None = None, limit: int = 100
) -> Page[JobEvent]:
    """A job's events, oldest first, those with ``id > after`` when given."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id > after)
    rows = list(session.scalars(stmt.order_by(JobEvent.id).limit(limit + 1)))
    return Page(rows[:limit], len(rows) > limit)


# --- the worker lease -------------------------------------------------------------------------
# A worker holds a job while it runs it and shows it is alive with heartbeats. A worker killed
# outright (OOM, kill -9) stops beating; once its heartbeat is older than the staleness limit,
# the reconciler hands the job back to the queue and any worker may take it over.

_HELD = (JobStatus.PRESCREENING, JobStatus.RUNNING, JobStatus.AUDITING)


def claim(session: Session, job_id: str, worker_id: str, stale_after_seconds: float) -> bool:
    """Take the job's lease for ``worker_id`` unless another live worker holds it. Commits.

    Returns:
        True when ``worker_id`` now holds the job; False when the job is finished or a worker
        whose heartbeat is fresh holds it (a duplicate delivery should then just return).
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_after_seconds)
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_([s.value for s in ACTIVE_STATUSES]),
            or_(
                Job.worker_id.is_(None),
                Job.worker_id == worker_id,
                Job.heartbeat_at.is_(None),
                Job.heartbeat_at < cutoff,
            ),
        )
        .values(worker_id=worker_id, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    """Refresh the lease; False when ``worker_id`` no longer holds the job. Commits."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def release_lease(session: Session, job_id: str, worker_id: str) -> None:
    """Give the lease up (the job finished, or this worker is shutting down). Commits."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id)
        .values(worker_id=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def stale_jobs(session: Session, stale_after_seconds: float) -> list[Job]:
    """Jobs a worker was running whose heartbeat is older than the limit (worker presumed dead)."""
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    return list(
        session.scalars(
            select(Job).where(
                Job.status.in_([s.value for s in _HELD]),
                or_(
                    Job.heartbeat_at < cutoff,
                    and_(Job.heartbeat_at.is_(None), Job.updated_at < cutoff),
                ),
            )
        )
    )


def jobs_in(session: Session, statuses: Iterable[str], older_than_seconds: float = 0) -> list[Job]:
    """Jobs in the given statuses not updated for ``older_than_seconds``."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    return list(
        session.scalars(select(Job).where(Job.status.in_(list(statuses)), Job.updated_at <= cutoff))
    )


def requeue(session: Session, job_id: str, reason: str) -> Job:
    """Hand a job whose worker died back to the queue (the lease is dropped). Commits.

    Raises:
        IllegalTransition: the job moved on meanwhile (finished, or was claimed again).
    """
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(worker_id=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return transition(session, job_id, JobStatus.QUEUED, reason, from_=_HELD)
