"""Measuring the peak memory of a step: CUDA's allocator statistics, or the CPU profiler."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager

import torch

from medinv.errors import ResourceError


def measure_peak(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``step()`` runs, above what was allocated before it.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the profiler's
    allocation and free events in time order, whose running sum's maximum is the peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak(step)


def _cpu_peak(step: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.__enter__()
    try:
        step()
    finally:
        with _quiet_stderr():
            profiler.__exit__(None, None, None)
    results = getattr(profiler.profiler, "kineto_results", None)
    if results is None:
        raise ResourceError("this torch build's profiler does not report CPU memory events")
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    peak = current = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints a line to file descriptor 2 on start and on stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def release_memory(device: torch.device, collect: bool = True) -> None:
    """Return freed memory to the device (between cases, and after an out-of-memory error).

    ``collect``: first let Python free tensors held in reference cycles (an exception's
    traceback frames); needed after an error, a needless pause of ~0.1 s between cases.
    """
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
