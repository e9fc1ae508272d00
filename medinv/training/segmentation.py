"""Training loop for 3D iUNet segmentation of BraTS-style cases."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric
from monai.utils import set_determinism

from medinv.data.transforms import (
    CANONICAL,
    IMAGE,
    LABEL,
    Convention,
    evaluation_transforms,
    training_transforms,
)
from medinv.errors import InputError
from medinv.inference.segmentation import predict_probabilities
from medinv.models import build_model

from .config import SegmentationConfig
from .distributed import Distributed, agree, largest, sampler, wrap
from .run import ProgressCosineLR, TrainingRun

REGIONS = ("TC", "WT", "ET")
Progress = Callable[[str, int, int], None]


def split_cases(
    cases: Sequence[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation cases: by the ``split`` column where the manifest has one
    (``train`` / ``val``; ``test`` cases are left out), else a seeded random split."""
    if any(c.get("split") for c in cases):
        train = [c for c in cases if c.get("split") == "train"]
        val = [c for c in cases if c.get("split") == "val"]
        if val or val_fraction == 0:
            return train, val
        cases = train
    order = list(cases)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(order):
        raise InputError(f"{len(order)} labelled case(s) cannot be split into train and val")
    return order[n_val:], order[:n_val]


def _loader_items(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    missing = [c.get("case_id", "?") for c in cases if not c.get(LABEL)]
    if missing:
        raise InputError(f"training needs labels; cases without one: {', '.join(missing)}")
    return [{IMAGE: c[IMAGE], LABEL: c[LABEL]} for c in cases]


def train_segmentation(
    config: SegmentationConfig,
    train_cases: Sequence[dict[str, Any]],
    val_cases: Sequence[dict[str, Any]],
    out_dir: Path,
    device: torch.device,
    resume: bool = False,
    progress: Progress | None = None,
    convention: Convention = CANONICAL,
    job: Distributed | None = None,
) -> pd.DataFrame:
    """Train, validate every ``val_interval`` epochs, keep ``last.pt`` and ``best.pt``.

    ``convention`` says how the cases' channel order and label values differ from BraTS
    2018-2021's; the model always learns TC, WT, ET from canonically ordered contrasts.

    Writes ``out_dir/metrics.csv`` (one row per epoch: loss, Dice per region, time, peak
    memory) and returns it as a table. ``resume`` continues from ``out_dir/last.pt``.
    """
    t = config.train
    set_determinism(seed=t.seed)
    kind, kwargs = config.model.kind, config.model_kwargs()
    model = build_model(kind, kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    if t.lr_schedule_over == "epochs":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    else:

        def share_done() -> float:  # the run is made below; the furthest process decides
            return largest(run.progress(), job)

        scheduler = ProgressCosineLR(optimizer, share_done)
    loss_fn = (DiceCELoss if t.loss == "dice_ce" else DiceLoss)(
        sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True
    )
    run = TrainingRun(
        out_dir,
        kind,
        kwargs,
        model,
        optimizer,
        scheduler,
        config,
        device,
        resume,
        main=job is None or job.is_main,
    )
    net = wrap(model, job, device)

    d = config.data
    train_transforms = training_transforms(d.roi_size, d.spacing, convention)
    train_data = _loader_items(train_cases)
    train_ds = (
        CacheDataset(train_data, train_transforms, progress=False)
        if d.cache
        else Dataset(train_data, train_transforms)
    )
    generator = torch.Generator().manual_seed(t.seed)
    train_sampler = sampler(train_ds, job, t.seed)
    loader = DataLoader(
        train_ds,
        batch_size=t.batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        num_workers=t.num_workers,
        generator=generator,
    )
    # MONAI's metrics gather over the process group: every process validates its share.
    val_share = val_cases
    if job is not None and len(val_cases) >= job.world_size:
        val_share = val_cases[job.rank :: job.world_size]
    val_ds = Dataset(_loader_items(val_share), evaluation_transforms(d.spacing, convention))
    for epoch in run.epochs(train_sampler):
        losses = []
        for batch in run.batches(loader, epoch, progress):
            image, label = batch[IMAGE].to(device), batch[LABEL].to(device)
            optimizer.zero_grad(set_to_none=True)
            with run.autocast():
                loss = loss_fn(net(image).float(), label)
            run.step(loss)
            losses.append(loss.item())
        scheduler.step()
        row = run.epoch_row(epoch + 1, losses)
        last = agree(run.budget_used(row), job)  # the time budget ends the run here
        if val_cases and (run.validation_due(epoch) or last):
            dice = validate(model, val_ds, config, device)
            row.update({f"dice_{r}": v for r, v in zip(REGIONS, dice, strict=True)})
            row["dice_mean"] = sum(dice) / len(dice)
        run.end_epoch(row, row.get("dice_mean", -row["loss"]))
        if last:
            break
    return run.close()


def validate(model, dataset, config: SegmentationConfig, device: torch.device) -> list[float]:
    """Mean Dice per region (TC, WT, ET) over whole validation volumes, BraTS convention
    (empty truth and empty prediction count as 1)."""
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    model.eval()
    inf = config.inference
    for item in dataset:
        image = item[IMAGE].unsqueeze(0).to(device)
        probabilities = predict_probabilities(
            model, image, inf.roi_size, inf.overlap, inf.sw_batch_size, tta=False
        )
        metric(y_pred=(probabilities > 0.5).float(), y=item[LABEL].unsqueeze(0).to(device))
    return [float(v) for v in metric.aggregate()]
