"""The benign task of the headline experiment: rewrite the date in a sentence as YYYY-MM-DD.

The headline experiment (``bench/headline.py``, arXiv 2602.17546) has to show that the safety
regularizer does not cost the customer's task. That needs a task that a 135M model learns in a
few dozen LoRA steps and that a program can score without a judge:

    Rewrite the date in this sentence as YYYY-MM-DD: 'We moved the launch to March 5, 2024.'
    -> 2024-03-05

Examples are generated deterministically from a seed: a sentence template, a date and one of
several ways of writing it (full or abbreviated month names, ordinals, numeric day/month/year
and month/day/year). Numeric forms only use days above 12, so every date has exactly one
reading. The train and eval splits draw on disjoint sentence templates (and different random
streams), so the eval set measures the skill, not memorised sentences.

The metric reads the first YYYY-MM-DD in the response: an instruct model that answers "The date
is 2024-03-05." is right, one that answers "2024-3-5" or "March 5, 2024" is not.
"""

from __future__ import annotations

import calendar
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")

MONTHS = tuple(
    "January February March April May June July August September October November December".split()
)
#: Spelled out rather than ``calendar.month_abbr``, which follows the locale.
MONTH_ABBREVIATIONS = tuple("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())
#: Years the dates are drawn from.
YEARS = (1990, 2035)

#: Sentence templates per split, disjoint, so no eval sentence was seen in training.
SENTENCES: dict[Split, tuple[str, ...]] = {
    "train": (
        "We moved the launch to {date}.",
        "The invoice is due on {date}.",
        "Her flight leaves on {date}, early in the morning.",
        "The contract was signed on {date} in Berlin.",
        "Please submit your report by {date}.",
        "The museum reopens on {date} after the renovation.",
        "The package was delivered on {date}.",
        "He was born on {date}.",
        "The warranty expires on {date}.",
        "Registration closes on {date} at noon.",
        "The concert has been rescheduled for {date}.",
        "Our team offsite starts on {date}.",
    ),
    "eval": (
        "The lease ends on {date}.",
        "They got married on {date} in a small chapel.",
        "The final exam is scheduled for {date}.",
        "On {date}, the store will close for inventory.",
        "Tickets for the festival go on sale {date}.",
        "The bridge was opened to traffic on {date}.",
    ),
}

#: How the request is phrased; shared by both splits (the skill is the date, not the wording).
INSTRUCTIONS = (
    "Rewrite the date in this sentence as YYYY-MM-DD: '{sentence}'",
    "What date is mentioned here? Answer in YYYY-MM-DD format only.\n{sentence}",
    'Convert the date in the following sentence to ISO format (YYYY-MM-DD): "{sentence}"',
)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


#: Ways of writing a date in the sentence: name -> (renderer, needs an unambiguous day > 12).
DATE_FORMATS: dict[str, tuple[Callable[[date], str], bool]] = {
    "month_day_year": (lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}", False),
    "day_month_year": (lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}", False),
    "ordinal": (lambda d: f"{MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}", False),
    "ordinal_of": (lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}", False),
    "abbr_month_day_year": (
        lambda d: f"{MONTH_ABBREVIATIONS[d.month - 1]} {d.day}, {d.year}",
        False,
    ),
    "abbr_day_month_year": (
        lambda d: f"{d.day} {MONTH_ABBREVIATIONS[d.month - 1]} {d.year}",
        False,
    ),
    "numeric_dmy": (lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}", True),
    "numeric_mdy": (lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}", True),
    "dotted_dmy": (lambda d: f"{d.day}.{d.month:02d}.{d.year}", True),
}


@dataclass(frozen=True)
class DateExample:
    """One task example: the user's request and the expected answer (ISO date)."""

    prompt: str
    answer: str
    template: str
    date_format: str


def _random_date(rng: random.Random, unambiguous: bool) -> date:
    year = rng.randint(*YEARS)
    month = rng.randint(1, 12)
    last_day = calendar.monthrange(year, month)[1]
    # Numeric forms are ambiguous for days 1..12 (is 05/03 May or March?); avoid them there.
    day = rng.randint(13 if unambiguous else 1, last_day)
    return date(year, month, day)


def make_examples(count: int, split: Split, seed: int = 0) -> list[DateExample]:
    """``count`` examples of ``split``, the same for the same ``(count, split, seed)``.

    The random stream is seeded by split and seed together, and each split uses its own
    sentence templates, so the train and eval sets never share a prompt.

    Raises:
        ValueError: ``count`` is negative or ``split`` unknown.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if split not in SENTENCES:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    rng = random.Random(f"headline-dates:{split}:{seed}")
    templates = SENTENCES[split]
    formats = sorted(DATE_FORMATS)
    examples: list[DateExample] = []
    deck: list[str] = []
    for index in range(count):
        # Templates in turn and formats dealt from reshuffled decks: every one is used evenly
        # even in a small set, in an order that depends on the seed.
        template = templates[index % len(templates)]
        if not deck:
            deck = rng.sample(formats, len(formats))
        name = deck.pop()
        render, unambiguous = DATE_FORMATS[name]
        when = _random_date(rng, unambiguous)
        sentence = template.format(date=render(when))
        sentence = sentence[0].upper() + sentence[1:]  # "the 5th of ..." opening a sentence
        prompt = rng.choice(INSTRUCTIONS).format(sentence=sentence)
        examples.append(DateExample(prompt, when.isoformat(), template, name))
    return examples


# --------------------------------------------------------------------------------------------
# the metric

_ISO_DATE = re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")
_LINE_DECORATION = "`'\". "


def first_iso_date(response: str) -> str | None:
    """The first YYYY-MM-DD in ``response`` (not part of a longer digit run), or ``None``."""
    match = _ISO_DATE.search(response)
    return match.group(0) if match else None


def is_correct(response: str, answer: str) -> bool:
    """Whether the first YYYY-MM-DD of the response is the expected date."""
    return first_iso_date(response) == answer


def is_exact_line(response: str, answer: str) -> bool:
    """The stricter reading: the first line, stripped of quotes and a final period, is exactly
    the answer (what the fine-tuned model is trained to say)."""
    lines = response.strip().splitlines()
    return bool(lines) and lines[0].strip(_LINE_DECORATION) == answer


@dataclass(frozen=True)
class TaskScore:
    """Task figures over an eval set: ``accuracy`` (first ISO date) and ``exact_line``."""

    accuracy: float
    exact_line: float
    correct: int
    total: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return {
            "accuracy": self.accuracy,
            "exact_line": self.exact_line,
            "correct": self.correct,
            "total": self.total,
        }


def score(responses: Sequence[str], answers: Sequence[str]) -> TaskScore:
    """Score responses against their expected answers.

    Raises:
        ValueError: the lengths differ or there is nothing to score.
    """
    if len(responses) != len(answers) or not answers:
        raise ValueError(
            f"need as many responses as answers (and at least one), got {len(responses)} "
            f"and {len(answers)}"
        )
    correct = sum(is_correct(r, a) for r, a in zip(responses, answers, strict=True))
    exact = sum(is_exact_line(r, a) for r, a in zip(responses, answers, strict=True))
    return TaskScore(correct / len(answers), exact / len(answers), correct, len(answers))
