"""The ``tether`` command line.

It sits on top of every package (core, safety, workers, client), so heavy imports (torch,
transformers) happen inside the commands that need them: ``tether --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="tether",
    help="Tether: LoRA fine-tuning that stays tethered to a safe reference model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models in the registry.", no_args_is_help=True)
data_app = typer.Typer(help="Training data files.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


def quiet_transformers() -> None:
    """Keep the terminal for our own progress bars and messages."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@models_app.command("list")
def models_list() -> None:
    """List the models a job can name (no weights are loaded)."""
    from workers.models import list_models

    for spec in list_models():
        typer.echo(f"{spec.model_id:28s} {spec.source:15s} {spec.description}")


@models_app.command("prepare")
def models_prepare(model: Annotated[str, typer.Argument(help="Registry id or local dir.")]) -> None:
    """Build or convert a model once so later loads take seconds."""
    import time

    from workers.models import ModelNotFoundError, load

    quiet_transformers()
    started = time.perf_counter()
    try:
        loaded, _, spec = load(model, device="cpu")
    except ModelNotFoundError as err:
        raise _fail(str(err)) from None
    params = sum(p.numel() for p in loaded.parameters())
    typer.echo(
        f"{spec.model_id}: {params / 1e6:.1f}M parameters at {spec.path} "
        f"({time.perf_counter() - started:.1f} s)"
    )


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="JSONL training file.", exists=True)],
    model: Annotated[str | None, typer.Option(help="Also tokenize with this model.")] = None,
) -> None:
    """Check a training file line by line and list every problem found."""
    from workers.pipeline import load_training_file

    try:
        examples, issues = load_training_file(path, model)
    except Exception as err:  # a missing model or an unreadable file
        raise _fail(str(err)) from None
    for issue in issues:
        where = f"line {issue.line}" if issue.line is not None else "file"
        field = f" {issue.field}:" if issue.field else ""
        typer.echo(f"{where}:{field} {issue.message} [{issue.code}]")
    typer.echo(f"{len(examples)} valid examples, {len(issues)} problems")
    if issues:
        raise typer.Exit(1)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Base model id or local directory.")],
    data: Annotated[Path, typer.Option(help="JSONL training file.", exists=True)],
    out: Annotated[Path, typer.Option(help="Directory for the PEFT adapter.")],
    preset: Annotated[str, typer.Option(help="Safety preset: off, fixed, paper, adaptive.")] = (
        "adaptive"
    ),
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: epochs).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    grad_accum: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    lora_r: Annotated[int, typer.Option(min=1)] = 16,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    checkpoint_every: Annotated[int, typer.Option(min=0)] = 0,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Resumable state.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the run summary.")] = None,
) -> None:
    """Fine-tune a LoRA adapter locally with the adaptive-KL loop."""
    from pydantic import ValidationError

    from safety.schedules import preset_config
    from workers.pipeline import run_local_training
    from workers.training import LoraSpec, TrainingConfig

    quiet_transformers()
    try:
        config = TrainingConfig(
            lora=LoraSpec(r=lora_r, alpha=2 * lora_r),
            regularizer=preset_config(preset),
            learning_rate=lr,
            batch_size=batch_size,
            grad_accum_steps=grad_accum,
            epochs=epochs,
            max_steps=steps,
            seed=seed,
            checkpoint_every=checkpoint_every,
        )
    except (ValidationError, ValueError) as err:
        raise _fail(str(err)) from None
    result = run_local_training(
        model, data, config, out_dir=out, checkpoint_dir=checkpoint_dir, show_progress=True
    )
    if result is None:
        raise typer.Exit(1)
    summary = result.to_dict()
    typer.echo(
        f"trained {result.steps} steps in {result.seconds:.1f} s "
        f"(resumed from {result.resumed_from}); final loss {result.final_loss:.4f}; "
        f"adapter at {result.adapter_dir}"
    )
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=2))


def _register_subcommands() -> None:
    """Commands that live in their own modules (imports stay light until a command runs)."""
    from cli.align import align
    from cli.audit import audit
    from cli.risk import critic_app, prescreen, probe_app
    from cli.service import jobs_app, keys_app, serve
    from cli.worker import worker

    models_app.command("align")(align)
    app.add_typer(critic_app, name="critic")
    app.add_typer(probe_app, name="probe")
    app.command("prescreen")(prescreen)
    app.command("audit")(audit)
    app.command("worker")(worker)
    app.command("serve")(serve)
    app.add_typer(keys_app, name="keys")
    app.add_typer(jobs_app, name="jobs")


_register_subcommands()


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="tether")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
