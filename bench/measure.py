"""Timing and peak memory of a callable, shared by the benchmarks (``python bench/<name>.py``).

Peak memory is the extra memory the timed calls need on top of what was allocated before them: on CPU the growth of
the resident set (``/proc/self/clear_refs`` resets the high-water mark ``VmHWM`` after ``malloc_trim`` has returned
free heap pages; Linux only), on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
what was allocated, with the device synchronised around every timed call.
"""

from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["measure", "cli_metrics"]

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: the resident set may then keep freed pages and under-count the growth
    _LIBC = None


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 0
            ) -> tuple[float, float, object]:
    """(median ms per call, peak extra MiB during the timed calls, last result), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
    times, result = [], None
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    if cuda:
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    else:
        peak = (_rss_kib("VmHWM") - before) / 1024
    return float(np.median(times)), peak, result


def cli_metrics(stdout: str, prefix: str = "test/") -> dict[str, float]:
    """The ``<prefix>name  value`` rows of the results table ``zoo fit`` / ``zoo test`` print, as ``{name: value}``
    (the results scripts read their runs' figures this way)."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(prefix):
            out[parts[0][len(prefix):]] = float(parts[1])
    return out
