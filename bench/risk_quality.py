"""Quality and speed of the risk estimators (issue 4), on SmolLM2-135M-Instruct.

* ``probe_auroc``: the activation probe (layer sweep on the train split, best layer by
  validation AUROC), AUROC of harmful vs benign requests on the validation split; target 0.97.
* ``critic_auroc``: the embedding critic (trained on the train split), harmful compliance vs
  refusals and benign answers on the validation split; target 0.95.
* ``refusal_accuracy``: the critic deciding refusal vs compliance for the validation split's
  refusals and compliance openers; target 0.95. ``keyword_refusal_accuracy`` is the keyword
  detector on the same texts, for comparison.
* ``prescreen_seconds_per_1000``: critic + probe scoring of a tokenized file on this machine,
  with an empty score cache (and ``..._cached`` for the re-run, served from the cache).

Both estimators choose hyperparameters (layer, pooling, penalty) on the validation split, so
their validation figures are slightly optimistic; the ``audit`` block reports the same figures
on the audit split, which nothing was trained or tuned on, as the honest held-out check.

The trained artifacts are saved where the worker looks for them (the critic under the model
cache, the probe at the model's ``probe_path``), so a prescreen after this run needs no
training. Run::

    python -m bench.risk_quality            # SmolLM2, a few minutes on 2 CPU cores
    python -m bench.risk_quality --smoke    # tiny-random and small subsets, seconds
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, format_table, machine_info, utc_now, write_json

NAME = "risk_quality"
TARGETS = {"probe_auroc": 0.97, "critic_auroc": 0.95, "refusal_accuracy": 0.95}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_critic(smoke: bool) -> tuple[Any, dict[str, Any]]:
    """Train the critic, evaluate it on validation and audit; returns it and the figures."""
    from safety.critic import critic_data, evaluate_critic, train_critic
    from workers.risk import critic_dir

    started = time.perf_counter()
    options: dict[str, Any] = {}
    if smoke:
        options = {"layers": (2, 4), "penalties": (0.1,), "response_tokens": 64}
    critic, validation = train_critic(
        None if smoke else critic_dir() / "critic.json", progress=_log, **options
    )
    seconds = time.perf_counter() - started
    audit = evaluate_critic(critic, critic_data("audit"))
    return critic, {
        "validation": validation.to_dict(),
        "audit": audit.to_dict(),
        "selection": critic.heads.meta.get("selection"),
        "train_seconds": round(seconds, 1),
    }


def measure_probe(model: Any, tokenizer: Any, spec: Any, smoke: bool) -> tuple[Any, dict]:
    """Train the probe (layer sweep), evaluate it on the audit split too."""
    from safety.probe import probe_data, train_probe
    from safety.risk import auroc

    started = time.perf_counter()
    probe = train_probe(
        model,
        tokenizer,
        spec.model_id,
        out_path=None if smoke else spec.probe_path,
        progress=_log,
    )
    seconds = time.perf_counter() - started
    audit = probe_data("audit")
    audit_auroc = auroc(audit.labels, probe.score_texts(model, tokenizer, audit.prompts))
    return probe, {
        "layer": probe.layer,
        "pooling": probe.pooling,
        "threshold": round(probe.threshold, 4),
        "validation_auroc": round(probe.auroc or 0.0, 4),
        "audit_auroc": round(audit_auroc, 4),
        "sweep": probe.meta["sweep"],
        "train_seconds": round(seconds, 1),
    }


def measure_prescreen(
    model: Any, tokenizer: Any, critic: Any, probe: Any, examples: int
) -> dict[str, float]:
    """Time tokenizing and scoring ``examples`` chat examples, cold and then cached."""
    from core.chatdata import Conversation, Message
    from safety.critic import EmbeddingCritic, ScoreCache, critic_data
    from workers.data import tokenize_conversations
    from workers.risk import score_examples

    pairs = critic_data("validation").pairs
    rng = random.Random(0)
    conversations = [
        Conversation(line, [Message("user", prompt), Message("assistant", response)])
        for line, (prompt, response) in enumerate(
            (rng.choice(pairs) for _ in range(examples)), start=1
        )
    ]
    # Distinct pairs so the cold run computes every one: the cache would otherwise dedupe.
    for conversation in conversations:
        conversation.messages[0].content += f" (example {conversation.line})"
    fresh = EmbeddingCritic(critic.heads, critic.embedder, cache=ScoreCache())

    def run() -> float:
        started = time.perf_counter()
        tokenized, _ = tokenize_conversations(conversations, tokenizer, 1024)
        score_examples(
            conversations,
            tokenized,
            model=model,
            probe=probe,
            critic=fresh,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        return time.perf_counter() - started

    cold = run()
    # The probe is not cached (it needs the model anyway), so the re-run still pays for it.
    warm = run()
    return {
        "examples": examples,
        "prescreen_seconds_per_1000": round(cold * 1000 / examples, 2),
        "prescreen_seconds_per_1000_cached_critic": round(warm * 1000 / examples, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny-random, seconds")
    parser.add_argument("--model", default=None, help="default smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=None, help="prescreen timing size")
    parser.add_argument("--json", type=Path, default=None, help="result path")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cli.main import quiet_transformers
    from workers.models import load

    quiet_transformers()
    model_id = args.model or ("tiny-random" if args.smoke else "smollm2-135m-instruct")
    examples = args.examples or (50 if args.smoke else 500)
    model, tokenizer, spec = load(model_id, device="cpu")
    _log("critic: training and evaluating")
    critic, critic_figures = measure_critic(args.smoke)
    _log(f"probe: layer sweep on {model_id}")
    probe, probe_figures = measure_probe(model, tokenizer, spec, args.smoke)
    _log(f"prescreen: timing {examples} examples")
    timing = measure_prescreen(model, tokenizer, critic, probe, examples)

    validation = critic_figures["validation"]
    headline = {
        "probe_auroc": probe_figures["validation_auroc"],
        "critic_auroc": validation["critic_auroc"],
        "refusal_accuracy": validation["refusal_accuracy"],
        "keyword_refusal_accuracy": validation["keyword_refusal_accuracy"],
        "prescreen_seconds_per_1000": timing["prescreen_seconds_per_1000"],
    }
    audit = {
        "probe_auroc": probe_figures["audit_auroc"],
        "critic_auroc": critic_figures["audit"]["critic_auroc"],
        "refusal_accuracy": critic_figures["audit"]["refusal_accuracy"],
        "keyword_refusal_accuracy": critic_figures["audit"]["keyword_refusal_accuracy"],
    }
    result = {
        "benchmark": NAME,
        "created": utc_now(),
        "model": model_id,
        "smoke": args.smoke,
        **headline,
        "targets": TARGETS,
        "passed": {name: headline[name] >= target for name, target in TARGETS.items()},
        "audit": audit,
        "critic": critic_figures,
        "probe": probe_figures,
        "prescreen": timing,
        "machine": {**machine_info(), "load_average": os.getloadavg()},
    }
    path = args.json or (RESULTS_DIR / f"{NAME}{'_smoke' if args.smoke else ''}.json")
    write_json(result, path)
    rows = [
        {
            "metric": name,
            "validation": headline[name],
            "audit": audit.get(name, ""),
            "target": TARGETS.get(name, ""),
        }
        for name in headline
    ]
    print(format_table(rows, ["metric", "validation", "audit", "target"]))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
