"""The training loop on the tiny random model: behaviour, not speed."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import get_cosine_schedule_with_warmup

from core.chatdata import Conversation, Message
from safety.schedules import RegularizerConfig, preset_config
from workers import training
from workers.data import tokenize_conversations
from workers.models import load
from workers.training import (
    DirectoryCheckpointer,
    LoraSpec,
    TrainingConfig,
    _batch_loss,
    _DataPosition,
    _micro_batches,
    beta_plan,
    train,
)


def fresh_model():
    """train() injects LoRA layers in place, so every run gets its own copy of the base."""
    return load("tiny-random", device="cpu")


def make_examples(tokenizer, n=12, risky_every=0):
    conversations = []
    for i in range(n):
        risk = 1.0 if risky_every and i % risky_every == 0 else 0.0
        conversations.append(
            Conversation(
                line=i + 1,
                messages=[
                    Message("user", f"question number {i}: how do I cook rice?"),
                    Message("assistant", f"answer {i}: rinse it, then simmer it for {10 + i} min."),
                ],
                risk=risk,
            )
        )
    examples, issues = tokenize_conversations(conversations, tokenizer, max_seq_len=256)
    assert not issues
    return examples


def config(**overrides):
    base = dict(
        lora=LoraSpec(r=4, alpha=8),
        regularizer=preset_config("adaptive"),
        learning_rate=1e-2,
        batch_size=4,
        max_steps=4,
        warmup_ratio=0.0,
        seed=0,
    )
    base.update(overrides)
    return TrainingConfig(**base)


def first_batch(examples, cfg, pad_id):
    return next(_micro_batches(examples, cfg, _DataPosition(), pad_id))


def test_kl_is_zero_at_step_zero_with_a_fresh_adapter():
    model, tokenizer, spec = fresh_model()
    examples = make_examples(tokenizer)
    cfg = config()
    peft_model = training._attach_lora(model, spec, cfg)
    batch = first_batch(examples, cfg, tokenizer.pad_token_id)
    betas = torch.ones(batch["input_ids"].shape[0])
    loss, stats = _batch_loss(peft_model, batch, betas, torch.zeros_like(betas), cfg)
    assert stats.ref_fraction == 1.0
    assert stats.kl == pytest.approx(0.0, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)


def test_lora_weights_change_and_base_weights_do_not(tmp_path):
    model, tokenizer, spec = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(
        model,
        spec,
        make_examples(tokenizer, risky_every=2),
        config(),
        pad_token_id=tokenizer.pad_token_id,
        out_dir=tmp_path / "adapter",
    )
    assert result.steps == 4 and not result.cancelled
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    after = model.state_dict()  # LoRA was injected in place
    for name, value in before.items():
        key = name.replace(".weight", ".base_layer.weight")
        current = after.get(name, after.get(key))
        assert current is not None, name
        assert torch.equal(current, value), f"base weight {name} changed"


def count_decoder_forwards(model):
    sizes: list[int] = []

    def pre_hook(module, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])

    model.get_decoder().register_forward_pre_hook(pre_hook, with_kwargs=True)
    return sizes


@pytest.mark.parametrize(
    ("preset", "risky_every", "expected"),
    [
        ("off", 2, [4, 4]),  # no reference forward at all
        ("adaptive", 0, [4, 4]),  # every risk 0: no reference forward either
        # reference (first) only on the 2 risky rows of each batch, then the policy on all 4
        ("adaptive", 2, [2, 4, 2, 4]),
        ("paper", 0, [4, 4, 4, 4]),  # the paper's rule never lets beta reach 0
    ],
)
def test_reference_forward_runs_only_for_rows_with_beta_above_zero(preset, risky_every, expected):
    model, tokenizer, spec = fresh_model()
    sizes = count_decoder_forwards(model)
    examples = make_examples(tokenizer, n=8, risky_every=risky_every)
    cfg = config(regularizer=preset_config(preset), max_steps=2, shuffle=False)
    train(model, spec, examples, cfg, pad_token_id=tokenizer.pad_token_id)
    assert sizes == expected


def test_off_preset_is_plain_cross_entropy_training():
    """With one example per batch, `off` must match a hand-written HF-loss loop exactly."""
    model_a, tokenizer, spec = fresh_model()
    model_b, _, _ = fresh_model()
    examples = make_examples(tokenizer, n=4)
    cfg = config(regularizer=preset_config("off"), batch_size=1, max_steps=4, shuffle=False)
    train(model_a, spec, examples, cfg, pad_token_id=tokenizer.pad_token_id)

    torch.manual_seed(cfg.seed)
    peft_b = training._attach_lora(model_b, spec, cfg)
    params = [p for p in peft_b.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, cfg.max_steps)
    peft_b.train()
    for example in examples:
        ids = torch.tensor([example.input_ids])
        loss = peft_b(input_ids=ids, labels=torch.tensor([example.labels])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    lora_a = {n.split("layers.")[1]: p for n, p in model_a.named_parameters() if "lora_" in n}
    lora_b = {n.split("layers.")[1]: p for n, p in peft_b.named_parameters() if "lora_" in n}
    assert lora_a.keys() == lora_b.keys()
    # Same math, different float32 kernels (our fused softmax backward vs autograd's); Adam's
    # normalisation magnifies last-bit differences of near-zero gradients a little.
    for name in lora_a:
        torch.testing.assert_close(lora_a[name], lora_b[name], rtol=1e-3, atol=1e-4)


def test_token_normalization_is_the_mean_over_all_response_tokens():
    """``ce_normalization="token"`` gives Hugging Face's batch loss (mean over every label
    token), while the default averages per example first; rows of unequal length tell them
    apart."""
    model, tokenizer, spec = fresh_model()
    conversations = [
        Conversation(
            line=i + 1,
            messages=[Message("user", "hello?"), Message("assistant", "ok " * (1 + 9 * i))],
        )
        for i in range(3)
    ]
    examples, _ = tokenize_conversations(conversations, tokenizer, max_seq_len=256)
    cfg_token = config(regularizer=preset_config("off"), ce_normalization="token", shuffle=False)
    cfg_example = config(regularizer=preset_config("off"), shuffle=False)
    torch.manual_seed(0)
    peft_model = training._attach_lora(model, spec, cfg_token)
    batch = first_batch(examples, cfg_token, tokenizer.pad_token_id)
    zeros, ones = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        token_loss, _ = _batch_loss(peft_model, batch, zeros, ones, cfg_token)
        example_loss, _ = _batch_loss(peft_model, batch, zeros, ones, cfg_example)
        hf_labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
        hf_loss = peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=hf_labels
        ).loss
    torch.testing.assert_close(token_loss, hf_loss, rtol=1e-4, atol=1e-5)
    assert abs(float(example_loss) - float(hf_loss)) > 1e-3


def test_token_share_weights_average_to_one_over_rows_with_tokens():
    rows = torch.tensor([0, 0, 0, 2])
    weights = training.token_share_weights(rows, 3)
    torch.testing.assert_close(weights, torch.tensor([1.5, 0.0, 0.5]))


def test_fused_head_and_logits_paths_give_the_same_loss_and_gradients(monkeypatch):
    """The loop folds a plain output head into the loss; a model whose head it must leave
    alone (soft-capped logits, say) goes through logits. Both must train the same."""
    model, tokenizer, spec = fresh_model()
    examples = make_examples(tokenizer, n=4, risky_every=2)
    cfg = config(regularizer=preset_config("adaptive"), shuffle=False)
    torch.manual_seed(0)
    peft_model = training._attach_lora(model, spec, cfg)
    with torch.no_grad():  # a non-zero adapter, so the reference and the policy differ
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = first_batch(examples, cfg, tokenizer.pad_token_id)
    betas, weights = torch.tensor([0.9, 0.0, 0.9, 0.0]), torch.tensor([0.1, 1.0, 0.1, 1.0])
    base = peft_model.get_base_model()
    assert training._fused_head_weight(base) is not None

    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(training, "_fused_head_weight", lambda _base: None)
        peft_model.zero_grad(set_to_none=True)
        loss, stats = _batch_loss(peft_model, batch, betas, weights, cfg)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), stats, grads))
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    assert stats_a.kl > 0 and stats_a.kl == pytest.approx(stats_b.kl, rel=1e-4)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_heads_that_transform_logits_are_not_fused():
    model, _, _ = fresh_model()
    model.requires_grad_(False)  # as under LoRA
    assert training._fused_head_weight(model) is model.get_output_embeddings().weight
    model.config.final_logit_softcapping = 30.0
    assert training._fused_head_weight(model) is None
    model.config.final_logit_softcapping = None
    model.get_output_embeddings().weight.requires_grad_(True)
    assert training._fused_head_weight(model) is None


def test_gradient_accumulation_matches_one_large_batch():
    model_a, tokenizer, spec = fresh_model()
    model_b, _, _ = fresh_model()
    examples = make_examples(tokenizer, n=8, risky_every=3)
    train(model_a, spec, examples, config(batch_size=4, max_steps=1), pad_token_id=0)
    train(
        model_b,
        spec,
        examples,
        config(batch_size=2, grad_accum_steps=2, max_steps=1),
        pad_token_id=0,
    )
    for (name, a), (_, b) in zip(
        model_a.named_parameters(), model_b.named_parameters(), strict=True
    ):
        if "lora_" in name:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resumed_run_ends_at_the_same_loss_as_an_uninterrupted_one(tmp_path):
    model, tokenizer, spec = fresh_model()
    examples = make_examples(tokenizer, n=12, risky_every=3)
    reg = RegularizerConfig(schedule="adaptive", ema=0.5)
    cfg = config(regularizer=reg, max_steps=6, checkpoint_every=2, epochs=1)
    full = train(
        model,
        spec,
        examples,
        cfg,
        pad_token_id=tokenizer.pad_token_id,
        checkpointer=DirectoryCheckpointer(tmp_path / "full"),
    )

    # Stop after 3 steps: the newest checkpoint is then step 2, so one step is redone.
    steps_seen: list[int] = []
    model, _, _ = fresh_model()
    stopped = train(
        model,
        spec,
        examples,
        cfg,
        pad_token_id=tokenizer.pad_token_id,
        checkpointer=DirectoryCheckpointer(tmp_path / "ckpt"),
        progress=lambda s: steps_seen.append(s.step),
        should_stop=lambda: len(steps_seen) >= 3,
    )
    assert stopped.cancelled and stopped.steps == 3 and stopped.adapter_dir is None

    model, _, _ = fresh_model()
    resumed = train(
        model,
        spec,
        examples,
        cfg,
        pad_token_id=tokenizer.pad_token_id,
        checkpointer=DirectoryCheckpointer(tmp_path / "ckpt"),
        out_dir=tmp_path / "adapter",
    )
    assert resumed.resumed_from == 2
    assert [s.step for s in resumed.history] == [3, 4, 5, 6]
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-5, abs=1e-6)
    for mine, theirs in zip(resumed.history, full.history[2:], strict=True):
        assert mine.loss == pytest.approx(theirs.loss, rel=1e-5, abs=1e-6)
        assert mine.lr == pytest.approx(theirs.lr)


def recording_schedule(monkeypatch):
    """Wrap the loop's beta schedule so every (risk, betas, sft weights) it returns is kept."""
    seen: list[tuple[list[float], list[float]]] = []
    real = training.make_schedule

    def make(config):
        schedule = real(config)

        def call(risk):
            betas, weights = schedule(risk)
            seen.append((betas.tolist(), weights.tolist()))
            return betas, weights

        return call

    monkeypatch.setattr(training, "make_schedule", make)
    return seen


@pytest.mark.parametrize(
    ("regularizer", "grad_accum"),
    [
        (preset_config("paper"), 1),
        (RegularizerConfig(schedule="adaptive", ema=0.5, risk_threshold=0.3), 2),
    ],
)
def test_beta_plan_is_what_the_loop_trains_with(monkeypatch, regularizer, grad_accum):
    """Rows, betas and SFT weights of every micro-batch, over two epochs, EMA state included."""
    model, tokenizer, spec = fresh_model()
    examples = make_examples(tokenizer, n=10, risky_every=3)
    risks = [0.05 * i for i in range(10)]
    cfg = config(regularizer=regularizer, batch_size=3, max_steps=5, grad_accum_steps=grad_accum)
    rows: list[list[int]] = []
    real_collate = training.collate

    def collate(batch, pad_token_id, *, indices):
        rows.append(list(indices))
        return real_collate(batch, pad_token_id, indices=indices)

    monkeypatch.setattr(training, "collate", collate)
    plan = beta_plan(len(examples), cfg, risks)
    seen = recording_schedule(monkeypatch)
    train(model, spec, examples, cfg, pad_token_id=tokenizer.pad_token_id, risks=risks)
    assert len(plan) == 5 * grad_accum == len(seen)
    assert [list(b.indices) for b in plan] == rows
    assert [(list(b.betas), list(b.sft_weights)) for b in plan] == seen
    assert len({i for b in plan for i in b.indices}) == 10  # it went past the first epoch


def test_runs_with_equal_plans_train_the_same_adapter():
    """`adaptive` with every risk under its threshold plans exactly what `off` does (beta 0,
    weight 1 everywhere), so the two adapters are bit for bit the same; a plan with any row
    pulled differs, and so does its adapter."""
    _, tokenizer, spec = fresh_model()
    examples = make_examples(tokenizer, n=8)
    low, high = [0.1] * 8, [0.1] * 7 + [0.8]
    off, adaptive = config(regularizer=preset_config("off")), config()
    assert beta_plan(8, off, low) == beta_plan(8, adaptive, low)
    assert beta_plan(8, off, high) != beta_plan(8, adaptive, high)

    def lora_weights(cfg, risks):
        model, _, _ = fresh_model()
        train(model, spec, examples, cfg, pad_token_id=tokenizer.pad_token_id, risks=risks)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    plain = lora_weights(off, low)
    same, pulled = lora_weights(adaptive, low), lora_weights(adaptive, high)
    assert all(torch.equal(plain[n], same[n]) for n in plain)
    assert not all(torch.equal(plain[n], pulled[n]) for n in plain)


def test_beta_plan_refuses_mismatched_risks():
    with pytest.raises(ValueError, match="3 risks for 4 examples"):
        beta_plan(4, config(), [0.0, 0.0, 0.0])


def test_adapter_directory_reloads_with_peft(tmp_path):
    model, tokenizer, spec = fresh_model()
    examples = make_examples(tokenizer, risky_every=2)
    result = train(
        model,
        spec,
        examples,
        config(),
        pad_token_id=tokenizer.pad_token_id,
        out_dir=tmp_path / "adapter",
    )
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    base, _, _ = fresh_model()
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir)
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_progress_reports_every_step():
    model, tokenizer, spec = fresh_model()
    seen = []
    train(
        model,
        spec,
        make_examples(tokenizer, risky_every=2),
        config(max_steps=3),
        pad_token_id=tokenizer.pad_token_id,
        progress=seen.append,
    )
    assert [s.step for s in seen] == [1, 2, 3]
    assert all(s.total_steps == 3 and s.tokens > 0 and s.tokens_per_s > 0 for s in seen)
    assert all(0 < s.beta_max <= 0.9 and 0 <= s.risk_mean <= 1 for s in seen)


def test_empty_dataset_is_refused():
    model, _, spec = fresh_model()
    with pytest.raises(ValueError, match="no training examples"):
        train(model, spec, [], config(), pad_token_id=0)


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match=r"checkpoint_every \(5\) exceeds max_steps \(2\)"):
        TrainingConfig(max_steps=2, checkpoint_every=5)
    assert copy.deepcopy(TrainingConfig()).lora.dropout == 0.0
