"""Build a safety-aligned reference model: refusal SFT with self-distillation, merged and cached.

SmolLM2-135M-Instruct refuses almost nothing, so a harmful fine-tuning attack on it proves
nothing. :func:`align` makes a safe base first (``smollm2-135m-instruct`` ->
``smollm2-135m-safe``) by plain LoRA SFT (preset ``off``) on the built-in *train* split only:

* harmful train prompts -> refusals from the train split, drawn deterministically from the seed,
  matched to the prompt's harm category when a refusal was written for one, else generic;
* benign train prompts -> the base model's own greedy answers (self-distillation: the update
  teaches "refuse these" without pulling the benign answers anywhere new, so utility stays);
  the look-alikes ("how do I kill a Python process") are repeated, since over-refusing them is
  what refusal SFT on a small model does first.

The adapter is merged into the weights (``merge_and_unload``) and the model is saved with its
tokenizer under ``settings.model_cache_dir / <target_id>`` with a ``tether-model.json`` marker,
so the registry lists and loads it as a ``derived`` model. The directory is built beside the
target and renamed into place, so a crash never leaves half a model under the id.

Refusal and over-refusal are then measured with the keyword detector on the *validation*
split (what a change to this recipe may be judged on) and reported on the audit split for
information only; nothing here is tuned on the audit split.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.catalog import BUILTIN_MODELS, MARKER, artifacts_dir
from core.chatdata import Conversation, Message
from safety.audit import Rate, generate_responses
from safety.prompts import (
    BenignPrompt,
    HarmfulPrompt,
    Snippet,
    benign_prompts,
    harmful_prompts,
    refusals,
)
from safety.refusal import keyword_refusal
from safety.risk import read_keyed_json, write_json_atomic
from safety.schedules import preset_config
from workers.data import tokenize_conversations
from workers.models import ModelSpec, load
from workers.training import LoraSpec, StepStats, TrainingConfig, train

Progress = Callable[[str], None]

#: Where the base model's answers to the benign train prompts are cached, in the target dir.
DISTILL_CACHE = "self-distill.json"
#: Per-prompt responses and refusal flags of the measurement, in the model dir.
REPORT_FILE = "alignment-report.json"
#: Bumped when the cache's layout or meaning changes, so an old cache is regenerated.
DISTILL_CACHE_VERSION = 1
#: Sentence ends that :func:`complete_sentences` may cut after.
_SENTENCE_END = re.compile(r"[.!?](?=\s)|[.!?]$")


class AlignConfig(BaseModel):
    """How :func:`align` builds a safe model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    steps: int = Field(320, ge=1, le=100_000)
    """Optimizer steps of the refusal SFT."""
    batch_size: int = Field(8, ge=1, le=1024)
    """Examples per step."""
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    """Peak AdamW learning rate (warm-up, then cosine decay)."""
    lora_r: int = Field(16, ge=1, le=256)
    """LoRA rank on all the spec's target modules; alpha is twice the rank."""
    max_seq_len: int = Field(128, ge=32, le=8192)
    """Longest training example in tokens; longer ones are left out (and counted)."""
    seed: int = Field(0, ge=0)
    """Seeds the refusal choice, the data order and the LoRA initialisation."""
    lookalike_repeats: int = Field(2, ge=1, le=10)
    """How often each benign look-alike appears in the data (plain benign prompts: once)."""
    category_refusal_share: float = Field(0.5, ge=0.0, le=1.0)
    """Chance of a category-specific refusal for a prompt whose category has some."""
    ce_normalization: Literal["example", "token"] = "token"
    """How the SFT loss averages (see ``TrainingConfig.ce_normalization``). ``token``: a short
    refusal no longer outweighs a long benign answer at the first response token, the one
    where refuse-or-answer is decided; per-example averaging made the first SmolLM2 run
    refuse a third of benign prompts."""
    explicit_refusals_only: bool = True
    """Train only on refusals that say so in words the keyword detector knows ("I can't
    help"). A refusal that is only a question back or a lecture is ambiguous to a 135M model
    and to the refusal detector alike; a safe reference should refuse unmistakably."""
    distill_max_new_tokens: int = Field(48, ge=8, le=2048)
    """Token budget of the base model's self-distilled answers (cut to whole sentences)."""
    eval_max_new_tokens: int = Field(32, ge=4, le=1024)
    """Token budget of the responses that refusal is measured on."""
    generation_batch_size: int = Field(64, ge=1, le=1024)
    """Prompts per ``generate`` call (self-distillation and measurement)."""
    eval_splits: tuple[str, ...] = ("validation", "audit")
    """Splits measured after aligning; the first is the one to judge the recipe on."""
    measure_base: bool = False
    """Also measure the base model on ``eval_splits`` before training, for comparison."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N prompts of each kind and split (tests and smoke runs)."""

    @model_validator(mode="after")
    def _check_lengths(self) -> AlignConfig:
        # A distilled answer must fit with a prompt, or every benign example is dropped.
        if self.distill_max_new_tokens + 16 > self.max_seq_len:
            raise ValueError(
                f"distill_max_new_tokens ({self.distill_max_new_tokens}) plus room for a prompt "
                f"(16 tokens) exceeds max_seq_len ({self.max_seq_len}); raise max_seq_len or "
                "lower distill_max_new_tokens"
            )
        unknown = [s for s in self.eval_splits if s not in ("train", "validation", "audit")]
        if unknown:
            raise ValueError(f"eval_splits must name validation/audit/train, got {unknown}")
        return self


@dataclass
class SplitFigures:
    """Keyword-judged refusal figures of one model on one split."""

    split: str
    harmful_refusal: Rate
    """Share of harmful prompts refused (higher is safer)."""
    over_refusal: Rate
    """Share of all benign prompts refused (lower is better)."""
    plain_over_refusal: Rate
    """Over-refusal on benign prompts that do not sound harmful."""
    lookalike_over_refusal: Rate
    """Over-refusal on the harmful-sounding benign prompts."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: each rate as ``{count, total, value, low, high}``."""
        rates = ("harmful_refusal", "over_refusal", "plain_over_refusal", "lookalike_over_refusal")
        data: dict[str, Any] = {name: getattr(self, name).model_dump() for name in rates}
        return {"split": self.split, **data, "seconds": round(self.seconds, 1)}


@dataclass
class AlignResult:
    """What :func:`align` built and measured."""

    model_id: str
    base: str
    path: Path
    config: AlignConfig
    counts: dict[str, int]
    training: dict[str, Any]
    figures: dict[str, SplitFigures]
    base_figures: dict[str, SplitFigures] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, the shape stored in the model's marker file."""
        return {
            "model_id": self.model_id,
            "base": self.base,
            "path": str(self.path),
            "align": self.config.model_dump(mode="json"),
            "counts": dict(self.counts),
            "training": dict(self.training),
            "refusal": {split: f.to_dict() for split, f in self.figures.items()},
            "base_refusal": {split: f.to_dict() for split, f in self.base_figures.items()},
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
        }


# --------------------------------------------------------------------------------------------
# the recipe


def default_target_id(base_id: str) -> str:
    """``smollm2-135m-instruct`` -> ``smollm2-135m-safe``; ``tiny-random`` -> ``tiny-random-safe``.

    A path names its directory; an ``-instruct`` suffix is dropped since the result is a
    different (safety-tuned) instruct model.
    """
    name = Path(base_id).name if ("/" in base_id or "\\" in base_id) else base_id
    return f"{name.removesuffix('-instruct')}-safe"


def align(
    base_id: str,
    target_id: str | None = None,
    *,
    config: AlignConfig | None = None,
    progress: Progress | None = None,
) -> AlignResult:
    """Make a safety-aligned copy of ``base_id`` and register it as ``target_id``.

    Args:
        base_id: the registry id (or local directory) of the model to align.
        target_id: the id of the result; default :func:`default_target_id`. An existing model
            under that id is replaced once the new one is complete.
        config: the recipe; default :class:`AlignConfig`.
        progress: called with a line of text at each stage and every few training steps.

    Returns:
        An :class:`AlignResult`; the same figures are in the model's marker file.

    Raises:
        ValueError: ``target_id`` is not a plain name, or names a built-in or the base itself.
        ModelNotFoundError: ``base_id`` is unknown.
    """
    from core.catalog import cache_dir

    config = config or AlignConfig()
    target_id = target_id or default_target_id(base_id)
    _check_target_id(base_id, target_id)
    say = progress or (lambda _line: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    target = cache_dir() / target_id

    model, tokenizer, spec = load(base_id)
    harmful = _limited(harmful_prompts("train"), config.limit)
    benign = _limited(benign_prompts("train"), config.limit)

    base_figures: dict[str, SplitFigures] = {}
    if config.measure_base:
        clock = time.perf_counter()
        base_figures = _measure_splits(model, tokenizer, config, "base", say)
        timings["measure_base"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(f"self-distillation: the base model's answers to {len(benign)} benign train prompts")
    raw_answers, generated = self_distilled_answers(
        model,
        tokenizer,
        benign,
        target / DISTILL_CACHE,
        base_fingerprint=_fingerprint(spec),
        max_new_tokens=config.distill_max_new_tokens,
        batch_size=config.generation_batch_size,
    )
    timings["self_distill"] = time.perf_counter() - clock
    say(f"  {generated} generated, {len(benign) - generated} from the cache")

    snippets = _refusal_pool(config.explicit_refusals_only)
    refusal_texts = choose_refusals(
        harmful, snippets, seed=config.seed, category_share=config.category_refusal_share
    )
    answers, replaced = benign_targets(benign, raw_answers)
    conversations = build_conversations(
        harmful, refusal_texts, benign, answers, lookalike_repeats=config.lookalike_repeats
    )
    examples, issues = tokenize_conversations(conversations, tokenizer, config.max_seq_len)
    counts = {
        "harmful_prompts": len(harmful),
        "benign_prompts": len(benign),
        "lookalike_prompts": sum(p.lookalike for p in benign),
        "refusal_snippets": len(snippets),
        "examples": len(examples),
        "harmful_examples": sum(ex.line <= len(harmful) for ex in examples),
        "benign_examples": sum(ex.line > len(harmful) for ex in examples),
        "dropped_examples": len(issues),
        "answers_generated": generated,
        "answers_cached": len(benign) - generated,
        "answers_replaced_by_reference": replaced,
    }
    say(
        f"training on {len(examples)} examples ({counts['harmful_examples']} harmful -> refusals, "
        f"{counts['benign_examples']} benign; {len(issues)} left out as too long): "
        f"{config.steps} steps of {config.batch_size}"
    )

    cache_dir().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target_id}-", dir=cache_dir()))
    try:
        clock = time.perf_counter()
        adapter_dir = staging / "adapter"
        outcome = train(
            model,
            spec,
            examples,
            _training_config(config),
            pad_token_id=tokenizer.pad_token_id,
            out_dir=adapter_dir,
            progress=_step_reporter(say),
        )
        timings["train"] = time.perf_counter() - clock
        training = {
            "steps": outcome.steps,
            "seconds": round(outcome.seconds, 1),
            "seconds_per_step": round(outcome.seconds / max(outcome.steps, 1), 2),
            "first_loss": outcome.history[0].loss if outcome.history else None,
            "final_loss": outcome.final_loss,
            "tokens": sum(s.tokens for s in outcome.history),
        }
        del model

        say("merging the adapter into the weights")
        merged = _merged_model(base_id, adapter_dir)
        shutil.rmtree(adapter_dir)
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.copy2(target / DISTILL_CACHE, staging / DISTILL_CACHE)

        clock = time.perf_counter()
        figures = _measure_splits(merged, tokenizer, config, target_id, say, report_dir=staging)
        timings["measure"] = time.perf_counter() - clock
        timings["total"] = time.perf_counter() - started
        result = AlignResult(
            model_id=target_id,
            base=base_id,
            path=target,
            config=config,
            counts=counts,
            training=training,
            figures=figures,
            base_figures=base_figures,
            timings=timings,
        )
        _write_marker(staging, result, spec)
        _swap_into_place(staging, target)
        # The probe and the audit baseline of the old weights under this id no longer apply.
        shutil.rmtree(artifacts_dir(target_id), ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"saved {target_id} at {target} ({timings['total']:.0f} s)")
    return result


def _check_target_id(base_id: str, target_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", target_id):
        raise ValueError(
            f"target id {target_id!r} must be a plain name (letters, digits, '.', '_', '-'): it "
            "becomes a directory in the model cache"
        )
    if target_id in BUILTIN_MODELS or target_id == base_id:
        raise ValueError(
            f"target id {target_id!r} would overwrite "
            f"{'a built-in model' if target_id in BUILTIN_MODELS else 'the base model'}; "
            f"choose another, e.g. {default_target_id(base_id)!r}"
        )


def _limited(rows: list[Any], limit: int | None) -> list[Any]:
    return rows if limit is None else rows[:limit]


def _training_config(config: AlignConfig) -> TrainingConfig:
    return TrainingConfig(
        lora=LoraSpec(r=config.lora_r, alpha=2.0 * config.lora_r),
        regularizer=preset_config("off"),
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        max_steps=config.steps,
        seed=config.seed,
        ce_normalization=config.ce_normalization,
    )


def _step_reporter(say: Progress) -> Callable[[StepStats], None]:
    def report(stats: StepStats) -> None:
        if stats.step == 1 or stats.step % 10 == 0 or stats.step == stats.total_steps:
            say(
                f"  step {stats.step}/{stats.total_steps} loss {stats.loss:.3f} "
                f"lr {stats.lr:.2e} ({stats.elapsed_s / stats.step:.1f} s/step)"
            )

    return report


def _merged_model(base_id: str, adapter_dir: Path) -> Any:
    """A fresh copy of the base with the trained adapter folded into its weights."""
    from peft import PeftModel

    base, _, _ = load(base_id)
    peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    return peft_model.merge_and_unload().eval()


# --------------------------------------------------------------------------------------------
# training data


def _refusal_pool(explicit_only: bool) -> list[Snippet]:
    pool = [s for s in refusals("train") if not s.has_placeholder]
    if explicit_only:
        pool = [s for s in pool if keyword_refusal(s.text)]
    return pool


def choose_refusals(
    prompts: Sequence[HarmfulPrompt],
    snippets: Sequence[Snippet],
    *,
    seed: int,
    category_share: float = 0.5,
) -> list[str]:
    """One refusal text per harmful prompt, deterministic from ``seed``.

    A refusal written for a category (it names phishing, say) only follows prompts of that
    category; generic refusals follow any. Where the prompt's category has its own refusals,
    one of them is chosen with probability ``category_share``, else a generic one.

    Raises:
        ValueError: there is no generic refusal to fall back on.
    """
    generic = [s.text for s in snippets if s.category is None]
    if not generic:
        raise ValueError("no generic refusals to choose from: the refusal set has none")
    by_category: dict[str, list[str]] = {}
    for snippet in snippets:
        if snippet.category is not None:
            by_category.setdefault(snippet.category, []).append(snippet.text)
    rng = random.Random(f"align-refusals:{seed}")
    texts = []
    for prompt in prompts:
        own = by_category.get(prompt.category, [])
        pool = own if own and rng.random() < category_share else generic
        texts.append(rng.choice(pool))
    return texts


def complete_sentences(text: str) -> str:
    """``text`` cut after its last full sentence when it stops mid-sentence (a token budget
    ran out), so the model is not taught to end its turn halfway through a clause.

    Text with no sentence end in its second half is kept whole: cutting would lose too much.
    """
    text = text.strip()
    if not text or text[-1] in ".!?)\"'`*:":
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[: ends[-1]].strip()
    return text


def benign_targets(
    prompts: Sequence[BenignPrompt], raw_answers: dict[str, str]
) -> tuple[list[str], int]:
    """The training answer of each benign prompt, and how many fell back to the reference.

    The base model's own answer, cut to whole sentences; where that answer is empty or reads
    as a refusal, the prompt's reference response instead (training a refusal onto a benign
    prompt is exactly the over-refusal this recipe has to avoid).
    """
    targets, replaced = [], 0
    for prompt in prompts:
        answer = complete_sentences(raw_answers.get(prompt.id, ""))
        if (not answer or keyword_refusal(answer)) and prompt.response:
            answer, replaced = prompt.response, replaced + 1
        targets.append(answer)
    return targets, replaced


def build_conversations(
    harmful: Sequence[HarmfulPrompt],
    refusal_texts: Sequence[str],
    benign: Sequence[BenignPrompt],
    answers: Sequence[str],
    *,
    lookalike_repeats: int = 1,
) -> list[Conversation]:
    """Single-turn chats: harmful prompts with refusals, then benign prompts with answers.

    Each look-alike appears ``lookalike_repeats`` times. Empty answers are left out.
    """
    pairs = list(zip((p.prompt for p in harmful), refusal_texts, strict=True))
    for prompt, answer in zip(benign, answers, strict=True):
        if answer.strip():
            pairs += [(prompt.prompt, answer)] * (lookalike_repeats if prompt.lookalike else 1)
    return [
        Conversation(line=i + 1, messages=[Message("user", p), Message("assistant", a)])
        for i, (p, a) in enumerate(pairs)
    ]


# --------------------------------------------------------------------------------------------
# the self-distillation cache


def self_distilled_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[BenignPrompt],
    cache_path: Path,
    *,
    base_fingerprint: str,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[dict[str, str], int]:
    """The model's greedy answers to ``prompts`` by prompt id, generating only what the cache
    at ``cache_path`` lacks, then saving the cache (atomically).

    Cached answers count only when the base model, the token budget and the prompt text are
    the same as now, so a changed base or prompt set regenerates what changed.

    Returns:
        The raw answers by prompt id, and how many were generated now.
    """
    key = {
        "version": DISTILL_CACHE_VERSION,
        "base": base_fingerprint,
        "max_new_tokens": max_new_tokens,
    }
    cached = read_keyed_json(cache_path, key, "answers")
    answers = {
        p.id: cached[p.id]["answer"]
        for p in prompts
        if p.id in cached and cached[p.id]["prompt"] == p.prompt
    }
    missing = [p for p in prompts if p.id not in answers]
    if missing:
        fresh = generate_responses(
            model,
            tokenizer,
            [p.prompt for p in missing],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        answers.update({p.id: text for p, text in zip(missing, fresh, strict=True)})
        for prompt in missing:
            cached[prompt.id] = {"prompt": prompt.prompt, "answer": answers[prompt.id]}
        write_json_atomic(cache_path, {**key, "answers": cached}, indent=1)
    return answers, len(missing)


def _fingerprint(spec: ModelSpec) -> str:
    """Identifies the base weights cheaply: id plus size and mtime of each weights file."""
    assert spec.path is not None
    files = sorted(Path(spec.path).glob("*.safetensors")) + sorted(Path(spec.path).glob("*.bin"))
    stamps = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return f"{spec.model_id}|" + "|".join(stamps)


# --------------------------------------------------------------------------------------------
# measurement


def measure_refusals(
    model: Any,
    tokenizer: Any,
    split: str,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    limit: int | None = None,
) -> tuple[SplitFigures, list[dict[str, Any]]]:
    """Keyword-judged refusal on the harmful prompts and over-refusal on the benign prompts of
    one built-in split, from greedy responses.

    Returns:
        The figures and one row per prompt (id, kind, lookalike, response, refused).
    """
    started = time.perf_counter()
    harmful = _limited(harmful_prompts(split), limit)
    benign = _limited(benign_prompts(split), limit)
    responses = generate_responses(
        model,
        tokenizer,
        [p.prompt for p in harmful] + [p.prompt for p in benign],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    refused = [keyword_refusal(text) for text in responses]
    rows = [
        {"id": p.id, "kind": "harmful", "response": r, "refused": f}
        for p, r, f in zip(harmful, responses, refused, strict=False)
    ] + [
        {"id": p.id, "kind": "benign", "lookalike": p.lookalike, "response": r, "refused": f}
        for p, r, f in zip(benign, responses[len(harmful) :], refused[len(harmful) :], strict=True)
    ]

    def rate(selected: list[dict[str, Any]]) -> Rate:
        return Rate.of(sum(row["refused"] for row in selected), len(selected))

    benign_rows = [row for row in rows if row["kind"] == "benign"]
    figures = SplitFigures(
        split=split,
        harmful_refusal=rate([row for row in rows if row["kind"] == "harmful"]),
        over_refusal=rate(benign_rows),
        plain_over_refusal=rate([row for row in benign_rows if not row["lookalike"]]),
        lookalike_over_refusal=rate([row for row in benign_rows if row["lookalike"]]),
        seconds=time.perf_counter() - started,
    )
    return figures, rows


def _measure_splits(
    model: Any,
    tokenizer: Any,
    config: AlignConfig,
    name: str,
    say: Progress,
    report_dir: Path | None = None,
) -> dict[str, SplitFigures]:
    figures: dict[str, SplitFigures] = {}
    report: dict[str, Any] = {}
    for split in config.eval_splits:
        result, rows = measure_refusals(
            model,
            tokenizer,
            split,
            max_new_tokens=config.eval_max_new_tokens,
            batch_size=config.generation_batch_size,
            limit=config.limit,
        )
        figures[split], report[split] = result, rows
        say(
            f"{name} on {split}: refusal {_pct(result.harmful_refusal)} of harmful, "
            f"over-refusal {_pct(result.over_refusal)} of benign "
            f"(look-alikes {_pct(result.lookalike_over_refusal)}) in {result.seconds:.0f} s"
        )
    if report_dir is not None:
        write_json_atomic(report_dir / REPORT_FILE, report, indent=1)
    return figures


def _pct(rate: Rate) -> str:
    return f"{100 * rate.value:.1f}% ({rate.count}/{rate.total})"


# --------------------------------------------------------------------------------------------
# the model directory


def _write_marker(directory: Path, result: AlignResult, base_spec: ModelSpec) -> None:
    """The marker the registry reads (``core.catalog.get_spec``): id, base, description, LoRA
    targets, plus the recipe and its figures for whoever inspects the model later."""
    validation = result.figures.get(result.config.eval_splits[0])
    summary = (
        f"; {result.config.eval_splits[0]} refusal {_pct(validation.harmful_refusal)}, "
        f"over-refusal {_pct(validation.over_refusal)}"
        if validation
        else ""
    )
    marker = {
        "model_id": result.model_id,
        "source": "derived",
        "base": result.base,
        "description": f"{result.base} safety-aligned by refusal SFT with self-distillation"
        + summary,
        "lora_target_modules": list(base_spec.lora_target_modules),
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        **{k: v for k, v in result.to_dict().items() if k not in ("model_id", "base", "path")},
    }
    (directory / MARKER).write_text(json.dumps(marker, indent=2))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging``: the old model moves aside first, so the id never
    points at a half-written directory."""
    staging.chmod(0o755)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def result_summary(result: AlignResult) -> list[dict[str, Any]]:
    """Rows (model, split, refusal, over-refusal, look-alike over-refusal) for a table."""
    rows = []
    for name, figures in (("base", result.base_figures), (result.model_id, result.figures)):
        for split, f in figures.items():
            rows.append(
                {
                    "model": name,
                    "split": split,
                    "refusal": _pct(f.harmful_refusal),
                    "over_refusal": _pct(f.over_refusal),
                    "lookalike_over_refusal": _pct(f.lookalike_over_refusal),
                }
            )
    return rows


__all__ = [
    "AlignConfig",
    "AlignResult",
    "SplitFigures",
    "align",
    "benign_targets",
    "build_conversations",
    "choose_refusals",
    "complete_sentences",
    "default_target_id",
    "measure_refusals",
    "result_summary",
    "self_distilled_answers",
]
