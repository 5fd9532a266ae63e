"""Smoke test of the training-overhead benchmark: its code path on tiny-random, 2 timed steps.

The numbers mean nothing at this size; the test checks that every variant runs the steps it
was asked for and that the result file carries every key the issue asks for.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import training_overhead as bench
from bench.common import StepClock, run_child_json

SMOKE = bench.BenchSettings(**bench.SMOKE_SETTINGS)
OUR_VARIANTS = ("off", "adaptive_benign", "adaptive_harmful", "separate_ref")


def test_examples_fill_the_sequence_length_and_keep_assistant_labels(tiny_model):
    _, tokenizer, _ = tiny_model
    examples = bench.build_examples(tokenizer, count=6, seq_len=96)
    lengths = {len(example.input_ids) for example in examples}
    assert max(lengths) <= 96 and min(lengths) >= 94
    assert all(example.num_label_tokens > 20 for example in examples)
    # Varied text, not one example repeated.
    assert len({tuple(example.input_ids) for example in examples}) == len(examples)


def test_step_clock_times_only_the_steps_after_warm_up():
    clock = StepClock(warmup_steps=2)
    for inner in (5.0, 6.0, 7.0, 8.0):
        clock.end(inner)
    assert clock.steps == 4
    assert clock.inner_seconds == [7.0, 8.0]
    assert len(clock.interval_seconds) == 2


def test_result_file_has_every_ratio_and_per_variant_figure(tmp_path):
    out = tmp_path / "training_overhead.json"
    bench.main(["--smoke", "--in-process", "--variants", ",".join(OUR_VARIANTS), "--out", str(out)])

    result = json.loads(out.read_text())
    assert {"command", "date", "machine", "setup", "variants", "ratios", "targets"} <= set(result)
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch_version"]
    assert result["setup"]["model_id"] == "tiny-random"
    assert result["setup"]["data"]["seq_len_max"] <= result["setup"]["seq_len"]
    assert set(result["ratios"]) == set(bench.RATIOS) == set(result["targets"])
    for name in OUR_VARIANTS:
        figures = result["variants"][name]
        assert figures["timed_steps"] == 2
        assert figures["median_step_s"] > 0 and figures["tokens_per_s"] > 0
        assert figures["peak_rss_mb"] > 0 and math.isfinite(figures["final_loss"])
    assert result["ratios"]["off_vs_trl_time_ratio"] is None  # trl_sft was not run
    for name in (
        "adaptive_benign_vs_off_time_ratio",
        "adaptive_harmful_vs_off_time_ratio",
        "adaptive_vs_off_peak_rss_ratio",
        "separate_ref_vs_off_peak_rss_ratio",
    ):
        assert result["ratios"][name] > 0
    # Risk 0 needs no reference forward; risk 1 needs one on every row.
    assert result["variants"]["adaptive_benign"]["ref_fraction"] == 0.0
    assert result["variants"]["adaptive_harmful"]["ref_fraction"] == 1.0


def test_trl_variant_times_the_same_number_of_steps():
    pytest.importorskip("trl")
    result = bench.run_variant("trl_sft", SMOKE)
    assert len(result["step_seconds"]) == len(result["inner_step_seconds"]) == 2
    assert math.isfinite(result["final_loss"])


def test_a_variant_runs_in_its_own_process():
    result = run_child_json(bench.MODULE, ["--smoke", "--variant", "off"], timeout_s=120)
    assert result["variant"] == "off"
    assert len(result["step_seconds"]) == 2
    assert result["peak_rss_mb"] >= result["rss_after_load_mb"]
