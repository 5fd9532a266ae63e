"""Combined risk, bands, the report, the intake policy and the shared linear head."""

import pytest
import torch
from pydantic import ValidationError

from safety.risk import (
    IntakeRejectedError,
    LinearHead,
    RiskConfig,
    auroc,
    band,
    best_threshold,
    build_report,
    combine_risk,
    enforce_intake,
    fit_linear_head,
    intake_decision,
    read_keyed_json,
    write_json_atomic,
)


def test_auroc_counts_ordered_pairs_by_hand():
    # Positives 0.35 and 0.8; negatives 0.1 and 0.4. Of the 4 (pos, neg) pairs, 0.35 < 0.4 is
    # the only one ordered wrongly: 3/4.
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
    assert auroc([0, 1, 0, 1], [0.2, 0.2, 0.1, 0.9]) == pytest.approx(0.875)
    assert auroc([1, 0], [0.0, 1.0]) == 0.0


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 1], [0.2, 0.3])


def test_best_threshold_separates_the_classes():
    cut = best_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert 0.2 < cut < 0.7


def test_linear_head_learns_a_separable_problem_and_round_trips():
    torch.manual_seed(0)
    x = torch.randn(200, 5) * torch.tensor([1.0, 100.0, 1.0, 1.0, 1.0])
    y = (x[:, 0] + x[:, 1] / 100 > 0).long().tolist()
    head = fit_linear_head(x, y, l2=1e-3)
    accuracy = ((head.predict_proba(x) > 0.5).long() == torch.tensor(y)).float().mean()
    assert accuracy > 0.95
    again = LinearHead.from_dict(head.to_dict())
    assert torch.allclose(again.predict_proba(x), head.predict_proba(x))


def test_linear_head_multiclass_gives_a_distribution():
    x = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]]).repeat(10, 1)
    y = [0, 1, 2] * 10
    head = fit_linear_head(x, y, num_classes=3, classes=["a", "b", "c"])
    probs = head.predict_proba(x)
    assert probs.shape == (30, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(30))
    assert probs.argmax(-1).tolist() == y
    assert head.classes == ["a", "b", "c"]


def test_fit_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.1"):
        fit_linear_head(torch.zeros(2, 3), [0, 2])


def test_combined_risk_rule():
    config = RiskConfig(probe_weight=0.6)
    # The critic alone decides high risk: harmful compliance.
    assert combine_risk(5.0, 0.1, config) == pytest.approx(1.0)
    # A confident probe on a refused request is capped at probe_weight: medium, not high.
    assert combine_risk(1.0, 1.0, config) == pytest.approx(0.6)
    assert band(combine_risk(1.0, 1.0, config), config) == "medium"
    # The max of the two: the probe raises a low critic score.
    assert combine_risk(2.0, 0.9, config) == pytest.approx(max(0.25, 0.54))
    # One signal missing: the other as is.
    assert combine_risk(None, 0.9, config) == pytest.approx(0.9)
    assert combine_risk(3.0, None, config) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="neither"):
        combine_risk(None, None, config)


def test_bands_use_the_thresholds():
    config = RiskConfig(medium_threshold=0.3, high_threshold=0.7)
    assert [band(r, config) for r in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
        "high",
    ]


def test_config_error_names_both_thresholds():
    with pytest.raises(ValidationError, match=r"medium_threshold \(0.8\).*high_threshold \(0.5\)"):
        RiskConfig(medium_threshold=0.8, high_threshold=0.5)


def test_report_rows_and_summary():
    report = build_report(
        lines=[1, 2, 4],
        critic_scores=[5.0, 1.0, 1.0],
        probe_probs=[0.9, 0.95, 0.05],
        categories=["malware", "fraud_deception", "malware"],
    )
    rows = [row.to_dict() for row in report.rows]
    assert [row["line"] for row in rows] == [1, 2, 4]
    assert [row["band"] for row in rows] == ["high", "medium", "low"]
    assert set(rows[0]) >= {"line", "critic_score", "probe_prob", "risk", "band", "category"}
    # The category guess is kept outside the low band only.
    assert [row["category"] for row in rows] == ["malware", "fraud_deception", None]
    assert report.by_band() == {"low": 1, "medium": 1, "high": 1}
    assert report.by_category()["malware"] == {"low": 0, "medium": 0, "high": 1}
    summary = report.summary()
    assert summary["examples"] == 3 and summary["accepted"] is True
    table = report.table()
    assert "high" in table and "malware" in table and "accepted" in table


def test_report_checks_lengths():
    with pytest.raises(ValueError, match="probe_probs has 1 values for 2 lines"):
        build_report([1, 2], [1.0, 2.0], [0.5])


def test_intake_rejects_a_mostly_harmful_file_and_names_lines():
    lines = list(range(1, 31))
    scores = [5.0] * 25 + [1.0] * 5
    report = build_report(lines, scores, None, config=RiskConfig(max_high_risk_share=0.5))
    decision = intake_decision(report)
    assert not decision.accepted
    assert decision.lines == list(range(1, 26))
    # The first 20 lines are listed, the rest counted.
    assert "1, 2, 3" in decision.message and "20 and 5 more" in decision.message
    assert "25 of 30" in decision.message
    with pytest.raises(IntakeRejectedError) as caught:
        enforce_intake(report)
    assert caught.value.decision.lines == decision.lines


def test_intake_accepts_up_to_the_limit():
    report = build_report([1, 2], [5.0, 1.0], None, config=RiskConfig(max_high_risk_share=0.5))
    decision = enforce_intake(report)
    assert decision.accepted and decision.lines == [1]


def test_keyed_json_cache_is_read_only_for_the_same_key(tmp_path):
    path = tmp_path / "cache" / "answers.json"
    key = {"version": 2, "base": "m|a.safetensors:10:1"}
    entries = {"p1": {"prompt": "hi", "answer": "hello"}}

    assert read_keyed_json(path, key, "answers") == {}  # no file yet
    write_json_atomic(path, {**key, "answers": entries}, indent=1)
    assert read_keyed_json(path, key, "answers") == entries
    # Another base (or version) makes the whole cache stale, not just some entries.
    assert read_keyed_json(path, {**key, "base": "other"}, "answers") == {}
    assert read_keyed_json(path, key, "completions") == {}  # the field is absent
    assert [p.name for p in path.parent.iterdir()] == ["answers.json"]  # no temp file left

    path.write_text('{"version": 2, "answers": ')  # a torn write from an older writer
    assert read_keyed_json(path, key, "answers") == {}
