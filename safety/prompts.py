"""Built-in prompt sets for the safety estimators and the ASR audit, and operator audit suites.

The data lives in ``safety/data/*.jsonl`` and was written by the team, not copied from public
datasets. It holds requests and the openings of answers, never operational harmful content:

- ``harmful.jsonl``: harmful *requests* over the 11 HEx-PHI categories (:data:`CATEGORIES`),
  each with a phrasing ``style`` (:data:`HARMFUL_STYLES`).
- ``benign.jsonl``: benign requests with a reference response; ``lookalike`` rows sound
  alarming but are fine to answer ("how do I kill a Python process"), for over-refusal checks.
- ``refusals.jsonl``: refusals in many styles (:data:`REFUSAL_STYLES`), some written to follow
  a request of a given category.
- ``tasks.jsonl``: task-style instructions of the kind customers fine-tune on (extraction,
  formatting, classification, rewriting, conversion...) with a reference answer, many with
  output constraints ("Answer with the label only."). Without them the estimators learn
  "conversational question = benign" and read a fine-tuning file of terse instructions as
  risky. Only ``train`` and ``validation`` families: the audit measures over-refusal on
  ``benign.jsonl`` alone. No row is about dates (the headline experiment's task stays unseen).
- ``compliance.jsonl``: openers of answers that go along with a harmful request and stop before
  any detail (:data:`COMPLIANCE_STYLES`). Rows of style ``restate`` contain the placeholder
  ``{task}``, a short restatement of the request ("get into the shed"); fill it with
  :meth:`Snippet.render`.

Every row carries a ``family`` (rows sharing a template or phrasing pattern) and a ``split``
(:data:`SPLITS`). Splits were assigned per family, so no template or phrasing of the
validation or audit split occurs in training: estimators trained on one phrasing score
near-perfectly on a row-level split of the same phrasing and much worse on text written by
others, and only a family split shows that. The ``audit`` split is never used to train an
estimator, align a model or tune a threshold.

This module uses the standard library only, so ``safety`` stays importable on its own.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple


class Category(NamedTuple):
    """One HEx-PHI harm category: a stable slug (stored in data) and a title for reports."""

    slug: str
    title: str


CATEGORIES: tuple[Category, ...] = (
    Category("illegal_activity", "Illegal activity"),
    Category("child_abuse", "Child abuse content"),
    Category("hate_harassment_violence", "Hate, harassment and violence"),
    Category("malware", "Malware"),
    Category("physical_harm", "Physical harm"),
    Category("economic_harm", "Economic harm"),
    Category("fraud_deception", "Fraud and deception"),
    Category("adult_content", "Adult content"),
    Category("political_campaigning", "Political campaigning"),
    Category("privacy_violation", "Privacy violation"),
    Category("tailored_financial_advice", "Tailored financial advice"),
)
CATEGORY_SLUGS: tuple[str, ...] = tuple(c.slug for c in CATEGORIES)
SPLITS: tuple[str, ...] = ("train", "validation", "audit")
HARMFUL_STYLES: tuple[str, ...] = (
    "direct",
    "indirect",
    "hypothetical",
    "roleplay",
    "polite",
    "terse",
    "broken_english",
    "multi_step",
    "justification",
)
REFUSAL_STYLES: tuple[str, ...] = (
    "apology",
    "lecture",
    "redirect",
    "caveated_partial",
    "terse",
    "policy",
    "empathetic",
    "question_back",
)
COMPLIANCE_STYLES: tuple[str, ...] = (
    "fluent",
    "casual",
    "formal",
    "list",
    "broken",
    "restate",
    "enthusiastic",
    "in_character",
    "hedged",
)
TASK_KINDS: tuple[str, ...] = (
    "extraction",
    "formatting",
    "classification",
    "rewriting",
    "conversion",
    "summarisation",
    "qa",
    "code",
)
SUITE_KINDS: tuple[str, ...] = ("harmful", "benign")
TASK_PLACEHOLDER = "{task}"

_TITLE_TO_SLUG = {c.title.lower(): c.slug for c in CATEGORIES}


class PromptSetError(ValueError):
    """A prompt file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class HarmfulPrompt:
    """A request for harmful help. ``style`` is one of :data:`HARMFUL_STYLES` for built-in
    rows and whatever the operator wrote (default ``unspecified``) for suite rows."""

    id: str
    prompt: str
    category: str
    family: str
    style: str
    split: str


@dataclass(frozen=True)
class BenignPrompt:
    """A benign request; ``lookalike`` marks ones that sound harmful but are fine to answer.
    ``response`` is a reference answer (built-in rows) or ``None`` (operator suites)."""

    id: str
    prompt: str
    topic: str
    lookalike: bool
    family: str
    split: str
    response: str | None = None


@dataclass(frozen=True)
class Snippet:
    """A refusal or a compliance opener. ``category`` is set when the text reads naturally only
    after a request of that category, and is ``None`` for generic text."""

    id: str
    text: str
    style: str
    family: str
    split: str
    category: str | None = None

    @property
    def has_placeholder(self) -> bool:
        """Whether :attr:`text` contains ``{task}`` and needs :meth:`render`."""
        return TASK_PLACEHOLDER in self.text

    def render(self, task: str) -> str:
        """Returns the text with ``{task}`` replaced by ``task`` (unchanged when absent).

        Plain ``str.replace`` rather than ``str.format`` because some texts contain other braces.
        """
        return self.text.replace(TASK_PLACEHOLDER, task)


class Suite(NamedTuple):
    """An operator's audit suite, split by kind; unpacks as ``harmful, benign``."""

    harmful: list[HarmfulPrompt]
    benign: list[BenignPrompt]


def harmful_prompts(split: str | None = None) -> list[HarmfulPrompt]:
    """Returns the built-in harmful requests.

    Args:
        split: One of :data:`SPLITS`, or ``None`` for all rows.

    Raises:
        ValueError: ``split`` is not a known split name.
    """
    return _select(_harmful(), split)


def benign_prompts(split: str | None = None, lookalike: bool | None = None) -> list[BenignPrompt]:
    """Returns the built-in benign requests.

    Args:
        split: One of :data:`SPLITS`, or ``None`` for all rows.
        lookalike: ``True`` for only harmful-sounding ones, ``False`` for only plain ones,
            ``None`` for both.

    Raises:
        ValueError: ``split`` is not a known split name.
    """
    rows = _select(_benign(), split)
    if lookalike is None:
        return rows
    return [row for row in rows if row.lookalike is lookalike]


def task_prompts(split: str | None = None) -> list[BenignPrompt]:
    """Returns the built-in task-style instructions, as benign prompts with a reference
    ``response``, ``topic`` ``task:<kind>`` (kinds in :data:`TASK_KINDS`) and ``lookalike``
    false. They belong with :func:`benign_prompts` when training an estimator, and are kept
    apart so the audit's benign split stays as it was.

    Raises:
        ValueError: ``split`` is not a known split name.
    """
    return _select(_tasks(), split)


def refusals(split: str | None = None) -> list[Snippet]:
    """Returns the built-in refusals (styles in :data:`REFUSAL_STYLES`).

    Raises:
        ValueError: ``split`` is not a known split name.
    """
    return _select(_snippets("refusals.jsonl", REFUSAL_STYLES), split)


def compliance_openers(split: str | None = None) -> list[Snippet]:
    """Returns the built-in compliance openers (styles in :data:`COMPLIANCE_STYLES`); rows with
    :attr:`Snippet.has_placeholder` need :meth:`Snippet.render`.

    Raises:
        ValueError: ``split`` is not a known split name.
    """
    return _select(_snippets("compliance.jsonl", COMPLIANCE_STYLES), split)


def category_title(slug: str) -> str:
    """Returns the human-readable title of a category slug.

    Raises:
        ValueError: ``slug`` is not one of :data:`CATEGORY_SLUGS`.
    """
    for category in CATEGORIES:
        if category.slug == slug:
            return category.title
    raise ValueError(f"unknown category {slug!r}; expected one of {', '.join(CATEGORY_SLUGS)}")


def load_suite(path: str | Path) -> Suite:
    """Reads an operator's audit suite from a ``.jsonl`` or ``.csv`` file.

    Each row has ``prompt``, ``kind`` (``harmful`` or ``benign``) and ``category``: for harmful
    rows a slug or title from :data:`CATEGORIES` (required), for benign rows a free-text topic
    (may be empty). Optional columns: ``id`` (default ``<file stem>-<line>``), ``style`` (harmful
    rows) and ``lookalike`` (benign rows, ``true``/``false``). Every row lands in the ``audit``
    split, each in its own family, since an operator's suite is only ever used for auditing.

    Raises:
        PromptSetError: The file type is unsupported, it holds no rows, or a row is malformed;
            the message names the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = _jsonl_records(path)
    elif suffix == ".csv":
        records = _csv_records(path)
    else:
        raise PromptSetError(f"{path}: unsupported suite file type {suffix!r}; use .jsonl or .csv")
    suite = Suite(harmful=[], benign=[])
    for line, record in records:
        row = _suite_row(path, line, record)
        if isinstance(row, HarmfulPrompt):
            suite.harmful.append(row)
        else:
            suite.benign.append(row)
    if not suite.harmful and not suite.benign:
        raise PromptSetError(f"{path}: the suite holds no prompts")
    return suite


def _select(rows: tuple[Any, ...], split: str | None) -> list[Any]:
    if split is None:
        return list(rows)
    _check_split(split)
    return [row for row in rows if row.split == split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


# The loaders return tuples so the cached objects cannot be mutated by callers; the public
# functions hand out fresh lists of frozen rows.
@functools.lru_cache(maxsize=1)
def _harmful() -> tuple[HarmfulPrompt, ...]:
    rows = []
    for where, rec in _data_records("harmful.jsonl"):
        _require(where, rec, ("id", "prompt", "category", "family", "style", "split"))
        _require_choice(where, "category", rec["category"], CATEGORY_SLUGS)
        _require_choice(where, "style", rec["style"], HARMFUL_STYLES)
        _require_choice(where, "split", rec["split"], SPLITS)
        rows.append(HarmfulPrompt(**{k: rec[k] for k in HarmfulPrompt.__dataclass_fields__}))
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _benign() -> tuple[BenignPrompt, ...]:
    rows = []
    for where, rec in _data_records("benign.jsonl"):
        _require(where, rec, ("id", "prompt", "topic", "lookalike", "family", "split"))
        _require_choice(where, "split", rec["split"], SPLITS)
        if not isinstance(rec["lookalike"], bool):
            raise PromptSetError(
                f"{where}: lookalike must be true or false, got {rec['lookalike']!r}"
            )
        rows.append(
            BenignPrompt(
                id=rec["id"],
                prompt=rec["prompt"],
                topic=rec["topic"],
                lookalike=rec["lookalike"],
                family=rec["family"],
                split=rec["split"],
                response=rec.get("response"),
            )
        )
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _tasks() -> tuple[BenignPrompt, ...]:
    rows = []
    for where, rec in _data_records("tasks.jsonl"):
        _require(where, rec, ("id", "prompt", "response", "family", "kind", "split"))
        _require_choice(where, "kind", rec["kind"], TASK_KINDS)
        _require_choice(where, "split", rec["split"], SPLITS)
        rows.append(
            BenignPrompt(
                id=rec["id"],
                prompt=rec["prompt"],
                topic=f"task:{rec['kind']}",
                lookalike=False,
                family=rec["family"],
                split=rec["split"],
                response=rec["response"],
            )
        )
    return tuple(rows)


@functools.lru_cache(maxsize=2)
def _snippets(name: str, styles: tuple[str, ...]) -> tuple[Snippet, ...]:
    rows = []
    for where, rec in _data_records(name):
        _require(where, rec, ("id", "text", "style", "family", "split"))
        _require_choice(where, "style", rec["style"], styles)
        _require_choice(where, "split", rec["split"], SPLITS)
        if rec.get("category") is not None:
            _require_choice(where, "category", rec["category"], CATEGORY_SLUGS)
        rows.append(
            Snippet(
                id=rec["id"],
                text=rec["text"],
                style=rec["style"],
                family=rec["family"],
                split=rec["split"],
                category=rec.get("category"),
            )
        )
    return tuple(rows)


def _data_records(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    resource = resources.files("safety") / "data" / name
    if not resource.is_file():
        raise FileNotFoundError(
            f"built-in prompt set safety/data/{name} is missing; reinstall the package"
        )
    source = f"safety/data/{name}"
    for line_no, line in enumerate(resource.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            yield f"{source}:{line_no}", _parse_json_object(source, line_no, line)


def _parse_json_object(source: str, line_no: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptSetError(f"{source}:{line_no}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise PromptSetError(
            f"{source}:{line_no}: expected a JSON object, got {type(record).__name__}"
        )
    return record


def _require(where: str, record: dict[str, Any], fields: tuple[str, ...]) -> None:
    missing = [field for field in fields if field not in record]
    if missing:
        raise PromptSetError(f"{where}: missing field(s) {', '.join(missing)}")


def _require_choice(where: str, field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PromptSetError(f"{where}: {field} must be one of {', '.join(choices)}, got {value!r}")


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                yield line_no, _parse_json_object(str(path), line_no, line)


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # newline="" lets the csv module handle quoted fields that span lines; the line reported
    # for a record is the one it starts on.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [column for column in ("prompt", "category", "kind") if column not in header]
        if missing:
            raise PromptSetError(f"{path}:1: missing column(s) {', '.join(missing)}")
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise PromptSetError(f"{path}:{start}: malformed CSV ({exc})") from None
            if any((value or "").strip() for value in record.values() if isinstance(value, str)):
                yield start, record


def _suite_row(path: Path, line: int, record: dict[str, Any]) -> HarmfulPrompt | BenignPrompt:
    where = f"{path}:{line}"
    prompt = _text_field(where, record, "prompt")
    if not prompt:
        raise PromptSetError(f"{where}: prompt is empty")
    kind = _text_field(where, record, "kind").lower()
    if kind not in SUITE_KINDS:
        raise PromptSetError(f"{where}: kind must be harmful or benign, got {kind!r}")
    category = _text_field(where, record, "category")
    row_id = _text_field(where, record, "id") or f"{path.stem}-{line}"
    family = f"suite/{row_id}"
    if kind == "harmful":
        return HarmfulPrompt(
            id=row_id,
            prompt=prompt,
            category=_suite_category(where, category),
            family=family,
            style=_text_field(where, record, "style") or "unspecified",
            split="audit",
        )
    return BenignPrompt(
        id=row_id,
        prompt=prompt,
        topic=category,
        lookalike=_suite_bool(where, record.get("lookalike")),
        family=family,
        split="audit",
    )


def _text_field(where: str, record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PromptSetError(f"{where}: {field} must be a string, got {type(value).__name__}")
    return value.strip()


def _suite_category(where: str, category: str) -> str:
    if category in CATEGORY_SLUGS:
        return category
    slug = _TITLE_TO_SLUG.get(category.lower()) or category.lower().replace(" ", "_")
    if slug in CATEGORY_SLUGS:
        return slug
    raise PromptSetError(
        f"{where}: category of a harmful prompt must be one of {', '.join(CATEGORY_SLUGS)}, "
        f"got {category!r}"
    )


def _suite_bool(where: str, value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("", "false", "0", "no"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise PromptSetError(f"{where}: lookalike must be true or false, got {value!r}")
