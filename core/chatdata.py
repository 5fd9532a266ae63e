"""Training files: parse and validate chat JSONL without a tokenizer.

The API validates uploads with this module (it may import only ``core``); the worker re-reads the
stored file with it and then tokenizes with the model's chat template (``workers/data.py``).

One example per line, in either of two forms::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}], "risk": 0.2}
    {"prompt": "...", "completion": "..."}

The second form becomes a user turn and an assistant turn. ``risk`` is optional, a number in
[0, 1] that training uses as the example's safety risk (until the risk estimators score it).
Unknown top-level keys and unknown keys inside a message are ignored (OpenAI's own files carry
``name`` or ``weight``); a known key with the wrong type is an error.

:func:`parse_jsonl` reports every problem of a file in one pass, each with its line number, the
field at fault (``messages[2].role``) and a short code, so a customer fixes a file once rather
than once per error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from core.settings import get_settings

ROLES = ("system", "user", "assistant")
PROMPT_KEYS = ("prompt", "completion")
#: How many issues ``str(DatasetValidationError)`` lists before summarising the rest.
MAX_ISSUES_IN_MESSAGE = 50
_UTF8_BOM = b"\xef\xbb\xbf"

#: How line checks report a problem: ``issue(field, code, message)``.
_Report = Callable[[str | None, str, str], None]


@dataclass
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass
class Conversation:
    """One valid training example.

    Attributes:
        line: 1-based line number in the source file, for messages that point back at it.
        messages: the turns, ending with an assistant turn; a system turn, if any, is first.
        risk: the file's own risk score in [0, 1], or ``None`` when the line has none.
    """

    line: int
    messages: list[Message]
    risk: float | None = None

    def as_dicts(self) -> list[dict[str, str]]:
        """The turns as ``{"role", "content"}`` dicts, the shape chat templates take."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def response(self) -> str:
        """The final assistant turn: the response a risk estimator scores."""
        return self.messages[-1].content


@dataclass
class ValidationIssue:
    """One problem found in a training file.

    Attributes:
        line: 1-based line number, or ``None`` for a problem of the whole file.
        field: where in the line, e.g. ``messages[2].role``; ``None`` for the line as a whole.
        code: short snake_case identifier (``invalid_json``, ``unknown_role``...).
        message: what is wrong and, where useful, what to do.
    """

    line: int | None
    field: str | None
    code: str
    message: str

    def __str__(self) -> str:
        where = "file" if self.line is None else f"line {self.line}"
        if self.field:
            where += f", {self.field}"
        return f"{where}: {self.message} [{self.code}]"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for API error bodies and reports."""
        return asdict(self)


class DatasetValidationError(ValueError):
    """A training file with problems; ``issues`` holds every one of them."""

    def __init__(self, issues: list[ValidationIssue]):
        self.issues = list(issues)
        super().__init__(self._describe())

    def _describe(self) -> str:
        count = len(self.issues)
        lines = [f"training file has {count} problem{'s' if count != 1 else ''}:"]
        lines += [f"  {issue}" for issue in self.issues[:MAX_ISSUES_IN_MESSAGE]]
        if count > MAX_ISSUES_IN_MESSAGE:
            lines.append(f"  ... and {count - MAX_ISSUES_IN_MESSAGE} more")
        return "\n".join(lines)


class UploadLimits(Protocol):
    """Anything with the upload limits of :class:`core.settings.Settings`."""

    max_upload_bytes: int
    max_examples: int


# --------------------------------------------------------------------------------------------
# parsing


def parse_jsonl(
    data: bytes, *, max_bytes: int, max_lines: int, max_issues: int = 1000
) -> tuple[list[Conversation], list[ValidationIssue]]:
    """Parse a chat JSONL file and collect every problem in one pass.

    Blank lines are skipped (but still counted, so line numbers match an editor's). Lines past
    ``max_lines`` examples are still checked, so one upload reports everything; the limit
    itself is reported once.

    Args:
        data: the raw file.
        max_bytes: a larger file is refused before anything is parsed.
        max_lines: most examples (non-blank lines) accepted.
        max_issues: collecting stops after this many issues, with a final ``too_many_issues``
            issue, so a wholly wrong file cannot produce an unbounded report.

    Returns:
        The valid conversations and the issues; the file is usable only if the issues are empty.
    """
    if len(data) > max_bytes:
        return [], [_file_too_large(len(data), max_bytes)]
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]

    conversations: list[Conversation] = []
    issues: list[ValidationIssue] = []
    examples = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        examples += 1
        if examples == max_lines + 1:
            issues.append(
                ValidationIssue(
                    number,
                    None,
                    "too_many_lines",
                    f"the file has more than {max_lines} examples (this is example "
                    f"{examples}); split it or raise the limit",
                )
            )
        conversation, line_issues = _parse_line(number, raw)
        issues += line_issues
        if conversation is not None:
            conversations.append(conversation)
        if len(issues) > max_issues:
            issues = issues[:max_issues]
            issues.append(
                ValidationIssue(
                    number,
                    None,
                    "too_many_issues",
                    f"stopped checking after {max_issues} issues; fix these and upload again",
                )
            )
            return conversations, issues
    if examples == 0:
        issues.append(ValidationIssue(None, None, "no_examples", "the file contains no examples"))
    return conversations, issues


def validate_jsonl(data: bytes, *, max_bytes: int, max_lines: int) -> list[Conversation]:
    """Parse a chat JSONL file, raising if it has any problem.

    Raises:
        DatasetValidationError: with every issue :func:`parse_jsonl` found.
    """
    conversations, issues = parse_jsonl(data, max_bytes=max_bytes, max_lines=max_lines)
    if issues:
        raise DatasetValidationError(issues)
    return conversations


def read_jsonl_file(
    source: str | bytes | Path,
    limits: UploadLimits | None = None,
    *,
    max_bytes: int | None = None,
    max_lines: int | None = None,
) -> list[Conversation]:
    """Read and validate a training file from disk (or from bytes already read).

    Args:
        source: a path (``str`` or ``Path``), or the file's content as ``bytes``.
        limits: where the limits come from; default the process settings.
        max_bytes: overrides ``limits.max_upload_bytes``.
        max_lines: overrides ``limits.max_examples``.

    Raises:
        DatasetValidationError: the file is too large or has invalid lines.
        FileNotFoundError: the path does not exist.
    """
    if limits is None:
        limits = get_settings()
    byte_limit = limits.max_upload_bytes if max_bytes is None else max_bytes
    line_limit = limits.max_examples if max_lines is None else max_lines
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        size = path.stat().st_size
        # Refuse before reading: the point of the limit is not to pull a huge file into memory.
        if size > byte_limit:
            raise DatasetValidationError([_file_too_large(size, byte_limit)])
        data = path.read_bytes()
    return validate_jsonl(data, max_bytes=byte_limit, max_lines=line_limit)


# --------------------------------------------------------------------------------------------
# one line


def _file_too_large(size: int, limit: int) -> ValidationIssue:
    return ValidationIssue(
        None, None, "file_too_large", f"the file is {size} bytes; the limit is {limit} bytes"
    )


def _parse_line(number: int, raw: bytes) -> tuple[Conversation | None, list[ValidationIssue]]:
    """Validate one non-blank line; a conversation comes back only when there are no issues."""

    def issue(field: str | None, code: str, message: str) -> None:
        issues.append(ValidationIssue(number, field, code, message))

    issues: list[ValidationIssue] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        issue(None, "invalid_utf8", f"not valid UTF-8 (byte {exc.start + 1} of the line)")
        return None, issues
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        issue(None, "invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})")
        return None, issues
    except RecursionError:
        issue(None, "invalid_json", "invalid JSON: nested too deeply")
        return None, issues
    if not isinstance(obj, dict):
        issue(None, "not_an_object", f"each line must be a JSON object, got {_kind(obj)}")
        return None, issues

    has_messages = "messages" in obj
    prompt_keys = [key for key in PROMPT_KEYS if key in obj]
    messages: list[Message] | None = None
    if has_messages and prompt_keys:
        issue(
            None,
            "mixed_formats",
            f"a line has either 'messages' or 'prompt'/'completion', not both (found "
            f"'messages' and {', '.join(repr(k) for k in prompt_keys)})",
        )
    elif has_messages:
        messages = _parse_messages(obj["messages"], issue)
    elif prompt_keys:
        messages = _parse_prompt_completion(obj, issue)
    else:
        issue(
            "messages",
            "missing_messages",
            "missing 'messages' (or 'prompt' and 'completion'); expected "
            '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}',
        )
    risk = _parse_risk(obj.get("risk"), issue)
    if issues or messages is None:
        return None, issues
    return Conversation(number, messages, risk), issues


def _parse_prompt_completion(obj: dict[str, Any], issue: _Report) -> list[Message] | None:
    texts: dict[str, str] = {}
    for key in PROMPT_KEYS:
        if key not in obj:
            issue(key, "missing_field", f"'{key}' is missing (the prompt form needs both)")
        elif (value := _check_content(obj[key], key, issue)) is not None:
            texts[key] = value
    if len(texts) < len(PROMPT_KEYS):
        return None
    return [Message("user", texts["prompt"]), Message("assistant", texts["completion"])]


def _parse_messages(value: Any, issue: _Report) -> list[Message] | None:
    if not isinstance(value, list):
        issue("messages", "invalid_type", f"'messages' must be a list, got {_kind(value)}")
        return None
    if not value:
        issue(
            "messages",
            "empty_messages",
            "'messages' is empty; it needs at least a user turn and an assistant turn",
        )
        return None
    parsed = [_parse_message(item, f"messages[{i}]", issue) for i, item in enumerate(value)]
    # Structural checks use every role that parsed, even in turns whose content is bad, so one
    # pass reports both kinds of problem; a turn with a bad role has its own issue already.
    roles = [role for role, _ in parsed]
    ok = all(message is not None for _, message in parsed)
    for index, role in enumerate(roles):
        if role == "system" and index > 0:
            issue(
                f"messages[{index}].role",
                "system_not_first",
                "a system message may only be the first message",
            )
            ok = False
    if "assistant" not in roles:
        # With an unreadable role the assistant turn may be the one at fault; say that only.
        if None not in roles:
            issue("messages", "no_assistant_turn", "there is no assistant turn to train on")
        ok = False
    elif roles[-1] not in ("assistant", None):
        issue(
            f"messages[{len(roles) - 1}].role",
            "last_turn_not_assistant",
            f"the last message must be from the assistant, got {roles[-1]!r}",
        )
        ok = False
    if not ok:
        return None
    return [message for _, message in parsed if message is not None]


def _parse_message(item: Any, where: str, issue: _Report) -> tuple[str | None, Message | None]:
    """Check one turn; returns its role (``None`` if invalid) and the message (if all is valid)."""
    if not isinstance(item, dict):
        issue(where, "invalid_type", f"a message must be an object, got {_kind(item)}")
        return None, None
    role = item.get("role")
    if "role" not in item:
        issue(f"{where}.role", "missing_field", "'role' is missing")
        role = None
    elif not isinstance(role, str) or role not in ROLES:
        shown = repr(role) if isinstance(role, str) else _kind(role)
        issue(
            f"{where}.role", "unknown_role", f"unknown role {shown}; use one of {', '.join(ROLES)}"
        )
        role = None
    if "content" not in item:
        issue(f"{where}.content", "missing_field", "'content' is missing")
        return role, None
    content = _check_content(item["content"], f"{where}.content", issue)
    if role is None or content is None:
        return role, None
    return role, Message(role, content)


def _check_content(value: Any, where: str, issue: _Report) -> str | None:
    name = where.rsplit(".", 1)[-1]
    if not isinstance(value, str):
        hint = " (content parts are not supported)" if isinstance(value, list) else ""
        issue(where, "invalid_type", f"'{name}' must be a string, got {_kind(value)}{hint}")
        return None
    if not value.strip():
        issue(where, "empty_content", f"'{name}' is empty or only whitespace")
        return None
    return value


def _parse_risk(value: Any, issue: _Report) -> float | None:
    # JSON null reads as "no risk given", the same as leaving the key out.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        issue("risk", "invalid_type", f"'risk' must be a number in [0, 1], got {_kind(value)}")
        return None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        issue("risk", "out_of_range", f"'risk' must be in [0, 1], got {value}")
        return None
    return float(value)


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages a customer reads."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
