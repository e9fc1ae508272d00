"""The memory planner on inputs of varying size, under emulated 16 and 32 GiB GPUs.

Per budget (``torch.cuda.set_per_process_memory_fraction``), in one process of its own as
on a card of that size, a seeded shuffle of

- fastMRI-size multi-coil volumes (640x368 or 640x372 k-space, 15-20 coils, 30-45 slices;
  random complex k-space, random coil maps, a 4x equispaced mask) through the 2D i-RIM of
  ``configs/irim_multicoil.yaml``, slice-batched as ``medinv reconstruct`` runs it, and
  through the 3D i-RIM of ``configs/irim3d_multicoil.yaml`` in batches of slabs;
- volumes of 128^3, 240x240x160, 256^3 and 512x512x200 voxels (four random contrasts)
  through the 3D iUNet segmenter of ``configs/iunet_brats_like.yaml`` (32 channels),
  inference as ``medinv segment`` runs it.

Every case runs with the planner (``--gpu-memory``: the plan, predicted against measured
peak, time, out-of-memory retries); then every case runs naively (all slices in one batch;
the whole volume in fp32) and with each fixed plan a user might choose by hand
(``FIXED_PLANS``: slice batches of a set size; sliding windows of a set size); running out
of memory is recorded. The summary sets the planner's throughput per model against the
best fixed plan that completes every case of the budget. Weights are the untrained
initialisation: memory and time do not depend on them. The measured peak of a case is
CUDA's ``max_memory_allocated`` during it, less what was allocated before, plus the model's
own weights (what the planner predicts); "of budget" is the process's whole peak over the
budget.

    python benchmarks/memory_planner.py --out benchmarks/results/memory_planner_h100.md
    python benchmarks/memory_planner.py --smoke   # CPU, toy sizes, budgets not enforced
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gib, header, publish, synchronize  # noqa: E402
from medinv.data.kspace_transforms import slab_starts  # noqa: E402
from medinv.errors import ResourceError  # noqa: E402
from medinv.inference.memory_model import resident_bytes  # noqa: E402
from medinv.inference.peak import measure_peak, release_memory  # noqa: E402
from medinv.inference.planner import Planner  # noqa: E402
from medinv.inference.plans import parse_memory  # noqa: E402
from medinv.inference.reconstruction import (  # noqa: E402
    Measurement,
    magnitude_crop,
    reconstruct,
    zero_filled,
)
from medinv.inference.segmentation import SegmentationSettings, predict_volume  # noqa: E402
from medinv.inference.slabs import reconstruct_volume_in_slabs  # noqa: E402
from medinv.models import build_model  # noqa: E402
from medinv.training.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOLUMES = [(128, 128, 128), (240, 240, 160), (256, 256, 256), (512, 512, 200)]
SMOKE_VOLUMES = [(32, 32, 32), (48, 48, 32), (64, 64, 64), (96, 80, 40)]
# Plans chosen by hand, the same for every case: i-RIM slices per batch, 3D i-RIM slabs per
# batch, iUNet window size (one window per call, stitched on the device, fp32).
FIXED_PLANS = {"i-RIM": [8, 24], "i-RIM3D": [1, 2], "iUNet": [(128, 128, 128), (192, 192, 192)]}
SMOKE_FIXED_PLANS = {"i-RIM": [2, 4], "i-RIM3D": [1, 2], "iUNet": [(16, 16, 16), (32, 32, 32)]}
RECONSTRUCTORS = ("i-RIM", "i-RIM3D")


def fixed_plan_name(model: str, plan) -> str:
    if model in RECONSTRUCTORS:
        item = "slice" if model == "i-RIM" else "slab"
        return f"fixed {plan} {item}{'s' if plan > 1 else ''}"
    return f"fixed window {'x'.join(map(str, plan))}"


@dataclass(frozen=True)
class Case:
    """One input: ``shape`` is (slices, coils, H, W) for the i-RIMs, spatial for the iUNet."""

    model: str
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.model} {'x'.join(map(str, self.shape))}"


def draw_cases(args) -> list[Case]:
    """The i-RIM, 3D i-RIM and iUNet cases (each budget runs them all, in its own shuffled
    order)."""
    rng = random.Random(args.seed)
    cases = []
    # (slices, coils, H, W); the smoke's 3D volumes are deeper than its slab of 4
    for model, count, smoke_slices in (
        ("i-RIM", args.irim_cases, (3, 6)),
        ("i-RIM3D", args.irim3d_cases, (5, 9)),
    ):
        for _ in range(count):
            if args.smoke:
                shape = (rng.randint(*smoke_slices), rng.randint(3, 4), 64, rng.choice([48, 52]))
            else:
                shape = (rng.randint(30, 45), rng.randint(15, 20), 640, rng.choice([368, 372]))
            cases.append(Case(model, shape))
    volumes = SMOKE_VOLUMES if args.smoke else VOLUMES
    for i in range(args.iunet_cases):
        shape = volumes[i] if i < len(volumes) else rng.choice(volumes)
        cases.append(Case("iUNet", shape))
    return cases


def build_models(args, device: torch.device) -> dict[str, torch.nn.Module]:
    """The models by case kind; sets ``args.slab``, the 3D i-RIM's slab depth."""
    torch.manual_seed(0)
    if args.smoke:
        small = {"state_channels": 8, "steps": 2, "layers_per_step": 2, "dilations": [1, 2]}
        irim = build_model("irim", small | {"hidden_channels": 8})
        irim3d = build_model("irim", small | {"hidden_channels": 4, "dim": 3})
        args.slab = 4
        iunet = build_model(
            "iunet",
            {"in_channels": 4, "out_channels": 3, "channels": 4, "dim": 3}
            | {"architecture": [1, 1, 1]},
        )
    else:
        recon = load_config(CONFIGS / "irim_multicoil.yaml", task="reconstruct")
        recon3d = load_config(CONFIGS / "irim3d_multicoil.yaml", task="reconstruct")
        seg = load_config(CONFIGS / "iunet_brats_like.yaml", task="segment")
        irim = build_model(recon.model.kind, recon.model.kwargs())
        irim3d = build_model(recon3d.model.kind, recon3d.model.kwargs())
        args.slab = recon3d.data.slab
        iunet = build_model(seg.model.kind, seg.model_kwargs())
    models = {"i-RIM": irim, "i-RIM3D": irim3d, "iUNet": iunet}
    return {name: model.to(device).eval() for name, model in models.items()}


class Inputs:
    """Synthetic inputs, made once per shape: random k-space slices (a few, repeated to
    the volume's length) with coil maps and a mask, and random four-contrast volumes."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.cache: dict[tuple, object] = {}

    def kspace(self, coils: int, height: int, width: int):
        key = ("k", coils, height, width)
        if key not in self.cache:
            shape = (4, coils, height, width)
            kspace = torch.randn(shape, dtype=torch.complex64, generator=self.generator)
            maps = torch.randn(shape, dtype=torch.complex64, generator=self.generator)
            maps /= maps.abs().square().sum(1, keepdim=True).sqrt()
            mask = torch.zeros(width)
            mask[::4] = 1
            centre = round(0.08 * width)
            mask[(width - centre) // 2 : (width + centre) // 2] = 1
            self.cache[key] = (kspace * mask, mask.view(1, 1, width), maps)
        return self.cache[key]

    def kspace_volume(self, shape: tuple[int, ...]):
        """A whole volume ``(slices, coils, H, W)`` of the slices of :meth:`kspace`, its
        coil maps and its column mask ``(W,)``, as the 3D path takes them."""
        key = ("kv", *shape)
        if key not in self.cache:
            slices, coils, height, width = shape
            kspace, mask, maps = self.kspace(coils, height, width)
            index = [i % len(kspace) for i in range(slices)]
            self.cache[key] = (kspace[index], mask.view(width), maps[index])
        return self.cache[key]

    def prepare(self, case: Case) -> None:
        """Make a case's inputs now, outside what is measured."""
        if case.model == "i-RIM":
            self.kspace(*case.shape[1:])
        elif case.model == "i-RIM3D":
            self.kspace_volume(case.shape)
        else:
            self.volume(case.shape)

    def volume(self, shape: tuple[int, ...]) -> torch.Tensor:
        key = ("v", *shape)
        if key not in self.cache:
            self.cache[key] = torch.randn((4, *shape), generator=self.generator)
        return self.cache[key]


def reconstruct_volume(model, inputs: Inputs, shape, batch_size: int, device) -> torch.Tensor:
    """``medinv reconstruct``'s device work for one volume: per slice batch, the
    measurement moved to the device, the model, the zero-filled baseline, both cropped."""
    slices, coils, height, width = shape
    kspace, mask, maps = inputs.kspace(coils, height, width)
    crop = (min(320, height), min(320, width))  # the fastMRI reconstruction grid
    outputs = []
    for start in range(0, slices, batch_size):
        index = [i % len(kspace) for i in range(start, min(start + batch_size, slices))]
        batch = len(index)
        measurement = Measurement(
            kspace[index], mask.expand(batch, 1, 1, width), maps[index], torch.ones(batch)
        ).to(device)
        with torch.no_grad():
            estimate = reconstruct(model, measurement)
        outputs.append(magnitude_crop(estimate, crop).cpu())
        magnitude_crop(zero_filled(measurement), crop).cpu()
    return torch.cat(outputs)


def reconstruct_in_slabs(model, inputs: Inputs, shape, batch_size: int, slab: int, device):
    """``medinv reconstruct``'s path for a 3D model: slabs scaled on the CPU, moved to the
    device ``batch_size`` at a time, the model, the volume put back together."""
    kspace, mask, maps = inputs.kspace_volume(shape)
    images = reconstruct_volume_in_slabs(
        model, kspace, mask, maps, slab=slab, batch_size=batch_size, device=device
    )
    return magnitude_crop(images, (min(320, shape[-2]), min(320, shape[-1])))


def slab_count(shape, slab: int) -> int:
    return len(slab_starts(shape[0], min(slab, shape[0])))


def measured(run, device: torch.device) -> tuple[int, float, int]:
    """Peak bytes above what was allocated before, seconds, and (CUDA) the whole peak."""
    synchronize(device)
    started = time.perf_counter()
    peak = measure_peak(run, device)
    seconds = time.perf_counter() - started
    total = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak
    return peak, seconds, total


def segment_volume(model, image, settings, device) -> torch.Tensor:
    """``predict_volume``; on the CPU the image is copied first, as a GPU run copies it to
    the device, so that both measure the same."""
    return predict_volume(model, image.clone() if device.type == "cpu" else image, settings, device)


def reconstruction(case: Case, model, inputs: Inputs, batch: int, slab: int, device):
    """The case's reconstruction in batches of ``batch`` slices (2D) or slabs (3D)."""
    if case.model == "i-RIM":
        return partial(reconstruct_volume, model, inputs, case.shape, batch, device)
    return partial(reconstruct_in_slabs, model, inputs, case.shape, batch, slab, device)


def run_case(case: Case, planner: Planner, inputs: Inputs, device, args) -> dict:
    model, overlap = planner.model, args.overlap
    inputs.prepare(case)
    if case.model in RECONSTRUCTORS:
        plan = planner.plan_reconstruction(case.shape, slab=args.slab)

        def attempt(p):
            return reconstruction(case, model, inputs, p.batch_size, args.slab, device)()
    else:
        plan = planner.plan_segmentation(case.shape, overlap)
        image = inputs.volume(case.shape)
        settings = SegmentationSettings(overlap=overlap)

        def attempt(p):
            return segment_volume(model, image, p.apply(settings), device)

    retries, used = planner.retries, len(planner.used)
    row = {"case": case.name, "plan": plan.describe().split(":")[0]}
    allocator_retries = _allocator_retries(device)
    try:
        peak, seconds, total = measured(lambda: planner.run(plan, attempt, case.name), device)
    except ResourceError:  # out of memory even with the smallest plan
        return row | {"status": "failed"}
    final = planner.used[used] if len(planner.used) > used else plan
    measured_peak = peak + resident_bytes(model, "inference")
    return row | {
        "status": "done",
        "final plan": final.describe().split(":")[0] if final is not plan else "",
        "predicted GiB": gib(final.predicted_peak),
        "measured GiB": gib(measured_peak),
        "error %": 100 * (final.predicted_peak - measured_peak) / measured_peak,
        "of budget": total / planner.budget if device.type == "cuda" else float("nan"),
        "seconds": seconds,
        "OOM retries": planner.retries - retries,
        # cudaMalloc failures the allocator survived by freeing its cache (under the cap)
        "allocator retries": _allocator_retries(device) - allocator_retries,
    }


def _allocator_retries(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0)


def run_naive(case: Case, model, inputs: Inputs, device, slab: int) -> dict:
    """All slices (or slabs) in one batch, or the whole volume in fp32; "OOM" where it ran
    out."""
    if case.model in RECONSTRUCTORS:
        items = case.shape[0] if case.model == "i-RIM" else slab_count(case.shape, slab)
        run = reconstruction(case, model, inputs, items, slab, device)
    else:
        settings = SegmentationSettings(roi_size=None)
        run = partial(segment_volume, model, inputs.volume(case.shape), settings, device)
    try:
        peak, seconds, _ = measured(run, device)
    except torch.OutOfMemoryError:
        return {"naive GiB": "OOM", "naive seconds": float("nan")}
    finally:
        release_memory(device)
    return {"naive GiB": gib(peak + resident_bytes(model, "inference")), "naive seconds": seconds}


def run_fixed(case: Case, model, inputs: Inputs, device, args, fixed) -> dict:
    """Seconds of the case with every fixed plan of its model, or "OOM"."""
    row, overlap = {}, args.overlap
    for plan in fixed[case.model]:
        if case.model in RECONSTRUCTORS:
            run = reconstruction(case, model, inputs, plan, args.slab, device)
        else:
            settings = SegmentationSettings(roi_size=plan, overlap=overlap)
            run = partial(segment_volume, model, inputs.volume(case.shape), settings, device)
        try:
            row[fixed_plan_name(case.model, plan) + " s"] = measured(run, device)[1]
        except torch.OutOfMemoryError:
            row[fixed_plan_name(case.model, plan) + " s"] = "OOM"
        finally:
            release_memory(device)
    return row


def throughput_table(table: pd.DataFrame, fixed) -> pd.DataFrame:
    """Per budget, model and plan (the planner's, then each fixed one): the seconds over
    all the model's cases, the cases that ran out of memory, and the planner's throughput
    relative to that plan (where both complete every case)."""
    rows = []
    for (budget, model), group in table.groupby(["budget", "model"], sort=False):
        planner = group["seconds"].sum() if (group["status"] == "done").all() else None
        rows.append(
            {"budget": budget, "model": model, "plan": "planner", "cases": len(group)}
            | {"OOM": int((group["status"] != "done").sum()), "seconds": planner}
        )
        for plan in fixed[model]:
            column = group[fixed_plan_name(model, plan) + " s"]
            failed = int((column == "OOM").sum())
            seconds = None if failed else column.astype(float).sum()
            rows.append(
                {"budget": budget, "model": model, "plan": fixed_plan_name(model, plan)}
                | {"cases": len(group), "OOM": failed, "seconds": seconds}
                | {
                    "planner throughput / plan's": seconds / planner
                    if seconds and planner
                    else None
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", nargs="+", default=["16GiB", "32GiB"])
    parser.add_argument("--irim-cases", type=int, default=6)
    parser.add_argument("--irim3d-cases", type=int, default=4)
    parser.add_argument("--iunet-cases", type=int, default=6)
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed plans")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes and budgets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    # internal: one budget's run, in the process of its own that main() starts for it
    parser.add_argument("--only-budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and args.budgets == parser.get_default("budgets"):
        args.budgets = ["64MiB", "128MiB"]
    device = torch.device("cpu" if args.smoke else args.device)
    if args.only_budget is not None:
        rows, seconds = run_budget(args, args.only_budget, device)
        args.rows_json.write_text(json.dumps({"rows": rows, "calibration_seconds": seconds}))
        return
    rows, calibration_seconds = [], 0.0
    with tempfile.TemporaryDirectory() as folder:
        for index in range(len(args.budgets)):
            result = Path(folder) / f"budget{index}.json"
            subprocess.run(budget_command(index, result), check=True)
            found = json.loads(result.read_text())
            rows += found["rows"]
            calibration_seconds += found["calibration_seconds"]
    fixed = SMOKE_FIXED_PLANS if args.smoke else FIXED_PLANS
    publish(report(pd.DataFrame(rows), args, device, calibration_seconds, fixed), args.out)


def budget_command(index: int, rows_json: Path) -> list[str]:
    """This script's own command line, for budget ``index`` alone, its rows to ``rows_json``.

    Each budget runs in a process of its own, as it would on its own card: cuDNN keeps, per
    convolution shape, the kernel that ran first, and where the heuristics' first choice
    could not get its workspace under a small budget it keeps the fallback. A larger budget
    in the same process would then run that shape with less memory than a fresh process.
    """
    own = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    return own + ["--only-budget", str(index), "--rows-json", str(rows_json)]


def cap_memory(budget: int, device: torch.device) -> None:
    """Cap this process's CUDA memory at ``budget`` bytes, as a card of that size."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)


def run_budget(args, index: int, device: torch.device) -> tuple[list[dict], float]:
    """Every case under ``args.budgets[index]``, in a seeded shuffled order: first all of
    them with the planner, then naively and with the fixed plans, so that no larger run
    leaves its cuDNN kernel choices to a planned one. Returns the rows and the seconds spent
    calibrating."""
    # As the medinv command does: less fragmentation when sizes vary (before CUDA starts).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    budget_text = args.budgets[index]
    budget = parse_memory(budget_text)
    models = build_models(args, device)
    weights = {name: resident_bytes(m, "inference") for name, m in models.items()}
    cases, inputs = draw_cases(args), Inputs(args.seed)
    fixed = SMOKE_FIXED_PLANS if args.smoke else FIXED_PLANS
    if device.type == "cuda":
        cap_memory(budget, device)
    # each planner's budget leaves room for the other models' weights
    planners = {
        name: Planner(model, device, budget - sum(weights.values()) + weights[name])
        for name, model in models.items()
    }
    started = time.perf_counter()
    for case in cases:  # calibrate up front, so that case times are inference only
        if case.model in RECONSTRUCTORS:
            planners[case.model].calibration("inference", "fp32", case.shape[1])
    planners["iUNet"].calibration("inference", "fp32")
    calibration_seconds = time.perf_counter() - started
    order = list(cases)
    random.Random(args.seed + index).shuffle(order)
    rows = []
    for case in order:
        row = {"budget": budget_text} | run_case(case, planners[case.model], inputs, device, args)
        rows.append(row)
        print(row, flush=True)
    for case, row in zip(order, rows, strict=True):
        model = models[case.model]
        row |= run_naive(case, model, inputs, device, args.slab)
        if not args.no_fixed:
            row |= run_fixed(case, model, inputs, device, args, fixed)
        print(row, flush=True)
    return rows, calibration_seconds


def report(table: pd.DataFrame, args, device, calibration_seconds: float, fixed) -> str:
    table = table.assign(model=[case.split(" ")[0] for case in table["case"]])
    done = table[table["status"] == "done"]
    errors = done["error %"].abs()
    lines = [
        "# Memory planner: varying input sizes under emulated GPU budgets",
        "",
        header(device),
        f"- budgets: {', '.join(args.budgets)}"
        + (" (not enforced on the CPU)" if device.type != "cuda" else "")
        + f"; sliding-window overlap {args.overlap}; seed {args.seed}",
        f"- calibration (all probes, all budgets): {calibration_seconds:.1f} s",
        "",
        table.drop(columns="model").to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    if not args.no_fixed:
        throughput = throughput_table(table, fixed)
        lines += [
            "Throughput against fixed plans (sum of the seconds over each model's cases; a",
            "fixed plan counts only where it completes every case under the budget):",
            "",
            throughput.to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
    lines += [
        "Summary:",
        "",
        f"- cases failed with the planner: {int((table['status'] != 'done').sum())} "
        f"of {len(table)}; out-of-memory retries: {int(done['OOM retries'].sum())}",
        f"- naive runs out of memory: {int((table['naive GiB'] == 'OOM').sum())} of {len(table)}",
        f"- median |predicted - measured| / measured: {statistics.median(errors):.1f}% "
        f"(max {errors.max():.1f}%)"
        if len(errors)
        else "- no case ran",
    ]
    if device.type == "cuda" and len(done):
        lines.append(f"- max measured peak / budget: {done['of budget'].max():.2f}")
    if not args.no_fixed:
        ratios = throughput.dropna(subset=["planner throughput / plan's"])
        for (budget, model), group in ratios.groupby(["budget", "model"], sort=False):
            best = group.loc[group["seconds"].idxmin()]
            ratio = best["planner throughput / plan's"]
            lines.append(
                f"- {budget}, {model}: planner throughput {ratio:.2f}x "
                f"that of the best fixed plan completing every case ({best['plan']})"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
