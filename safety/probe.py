"""The activation probe: ``p(harmful request)`` from the reference model's own hidden states.

Features are the hidden states of the reference (base) model over the prompt prefix through the
assistant header, i.e. the model's state just before it would generate, at one layer, pooled
over the prefix (``mean``) or taken at its last token (``last``). The head is logistic
regression (:func:`safety.risk.fit_linear_head`). :func:`train_probe` sweeps every layer and
both poolings on the train split and keeps the best by validation AUROC; the artifact is a JSON
file with the head's weights and the model id, layer, pooling, threshold and AUROC.

The probe reads the *prompt only*, so it measures harmful intent as the model itself
represents it, independent of the response; :mod:`safety.risk` explains how that combines
with the critic.

The model and tokenizer are passed in (any causal LM that returns ``hidden_states``); prompts
are token ids, so a caller with its own tokenization (the worker's ``prompt_len``) and a caller
with plain text (:meth:`ActivationProbe.score_texts`) get the same features.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from safety import prompts as builtin
from safety.risk import (
    LinearHead,
    auroc,
    best_threshold,
    fit_linear_head,
    json_digest,
    stale_data_message,
    write_json_atomic,
)

Pooling = Literal["last", "mean"]
POOLINGS: tuple[Pooling, ...] = ("last", "mean")
ARTIFACT_VERSION = 1


class ProbeError(RuntimeError):
    """The probe cannot be used: missing artifact, or one made for another model."""


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt through the assistant header, the way the worker tokenizes.

    Args:
        tokenizer: a tokenizer with a chat template.
        prompt: a user message, or the conversation before the final assistant turn.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes its own special tokens; adding BOS again would shift every position.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def prompt_features(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    poolings: Sequence[Pooling] = POOLINGS,
    *,
    pad_token_id: int = 0,
    batch_size: int = 16,
) -> dict[tuple[int, Pooling], Tensor]:
    """Pooled hidden states of each prompt at each requested layer.

    Batches are right-padded: with causal attention, padding after a sequence cannot change
    its hidden states, so the last real token is read at ``length - 1`` and the mean runs
    over the real tokens only.

    Args:
        model: a causal LM; ``hidden_states[k]`` is the output of layer ``k`` (0: embeddings).
        prompt_ids: token ids per prompt (non-empty).
        layers: which hidden states to keep.
        poolings: ``last`` and/or ``mean``.
        pad_token_id: id written into padding (masked out anyway).
        batch_size: prompts per forward pass.

    Returns:
        ``{(layer, pooling): [N, hidden]}`` float32 on the CPU, rows in input order.
    """
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    # Similar lengths in a batch keep padding (and time) down; rows go back by index.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out = {
        (layer, pooling): torch.zeros(len(prompt_ids), model.config.hidden_size)
        for layer in layers
        for pooling in poolings
    }
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        lengths = torch.tensor([len(prompt_ids[i]) for i in index])
        width = int(lengths.max())
        ids = torch.full((len(index), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, : lengths[row]] = torch.tensor(list(prompt_ids[i]))
            mask[row, : lengths[row]] = 1
        states = _hidden_states(model, ids.to(device), mask.to(device), max(layers))
        weights = mask.unsqueeze(-1).float()
        for layer in layers:
            hidden = states[layer].float().cpu()
            for pooling in poolings:
                if pooling == "last":
                    pooled = hidden[torch.arange(len(index)), lengths - 1]
                else:
                    pooled = (hidden * weights).sum(1) / lengths.unsqueeze(-1)
                out[(layer, pooling)][index] = pooled
    return out


class _StopForward(Exception):
    """Raised by a forward hook once the deepest layer a probe needs has run."""


def _decoder_layers(model: Any) -> torch.nn.ModuleList | None:
    """The block list of common decoder-only models (Llama, Mistral, Qwen, Gemma...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def _hidden_states(model: Any, ids: Tensor, mask: Tensor, deepest: int) -> Sequence[Tensor]:
    """``hidden_states`` up to index ``deepest``, stopping the forward pass there when the
    model's blocks can be found: a probe at layer 16 of 30 then costs about half a forward.

    The final entry of ``hidden_states`` has the model's last norm applied, unlike the output
    of the last block, so the full forward runs whenever the deepest layer is the last one.
    """
    blocks = _decoder_layers(model)
    if blocks is None or deepest >= len(blocks):
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    captured: list[Tensor] = []

    def stop(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    states: list[Tensor] = []

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        states.append(output[0] if isinstance(output, tuple) else output)

    embed = model.get_input_embeddings()
    if deepest == 0:
        return [embed(ids)]
    handles = [embed.register_forward_hook(keep)]
    handles += [blocks[k].register_forward_hook(keep) for k in range(deepest - 1)]
    handles.append(blocks[deepest - 1].register_forward_hook(stop))
    try:
        model(input_ids=ids, attention_mask=mask)
    except _StopForward:
        return [*states, *captured]
    finally:
        for handle in handles:
            handle.remove()
    raise RuntimeError("the forward pass finished without reaching the probe's layer")


@dataclass
class ActivationProbe:
    """A trained probe for one model.

    Attributes:
        model_id: the model whose hidden states it reads.
        layer: which hidden state (0: embeddings, k: after block k).
        pooling: ``last`` token of the prefix or ``mean`` over it.
        head: the logistic-regression head.
        threshold: ``p(harmful)`` at or above which a prompt counts as harmful (best balanced
            accuracy on the validation split).
        auroc: validation AUROC.
        meta: provenance (training counts, the layer sweep, date).
    """

    model_id: str
    layer: int
    pooling: Pooling
    head: LinearHead
    threshold: float = 0.5
    auroc: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def score_ids(
        self,
        model: Any,
        prompt_ids: Sequence[Sequence[int]],
        *,
        pad_token_id: int = 0,
        batch_size: int = 16,
    ) -> list[float]:
        """``p(harmful)`` per prompt given as token ids through the assistant header."""
        if not prompt_ids:
            return []
        features = prompt_features(
            model,
            prompt_ids,
            [self.layer],
            [self.pooling],
            pad_token_id=pad_token_id,
            batch_size=batch_size,
        )[(self.layer, self.pooling)]
        return self.head.predict_proba(features).tolist()

    def score_texts(
        self, model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16
    ) -> list[float]:
        """``p(harmful)`` per user message (rendered with the chat template)."""
        ids = [render_prompt(tokenizer, prompt) for prompt in prompts]
        return self.score_ids(
            model, ids, pad_token_id=tokenizer.pad_token_id or 0, batch_size=batch_size
        )

    def to_dict(self) -> dict[str, Any]:
        """The artifact's JSON form."""
        return {
            "version": ARTIFACT_VERSION,
            "model_id": self.model_id,
            "layer": self.layer,
            "pooling": self.pooling,
            "threshold": self.threshold,
            "auroc": self.auroc,
            "head": self.head.to_dict(),
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write the artifact JSON (atomically)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(
        cls, path: str | Path, *, model_id: str | None = None, builtin_digest: str | None = None
    ) -> ActivationProbe:
        """Read an artifact written by :meth:`save`.

        Args:
            path: the JSON file.
            model_id: when given, the artifact must have been trained for this model.
            builtin_digest: when given (:func:`builtin_probe_digest`), an artifact trained on the
                built-in prompt sets must record it as ``meta["data_sha256"]``.

        Raises:
            ProbeError: missing file, another version, another model, or other data.
        """
        path = Path(path)
        if not path.is_file():
            hint = f" --model {model_id}" if model_id else ""
            raise ProbeError(
                f"no probe artifact at {path}; train one with `tether probe train{hint}`"
            )
        data = json.loads(path.read_text())
        if data.get("version") != ARTIFACT_VERSION:
            raise ProbeError(
                f"probe artifact {path} has version {data.get('version')}, expected "
                f"{ARTIFACT_VERSION}; retrain it with `tether probe train`"
            )
        if model_id is not None and data["model_id"] != model_id:
            raise ProbeError(
                f"probe artifact {path} was trained for {data['model_id']!r}, not {model_id!r}"
            )
        stale = stale_data_message(data.get("meta", {}), builtin_digest)
        if stale:
            hint = f" --model {model_id}" if model_id else ""
            raise ProbeError(
                f"probe artifact {path} {stale}; retrain it with `tether probe train{hint}`"
            )
        return cls(
            model_id=data["model_id"],
            layer=int(data["layer"]),
            pooling=data["pooling"],
            head=LinearHead.from_dict(data["head"]),
            threshold=float(data["threshold"]),
            auroc=data.get("auroc"),
            meta=data.get("meta", {}),
        )


@dataclass
class ProbeData:
    """Prompts labelled harmful (1) or benign (0)."""

    prompts: list[str]
    labels: list[int]

    def digest(self) -> str:
        """A hash of every prompt and label."""
        return json_digest([self.prompts, self.labels])


def probe_data(split: str) -> ProbeData:
    """One split of the built-in sets: harmful requests (1) and benign requests, including
    the harmful-sounding ones and the task-style instructions (0)."""
    harmful = [row.prompt for row in builtin.harmful_prompts(split)]
    benign = [row.prompt for row in builtin.benign_prompts(split) + builtin.task_prompts(split)]
    return ProbeData(harmful + benign, [1] * len(harmful) + [0] * len(benign))


def probe_data_digest(train: ProbeData, validation: ProbeData) -> str:
    """What a probe artifact records as ``meta["data_sha256"]``: its training prompts and the
    validation prompts its layer, pooling and threshold were chosen on."""
    return json_digest([train.digest(), validation.digest()])


def builtin_probe_digest() -> str:
    """:func:`probe_data_digest` of the built-in splits :func:`train_probe` uses by default."""
    return probe_data_digest(probe_data("train"), probe_data("validation"))


def train_probe(
    model: Any,
    tokenizer: Any,
    model_id: str,
    *,
    train: ProbeData | None = None,
    validation: ProbeData | None = None,
    layers: Sequence[int] | None = None,
    poolings: Sequence[Pooling] = POOLINGS,
    l2: float = 1e-2,
    batch_size: int = 16,
    out_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ActivationProbe:
    """Sweep layers and poolings, keep the best by validation AUROC, optionally save.

    Args:
        model: the reference model (eval mode).
        tokenizer: its tokenizer, with a chat template.
        model_id: recorded in the artifact; scoring checks it.
        train: default :func:`probe_data` of the ``train`` split.
        validation: default the ``validation`` split. Never the audit split.
        layers: candidate hidden-state indices; default every block's output (1..L).
        poolings: candidate poolings.
        l2: the head's L2 penalty.
        batch_size: prompts per forward pass.
        out_path: where to write the artifact; ``None`` writes nothing.
        progress: called with a line of text at each stage.
    """
    say = progress or (lambda _msg: None)
    on_builtin_sets = train is None and validation is None
    train = train or probe_data("train")
    validation = validation or probe_data("validation")
    if layers is None:
        layers = range(1, int(model.config.num_hidden_layers) + 1)
    layers = list(layers)
    pad = tokenizer.pad_token_id or 0

    def features(data: ProbeData) -> dict[tuple[int, Pooling], Tensor]:
        ids = [render_prompt(tokenizer, prompt) for prompt in data.prompts]
        return prompt_features(
            model, ids, layers, poolings, pad_token_id=pad, batch_size=batch_size
        )

    say(f"reading hidden states of {len(train.prompts)} train prompts")
    train_x = features(train)
    say(f"reading hidden states of {len(validation.prompts)} validation prompts")
    val_x = features(validation)
    sweep: list[dict[str, Any]] = []
    best: tuple[float, int, Pooling, LinearHead, list[float]] | None = None
    for layer in layers:
        for pooling in poolings:
            head = fit_linear_head(train_x[(layer, pooling)], train.labels, l2=l2)
            probs = head.predict_proba(val_x[(layer, pooling)]).tolist()
            score = auroc(validation.labels, probs)
            sweep.append({"layer": layer, "pooling": pooling, "auroc": round(score, 4)})
            # Strictly better only: ties keep the earlier (cheaper to reach) layer.
            if best is None or score > best[0] + 1e-9:
                best = (score, layer, pooling, head, probs)
    assert best is not None
    score, layer, pooling, head, probs = best
    say(f"best: layer {layer}, {pooling} pooling, validation AUROC {score:.4f}")
    probe = ActivationProbe(
        model_id=model_id,
        layer=layer,
        pooling=pooling,
        head=head,
        threshold=best_threshold(validation.labels, probs),
        auroc=score,
        meta={
            "train_examples": len(train.prompts),
            "validation_examples": len(validation.prompts),
            "data_sha256": probe_data_digest(train, validation),
            "builtin_data": on_builtin_sets,
            "l2": l2,
            "sweep": sweep,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    if out_path is not None:
        probe.save(out_path)
    return probe
