"""core.memory: the pinned mmap threshold hands freed large buffers back to the OS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from core.memory import pin_mmap_threshold

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")


def test_zero_leaves_the_default_alone() -> None:
    assert pin_mmap_threshold(0) is False


@glibc
def test_freed_buffers_above_the_threshold_leave_the_resident_set() -> None:
    # In a fresh interpreter: free one 3 MiB buffer first (with glibc's default that raises the
    # mmap threshold past 3 MiB, so later buffers of that size come from the heap), then hold
    # 64 of them and free every other one, as a training step frees some activations while
    # others live on. Heap holes between live blocks stay resident; mapped blocks go back.
    script = textwrap.dedent(
        """
        import ctypes, os, sys
        from core.memory import pin_mmap_threshold

        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

        if sys.argv[1] == "pin":
            assert pin_mmap_threshold(1024)
            assert pin_mmap_threshold(1024)  # idempotent
        size = 3 * 2**20
        ctypes.create_string_buffer(size)  # allocated and freed at once
        held = []
        for _ in range(64):
            buf = ctypes.create_string_buffer(size)
            ctypes.memset(buf, 1, size)
            held.append(buf)
        del buf
        peak = rss_mb()
        del held[::2]
        print(peak - rss_mb())
        """
    )

    def released_mb(mode: str) -> float:
        run = [sys.executable, "-c", script, mode]
        return float(subprocess.run(run, capture_output=True, text=True, check=True).stdout)

    assert released_mb("pin") > 80  # 32 x 3 MiB went back to the OS
