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
    trace, _ = cpu_memory_trace(step)
    return max([0, *(allocated for _, allocated in trace)])


def cpu_memory_trace(step: Callable[[], object]) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """What ``step()`` allocates on the CPU, from the profiler's allocation and free events.

    Returns ``(trace, region_ends)``: ``trace`` holds ``(time ns, bytes allocated above
    the start)`` after each event, in time order; ``region_ends`` the end time of each
    ``torch.profiler.record_function`` region the step ran (the last, by name), so that
    the peak up to a point of the step can be read off the trace.
    """
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
    events = list(results.events())
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    trace, allocated = [], 0
    for time_ns, nbytes in changes:
        allocated += nbytes
        trace.append((time_ns, allocated))
    region_ends: dict[str, int] = {}
    for e in events:
        if e.name() != "[memory]":
            region_ends[e.name()] = max(region_ends.get(e.name(), 0), e.end_ns())
    return trace, region_ends


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
