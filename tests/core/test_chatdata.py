import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.chatdata import (
    ROLES,
    Conversation,
    DatasetValidationError,
    Message,
    ValidationIssue,
    parse_jsonl,
    read_jsonl_file,
    validate_jsonl,
)

SAMPLE = Path(__file__).parents[2] / "core" / "sample_data" / "benign_chat.jsonl"
LIMITS = {"max_bytes": 1_000_000, "max_lines": 1000}


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


def _chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


GOOD = _chat(("user", "hi"), ("assistant", "hello"))


def _found(issues: list[ValidationIssue]) -> set[tuple[int | None, str | None, str]]:
    return {(i.line, i.field, i.code) for i in issues}


def test_malformed_file_reports_every_error_with_line_field_and_code_in_one_pass():
    lines = [
        _line(GOOD),  # 1 valid
        b'{"messages": [',  # 2
        b"[1, 2, 3]",  # 3
        _line(_chat(("user", "hi"), ("bot", "hello"))),  # 4
        _line(_chat(("user", "hi"), ("assistant", "   "))),  # 5
        _line(_chat(("user", "hi"), ("assistant", "ok"), ("user", "and?"))),  # 6
        _line(_chat(("user", "hi"), ("system", "be nice"), ("assistant", "ok"))),  # 7
        b"",  # 8 blank: skipped silently
        _line({"messages": [{"role": "user", "content": 42}, {"role": "assistant"}]}),  # 9
        _line({"prompt": "p", "completion": "c", "messages": []}),  # 10
        _line({"text": "hello"}),  # 11
        _line({"messages": "hi"}),  # 12
        _line({"messages": []}),  # 13
        _line({"messages": ["hi", {"role": "assistant", "content": "x"}]}),  # 14
        _line(_chat(("user", "hi"))),  # 15
        _line(_chat(("user", "hi"), ("assistant", "ok"), risk=1.5)),  # 16
        _line(_chat(("user", "hi"), ("assistant", "ok"), risk="high")),  # 17
        b'{"prompt": "caf\xe9", "completion": "x"}',  # 18 latin-1, not UTF-8
        _line({"prompt": "p"}),  # 19
        _line(_chat(("system", "s"), ("user", "u"), ("assistant", "a"), risk=0.25)),  # 20 valid
    ]
    conversations, issues = parse_jsonl(b"\n".join(lines) + b"\n", **LIMITS)

    assert _found(issues) == {
        (2, None, "invalid_json"),
        (3, None, "not_an_object"),
        (4, "messages[1].role", "unknown_role"),
        (5, "messages[1].content", "empty_content"),
        (6, "messages[2].role", "last_turn_not_assistant"),
        (7, "messages[1].role", "system_not_first"),
        (9, "messages[0].content", "invalid_type"),
        (9, "messages[1].content", "missing_field"),
        (10, None, "mixed_formats"),
        (11, "messages", "missing_messages"),
        (12, "messages", "invalid_type"),
        (13, "messages", "empty_messages"),
        (14, "messages[0]", "invalid_type"),
        (15, "messages", "no_assistant_turn"),
        (16, "risk", "out_of_range"),
        (17, "risk", "invalid_type"),
        (18, None, "invalid_utf8"),
        (19, "completion", "missing_field"),
    }
    assert len(issues) == 18, "each problem is reported once"
    assert [c.line for c in conversations] == [1, 20]
    by_line = {i.line: i for i in issues}
    assert all(role in by_line[4].message for role in ROLES)  # names the allowed roles
    assert "'bot'" in by_line[4].message


def test_validate_raises_with_every_issue_listed_readably():
    data = b"\n".join([_line(GOOD), b"not json", _line(_chat(("user", "x")))])
    with pytest.raises(DatasetValidationError) as caught:
        validate_jsonl(data, **LIMITS)
    error = caught.value
    assert isinstance(error, ValueError)
    assert [(i.line, i.code) for i in error.issues] == [
        (2, "invalid_json"),
        (3, "no_assistant_turn"),
    ]
    text = str(error)
    assert "2 problems" in text
    assert "line 2: invalid JSON" in text and "[invalid_json]" in text
    assert "line 3, messages: there is no assistant turn" in text


def test_file_too_large_is_refused_before_parsing():
    data = b"garbage that is not json\n" * 100
    conversations, issues = parse_jsonl(data, max_bytes=len(data) - 1, max_lines=10)
    assert conversations == []
    assert [(i.line, i.code) for i in issues] == [(None, "file_too_large")]
    assert str(len(data) - 1) in issues[0].message


def test_file_too_large_on_disk_is_refused_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_bytes(_line(GOOD) * 200)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the file was read"))
    with pytest.raises(DatasetValidationError) as caught:
        read_jsonl_file(path, max_bytes=1024, max_lines=10)
    assert caught.value.issues[0].code == "file_too_large"


def test_too_many_lines_is_reported_once_with_the_limit_and_later_lines_still_checked():
    lines = [_line(GOOD)] * 5 + [b"{bad"] + [_line(GOOD)] * 3
    _, issues = parse_jsonl(b"\n".join(lines), max_bytes=10_000, max_lines=3)
    assert [(i.line, i.code) for i in issues] == [(4, "too_many_lines"), (6, "invalid_json")]
    assert "more than 3 examples" in issues[0].message


def test_blank_lines_do_not_count_and_empty_file_has_no_examples():
    data = b"\n\n" + _line(GOOD) + b"\r\n   \n" + _line(GOOD) + b"\n"
    conversations, issues = parse_jsonl(data, max_bytes=10_000, max_lines=2)
    assert issues == []
    assert [c.line for c in conversations] == [3, 5]
    for empty in (b"", b"\n  \n\n"):
        assert [i.code for i in parse_jsonl(empty, **LIMITS)[1]] == ["no_examples"]


def test_issue_collection_stops_at_max_issues():
    _, issues = parse_jsonl(b"x\n" * 50, max_bytes=10_000, max_lines=100, max_issues=5)
    assert [i.code for i in issues] == ["invalid_json"] * 5 + ["too_many_issues"]


def test_prompt_completion_becomes_user_and_assistant_turns():
    data = _line({"prompt": "2+2?", "completion": "4", "risk": 0, "source": "ignored"})
    (conversation,) = validate_jsonl(data, **LIMITS)
    assert conversation == Conversation(
        line=1, messages=[Message("user", "2+2?"), Message("assistant", "4")], risk=0.0
    )
    assert conversation.as_dicts()[1] == {"role": "assistant", "content": "4"}
    assert conversation.response == "4"


def test_risk_is_optional_and_kept_as_float():
    lines = [
        _line(_chat(("user", "a"), ("assistant", "b"), risk=1)),
        _line(_chat(("user", "a"), ("assistant", "b"), risk=None)),
        _line(_chat(("user", "a"), ("assistant", "b"))),
        _line(_chat(("user", "a"), ("assistant", "b"), risk=0.3)),
    ]
    conversations = validate_jsonl(b"\n".join(lines), **LIMITS)
    assert [c.risk for c in conversations] == [1.0, None, None, 0.3]
    for bad, code in ((True, "invalid_type"), (-0.1, "out_of_range"), ("NaN", "out_of_range")):
        raw = _line(_chat(("user", "a"), ("assistant", "b"))).replace(b"}]}", b'}], "risk": ')
        raw += (bad if isinstance(bad, str) else json.dumps(bad)).encode() + b"}"
        assert [(i.field, i.code) for i in parse_jsonl(raw, **LIMITS)[1]] == [("risk", code)]


def test_unknown_keys_are_ignored_and_bom_accepted():
    obj = {
        "messages": [
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "assistant", "content": "hello", "weight": 1},
        ],
        "metadata": {"source": "x"},
    }
    (conversation,) = validate_jsonl(b"\xef\xbb\xbf" + _line(obj), **LIMITS)
    assert [m.role for m in conversation.messages] == ["user", "assistant"]


def test_non_utf8_line_is_reported_and_other_lines_parse():
    data = _line(GOOD) + b"\n" + b'{"prompt": "\xff\xfe", "completion": "x"}\n' + _line(GOOD)
    conversations, issues = parse_jsonl(data, **LIMITS)
    assert [c.line for c in conversations] == [1, 3]
    assert [(i.line, i.code) for i in issues] == [(2, "invalid_utf8")]


def test_sample_file_is_valid_and_varied():
    conversations = read_jsonl_file(SAMPLE, max_bytes=1_000_000, max_lines=1000)
    assert len(conversations) >= 35
    assert any(c.messages[0].role == "system" for c in conversations)
    assert any(sum(m.role == "assistant" for m in c.messages) > 1 for c in conversations)
    assert any(c.risk is not None for c in conversations)
    assert b'"prompt"' in SAMPLE.read_bytes()


def test_read_jsonl_file_takes_limits_from_a_settings_like_object(tmp_path):
    class Limits:
        max_upload_bytes = 10_000
        max_examples = 1

    path = tmp_path / "two.jsonl"
    path.write_bytes(_line(GOOD) + b"\n" + _line(GOOD))
    with pytest.raises(DatasetValidationError, match="more than 1 examples"):
        read_jsonl_file(str(path), Limits())
    assert len(read_jsonl_file(path.read_bytes(), Limits(), max_lines=2)) == 2


_text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
_turn_pairs = st.lists(st.tuples(_text, _text), min_size=1, max_size=4)


@settings(max_examples=75, deadline=None)
@given(
    system=st.none() | _text,
    pairs=_turn_pairs,
    risk=st.none() | st.floats(0, 1),
)
def test_any_valid_conversation_round_trips(system, pairs, risk):
    messages = [Message("system", system)] if system is not None else []
    for user, assistant in pairs:
        messages += [Message("user", user), Message("assistant", assistant)]
    original = Conversation(line=1, messages=messages, risk=risk)
    obj = {"messages": original.as_dicts(), "risk": risk}
    for ensure_ascii in (True, False):
        data = json.dumps(obj, ensure_ascii=ensure_ascii).encode()
        conversations, issues = parse_jsonl(data, **LIMITS)
        assert issues == []
        assert conversations == [original]
