"""Small helpers every benchmark shares: timing, peak memory, child processes, JSON and a table.

Nothing here imports torch, so a parent process that only orchestrates benchmark children stays
small: on Linux a process's peak-RSS counter keeps the high-water mark of whatever ran before
``exec`` in it, so a heavy parent would inflate every child's reading.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where benchmark JSON lands (``bench/results/``)."""

REPO_ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


class StepClock:
    """Timestamps of step boundaries, turned into per-step seconds after warm-up.

    Call :meth:`end` when a step finishes and, optionally, :meth:`begin` when it starts.
    ``interval_seconds`` are the gaps between consecutive step ends: everything a training
    loop does per step (data, forward, backward, optimizer, logging), the throughput a user
    sees. ``inner_seconds`` are the begin-to-end times, or the durations passed to ``end``
    by a loop that times its own steps.
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 1:
            # The first timed interval needs the end of a previous step.
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self._began: float | None = None
        self._ends: list[float] = []
        self._inner: list[float] = []

    def begin(self) -> None:
        """Mark the start of a step."""
        self._began = time.perf_counter()

    def end(self, inner_seconds: float | None = None) -> None:
        """Mark the end of a step; ``inner_seconds`` overrides the begin-to-end time."""
        now = time.perf_counter()
        self._ends.append(now)
        if inner_seconds is None and self._began is not None:
            inner_seconds = now - self._began
        if inner_seconds is not None:
            self._inner.append(inner_seconds)
        self._began = None

    @property
    def steps(self) -> int:
        """Steps that have ended."""
        return len(self._ends)

    @property
    def interval_seconds(self) -> list[float]:
        """Seconds between the end of each timed step and the end of the step before it."""
        ends = self._ends
        return [ends[i] - ends[i - 1] for i in range(self.warmup_steps, len(ends))]

    @property
    def inner_seconds(self) -> list[float]:
        """In-step seconds of each timed step (empty when neither source was given)."""
        return self._inner[self.warmup_steps :]


def describe(values: Sequence[float]) -> dict[str, float | int]:
    """Median, mean, min, max and sample standard deviation of a list of timings."""
    if not values:
        raise ValueError("describe needs at least one value")
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of the named distributions (``None`` when one is missing)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info(packages: Sequence[str] = ("torch", "transformers", "peft")) -> dict[str, Any]:
    """What a reader needs to compare runs: CPUs, platform, Python and package versions."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(packages),
    }


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def run_child_json(
    module: str, args: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m module *args --json FILE`` in a fresh process and return what it wrote.

    A fresh process per measurement keeps peak RSS and allocator state from leaking between
    variants. The child's stderr passes through, so its progress shows in the parent's log.

    Raises:
        RuntimeError: the child exited non-zero or wrote no JSON; the message names the command.
    """
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", module, *args, "--json", str(out)]
        completed = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
            timeout=timeout_s,
            stdout=sys.stderr,
            check=False,
        )
        if completed.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"benchmark child failed with exit code {completed.returncode}: {' '.join(command)}"
            )
        return json.loads(out.read_text())


def write_json(data: Mapping[str, Any], path: Path) -> Path:
    """Write ``data`` as indented JSON (parent directories created), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def write_result(name: str, data: Mapping[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write a benchmark's result to ``results_dir/name.json``."""
    return write_json(data, Path(results_dir) / f"{name}.json")


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    formats: Mapping[str, Callable[[Any], str]] | None = None,
) -> str:
    """A plain-text table: one header line, then one line per row, columns padded to fit."""
    formats = formats or {}

    def cell(row: Mapping[str, Any], column: str) -> str:
        value = row.get(column, "")
        if column in formats:
            return formats[column](value)
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(row, column) for column in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
