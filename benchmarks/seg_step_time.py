"""Time of one segmentation training step, and the operators it runs.

The segmentation counterpart of ``recon_step_time.py``: medinv's training step (forward on
a random crop of four contrasts, the config's Dice loss on random labels, backward, AdamW)
for each model of ``seg_quality.py``, with the config's precision. iUNets run
memory-efficiently with their orthogonal matrices batched per chain (the default) and
without batching (each layer's matrices computed at each use, the baseline); MONAI's
SegResNet runs as it is. Reports the median time per step, the same on a tiny 16^3 crop
(what the host spends per step, the floor of a host-bound step) and the ATen operators
per step (nested ones included, from the profiler); on CUDA also the kernel time and
the synchronisations per step, and with ``--top N`` each variant's N operators of most
host time.

    python benchmarks/seg_step_time.py --config configs/iunet_brats_like.yaml \\
        --models iUNet-32 SegResNet-32 --out benchmarks/results/seg_step_time_h100.md
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from monai.losses import DiceCELoss, DiceLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import header, publish  # noqa: E402
from benchmarks.recon_step_time import (  # noqa: E402
    add_step_arguments,
    host_time_section,
    optimizer_update,
    step_columns,
)
from benchmarks.seg_quality import MODELS  # noqa: E402
from medinv.models import build_model  # noqa: E402
from medinv.training.config import load_config  # noqa: E402

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Edge of the tiny crop of the host-cost column: the iUNet's total stride (five scales),
#: where the arithmetic is small and a step's time is mostly the host's.
TINY_EDGE = 16


def training_step(config, crop: list[int], device: torch.device):
    """medinv's segmentation training step on a fixed random crop, and the model's size."""
    t = config.train
    torch.manual_seed(0)
    model = build_model(config.model.kind, config.model_kwargs()).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = (DiceCELoss if t.loss == "dice_ce" else DiceLoss)(
        sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True
    )
    image = torch.randn(t.batch_size, 4, *crop, device=device)
    label = (torch.rand(t.batch_size, 3, *crop, device=device) > 0.5).float()
    dtype = PRECISIONS.get(t.amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(image).float(), label)
        loss.backward()
        optimizer_update(model, optimizer, t.grad_clip)

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/iunet_brats_like.yaml"))
    parser.add_argument("--models", nargs="+", default=["iUNet-32", "SegResNet-32"])
    parser.add_argument("--crop", type=int, nargs=3, help="default: the config's roi_size")
    add_step_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config(args.config, task="segment")
    crop = list(args.crop or config.data.roi_size)
    rows, sections = [], []
    for name in args.models:
        config.model.kind = MODELS[name]["kind"]
        config.model.channels = MODELS[name]["channels"]
        if config.model.kind == "iunet":
            variants = [
                ("memory-efficient, batched matrices", True),
                ("memory-efficient, matrices per use", False),
            ]
        else:
            variants = [("plain autograd", True)]
        for variant, batched in variants:
            columns, operators = step_columns(
                partial(training_step, config, crop, device),
                partial(training_step, config, [TINY_EDGE] * 3, device),
                f"ms per step at {TINY_EDGE}^3",
                batched,
                device,
                args,
            )
            rows.append({"model": name, "variant": variant} | columns)
            if args.top:
                sections.append(host_time_section(f"{name}, {variant}", operators, args.top))
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# Segmentation training step: time and operators per step",
            "",
            header(device),
            f"- recipe: `{args.config.name}` ({config.train.amp} autocast, "
            f"{config.train.loss} loss, batch {config.train.batch_size}), random crop "
            f"{'x'.join(map(str, crop))}; median of {args.repeats} steps after {args.warmup}",
            "",
            pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f"),
            *("\n" + section for section in sections),
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
