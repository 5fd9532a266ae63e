"""Training data for the worker: tokenize validated conversations with the model's chat template.

Input comes from :mod:`core.chatdata` (the API validated the file; the worker re-parses it).
Each conversation becomes a :class:`TokenizedExample`:

* ``input_ids``: the tokens of ``apply_chat_template(messages)``;
* ``labels``: ``-100`` everywhere except the tokens of assistant turns (their content and their
  end-of-turn token, e.g. ``<|im_end|>``, which teaches the model to stop; not the role header,
  which the template writes at inference time anyway);
* ``prompt_len``: the tokens of ``apply_chat_template(messages[:-1], add_generation_prompt=True)``,
  i.e. everything through the header of the final assistant turn. The activation probe reads the
  reference model's hidden state there: the model's state just before it would generate.

Assistant spans are found by rendering prefixes of the conversation and comparing token prefixes,
which works for any template without knowing its markup.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.chatdata import Conversation, DatasetValidationError, ValidationIssue, parse_jsonl

IGNORE_INDEX = -100
"""Label value that the cross-entropy (and KL) loss skips."""

#: End-of-turn tokens of common templates, besides the tokenizer's own eos token.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


class TemplateMismatchError(ValueError):
    """A conversation prefix does not tokenize to a prefix of the whole conversation."""


@dataclass
class TokenizedExample:
    """One conversation ready for training.

    Attributes:
        line: line number in the source file.
        input_ids: the templated conversation's tokens.
        labels: same length; ``-100`` except on assistant content and end-of-turn tokens.
        prompt_len: tokens up to and including the final assistant turn's header.
        risk: the file's risk score for the line, if it had one.
    """

    line: int
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    risk: float | None = None

    @property
    def num_label_tokens(self) -> int:
        """How many tokens the loss is computed on."""
        return sum(label != IGNORE_INDEX for label in self.labels)


# --------------------------------------------------------------------------------------------
# tokenization


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
) -> list[int]:
    # tokenize=False, then encode without special tokens: transformers 5 returns a BatchEncoding
    # from tokenize=True, and the template already writes every special token it wants (adding
    # a BOS again would shift every position).
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(text, str)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab)
    return ids


def _require_prefix(prefix: list[int], full: list[int], line: int, upto: int) -> None:
    if full[: len(prefix)] != prefix:
        pairs = enumerate(zip(prefix, full, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(prefix), len(full)))
        raise TemplateMismatchError(
            f"line {line}: the chat template's rendering of the first {upto} message(s) is not a "
            f"prefix of the whole conversation's tokens (they differ at token {at}), so the "
            "assistant turns cannot be located. Either the template renders earlier turns "
            "differently once later turns follow (e.g. it drops reasoning from past turns), or "
            "the tokenizer merges text across a turn boundary (e.g. a response that starts "
            "with whitespace); removing leading whitespace from the responses usually fixes "
            "the latter"
        )


def tokenize_conversation(
    conversation: Conversation, tokenizer: PreTrainedTokenizerBase
) -> TokenizedExample:
    """Tokenize one conversation and label its assistant turns.

    Raises:
        TemplateMismatchError: a rendered prefix is not a token prefix of the full rendering.
    """
    messages = conversation.as_dicts()
    input_ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    end_of_turn = _end_of_turn_ids(tokenizer)
    prompt_len = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_ids = _render(tokenizer, messages[:k], add_generation_prompt=True)
        end_ids = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        _require_prefix(start_ids, input_ids, conversation.line, k)
        _require_prefix(end_ids, input_ids, conversation.line, k + 1)
        start, end = len(start_ids), len(end_ids)
        # Templates often write a newline after the end-of-turn token; that separator is the
        # template's, not the assistant's, so the label stops at the last end-of-turn token.
        ends = [i for i in range(start, end) if input_ids[i] in end_of_turn]
        if ends:
            end = ends[-1] + 1
        labels[start:end] = input_ids[start:end]
        prompt_len = start
    return TokenizedExample(
        line=conversation.line,
        input_ids=input_ids,
        labels=labels,
        prompt_len=prompt_len,
        risk=conversation.risk,
    )


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
) -> tuple[list[TokenizedExample], list[ValidationIssue]]:
    """Tokenize every conversation, collecting the problems of all lines at once.

    Lines are reported (and left out) when they are longer than ``max_seq_len`` tokens
    (``too_long``), when the template cannot be aligned with them (``template_mismatch``), or
    when they have no assistant token to train on (``no_label_tokens``).

    Returns:
        The examples that are fine and the issues, each naming its line.
    """
    examples: list[TokenizedExample] = []
    issues: list[ValidationIssue] = []
    for conversation in conversations:
        try:
            example = tokenize_conversation(conversation, tokenizer)
        except TemplateMismatchError as exc:
            issues.append(ValidationIssue(conversation.line, None, "template_mismatch", str(exc)))
            continue
        length = len(example.input_ids)
        if length > max_seq_len:
            issues.append(
                ValidationIssue(
                    conversation.line,
                    "messages",
                    "too_long",
                    f"the example is {length} tokens long; the limit is {max_seq_len} tokens",
                )
            )
        elif example.num_label_tokens == 0:
            issues.append(
                ValidationIssue(
                    conversation.line,
                    "messages",
                    "no_label_tokens",
                    "no assistant tokens are left to train on after applying the chat template",
                )
            )
        else:
            examples.append(example)
    return examples, issues


# --------------------------------------------------------------------------------------------
# batching


def collate(
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    *,
    indices: Sequence[int] | None = None,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad a batch into tensors.

    Args:
        examples: the batch.
        pad_token_id: id written into padded ``input_ids`` positions (masked out anyway).
        indices: each example's position in the dataset; default ``0..B-1``. Pass the indices
            :func:`batches` yielded so the training loop can map rows back to examples.
        pad_to_multiple_of: round the padded length up (tensor-core friendly shapes).
        padding_side: ``right`` for training; ``left`` puts every sequence's end at the same
            column, which generation and last-token reads want. ``prompt_len`` stays a count
            of tokens, not a column: with left padding the prompt ends at column
            ``pad + prompt_len - 1`` where ``pad = T - attention_mask.sum(1)``.

    Returns:
        ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long, ``labels`` [B, T] long
        (``-100`` on padding), ``prompt_len`` [B] long, ``risk`` [B] float (0.0 where the line
        had none), ``has_risk`` [B] bool, ``index`` [B] long.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if indices is None:
        indices = range(len(examples))
    if len(indices) != len(examples):
        raise ValueError(f"got {len(indices)} indices for {len(examples)} examples")
    width = max(len(example.input_ids) for example in examples)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of

    def pad(values: list[int], fill: int) -> list[int]:
        filler = [fill] * (width - len(values))
        return values + filler if padding_side == "right" else filler + values

    return {
        "input_ids": torch.tensor([pad(e.input_ids, pad_token_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples]),
        "labels": torch.tensor([pad(e.labels, IGNORE_INDEX) for e in examples]),
        "prompt_len": torch.tensor([e.prompt_len for e in examples]),
        # Absent risk is 0.0 with has_risk False rather than NaN, so arithmetic on the batch
        # never propagates NaN; callers that care check has_risk.
        "risk": torch.tensor([e.risk or 0.0 for e in examples], dtype=torch.float32),
        "has_risk": torch.tensor([e.risk is not None for e in examples]),
        "index": torch.tensor(list(indices)),
    }


def batches(
    examples: Sequence[Any] | int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> Iterator[list[int]]:
    """Yield the dataset indices of each batch of one epoch.

    The order depends only on ``(seed, epoch)``, so a resumed run that skips the batches it
    already trained on sees exactly the data an uninterrupted run would. Every index appears
    once per epoch; the last batch may be smaller.

    Args:
        examples: the dataset, or its length.
        batch_size: examples per batch.
        seed: the run's seed.
        epoch: 0-based epoch; each epoch has its own order.
        shuffle: ``False`` keeps file order (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = examples if isinstance(examples, int) else len(examples)
    order = list(range(count))
    if shuffle:
        # A private generator seeded from both numbers: no global RNG state is read or changed.
        random.Random(f"{seed}:{epoch}").shuffle(order)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def parse_and_tokenize(
    data: bytes,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_bytes: int,
    max_lines: int,
    max_seq_len: int,
) -> tuple[list[Conversation], list[TokenizedExample]]:
    """Validate a training file and tokenize it, as the worker does before training.

    Raises:
        DatasetValidationError: with every problem of the file, or of its tokenization.
    """
    conversations, issues = parse_jsonl(data, max_bytes=max_bytes, max_lines=max_lines)
    if issues:
        raise DatasetValidationError(issues)
    examples, token_issues = tokenize_conversations(conversations, tokenizer, max_seq_len)
    if token_issues:
        raise DatasetValidationError(token_issues)
    return conversations, examples
