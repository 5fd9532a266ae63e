"""Release and quarantine of audited adapters, on the local store and on S3 (moto's server).

The invariant under test: nothing lands under ``released/`` without a passing audit report (or
an operator's override record) stored beside it, including when a release crashes half-way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.release import (
    ADAPTER_FOLDER,
    MODEL_CARD_NAME,
    OVERRIDE_NAME,
    REPORT_NAME,
    manual_override,
    model_card,
    release,
    report_passed,
    unauthorised_releases,
)
from core.storage import (
    InvalidKeyError,
    LocalStore,
    ObjectNotFoundError,
    ObjectStore,
    S3Store,
    quarantine_prefix,
    released_prefix,
)
from safety.audit import (
    AuditConfig,
    AuditRun,
    AuditSuite,
    GatePolicy,
    PromptRow,
    build_report,
    figures_from_rows,
)
from safety.prompts import BenignPrompt, HarmfulPrompt

SECRET = "test-secret-key-0123456789"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects", SECRET, base_url="http://api.test")
    return S3Store(
        request.getfixturevalue("s3_bucket_name"),
        endpoint_url=request.getfixturevalue("s3_endpoint_url"),
        create_bucket=True,
    )


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    (directory / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    return directory


class _Judge:
    fingerprint = "test"

    def score(self, pairs):
        return [1.0] * len(pairs)


def audit_report(successes: int, harmful: int = 10) -> dict:
    """A real audit report (safety.audit) with ``successes`` attack successes out of ``harmful``."""
    rows = [
        PromptRow(
            id=f"h{i}",
            suite="s",
            kind="harmful",
            category="malware",
            prompt="p",
            response="r",
            score=5.0 if i < successes else 1.0,
            refused=i >= successes,
            verdict="attack_success" if i < successes else "blocked",
        )
        for i in range(harmful)
    ] + [
        PromptRow(
            id="b1",
            suite="s",
            kind="benign",
            category="code",
            lookalike=True,
            prompt="p",
            response="r",
            score=None,
            refused=False,
            verdict="answered",
        )
    ]
    figures = figures_from_rows(rows)
    suite = AuditSuite(
        [HarmfulPrompt("h0", "p", "malware", "f", "direct", "audit")],
        [BenignPrompt("b1", "p", "code", True, "g", "audit")],
        ["builtin:audit"],
    )
    report = build_report(
        AuditRun(rows, figures, {"generation_s": 1.0}),
        model_id="tiny-random",
        adapter_id="job-1",
        suite=suite,
        judge=_Judge(),
        refusal=None,
        config=AuditConfig(),
        policy=GatePolicy(),
        base=figures_from_rows(rows),
    )
    return report.to_json()


PASSING = audit_report(0)
FAILING = audit_report(5)


def card(report: dict) -> str:
    return model_card(
        base_model="tiny-random",
        report=report,
        preset="adaptive",
        training_examples=40,
        job="job-1",
    )


def record_writes(store: ObjectStore) -> list[str]:
    """Record the keys written through ``store``, in order."""
    writes: list[str] = []
    for name in ("put_bytes", "put_file", "_copy"):
        original = getattr(store, name)

        def spy(key, *args, _original=original, _name=name, **kwargs):
            writes.append(args[0] if _name == "_copy" else key)
            return _original(key, *args, **kwargs)

        setattr(store, name, spy)
    return writes


def test_report_passed_requires_a_boolean_verdict():
    assert report_passed(PASSING) is True and report_passed(FAILING) is False
    for bad in ({}, {"verdict": {}}, {"verdict": {"passed": "yes"}}):
        with pytest.raises(ValueError, match=r"verdict\.passed"):
            report_passed(bad)


def test_passing_adapter_is_released_report_first_card_last(store, adapter_dir):
    writes = record_writes(store)
    outcome = release(store, "t1", "j1", adapter_dir, PASSING, card(PASSING))
    prefix = released_prefix("t1", "j1")
    assert outcome.released and outcome.prefix == prefix
    assert writes[0] == prefix + REPORT_NAME and writes[-1] == prefix + MODEL_CARD_NAME
    assert sorted(writes[1:-1]) == [
        prefix + ADAPTER_FOLDER + "adapter_config.json",
        prefix + ADAPTER_FOLDER + "adapter_model.safetensors",
    ]
    assert outcome.adapter_prefix == prefix + ADAPTER_FOLDER
    assert store.list(quarantine_prefix("t1", "j1")) == []
    stored = json.loads(store.get_bytes(outcome.report_key))
    assert stored == PASSING
    assert store.get_bytes(prefix + "adapter/adapter_model.safetensors") == b"\x00weights" * 100


def test_failing_adapter_is_quarantined_and_nothing_is_released(store, adapter_dir):
    outcome = release(store, "t1", "j2", adapter_dir, FAILING, card(FAILING))
    assert not outcome.released and outcome.prefix == quarantine_prefix("t1", "j2")
    assert store.list("released/") == []
    assert set(store.list(outcome.prefix)) == {
        outcome.report_key,
        outcome.model_card_key,
        *outcome.adapter_keys,
    }


def test_a_redelivered_release_writes_nothing_twice(store, adapter_dir):
    first = release(store, "t1", "j3", adapter_dir, PASSING, card(PASSING))
    writes = record_writes(store)
    again = release(store, "t1", "j3", adapter_dir, PASSING, card(PASSING))
    assert len(first.written) == 4 and again.written == [] and writes == []
    assert again.released and again.adapter_keys == first.adapter_keys


def test_the_first_stored_decision_stands_on_redelivery(store, adapter_dir):
    release(store, "t1", "j4", adapter_dir, FAILING, card(FAILING))
    # A retry whose (re-run) audit happens to pass must not move the adapter to released/.
    again = release(store, "t1", "j4", adapter_dir, PASSING, card(PASSING))
    assert not again.released and store.list("released/") == []


def test_a_crash_mid_release_leaves_no_unreported_adapter_and_retry_completes(store, adapter_dir):
    original = store.put_file
    calls = []

    def crash_on_second(key, path):
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionError("worker killed")
        original(key, path)

    store.put_file = crash_on_second  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        release(store, "t1", "j5", adapter_dir, PASSING, card(PASSING))
    assert released_prefix("t1", "j5") + REPORT_NAME in store.list("released/")
    assert unauthorised_releases(store) == []
    del store.put_file
    outcome = release(store, "t1", "j5", adapter_dir, PASSING, card(PASSING))
    assert outcome.written[0].endswith(ADAPTER_FOLDER + "adapter_model.safetensors")
    assert store.exists(outcome.model_card_key)


def test_bad_inputs_write_nothing(store, tmp_path):
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "bad name.bin").write_bytes(b"x")
    with pytest.raises(InvalidKeyError):
        release(store, "t1", "j6", weird, PASSING, "card")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no file"):
        release(store, "t1", "j6", empty, PASSING, "card")
    with pytest.raises(ValueError, match="verdict"):
        release(store, "t1", "j6", tmp_path / "adapter", {"figures": {}}, "card")
    assert store.list("") == []


def test_manual_override_records_who_and_why_before_copying(store, adapter_dir):
    quarantined = release(store, "t1", "j7", adapter_dir, FAILING, card(FAILING))
    writes = record_writes(store)
    outcome = manual_override(store, "t1", "j7", who="admin-key-1", why="false positive")
    target = released_prefix("t1", "j7")
    assert outcome.released and writes[0] == target + OVERRIDE_NAME
    assert writes[1] == target + REPORT_NAME
    record = json.loads(store.get_bytes(target + OVERRIDE_NAME))
    assert record["who"] == "admin-key-1" and record["why"] == "false positive"
    assert record["verdict"]["passed"] is False and record["from_prefix"] == quarantined.prefix
    assert store.get_bytes(outcome.adapter_keys[1]) == b"\x00weights" * 100
    assert store.exists(outcome.model_card_key)
    assert set(store.list(quarantined.prefix)) == {  # the quarantined copy stays
        quarantined.report_key,
        quarantined.model_card_key,
        *quarantined.adapter_keys,
    }
    writes.clear()
    repeat = manual_override(store, "t1", "j7", who="someone-else", why="again")
    assert repeat.written == [] and writes == [] and repeat.override == record


def test_manual_override_refuses_what_it_cannot_or_need_not_do(store, adapter_dir):
    with pytest.raises(ValueError, match="who and why"):
        manual_override(store, "t1", "j8", who="admin", why="  ")
    with pytest.raises(ObjectNotFoundError, match="no quarantined adapter"):
        manual_override(store, "t1", "j8", who="admin", why="because")
    release(store, "t1", "j8", adapter_dir, PASSING, card(PASSING))
    with pytest.raises(ValueError, match="released by its audit already"):
        manual_override(store, "t1", "j8", who="admin", why="because")


def test_invariant_every_released_key_has_a_passing_report_or_override(store, adapter_dir):
    release(store, "t1", "a", adapter_dir, PASSING, card(PASSING))
    release(store, "t1", "b", adapter_dir, FAILING, card(FAILING))
    release(store, "t2", "c", adapter_dir, PASSING, card(PASSING))
    release(store, "t2", "d", adapter_dir, FAILING, card(FAILING))
    manual_override(store, "t2", "d", who="admin", why="reviewed by hand")

    keys = store.list("released/")
    assert {key.split("/")[2] for key in keys} == {"a", "c", "d"}
    for key in keys:
        job_prefix = "/".join(key.split("/")[:3]) + "/"
        report = json.loads(store.get_bytes(job_prefix + REPORT_NAME))
        assert report["verdict"]["passed"] or store.exists(job_prefix + OVERRIDE_NAME), key
    assert unauthorised_releases(store) == []

    # A file put there behind the gate's back is caught.
    store.put_bytes("released/t3/rogue/adapter/adapter_model.safetensors", b"x")
    store.put_bytes("released/t3/forged/audit_report.json", json.dumps(FAILING).encode())
    assert unauthorised_releases(store) == ["released/t3/forged/", "released/t3/rogue/"]


def test_model_card_names_base_preset_data_figures_and_verdict():
    text = card(FAILING)
    assert text.startswith("# LoRA adapter for tiny-random (job job-1)")
    assert "Safety preset: adaptive" in text and "Training examples: 40" in text
    assert "| ASR (critic) | 0.500 (5/10) |" in text
    assert "over-refusal lookalikes" in text
    assert "**Verdict: quarantined.** rejected: ASR 0.500 > max_asr 0.100" in text
    assert "**Verdict: released.**" in card(PASSING)
