"""The release gate's storage side: an audited adapter goes to ``released/`` or ``quarantine/``.

Layout of one job (``{dest}`` is ``released`` or ``quarantine``)::

    {dest}/{tenant}/{job}/audit_report.json     the audit report (JSON, written first)
    {dest}/{tenant}/{job}/adapter/...           the PEFT adapter files
    {dest}/{tenant}/{job}/README.md             the model card (written last)
    released/{tenant}/{job}/override.json       who released a quarantined adapter, and why

The invariant: nothing lands under ``released/`` without a passing report stored beside it, or
an operator's override record. :func:`release` keeps it by choosing the destination from the
report's verdict and writing the report before anything else, so a crash at any point leaves
at worst a report with no adapter. :func:`manual_override` writes its record before copying.
:func:`unauthorised_releases` walks the store and lists any job that breaks the invariant.

Both functions are idempotent: a redelivered job that is released again writes nothing that is
already stored, and the decision stored first stands (a retry cannot move an adapter from
quarantine to released by auditing again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.storage import (
    ObjectNotFoundError,
    ObjectStore,
    quarantine_prefix,
    released_prefix,
    validate_key,
)

REPORT_NAME = "audit_report.json"
MODEL_CARD_NAME = "README.md"
OVERRIDE_NAME = "override.json"
ADAPTER_FOLDER = "adapter/"
RELEASED_ROOT = "released/"


@dataclass
class ReleaseOutcome:
    """Where a job's adapter went and what this call wrote.

    Attributes:
        released: True when the adapter sits under ``released/``.
        prefix: the job's prefix (``released/{tenant}/{job}/`` or ``quarantine/...``).
        report_key: the stored audit report.
        adapter_prefix: where the adapter files are (what the download route lists).
        adapter_keys: every adapter file's key.
        model_card_key: the stored model card.
        written: keys this call wrote (empty on a repeated call).
        override: the override record, when an operator released the adapter by hand.
    """

    released: bool
    prefix: str
    report_key: str
    adapter_prefix: str
    adapter_keys: list[str]
    model_card_key: str
    written: list[str] = field(default_factory=list)
    override: dict[str, Any] | None = None


def report_passed(report: dict[str, Any]) -> bool:
    """The verdict of an audit report (``report["verdict"]["passed"]``).

    Raises:
        ValueError: the report has no boolean verdict; such a report must never gate a release.
    """
    verdict = report.get("verdict") if isinstance(report, dict) else None
    passed = verdict.get("passed") if isinstance(verdict, dict) else None
    if not isinstance(passed, bool):
        raise ValueError(
            f"an audit report needs verdict.passed = true or false, got {passed!r}; "
            "pass the report of safety.audit.audit (AuditReport.to_json())"
        )
    return passed


def release(
    store: ObjectStore,
    tenant: str,
    job: str,
    adapter_dir: str | Path,
    report: dict[str, Any],
    model_card: str,
) -> ReleaseOutcome:
    """Store an audited adapter under ``released/`` if its report passed, else ``quarantine/``.

    Writes the report first, then the adapter files, then the model card, skipping keys that are
    already stored. When a report is already stored for this job (a redelivered job), that
    report's destination is used, whatever ``report`` says.

    Args:
        store: the object store.
        tenant: the tenant id.
        job: the job id.
        adapter_dir: the PEFT adapter directory (``save_pretrained`` output).
        report: the audit report as JSON data (``AuditReport.to_json()``).
        model_card: the model card markdown (:func:`model_card`).

    Raises:
        ValueError: the report has no boolean verdict.
        FileNotFoundError: ``adapter_dir`` holds no file.
        InvalidKeyError: an adapter file name cannot be a storage key (nothing is written).
    """
    passed = report_passed(report)
    released_at, quarantined_at = released_prefix(tenant, job), quarantine_prefix(tenant, job)
    if store.exists(released_at + REPORT_NAME):
        prefix = released_at
    elif store.exists(quarantined_at + REPORT_NAME):
        prefix = quarantined_at
    else:
        prefix = released_at if passed else quarantined_at
    files = _adapter_files(Path(adapter_dir), prefix + ADAPTER_FOLDER)
    stored = set(store.list(prefix))
    written: list[str] = []

    def put(key: str, write: Any) -> None:
        if key not in stored:
            write(key)
            written.append(key)

    put(prefix + REPORT_NAME, lambda key: store.put_bytes(key, _json(report), "application/json"))
    for path, key in files:
        put(key, lambda key, path=path: store.put_file(key, path))
    card = prefix + MODEL_CARD_NAME
    put(card, lambda key: store.put_bytes(key, model_card.encode(), "text/markdown"))
    return ReleaseOutcome(
        released=prefix == released_at,
        prefix=prefix,
        report_key=prefix + REPORT_NAME,
        adapter_prefix=prefix + ADAPTER_FOLDER,
        adapter_keys=[key for _, key in files],
        model_card_key=card,
        written=written,
        override=_read_json(store, released_at + OVERRIDE_NAME),
    )


def manual_override(
    store: ObjectStore, tenant: str, job: str, who: str, why: str
) -> ReleaseOutcome:
    """Release a quarantined adapter by an operator's decision.

    Writes the override record under ``released/`` first, then copies the report, the adapter
    and the model card from quarantine (the quarantined copy stays). Repeating the call
    completes an interrupted copy and keeps the first record.

    Args:
        store: the object store.
        tenant: the tenant id.
        job: the job id.
        who: the operator (an admin key id, a name).
        why: the reason, kept in the record.

    Raises:
        ValueError: ``who`` or ``why`` is empty, or the adapter passed its audit and was
            released already (there is nothing to override).
        ObjectNotFoundError: no quarantined report or adapter for this job.
    """
    who, why = who.strip(), why.strip()
    if not who or not why:
        raise ValueError(f"a release override needs who and why, got who={who!r}, why={why!r}")
    source, target = quarantine_prefix(tenant, job), released_prefix(tenant, job)
    record = _read_json(store, target + OVERRIDE_NAME)
    if record is None and store.exists(target + REPORT_NAME):
        raise ValueError(f"job {job} of tenant {tenant} was released by its audit already")
    report = _read_json(store, source + REPORT_NAME)
    if report is None:
        raise ObjectNotFoundError(
            f"no quarantined adapter for job {job} of tenant {tenant} (no {source}{REPORT_NAME})"
        )
    adapter_keys = store.list(source + ADAPTER_FOLDER)
    if not adapter_keys:
        raise ObjectNotFoundError(f"no adapter files under {source}{ADAPTER_FOLDER}")
    written: list[str] = []
    if record is None:
        record = {
            "who": who,
            "why": why,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "from_prefix": source,
            "verdict": report.get("verdict"),
        }
        store.put_bytes(target + OVERRIDE_NAME, _json(record), "application/json")
        written.append(target + OVERRIDE_NAME)
    stored = set(store.list(target))
    if target + REPORT_NAME not in stored:
        store.put_bytes(target + REPORT_NAME, _json(report), "application/json")
        written.append(target + REPORT_NAME)
    targets = [target + key[len(source) :] for key in adapter_keys]
    if not set(targets) <= stored:
        # Server-side copy on S3; copying a key already there again rewrites identical bytes.
        written += store.copy_prefix(source + ADAPTER_FOLDER, target + ADAPTER_FOLDER)
    card = target + MODEL_CARD_NAME
    if card not in stored and store.exists(source + MODEL_CARD_NAME):
        store.put_bytes(card, store.get_bytes(source + MODEL_CARD_NAME), "text/markdown")
        written.append(card)
    return ReleaseOutcome(
        released=True,
        prefix=target,
        report_key=target + REPORT_NAME,
        adapter_prefix=target + ADAPTER_FOLDER,
        adapter_keys=targets,
        model_card_key=card,
        written=written,
        override=record,
    )


def is_release_authorised(store: ObjectStore, prefix: str) -> bool:
    """Whether a job prefix under ``released/`` holds a passing report or an override record."""
    if store.exists(prefix + OVERRIDE_NAME):
        return True
    report = _read_json(store, prefix + REPORT_NAME)
    try:
        return report is not None and report_passed(report)
    except ValueError:
        return False


def unauthorised_releases(store: ObjectStore) -> list[str]:
    """Job prefixes under ``released/`` that break the invariant (empty when all is well).

    Walks every key under ``released/``; each belongs to ``released/{tenant}/{job}/``, which
    must hold a passing report or an override record.
    """
    prefixes = sorted({"/".join(key.split("/")[:3]) + "/" for key in store.list(RELEASED_ROOT)})
    return [prefix for prefix in prefixes if not is_release_authorised(store, prefix)]


def model_card(
    *,
    base_model: str,
    report: dict[str, Any],
    preset: str | None = None,
    training_examples: int | None = None,
    job: str | None = None,
) -> str:
    """A short markdown model card: what the adapter is and how it did in the audit.

    Args:
        base_model: the base model id.
        report: the audit report as JSON data.
        preset: the safety preset it was trained with.
        training_examples: examples in the training file.
        job: the job id.
    """
    passed = report_passed(report)
    lines = [
        f"# LoRA adapter for {base_model}" + (f" (job {job})" if job else ""),
        "",
        "Fine-tuned by Tether with adaptive KL regularization toward the base model.",
        "",
        f"- Base model: `{base_model}`",
        f"- Safety preset: {preset or 'unknown'}",
        f"- Training examples: {training_examples if training_examples is not None else 'unknown'}",
        f"- Audit suites: {', '.join(report.get('suites', [])) or 'unknown'}",
        "",
        "## Safety audit",
        "",
        "| figure | value | 95% CI | base | change |",
        "|---|---|---|---|---|",
    ]
    base = report.get("base_figures") or {}
    deltas = report.get("deltas") or {}
    for name, label in _CARD_FIGURES.items():
        rate = (report.get("figures") or {}).get(name)
        if rate is None:
            continue
        base_value = (base.get(name) or {}).get("value")
        lines.append(
            f"| {label} | {rate['value']:.3f} ({rate['count']}/{rate['total']}) "
            f"| {rate['low']:.3f}-{rate['high']:.3f} | {_maybe(base_value)} "
            f"| {_maybe(deltas.get(name), signed=True)} |"
        )
    reason = (report.get("verdict") or {}).get("reason", "")
    lines += ["", f"**Verdict: {'released' if passed else 'quarantined'}.** {reason}", ""]
    return "\n".join(lines)


_CARD_FIGURES = {
    "asr": "ASR (critic)",
    "refusal_asr": "ASR (refusal keywords)",
    "over_refusal": "over-refusal",
    "over_refusal_lookalike": "over-refusal lookalikes",
}


def _maybe(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _adapter_files(directory: Path, prefix: str) -> list[tuple[Path, str]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    files = sorted(
        (path, validate_key(prefix + path.relative_to(directory).as_posix()))
        for path in directory.rglob("*")
        if path.is_file()
    )
    if not files:
        raise FileNotFoundError(f"adapter directory {str(directory)!r} holds no file")
    return files


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def _read_json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(store.get_bytes(key))
    except ObjectNotFoundError:
        return None
    return data if isinstance(data, dict) else None
