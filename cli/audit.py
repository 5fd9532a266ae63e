"""``tether audit``: the ASR audit and release gate, run locally on a model or an adapter.

``cli.main`` registers :func:`audit` as a command. Heavy imports happen inside it so
``tether --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

#: Exit code when the audit ran and the gate rejected the model, so scripts can gate on it.
EXIT_REJECTED = 1


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def audit(
    model: Annotated[str, typer.Option(help="Base model id or local model directory.")],
    adapter: Annotated[
        Path | None,
        typer.Option(help="PEFT adapter directory; omit to audit the base model itself."),
    ] = None,
    suite: Annotated[
        list[str] | None,
        typer.Option(
            "--suite",
            help="Audit suite: a JSONL/CSV file (prompt, category, kind) or builtin:audit. "
            "Repeat to combine. Default: TETHER_AUDIT_SUITES, else the built-in audit split.",
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full report (JSON) here.")
    ] = None,
) -> None:
    """Audit a model (or adapter) for attack success and over-refusal, and apply the gate.

    Prints the summary table and the verdict; exits with 1 when the gate rejects the model.
    The base model's own figures are measured once and cached.
    """
    from cli.main import quiet_transformers
    from safety.critic import CriticError
    from workers.audit import audit_model
    from workers.models import ModelNotFoundError

    quiet_transformers()
    try:
        report = audit_model(model, adapter, suites=suite or None, progress=typer.echo)
    # PromptSetError is a ValueError; so are suites without both kinds or listed twice.
    except (CriticError, ModelNotFoundError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None
    data = report.to_json()
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(data, indent=2))
    typer.echo("")
    typer.echo(f"model {data['model_id']}, adapter {data['adapter_id'] or '(none: base model)'}")
    typer.echo(f"suites {', '.join(data['suites'])}; judge {data['judge']}")
    typer.echo(summary_table(data))
    passed = data["verdict"]["passed"]
    typer.secho(
        f"verdict: {'RELEASE' if passed else 'QUARANTINE'} ({data['verdict']['reason']})",
        fg=typer.colors.GREEN if passed else typer.colors.RED,
    )
    if json_out is not None:
        typer.echo(f"report written to {json_out}")
    if not passed:
        raise typer.Exit(EXIT_REJECTED)


def summary_table(report: dict[str, Any]) -> str:
    """Rows ASR (critic), ASR (refusal keywords), over-refusal, over-refusal lookalikes;
    columns value (count/total), 95% CI, base, change."""
    from safety.audit import summary_rows

    header = ["", "value", "95% CI", "base", "change"]
    cells = [
        [
            row["figure"],
            f"{row['value']:.3f} ({row['count']}/{row['total']})",
            f"{row['low']:.3f}-{row['high']:.3f}",
            "-" if row["base"] is None else f"{row['base']:.3f}",
            "-" if row["change"] is None else f"{row['change']:+.3f}",
        ]
        for row in summary_rows(report)
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *cells]
    )
