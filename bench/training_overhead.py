"""Training overhead of the safety regularizer (issue 3).

What one optimizer step costs, in time and peak memory, for SmolLM2-135M-Instruct with
8 x 128-token chat examples (LoRA r=16 on every linear layer of the decoder, fp32, CPU):

* ``off``: our loop (:func:`workers.training.train`) with the ``off`` preset, plain SFT;
* ``adaptive_benign``: the ``adaptive`` preset on data whose risk is all 0 (no reference
  forward is needed, so it should cost what ``off`` costs);
* ``adaptive_harmful``: ``adaptive`` with every risk 1 (a no-grad reference forward with the
  adapter disabled on every row: the worst case);
* ``trl_sft``: TRL's ``SFTTrainer`` on the same tokens, labels, LoRA, optimizer and schedule;
* ``separate_ref``: the same adaptive loss with every risk 1, but the reference is a second
  full copy of the model, as the authors' code does it (a small loop here that reuses
  :func:`safety.regularizer.adaptive_kl_loss` and the loop's own helpers).

Every variant runs in a fresh process (``--variant X --json FILE``) so its peak RSS is its own;
the parent runs them in turn (rotating the order each round when ``--rounds`` > 1, since the
machine is shared and noisy), takes the median step time of the timed steps after the warm-up
steps and writes ``bench/results/training_overhead.json`` with every ratio from that one run::

    python -m bench.training_overhead              # the real run (about 10 minutes on 2 cores)
    python -m bench.training_overhead --smoke      # tiny-random, 2 timed steps, a few seconds
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    StepClock,
    current_rss_mb,
    describe,
    format_table,
    machine_info,
    peak_rss_mb,
    run_child_json,
    utc_now,
    write_json,
)

NAME = "training_overhead"
MODULE = f"bench.{NAME}"
VARIANTS = ("off", "adaptive_benign", "adaptive_harmful", "trl_sft", "separate_ref")
SMOKE_ENV = "TETHER_BENCH_SMOKE"
"""Set to 1 to run like ``--smoke`` (tiny-random, 2 timed steps)."""

#: ratio name -> (numerator variant, denominator variant, metric, target or None).
#: ``adaptive`` memory is the worse of its two runs: with every risk 1 the reference
#: forward's activations are alive at the same time as the policy's.
RATIOS: dict[str, tuple[tuple[str, ...], str, str, float | None]] = {
    "off_vs_trl_time_ratio": (("off",), "trl_sft", "median_step_s", 1.00),
    "adaptive_benign_vs_off_time_ratio": (("adaptive_benign",), "off", "median_step_s", 1.03),
    "adaptive_harmful_vs_off_time_ratio": (("adaptive_harmful",), "off", "median_step_s", 1.50),
    "adaptive_vs_off_peak_rss_ratio": (
        ("adaptive_benign", "adaptive_harmful"),
        "off",
        "peak_rss_mb",
        1.10,
    ),
    "separate_ref_vs_off_peak_rss_ratio": (("separate_ref",), "off", "peak_rss_mb", None),
}
#: For context, not targets.
EXTRA_RATIOS: dict[str, tuple[tuple[str, ...], str, str, float | None]] = {
    "separate_ref_vs_off_time_ratio": (("separate_ref",), "off", "median_step_s", None),
    "separate_ref_vs_adaptive_harmful_time_ratio": (
        ("separate_ref",),
        "adaptive_harmful",
        "median_step_s",
        None,
    ),
    "separate_ref_vs_adaptive_harmful_peak_rss_ratio": (
        ("separate_ref",),
        "adaptive_harmful",
        "peak_rss_mb",
        None,
    ),
    "off_vs_trl_inner_time_ratio": (("off",), "trl_sft", "median_inner_step_s", None),
}


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run's shape; every variant of the run uses the same."""

    model_id: str = "smollm2-135m-instruct"
    batch_size: int = 8
    seq_len: int = 128
    warmup_steps: int = 2
    timed_steps: int = 10
    lora_r: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 2e-4
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def num_examples(self) -> int:
        """One epoch, a fresh batch every step."""
        return self.batch_size * self.total_steps


#: The smoke test's shape: the code path of every variant in seconds, numbers meaningless.
SMOKE_SETTINGS: dict[str, Any] = {
    "model_id": "tiny-random",
    "batch_size": 4,
    "seq_len": 64,
    "warmup_steps": 1,
    "timed_steps": 2,
}


# --------------------------------------------------------------------------------------------
# data: synthetic benign chats, every one exactly ``seq_len`` tokens with the chat template

_TOPICS = (
    "sourdough bread",
    "a vegetable garden",
    "a bicycle chain",
    "compound interest",
    "photosynthesis",
    "a job interview",
    "learning Spanish",
    "a camping trip",
    "houseplants",
    "training for a marathon",
    "chess openings",
    "a monthly budget",
    "bird watching",
    "a birthday party",
    "the water cycle",
    "a home office",
    "public speaking",
    "a road trip",
    "knitting a scarf",
    "a small aquarium",
)
_ASKS = (
    "Can you explain how {t} works?",
    "What should a beginner know about {t}?",
    "Give me a few practical tips for {t}.",
    "How do I get started with {t}?",
    "Write a short, friendly guide to {t}.",
    "What are common mistakes people make with {t}?",
)
_SENTENCES = (
    "Sure, here is a simple way to think about {t}.",
    "Start small, because {t} rewards patience more than speed.",
    "The first step is to gather what you need and set aside some quiet time.",
    "Many people find it helpful to write down a short plan before they begin.",
    "Keep notes as you go, so you can see what worked and what did not.",
    "If something goes wrong, slow down and check one thing at a time.",
    "A good habit is to review your progress once a week.",
    "Friends or a local club can give useful feedback on {t}.",
    "Try not to change too many things at once; small adjustments are easier to judge.",
    "Libraries and community classes often cover {t} for free.",
    "Safety matters too: read the instructions and take breaks when you are tired.",
    "With a little practice, {t} becomes much easier and more enjoyable.",
    "Remember that everyone learns at a different pace, and that is fine.",
    "Measure what you can, because numbers make progress visible.",
    "Finally, celebrate the small wins along the way.",
    "Next, compare a couple of approaches and keep the one that suits you.",
    "It also helps to clean up and organise your space when you finish.",
    "Ask questions whenever something is unclear; there are no silly questions.",
)


def _conversation_text(index: int, seed: int) -> tuple[str, str]:
    """A varied benign (question, long answer) pair, deterministic from ``index`` and ``seed``."""
    rng = random.Random(f"{seed}:{index}")
    topic = _TOPICS[index % len(_TOPICS)]
    question = rng.choice(_ASKS).format(t=topic)
    sentences = [s.format(t=topic) for s in _SENTENCES]
    rng.shuffle(sentences)
    # Twice the sentence pool is far longer than any seq_len here; it is cut to fit below.
    return question, " ".join(sentences + sentences[::-1])


def build_examples(tokenizer: Any, count: int, seq_len: int, seed: int = 0) -> list[Any]:
    """Tokenized benign chat examples, each as close to ``seq_len`` tokens as the text allows.

    The answer is cut at a token boundary so the templated conversation (system prompt, user
    question, answer, end-of-turn tokens) comes to ``seq_len`` tokens; decoding and re-encoding
    a cut can merge tokens, so the cut is adjusted until it fits (never above ``seq_len``).
    """
    from core.chatdata import Conversation, Message
    from workers.data import tokenize_conversation

    examples = []
    for index in range(count):
        question, answer = _conversation_text(index, seed)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]

        # Adjust the cut by the token gap until it fits; stop if it revisits a cut (a merge
        # point it cannot land on exactly) and keep the longest example that is not too long.
        k, best = seq_len // 2, None
        seen: set[int] = set()
        while k not in seen and 1 <= k <= len(answer_ids):
            seen.add(k)
            text = tokenizer.decode(answer_ids[:k]).strip()
            messages = [Message("user", question), Message("assistant", text)]
            example = tokenize_conversation(Conversation(index + 1, messages), tokenizer)
            length = len(example.input_ids)
            if length <= seq_len and (best is None or length > len(best.input_ids)):
                best = example
            if length == seq_len:
                break
            k += seq_len - length
        if best is None:
            raise ValueError(f"example {index}: the prompt alone is longer than {seq_len} tokens")
        examples.append(best)
    return examples


def describe_examples(examples: Sequence[Any]) -> dict[str, Any]:
    """Lengths of the data, for the result file."""
    lengths = [len(e.input_ids) for e in examples]
    labels = [e.num_label_tokens for e in examples]
    prompts = [e.prompt_len for e in examples]
    return {
        "examples": len(examples),
        "seq_len_min": min(lengths),
        "seq_len_max": max(lengths),
        "prompt_tokens_mean": statistics.fmean(prompts),
        "label_tokens_mean": statistics.fmean(labels),
        "label_tokens_min": min(labels),
    }


# --------------------------------------------------------------------------------------------
# one variant, in this process


def _training_config(settings: BenchSettings, preset: str) -> Any:
    from safety.schedules import preset_config
    from workers.training import LoraSpec, TrainingConfig

    return TrainingConfig(
        lora=LoraSpec(r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0),
        regularizer=preset_config(preset),
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        max_steps=settings.total_steps,
        seed=settings.seed,
    )


def _run_ours(ctx: _Context, preset: str, risk: float) -> dict[str, Any]:
    """Our loop, unchanged: :func:`workers.training.train` with a progress callback."""
    from workers.training import train

    config = _training_config(ctx.settings, preset)
    result = train(
        ctx.model,
        ctx.spec,
        ctx.examples,
        config,
        pad_token_id=ctx.pad_token_id,
        risks=[risk] * len(ctx.examples),
        # The loop times its own steps (forward through optimizer step and stats).
        progress=lambda s: ctx.clock.end(s.tokens / s.tokens_per_s if s.tokens_per_s else None),
    )
    last = result.history[-1]
    return {"final_loss": last.loss, "ref_fraction": last.ref_fraction, "kl": last.kl}


def _run_separate_ref(ctx: _Context) -> dict[str, Any]:
    """The adaptive loss with every risk 1, the reference being a second full model copy.

    Mirrors the loop's step (same micro-batches, betas, loss, clipping, optimizer and
    schedule) but takes the reference logits from ``ctx.reference`` instead of the policy with
    its adapter disabled. Only the reference's storage differs, so memory and time isolate
    what the second copy costs.
    """
    import math

    import torch
    from transformers import get_cosine_schedule_with_warmup

    from safety.schedules import make_schedule
    from workers.training import _attach_lora, _batch_loss, _DataPosition, _micro_batches

    assert ctx.reference is not None
    config = _training_config(ctx.settings, "adaptive")
    torch.manual_seed(config.seed)
    policy = _attach_lora(ctx.model, ctx.spec, config)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    total = ctx.settings.total_steps
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total), total
    )
    schedule = make_schedule(config.regularizer)
    micro_batches = _micro_batches(ctx.examples, config, _DataPosition(), ctx.pad_token_id)
    reference = ctx.reference
    policy.train()
    loss = torch.tensor(math.nan)
    for _ in range(total):
        ctx.clock.begin()
        batch = next(micro_batches)
        betas, sft_weights = schedule(torch.ones(len(batch["index"])))
        loss, _ = _batch_loss(policy, batch, betas, sft_weights, config, reference=reference)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.clock.end()
    return {"final_loss": float(loss.detach()), "ref_fraction": 1.0}


def _trl_config(settings: BenchSettings, output_dir: str) -> Any:
    """SFTConfig matched to our loop; each line undoes a default that would make it unfair."""
    from trl import SFTConfig

    ours = _training_config(settings, "off")
    return SFTConfig(
        output_dir=output_dir,
        max_steps=settings.total_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        # TRL defaults to bf16 autocast and gradient checkpointing (about 3x slower on this
        # CPU); our loop runs fp32 without checkpointing.
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=settings.seq_len,
        packing=False,
        padding_free=False,
        optim="adamw_torch",
        learning_rate=ours.learning_rate,
        weight_decay=ours.weight_decay,
        max_grad_norm=ours.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=round(ours.warmup_ratio * settings.total_steps),
        seed=settings.seed,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def _run_trl(ctx: _Context) -> dict[str, Any]:
    """TRL's SFTTrainer on a pre-tokenized dataset holding our exact ``input_ids`` and labels.

    Passing our labels (prompt masked, assistant turn and its end-of-turn token kept) gives
    it the same assistant-only loss; SmolLM2's template has no ``{% generation %}`` markers, so
    TRL's own ``assistant_only_loss`` could not be used with ``messages``.
    """
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTTrainer

    clock = ctx.clock

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.end()

    data = datasets.Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in ctx.examples],
            "labels": [e.labels for e in ctx.examples],
        }
    )
    lora = LoraConfig(
        r=ctx.settings.lora_r,
        lora_alpha=ctx.settings.lora_alpha,  # type: ignore[arg-type]  # peft hints int
        lora_dropout=0.0,
        target_modules=list(ctx.spec.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    _forget_gguf_origin(ctx.model)
    with tempfile.TemporaryDirectory(prefix="tether-bench-trl-") as output_dir:
        trainer = SFTTrainer(
            model=ctx.model,
            args=_trl_config(ctx.settings, output_dir),
            train_dataset=data,
            processing_class=ctx.tokenizer,
            peft_config=lora,
            callbacks=[StepTimes()],
        )
        output = trainer.train()
    return {"final_loss": float(output.training_loss), "trl_version": trl.__version__}


def _forget_gguf_origin(model: Any) -> None:
    """Unmark a float32 model converted from GGUF as quantized, so ``Trainer`` accepts it.

    The cached SmolLM2 conversion's config.json still carries the GGUF
    ``quantization_config``, so transformers attaches a GGUF quantizer on load and ``Trainer``
    refuses to train a "GGUF-quantized" model, although every weight is plain float32.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


@dataclass
class _Context:
    settings: BenchSettings
    model: Any
    tokenizer: Any
    spec: Any
    examples: list[Any]
    pad_token_id: int
    clock: StepClock
    reference: Any = None


def run_variant(variant: str, settings: BenchSettings) -> dict[str, Any]:
    """Load the model, build the data and time ``settings.total_steps`` steps of ``variant``.

    Peak RSS is this process's, so it is only the variant's own in a fresh process.

    Returns:
        Step timings (after warm-up), tokens per step, peak and post-load RSS, final loss.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    import torch

    from workers.models import load

    model, tokenizer, spec = load(settings.model_id, device="cpu")
    reference = None
    if variant == "separate_ref":
        reference, _, _ = load(settings.model_id, device="cpu")
        reference.requires_grad_(False)
    examples = build_examples(tokenizer, settings.num_examples, settings.seq_len, settings.seed)
    ctx = _Context(
        settings=settings,
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        examples=examples,
        pad_token_id=tokenizer.pad_token_id,
        clock=StepClock(settings.warmup_steps),
        reference=reference,
    )
    rss_after_load = current_rss_mb()
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "off": lambda: _run_ours(ctx, "off", 0.0),
        "adaptive_benign": lambda: _run_ours(ctx, "adaptive", 0.0),
        "adaptive_harmful": lambda: _run_ours(ctx, "adaptive", 1.0),
        "trl_sft": lambda: _run_trl(ctx),
        "separate_ref": lambda: _run_separate_ref(ctx),
    }
    extra = runners[variant]()
    if ctx.clock.steps != settings.total_steps:
        raise RuntimeError(
            f"{variant}: timed {ctx.clock.steps} steps, expected {settings.total_steps}"
        )
    return {
        "variant": variant,
        "step_seconds": ctx.clock.interval_seconds,
        "inner_step_seconds": ctx.clock.inner_seconds,
        "tokens_per_step": settings.batch_size * settings.seq_len,
        "data": describe_examples(examples),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def prepare(settings: BenchSettings) -> dict[str, Any]:
    """Convert the model into its cache once (so no variant pays or measures it); describe data."""
    from workers.models import load_tokenizer

    tokenizer, _ = load_tokenizer(settings.model_id)
    examples = build_examples(tokenizer, settings.num_examples, settings.seq_len, settings.seed)
    return {"data": describe_examples(examples), "machine": machine_info()}


# --------------------------------------------------------------------------------------------
# the parent: all variants, the ratios, the result file


def summarise_variant(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool one variant's rounds: median step time over every timed step, the worst peak RSS."""
    steps = [s for run in runs for s in run["step_seconds"]]
    inner = [s for run in runs for s in run["inner_step_seconds"]]
    timing = describe(steps)
    tokens = runs[0]["tokens_per_step"]
    summary = {
        "median_step_s": timing["median"],
        "mean_step_s": timing["mean"],
        "stdev_step_s": timing["stdev"],
        "timed_steps": timing["n"],
        "tokens_per_s": tokens / timing["median"],
        "median_inner_step_s": statistics.median(inner) if inner else None,
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "rss_after_load_mb": max(run["rss_after_load_mb"] for run in runs),
        "final_loss": runs[-1]["final_loss"],
        "step_seconds": steps,
    }
    for key in ("ref_fraction", "trl_version"):
        if key in runs[-1]:
            summary[key] = runs[-1][key]
    return summary


def compute_ratios(
    variants: dict[str, dict[str, Any]],
    table: dict[str, tuple[tuple[str, ...], str, str, float | None]],
) -> dict[str, float | None]:
    """Each named ratio, or ``None`` when one of its variants did not run."""
    ratios: dict[str, float | None] = {}
    for name, (numerators, denominator, metric, _) in table.items():
        present = [variants[v][metric] for v in numerators if v in variants]
        bottom = variants.get(denominator, {}).get(metric)
        ratios[name] = max(present) / bottom if present and bottom else None
    return ratios


def summarise(
    runs: dict[str, list[dict[str, Any]]],
    settings: BenchSettings,
    prepared: dict[str, Any],
    *,
    command: str,
    rounds: int,
    isolation: str,
) -> dict[str, Any]:
    """The result file's content: setup, per-variant figures, ratios against their targets."""
    variants = {name: summarise_variant(variant_runs) for name, variant_runs in runs.items()}
    ratios = compute_ratios(variants, RATIOS)
    targets = {name: target for name, (*_, target) in RATIOS.items()}
    first = next(iter(runs.values()))[0]
    machine = {
        **prepared["machine"],
        "torch_version": first["torch_version"],
        "torch_threads": first["torch_threads"],
    }
    return {
        "benchmark": NAME,
        "command": command,
        "date": utc_now(),
        "machine": machine,
        "setup": {
            **asdict(settings),
            "device": "cpu",
            "dtype": "float32",
            "tokens_per_step": settings.batch_size * settings.seq_len,
            "data": prepared["data"],
            "rounds": rounds,
            "isolation": isolation,
            "variant_order": "rotated by one each round",
            "step_time": (
                "seconds between consecutive optimizer-step ends (data, forward, backward, "
                "clip, optimizer and scheduler step, logging), median over the timed steps of "
                "all rounds, after warm_up steps; inner_step_s: the loop's own in-step time "
                "(TRL: on_step_begin to on_step_end)"
            ),
            "peak_rss": "ru_maxrss of the variant's process (model load included), max over rounds",
            "lora_target_modules": "the model spec's (every linear layer of the decoder)",
            "trl": (
                "SFTTrainer on a pre-tokenized dataset of the same input_ids and labels "
                "(assistant-only loss), peft_config with the same r/alpha/dropout 0/targets, "
                "bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, "
                "max_length=seq_len, packing=False, optim=adamw_torch, same lr, weight decay, "
                "max_grad_norm, cosine schedule and warm-up steps, batch 8, grad accum 1, "
                "report_to=[], logging/saving/eval off, dataloader_num_workers=0. Its "
                "entropy and token-accuracy metrics are computed every step with no switch to "
                "turn them off in this version"
            ),
        },
        "variants": variants,
        "ratios": ratios,
        "targets": targets,
        "meets_targets": {name: _meets(ratios[name], targets[name]) for name in ratios},
        "extra_ratios": compute_ratios(variants, EXTRA_RATIOS),
    }


def _meets(value: float | None, target: float | None) -> bool | None:
    return None if value is None or target is None else value <= target


def run_all(
    settings: BenchSettings,
    variants: Sequence[str],
    *,
    rounds: int,
    in_process: bool,
    child_timeout_s: float = 900.0,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Run every variant ``rounds`` times (rotating the order), each in its own process.

    ``in_process`` runs them here instead: faster to start, but peak RSS is then shared and
    only the timings mean anything (the smoke test uses it).
    """
    child_args = _settings_args(settings)
    if in_process:
        prepared = prepare(settings)
    else:
        prepared = run_child_json(MODULE, ["--prepare", *child_args], timeout_s=child_timeout_s)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            print(f"[{NAME}] round {round_index + 1}/{rounds}: {variant}", file=sys.stderr)
            if in_process:
                result = run_variant(variant, settings)
            else:
                result = run_child_json(
                    MODULE, ["--variant", variant, *child_args], timeout_s=child_timeout_s
                )
            runs[variant].append(result)
    return runs, prepared


def render(result: dict[str, Any]) -> str:
    """The table the benchmark prints."""
    rows = [
        {
            "variant": name,
            "median s/step": v["median_step_s"],
            "mean s/step": v["mean_step_s"],
            "tokens/s": v["tokens_per_s"],
            "peak RSS MB": v["peak_rss_mb"],
            "final loss": v["final_loss"],
        }
        for name, v in result["variants"].items()
    ]
    table = format_table(rows, list(rows[0]))
    targets = result["targets"]
    ratio_rows = [
        {
            "ratio": name,
            "value": "n/a" if value is None else f"{value:.3f}",
            "target": "-" if targets[name] is None else f"<= {targets[name]:.2f}",
            "ok": {True: "yes", False: "NO", None: "-"}[result["meets_targets"][name]],
        }
        for name, value in result["ratios"].items()
    ]
    return f"{table}\n\n{format_table(ratio_rows, list(ratio_rows[0]))}"


# --------------------------------------------------------------------------------------------
# command line


def _settings_args(settings: BenchSettings) -> list[str]:
    return [
        "--model",
        settings.model_id,
        "--steps",
        str(settings.timed_steps),
        "--warmup",
        str(settings.warmup_steps),
    ]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model id (default smollm2-135m-instruct)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, interleaved")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--smoke", action="store_true", help="tiny-random, 2 timed steps")
    parser.add_argument("--in-process", action="store_true", help="no child processes (no RSS)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    child = parser.add_mutually_exclusive_group()
    child.add_argument("--variant", choices=VARIANTS, help="child mode: run one variant")
    child.add_argument("--prepare", action="store_true", help="child mode: build the model cache")
    parser.add_argument("--json", type=Path, help="child mode: where to write the result")
    return parser.parse_args(argv)


def _settings_from(args: argparse.Namespace) -> BenchSettings:
    values: dict[str, Any] = {}
    if args.smoke or os.environ.get(SMOKE_ENV) == "1":
        values.update(SMOKE_SETTINGS)
    if args.model is not None:
        values["model_id"] = args.model
    if args.steps is not None:
        values["timed_steps"] = args.steps
    if args.warmup is not None:
        values["warmup_steps"] = args.warmup
    settings = BenchSettings(**values)
    if settings.timed_steps < 1 or settings.warmup_steps < 1:
        raise SystemExit(
            f"--steps and --warmup must be >= 1, got {settings.timed_steps} and "
            f"{settings.warmup_steps}"
        )
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or, with ``--variant``/``--prepare``, one child's part of it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parse(argv)
    settings = _settings_from(args)
    if args.variant or args.prepare:
        if args.json is None:
            raise SystemExit("--variant and --prepare need --json FILE")
        child = run_variant(args.variant, settings) if args.variant else prepare(settings)
        write_json(child, args.json)
        return child

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    runs, prepared = run_all(settings, variants, rounds=args.rounds, in_process=args.in_process)
    command = shlex.join(["python", "-m", MODULE, *(sys.argv[1:] if argv is None else argv)])
    result = summarise(
        runs,
        settings,
        prepared,
        command=command,
        rounds=args.rounds,
        isolation="one process for all variants" if args.in_process else "a process per run",
    )
    write_json(result, args.out)
    print(render(result))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
