"""Celery tasks: thin adapters from a delivered message to the pipeline."""

from __future__ import annotations

from workers.celery_app import RUN_JOB_TASK, app


@app.task(name=RUN_JOB_TASK)
def run_job_task(job_id: str) -> str:
    """Run or resume one job; the job id is the whole message, everything else is re-read."""
    from workers.pipeline import run_job

    return run_job(job_id)
