import hashlib
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from core.catalog import MARKER, cache_dir
from safety.prompts import BenignPrompt, HarmfulPrompt, Snippet, harmful_prompts, refusals
from workers.align import (
    DISTILL_CACHE,
    AlignConfig,
    align,
    benign_targets,
    build_conversations,
    choose_refusals,
    complete_sentences,
    default_target_id,
)
from workers.models import get_spec, list_models, load, load_tokenizer

#: Small enough for the tiny model to run the whole recipe twice in seconds.
TINY_CONFIG = AlignConfig(
    steps=3,
    learning_rate=1e-3,
    limit=12,
    distill_max_new_tokens=16,
    eval_max_new_tokens=8,
    max_seq_len=512,
    eval_splits=("validation",),
)


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def aligned_twice():
    """Align tiny-random twice (the second run must reuse the cached answers)."""
    _, base_spec = load_tokenizer("tiny-random")  # builds the base once, before the snapshot
    assert base_spec.path is not None
    before = _snapshot(base_spec.path)
    first = align("tiny-random", config=TINY_CONFIG)
    first_cache = (first.path / DISTILL_CACHE).read_text()
    # A probe measured on the first build's weights, which the second build replaces.
    stale_probe = get_spec(first.model_id).probe_path
    stale_probe.parent.mkdir(parents=True, exist_ok=True)
    stale_probe.write_text("{}")
    second = align("tiny-random", config=TINY_CONFIG)
    return first, second, first_cache, before, base_spec.path


def test_default_target_ids():
    assert default_target_id("smollm2-135m-instruct") == "smollm2-135m-safe"
    assert default_target_id("tiny-random") == "tiny-random-safe"
    assert default_target_id("/models/My-Model-instruct") == "My-Model-safe"


def test_config_names_conflicting_lengths():
    with pytest.raises(ValidationError, match=r"distill_max_new_tokens \(96\).*max_seq_len \(64\)"):
        AlignConfig(max_seq_len=64, distill_max_new_tokens=96)


def test_target_id_may_not_overwrite_a_builtin_or_escape_the_cache():
    with pytest.raises(ValueError, match="built-in"):
        align("tiny-random", "smollm2-135m-instruct", config=TINY_CONFIG)
    with pytest.raises(ValueError, match="plain name"):
        align("tiny-random", "../elsewhere", config=TINY_CONFIG)


def test_refusals_are_deterministic_and_match_the_category():
    prompts = harmful_prompts("train")
    snippets = refusals("train")
    category_of = {s.text: s.category for s in snippets}
    chosen = choose_refusals(prompts, snippets, seed=3)
    assert chosen == choose_refusals(prompts, snippets, seed=3)
    assert chosen != choose_refusals(prompts, snippets, seed=4)
    for prompt, text in zip(prompts, chosen, strict=True):
        assert category_of[text] in (None, prompt.category)
    # Both kinds are used, and the texts vary.
    assert any(category_of[t] is not None for t in chosen)
    assert any(category_of[t] is None for t in chosen)
    assert len(set(chosen)) > 20


def test_refusals_need_a_generic_fallback():
    only_malware = [Snippet("r1", "I won't write malware.", "terse", "f", "train", "malware")]
    prompt = HarmfulPrompt("h1", "steal a car", "illegal_activity", "f", "direct", "train")
    with pytest.raises(ValueError, match="generic"):
        choose_refusals([prompt], only_malware, seed=0)


def test_complete_sentences_cuts_a_truncated_answer():
    assert (
        complete_sentences("First point. Second point. Third poi") == "First point. Second point."
    )
    assert complete_sentences("Done already!") == "Done already!"
    # No sentence end late enough: keep everything rather than lose most of the answer.
    assert complete_sentences("Short. then a very long clause without any end") == (
        "Short. then a very long clause without any end"
    )


def test_benign_targets_replace_refusing_answers_with_the_reference():
    prompts = [
        BenignPrompt(
            "b1", "kill a python process?", "programming", True, "f", "train", "Use kill."
        ),
        BenignPrompt("b2", "plant garlic?", "gardening", False, "f", "train", "Two inches."),
    ]
    raw = {"b1": "I'm sorry, I can't help with killing.", "b2": "About five cm deep. Water it"}
    targets, replaced = benign_targets(prompts, raw)
    assert targets == ["Use kill.", "About five cm deep."]
    assert replaced == 1


def test_lookalikes_are_repeated_in_the_mix():
    harmful = [HarmfulPrompt("h1", "bad", "malware", "f", "direct", "train")]
    benign = [
        BenignPrompt("b1", "kill a process", "programming", True, "f", "train"),
        BenignPrompt("b2", "bake bread", "cooking", False, "f", "train"),
    ]
    chats = build_conversations(harmful, ["No."], benign, ["kill -9", "knead"], lookalike_repeats=3)
    prompts = [c.messages[0].content for c in chats]
    assert prompts == ["bad", "kill a process", "kill a process", "kill a process", "bake bread"]
    assert [c.line for c in chats] == [1, 2, 3, 4, 5]


def test_aligned_model_is_registered_with_its_marker(aligned_twice):
    first, second, _, _, _ = aligned_twice
    target = cache_dir() / "tiny-random-safe"
    assert first.path == second.path == target
    marker = json.loads((target / MARKER).read_text())
    assert marker["model_id"] == "tiny-random-safe"
    assert marker["base"] == "tiny-random"
    assert marker["lora_target_modules"] == list(get_spec("tiny-random").lora_target_modules)
    assert marker["align"]["steps"] == 3 and marker["align"]["lora_r"] == 16
    assert marker["training"]["steps"] == 3
    assert marker["counts"]["harmful_examples"] > 0 and marker["counts"]["benign_examples"] > 0
    validation = marker["refusal"]["validation"]
    assert validation["harmful_refusal"]["total"] == 12
    assert validation["over_refusal"]["total"] == 12
    assert 0 <= validation["lookalike_over_refusal"]["value"] <= 1
    # Built beside the target and renamed: no staging or old directories stay behind.
    assert not [p for p in cache_dir().iterdir() if p.name.startswith(".tiny-random-safe")]


def test_aligned_model_loads_through_the_registry(aligned_twice):
    spec = get_spec("tiny-random-safe")
    assert spec.source == "derived"
    assert "tiny-random-safe" in {s.model_id for s in list_models()}
    model, tokenizer, loaded_spec = load("tiny-random-safe", device="cpu")
    assert loaded_spec.source == "derived"
    assert tokenizer.chat_template  # saved with the model, so generation prompts a chat
    # Merged: a plain model, no LoRA layers left.
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_weights_changed_and_base_untouched(aligned_twice):
    _, _, _, before, base_dir = aligned_twice
    assert _snapshot(base_dir) == before
    base = load_file(base_dir / "model.safetensors")
    aligned = load_file(cache_dir() / "tiny-random-safe" / "model.safetensors")
    shared = base.keys() & aligned.keys()
    assert any("q_proj" in k for k in shared)
    changed = [k for k in shared if not torch.equal(base[k], aligned[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    # Only adapted projections move; embeddings and norms are the base's.
    assert all("proj" in k for k in changed)


def test_rerun_reuses_the_cached_self_distillation(aligned_twice):
    first, second, first_cache, _, _ = aligned_twice
    assert first.counts["answers_generated"] == 12
    assert second.counts["answers_generated"] == 0
    assert second.counts["answers_cached"] == 12
    assert (second.path / DISTILL_CACHE).read_text() == first_cache
    # Same seed and same data: the same training run.
    assert second.training["final_loss"] == pytest.approx(first.training["final_loss"])


def test_a_rebuild_drops_artifacts_of_the_old_weights(aligned_twice):
    first, *_ = aligned_twice
    spec = get_spec(first.model_id)
    assert not spec.probe_path.exists() and not spec.baseline_path.exists()
