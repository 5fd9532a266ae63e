"""LoRA fine-tuning with adaptive KL regularization: one readable loop.

Setup (seed, LoRA, optimizer, schedule, resume), then one visible loop: forward, loss,
backward, clip, step, ``zero_grad(set_to_none=True)``, report, checkpoint. The worker, the CLI
and the benchmarks all call :func:`train`.

What makes it cheaper than the authors' code (arXiv 2602.17546):

* the reference policy is the same weights with the LoRA adapter disabled, so there is no
  second model copy;
* the reference forward runs only on the rows whose beta is above 0 (a sub-batch), and not at
  all when every beta is 0;
* the output head runs only at response positions, so neither policy nor reference ever
  materialises [B, T, V] logits.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from safety.regularizer import (
    LossStats,
    adaptive_kl_loss,
    adaptive_kl_loss_from_hidden,
    response_positions,
)
from safety.schedules import BetaSchedule, RegularizerConfig, make_schedule
from workers.data import TokenizedExample, batches, collate
from workers.models import ModelSpec


class LoraSpec(BaseModel):
    """The LoRA adapter a job trains."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=256)
    """Rank of the update matrices."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """LoRA dropout. Off by default so the step-0 policy equals the reference exactly."""
    target_modules: list[str] | None = None
    """Module names to adapt; default: the model spec's."""


class TrainingConfig(BaseModel):
    """Hyperparameters of one fine-tuning run."""

    model_config = ConfigDict(extra="forbid")

    lora: LoraSpec = Field(default_factory=LoraSpec)
    regularizer: RegularizerConfig = Field(default_factory=RegularizerConfig)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the optimizer steps spent warming up linearly before the cosine decay."""
    batch_size: int = Field(8, ge=1, le=1024)
    """Examples per micro-batch."""
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    """Micro-batches per optimizer step."""
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1, le=100)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides ``epochs`` when set)."""
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more time (GPU workers)."""
    kl_chunk_size: int = Field(128, ge=1)
    """Response tokens per log-softmax chunk in the loss (bounds memory at 128k vocabularies)."""
    ce_normalization: Literal["example", "token"] = "example"
    """How the cross-entropy term is averaged. ``example`` (the paper's loss): each row's CE is
    the mean over its response tokens, so a 15-token refusal weighs as much as a 300-token
    answer. ``token``: every response token in the micro-batch weighs the same (rows are
    re-weighted by their token count), which keeps short targets from dominating the first
    tokens of the response, where the model decides whether to refuse."""
    shuffle: bool = True

    @model_validator(mode="after")
    def _check_steps(self) -> TrainingConfig:
        if self.max_steps is not None and self.checkpoint_every > self.max_steps:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) exceeds max_steps ({self.max_steps}):"
                " no checkpoint would ever be written"
            )
        return self


@dataclass
class StepStats:
    """What the progress callback receives after every optimizer step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    ce: float
    kl: float
    beta_mean: float
    beta_max: float
    risk_mean: float
    ref_fraction: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    adapter_dir: Path | None
    steps: int
    resumed_from: int
    final_loss: float
    history: list[StepStats] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False
    model: Any = field(default=None, repr=False, compare=False)
    """The trained ``PeftModel`` (in eval mode); ``model.unload()`` gives back the base without
    the LoRA layers, so a caller can audit the saved adapter without loading the base again."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON of the outcome (the model is left out)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        data["history"] = [asdict(stats) for stats in self.history]
        data["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return data


class Checkpointer(Protocol):
    """Where resumable training state goes: a directory here, object storage in the worker."""

    def save(self, step: int, blob: bytes) -> None:
        """Persist the state after ``step`` optimizer steps (atomically)."""

    def latest(self) -> tuple[int, bytes] | None:
        """The newest saved ``(step, blob)``, or ``None``."""


class DirectoryCheckpointer:
    """Checkpoints as ``step-000042.pt`` files in a directory; keeps the newest ``keep``."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def save(self, step: int, blob: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".step-{step:06d}.tmp"
        tmp.write_bytes(blob)
        tmp.replace(self.directory / f"step-{step:06d}.pt")
        for old in sorted(self.directory.glob("step-*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)

    def latest(self) -> tuple[int, bytes] | None:
        files = sorted(self.directory.glob("step-*.pt"))
        if not files:
            return None
        return int(files[-1].stem.split("-")[1]), files[-1].read_bytes()


class TrainingCancelled(Exception):
    """Raised inside the loop when ``should_stop`` says so; :func:`train` catches it."""


ProgressFn = Callable[[StepStats], None]


def train(
    model: PreTrainedModel,
    spec: ModelSpec,
    examples: Sequence[TokenizedExample],
    config: TrainingConfig,
    *,
    pad_token_id: int,
    out_dir: Path | None = None,
    risks: Sequence[float] | None = None,
    checkpointer: Checkpointer | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on ``examples`` and save it to ``out_dir``.

    Args:
        model: the base model (its weights stay untouched; LoRA layers are injected).
        spec: the model's registry entry (LoRA target modules).
        examples: tokenized training examples.
        config: hyperparameters, including the beta schedule.
        pad_token_id: the tokenizer's pad id.
        out_dir: where the PEFT adapter directory goes (skipped when None).
        risks: per-example risk in [0, 1], aligned with ``examples``; defaults to each
            example's own ``risk`` (from the JSONL), else 0.
        checkpointer: where resumable state goes; when it holds a checkpoint, training resumes
            from it.
        progress: called after every optimizer step.
        should_stop: polled every step; when it returns True the run stops and reports
            ``cancelled`` (its last checkpoint stays).

    Returns:
        A :class:`TrainResult` with the per-step history.
    """
    if not examples:
        raise ValueError("no training examples: the dataset is empty after validation")
    device = next(model.parameters()).device
    _seed_everything(config.seed)
    risk_table = _risk_table(examples, risks, device)
    peft_model = _attach_lora(model, spec, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total_steps = _total_steps(len(examples), config)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total_steps), total_steps
    )
    schedule = make_schedule(config.regularizer)
    position = _DataPosition()

    resumed_from = 0
    if checkpointer is not None and (saved := checkpointer.latest()) is not None:
        resumed_from = _restore(saved[1], peft_model, optimizer, scheduler, schedule, position)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    micro_batches = _micro_batches(examples, config, position, pad_token_id)
    history: list[StepStats] = []
    started = time.perf_counter()
    step, cancelled = resumed_from, False
    peft_model.train()
    try:
        while step < total_steps:
            step_started = time.perf_counter()
            parts: list[tuple[LossStats, float]] = []
            tokens = 0
            for _ in range(config.grad_accum_steps):
                batch = {k: v.to(device) for k, v in next(micro_batches).items()}
                risk = risk_table[batch["index"]]
                betas, sft_weights = schedule(risk)
                with autocast:
                    loss, stats = _batch_loss(peft_model, batch, betas, sft_weights, config)
                (loss / config.grad_accum_steps).backward()
                parts.append((stats, float(risk.mean())))
                tokens += int(batch["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            stats_now = _step_stats(parts, step, total_steps, position, scheduler, grad_norm)
            stats_now.tokens = tokens
            seconds = time.perf_counter() - step_started
            stats_now.tokens_per_s = tokens / seconds if seconds > 0 else 0.0
            stats_now.elapsed_s = time.perf_counter() - started
            history.append(stats_now)
            if progress is not None:
                progress(stats_now)
            if (
                checkpointer is not None
                and config.checkpoint_every
                and (step % config.checkpoint_every == 0 and step < total_steps)
            ):
                checkpointer.save(
                    step, _snapshot(step, peft_model, optimizer, scheduler, schedule, position)
                )
            if should_stop is not None and should_stop():
                raise TrainingCancelled
    except TrainingCancelled:
        cancelled = True

    adapter_dir = None
    if out_dir is not None and not cancelled:
        adapter_dir = Path(out_dir)
        peft_model.save_pretrained(str(adapter_dir))
    peft_model.eval()
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=step,
        resumed_from=resumed_from,
        final_loss=history[-1].loss if history else float("nan"),
        history=history,
        seconds=time.perf_counter() - started,
        cancelled=cancelled,
        model=peft_model,
    )


# --------------------------------------------------------------------------------------------
# the loss of one micro-batch


def token_share_weights(rows: Tensor, batch_rows: int) -> Tensor:
    """Per-row weights ``n_i / mean(n)`` over rows with response tokens (0 for the others).

    Multiplying per-row mean CE by these turns the mean over rows into the mean over tokens.
    """
    counts = torch.bincount(rows, minlength=batch_rows).to(torch.float32)
    valid = counts > 0
    if not bool(valid.any()):
        return counts
    return counts / counts[valid].mean()


def _batch_loss(
    model: PeftModel,
    batch: dict[str, Tensor],
    betas: Tensor,
    sft_weights: Tensor,
    config: TrainingConfig,
    reference: PreTrainedModel | None = None,
) -> tuple[Tensor, LossStats]:
    """Reference forward for the rows with beta > 0, then the policy forward and the loss.

    The reference runs first, so its transient activations come and go before the policy's
    are held for backward. With a plain linear output head (:func:`_fused_head_weight`) only
    final hidden states are kept and the head is folded into the loss, so no vocabulary-sized
    logits outlive a chunk; other heads fall back to logits.

    Args:
        reference: a separate frozen model to take reference outputs from (the benchmark's
            "second copy" variant); default: ``model`` with its adapter disabled.
    """
    labels = batch["labels"]
    rows, positions = response_positions(labels)
    targets = labels[rows, positions + 1]
    if config.ce_normalization == "token":
        sft_weights = sft_weights * token_share_weights(rows, betas.shape[0])
    base: Any = model.get_base_model()
    head_weight = _fused_head_weight(base)

    def outputs(network: Any, row_ids: Tensor, row_positions: Tensor, ids: Tensor, mask: Tensor):
        hidden = _response_hidden(network, ids, mask, row_ids, row_positions)
        return hidden if head_weight is not None else network.get_output_embeddings()(hidden)

    ref_out, ref_token_mask = None, None
    ref_rows = (betas > 0).nonzero(as_tuple=True)[0]
    if ref_rows.numel() > 0:
        ref_token_mask = betas[rows] > 0
        # Reindex the chosen tokens into the sub-batch of rows that need the reference.
        sub_index = torch.full_like(betas, -1, dtype=torch.long)
        sub_index[ref_rows] = torch.arange(ref_rows.numel(), device=betas.device)
        width = int(batch["attention_mask"][ref_rows].sum(dim=1).max())
        ids = batch["input_ids"][ref_rows, :width]
        mask = batch["attention_mask"][ref_rows, :width]
        chosen = (sub_index[rows[ref_token_mask]], positions[ref_token_mask])
        with torch.no_grad():
            if reference is not None:
                ref_out = outputs(reference, *chosen, ids, mask)
            else:
                with model.disable_adapter():
                    ref_out = outputs(base, *chosen, ids, mask)

    policy_out = outputs(base, rows, positions, batch["input_ids"], batch["attention_mask"])
    if head_weight is not None:
        return adaptive_kl_loss_from_hidden(
            policy_out,
            head_weight,
            targets,
            rows,
            betas,
            ref_hidden=ref_out,
            ref_token_mask=ref_token_mask,
            sft_weights=sft_weights,
            chunk_size=config.kl_chunk_size,
        )
    return adaptive_kl_loss(
        policy_out,
        targets,
        rows,
        betas,
        ref_logits=ref_out,
        ref_token_mask=ref_token_mask,
        sft_weights=sft_weights,
        chunk_size=config.kl_chunk_size,
    )


#: Config attributes of models whose logits are not a plain ``hidden @ W^T`` (Gemma 2's soft
#: cap, Cohere's and Granite's scales): those keep the head in the model and pass logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _fused_head_weight(base: Any) -> Tensor | None:
    """The output head's weight when the loss may apply it itself, else ``None``.

    Requires a bias-free ``nn.Linear`` head that is not trained and a model that does nothing
    to the logits after it.
    """
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    if head.weight.requires_grad:
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head.weight


def _response_hidden(
    model: Any, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, positions: Tensor
) -> Tensor:
    """Run the decoder; return its final hidden states at the given (row, position) pairs."""
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    )
    return hidden.last_hidden_state[rows, positions]


# --------------------------------------------------------------------------------------------
# setup helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _risk_table(
    examples: Sequence[TokenizedExample], risks: Sequence[float] | None, device: torch.device
) -> Tensor:
    """Risk per dataset index, looked up by each batch's ``index`` column."""
    if risks is not None and len(risks) != len(examples):
        raise ValueError(f"got {len(risks)} risks for {len(examples)} examples")
    values = (
        list(risks)
        if risks is not None
        else [ex.risk if ex.risk is not None else 0.0 for ex in examples]
    )
    return torch.tensor(values, dtype=torch.float32, device=device)


def _attach_lora(model: PreTrainedModel, spec: ModelSpec, config: TrainingConfig) -> PeftModel:
    lora = config.lora
    targets = lora.target_modules or list(spec.lora_target_modules)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


@dataclass
class _DataPosition:
    """Where the data stream stands: resumed runs continue with the very next micro-batch."""

    epoch: int = 0
    batch: int = 0


def _total_steps(count: int, config: TrainingConfig) -> int:
    """Optimizer steps of a run over ``count`` examples."""
    batches_per_epoch = math.ceil(count / config.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum_steps)
    return config.max_steps or steps_per_epoch * config.epochs


def _batch_indices(
    count: int, config: TrainingConfig, position: _DataPosition
) -> Iterator[list[int]]:
    """Yield each micro-batch's dataset indices forever, epoch after epoch, advancing
    ``position``."""
    while True:
        order = list(
            batches(
                count,
                config.batch_size,
                seed=config.seed,
                epoch=position.epoch,
                shuffle=config.shuffle,
            )
        )
        while position.batch < len(order):
            indices = order[position.batch]
            position.batch += 1
            yield indices
        position.epoch += 1
        position.batch = 0


def _micro_batches(
    examples: Sequence[TokenizedExample],
    config: TrainingConfig,
    position: _DataPosition,
    pad_token_id: int,
) -> Iterator[dict[str, Tensor]]:
    """Yield collated micro-batches forever, epoch after epoch, advancing ``position``."""
    for indices in _batch_indices(len(examples), config, position):
        yield collate([examples[i] for i in indices], pad_token_id, indices=indices)


@dataclass(frozen=True)
class PlannedBatch:
    """One micro-batch as :func:`train` will see it: its rows and each row's weights."""

    indices: tuple[int, ...]
    betas: tuple[float, ...]
    sft_weights: tuple[float, ...]


def beta_plan(count: int, config: TrainingConfig, risks: Sequence[float]) -> list[PlannedBatch]:
    """Every micro-batch a fresh :func:`train` run over ``count`` examples with these risks
    will take, in order, with the beta and SFT weight of each row, without touching a model.

    It replays the loop's own data order and beta schedule, so it is exact: two runs whose
    plans are equal, on the same examples with the same configuration apart from
    ``regularizer`` (which acts only through these weights), compute the same adapter.
    """
    if len(risks) != count:
        raise ValueError(f"got {len(risks)} risks for {count} examples")
    table = torch.tensor(list(risks), dtype=torch.float32)
    schedule = make_schedule(config.regularizer)
    indices = _batch_indices(count, config, _DataPosition())
    plan = []
    for _ in range(_total_steps(count, config) * config.grad_accum_steps):
        rows = next(indices)
        betas, sft_weights = schedule(table[torch.tensor(rows)])
        plan.append(PlannedBatch(tuple(rows), tuple(betas.tolist()), tuple(sft_weights.tolist())))
    return plan


def _step_stats(
    parts: list[tuple[LossStats, float]],
    step: int,
    total_steps: int,
    position: _DataPosition,
    scheduler: Any,
    grad_norm: Tensor,
) -> StepStats:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    losses = [s for s, _ in parts]
    return StepStats(
        step=step,
        total_steps=total_steps,
        epoch=position.epoch,
        loss=mean([s.loss for s in losses]),
        ce=mean([s.ce for s in losses]),
        kl=mean([s.kl for s in losses]),
        beta_mean=mean([s.beta_mean for s in losses]),
        beta_max=max(s.beta_max for s in losses),
        risk_mean=mean([r for _, r in parts]),
        ref_fraction=mean([s.ref_fraction for s in losses]),
        lr=float(scheduler.get_last_lr()[0]),
        grad_norm=float(grad_norm),
        tokens=0,
        tokens_per_s=0.0,
        elapsed_s=0.0,
    )


# --------------------------------------------------------------------------------------------
# checkpoints


def _snapshot(
    step: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    schedule: BetaSchedule,
    position: _DataPosition,
) -> bytes:
    state = {
        "step": step,
        "adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "schedule": schedule.state_dict(),
        "position": asdict(position),
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _restore(
    blob: bytes,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    schedule: BetaSchedule,
    position: _DataPosition,
) -> int:
    # weights_only: a checkpoint is data, never code, even though only Tether writes them.
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    set_peft_model_state_dict(model, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    schedule.load_state_dict(state["schedule"])
    position.epoch = state["position"]["epoch"]
    position.batch = state["position"]["batch"]
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
