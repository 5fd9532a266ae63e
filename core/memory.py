"""Keep a training process's resident memory close to what its tensors really use.

On the CPU, PyTorch takes tensor storage from ``malloc``. glibc serves a request below its
mmap threshold from the heap, and raises that threshold (up to 32 MiB on 64-bit systems) every
time a mapped block is freed, so after the first training step the multi-megabyte activations
of a step (a [8, 128, 576] float32 tensor is 2.25 MiB) come from the heap. Freed between
blocks that are still live, they leave holes glibc cannot give back (it trims only the top of
the heap), and the resident set grows well past the live tensors:
SmolLM2-135M LoRA training at 8 x 128 tokens peaked at 3.93 GB here, against 2.56 GB with the
threshold pinned at 2 MiB (``M_MMAP_THRESHOLD`` of glibc's mallopt(3); ``python -m
bench.allocator``, ``off`` variant). Pinning it gives each buffer that large its own mapping,
which goes back to the operating system when it is freed; the price is a fresh, zero-filled
mapping per buffer: 1.28-1.50x the time per step in the same run. So it is opt-in
(``TETHER_HEAP_MMAP_THRESHOLD_KB``), for CPU workers short of memory and not of time.
jemalloc preloaded (``LD_PRELOAD``) did better on both counts there, 2.41 GB at the same step
time, which is why the CPU worker image preloads it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: mallopt(3) parameter number of ``M_MMAP_THRESHOLD`` in glibc's malloc.h.
M_MMAP_THRESHOLD = -3

_applied: int | None = None


def pin_mmap_threshold(threshold_kb: int) -> bool:
    """Make glibc map every allocation of at least ``threshold_kb`` KiB on its own.

    Process-wide and idempotent. ``0`` leaves the C library's default alone. Does nothing
    (and returns False) where the C library is not glibc.

    Returns:
        Whether the threshold is now ``threshold_kb``.
    """
    global _applied
    if threshold_kb <= 0 or not sys.platform.startswith("linux"):
        return False
    if _applied == threshold_kb:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold_kb * 1024) != 1:
        log.warning("mallopt refused an mmap threshold of %d KiB", threshold_kb)
        return False
    _applied = threshold_kb
    log.debug("glibc mmap threshold pinned at %d KiB", threshold_kb)
    return True
