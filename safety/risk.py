"""Per-example risk: the shared classifier head, the combined risk rule, the report and the
intake policy.

The two estimators (:mod:`safety.critic`, :mod:`safety.probe`) are light linear heads over frozen
features, so both use :class:`LinearHead` and :func:`fit_linear_head` from here, and both are
judged with :func:`auroc`.

Combined risk (:func:`combine_risk`), per example, in [0, 1]::

    critic_risk = (critic_score - 1) / 4            # critic score 1..5
    risk        = max(critic_risk, probe_weight * probe_prob)

Why this rule: the critic sees the (prompt, response) pair, so it alone can tell a harmful
request answered with a refusal (a *safe* example, one that teaches refusing) from one answered
with compliance (the examples that erode safety). The probe sees only the prompt, as the
reference model reads it, so it measures harmful *intent* and catches requests whose phrasing
the critic's head never saw. Taking the max lets the probe raise the risk of a harmful request
the critic scored low, and scaling it by ``probe_weight`` (default 0.6, below the high-risk
threshold 0.7) caps what intent alone can do: a harmful request with a refusal lands in the
medium band (a moderate KL pull toward the reference, which would refuse too, so little is lost)
and never in the high band, so a file of refusal training data is not rejected at intake. Only
the critic can call an example high-risk. When one signal is missing the other is used as is
(the probe then uncapped: without a critic, intent is all we know).

Bands: ``low`` below ``medium_threshold``, ``high`` at or above ``high_threshold``, ``medium``
between. The intake policy rejects a file whose share of high-risk examples exceeds
``max_high_risk_share`` and names the lines.

Standard library and torch only: no imports from api, workers or core.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

Band = Literal["low", "medium", "high"]
BANDS: tuple[Band, ...] = ("low", "medium", "high")
#: How many line numbers an intake rejection message lists before summarising the rest.
MAX_LINES_IN_MESSAGE = 20


# --------------------------------------------------------------------------------------------
# metrics


def auroc(labels: Sequence[int | bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative.

    Computed exactly from ranks (Mann-Whitney U), ties counting one half.

    Raises:
        ValueError: lengths differ, or one class is absent.
    """
    if len(labels) != len(scores):
        raise ValueError(f"got {len(labels)} labels for {len(scores)} scores")
    positives = sum(1 for y in labels if y)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"AUROC needs both classes, got {positives} positive and {negatives} negative"
        )
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average = (start + end) / 2 + 1  # 1-based average rank of the tied run
        for k in range(start, end + 1):
            ranks[order[k]] = average
        start = end + 1
    rank_sum = sum(rank for rank, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def best_threshold(labels: Sequence[int | bool], scores: Sequence[float]) -> float:
    """The cut on ``scores`` with the best balanced accuracy (``score >= cut`` is positive).

    Returns the midpoint between the two scores the cut separates, so it does not sit on a
    training point.
    """
    ranked = sorted(set(scores))
    positives = sum(1 for y in labels if y)
    negatives = len(labels) - positives
    best, best_cut = -1.0, 0.5
    cuts = [(a + b) / 2 for a, b in itertools.pairwise(ranked)] or [0.5]
    for cut in cuts:
        tp = sum(1 for s, y in zip(scores, labels, strict=True) if y and s >= cut)
        tn = sum(1 for s, y in zip(scores, labels, strict=True) if not y and s < cut)
        balanced = (tp / max(positives, 1) + tn / max(negatives, 1)) / 2
        if balanced > best:
            best, best_cut = balanced, cut
    return best_cut


# --------------------------------------------------------------------------------------------
# the linear head


@dataclass
class LinearHead:
    """A standardised linear classifier: ``logits = ((x - mean) / scale) @ weight.T + bias``.

    One output column is binary logistic regression (``predict_proba`` gives ``p(class 1)``);
    more columns are a softmax over ``classes``.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    scale: Tensor
    classes: list[str] = field(default_factory=list)

    @property
    def binary(self) -> bool:
        """Whether this is a one-logit (binary) head."""
        return self.weight.shape[0] == 1

    def logits(self, features: Tensor) -> Tensor:
        """Raw scores, ``[N]`` for a binary head, ``[N, C]`` otherwise."""
        z = (features.float() - self.mean) / self.scale
        out = z @ self.weight.T + self.bias
        return out[:, 0] if self.binary else out

    def predict_proba(self, features: Tensor) -> Tensor:
        """``p(positive)`` ``[N]`` for a binary head, class probabilities ``[N, C]`` otherwise."""
        out = self.logits(features)
        return torch.sigmoid(out) if self.binary else torch.softmax(out, dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (weights as nested lists)."""
        return {
            "weight": self.weight.tolist(),
            "bias": self.bias.tolist(),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "classes": list(self.classes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`."""
        return cls(
            weight=torch.tensor(data["weight"], dtype=torch.float32),
            bias=torch.tensor(data["bias"], dtype=torch.float32),
            mean=torch.tensor(data["mean"], dtype=torch.float32),
            scale=torch.tensor(data["scale"], dtype=torch.float32),
            classes=list(data.get("classes", [])),
        )


def fit_linear_head(
    features: Tensor,
    labels: Sequence[int],
    *,
    num_classes: int = 2,
    l2: float = 1e-2,
    max_iter: int = 300,
    classes: Sequence[str] = (),
) -> LinearHead:
    """Fit (multinomial) logistic regression with L2 penalty by full-batch L-BFGS.

    Features are standardised first (mean 0, unit variance per column), which keeps L-BFGS well
    conditioned on hidden states whose columns differ in scale by orders of magnitude. Classes
    are weighted inversely to their frequency, so an unbalanced training set does not shift
    every prediction toward the majority class.

    Args:
        features: ``[N, D]``.
        labels: ``N`` ints in ``0..num_classes-1``.
        num_classes: 2 gives a one-logit head; more gives a softmax head.
        l2: penalty on the weights (not the bias), scaled per example.
        max_iter: L-BFGS iterations.
        classes: names of the classes, kept in the head for reports.

    Raises:
        ValueError: shapes disagree or a label is out of range.
    """
    x = features.detach().float().cpu()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {tuple(x.shape)} do not match {y.shape[0]} labels")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {sorted(set(y.tolist()))}")
    mean = x.mean(0)
    scale = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / scale
    counts = torch.bincount(y, minlength=num_classes).float()
    sample_weight = (len(y) / (num_classes * counts.clamp_min(1)))[y]
    outputs = 1 if num_classes == 2 else num_classes
    weight = torch.zeros(outputs, x.shape[1], requires_grad=True)
    bias = torch.zeros(outputs, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        out = z @ weight.T + bias
        if outputs == 1:
            losses = torch.nn.functional.binary_cross_entropy_with_logits(
                out[:, 0], y.float(), reduction="none"
            )
        else:
            losses = torch.nn.functional.cross_entropy(out, y, reduction="none")
        loss = (losses * sample_weight).mean() + l2 * weight.pow(2).sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearHead(
        weight=weight.detach(), bias=bias.detach(), mean=mean, scale=scale, classes=list(classes)
    )


# --------------------------------------------------------------------------------------------
# combined risk and bands


class RiskConfig(BaseModel):
    """How critic scores and probe probabilities become a risk, a band and an intake decision."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    probe_weight: float = Field(default=0.6, ge=0.0, le=1.0)
    """Scale of the probe's probability in ``max(critic_risk, probe_weight * probe_prob)``;
    keep it below ``high_threshold`` so intent alone never makes an example high-risk."""
    medium_threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    """Risk at or above which an example is in the medium band."""
    high_threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    """Risk at or above which an example is high-risk."""
    max_high_risk_share: float = Field(default=0.5, ge=0.0, le=1.0)
    """Intake policy: a file with a larger share of high-risk examples is rejected."""

    @model_validator(mode="after")
    def _check_thresholds(self) -> Self:
        if self.medium_threshold > self.high_threshold:
            raise ValueError(
                f"medium_threshold ({self.medium_threshold}) must be <= high_threshold "
                f"({self.high_threshold})"
            )
        return self


def critic_risk(score: float) -> float:
    """Maps a critic score in 1..5 to [0, 1] (``(score - 1) / 4``, clamped)."""
    return min(max((score - 1.0) / 4.0, 0.0), 1.0)


def combine_risk(
    critic_score: float | None, probe_prob: float | None, config: RiskConfig | None = None
) -> float:
    """The combined risk of one example (the rule is in the module docstring).

    Raises:
        ValueError: both signals are missing.
    """
    config = config or RiskConfig()
    if critic_score is None and probe_prob is None:
        raise ValueError("combine_risk needs a critic score or a probe probability, got neither")
    if critic_score is None:
        assert probe_prob is not None
        return min(max(probe_prob, 0.0), 1.0)
    risk = critic_risk(critic_score)
    if probe_prob is not None:
        risk = max(risk, config.probe_weight * min(max(probe_prob, 0.0), 1.0))
    return risk


def band(risk: float, config: RiskConfig | None = None) -> Band:
    """The band of a risk value."""
    config = config or RiskConfig()
    if risk >= config.high_threshold:
        return "high"
    if risk >= config.medium_threshold:
        return "medium"
    return "low"


# --------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class RiskRow:
    """One example's risk. ``category`` is the critic's guess of the harm category (a slug from
    ``safety.prompts.CATEGORIES``), set only outside the low band."""

    line: int
    critic_score: float | None
    probe_prob: float | None
    risk: float
    band: Band
    category: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON; floats rounded to 4 places."""
        row = asdict(self)
        for key in ("critic_score", "probe_prob", "risk"):
            if row[key] is not None:
                row[key] = round(row[key], 4)
        return row


@dataclass
class RiskReport:
    """The per-example risks of a file and what the intake policy makes of them."""

    rows: list[RiskRow]
    config: RiskConfig = field(default_factory=RiskConfig)

    @property
    def high_risk_lines(self) -> list[int]:
        """Lines of the high-risk examples, in file order."""
        return [row.line for row in self.rows if row.band == "high"]

    @property
    def high_risk_share(self) -> float:
        """Share of examples in the high band (0.0 for an empty report)."""
        return len(self.high_risk_lines) / len(self.rows) if self.rows else 0.0

    def by_band(self) -> dict[str, int]:
        """Example count per band, every band present."""
        counts = Counter(row.band for row in self.rows)
        return {name: counts.get(name, 0) for name in BANDS}

    def by_category(self) -> dict[str, dict[str, int]]:
        """Per category (``none`` for rows without one), the count per band."""
        table: dict[str, dict[str, int]] = {}
        for row in self.rows:
            counts = table.setdefault(row.category or "none", dict.fromkeys(BANDS, 0))
            counts[row.band] += 1
        return dict(sorted(table.items()))

    def summary(self) -> dict[str, Any]:
        """Counts, mean risk and the intake decision, JSON-ready."""
        decision = intake_decision(self)
        mean = sum(row.risk for row in self.rows) / len(self.rows) if self.rows else 0.0
        return {
            "examples": len(self.rows),
            "mean_risk": round(mean, 4),
            "by_band": self.by_band(),
            "by_category": self.by_category(),
            "high_risk_share": round(self.high_risk_share, 4),
            "accepted": decision.accepted,
            "message": decision.message,
        }

    def table(self) -> str:
        """A plain-text summary by band and by category, for terminals and logs."""
        total = max(len(self.rows), 1)
        lines = [f"{'band':8s} {'examples':>9s} {'share':>7s}"]
        for name, count in self.by_band().items():
            lines.append(f"{name:8s} {count:9d} {count / total:7.1%}")
        categories = self.by_category()
        if set(categories) != {"none"}:
            lines.append("")
            lines.append(f"{'category':28s} " + " ".join(f"{b:>7s}" for b in BANDS))
            for category, counts in categories.items():
                lines.append(f"{category:28s} " + " ".join(f"{counts[b]:7d}" for b in BANDS))
        lines.append("")
        lines.append(intake_decision(self).message)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Summary and rows, JSON-ready."""
        return {"summary": self.summary(), "rows": [row.to_dict() for row in self.rows]}


def build_report(
    lines: Sequence[int],
    critic_scores: Sequence[float | None] | None,
    probe_probs: Sequence[float | None] | None,
    categories: Sequence[str | None] | None = None,
    config: RiskConfig | None = None,
) -> RiskReport:
    """Combine per-example signals into a :class:`RiskReport`.

    Args:
        lines: each example's line in the source file.
        critic_scores: 1..5 per example, or ``None`` when no critic ran.
        probe_probs: ``p(harmful)`` per example, or ``None`` when no probe ran.
        categories: the critic's category guess per example, kept outside the low band.
        config: thresholds and the probe weight.

    Raises:
        ValueError: a sequence's length differs from ``lines``, or both signals are missing.
    """
    config = config or RiskConfig()
    count = len(lines)
    critic = list(critic_scores) if critic_scores is not None else [None] * count
    probe = list(probe_probs) if probe_probs is not None else [None] * count
    guesses = list(categories) if categories is not None else [None] * count
    for name, values in (
        ("critic_scores", critic),
        ("probe_probs", probe),
        ("categories", guesses),
    ):
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} values for {count} lines")
    rows = []
    for line, score, prob, category in zip(lines, critic, probe, guesses, strict=True):
        risk = combine_risk(score, prob, config)
        level = band(risk, config)
        rows.append(
            RiskRow(
                line=line,
                critic_score=score,
                probe_prob=prob,
                risk=risk,
                band=level,
                category=category if level != "low" else None,
            )
        )
    return RiskReport(rows=rows, config=config)


# --------------------------------------------------------------------------------------------
# intake policy


@dataclass(frozen=True)
class IntakeDecision:
    """Whether a file passes the intake policy, and a message that says why."""

    accepted: bool
    high_risk_share: float
    lines: list[int]
    message: str


class IntakeRejectedError(ValueError):
    """The intake policy rejected a file; ``decision`` names the high-risk lines."""

    def __init__(self, decision: IntakeDecision):
        self.decision = decision
        super().__init__(decision.message)


def intake_decision(report: RiskReport) -> IntakeDecision:
    """Apply the intake policy: reject when the high-risk share exceeds the configured limit."""
    limit = report.config.max_high_risk_share
    lines = report.high_risk_lines
    share = report.high_risk_share
    shown = ", ".join(str(line) for line in lines[:MAX_LINES_IN_MESSAGE])
    if len(lines) > MAX_LINES_IN_MESSAGE:
        shown += f" and {len(lines) - MAX_LINES_IN_MESSAGE} more"
    if share > limit:
        message = (
            f"rejected: {len(lines)} of {len(report.rows)} examples ({share:.0%}) are high-risk "
            f"(risk >= {report.config.high_threshold}), more than the {limit:.0%} allowed; "
            f"high-risk lines: {shown}. Remove or rewrite them and upload again"
        )
        return IntakeDecision(False, share, lines, message)
    message = f"accepted: {len(lines)} of {len(report.rows)} examples high-risk ({share:.0%})"
    if lines:
        message += f"; lines: {shown}"
    return IntakeDecision(True, share, lines, message)


def enforce_intake(report: RiskReport) -> IntakeDecision:
    """Return the intake decision, raising when the file is rejected.

    Raises:
        IntakeRejectedError: the high-risk share exceeds ``max_high_risk_share``.
    """
    decision = intake_decision(report)
    if not decision.accepted:
        raise IntakeRejectedError(decision)
    return decision


def write_json_atomic(path: str | Path, data: Any, indent: int | None = None) -> Path:
    """Write JSON so that a reader never sees half a file (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_digest(data: Any) -> str:
    """SHA-256 of ``data`` as JSON: how an artifact records the data it was trained on."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def stale_data_message(meta: dict[str, Any], builtin_digest: str | None) -> str | None:
    """Why an artifact with metadata ``meta`` no longer fits the installed built-in prompt
    sets (digest ``builtin_digest``), or ``None``. The result completes "artifact X ...".

    Only artifacts trained on the built-in sets (``meta["builtin_data"]``) are checked: one
    trained on an operator's own data, or on a test's subset, is theirs to keep current.
    """
    if builtin_digest is None or not meta.get("builtin_data"):
        return None
    recorded = meta.get("data_sha256")
    if recorded == builtin_digest:
        return None
    return (
        f"was trained on other built-in prompt sets than the installed ones (data digest "
        f"{str(recorded)[:12]}, installed {builtin_digest[:12]})"
    )


def read_keyed_json(path: str | Path, key: dict[str, Any], field: str) -> dict[str, Any]:
    """The ``field`` mapping of a JSON cache written as ``{**key, field: {...}}``.

    Returns an empty dict when the file is missing or unreadable, or when any entry of ``key``
    differs from what the file holds (the cache was built for other inputs and is stale).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in key.items()):
        return {}
    entries = data.get(field)
    return dict(entries) if isinstance(entries, dict) else {}
