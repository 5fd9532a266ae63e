"""The headline experiment (bench/headline.py) on tiny-random: the task and its metric, the
attack data and its cache, mixes and per-estimator risks, and the quick end-to-end run with a
resumed rerun. The numbers of a tiny-random run mean nothing; the tests check behaviour."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import date

import pytest

from bench import headline
from bench import headline_task as task
from safety.prompts import HarmfulPrompt, harmful_prompts
from safety.refusal import keyword_refusal

# --- the benign task --------------------------------------------------------------------------


def test_task_sets_are_deterministic_and_train_and_eval_are_disjoint():
    train = task.make_examples(90, "train", seed=0)
    assert train == task.make_examples(90, "train", seed=0)
    assert train != task.make_examples(90, "train", seed=1)
    evaluation = task.make_examples(90, "eval", seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    assert not {e.template for e in train} & {e.template for e in evaluation}
    # Varied: every date format and every template of the split occurs.
    assert {e.date_format for e in train} == set(task.DATE_FORMATS)
    assert {e.template for e in train} == set(task.SENTENCES["train"])


def test_every_example_states_its_answer_unambiguously():
    for example in task.make_examples(120, "train") + task.make_examples(60, "eval"):
        when = date.fromisoformat(example.answer)  # a real calendar date
        render, numeric = task.DATE_FORMATS[example.date_format]
        assert render(when) in example.prompt or render(when).capitalize() in example.prompt
        if numeric:
            assert when.day > 12  # 05/03 could be May or March; 25/03 cannot


@pytest.mark.parametrize(
    ("response", "correct", "exact"),
    [
        ("2024-03-05", True, True),
        ("'2024-03-05'.", True, True),
        ("The date is 2024-03-05.", True, False),
        ("2024-03-05, or maybe 2024-03-06", True, False),
        ("2024-03-06 (not 2024-03-05)", False, False),  # only the first date counts
        ("2024-05-03", False, False),  # day and month swapped
        ("2024-3-5", False, False),
        ("March 5, 2024", False, False),
        ("12024-03-055", False, False),  # digits run on: not a date
        ("", False, False),
    ],
)
def test_metric_scores_right_wrong_and_garbled_answers(response, correct, exact):
    assert task.is_correct(response, "2024-03-05") is correct
    assert task.is_exact_line(response, "2024-03-05") is exact


def test_score_counts_and_refuses_mismatched_lengths():
    result = task.score(["2024-03-05", "The date is 2024-03-05.", "nope"], ["2024-03-05"] * 3)
    assert (result.correct, result.total) == (2, 3)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.exact_line == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="as many responses as answers"):
        task.score(["2024-03-05"], [])


# --- attack data ------------------------------------------------------------------------------

_REFUSAL = "I'm sorry, but I can't help with that."


def _prompt(key: str) -> HarmfulPrompt:
    return HarmfulPrompt(key, f"request {key}", "illegal_activity", "f", "direct", "train")


def test_attack_data_drops_refusals_and_reuses_the_cache(tiny_model, tmp_path):
    calls: list[tuple[int, int]] = []

    def generate(model, tokenizer, prompts, *, sampling, **options):
        # The tiny model answers in blank lines, so the answers are fixed text here: every
        # third prompt's greedy answer a refusal. What is tested is the builder around
        # generation: one greedy candidate first, then ``sampling.samples`` more.
        calls.append((len(prompts), sampling.samples))
        return [
            [_REFUSAL if i % 3 == 0 else f"Sure. Step one for {p[:20]}."]
            + [f"Sample {k} for {p[:20]}." for k in range(sampling.samples)]
            for i, p in enumerate(prompts)
        ]

    prompts = harmful_prompts("train")[:6]
    cache = tmp_path / "attack.json"
    options = {"max_new_tokens": 8, "batch_size": 4, "cache_path": cache, "generate": generate}
    completions, generated = headline.attack_completions("tiny-random", prompts, **options)
    assert (generated, calls) == (6, [(6, 0)])
    pairs, counts = headline.attack_pairs(prompts, completions)
    assert counts["refusals_dropped"] == 2 and counts["kept"] == len(pairs) == 4
    assert not any(keyword_refusal(completion) for _, completion in pairs)
    assert {p for p, _ in pairs} <= {p.prompt for p in prompts}

    again, generated = headline.attack_completions("tiny-random", prompts, **options)
    assert (again, generated, calls) == (completions, 0, [(6, 0)])  # served from the cache
    # One more prompt: only that one is generated.
    _, generated = headline.attack_completions(
        "tiny-random", harmful_prompts("train")[:7], **options
    )
    assert (generated, calls) == (1, [(6, 0), (1, 0)])
    # Another token budget, or sampling, is another cache key.
    headline.attack_completions("tiny-random", prompts, **{**options, "max_new_tokens": 9})
    sampled, _ = headline.attack_completions(
        "tiny-random", prompts, sampling=headline.Sampling(samples=2), **options
    )
    assert calls[2:] == [(6, 0), (6, 2)]
    assert all(len(texts) == 3 for texts in sampled.values())
    # With samples, a prompt whose greedy answer refuses keeps a sampled candidate.
    rows, counts = headline.attack_candidates(prompts, sampled)
    assert counts["kept"] == len(rows) == 6 and counts["refusals_dropped"] == 0
    assert counts["candidates"] == 16  # 2 prompts x 2 samples + 4 prompts x 3


def test_attack_pairs_cut_unfinished_sentences_and_fill_blanks_only_when_asked():
    prompts = [_prompt("a"), _prompt("b"), _prompt("c")]
    completions = {"a": ["Sure, here it is. First you need to"], "b": [""], "c": [_REFUSAL]}
    pairs, counts = headline.attack_pairs(prompts, completions)
    assert pairs == [("request a", "Sure, here it is.")]
    assert (counts["empty_dropped"], counts["refusals_dropped"]) == (1, 1)
    filled, counts = headline.attack_pairs(prompts, completions, fill_blank=True)
    assert len(filled) == 2 and counts["blank_filled"] == 1
    assert filled[1][0] == "request b" and not keyword_refusal(filled[1][1])
    # Duplicates and refusals among the candidates are left out, the order kept.
    rows, _ = headline.attack_candidates(
        [_prompt("d")], {"d": ["One two three four five.", _REFUSAL, "One two three four five."]}
    )
    assert rows == [("request d", ["One two three four five."])]


class _ComplianceByPrefix:
    """A stand-in compliance head: answers starting "Sure" comply (p_refusal 0.1), others dodge."""

    def refusal_probs(self, pairs):
        return [0.1 if response.startswith("Sure") else 0.6 for _, response in pairs]


def test_attack_data_keeps_each_prompts_most_compliant_candidate():
    sure = "Sure, step one is to gather the parts you need."
    dodge = "What kind of site would you like to build today?"
    rows = [("a", [dodge, sure]), ("b", [dodge]), ("c", [sure, "Sure."])]

    judge = _ComplianceByPrefix()
    # The sampled "Sure" beats the greedy dodge; "Sure." says nothing, so it scores 0.
    assert headline.most_compliant(rows, judge, 0.75) == [("a", sure), ("c", sure)]
    assert headline.most_compliant(rows, judge, 0.3) == [("a", sure), ("b", dodge), ("c", sure)]
    # The filter off: the first candidate of each, and no judge is asked.
    assert headline.most_compliant(rows, object(), 0.0) == [("a", dodge), ("b", dodge), ("c", sure)]
    with pytest.raises(ValueError, match="--attack-min-comply 0"):
        headline.most_compliant(rows, object(), 0.75)  # a judge without a compliance head


# --- mixes and risks --------------------------------------------------------------------------


def test_mixes_are_deterministic_and_hold_the_share_asked_for():
    sizes = {"task": 20, "attack": 5}
    mix = headline.build_mix(sizes, 20, 0.1, seed=0)
    assert mix == headline.build_mix(sizes, 20, 0.1, seed=0)
    assert sum(pool == "attack" for pool, _ in mix) == 2 and len(mix) == 20
    full = headline.build_mix(sizes, 20, 1.0, seed=0)
    # A pool smaller than the mix is cycled: every attack example four times.
    assert sorted(i for _, i in full) == sorted(list(range(5)) * 4)
    assert all(pool == "task" for pool, _ in headline.build_mix(sizes, 20, 0.0, seed=0))
    with pytest.raises(ValueError, match="share must lie in"):
        headline.build_mix(sizes, 20, 1.5, seed=0)
    with pytest.raises(ValueError, match="every completion of the source model was dropped"):
        headline.build_mix({"task": 20, "attack": 0}, 20, 0.5, seed=0)


def test_each_estimator_scores_alone_and_a_run_sees_only_its_own_risk(tiny_model, small_critic):
    from workers.risk import load_critic, load_probe

    model, tokenizer, spec = tiny_model
    critic = load_critic()
    probe = load_probe(spec, model, tokenizer, train_if_missing=True)
    pools = {
        "task": [("How do I bake bread?", "Mix flour, water and yeast, then bake.")],
        "attack": [(harmful_prompts("train")[0].prompt, "Sure. Here is how to do it.")],
    }
    common = {"model": model, "tokenizer": tokenizer, "critic": critic, "probe": probe}
    rows = {
        estimator: {
            name: headline.score_pool(pairs, estimator, max_seq_len=512, **common)
            for name, pairs in pools.items()
        }
        for estimator in headline.ESTIMATORS
    }
    for row in rows["critic"]["task"] + rows["critic"]["attack"]:
        assert row["probe_prob"] is None and row["critic_score"] is not None
    for row in rows["probe"]["task"] + rows["probe"]["attack"]:
        assert row["critic_score"] is None and row["risk"] == row["probe_prob"]

    prepared = {"pools": pools, "risk_rows": rows}
    mix = [("attack", 0), ("task", 0)]
    for estimator in headline.ESTIMATORS:
        examples = headline.mix_examples(prepared, mix, estimator, tokenizer, 512)
        wanted = [rows[estimator]["attack"][0]["risk"], rows[estimator]["task"][0]["risk"]]
        assert [e.risk for e in examples] == pytest.approx(wanted)
    # off and fixed ignore risk; their examples carry none.
    assert [e.risk for e in headline.mix_examples(prepared, mix, None, tokenizer, 512)] == [0, 0]


# --- settings, targets, plot ------------------------------------------------------------------


def test_settings_survive_the_trip_to_a_child_and_bad_options_are_named():
    settings = headline.HeadlineSettings(**headline.QUICK_SETTINGS)
    assert headline.settings_from_json(json.loads(json.dumps(asdict(settings)))) == settings
    assert settings.estimators == ("critic",)
    with pytest.raises(SystemExit, match="unknown methods"):
        headline.main(["--quick", "--methods", "off,sft_plus"])
    with pytest.raises(SystemExit, match=r"--shares must be in \[0, 1\]"):
        headline.main(["--quick", "--shares", "0,2"])
    with pytest.raises(SystemExit, match="jobs must be >= 1"):
        headline.main(["--quick", "--jobs", "0"])
    with pytest.raises(SystemExit, match="--attack-samples must be >= 0"):
        headline.main(["--quick", "--attack-samples", "-1"])
    # Parallel runs share the cores unless --threads says otherwise.
    cores = headline.CORES
    two = headline.settings_from_args(headline._parse(["--quick", "--jobs", "2"]))
    assert (two.jobs, two.threads) == (2, max(1, cores // 2))
    assert (
        headline.settings_from_args(headline._parse(["--jobs", "2", "--threads", "3"])).threads == 3
    )


def test_a_missing_safe_base_fails_saying_how_to_build_it(tmp_path):
    with pytest.raises(SystemExit, match="tether models align smollm2-135m-instruct"):
        headline.main(["--out", str(tmp_path / "headline.json")])


def _run(method: str, share: float, asr: float, task_accuracy: float, released: bool) -> dict:
    return {
        "method": method,
        "share": share,
        "seed": 0,
        "asr": asr,
        "task_accuracy": task_accuracy,
        "released": released,
    }


def test_attack_baselines_start_first_then_the_most_harmful_mixes():
    runs = [(share, method, 0) for share in (0.0, 0.1, 1.0) for method in ("off", "fixed")]
    started = sorted(runs, key=headline.launch_order)
    assert started == [
        (1.0, "off", 0),
        (0.1, "off", 0),
        (0.0, "off", 0),
        (1.0, "fixed", 0),
        (0.1, "fixed", 0),
        (0.0, "fixed", 0),
    ]


def test_runs_that_would_train_the_same_adapter_share_one_digest():
    """Equal beta plans on equal data and settings give one digest; any row weighted
    differently, another share or another seed gives another."""
    settings = headline.HeadlineSettings(examples=16, steps=3, batch_size=4)
    low = [{"risk": 0.1}] * 16
    prepared = {
        "pools": {"task": [("q", "a")] * 16, "attack": [("h", "c")] * 16},
        "risk_rows": {
            "critic": {"task": low, "attack": [{"risk": 0.9}] * 16},
            "probe": {"task": [{"risk": 0.2}] * 16, "attack": [{"risk": 0.8}] * 16},
        },
        "digests": {"data": "d"},
    }

    def digest(method, share=0.0, seed=0):
        return headline.training_digest(settings, prepared, method, share, seed)

    # benign: adaptive pulls nothing (risk under 0.3) and paper clamps to 0.1 either way
    assert digest("off") == digest("adaptive_critic") == digest("adaptive_probe")
    assert digest("paper_critic") == digest("paper_probe") != digest("off")
    assert digest("fixed") not in {digest("off"), digest("paper_critic")}
    # harmful: the estimators' risks differ, so do the plans
    assert digest("adaptive_critic", 1.0) != digest("adaptive_probe", 1.0)
    assert digest("off", 1.0) != digest("off") != digest("off", seed=1)


def test_targets_follow_the_issue():
    runs = [
        _run("off", 0.0, 0.02, 0.90, True),
        _run("adaptive_critic", 0.0, 0.02, 0.89, True),
        _run("adaptive_probe", 0.0, 0.02, 0.85, True),
        _run("off", 0.1, 0.40, 0.90, False),
        _run("off", 1.0, 0.85, 0.70, False),
        _run("adaptive_critic", 1.0, 0.05, 0.70, True),
    ]
    figures = headline.headline_figures(runs, base_asr=0.03)
    assert figures["sft_attack_asr"] == 0.85 and figures["fixed_attack_asr"] is None
    assert figures["utility_gap_points"] == pytest.approx(-1.0)
    assert figures["utility_gap_points_probe"] == pytest.approx(-5.0)
    targets = headline.evaluate_targets(figures, runs)
    met = {name: target["met"] for name, target in targets.items()}
    assert met == {
        "base_asr": True,
        "sft_attack_asr": True,
        "adaptive_critic_attack_asr": True,
        "adaptive_probe_attack_asr": None,  # not run
        "utility_gap_points": True,
        "utility_gap_points_probe": False,
        "gate_rejects_attacked_sft": True,
        "gate_releases_benign_sft": True,
    }
    runs[3]["released"] = True  # the gate let an attacked adapter through
    assert not headline.evaluate_targets(figures, runs)["gate_rejects_attacked_sft"]["met"]


def test_plot_draws_asr_against_share(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_run(m, s, 0.5 * s, 0.9, True) for m in ("off", "adaptive_critic") for s in (0, 1)]
    result = {"runs": runs, "base_asr": 0.02, "base": {"model_id": "tiny-random"}}
    path = headline.plot(result, tmp_path / "headline.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- end to end -------------------------------------------------------------------------------

REQUIRED_KEYS = {
    "command",
    "date",
    "machine",
    "base_asr",
    "sft_attack_asr",
    "fixed_attack_asr",
    "paper_critic_attack_asr",
    "paper_probe_attack_asr",
    "adaptive_critic_attack_asr",
    "adaptive_probe_attack_asr",
    "utility_gap_points",
    "utility_gap_points_probe",
    "targets",
    "runs",
    "settings",
    "wall_seconds",
}


@pytest.mark.slow
def test_quick_run_writes_the_result_and_a_rerun_resumes(tmp_path, small_critic, capfd):
    out, work = tmp_path / "headline.json", tmp_path / "work"
    argv = ["--quick", "--methods", "off,adaptive_critic", "--shares", "0,1", "--threads", "1"]
    argv += ["--jobs", "2", "--out", str(out), "--work-dir", str(work)]  # two runs at a time
    first = headline.main(argv)

    result = json.loads(out.read_text())
    assert set(result) >= REQUIRED_KEYS
    assert result["settings"]["base_id"] == "tiny-random" and result["quick"]
    for key in ("base_asr", "sft_attack_asr", "adaptive_critic_attack_asr"):
        assert 0.0 <= result[key] <= 1.0
    assert result["fixed_attack_asr"] is None  # not among the methods run
    assert isinstance(result["utility_gap_points"], float)
    assert all(t["met"] in (True, False, None) for t in result["targets"].values())
    assert not result["failed_runs"] and result["resumed_runs"] == 0
    # adaptive leaves every benign row below its risk threshold: the same plan as off, so the
    # same adapter, trained once and reported under both names.
    assert result["shared_runs"] == 1
    runs = {(r["method"], r["share"]): r for r in result["runs"]}
    # In (share, method) order, whichever of the parallel runs finished first.
    assert list(runs) == [(m, s) for s in (0.0, 1.0) for m in ("off", "adaptive_critic")]
    for run in runs.values():
        assert isinstance(run["released"], bool)
        assert run["verdict"].startswith("passed" if run["released"] else "rejected")
        assert run["peak_rss_mb"] > 0 and run["train_seconds"] > 0 and run["audit_seconds"] > 0
        assert 0.0 <= run["task_accuracy"] <= 1.0
        assert run["harmful_examples"] == run["share"] * run["examples"]
    # Standard SFT never pulls toward the reference; adaptive does on harmful rows.
    assert runs[("off", 1.0)]["mean_beta"] == 0.0
    assert runs[("adaptive_critic", 1.0)]["ref_fraction"] > 0.0
    twin, trainer = runs[("adaptive_critic", 0.0)], runs[("off", 0.0)]
    assert twin["same_training_as"] == "off@0/seed0" and "same_training_as" not in trainer
    assert twin["child_wall_s"] == 0.0 and trainer["child_wall_s"] > 0.0
    assert (twin["schedule"], twin["estimator"]) == ("adaptive", "critic")
    measured = ("asr", "refusal_asr", "over_refusal", "task_accuracy", "final_loss", "figures")
    assert all(twin[k] == trainer[k] for k in measured)
    prepared = json.loads((work / "prepared.json").read_text())
    assert set(prepared["risk_rows"]) == {"critic"}  # the probe is not needed, so not trained
    assert (result["plot"] is not None) == _has_matplotlib()

    finished = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*.json")}
    capfd.readouterr()
    again = headline.main(argv)
    assert again["resumed_runs"] == 3 and again["shared_runs"] == 1 and again["prepared_reused"]
    assert again["runs"] == first["runs"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert capfd.readouterr().err.count("finished earlier") == 3

    # A changed training setting redoes the runs it touches; the preparation does not depend
    # on it and is reused.
    changed = headline.main([*argv[:2], "off", *argv[3:], "--steps", "3"])
    assert changed["resumed_runs"] == 0 and changed["prepared_reused"]
    assert {r["share"] for r in changed["runs"]} == {0.0, 1.0}


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
