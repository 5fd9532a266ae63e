"""Worker-side risk estimation: where the critic and probe artifacts live, and the prescreen.

``safety`` holds the estimators and takes paths as arguments; this module supplies them from
settings and the model registry:

* the critic artifact: ``settings.model_cache_dir / "critic" / "critic.json"``, its score cache
  beside it (``scores.sqlite``); the LLM backend's endpoint from settings when selected;
* the probe artifact: ``spec.probe_path`` of the base model.

:func:`prescreen_file` is what the CLI and the job pipeline call: validate and tokenize a
file, score every example with both estimators, and build the risk report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from core.chatdata import Conversation
from core.settings import Settings, get_settings
from safety.critic import (
    CriticError,
    EmbeddingCritic,
    LLMCritic,
    SafetyCritic,
    ScoreCache,
    builtin_critic_digest,
    train_critic,
)
from safety.probe import ActivationProbe, ProbeError, builtin_probe_digest, train_probe
from safety.risk import RiskConfig, RiskReport, build_report
from workers.data import TokenizedExample
from workers.models import ModelSpec

Progress = Callable[[str], None]
T = TypeVar("T")


def critic_dir(settings: Settings | None = None) -> Path:
    """Where the embedding critic's artifact and the score cache live."""
    return (settings or get_settings()).model_cache_dir / "critic"


def risk_config(settings: Settings | None = None) -> RiskConfig:
    """Thresholds and intake policy from settings."""
    settings = settings or get_settings()
    return RiskConfig(
        high_threshold=settings.high_risk_threshold,
        medium_threshold=min(RiskConfig().medium_threshold, settings.high_risk_threshold),
        max_high_risk_share=settings.intake_max_high_risk_share,
    )


def train_critic_artifact(
    settings: Settings | None = None, progress: Progress | None = None
) -> tuple[Path, dict[str, float]]:
    """Train the embedding critic on the built-in train split and save it.

    Returns:
        The artifact path and its validation figures.
    """
    path = critic_dir(settings) / "critic.json"
    _, evaluation = train_critic(path, progress=progress)
    return path, evaluation.to_dict()


def load_critic(
    settings: Settings | None = None,
    *,
    train_if_missing: bool = False,
    progress: Progress | None = None,
) -> SafetyCritic:
    """The critic the settings select, with the on-disk score cache.

    The backend is ``settings.critic_backend`` (``embedding`` when the setting is absent).
    The ``llm`` backend reads ``critic_llm_base_url``, ``critic_llm_model``,
    ``critic_llm_api_key`` and ``critic_llm_fallback_score``.

    An embedding artifact trained on older built-in prompt sets counts as missing.

    Raises:
        CriticError: the embedding artifact is missing, old or stale (and
            ``train_if_missing`` is off), or the package with the embedding model is not
            installed.
    """
    settings = settings or get_settings()
    cache = ScoreCache(critic_dir(settings) / "scores.sqlite")
    backend = settings.critic_backend
    if backend == "llm":
        # SecretStr in settings keeps the key out of reprs and logs; unwrap it only here.
        secret = settings.critic_llm_api_key
        return LLMCritic(
            settings.critic_llm_base_url,
            settings.critic_llm_model,
            secret.get_secret_value() if secret is not None else None,
            fallback_score=settings.critic_llm_fallback_score,
            cache=cache,
        )
    path = critic_dir(settings) / "critic.json"
    current = builtin_critic_digest()
    return _load_or_train(
        lambda: EmbeddingCritic.from_artifact(path, cache=cache, builtin_digest=current),
        (lambda: train_critic(path, progress=progress)) if train_if_missing else None,
        CriticError,
        progress,
    )


def load_probe(
    spec: ModelSpec,
    model: Any = None,
    tokenizer: Any = None,
    *,
    train_if_missing: bool = False,
    progress: Progress | None = None,
) -> ActivationProbe:
    """The probe of a base model, trained and saved first when missing and allowed.

    A probe trained on other built-in prompt sets than the installed ones (a package
    upgrade) counts as missing.

    Raises:
        ProbeError: the artifact is missing, stale or for another model, and training is off
            (or no model was given to train on).
    """
    current = builtin_probe_digest()

    def train() -> None:
        train_probe(model, tokenizer, spec.model_id, out_path=spec.probe_path, progress=progress)

    return _load_or_train(
        lambda: ActivationProbe.load(
            spec.probe_path, model_id=spec.model_id, builtin_digest=current
        ),
        train if train_if_missing and model is not None else None,
        ProbeError,
        progress,
    )


def _load_or_train(
    load: Callable[[], T],
    train: Callable[[], object] | None,
    unusable: type[Exception],
    progress: Progress | None,
) -> T:
    """``load()``; when it raises ``unusable`` (missing, old or stale artifact) and ``train``
    is given, train the artifact (the layer sweep, on the built-in prompt sets) and load again.
    """
    try:
        return load()
    except unusable as err:
        if train is None:
            raise
        _say(progress, f"{err}: training it now on the built-in prompt sets")
    train()
    return load()


def critic_pair(conversation: Conversation) -> tuple[str, str]:
    """The (prompt, response) the critic judges: the last user turn and the final answer.

    Earlier turns are left out: the critic's heads were trained on single requests, and the
    final request is the one the response answers.
    """
    users = [m.content for m in conversation.messages if m.role == "user"]
    return (users[-1] if users else ""), conversation.response


def score_examples(
    conversations: Sequence[Conversation],
    examples: Sequence[TokenizedExample],
    *,
    model: Any,
    probe: ActivationProbe | None,
    critic: SafetyCritic | None,
    pad_token_id: int = 0,
    config: RiskConfig | None = None,
) -> RiskReport:
    """Score tokenized examples with the critic and the probe and build the report.

    Args:
        conversations: the parsed file (matched to ``examples`` by line).
        examples: the tokenized examples to score; the probe reads ``input_ids[:prompt_len]``.
        model: the reference model (needed when ``probe`` is given).
        probe: the activation probe, or ``None`` to skip it.
        critic: the critic, or ``None`` to skip it.
        pad_token_id: the tokenizer's padding id.
        config: risk thresholds; default from settings.
    """
    by_line = {conversation.line: conversation for conversation in conversations}
    chosen = [by_line[example.line] for example in examples]
    critic_scores = categories = probe_probs = None
    if critic is not None:
        verdicts = critic.assess([critic_pair(c) for c in chosen])
        critic_scores = [v.score for v in verdicts]
        categories = [v.category for v in verdicts]
    if probe is not None:
        probe_probs = probe.score_ids(
            model, [e.input_ids[: e.prompt_len] for e in examples], pad_token_id=pad_token_id
        )
    return build_report(
        [example.line for example in examples],
        critic_scores,
        probe_probs,
        categories,
        config or risk_config(),
    )


def apply_risk(examples: Sequence[TokenizedExample], report: RiskReport) -> None:
    """Write each example's combined risk into ``example.risk`` for the beta schedule."""
    risk = {row.line: row.risk for row in report.rows}
    for example in examples:
        example.risk = risk.get(example.line, example.risk)


def prescreen_file(
    path: Path,
    model_id: str,
    *,
    settings: Settings | None = None,
    use_critic: bool = True,
    use_probe: bool = True,
    train_if_missing: bool = True,
    progress: Progress | None = None,
) -> RiskReport:
    """Validate, tokenize and score a training file: the risk report of ``tether prescreen``.

    Raises:
        DatasetValidationError: the file has problems (all of them are listed).
        ModelNotFoundError: the model id is unknown.
        CriticError, ProbeError: an estimator is unavailable and may not be trained here.
        ValueError: both estimators are turned off.
    """
    from workers.data import parse_and_tokenize
    from workers.models import load

    if not use_critic and not use_probe:
        raise ValueError("prescreen needs the critic, the probe or both; both were turned off")
    settings = settings or get_settings()
    model, tokenizer, spec = load(model_id)
    conversations, examples = parse_and_tokenize(
        Path(path).read_bytes(),
        tokenizer,
        max_bytes=settings.max_upload_bytes,
        max_lines=settings.max_examples,
        max_seq_len=settings.max_seq_len,
    )
    critic = (
        load_critic(settings, train_if_missing=train_if_missing, progress=progress)
        if use_critic
        else None
    )
    probe = (
        load_probe(spec, model, tokenizer, train_if_missing=train_if_missing, progress=progress)
        if use_probe
        else None
    )
    _say(progress, f"scoring {len(examples)} examples")
    return score_examples(
        conversations,
        examples,
        model=model,
        probe=probe,
        critic=critic,
        pad_token_id=tokenizer.pad_token_id or 0,
        config=risk_config(settings),
    )


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)
