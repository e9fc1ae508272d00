"""Whole-volume segmentation of varying sizes, with and without bucketed padding.

``medinv segment --bucket N`` zero-pads whole volumes up to multiples of ``N`` voxels per
axis so that cases of similar size share a shape, and turns cuDNN benchmarking on. This
measures what that buys and costs over a run of cases of varying size, as
``medinv segment --roi whole`` runs them one after another in one process (the allocator
keeps its cache between cases):

- ``stride``: padded only to the model's stride (the default), cuDNN benchmark off;
- ``stride + benchmark``: the same with cuDNN benchmark on (it tunes anew at every shape);
- ``bucket N``: padded to multiples of ``N``, benchmark off;
- ``bucket N + benchmark``: what ``--bucket N`` does.

Sizes are those of foreground-cropped BraTS volumes (seeded draws, 130-175 x 160-200 x
120-150 voxels); four random contrasts, the untrained 3D iUNet of
``configs/iunet_brats_like.yaml`` (time and memory do not depend on the weights). Reported
per variant: distinct shapes run, padded voxels over the stride's, total and median seconds
per case (the first case of each variant is its warm-up and is left out of the median), the
largest peak allocated and reserved, and the allocator's device allocations (cudaMalloc
calls).

    python benchmarks/bucketing.py --out benchmarks/results/bucketing_h100.md
    python benchmarks/bucketing.py --smoke   # CPU, toy sizes
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import header, publish, synchronize  # noqa: E402
from medinv.inference.plans import rounded_up, size_text  # noqa: E402
from medinv.inference.segmentation import SegmentationSettings, predict_volume  # noqa: E402
from medinv.models import build_model  # noqa: E402
from medinv.training.config import load_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "iunet_brats_like.yaml"


def draw_shapes(count: int, seed: int, smoke: bool) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    ranges = [(20, 36), (24, 40), (16, 30)] if smoke else [(130, 175), (160, 200), (120, 150)]
    return [tuple(rng.randint(lo, hi) for lo, hi in ranges) for _ in range(count)]


def run_variant(model, images, bucket, benchmark: bool, device) -> dict:
    torch.backends.cudnn.benchmark = benchmark
    settings = SegmentationSettings(roi_size=None, bucket=bucket)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        mallocs = torch.cuda.memory_stats(device).get("num_device_alloc", 0)
    seconds = []
    for image in images:
        synchronize(device)
        started = time.perf_counter()
        predict_volume(model, image, settings, device)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    row = {"total s": sum(seconds), "median s per case": statistics.median(seconds[1:])}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        row["peak allocated GiB"] = stats["allocated_bytes.all.peak"] / 2**30
        row["peak reserved GiB"] = stats["reserved_bytes.all.peak"] / 2**30
        row["cudaMalloc calls"] = stats.get("num_device_alloc", 0) - mallocs
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--bucket", type=int, help="voxels (default: 32; 8 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="CPU-sized volumes and model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.smoke:
        kwargs = {"in_channels": 4, "out_channels": 3, "channels": 4, "dim": 3}
        model = build_model("iunet", kwargs | {"architecture": [1, 1, 1]})
    else:
        config = load_config(CONFIG, task="segment")
        model = build_model(config.model.kind, config.model_kwargs())
    model = model.to(device).eval()
    stride = model.total_stride
    shapes = draw_shapes(args.cases, args.seed, args.smoke)
    images = [torch.randn(4, *s) for s in shapes]
    strided = [rounded_up(s, stride) for s in shapes]
    size = args.bucket or (8 if args.smoke else 32)
    rows = []
    for bucket, benchmark in [(None, False), (None, True), (size, False), (size, True)]:
        runs_at = [rounded_up(s, bucket) for s in shapes] if bucket else strided
        name = "stride" if bucket is None else f"bucket {bucket}"
        row = {"variant": name + (" + benchmark" if benchmark else "")}
        row["shapes"] = len(set(runs_at))
        extra = sum(map(math.prod, runs_at)) / sum(map(math.prod, strided)) - 1
        row["padded voxels vs stride %"] = 100 * extra
        row |= run_variant(model, images, bucket, benchmark, device)
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    sizes = ", ".join(size_text(s) for s in shapes[:6]) + ", ..."
    text = "\n".join(
        [
            "# Whole-volume segmentation of varying sizes: bucketed padding",
            "",
            header(device),
            f"- model: {'toy iUNet (--smoke)' if args.smoke else CONFIG.name} "
            f"(untrained), total stride {size_text(stride)}; {args.cases} cases ({sizes})",
            "",
            table.to_markdown(index=False, floatfmt=".3f"),
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
