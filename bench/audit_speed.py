"""Speed of the audit's generation: batched greedy decoding vs one prompt at a time (issue 5),
and the compacting decoder vs ``transformers``' own ``generate``.

The same prompts (half harmful, half benign, from the audit split) are answered with
:func:`safety.audit.generate_responses` on SmolLM2-135M-Instruct: once with ``batch_size=1``
(sequential) and once batched (sorted by length, left-padded, KV cache, each answer leaving the
batch at its end token); and once more batched the same way but decoded by ``model.generate``,
which keeps finished answers in the batch until the longest one ends. Reported:

* ``batched_vs_sequential_speedup``: sequential seconds / batched seconds; target >= 4;
* ``compacting_vs_generate_speedup``: ``generate`` seconds / batched seconds (comparison: it
  grows with the spread of answer lengths, so a model that refuses gains most:
  ``--model smollm2-135m-safe``);
* ``prompts_per_s`` of each, and ``new_tokens_per_s`` (tokens actually generated);
* ``identical_responses``: share of prompts whose batched response equals the sequential one,
  and ``identical_to_generate`` the same against ``generate`` (greedy decoding should agree;
  float rounding under padding may flip a rare near-tie).

A warm-up generate runs first so one-time costs (kernel selection, allocator growth) are not
charged to whichever variant goes first. Run::

    python -m bench.audit_speed                # SmolLM2, 64 prompts, 64 new tokens, minutes
    python -m bench.audit_speed --smoke        # tiny-random, 8 prompts, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import RESULTS_DIR, format_table, machine_info, utc_now, write_json

if TYPE_CHECKING:
    from safety.audit import Decoder

NAME = "audit_speed"
TARGETS = {"batched_vs_sequential_speedup": 4.0}


@dataclass(frozen=True)
class Setup:
    """What one run measures."""

    model: str
    prompts: int
    max_new_tokens: int
    batch_size: int


DEFAULTS = Setup("smollm2-135m-instruct", prompts=64, max_new_tokens=64, batch_size=64)
SMOKE = Setup("tiny-random", prompts=8, max_new_tokens=8, batch_size=8)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def audit_prompts(count: int) -> list[str]:
    """``count`` audit-split prompts, alternating harmful and benign."""
    from safety.prompts import benign_prompts, harmful_prompts

    harmful = [p.prompt for p in harmful_prompts("audit")]
    benign = [p.prompt for p in benign_prompts("audit")]
    mixed = [text for pair in zip(harmful, benign, strict=False) for text in pair]
    if count > len(mixed):
        raise ValueError(f"the audit split has {len(mixed)} paired prompts, asked for {count}")
    return mixed[:count]


def time_generation(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    decoder: Decoder = "compact",
) -> tuple[list[str], float, int]:
    """Responses, wall seconds and new tokens generated (counted by re-tokenizing)."""
    from safety.audit import generate_responses

    started = time.perf_counter()
    responses = generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        decoder=decoder,
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)
    return responses, seconds, tokens


def run(model_id: str, count: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Measure both variants; returns the result without writing it."""
    import torch

    from workers.models import load

    model, tokenizer, _ = load(model_id, device="cpu")
    prompts = audit_prompts(count)
    _log(f"warm-up on {model_id}")
    time_generation(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=4)
    _log(f"batched: {count} prompts, batch {batch_size}, {max_new_tokens} new tokens")
    batched, batched_s, batched_tokens = time_generation(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    _log(f"  {batched_s:.1f} s; transformers generate next")
    generated, generate_s, generate_tokens = time_generation(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        decoder="generate",
    )
    _log(f"  {generate_s:.1f} s; sequential next")
    sequential, sequential_s, sequential_tokens = time_generation(
        model, tokenizer, prompts, batch_size=1, max_new_tokens=max_new_tokens
    )
    _log(f"  {sequential_s:.1f} s")
    same = sum(a == b for a, b in zip(batched, sequential, strict=True)) / len(prompts)
    as_generate = sum(a == b for a, b in zip(batched, generated, strict=True)) / len(prompts)
    variants = {
        "sequential": _figures(sequential_s, count, sequential_tokens, 1),
        "generate": _figures(generate_s, count, generate_tokens, batch_size),
        "batched": _figures(batched_s, count, batched_tokens, batch_size),
    }
    return {
        "command": " ".join(["python -m bench.audit_speed", *sys.argv[1:]]),
        "date": utc_now(),
        "machine": {
            **machine_info(),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "setup": {
            "model_id": model_id,
            "prompts": count,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "device": "cpu",
            "decoding": (
                "greedy, KV cache, left padding, prompts sorted by length; finished answers "
                "leave the batch (generate: they stay until the batch ends)"
            ),
        },
        "variants": variants,
        "batched_vs_sequential_speedup": sequential_s / batched_s,
        "compacting_vs_generate_speedup": generate_s / batched_s,
        "identical_responses": same,
        "identical_to_generate": as_generate,
        "targets": TARGETS,
    }


def _figures(seconds: float, prompts: int, tokens: int, batch_size: int) -> dict[str, Any]:
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "prompts_per_s": prompts / seconds,
        "new_tokens": tokens,
        "new_tokens_per_s": tokens / seconds,
    }


def print_table(result: dict[str, Any]) -> None:
    """The two variants side by side, then the speedup against its target."""
    rows = [{"variant": name, **figures} for name, figures in result["variants"].items()]
    columns = ["variant", "batch_size", "seconds", "prompts_per_s", "new_tokens_per_s"]
    print(format_table(rows, columns))
    speedup = result["batched_vs_sequential_speedup"]
    target = TARGETS["batched_vs_sequential_speedup"]
    verdict = "meets" if speedup >= target else "misses"
    print(f"batched_vs_sequential_speedup {speedup:.2f} ({verdict} target >= {target:g})")
    print(f"compacting_vs_generate_speedup {result['compacting_vs_generate_speedup']:.2f}")
    print(f"identical_responses {result['identical_responses']:.3f}")
    print(f"identical_to_generate {result['identical_to_generate']:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run, write the JSON and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny-random, a few prompts")
    parser.add_argument("--model", help=f"model id (default {DEFAULTS.model})")
    parser.add_argument("--prompts", type=int, help=f"prompts (default {DEFAULTS.prompts})")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per prompt (default 64)")
    parser.add_argument("--batch-size", type=int, help="batched variant's batch (default 64)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = SMOKE if args.smoke else DEFAULTS
    result = run(
        args.model or base.model,
        args.prompts or base.prompts,
        args.max_new_tokens or base.max_new_tokens,
        args.batch_size or base.batch_size,
    )
    write_json(result, args.out)
    print_table(result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
