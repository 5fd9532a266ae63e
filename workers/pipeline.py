"""The job path as plain functions: read and validate data, tokenize, train.

The CLI's local commands call these today; the Celery task and the in-process worker will
call the same functions, so there is one code path from a file to an adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from core import jobs, metrics
from core.catalog import ModelNotFoundError
from core.chatdata import DatasetValidationError, ValidationIssue, parse_jsonl
from core.db import get_engine, session_scope
from core.jobs import JobStatus
from core.release import model_card, release
from core.settings import Settings, get_settings
from core.specs import JobSpec
from core.storage import ObjectStore, checkpoint_prefix, get_store, report_key
from safety.schedules import preset_config
from workers.data import TokenizedExample, parse_and_tokenize, tokenize_conversations
from workers.models import load, load_tokenizer
from workers.training import (
    DirectoryCheckpointer,
    LoraSpec,
    ProgressFn,
    StepStats,
    TrainingConfig,
    TrainResult,
    train,
)

log = logging.getLogger(__name__)


def load_training_file(
    path: Path, model_id: str | None = None, *, max_seq_len: int | None = None
) -> tuple[list[TokenizedExample] | list, list[ValidationIssue]]:
    """Validate a JSONL training file, and tokenize it when a model is named.

    Returns:
        ``(examples, issues)``: tokenized examples when ``model_id`` is given, else the parsed
        conversations; every problem found, line by line.
    """
    settings = get_settings()
    path = Path(path)
    conversations, issues = parse_jsonl(
        path.read_bytes(), max_bytes=settings.max_upload_bytes, max_lines=settings.max_examples
    )
    if model_id is None:
        return conversations, issues
    tokenizer, _ = load_tokenizer(model_id)
    examples, token_issues = tokenize_conversations(
        conversations, tokenizer, max_seq_len or settings.max_seq_len
    )
    return examples, sorted(issues + token_issues, key=lambda i: i.line or 0)


def run_local_training(
    model_id: str,
    data_path: Path,
    config: TrainingConfig,
    *,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    show_progress: bool = False,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Validate, tokenize and train on one file; the adapter goes to ``out_dir``.

    Raises:
        DatasetValidationError: the file has problems (all of them are listed).
        ModelNotFoundError: the model id is unknown.
    """
    examples, issues = load_training_file(data_path, model_id)
    if issues:
        raise DatasetValidationError(issues)
    model, tokenizer, spec = load(model_id)
    checkpointer = DirectoryCheckpointer(checkpoint_dir) if checkpoint_dir else None
    callbacks = [cb for cb in (progress, progress_bar() if show_progress else None) if cb]

    def report(stats: StepStats) -> None:
        for callback in callbacks:
            callback(stats)

    return train(
        model,
        spec,
        examples,
        config,
        pad_token_id=tokenizer.pad_token_id,
        out_dir=out_dir,
        checkpointer=checkpointer,
        progress=report,
        should_stop=should_stop,
    )


def progress_bar() -> ProgressFn:
    """A tqdm bar fed by the per-step stats (created on the first step, when totals are known)."""
    from tqdm.auto import tqdm

    bar: list[tqdm] = []

    def update(stats: StepStats) -> None:
        if not bar:
            bar.append(
                tqdm(total=stats.total_steps, initial=stats.step - 1, desc="train", unit="step")
            )
        bar[0].update(1)
        bar[0].set_postfix(
            loss=f"{stats.loss:.3f}",
            kl=f"{stats.kl:.3f}",
            beta=f"{stats.beta_mean:.2f}",
            risk=f"{stats.risk_mean:.2f}",
            tok_s=f"{stats.tokens_per_s:.0f}",
        )
        if stats.step >= stats.total_steps:
            bar[0].close()

    return update


# ============================================================================================
# The service job: queued -> prescreening -> running -> auditing -> succeeded | rejected.
#
# ``run_job(job_id)`` is what the Celery task and the in-process dispatcher call. Every stage is
# idempotent, so a job whose worker died is simply run again: the risk report and the trained
# adapter are read back from storage when they are there, training resumes from its newest
# checkpoint, and the release writes each object at most once (core.release).


class JobCancelled(Exception):
    """The customer cancelled the job; the pipeline stops at the next check."""


class JobRejected(Exception):
    """The intake policy refused the training file."""


@dataclass
class _JobContext:
    job_id: str
    tenant_id: str
    model_id: str
    preset: str
    spec: JobSpec
    file_key: str
    settings: Settings
    store: ObjectStore
    db: Engine
    worker_id: str


def run_job(job_id: str, *, settings: Settings | None = None, worker_id: str | None = None) -> str:
    """Run (or resume) one job to a final status; returns the status it ends in.

    Returns the job's current status without doing anything when the job is finished already
    or another live worker holds it (a duplicate delivery).
    """
    settings = settings or get_settings()
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    db = get_engine(settings.resolved_database_url)
    started = time.monotonic()
    with session_scope(db) as session:
        job = jobs.get_job(session, job_id)
        if jobs.is_terminal(job.status):
            log.info("job %s is %s already; nothing to do", job_id, job.status)
            return job.status
        if not jobs.claim(session, job_id, worker_id, settings.job_stale_after_seconds):
            log.info("job %s is held by a live worker; skipping this delivery", job_id)
            return jobs.get_job(session, job_id).status
        metrics.JOB_ATTEMPTS.inc()
        try:
            attempt = jobs.begin_attempt(session, job_id)
        except jobs.AttemptsExhaustedError as exhausted:
            return _finish(db, job_id, worker_id, JobStatus.FAILED, str(exhausted), started)
        job = jobs.get_job(session, job_id)
        file_row = jobs.get_file(session, job.training_file_id)
        ctx = _JobContext(
            job_id=job_id,
            tenant_id=job.tenant_id,
            model_id=job.model,
            preset=job.preset,
            spec=JobSpec.model_validate(job.spec),
            file_key=file_row.storage_key,
            settings=settings,
            store=get_store(settings, public_base_url=settings.public_base_url),
            db=db,
            worker_id=worker_id,
        )
        jobs.add_event(session, job_id, "attempt", f"attempt {attempt} on worker {worker_id}")

    with _Heartbeat(ctx):
        try:
            status, reason = _run_stages(ctx)
        except JobCancelled:
            status, reason = JobStatus.CANCELLED, "cancelled on request"
        except JobRejected as rejected:
            status, reason = JobStatus.REJECTED, str(rejected)
        except (DatasetValidationError, ModelNotFoundError, ValueError) as error:
            # The customer's input cannot be trained on: retrying would fail the same way.
            status, reason = JobStatus.FAILED, _short(error)
        except jobs.IllegalTransition as moved:
            # Someone else moved the job (a cancel, a reconciler): respect their decision.
            log.warning("job %s moved under us: %s", job_id, moved)
            with session_scope(db) as session:
                jobs.release_lease(session, job_id, worker_id)
                return jobs.get_job(session, job_id).status
        except Exception as error:
            log.exception("job %s failed", job_id)
            status, reason = JobStatus.FAILED, f"internal error: {type(error).__name__}"
    return _finish(db, job_id, worker_id, status, reason, started)


def _run_stages(ctx: _JobContext) -> tuple[JobStatus, str]:
    with session_scope(ctx.db) as session:
        status = JobStatus(jobs.get_job(session, ctx.job_id).status)
    conversations, examples, tokenizer_model = _prepare_data(ctx)
    model, tokenizer, spec = tokenizer_model

    _enter(ctx, JobStatus.PRESCREENING, status)
    risk_report = _prescreen(ctx, conversations, examples, model, tokenizer, spec)
    _check_cancel(ctx)

    adapter_dir = Path(tempfile.mkdtemp(prefix=f"tether-{ctx.job_id}-"))
    try:
        _enter(ctx, JobStatus.RUNNING)
        train_summary, base = _train(ctx, model, tokenizer, spec, examples, adapter_dir)
        _check_cancel(ctx)

        _enter(ctx, JobStatus.AUDITING)
        return _audit_and_release(
            ctx, (base, tokenizer, spec), adapter_dir, len(examples), risk_report, train_summary
        )
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)


def _prepare_data(ctx: _JobContext) -> tuple[list, list, tuple]:
    """Read the training file back from storage, re-validate and tokenize it."""
    settings = ctx.settings
    model, tokenizer, spec = load(ctx.model_id)
    conversations, examples = parse_and_tokenize(
        ctx.store.get_bytes(ctx.file_key),
        tokenizer,
        max_bytes=settings.max_upload_bytes,
        max_lines=settings.max_examples,
        max_seq_len=settings.max_seq_len,
    )
    _event(ctx, "validated", f"{len(examples)} examples tokenized for {ctx.model_id}")
    return conversations, examples, (model, tokenizer, spec)


def _prescreen(ctx, conversations, examples, model, tokenizer, spec) -> dict[str, Any]:
    """Score every example once (critic + probe); the report is stored and reused on resume."""
    from workers.risk import load_critic, load_probe, risk_config, score_examples

    key = report_key(ctx.tenant_id, ctx.job_id, "risk_report")
    if ctx.store.exists(key):
        report = json.loads(ctx.store.get_bytes(key))
    else:
        critic = load_critic(ctx.settings, train_if_missing=True)
        probe = load_probe(spec, model, tokenizer, train_if_missing=True)
        scored = score_examples(
            conversations,
            examples,
            model=model,
            probe=probe,
            critic=critic,
            pad_token_id=tokenizer.pad_token_id,
            config=risk_config(ctx.settings),
        )
        report = scored.to_dict()
        ctx.store.put_bytes(key, json.dumps(report).encode(), "application/json")
        metrics.record_risks([row["risk"] for row in report["rows"]])
    with session_scope(ctx.db) as session:
        jobs.set_result(session, ctx.job_id, risk_report_key=key)
    summary = report["summary"]
    _event(
        ctx,
        "risk_report",
        summary["message"],
        {k: summary[k] for k in ("examples", "mean_risk", "by_band", "high_risk_share")},
    )
    risk_by_line = {row["line"]: row["risk"] for row in report["rows"]}
    for example in examples:
        example.risk = risk_by_line.get(example.line, example.risk)
    if not summary["accepted"]:
        raise JobRejected(summary["message"])
    return report


def _train(ctx, model, tokenizer, spec, examples, adapter_dir: Path) -> tuple[dict[str, Any], Any]:
    """Train (resuming from the newest checkpoint in storage) and keep the adapter in storage.

    Returns the training summary and ``model`` as a plain base again (the LoRA layers training
    injected are removed, not merged), so the audit applies the saved adapter to it instead of
    loading the base a second time.
    """
    final_prefix = checkpoint_prefix(ctx.tenant_id, ctx.job_id) + "final/"
    if ctx.store.list(final_prefix):
        ctx.store.download_dir(final_prefix, adapter_dir)
        _event(ctx, "training", "training finished on an earlier attempt; reusing its adapter")
        summary_key = final_prefix + "summary.json"
        summary = (
            json.loads(ctx.store.get_bytes(summary_key)) if ctx.store.exists(summary_key) else {}
        )
        return summary, model

    config = training_config(ctx.spec, ctx.preset)
    checkpointer = StoreCheckpointer(ctx.store, checkpoint_prefix(ctx.tenant_id, ctx.job_id))
    reporter = _ProgressReporter(ctx)
    result = train(
        model,
        spec,
        examples,
        config,
        pad_token_id=tokenizer.pad_token_id,
        out_dir=adapter_dir,
        checkpointer=checkpointer,
        progress=reporter,
        should_stop=reporter.cancel_requested,
    )
    if result.cancelled:
        raise JobCancelled
    if result.resumed_from:
        metrics.JOB_RESUMES.inc()
        _event(ctx, "resumed", f"training resumed from step {result.resumed_from}")
    summary = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 2),
        "examples": len(examples),
    }
    (adapter_dir / "summary.json").write_text(json.dumps(summary))
    ctx.store.upload_dir(final_prefix, adapter_dir)
    (adapter_dir / "summary.json").unlink()
    return summary, result.model.unload()


def _audit_and_release(
    ctx: _JobContext,
    loaded: tuple[Any, Any, Any],
    adapter_dir: Path,
    n_examples: int,
    risk_report: dict[str, Any],
    train_summary: dict[str, Any],
) -> tuple[JobStatus, str]:
    """Audit the adapter, then store it under released/ or quarantine/ with its report."""
    from workers.audit import audit_model

    report = audit_model(
        ctx.model_id,
        adapter_dir,
        loaded=loaded,
        settings=ctx.settings,
        adapter_id=ctx.job_id,
        progress=lambda line: _event(ctx, "audit", line),
    ).to_json()
    card = model_card(
        base_model=ctx.model_id,
        report=report,
        preset=ctx.preset,
        training_examples=n_examples,
        job=ctx.job_id,
    )
    outcome = release(ctx.store, ctx.tenant_id, ctx.job_id, adapter_dir, report, card)
    figures = report["figures"]
    result = {
        "training": train_summary,
        "risk": risk_report["summary"],
        "audit": {
            "asr": figures["asr"]["value"],
            "refusal_asr": figures["refusal_asr"]["value"],
            "over_refusal": figures["over_refusal"]["value"],
            "deltas": report["deltas"],
            "verdict": report["verdict"],
        },
    }
    with session_scope(ctx.db) as session:
        jobs.set_result(
            session,
            ctx.job_id,
            result=result,
            audit_report_key=outcome.report_key,
            adapter_prefix=outcome.adapter_prefix,
            released=outcome.released,
        )
    metrics.record_audit(
        figures["asr"]["value"], figures["over_refusal"]["value"], outcome.released
    )
    reason = report["verdict"]["reason"]
    if outcome.released:
        return JobStatus.SUCCEEDED, reason
    return JobStatus.REJECTED, reason


# --- helpers of the service job -----------------------------------------------------------------


def training_config(spec: JobSpec, preset: str) -> TrainingConfig:
    """Map a job spec onto the training loop's configuration."""
    hp = spec.hyperparameters
    return TrainingConfig(
        lora=LoraSpec(r=hp.lora.r, alpha=hp.lora.alpha, dropout=hp.lora.dropout),
        regularizer=preset_config(preset),
        learning_rate=hp.learning_rate,
        batch_size=hp.batch_size,
        epochs=hp.epochs,
        max_steps=hp.max_steps,
        seed=hp.seed,
        checkpoint_every=_checkpoint_every(hp.max_steps),
    )


def _checkpoint_every(max_steps: int | None) -> int:
    # Often enough that a lost worker redoes little, rarely enough that uploads stay cheap.
    if max_steps is None:
        return 25
    return max(1, min(25, max_steps // 4))


class StoreCheckpointer:
    """Training checkpoints in object storage (``checkpoints/{tenant}/{job}/step-N.pt``)."""

    def __init__(self, store: ObjectStore, prefix: str, keep: int = 2) -> None:
        self.store = store
        self.prefix = prefix
        self.keep = keep

    def _steps(self) -> list[tuple[int, str]]:
        found = []
        for key in self.store.list(self.prefix):
            name = key[len(self.prefix) :]
            if name.startswith("step-") and name.endswith(".pt") and "/" not in name:
                found.append((int(name[5:-3]), key))
        return sorted(found)

    def save(self, step: int, blob: bytes) -> None:
        self.store.put_bytes(f"{self.prefix}step-{step:06d}.pt", blob)
        for _, old in self._steps()[: -self.keep]:
            self.store.delete(old)

    def latest(self) -> tuple[int, bytes] | None:
        steps = self._steps()
        if not steps:
            return None
        step, key = steps[-1]
        return step, self.store.get_bytes(key)


class _ProgressReporter:
    """Per-step progress to the database (job progress + throttled events) and metrics."""

    EVENT_INTERVAL_S = 2.0
    CANCEL_CHECK_INTERVAL_S = 2.0

    def __init__(self, ctx: _JobContext) -> None:
        self.ctx = ctx
        self._last_event = 0.0
        self._last_cancel_check = 0.0

    def __call__(self, stats: StepStats) -> None:
        data = {
            "step": stats.step,
            "total_steps": stats.total_steps,
            "epoch": stats.epoch,
            "loss": round(stats.loss, 5),
            "ce": round(stats.ce, 5),
            "kl": round(stats.kl, 6),
            "beta": round(stats.beta_mean, 4),
            "risk": round(stats.risk_mean, 4),
            "lr": stats.lr,
            "tokens_per_s": round(stats.tokens_per_s, 1),
        }
        metrics.record_training_step(stats.loss, stats.kl, stats.beta_mean, stats.tokens_per_s)
        now = time.monotonic()
        last = stats.step >= stats.total_steps
        with session_scope(self.ctx.db) as session:
            jobs.update_progress(session, self.ctx.job_id, data)
            if last or now - self._last_event >= self.EVENT_INTERVAL_S:
                self._last_event = now
                message = f"step {stats.step}/{stats.total_steps}: loss {stats.loss:.4f}"
                jobs.add_event(session, self.ctx.job_id, "progress", message, data)

    def cancel_requested(self) -> bool:
        now = time.monotonic()
        if now - self._last_cancel_check < self.CANCEL_CHECK_INTERVAL_S:
            return False
        self._last_cancel_check = now
        with session_scope(self.ctx.db) as session:
            return jobs.is_cancel_requested(session, self.ctx.job_id)


class _Heartbeat:
    """Beats the job's lease from a background thread while a stage runs."""

    def __init__(self, ctx: _JobContext) -> None:
        self.ctx = ctx
        self.interval = max(1.0, ctx.settings.job_stale_after_seconds / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tether-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope(self.ctx.db) as session:
                    jobs.heartbeat(session, self.ctx.job_id, self.ctx.worker_id)
            except Exception:  # a database blip must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed", self.ctx.job_id, exc_info=True)


def _enter(ctx: _JobContext, target: JobStatus, current: JobStatus | None = None) -> None:
    """Move to ``target`` unless the job is there already (a resumed attempt)."""
    if current is None:
        with session_scope(ctx.db) as session:
            current = JobStatus(jobs.get_job(session, ctx.job_id).status)
    if current == target:
        return
    if _ORDER.index(current) > _ORDER.index(target):
        return  # resuming past this stage: its output is reused
    with session_scope(ctx.db) as session:
        jobs.transition(session, ctx.job_id, target)


_ORDER = [JobStatus.QUEUED, JobStatus.PRESCREENING, JobStatus.RUNNING, JobStatus.AUDITING]


def _check_cancel(ctx: _JobContext) -> None:
    with session_scope(ctx.db) as session:
        if jobs.is_cancel_requested(session, ctx.job_id):
            raise JobCancelled


def _event(ctx: _JobContext, type_: str, message: str, data: dict[str, Any] | None = None) -> None:
    with session_scope(ctx.db) as session:
        jobs.add_event(session, ctx.job_id, type_, message, data)


def _finish(
    db: Engine, job_id: str, worker_id: str, status: JobStatus, reason: str, started: float
) -> str:
    with session_scope(db) as session:
        try:
            jobs.transition(session, job_id, status, reason)
        except jobs.IllegalTransition:
            log.warning("job %s could not move to %s; it moved on meanwhile", job_id, status)
        jobs.release_lease(session, job_id, worker_id)
        final = jobs.get_job(session, job_id).status
    if jobs.is_terminal(final):
        metrics.record_job_finished(final, time.monotonic() - started)
    return final


def _short(error: Exception, limit: int = 2000) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + " ..."
