"""Service commands: ``tether serve``, ``tether keys ...`` and ``tether jobs ...``.

``serve`` and ``keys`` run on the server side (they use the database directly); ``jobs`` talks
to a running API through the SDK, with the address and key from ``--api-url`` / ``--api-key``
or ``TETHER_API_URL`` / ``TETHER_API_KEY``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from client import Client
    from core.settings import Settings

keys_app = typer.Typer(help="API keys and tenants (run on the server).", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs on a Tether server.", no_args_is_help=True)

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url", envvar="TETHER_API_URL", help="API address, e.g. http://127.0.0.1:8000."
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="TETHER_API_KEY", help="Tenant API key (tth_...)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the JSON the API returned.")]

log = logging.getLogger(__name__)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


# --- serve ---------------------------------------------------------------------------------


def build_app(settings: Settings, *, migrate: bool = True) -> FastAPI:
    """The API application ``tether serve`` runs: database migrated, worker wired.

    In ``worker_mode=inprocess`` the API process is also the worker: jobs run in a background
    thread through ``workers.pipeline:run_job`` (imported on the first job, so the API starts
    without torch). In ``celery`` mode jobs go to the broker.
    """
    from api.app import create_app
    from core.db import migrate as migrate_database
    from core.dispatch import INPROCESS_RUNNER, Dispatcher, InProcessDispatcher, set_dispatcher

    if migrate:
        migrate_database(settings.resolved_database_url)
    dispatcher: Dispatcher | None = None
    if settings.worker_mode == "inprocess":
        from workers.reconciler import reconcile_once

        dispatcher = InProcessDispatcher(INPROCESS_RUNNER)
        set_dispatcher(dispatcher)
        # This process is the only worker: jobs a previous run left queued or half-done are
        # picked up again now (training resumes from its checkpoints).
        try:
            reconcile_once(dispatcher, settings, in_broker=None, stale_after_seconds=0)
        except SQLAlchemyError as error:  # --no-migrate on a database without the schema
            log.warning("skipped start-up recovery of jobs: %s", error)
    return create_app(settings, dispatcher=dispatcher)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    migrate: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Upgrade the database schema first.")
    ] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the REST API (and, in worker_mode=inprocess, the job worker) in this process."""
    import uvicorn

    from core.settings import get_settings

    settings = get_settings()
    try:
        app = build_app(settings, migrate=migrate)
    except Exception as error:  # an unreachable or unmigratable database
        raise _fail(f"cannot prepare the database: {error}") from None
    typer.echo(
        f"Tether API on http://{host}:{port} (docs at /docs); worker mode "
        f"{settings.worker_mode}, database {_redacted(settings.resolved_database_url)}",
        err=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --- keys ----------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name or id; created if missing.")],
    admin: Annotated[bool, typer.Option("--admin", help="An operator key (/admin routes).")] = (
        False
    ),
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
) -> None:
    """Create an API key and print it (to stdout, this once: it cannot be shown again)."""
    from sqlalchemy.exc import SQLAlchemyError

    from core import auth
    from core.db import session_scope
    from core.settings import get_settings

    url = get_settings().resolved_database_url
    try:
        with session_scope(url) as session:
            try:
                row = auth.find_tenant(session, tenant)
                created = False
            except auth.TenantNotFoundError:
                row = auth.create_tenant(session, tenant)
                created = True
            issued = auth.create_api_key(session, row.id, name=name, admin=admin)
    except SQLAlchemyError as error:
        raise _fail(
            f"cannot use the database at {_redacted(url)} ({type(error).__name__}); is it "
            "running and migrated (`tether serve` migrates it)?"
        ) from None
    kind = "admin key" if admin else "key"
    what = "new tenant" if created else "tenant"
    typer.echo(f"{kind} {issued.id} for {what} {row.name} ({row.id}); store it now:", err=True)
    typer.echo(issued.plaintext)


# --- jobs ----------------------------------------------------------------------------------


@contextmanager
def _client(api_url: str | None, api_key: str | None) -> Iterator[Client]:
    """An SDK client; API errors become a one-line message and exit code 1."""
    from client import Client, TetherError

    try:
        sdk = Client(api_url, api_key)
    except ValueError as error:
        raise _fail(str(error)) from None
    try:
        with sdk:
            yield sdk
    except TetherError as error:
        raise _fail(str(error)) from None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _job_line(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    step = f"{progress['step']}/{progress.get('total_steps', '?')}" if "step" in progress else "-"
    return (
        f"{job['id']}  {job['status']:<12} {job['model']:<20} {job['preset']:<9} "
        f"{step:>9}  {job['created_at']}"
    )


@jobs_app.command("submit")
def jobs_submit(
    file: Annotated[Path, typer.Argument(help="JSONL training file.", exists=True, dir_okay=False)],
    model: Annotated[str, typer.Option(help="Base model id (see GET /models).")],
    preset: Annotated[str, typer.Option(help="Safety preset: off, fixed, paper, adaptive.")] = (
        "adaptive"
    ),
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = (
        None
    ),
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the file.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Upload FILE and submit a job on it; prints the job id (with --wait, the final status)."""
    hyperparameters: dict[str, Any] = {}
    if max_steps is not None:
        hyperparameters["max_steps"] = max_steps
    if epochs is not None:
        hyperparameters["epochs"] = epochs
    with _client(api_url, api_key) as sdk:
        uploaded = sdk.files.upload(file)
        job = sdk.jobs.create(
            model, uploaded["id"], preset=preset, hyperparameters=hyperparameters or None
        )
        typer.echo(f"submitted {job['id']} ({uploaded['num_examples']} examples)", err=True)
        typer.echo(job["id"])
        if not wait:
            return
        final = sdk.jobs.wait(job["id"])
    reason = f": {final['status_reason']}" if final.get("status_reason") else ""
    typer.echo(f"{final['id']} {final['status']}{reason}", err=True)
    if final["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most jobs to show.")] = 20,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """List your jobs, newest first."""
    with _client(api_url, api_key) as sdk:
        found = list(sdk.jobs.list(status=status, limit=limit, page_size=min(limit, 100)))
    if as_json:
        _print_json(found)
        return
    for job in found:
        typer.echo(_job_line(job))
    if not found:
        typer.echo("no jobs", err=True)


@jobs_app.command("get")
def jobs_get(
    job_id: Annotated[str, typer.Argument(help="Job id (ftjob-...).")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Print one job as JSON."""
    with _client(api_url, api_key) as sdk:
        _print_json(sdk.jobs.get(job_id))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="Job id (ftjob-...).")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel a job (at once if not started, else at the worker's next check)."""
    with _client(api_url, api_key) as sdk:
        job = sdk.jobs.cancel(job_id)
    pending = " (cancel requested; the worker stops at its next check)"
    typer.echo(f"{job['id']} {job['status']}{'' if job['status'] == 'cancelled' else pending}")


@jobs_app.command("download")
def jobs_download(
    job_id: Annotated[str, typer.Argument(help="Job id (ftjob-...).")],
    out: Annotated[Path, typer.Option(help="Directory for the adapter files.")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a released adapter (PEFT files) into --out."""
    with _client(api_url, api_key) as sdk:
        paths = sdk.jobs.download_adapter(job_id, out)
    for path in paths:
        typer.echo(str(path))
