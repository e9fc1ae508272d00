"""Time of one reconstruction training step, and the operators it runs.

A small reconstructor on small images does little arithmetic per operator, so on a GPU its
step time is mostly host time: one dispatch (and kernel launch) per operator. This
benchmark runs medinv's training step (the prepared measurement moved to the device,
forward, SSIM + L1 loss, backward, gradient clipping, Adam) on slices of a k-space set for
each config, and reports the median time per step and the number of ATen operators per
step (nested ones included, from the profiler), and the step's time on a tiny input (4
coils, 16x16), where the arithmetic is negligible: what the host spends per step (Python,
dispatch, kernel launches), the floor of a host-bound step. The loader's workers prepare
each batch's measurement (coil maps, scale) while the device trains; its time per batch on
this host is reported beside the step. On CUDA the profiler also gives each step's summed
kernel time and its synchronisations (a step whose kernels take a small share of its time
is host-bound), and ``--top N`` lists each variant's N operators of most host time. The
i-RIM runs memory-efficiently with its orthogonal layers' weights batched (the default),
memory-efficiently without batching (each layer's weight computed at each use, the
baseline) and with plain autograd.

    python benchmarks/recon_step_time.py --data data/kspace_small \\
        --configs configs/irim_multicoil_small_gpu.yaml configs/irim_multicoil_wide_gpu.yaml \\
        configs/rim_multicoil_small.yaml --top 15 \\
        --out benchmarks/results/recon_step_time_h100.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    SYNCHRONIZATIONS,
    WAITS,
    add_kspace_set_arguments,
    header,
    measure,
    profile,
    publish,
)
from medinv.inference.reconstruction import Measurement, magnitude_crop  # noqa: E402
from medinv.invertible import orthogonal  # noqa: E402
from medinv.models import build_model  # noqa: E402
from medinv.training.config import load_config  # noqa: E402
from medinv.training.reconstruction import (  # noqa: E402
    MeasuredBatches,
    ReconstructionLoss,
    _estimates,
    slice_dataset,
)

ROOT = Path(__file__).resolve().parents[1]


def variants(kind: str) -> list[tuple[str, dict, bool]]:
    """``(name, model overrides, batched weights)`` to run for a model kind."""
    if kind != "irim":
        return [("plain autograd", {}, True)]
    return [
        ("memory-efficient, batched weights", {"memory_efficient": True}, True),
        ("memory-efficient, weight per use", {"memory_efficient": True}, False),
        ("plain autograd", {"memory_efficient": False}, True),
    ]


def training_step(config, overrides: dict, batches: list[dict], device: torch.device):
    """medinv's reconstruction training step as a function of nothing, cycling ``batches``."""
    kind = config.model.kind
    torch.manual_seed(0)
    model = build_model(kind, config.model.kwargs() | overrides).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    loss_fn = ReconstructionLoss(config.train.ssim_weight, config.train.l1_weight)
    position = [0]

    def step() -> None:
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        measurement = batch["measurement"].to(device)
        target = batch["target"].to(device)
        estimates = _estimates(model, kind, measurement)
        losses = [loss_fn(magnitude_crop(e, target.shape[-2:]).float(), target) for e in estimates]
        torch.stack(losses).mean().backward()
        optimizer_update(model, optimizer, config.train.grad_clip)

    params = sum(p.numel() for p in model.parameters())
    return step, params


#: The tiny input of the host-cost column: 4 coils, 16x16, where the arithmetic is
#: negligible and a step's time is the host's (Python, dispatch, kernel launches).
TINY = (4, 16, 16)


def tiny_batches(multicoil: bool) -> list[dict]:
    """One seeded batch of :data:`TINY` k-space, coil maps, full mask and target."""
    generator = torch.Generator().manual_seed(0)
    coils, height, width = TINY
    shape = (1, coils, height, width) if multicoil else (1, height, width)
    kspace = torch.randn(shape, dtype=torch.complex64, generator=generator)
    maps = torch.randn(shape, dtype=torch.complex64, generator=generator) if multicoil else None
    if maps is not None:
        maps /= maps.abs().square().sum(1, keepdim=True).sqrt()
    mask = torch.ones(1, *([1] * (len(shape) - 2)), width)
    measurement = Measurement(kspace, mask, maps, torch.ones(1))
    return [
        {"measurement": measurement, "target": torch.rand(1, height, width, generator=generator)}
    ]


#: The profiler's label of the update: gradient clipping, Adam's step, zeroing the gradients.
UPDATE = "optimizer update"


def optimizer_update(model, optimizer, grad_clip: float | None) -> None:
    """Clip, step and zero the gradients as medinv's training does, under :data:`UPDATE`.

    On the CPU, Adam and clipping run per parameter tensor (a dozen operators each); on
    CUDA they default to multi-tensor kernels, so this part's count differs by device.
    """
    with record_function(UPDATE):
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or 1e9)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class StepProfile:
    """What one training step runs, per step, from the profiler (:func:`step_profile`)."""

    operators: float  #: ATen operators, nested ones included
    update_operators: float  #: of which the optimizer update's (:func:`optimizer_update`)
    kernel_ms: float  #: CUDA: summed kernel time; NaN on the CPU
    synchronizations: float  #: CUDA: calls that drain the device's queue; NaN on the CPU
    operators_table: pd.DataFrame  #: per operator: calls, ms (self), host_ms


def step_profile(step, device: torch.device, repeats: int = 3) -> StepProfile:
    """Profile ``repeats`` calls of ``step`` (after one unprofiled call) and average."""
    prof, table, _ = profile(step, device, repeats)
    total = update = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            total += 1
            update += _under(event, UPDATE)
    kernel_ms = synchronizations = float("nan")
    if device.type == "cuda":
        kernel_ms = table.ms.drop(index=[w for w in WAITS if w in table.index]).sum()
        synchronizations = table.calls.reindex(SYNCHRONIZATIONS, fill_value=0.0).sum()
    return StepProfile(total / repeats, update / repeats, kernel_ms, synchronizations, table)


def _under(event, label: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == label:
            return True
        parent = parent.cpu_parent
    return False


def timed_step(
    make_step, batched: bool, device: torch.device, warmup: int, repeats: int, profiled=True
):
    """``(parameters, seconds, peak bytes or None, StepProfile or None)`` of the training
    step ``make_step()`` builds (returning ``(step, parameters)``), with chains batching
    their orthogonal matrices or computing them at each use; profiled unless told not."""
    orthogonal.BATCH_WEIGHTS = batched
    try:
        step, params = make_step()
        seconds, peak = measure(step, device, warmup, repeats)
        return params, seconds, peak, step_profile(step, device) if profiled else None
    finally:
        orthogonal.BATCH_WEIGHTS = True


def step_columns(
    make_step, make_tiny, tiny_label: str, batched: bool, device, args
) -> tuple[dict, pd.DataFrame]:
    """The step benchmarks' measured columns for one variant, and its per-operator table.

    The columns: :func:`timed_step` of ``make_step`` (size, time, operators, peak; on
    CUDA also the kernel time and the synchronisations per step, which tell a host-bound
    step from a device-bound one), and the time of ``make_tiny`` (the same step on a tiny
    input, the host's floor) under ``tiny_label``, NaN where None.
    """
    params, seconds, peak, prof = timed_step(make_step, batched, device, args.warmup, args.repeats)
    host = float("nan")
    if make_tiny is not None:
        host = timed_step(make_tiny, batched, device, args.warmup, args.repeats, profiled=False)[1]
    columns = {
        "parameters": params,
        "ms per step": 1e3 * seconds,
        tiny_label: 1e3 * host,
        "ATen operators per step": prof.operators,
        "of which optimizer update": prof.update_operators,
    }
    if device.type == "cuda":
        columns |= {
            "kernel ms per step": prof.kernel_ms,
            "synchronizations per step": prof.synchronizations,
        }
    columns["peak GiB"] = float("nan") if peak is None else peak / 2**30
    return columns, prof.operators_table


def host_time_section(label: str, table: pd.DataFrame, top: int) -> str:
    """A report section: the ``top`` operators of one variant's step by the host's own
    time in them (CPU time; on CUDA with each one's kernel time beside it)."""
    table = table.sort_values("host_ms", ascending=False).head(top)
    table = table.rename(columns={"calls": "calls per step", "ms": "self ms", "host_ms": "host ms"})
    return f"### {label}: host time by operator (top {top})\n\n" + table.to_markdown(floatfmt=".2f")


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """``--warmup``, ``--repeats``, ``--device``, ``--out`` and ``--top`` of the step
    benchmarks."""
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--top", type=int, default=0, help="list each variant's N operators of most host time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_kspace_set_arguments(parser)
    parser.add_argument("--configs", type=Path, nargs="+", required=True)
    parser.add_argument("--slices", type=int, default=8, help="training slices cycled")
    add_step_arguments(parser)
    args = parser.parse_args()
    device, cpu = torch.device(args.device), torch.device("cpu")
    rows, sections = [], []
    for path in args.configs:
        config = load_config(path, task="reconstruct")
        folder = args.data / f"{args.challenge}_train"
        dataset = slice_dataset(folder, config, fixed_masks=True, stride=config.data.slab_stride)
        items = [[dataset[i]] for i in range(min(args.slices, len(dataset)))]
        batches = [MeasuredBatches(config)(item) for item in items]
        prepare = measure(lambda it=items[0], c=config: MeasuredBatches(c)(it), cpu)[0]
        for name, overrides, batched in variants(config.model.kind):
            tiny = None  # a 3D model's input is a slab: no tiny slice for it
            if config.model.dim == 2:
                batch = tiny_batches(config.data.challenge == "multicoil")
                tiny = partial(training_step, config, overrides, batch, device)
            columns, operators = step_columns(
                partial(training_step, config, overrides, batches, device),
                tiny,
                "ms per step at 16x16",
                batched,
                device,
                args,
            )
            rows.append(
                {"config": path.name, "model": config.model.kind, "variant": name}
                | columns
                | {"prepare ms per batch": 1e3 * prepare}
            )
            if args.top:
                sections.append(host_time_section(f"{path.name}, {name}", operators, args.top))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    text = "\n".join(
        [
            "# Reconstruction training step: time and operators per step",
            "",
            header(device),
            f"- data: `{args.data}` ({args.challenge}), batch 1, {len(batches)} slices cycled; "
            f"median of {args.repeats} steps after {args.warmup}",
            "",
            table.to_markdown(index=False, floatfmt=".1f"),
            *("\n" + section for section in sections),
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
