"""Measurement helpers shared by the benchmarks (DESIGN.md, "Measuring")."""

from __future__ import annotations

import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from argparse import ArgumentParser
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from medinv.devices import describe

RESULTS = Path(__file__).parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    step: Callable[[], None], device: torch.device, warmup: int = 3, repeats: int = 10
) -> tuple[float, int | None]:
    """Median seconds per call and minimum peak allocated bytes (CUDA only) over repeats.

    The peak is reset before each call, so it is the step's own peak including what
    persists between steps (parameters, gradients, optimizer state).
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))
    return statistics.median(times), (min(peaks) if peaks else None)


#: CUDA runtime calls after which the host waits for the device or the driver.
WAITS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpyAsync",
    "cudaMalloc",
    "cudaFree",
)
#: The waits of :data:`WAITS` that drain the device's queue.
SYNCHRONIZATIONS = WAITS[:3]


def profile(fn: Callable[[], None], device: torch.device, repeats: int):
    """``fn`` run ``repeats`` times under ``torch.profiler`` (after one unprofiled call):
    ``(profiler, per-operator table, wall seconds per call)``.

    The table has, per operator key and per call of ``fn``: ``calls``; ``ms``, its self
    time (kernel time on CUDA, CPU time on the CPU; for the :data:`WAITS`, the host's time
    in the call); and ``host_ms``, its self CPU time.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - start) / repeats
    rows = []
    for event in prof.key_averages():
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if event.key in WAITS:
            own = event.self_cpu_time_total  # host time spent in the call
        rows.append((event.key, event.count, own, event.self_cpu_time_total))
    # key_averages keeps one entry per key and device type (a record_function range shows
    # on the CPU and, on CUDA, as a GPU annotation): sum them per key.
    table = pd.DataFrame(rows, columns=["key", "calls", "ms", "host_ms"]).groupby("key").sum()
    table[["ms", "host_ms"]] /= 1e3
    table /= repeats
    table.index.name = None
    return prof, table, wall


def commit() -> str:
    """The measured commit: git's HEAD, or ``MEDINV_COMMIT`` where the tree has no git."""
    if os.environ.get("MEDINV_COMMIT"):
        return os.environ["MEDINV_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(device: torch.device, commit_id: str | None = None) -> str:
    """The provenance block every committed result starts with."""
    command = shlex.join(["python", *sys.argv])
    return "\n".join(
        [
            f"- device: {describe(device)}",
            f"- torch: {torch.__version__} (CUDA {torch.version.cuda})",
            f"- commit: {commit_id or commit()}",
            f"- command: `{command}`",
            f"- date: {time.strftime('%Y-%m-%d')}",
        ]
    )


def add_kspace_set_arguments(parser: ArgumentParser, required: bool = True) -> None:
    """``--data`` (a ``medinv data kspace`` set) and ``--challenge``."""
    parser.add_argument(
        "--data", type=Path, required=required, help="a set built by `medinv data kspace`"
    )
    parser.add_argument("--challenge", default="multicoil", choices=["multicoil", "singlecoil"])


def folder_name(label: str) -> str:
    """A run folder's name for a table row's label: ``"i-RIM (small)"`` -> ``i-RIM_small``."""
    return re.sub(r"[^\w.-]+", "_", label).strip("_")


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f}"


def publish(text: str, out: Path | None) -> None:
    """Print a result and, where ``out`` is given, write it there (folders created)."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text.rstrip("\n") + "\n")
