"""Peak memory and step time of memory-efficient vs plain backprop through additive couplings.

A chain of ``depth`` additive couplings, F = 3x3 conv -> BatchNorm -> LeakyReLU on half the
channels, trained with Adam on one input of shape (1, C, S, S). For each depth it reports,
measured in the same run:

- plain autograd: peak memory and step time;
- memory-efficient: peak memory and step time;
- the one-recompute floor: plain step time + one no-grad forward of the chain, i.e. what a
  backward that recomputes every block exactly once cannot beat;
- activation memory: peak minus parameters, gradients and Adam state.

Run on a GPU (peak memory is CUDA's ``max_memory_allocated``; on CPU only times are shown):

    python benchmarks/engine_memory.py --out benchmarks/results/engine_memory_h100.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gib, header, measure, publish  # noqa: E402
from medinv.invertible import AdditiveCoupling, InvertibleSequential  # noqa: E402


def coupling_function(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.LeakyReLU(0.1),
    )


def build(depth: int, channels: int, memory_efficient: bool) -> InvertibleSequential:
    torch.manual_seed(0)
    blocks = [AdditiveCoupling(coupling_function(channels // 2)) for _ in range(depth)]
    return InvertibleSequential(*blocks, memory_efficient=memory_efficient)


def measure_mode(depth: int, memory_efficient: bool, args, device, x) -> dict:
    chain = build(depth, args.channels, memory_efficient).to(device)
    optimizer = torch.optim.Adam(chain.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        chain(x).square().mean().backward()
        optimizer.step()

    def no_grad_forward():
        with torch.no_grad():
            chain(x)

    seconds, peak = measure(step, device, args.warmup, args.repeats)
    # Parameters, gradients and Adam's two moments.
    state = 4 * sum(p.numel() * p.element_size() for p in chain.parameters())
    key = "efficient" if memory_efficient else "plain"
    row = {
        f"{key}_peak_GiB": gib(peak),
        f"{key}_activation_GiB": gib(None if peak is None else peak - state),
        f"{key}_step_ms": 1e3 * seconds,
    }
    if not memory_efficient:
        forward_seconds, _ = measure(no_grad_forward, device, args.warmup, args.repeats)
        row["floor_step_ms"] = 1e3 * (seconds + forward_seconds)
    return row


def run_depth(depth: int, args: argparse.Namespace, device: torch.device) -> dict:
    x = torch.randn(1, args.channels, args.size, args.size, device=device)
    row: dict = {"depth": depth}
    for memory_efficient in (False, True):
        row.update(measure_mode(depth, memory_efficient, args, device, x))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["efficient_vs_plain_time"] = row["efficient_step_ms"] / row["plain_step_ms"]
    row["efficient_vs_floor_time"] = row["efficient_step_ms"] / row["floor_step_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20, 30])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    table = pd.DataFrame([run_depth(d, args, device) for d in args.depths])
    activation = pd.to_numeric(table["efficient_activation_GiB"], errors="coerce")
    flatness = activation.max() / activation.min() if activation.notna().all() else float("nan")
    text = "\n".join(
        [
            "# Engine memory: additive couplings on "
            f"(1, {args.channels}, {args.size}, {args.size})",
            "",
            header(device),
            "",
            table.to_markdown(index=False, floatfmt=".3f"),
            "",
            f"memory-efficient activation memory, max/min over depths: {flatness:.3f}",
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
