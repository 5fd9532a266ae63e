"""Worker glue for the ASR audit: the model and adapter, the critic, suites and cached baselines.

:mod:`safety.audit` takes everything as arguments; this module supplies them from settings and
the model registry:

* the base model from :func:`workers.models.load`, the adapter through
  ``peft.PeftModel.from_pretrained``;
* the judge: the Safety Critic that the settings select (:func:`workers.risk.load_critic`);
  an audit without it fails early, saying how to build it (``tether critic train``);
* the suites: ``settings.audit_suites`` (empty: the built-in audit split);
* the base model's figures, cached at ``spec.baseline_path`` and keyed by suites, token budget,
  judge and refusal detector, so the base model is audited once per configuration.

Settings read here that ``core.settings`` may not define yet are read with defaults:
``audit_suites`` (``[]``), ``audit_max_new_tokens`` (64), ``audit_batch_size`` (32).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.settings import Settings, get_settings
from safety.audit import (
    AuditConfig,
    AuditReport,
    AuditRun,
    GatePolicy,
    Judge,
    KeywordRefusalDetector,
    RefusalDetector,
    audit_suite,
    baseline_key,
    build_report,
    cached_baseline,
    measure,
)
from safety.critic import CriticError, EmbeddingCritic
from workers.models import load
from workers.risk import load_critic

Progress = Callable[[str], None]


def audit_config(settings: Settings | None = None) -> AuditConfig:
    """Generation settings of the audit (``audit_max_new_tokens``, ``audit_batch_size``)."""
    settings = settings or get_settings()
    return AuditConfig(
        max_new_tokens=settings.audit_max_new_tokens,
        batch_size=settings.audit_batch_size,
    )


def suite_sources(settings: Settings | None = None) -> list[str | Path]:
    """The suites ``settings.audit_suites`` names (``builtin:audit`` and/or files); empty means
    the built-in audit split."""
    settings = settings or get_settings()
    return list(settings.audit_suites)


def load_judge(settings: Settings | None = None) -> Judge:
    """The Safety Critic the settings select, ready to score.

    The embedding critic's sentence-embedding model is loaded here rather than on first use,
    so a missing package fails before minutes of generation, not after.

    Raises:
        CriticError: the critic artifact or its package is missing; the message says how to
            build it (``tether critic train``).
    """
    try:
        critic = load_critic(settings or get_settings())
        if isinstance(critic, EmbeddingCritic):
            critic.embedder  # noqa: B018 - loads the embedding model now
    except CriticError as err:
        raise CriticError(
            f"the audit judges responses with the Safety Critic, which is not ready: {err}. "
            "Build it once with `tether critic train` (a few minutes on a CPU)"
        ) from err
    return critic


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """``model`` with the PEFT adapter in ``adapter_dir`` applied, in eval mode.

    Raises:
        FileNotFoundError: ``adapter_dir`` holds no ``adapter_config.json``.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json); pass the "
            "directory `tether train --out` wrote"
        )
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).eval()


def audit_model(
    model_id: str,
    adapter_dir: str | Path | None = None,
    *,
    suites: Sequence[str | Path] | None = None,
    settings: Settings | None = None,
    judge: Judge | None = None,
    refusal: RefusalDetector | None = None,
    adapter_id: str | None = None,
    baseline_path: Path | None = None,
    device: str | None = None,
    loaded: tuple[Any, Any, Any] | None = None,
    progress: Progress | None = None,
) -> AuditReport:
    """Audit a base model, or an adapter on it, against the release gate of the settings.

    The base model's figures come from the cache at ``spec.baseline_path`` or are measured
    first (and cached). Without an adapter the base model itself is audited, so its change is 0.

    Args:
        model_id: the base model (registry id or local directory).
        adapter_dir: a PEFT adapter directory; ``None`` audits the base model.
        suites: suite sources (``builtin:audit``, file paths); default ``settings.audit_suites``.
        settings: default :func:`core.settings.get_settings`.
        judge: scores harmful pairs; default the Safety Critic of the settings.
        refusal: refusal detector; default the keyword detector.
        adapter_id: the adapter's name in the report (a job id); default ``adapter_dir``.
        baseline_path: where base figures are cached; default ``spec.baseline_path``.
        device: where the model runs; default from settings.
        loaded: ``(model, tokenizer, spec)`` of ``model_id`` already in memory (the worker's,
            after training); the base must carry no adapter. Default: loaded here.
        progress: called with a line of text at each stage.

    Raises:
        CriticError: no judge given and the critic is not built.
        ModelNotFoundError: unknown model id.
        FileNotFoundError: ``adapter_dir`` is not an adapter directory.
        PromptSetError: a suite file is malformed.
    """
    settings = settings or get_settings()
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    config = audit_config(settings)
    policy = GatePolicy.from_settings(settings)
    suite = audit_suite(suites if suites else suite_sources(settings))
    judge = judge or load_judge(settings)
    refusal = refusal or KeywordRefusalDetector()
    model, tokenizer, spec = loaded if loaded is not None else load(model_id, device=device)

    base_run: AuditRun | None = None

    def measure_base() -> Any:
        nonlocal base_run
        say(f"measuring the base model {spec.model_id} (cached for later audits)")
        base_run = measure(
            model, tokenizer, suite, judge, refusal=refusal, config=config, progress=say
        )
        return base_run.figures

    key = baseline_key(spec.model_id, suite.names, config, judge, refusal)
    base_started = time.perf_counter()
    base, was_cached = cached_baseline(baseline_path or spec.baseline_path, key, measure_base)
    base_seconds = time.perf_counter() - base_started
    if adapter_dir is not None:
        say(f"auditing the adapter {adapter_dir}")
        tuned = load_adapter(model, adapter_dir)
        run = measure(tuned, tokenizer, suite, judge, refusal=refusal, config=config, progress=say)
    else:
        # Auditing the base model itself: reuse the run that filled the cache, if any.
        run = base_run or measure(
            model, tokenizer, suite, judge, refusal=refusal, config=config, progress=say
        )
    return build_report(
        run,
        model_id=spec.model_id,
        adapter_id=adapter_id or (str(adapter_dir) if adapter_dir is not None else None),
        suite=suite,
        judge=judge,
        refusal=refusal,
        config=config,
        policy=policy,
        base=base,
        base_cached=was_cached,
        extra_timings={"baseline_s": base_seconds, "total_s": time.perf_counter() - started},
    )
