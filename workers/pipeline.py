"""The job path as plain functions: read and validate data, tokenize, train.

The CLI's local commands call these today; the Celery task and the in-process worker will
call the same functions, so there is one code path from a file to an adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.chatdata import DatasetValidationError, ValidationIssue, parse_jsonl
from core.settings import get_settings
from workers.data import TokenizedExample, tokenize_conversations
from workers.models import load, load_tokenizer
from workers.training import (
    DirectoryCheckpointer,
    ProgressFn,
    StepStats,
    TrainingConfig,
    TrainResult,
    train,
)


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
