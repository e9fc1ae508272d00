"""Where the memory-efficient iUNet step spends its time beyond the one-recompute floor.

``iunet_memory.py`` compares the memory-efficient training step with the floor: a plain
step plus one no-grad forward, measured in the same run. This script profiles the three
(same 2D iUNet core as there, same weights) with ``torch.profiler`` and prints, per
operator, how much more the memory-efficient step spends than the floor: calls and self
time (kernel time on CUDA, CPU time on the CPU). On CUDA it also counts what makes the
host wait for the device or the allocator go to the driver (synchronisations,
device-to-host copies, ``cudaMalloc``/``cudaFree``) and reports the step's wall time
next to its summed kernel time, the share the device spends idle.

    python benchmarks/iunet_step_profile.py --delta 5 \
        --out benchmarks/results/iunet_step_profile_h100.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import WAITS, header, profile  # noqa: E402
from benchmarks.iunet_memory import medinv_core, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delta", type=int, default=5, help="couplings per side and scale")
    parser.add_argument("--size", type=int, default=512, help="2D input size (64 channels)")
    parser.add_argument("--levels", type=int, default=5, help="scales (4 downsamplings)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the report here (markdown)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    x = torch.randn(1, 64, args.size, args.size, device=device)
    efficient = medinv_core(64, 2, args.delta, args.levels, True).to(device)
    plain = medinv_core(64, 2, args.delta, args.levels, False).to(device)
    plain.load_state_dict(efficient.state_dict())
    efficient_step, _ = train_step(efficient, x, None)
    plain_step, no_grad_forward = train_step(plain, x, None)

    runs = {
        name: profile(fn, device, args.repeats)[1:]
        for name, fn in [
            ("memory-efficient", efficient_step),
            ("plain", plain_step),
            ("no-grad forward", no_grad_forward),
        ]
    }
    tables = {name: table for name, (table, _) in runs.items()}
    merged = pd.concat(tables, axis=1).fillna(0.0)
    extra = pd.DataFrame(
        {
            "extra_calls": merged[("memory-efficient", "calls")]
            - merged[("plain", "calls")]
            - merged[("no-grad forward", "calls")],
            "extra_ms": merged[("memory-efficient", "ms")]
            - merged[("plain", "ms")]
            - merged[("no-grad forward", "ms")],
            "efficient_calls": merged[("memory-efficient", "calls")],
            "floor_calls": merged[("plain", "calls")] + merged[("no-grad forward", "calls")],
        }
    )
    extra = extra[(extra.extra_calls.abs() > 1e-9) | (extra.extra_ms.abs() > 1e-3)]
    extra = extra.reindex(extra.extra_ms.abs().sort_values(ascending=False).index)

    summary = []
    for name, (table, wall) in runs.items():
        work = table.drop(index=[w for w in WAITS if w in table.index])
        # On CUDA: kernel time; the wall time beyond it is the device waiting for the host.
        row = {
            "run": name,
            "wall_ms": 1e3 * wall,
            "self_ms": work.ms.sum(),
            "aten ops": work.calls[work.index.str.startswith("aten::")].sum(),
        }
        if device.type == "cuda":
            launches = table.calls[table.index.str.contains("LaunchKernel")].sum()
            row.update({"kernel launches": launches})
            row.update({wait: table.calls.get(wait, 0.0) for wait in WAITS})
        summary.append(row)
    summary = pd.DataFrame(summary)
    floor_wall = summary.wall_ms[1] + summary.wall_ms[2]
    title = (
        f"# Memory-efficient iUNet step against the one-recompute floor\n\n{header(device)}\n"
        f"- model: 2D iUNet core, (1, 64, {args.size}, {args.size}), {args.levels} scales, "
        f"delta = {args.delta}; per step, mean over {args.repeats} profiled steps\n"
        f"- step / floor (wall, under the profiler): {summary.wall_ms[0] / floor_wall:.3f}"
    )
    text = "\n\n".join(
        [
            title,
            "## Per run\n\n" + summary.to_markdown(index=False, floatfmt=".2f"),
            f"## Operators where the step differs from the floor (top {args.top} by time)\n\n"
            + extra.head(args.top).to_markdown(floatfmt=".2f"),
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
