from pathlib import Path

import pytest
import torch

from core.chatdata import Conversation, Message, read_jsonl_file
from workers.data import (
    IGNORE_INDEX,
    TemplateMismatchError,
    TokenizedExample,
    batches,
    collate,
    tokenize_conversation,
    tokenize_conversations,
)

SAMPLE = Path(__file__).parents[2] / "core" / "sample_data" / "benign_chat.jsonl"
END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model[1]


def _conversation(*turns: tuple[str, str], line: int = 1, risk: float | None = None):
    return Conversation(line, [Message(role, content) for role, content in turns], risk)


def _labelled_runs(example: TokenizedExample) -> list[list[int]]:
    """The contiguous runs of labelled tokens, one per assistant turn."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_labels_are_exactly_the_assistant_content_and_end_token(tokenizer):
    conversation = _conversation(
        ("system", "Be brief."), ("user", "What is two plus two?"), ("assistant", "It is four.")
    )
    example = tokenize_conversation(conversation, tokenizer)

    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        conversation.as_dicts(), tokenize=False
    )
    assert len(example.labels) == len(example.input_ids)
    (run,) = _labelled_runs(example)
    assert tokenizer.decode(run) == "It is four." + END
    # Labelled positions carry the input token itself (the loss shifts them).
    assert all(
        label in (IGNORE_INDEX, token)
        for label, token in zip(example.labels, example.input_ids, strict=True)
    )


def test_prompt_len_covers_the_prompt_through_the_assistant_header(tokenizer):
    conversation = _conversation(("user", "Name a colour."), ("assistant", "Blue."))
    example = tokenize_conversation(conversation, tokenizer)

    prompt = tokenizer.decode(example.input_ids[: example.prompt_len])
    assert prompt == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == tokenizer.apply_chat_template(
        conversation.as_dicts()[:-1], tokenize=False, add_generation_prompt=True
    )
    # The first labelled token is the first one after the prompt.
    assert example.labels[example.prompt_len - 1] == IGNORE_INDEX
    assert example.labels[example.prompt_len] == example.input_ids[example.prompt_len]


def test_every_assistant_turn_of_a_multi_turn_conversation_is_labelled(tokenizer):
    conversation = _conversation(
        ("user", "Suggest a cat name."),
        ("assistant", "Smokey."),
        ("user", "Another?"),
        ("assistant", "Nimbus."),
        ("user", "One more."),
        ("assistant", "Pewter."),
    )
    example = tokenize_conversation(conversation, tokenizer)

    runs = [tokenizer.decode(run) for run in _labelled_runs(example)]
    assert runs == ["Smokey." + END, "Nimbus." + END, "Pewter." + END]
    # The probe reads at the final turn's header, after the earlier answers.
    assert tokenizer.decode(example.input_ids[: example.prompt_len]).endswith(
        "One more.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sample_file_tokenizes_without_issues(tokenizer):
    conversations = read_jsonl_file(SAMPLE, max_bytes=1_000_000, max_lines=1000)
    examples, issues = tokenize_conversations(conversations, tokenizer, max_seq_len=1024)
    assert issues == []
    assert [e.line for e in examples] == [c.line for c in conversations]
    for example, conversation in zip(examples, conversations, strict=True):
        assert example.risk == conversation.risk
        expected = [m.content + END for m in conversation.messages if m.role == "assistant"]
        assert [tokenizer.decode(run) for run in _labelled_runs(example)] == expected


def test_too_long_lines_are_all_reported_with_length_and_limit(tokenizer):
    short = _conversation(("user", "hi"), ("assistant", "hello"), line=1)
    long_a = _conversation(("user", "tell me " * 40), ("assistant", "ok"), line=2)
    long_b = _conversation(("user", "hi"), ("assistant", "sure " * 40), line=3)
    limit = len(tokenize_conversation(short, tokenizer).input_ids)

    examples, issues = tokenize_conversations([short, long_a, long_b], tokenizer, limit)

    assert [e.line for e in examples] == [1]
    assert [(i.line, i.code) for i in issues] == [(2, "too_long"), (3, "too_long")]
    length = len(tokenize_conversation(long_a, tokenizer).input_ids)
    assert f"{length} tokens" in issues[0].message and f"limit is {limit}" in issues[0].message


def test_template_that_rewrites_earlier_turns_is_refused_with_an_explanation(tokenizer):
    # A template that renders the last message differently from the same message mid-way, as
    # templates that strip reasoning from past turns do: prefixes are not token prefixes.
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        conversation = _conversation(("user", "hi"), ("assistant", "hello"), line=7)
        with pytest.raises(TemplateMismatchError, match=r"line 7: .*not a prefix"):
            tokenize_conversation(conversation, tokenizer)
        examples, issues = tokenize_conversations([conversation], tokenizer, 1024)
    finally:
        tokenizer.chat_template = original
    assert examples == []
    assert [(i.line, i.code) for i in issues] == [(7, "template_mismatch")]


def _example(length: int, line: int, risk: float | None = None) -> TokenizedExample:
    ids = list(range(10, 10 + length))
    labels = [IGNORE_INDEX] * 2 + ids[2:]
    return TokenizedExample(line=line, input_ids=ids, labels=labels, prompt_len=2, risk=risk)


def test_collate_pads_right_and_masks_padding():
    batch = collate([_example(3, 1, 0.5), _example(5, 2)], pad_token_id=0, indices=[7, 3])

    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 12, -100, -100], [-100, -100, 12, 13, 14]]
    assert batch["prompt_len"].tolist() == [2, 2]
    assert batch["risk"].dtype == torch.float32
    assert batch["risk"].tolist() == [0.5, 0.0]
    assert batch["has_risk"].tolist() == [True, False]
    assert batch["index"].tolist() == [7, 3]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels"))


def test_collate_left_padding_and_multiple_of():
    batch = collate(
        [_example(3, 1), _example(5, 2)], pad_token_id=0, pad_to_multiple_of=4, padding_side="left"
    )
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [0, 0, 0, 0, 0, 10, 11, 12]
    assert batch["attention_mask"][0].tolist() == [0] * 5 + [1] * 3
    assert batch["labels"][0].tolist() == [-100] * 7 + [12]
    assert batch["index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="padding_side"):
        collate([_example(3, 1)], 0, padding_side="middle")


def test_collate_real_examples_have_consistent_shapes(tokenizer):
    conversations = read_jsonl_file(SAMPLE, max_bytes=1_000_000, max_lines=1000)[:4]
    examples, _ = tokenize_conversations(conversations, tokenizer, 1024)
    batch = collate(examples, tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == (4, max(lengths))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_batches_cover_every_example_once_per_epoch_and_are_deterministic():
    first = list(batches(range(23), 5, seed=1, epoch=0))
    assert [len(b) for b in first] == [5, 5, 5, 5, 3]
    assert sorted(i for b in first for i in b) == list(range(23))
    assert list(batches(23, 5, seed=1, epoch=0)) == first
    assert list(batches(23, 5, seed=1, epoch=1)) != first
    assert list(batches(23, 5, seed=2, epoch=0)) != first
    assert next(batches(23, 5, seed=1, epoch=0, shuffle=False)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(23, 0, seed=1, epoch=0))


def test_line_whose_assistant_tokens_vanish_is_reported(tokenizer):
    original = tokenizer.chat_template
    # A template that never writes assistant turns leaves nothing to train on.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}"
    )
    try:
        conversation = _conversation(("user", "hi"), ("assistant", "hello"), line=4)
        examples, issues = tokenize_conversations([conversation], tokenizer, 1024)
    finally:
        tokenizer.chat_template = original
    assert examples == []
    assert [(i.line, i.code) for i in issues] == [(4, "no_label_tokens")]
