"""Peak memory and step time of CPU training under three C allocators.

The same training children as ``bench.training_overhead`` (``--variant``: SmolLM2-135M, 8 x 128
tokens, a fresh process per run), each run under:

* ``glibc``: the C library's malloc as it comes (``TETHER_HEAP_MMAP_THRESHOLD_KB=0``);
* ``glibc_mmap_2mib``: glibc with its mmap threshold pinned at 2 MiB
  (``TETHER_HEAP_MMAP_THRESHOLD_KB=2048``, see ``core/memory.py``);
* ``jemalloc``: jemalloc preloaded (``LD_PRELOAD``), as the CPU worker image does; skipped and
  said so when the library is not installed (Debian: ``libjemalloc2``).

Rounds are interleaved with the order rotated, since the machine is shared and noisy; step
time is the median of every timed step, peak RSS the worst round. Writes
``bench/results/allocator.json`` and prints a table::

    python -m bench.allocator               # about 10 minutes on 2 cores
    python -m bench.allocator --smoke       # tiny-random, seconds
"""

from __future__ import annotations

import argparse
import ctypes.util
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    format_table,
    machine_info,
    run_child_json,
    utc_now,
    write_json,
)
from bench.training_overhead import summarise_variant

NAME = "allocator"
CHILD_MODULE = "bench.training_overhead"
JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def find_jemalloc() -> str | None:
    """The path of an installed jemalloc shared library, or None."""
    for candidate in JEMALLOC_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return ctypes.util.find_library("jemalloc")


def allocators() -> dict[str, dict[str, str] | None]:
    """allocator name -> the environment its children run with (None: not installed)."""
    jemalloc = find_jemalloc()
    return {
        "glibc": {"TETHER_HEAP_MMAP_THRESHOLD_KB": "0", "LD_PRELOAD": ""},
        "glibc_mmap_2mib": {"TETHER_HEAP_MMAP_THRESHOLD_KB": "2048", "LD_PRELOAD": ""},
        "jemalloc": (
            {"TETHER_HEAP_MMAP_THRESHOLD_KB": "0", "LD_PRELOAD": jemalloc} if jemalloc else None
        ),
    }


def run_all(
    variants: Sequence[str], child_args: Sequence[str], rounds: int, timeout_s: float
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every (allocator, variant) child, ``rounds`` times, the allocator order rotated."""
    envs = {name: env for name, env in allocators().items() if env is not None}
    names = list(envs)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {v: [] for v in variants} for n in names}
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            for variant in variants:
                print(f"[{NAME}] round {round_index + 1}: {variant} under {name}", file=sys.stderr)
                args = ["--variant", variant, *child_args]
                runs[name][variant].append(
                    run_child_json(CHILD_MODULE, args, timeout_s=timeout_s, env=envs[name])
                )
    return runs


def pooled(children: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One (allocator, variant)'s rounds, pooled as ``training_overhead`` pools a variant's."""
    return {**summarise_variant(children), "rounds": len(children)}


def summarise(
    runs: dict[str, dict[str, list[dict[str, Any]]]], variants: Sequence[str], command: str
) -> dict[str, Any]:
    """The result: figures per allocator and variant, and ratios against plain glibc."""
    figures = {name: {v: pooled(runs[name][v]) for v in variants} for name in runs}
    base = figures["glibc"]
    ratios: dict[str, dict[str, float]] = {}
    for name, per_variant in figures.items():
        for variant, fig in per_variant.items():
            ratios.setdefault(name, {})[f"{variant}_peak_rss_vs_glibc"] = (
                fig["peak_rss_mb"] / base[variant]["peak_rss_mb"]
            )
            ratios[name][f"{variant}_step_time_vs_glibc"] = (
                fig["median_step_s"] / base[variant]["median_step_s"]
            )
        if "off" in per_variant and "adaptive_harmful" in per_variant:
            ratios[name]["adaptive_harmful_vs_off_peak_rss"] = (
                per_variant["adaptive_harmful"]["peak_rss_mb"] / per_variant["off"]["peak_rss_mb"]
            )
    missing = [name for name, env in allocators().items() if env is None]
    return {
        "benchmark": NAME,
        "command": command,
        "date": utc_now(),
        "machine": machine_info(),
        "child": CHILD_MODULE,
        "variants": list(variants),
        "figures": figures,
        "ratios": ratios,
        "not_installed": missing,
    }


def render(result: dict[str, Any]) -> str:
    rows = [
        {
            "allocator": name,
            "variant": variant,
            "peak RSS MB": f"{fig['peak_rss_mb']:.0f}",
            "RSS vs glibc": f"{result['ratios'][name][f'{variant}_peak_rss_vs_glibc']:.2f}",
            "step s": f"{fig['median_step_s']:.2f}",
            "time vs glibc": f"{result['ratios'][name][f'{variant}_step_time_vs_glibc']:.2f}",
        }
        for name, per_variant in result["figures"].items()
        for variant, fig in per_variant.items()
    ]
    table = format_table(rows, list(rows[0]))
    if result["not_installed"]:
        table += f"\nnot installed, skipped: {', '.join(result['not_installed'])}"
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__)
    parser.add_argument("--variants", default="off,adaptive_harmful", help="training variants")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (default 4)")
    parser.add_argument("--smoke", action="store_true", help="tiny-random, 2 timed steps")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.rounds < 1 or args.steps < 1 or not variants:
        raise SystemExit("--rounds and --steps must be >= 1 and --variants non-empty")
    child_args = ["--smoke"] if args.smoke else ["--steps", str(args.steps), "--warmup", "1"]
    runs = run_all(variants, child_args, args.rounds, args.timeout)
    command = shlex.join(
        ["python", "-m", f"bench.{NAME}", *(sys.argv[1:] if argv is None else argv)]
    )
    result = summarise(runs, variants, command)
    write_json(result, args.out)
    print(render(result))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
