"""The activation probe on the tiny random model: features, training sweep, save/load."""

import pytest
import torch

from safety.probe import (
    ActivationProbe,
    ProbeData,
    ProbeError,
    _hidden_states,
    builtin_probe_digest,
    probe_data,
    probe_data_digest,
    prompt_features,
    render_prompt,
    train_probe,
)

# Prompts the tiny model's tokenizer knows well; "kill" and "unsafe" mark the positive class,
# so even random weights separate them (the token embeddings differ).
POSITIVE = [f"how to kill the {w} and make it unsafe" for w in ("bank", "process", "model", "data")]
NEGATIVE = [
    f"how to cook a {w} recipe for the garden" for w in ("photo", "night", "travel", "code")
]


@pytest.fixture(scope="module")
def tiny():
    from workers.models import load

    return load("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def probe(tiny):
    model, tokenizer, spec = tiny
    data = ProbeData(POSITIVE + NEGATIVE, [1] * 4 + [0] * 4)
    return train_probe(model, tokenizer, spec.model_id, train=data, validation=data, l2=1e-3)


def test_render_prompt_ends_with_the_assistant_header(tiny):
    _, tokenizer, _ = tiny
    ids = render_prompt(tokenizer, "hello")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_features_do_not_depend_on_batching_or_padding(tiny):
    model, tokenizer, _ = tiny
    ids = [render_prompt(tokenizer, p) for p in [*POSITIVE, "hi"]]
    one = prompt_features(model, ids, [1, 2], batch_size=1, pad_token_id=tokenizer.pad_token_id)
    many = prompt_features(model, ids, [1, 2], batch_size=8, pad_token_id=tokenizer.pad_token_id)
    for key in one:
        assert torch.allclose(one[key], many[key], atol=1e-5), key
    # The last-token feature is the hidden state at the prompt's final position.
    full = model(torch.tensor([ids[0]]), output_hidden_states=True).hidden_states
    assert torch.allclose(one[(2, "last")][0], full[2][0, -1], atol=1e-5)
    assert torch.allclose(one[(1, "mean")][0], full[1][0].mean(0), atol=1e-5)


def test_early_stop_matches_the_full_forward(tiny):
    model, _, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for deepest in (0, 1, 2):
        partial = _hidden_states(model, ids, mask, deepest)
        assert len(partial) == deepest + 1
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(partial, full, strict=False))


def test_training_sweeps_layers_and_picks_the_best(probe, tiny):
    model, tokenizer, _ = tiny
    sweep = probe.meta["sweep"]
    assert {(s["layer"], s["pooling"]) for s in sweep} == {
        (layer, pooling) for layer in (1, 2) for pooling in ("last", "mean")
    }
    assert probe.auroc == max(s["auroc"] for s in sweep) == pytest.approx(1.0)
    harmful = probe.score_texts(model, tokenizer, POSITIVE)
    benign = probe.score_texts(model, tokenizer, NEGATIVE)
    assert min(harmful) > max(benign)
    assert 0.0 < probe.threshold < 1.0


def test_save_load_round_trip(probe, tiny, tmp_path):
    model, tokenizer, spec = tiny
    path = probe.save(tmp_path / "probe.json")
    loaded = ActivationProbe.load(path, model_id=spec.model_id)
    assert (loaded.layer, loaded.pooling, loaded.threshold) == (
        probe.layer,
        probe.pooling,
        probe.threshold,
    )
    texts = POSITIVE + NEGATIVE
    assert loaded.score_texts(model, tokenizer, texts) == pytest.approx(
        probe.score_texts(model, tokenizer, texts), abs=1e-6
    )


def test_load_checks_the_model_and_says_how_to_train(probe, tmp_path):
    path = probe.save(tmp_path / "probe.json")
    with pytest.raises(ProbeError, match="trained for 'tiny-random', not 'other'"):
        ActivationProbe.load(path, model_id="other")
    with pytest.raises(ProbeError, match="tether probe train --model tiny-random"):
        ActivationProbe.load(tmp_path / "missing.json", model_id="tiny-random")


def test_load_refuses_a_probe_of_older_builtin_sets_but_not_one_of_custom_data(probe, tmp_path):
    installed = builtin_probe_digest()
    custom = probe.save(tmp_path / "custom.json")
    assert probe.meta["builtin_data"] is False
    # A probe trained on the caller's own prompts is the caller's to keep current.
    ActivationProbe.load(custom, model_id="tiny-random", builtin_digest=installed)

    older = ActivationProbe(**{**probe.__dict__, "meta": {**probe.meta, "builtin_data": True}})
    path = older.save(tmp_path / "older.json")
    with pytest.raises(ProbeError, match="other built-in prompt sets than the installed ones"):
        ActivationProbe.load(path, model_id="tiny-random", builtin_digest=installed)
    # Without a digest to compare with, nothing is checked.
    ActivationProbe.load(path, model_id="tiny-random")


def test_data_digest_covers_both_splits_and_every_label():
    train, validation = probe_data("train"), probe_data("validation")
    assert builtin_probe_digest() == probe_data_digest(train, validation)
    flipped = ProbeData(train.prompts, [1 - label for label in train.labels])
    assert probe_data_digest(flipped, validation) != probe_data_digest(train, validation)
    assert probe_data_digest(validation, train) != probe_data_digest(train, validation)


def test_builtin_probe_data_keeps_splits_apart():
    train, validation = probe_data("train"), probe_data("validation")
    assert set(train.labels) == {0, 1} and set(validation.labels) == {0, 1}
    assert not set(train.prompts) & set(validation.prompts)
