"""The 2D i-RIM's memory model against measured peaks over a sweep of slice batches.

For one k-space shape (coils, height, width), each batch of the sweep runs once as
``medinv reconstruct`` runs a slice batch (``memory_planner.reconstruct_volume`` on a file
of that many slices; random k-space and coil maps, a 4x mask), and its measured peak is set
against the planner's prediction from the calibration probes. Where the straight line of
the memory model leaves the measurements shows which batch sizes it mispredicts; on CUDA,
``--snapshot`` also writes the allocator's history of the largest batch, for PyTorch's
memory viewer (https://pytorch.org/memory_viz), to see which allocations make its peak.
``--budget`` caps the process's memory as ``memory_planner.py`` does; ``--primed-under``
first runs every batch under a smaller cap, as a smaller budget earlier in one process would.

    python benchmarks/planner_sweep.py --shape 19 640 368 --batches 8 16 24 32 35 38 41 42 \\
        --out benchmarks/results/planner_sweep_h100.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gib, header, publish  # noqa: E402
from benchmarks.memory_planner import (  # noqa: E402
    CONFIGS,
    Inputs,
    cap_memory,
    reconstruct_volume,
)
from medinv.inference.memory_model import resident_bytes  # noqa: E402
from medinv.inference.peak import measure_peak, release_memory  # noqa: E402
from medinv.inference.planner import Planner  # noqa: E402
from medinv.inference.plans import parse_memory  # noqa: E402
from medinv.models import build_model  # noqa: E402
from medinv.training.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[19, 640, 368], help="C H W")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 24, 32, 35, 38, 41])
    parser.add_argument("--config", type=Path, default=CONFIGS / "irim_multicoil.yaml")
    parser.add_argument("--snapshot", type=Path, help="CUDA: the largest batch's history")
    parser.add_argument(
        "--budget",
        help="CUDA: cap the process's memory (set_per_process_memory_fraction), as "
        "memory_planner.py emulates a smaller card, e.g. 32GiB",
    )
    parser.add_argument(
        "--primed-under",
        help="CUDA: first run every batch once under this smaller cap (out of memory "
        "allowed), then measure under --budget: shows what a smaller budget earlier in the "
        "same process leaves behind (cuDNN keeps the kernels it fell back to), e.g. 16GiB",
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="run with torch.backends.cudnn.benchmark"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    config = load_config(args.config, task="reconstruct")
    model = build_model(config.model.kind, config.model.kwargs()).to(device).eval()
    planner = Planner(model, device, None)
    inputs = Inputs(seed=0)
    coils, height, width = args.shape
    inputs.kspace(coils, height, width)  # made once, outside what is measured
    resident = resident_bytes(model, "inference")
    if args.primed_under and device.type == "cuda":
        cap_memory(parse_memory(args.primed_under), device)
        for batch in sorted(args.batches):
            shape = (batch, coils, height, width)
            try:
                reconstruct_volume(model, inputs, shape, batch, device)
            except torch.OutOfMemoryError:
                pass
            release_memory(device)
    if args.budget and device.type == "cuda":
        cap_memory(parse_memory(args.budget), device)
    rows = []
    for batch in sorted(args.batches):
        shape = (batch, coils, height, width)
        predicted = planner.plan_reconstruction(shape).predicted_peak
        recording = (
            args.snapshot is not None and device.type == "cuda" and batch == max(args.batches)
        )
        if recording:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        retries = _allocator_retries(device)
        try:
            measured = resident + measure_peak(
                lambda s=shape, b=batch: reconstruct_volume(model, inputs, s, b, device), device
            )
        except torch.OutOfMemoryError:
            measured = None
        if recording:
            torch.cuda.memory._dump_snapshot(str(args.snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
        release_memory(device)
        row = {"batch": batch, "predicted GiB": gib(predicted), "measured GiB": gib(measured)}
        if device.type == "cuda":
            # Where the allocator had to free its cache and retry (under a cap), and what
            # it held from the device, beside what tensors held.
            row["allocator retries"] = _allocator_retries(device) - retries
            row["peak reserved GiB"] = gib(torch.cuda.max_memory_reserved(device))
        if measured is not None:
            row["error %"] = 100 * (predicted - measured) / measured
        if rows and measured is not None and rows[-1]["_measured"] is not None:
            step = batch - rows[-1]["batch"]
            row["measured per slice MiB"] = (measured - rows[-1]["_measured"]) / step / 2**20
        row["_measured"] = measured
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)

    calibration = planner.calibration("inference", "fp32", coils)
    primed = ""
    if args.primed_under and device.type == "cuda":
        primed = f", every batch run once before under {args.primed_under}"
    table = pd.DataFrame(rows).drop(columns="_measured")
    text = "\n".join(
        [
            f"# i-RIM memory model over slice batches, {coils} coils, {height}x{width}",
            "",
            header(device),
            f"- model: `{args.config.name}`; calibrated slope "
            f"{calibration.slope * height * width / 2**20:.1f} MiB per slice, intercept "
            f"{calibration.intercept / 2**20:.1f} MiB",
            f"- memory cap: {args.budget or 'none'}{primed}; "
            f"cudnn.benchmark: {args.cudnn_benchmark}",
            "",
            table.to_markdown(index=False, floatfmt=".3f"),
        ]
    )
    publish(text, args.out)


def _allocator_retries(device: torch.device) -> int:
    """cudaMalloc calls that failed and were retried after freeing the allocator's cache."""
    if device.type != "cuda":
        return 0
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0)


if __name__ == "__main__":
    main()
