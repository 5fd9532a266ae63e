"""Beta schedules against hand-computed numbers."""

import pytest
import torch
from pydantic import ValidationError

from safety.schedules import (
    RegularizerConfig,
    critic_score_to_risk,
    make_schedule,
    risk_to_critic_score,
)


def _run(risk: list[float], **config) -> tuple[list[float], list[float]]:
    betas, weights = make_schedule(RegularizerConfig(**config))(torch.tensor(risk))
    return betas.tolist(), weights.tolist()


def test_off_gives_plain_sft():
    assert _run([0.0, 1.0], schedule="off") == ([0.0, 0.0], [1.0, 1.0])


def test_fixed_uses_one_beta_for_every_row():
    betas, weights = _run([0.0, 1.0], schedule="fixed", beta=0.25)
    assert betas == [0.25, 0.25]
    assert weights == [0.75, 0.75]


@pytest.mark.parametrize(
    ("risk", "beta", "weight"),
    [
        ([0.0, 0.0, 1.0, 1.0], 1 / 3, 2 / 3),  # s = 3 -> (3 - 2) / 3
        ([0.0, 0.0, 0.0, 0.0], 0.1, 0.9),  # s = 1 -> -1/3, clamped up to 0.1
        ([1.0, 1.0], 0.9, 0.1),  # s = 5 -> 1, clamped down to 0.9
        ([0.25, 1.0], 0.5, 0.5),  # mean 0.625 -> s = 3.5 -> 1.5 / 3
    ],
)
def test_paper_rule_on_the_batch_mean(risk, beta, weight):
    betas, weights = _run(risk, schedule="paper")
    assert betas == pytest.approx([beta] * len(risk))
    assert weights == pytest.approx([weight] * len(risk))


def test_adaptive_is_linear_in_risk_per_row():
    betas, weights = _run([0.0, 0.5, 1.0], schedule="adaptive", beta_min=0.1, beta_max=0.9)
    assert betas == pytest.approx([0.1, 0.5, 0.9])
    assert weights == pytest.approx([0.9, 0.5, 0.1])


def test_adaptive_threshold_zeroes_low_risk_rows():
    betas, weights = _run([0.1, 0.3, 0.8], beta_min=0.2, beta_max=0.8, risk_threshold=0.3)
    assert betas == pytest.approx([0.0, 0.38, 0.68])
    assert weights == pytest.approx([1.0, 0.62, 0.32])


def test_adaptive_ema_floors_rows_at_the_running_batch_risk():
    schedule = make_schedule(RegularizerConfig(beta_min=0.0, beta_max=1.0, ema=0.5))
    betas, _ = schedule(torch.tensor([1.0, 1.0]))  # m_1 = 1.0
    assert betas.tolist() == pytest.approx([1.0, 1.0])
    betas, _ = schedule(torch.tensor([0.0, 0.2]))  # m_2 = 0.5 * 1.0 + 0.5 * 0.1 = 0.55
    assert betas.tolist() == pytest.approx([0.55, 0.55])
    betas, _ = schedule(torch.tensor([0.0, 0.9]))  # m_3 = 0.5 * 0.55 + 0.5 * 0.45 = 0.5
    assert betas.tolist() == pytest.approx([0.5, 0.9])  # a harmful row is never diluted


def test_ema_state_survives_a_checkpoint():
    config = RegularizerConfig(ema=0.9)
    first = make_schedule(config)
    first(torch.tensor([1.0, 0.0]))
    resumed = make_schedule(config)
    resumed.load_state_dict(first.state_dict())
    risk = torch.tensor([0.1, 0.2])
    torch.testing.assert_close(first(risk), resumed(risk))


def test_beta_min_above_beta_max_is_rejected_naming_both():
    with pytest.raises(ValidationError, match=r"beta_min \(0\.8\) must be <= beta_max \(0\.3\)"):
        RegularizerConfig(beta_min=0.8, beta_max=0.3)


@pytest.mark.parametrize(
    "field", [{"beta": 1.5}, {"ema": 1.0}, {"risk_threshold": -0.1}, {"schedule": "x"}]
)
def test_out_of_range_fields_are_rejected(field):
    with pytest.raises(ValidationError):
        RegularizerConfig(**field)


def test_risk_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match=r"risk must lie in \[0, 1\], got \[0\.5, 2\.0\]"):
        make_schedule(RegularizerConfig())(torch.tensor([0.5, 2.0]))


def test_critic_score_maps_to_risk_and_back():
    assert [critic_score_to_risk(s) for s in (1.0, 3.0, 5.0)] == [0.0, 0.5, 1.0]
    scores = torch.tensor([1.0, 2.5, 4.0, 5.0])
    torch.testing.assert_close(risk_to_critic_score(critic_score_to_risk(scores)), scores)


def test_presets_name_every_schedule_and_unknown_names_are_listed():
    from safety.schedules import PRESETS, preset_config

    assert {cfg.schedule for cfg in PRESETS.values()} == {"off", "fixed", "paper", "adaptive"}
    adaptive = preset_config("adaptive")
    betas, _ = make_schedule(adaptive)(torch.tensor([0.0, 0.05, 1.0]))
    assert betas.tolist() == pytest.approx([0.0, 0.0, 0.9])
    with pytest.raises(ValueError, match="choose one of"):
        preset_config("yolo")
