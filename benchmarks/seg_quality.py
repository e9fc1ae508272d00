"""Segmentation quality on held-out BraTS-like subjects: iUNet against MONAI's SegResNet.

Every model trains on the same training cases for the same wall-clock budget (the config's
``train.time_budget_minutes``, overridable with ``--minutes``), then segments the held-out
test cases (different anatomy from training) with sliding-window inference; the table gives
Dice, sensitivity and HD95 per region (BraTS conventions), parameters, training peak memory,
time per epoch, and the peak memory of inference on one test case.

    medinv data brats-like --out data/brats_like            # the set (train/val/test splits)
    python benchmarks/seg_quality.py --config configs/iunet_brats_like.yaml \\
        --minutes 60 --out benchmarks/results/seg_quality_h100.md
    python benchmarks/seg_quality.py --config configs/iunet_brats_like_small.yaml \
        --models iUNet-8 SegResNet-8 --minutes 6 --device cpu   # the CPU-size pair
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import header, publish  # noqa: E402
from medinv.data.brats import discover_cases  # noqa: E402
from medinv.inference.segmentation import SegmentationSettings, segment_case  # noqa: E402
from medinv.metrics.segmentation import evaluate_directories  # noqa: E402
from medinv.training.checkpoint import load_model  # noqa: E402
from medinv.training.config import load_config  # noqa: E402
from medinv.training.segmentation import split_cases, train_segmentation  # noqa: E402

MODELS = {
    "iUNet-8": {"kind": "iunet", "channels": 8},  # CPU-size pair, for the small set
    "SegResNet-8": {"kind": "segresnet", "channels": 8},
    "iUNet-32": {"kind": "iunet", "channels": 32},
    "iUNet-64": {"kind": "iunet", "channels": 64},
    "SegResNet-16": {"kind": "segresnet", "channels": 16},
    "SegResNet-32": {"kind": "segresnet", "channels": 32},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS)[2:], choices=list(MODELS), help="GPU set"
    )
    parser.add_argument("--minutes", type=float, help="training budget per model")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--work", type=Path, default=Path("runs/seg_quality"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config(args.config)
    if args.minutes is not None:
        config.train.time_budget_minutes = args.minutes
    if args.epochs is not None:
        config.train.epochs = args.epochs
    cases = [
        c.to_dict() | {"split": c.split}
        for c in discover_cases(config.data.manifest, et_label=config.data.et_label)
    ]
    test_cases = [c for c in cases if c.get("split") == "test"]
    train, val = split_cases(
        [c for c in cases if c.get("split") != "test"], config.data.val_fraction, config.train.seed
    )
    if not test_cases:
        parser.error(f"{config.data.manifest} has no test split")

    rows = []
    for name in args.models:
        config.model.kind = MODELS[name]["kind"]
        config.model.channels = MODELS[name]["channels"]
        run = args.work / name
        history = train_segmentation(config, train, val, run, device)
        model, _ = load_model(run / "best.pt")
        model.to(device)
        settings = SegmentationSettings(
            roi_size=config.inference.roi_size,
            overlap=config.inference.overlap,
            spacing=config.data.spacing,
            overwrite=True,
        )
        inference_peak = None
        started = time.perf_counter()
        for i, case in enumerate(test_cases):
            if device.type == "cuda" and i == 0:
                torch.cuda.reset_peak_memory_stats(device)
            segment_case(model, case, run / "test_predictions", settings, device)
            if device.type == "cuda" and i == 0:
                inference_peak = torch.cuda.max_memory_allocated(device) / 2**30
        seconds_per_case = (time.perf_counter() - started) / len(test_cases)
        truth_dir = Path(test_cases[0]["label"]).parents[1]
        table, summary, failures = evaluate_directories(
            run / "test_predictions", truth_dir, config.data.et_label
        )
        row = {
            "model": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": len(history),
            "s/epoch": history["train_seconds"].mean(),
        }
        if "peak_memory_GiB" in history:
            row["train peak GiB"] = history["peak_memory_GiB"].max()
        row["inference peak GiB"] = inference_peak
        row["s/case"] = seconds_per_case
        for _, r in summary.iterrows():
            region = r["region"]
            row[f"Dice {region}"] = r["dice_mean"]
            row[f"sens. {region}"] = r["sensitivity_mean"]
            row[f"HD95 {region}"] = r["hd95_mean"]
        row["scoring failures"] = len(failures)
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False), flush=True)

    text = "\n".join(
        [
            "# Segmentation quality on held-out BraTS-like subjects",
            "",
            header(device),
            "",
            f"- training cases: {len(train)}, validation: {len(val)}, held-out test: "
            f"{len(test_cases)}; budget per model: {config.train.time_budget_minutes} min, "
            f"at most {config.train.epochs} epochs",
            "",
            pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"),
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
