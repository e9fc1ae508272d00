"""The iUNet memory table: medinv against the reference iunets library, in one run.

Two parts, both training steps (forward, loss, backward, Adam step) measured as DESIGN.md
prescribes (peak = min over repeats of CUDA's max_memory_allocated, reset before each step;
time = synchronised median after warm-up). On the CPU (``--device cpu``, smaller shapes) the
peaks come from the profiler's allocation events of one more step, plus what the step starts
with (parameters, gradients, Adam's moments), which is what CUDA's counter would include:

- ``2d``: the iUNet core on (1, 64, 512, 512), 4 downsamplings, delta coupling layers per
  side and scale. medinv memory-efficient and plain, the one-recompute floor (plain step
  + one no-grad forward), and the peer memory-efficient and conventional.
- ``3d``: a whole 240x240x160 volume through 1x1x1 conv 4 -> C, an iUNet with 5 scales and
  2 couplings per side and scale, 1x1x1 conv C -> 3; C in {16, 32, 64}, fp32 and bf16
  autocast; medinv and the peer in both modes.
- ``fit`` (optional): the largest volume each model trains on within 16 and 32 GiB,
  emulated with ``torch.cuda.set_per_process_memory_fraction``.

Both libraries get the same architecture: single-function additive couplings alternating
halves, F = 3x3 conv (no bias) -> LeakyReLU -> layer norm (zero-initialised), Cayley
orthogonal resampling initialised to Haar, orthogonal channel mixing at each split and
merge. "activation" is the peak reached by the end of backward minus parameters,
gradients and Adam's two moments ("peak" also covers Adam's update, whose temporaries
grow with the number of parameters).

Peer: ``make bench-peers`` (pip install --no-deps iunets==0.1 memcnn==1.5.2).

    python benchmarks/iunet_memory.py --parts 2d 3d --out benchmarks/results/iunet_h100
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gib, header, measure  # noqa: E402
from medinv.inference.memory_model import PRECISIONS  # noqa: E402
from medinv.inference.peak import cpu_memory_trace  # noqa: E402
from medinv.models import InvertibleUNet  # noqa: E402

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def matched_block(in_channels: int, out_channels: int, dim: int) -> nn.Module:
    """The reference library's default coupling function, for a like-for-like comparison."""
    norm = nn.GroupNorm(1, out_channels, eps=1e-3)
    nn.init.zeros_(norm.weight)
    nn.init.zeros_(norm.bias)
    return nn.Sequential(
        _CONV[dim](in_channels, out_channels, 3, padding=1, bias=False),
        nn.LeakyReLU(inplace=True),
        norm,
    )


def medinv_core(channels: int, dim: int, depth: int, levels: int, memory_efficient: bool):
    return InvertibleUNet(
        channels,
        dim=dim,
        architecture=(depth,) * levels,
        coupling_functions=1,
        block_builder=matched_block,
        parametrization="cayley",
        memory_efficient=memory_efficient,
    )


def peer_core(channels: int, dim: int, depth: int, levels: int, memory_efficient: bool):
    from iunets import iUNet

    return iUNet(
        in_channels=channels,
        architecture=(depth,) * levels,
        dim=dim,
        disable_custom_gradient=not memory_efficient,
        verbose=0,
    )


def segmenter(core: nn.Module, channels: int, dim: int) -> nn.Module:
    return nn.Sequential(_CONV[dim](4, channels, 1), core, _CONV[dim](channels, 3, 1))


VARIANTS: dict[str, Callable] = {
    "medinv memory-efficient": lambda *a: medinv_core(*a, memory_efficient=True),
    "medinv plain": lambda *a: medinv_core(*a, memory_efficient=False),
    "iunets memory-efficient": lambda *a: peer_core(*a, memory_efficient=True),
    "iunets conventional": lambda *a: peer_core(*a, memory_efficient=False),
}


def train_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, peaks=None):
    """A training step; where ``peaks`` is a list, each step appends the CUDA peak reached
    by the end of its backward (before Adam's update, whose temporaries scale with the
    number of parameters, not with the activations)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = model(x)
        with torch.profiler.record_function("backward"):
            y.float().square().mean().backward()
        if peaks is not None and x.is_cuda:
            peaks.append(torch.cuda.max_memory_allocated(x.device))
        optimizer.step()

    def no_grad_forward():
        with (
            torch.no_grad(),
            torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            model(x)

    return step, no_grad_forward


def cpu_peaks(step, held: int) -> tuple[int, int]:
    """Peak bytes of one more step on the CPU, over the step and up to the end of its
    backward, from the profiler's allocation events (``held``: what the step starts
    with, as CUDA's peak would count it: parameters, gradients, Adam's moments)."""
    trace, region_ends = cpu_memory_trace(step)
    backward_end = region_ends["backward"]
    over_step = max([0, *(b for _, b in trace)])
    to_backward_end = max([0, *(b for t, b in trace if t <= backward_end)])
    return held + over_step, held + to_backward_end


def state_bytes(model: nn.Module) -> int:
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def run_variant(name, build, x, dtype, args, device) -> dict:
    """One row; an out-of-memory or other failure of a variant is recorded, not raised."""
    row = {"variant": name}
    model = step = no_grad_forward = None
    try:
        model = build().to(device)
        backward_peaks: list[int] = []
        step, no_grad_forward = train_step(model, x, dtype, backward_peaks)
        seconds, peak = measure(step, device, args.warmup, args.repeats)
        backward_peak = min(backward_peaks[args.warmup :]) if backward_peaks else None
        if device.type == "cpu":
            peak, backward_peak = cpu_peaks(step, state_bytes(model))
        row.update(
            peak_GiB=gib(peak),
            activation_GiB=gib(
                None if backward_peak is None else backward_peak - state_bytes(model)
            ),
            step_s=seconds,
        )
        if name == "medinv plain":
            forward_seconds, _ = measure(no_grad_forward, device, args.warmup, args.repeats)
            row["floor_s"] = seconds + forward_seconds
    except torch.OutOfMemoryError:
        row.update(peak_GiB="OOM", activation_GiB="OOM", step_s=float("nan"))
    except RuntimeError as err:
        print(f"{name} failed: {err}", file=sys.stderr)
        failed = f"failed ({type(err).__name__})"
        row.update(peak_GiB=failed, activation_GiB=failed, step_s=float("nan"))
    finally:
        del model, step, no_grad_forward
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    by = {r["variant"]: r for r in rows}
    floor = by.get("medinv plain", {}).get("floor_s")
    for r in rows:
        if floor:
            r["vs_floor"] = r["step_s"] / floor


def part_2d(args, device) -> pd.DataFrame:
    x = torch.randn(1, 64, args.size_2d, args.size_2d, device=device)
    rows = []
    for depth in args.depths:
        group = []
        for name, make in VARIANTS.items():
            if args.no_peer and name.startswith("iunets"):
                continue
            row = run_variant(name, lambda m=make, d=depth: m(64, 2, d, 5), x, None, args, device)
            group.append({"delta": depth, **row})
        add_ratios(group)
        rows += group
        print(pd.DataFrame(group).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


def part_3d(args, device) -> pd.DataFrame:
    x = torch.randn(1, 4, *args.volume, device=device)
    rows = []
    for channels in args.channels:
        for precision in args.precisions:
            dtype = PRECISIONS[precision]
            group = []
            for name, make in VARIANTS.items():
                if args.no_peer and name.startswith("iunets"):
                    continue

                def build(m=make, c=channels):
                    return segmenter(m(c, 3, 2, 5), c, 3)

                row = run_variant(name, build, x, dtype, args, device)
                group.append({"C": channels, "precision": precision, **row})
            add_ratios(group)
            rows += group
            print(pd.DataFrame(group).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


FIT_VOLUMES = [
    (128, 128, 128),
    (160, 160, 160),
    (192, 192, 160),
    (240, 240, 160),
    (256, 256, 256),
    (320, 320, 256),
    (384, 384, 320),
    (512, 512, 208),
]


def reserved_peak(build, volume, cap_gib, device) -> int | None:
    """CUDA's peak reserved bytes of one training step under a ``cap_gib`` memory cap
    (``set_per_process_memory_fraction`` caps what the allocator reserves), or None
    where the step runs out of memory."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)
    model = None
    try:
        model = build().to(device)
        step, _ = train_step(model, torch.randn(1, 4, *volume, device=device), None)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def part_fit(args, device) -> pd.DataFrame:
    """Largest volume of FIT_VOLUMES each model trains on within each budget.

    Per budget, the step runs under that cap, volumes in increasing size until the first
    out-of-memory; a larger budget starts above the largest volume a smaller one fitted.
    cuDNN autotuning is off here: every volume is a new shape.
    """
    torch.backends.cudnn.benchmark = False
    models = {
        "medinv memory-efficient": lambda c: segmenter(medinv_core(c, 3, 2, 5, True), c, 3),
        "iunets memory-efficient": lambda c: segmenter(peer_core(c, 3, 2, 5, True), c, 3),
    }
    try:
        from monai.networks.nets import SegResNet

        models["MONAI SegResNet"] = lambda c: SegResNet(
            spatial_dims=3, init_filters=c, in_channels=4, out_channels=3
        )
    except ImportError:
        print("MONAI not installed: SegResNet left out of the fit table")
    rows = []
    for channels in args.channels:
        for name, make in models.items():
            if args.no_peer and name.startswith("iunets"):
                continue
            fitted = -1  # index of the largest volume that fitted so far
            for budget in sorted(args.budgets):
                for i in range(fitted + 1, len(FIT_VOLUMES)):
                    volume = FIT_VOLUMES[i]
                    peak = reserved_peak(lambda m=make, c=channels: m(c), volume, budget, device)
                    outcome = "OOM" if peak is None else f"{peak / 2**30:.2f} GiB reserved"
                    print(
                        f"{name} C={channels} {volume} within {budget} GiB: {outcome}", flush=True
                    )
                    if peak is None:
                        break
                    fitted = i
                largest = "x".join(map(str, FIT_VOLUMES[fitted])) if fitted >= 0 else "none"
                rows.append(
                    {"budget_GiB": budget, "C": channels, "model": name, "largest": largest}
                )
    return pd.DataFrame(rows).sort_values(["budget_GiB", "C"], kind="stable")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["2d", "3d"], choices=["2d", "3d", "fit"])
    parser.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20, 30])
    parser.add_argument("--size-2d", type=int, default=512)
    parser.add_argument("--volume", type=int, nargs=3, default=[240, 240, 160])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 32], help="GiB (fit)")
    parser.add_argument("--no-peer", action="store_true", help="measure medinv only")
    parser.add_argument("--out", type=Path, help="folder for <part>.csv and <part>.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the memory cap needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if "fit" in args.parts and device.type != "cuda":
        parser.error("the fit part needs a CUDA device")

    tables = {}
    runners = {"2d": part_2d, "3d": part_3d, "fit": part_fit}
    for part in args.parts:
        tables[part] = runners[part](args, device)

    title = "# iUNet memory: medinv vs iunets 0.1 (memcnn 1.5.2)"
    texts = {
        part: f"{title}: {part}\n\n{header(device)}\n\n"
        + table.to_markdown(index=False, floatfmt=".3f")
        for part, table in tables.items()
    }
    print("\n\n".join(texts.values()))
    if args.out:
        # One table and one markdown file per part, so that rerunning a part leaves the
        # others (and the folder's README, which compares runs) as they are.
        args.out.mkdir(parents=True, exist_ok=True)
        for part, table in tables.items():
            table.to_csv(args.out / f"{part}.csv", index=False)
            (args.out / f"{part}.md").write_text(texts[part] + "\n")


if __name__ == "__main__":
    main()
