"""Peak training memory and step time of the i-RIM and the RIM against the number of steps.

One Adam step on synthetic multi-coil data (random k-space, a 4x column mask with a fully
sampled centre, random coil maps normalised to ``sum_c |S_c|^2 = 1``, a random target),
batch 1, for each number of time steps:

- ``irim``: the 2D i-RIM, memory-efficient (L1 loss on the final estimate);
- ``irim-plain``: the same modules under plain autograd (the engine's reference);
- ``rim``: the RIM baseline, plain autograd (L1 loss averaged over the time steps);
- ``irim3d``: the 3D i-RIM on a slab of ``--slices`` slices.

Reported per row: parameters, peak memory (CUDA ``max_memory_allocated``, reset before each
step, minimum over the repeats), activation memory (peak minus parameters, gradients, Adam's
two moments and the inputs) and the median step time. The i-RIM's activation memory should
stay flat in the number of steps; the RIM's grows with it.

Run on a GPU (on CPU only times are shown):

    python benchmarks/irim_memory.py --out benchmarks/results/irim_memory_h100.md

A CPU smoke run at toy sizes:

    python benchmarks/irim_memory.py --size 32 --coils 4 --slices 4 --steps 1 2 \\
        --steps-3d 1 2 --state-channels 8 --hidden 8 --warmup 1 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gib, header, measure, publish  # noqa: E402
from medinv.models import IRIM, RIM  # noqa: E402

MODELS = ("irim", "irim-plain", "rim", "irim3d")


def synthetic_data(lead: tuple[int, ...], coils: int, size: int, device: torch.device):
    """Masked k-space ``(*lead, C, H, W)``, its mask, coil maps and a target ``(*lead, H, W)``."""
    generator = torch.Generator().manual_seed(0)
    shape = (*lead, coils, size, size)
    kspace = torch.randn(shape, generator=generator, dtype=torch.complex64)
    sensitivities = torch.randn(shape, generator=generator, dtype=torch.complex64)
    sensitivities /= sensitivities.abs().square().sum(-3, keepdim=True).sqrt()
    mask = (torch.rand(size, generator=generator) < 0.25).float()
    centre = max(1, round(0.08 * size))
    mask[(size - centre) // 2 : (size + centre) // 2] = 1
    mask = mask.view(*(1,) * (len(lead) + 2), size).expand(*lead, 1, 1, size)
    target = torch.randn((*lead, size, size), generator=generator, dtype=torch.complex64)
    return [t.to(device) for t in (kspace * mask, mask, sensitivities, target)]


def build(model: str, steps: int, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "rim":
        return RIM(steps=steps, hidden_channels=args.rim_hidden)
    return IRIM(
        dim=3 if model == "irim3d" else 2,
        state_channels=args.state_channels,
        steps=steps,
        layers_per_step=len(args.dilations),
        dilations=tuple(args.dilations),
        hidden_channels=args.hidden,
        shared_weights=args.shared,
        memory_efficient=model != "irim-plain",
    )


def run(model_name: str, steps: int, args: argparse.Namespace, device: torch.device) -> dict:
    lead = (args.batch, args.slices) if model_name == "irim3d" else (args.batch,)
    kspace, mask, sensitivities, target = synthetic_data(lead, args.coils, args.size, device)
    model = build(model_name, steps, args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def loss() -> torch.Tensor:
        if model_name == "rim":
            estimates = model(kspace, mask, sensitivities, return_all=True)
            return torch.stack([(e - target).abs().mean() for e in estimates]).mean()
        return (model(kspace, mask, sensitivities) - target).abs().mean()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    params = sum(p.numel() for p in model.parameters())
    row = {"model": model_name, "steps": steps, "params_M": params / 1e6}
    try:
        seconds, peak = measure(step, device, args.warmup, args.repeats)
    except torch.OutOfMemoryError:
        return {**row, "peak_GiB": "OOM", "activation_GiB": "OOM", "step_ms": float("nan")}
    finally:
        optimizer.zero_grad(set_to_none=True)
    # Parameters, gradients, Adam's two moments, and the inputs the step reads.
    persistent = 4 * params * 4 + sum(
        t.numel() * t.element_size() for t in (kspace, mask, sensitivities, target)
    )
    return {
        **row,
        "peak_GiB": gib(peak),
        "activation_GiB": gib(None if peak is None else peak - persistent),
        "step_ms": 1e3 * seconds,
    }


def spread(table: pd.DataFrame, model: str) -> str:
    """max/min activation memory over the numbers of steps, for one model."""
    values = pd.to_numeric(table.loc[table["model"] == model, "activation_GiB"], errors="coerce")
    if values.empty or values.isna().any():
        return "n/a"
    return f"{values.max() / values.min():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["irim", "rim", "irim3d"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps-3d", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--size", type=int, default=320, help="image height and width")
    parser.add_argument("--coils", type=int, default=15)
    parser.add_argument("--slices", type=int, default=64, help="slab depth of the 3D i-RIM")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--state-channels", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of the i-RIM's G")
    parser.add_argument("--dilations", type=int, nargs="+", default=[1, 1, 2, 2, 4, 4, 2, 2, 1, 1])
    parser.add_argument("--shared", action="store_true", help="share weights across steps")
    parser.add_argument("--rim-hidden", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    rows = []
    for model in args.models:
        for steps in args.steps_3d if model == "irim3d" else args.steps:
            rows.append(run(model, steps, args, device))
            print(rows[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    text = "\n".join(
        [
            f"# i-RIM vs RIM training memory: {args.coils} coils, {args.size}x{args.size}, "
            f"batch {args.batch}, 3D slab of {args.slices} slices",
            "",
            header(device),
            f"- i-RIM: state {args.state_channels} channels, G {args.hidden} wide, dilations "
            f"{tuple(args.dilations)}, {'shared' if args.shared else 'separate'} weights per "
            f"step; RIM: {args.rim_hidden} hidden",
            "",
            table.to_markdown(index=False, floatfmt=".3f"),
            "",
            "activation memory, max/min over the numbers of steps: "
            + ", ".join(f"{m} {spread(table, m)}" for m in args.models),
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
