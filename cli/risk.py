"""``tether critic train``, ``tether probe train`` and ``tether prescreen``.

``cli.main`` registers these: ``critic_app`` and ``probe_app`` as sub-apps named ``critic`` and
``probe``, and :func:`prescreen` as a command. Heavy imports happen inside the commands so
``tether --help`` stays instant.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

critic_app = typer.Typer(help="The Safety Critic (harm score of prompt/response pairs).")
probe_app = typer.Typer(help="The activation probe (harmful intent from hidden states).")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _quiet() -> None:
    from cli.main import quiet_transformers

    quiet_transformers()


@critic_app.command("train")
def critic_train(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the validation figures here.")
    ] = None,
) -> None:
    """Train the embedding critic on the built-in train split and save it in the model cache."""
    from safety.critic import CriticError
    from workers.risk import train_critic_artifact

    _quiet()
    started = time.perf_counter()
    try:
        path, figures = train_critic_artifact(progress=typer.echo)
    except CriticError as err:
        raise _fail(str(err)) from None
    for name, value in figures.items():
        typer.echo(f"  {name:26s} {value:.4f}")
    typer.echo(f"critic saved to {path} ({time.perf_counter() - started:.1f} s)")
    if json_out is not None:
        json_out.write_text(json.dumps({"artifact": str(path), "validation": figures}, indent=2))


@probe_app.command("train")
def probe_train(
    model: Annotated[str, typer.Option(help="Base model id or local directory.")],
) -> None:
    """Sweep layers and poolings on the train split; keep the best by validation AUROC."""
    from safety.probe import train_probe
    from workers.models import ModelNotFoundError, load

    _quiet()
    started = time.perf_counter()
    try:
        loaded, tokenizer, spec = load(model)
    except ModelNotFoundError as err:
        raise _fail(str(err)) from None
    probe = train_probe(
        loaded, tokenizer, spec.model_id, out_path=spec.probe_path, progress=typer.echo
    )
    typer.echo(
        f"probe for {spec.model_id}: layer {probe.layer}, {probe.pooling} pooling, validation "
        f"AUROC {probe.auroc:.4f}, threshold {probe.threshold:.3f}; saved to {spec.probe_path} "
        f"({time.perf_counter() - started:.1f} s)"
    )


def prescreen(
    path: Annotated[Path, typer.Argument(help="JSONL training file.", exists=True)],
    model: Annotated[str, typer.Option(help="Base model id whose probe reads the prompts.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write one row per example here.")
    ] = None,
    critic: Annotated[bool, typer.Option(help="Score with the Safety Critic.")] = True,
    probe: Annotated[bool, typer.Option(help="Score with the activation probe.")] = True,
) -> None:
    """Score every example's safety risk and apply the intake policy.

    Prints the summary by band and category; exits 2 when the intake policy would reject
    the file. Missing critic or probe artifacts are trained first (once).
    """
    from core.chatdata import DatasetValidationError
    from safety.critic import CriticError
    from safety.probe import ProbeError
    from safety.risk import intake_decision
    from workers.models import ModelNotFoundError
    from workers.risk import prescreen_file

    _quiet()
    started = time.perf_counter()
    try:
        report = prescreen_file(
            path, model, use_critic=critic, use_probe=probe, progress=typer.echo
        )
    except DatasetValidationError as err:
        raise _fail(str(err)) from None
    except (ModelNotFoundError, CriticError, ProbeError, ValueError) as err:
        raise _fail(str(err)) from None
    typer.echo(report.table())
    typer.echo(f"({len(report.rows)} examples in {time.perf_counter() - started:.1f} s)")
    if json_out is not None:
        json_out.write_text(json.dumps([row.to_dict() for row in report.rows], indent=2))
    if not intake_decision(report).accepted:
        raise typer.Exit(2)
