"""Training loop for i-RIM (and the RIM baseline) on fastMRI-style k-space.

2D models (``model.dim`` 2) train on slices; 3D i-RIMs on slabs of ``data.slab`` adjacent
slices (:mod:`medinv.inference.slabs`), with the loss over every slice of a slab and
validation on volumes put back together from their slabs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.losses import SSIMLoss
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, default_collate

from medinv.data.kspace_transforms import KSpaceMaskd, KSpaceSliceDataset, RandKSpaceSharpend
from medinv.errors import ConfigError, InputError
from medinv.inference.reconstruction import Measurement, magnitude_crop, prepare
from medinv.metrics.reconstruction import volume_metrics
from medinv.models import build_model
from medinv.mri.io import KSpaceFile
from medinv.mri.masks import MaskFunc, create_mask_func

from .config import ReconstructionConfig
from .distributed import Distributed, agree, largest, sampler, wrap
from .run import ProgressStepLR, TrainingRun

Progress = Callable[[str, int, int], None]


class _Keep:
    """Augment (training), undersample, then keep what a training batch needs
    (collatable), dropping file attributes."""

    def __init__(
        self, mask_func: MaskFunc, fixed_masks: bool, augment: RandKSpaceSharpend | None = None
    ):
        self.mask_func = mask_func
        self.augment = augment
        self.masker = KSpaceMaskd("kspace", mask_func, fixed_masks)

    def __call__(self, item: dict) -> dict:
        if self.augment is not None:
            item = self.augment(item)
        item = self.masker(item)
        return {
            "kspace": item["kspace"],
            "mask": item["mask"],
            "num_low_frequencies": int(item["num_low_frequencies"]),
            "target": item["target"],
            "filename": item["filename"],
            "slice": item["slice"],
        }


def slice_dataset(
    folder: Path,
    config: ReconstructionConfig,
    fixed_masks: bool,
    accelerations: list[int] | None = None,
    fractions: list[float] | None = None,
    stride: int | None = None,
):
    """Slices of ``folder`` (slabs of ``data.slab`` slices, ``stride`` apart, for a 3D
    model) undersampled on the fly, one mask per item: random masks for training (a stream
    seeded by ``train.seed``), sharpened at random where ``data.sharpen`` is set; the file
    name's fastMRI mask for validation (``fixed_masks``), never sharpened."""
    d = config.data
    mask_func = create_mask_func(
        d.mask_type,
        fractions or d.center_fractions,
        accelerations or d.accelerations,
        seed=config.train.seed,
    )
    augment = None
    if not fixed_masks and d.sharpen > 0:
        augment = RandKSpaceSharpend(
            "kspace", d.challenge == "multicoil", prob=d.sharpen_probability, max_strength=d.sharpen
        )
        augment.set_random_state(config.train.seed)
    slab = d.slab if config.model.dim == 3 else None
    return KSpaceSliceDataset(
        folder, transform=_Keep(mask_func, fixed_masks, augment), slab=slab, stride=stride
    )


def largest_item_shape(folder: Path) -> tuple[int, ...]:
    """``([coils,] H, W)`` that bounds every slice of ``folder``'s files: the most coils
    and the largest matrix (what a memory plan for training must hold)."""
    shapes = []
    for path in sorted(Path(folder).glob("*.h5")):
        with KSpaceFile(path) as f:
            shapes.append(f.shape)
    if not shapes:
        raise InputError(f"{folder}: no .h5 files (see `medinv data kspace`)")
    matrix = max((s[-2:] for s in shapes), key=math.prod)
    coils = [max(s[1] for s in shapes)] if len(shapes[0]) == 4 else []
    return (*coils, *matrix)


def _measure(batch: dict, config: ReconstructionConfig) -> Measurement:
    """The model's input for a batch of slices ``(B, [C,] H, W)`` or slabs
    ``(B, S, [C,] H, W)``."""
    d = config.data
    return prepare(
        batch["kspace"],
        batch["mask"],
        int(batch["num_low_frequencies"].min()),
        d.challenge == "multicoil",
        d.sensitivities,
    )


class MeasuredBatches:
    """The training loader's collate: the items stacked, and their :class:`Measurement`
    (coil maps, scale) built from them as ``batch["measurement"]``, so that with
    ``train.num_workers`` the loader's workers prepare it while the device trains.

    Each item is measured on its own (its coil maps from its own calibration lines), and
    multi-coil items with fewer coils than the batch's most are padded with zero coils: a
    coil whose map and k-space are zero adds nothing to ``A^H (A x - y)``, so a batch of
    slices with different coil counts (as in fastMRI's brain data) gives every slice the
    estimate it would get alone.
    """

    def __init__(self, config: ReconstructionConfig):
        self.config = config

    def __call__(self, items: list[dict]) -> dict:
        measured = [_measure(_collate([item]), self.config) for item in items]
        if self.config.data.challenge == "multicoil":
            coils = max(item["kspace"].shape[-3] for item in items)
            items = [item | {"kspace": pad_coils(item["kspace"], coils)} for item in items]
            measured = [
                Measurement(
                    pad_coils(m.kspace, coils), m.mask, pad_coils(m.sensitivities, coils), m.scale
                )
                for m in measured
            ]
        batch = _collate(items)
        batch["measurement"] = _stacked(measured)
        return batch


def _stacked(measured: list[Measurement]) -> Measurement:
    """One :class:`Measurement` of the items' (same-shaped) measurements."""
    first = measured[0]
    sensitivities = (
        None if first.sensitivities is None else torch.cat([m.sensitivities for m in measured])
    )
    return Measurement(
        torch.cat([m.kspace for m in measured]),
        torch.cat([m.mask for m in measured]),
        sensitivities,
        torch.cat([m.scale for m in measured]),
    )


def pad_coils(coil_data: Tensor, coils: int) -> Tensor:
    """``(..., C, H, W)`` with zero coils appended up to ``coils``."""
    missing = coils - coil_data.shape[-3]
    if missing == 0:
        return coil_data
    zeros = coil_data.new_zeros(*coil_data.shape[:-3], missing, *coil_data.shape[-2:])
    return torch.cat([coil_data, zeros], dim=-3)


def _seed_worker_masks(worker_id: int) -> None:
    """Give each loader worker its own mask and augmentation streams, derived from the
    run's seed."""
    info = torch.utils.data.get_worker_info()
    keep = info.dataset.transform
    seed = info.seed % 2**32
    keep.mask_func.rng = np.random.RandomState([seed, worker_id])
    if keep.augment is not None:
        keep.augment.set_random_state(state=np.random.RandomState([seed, worker_id, 1]))


class ReconstructionLoss(nn.Module):
    """``w_ssim (1 - SSIM) + w_l1 L1`` of magnitudes on the target grid, both divided by the
    target's peak (MONAI's SSIM, 7x7 window, K1 0.01, K2 0.03 as fastMRI's evaluation).

    Slices ``(B, h, w)``; slabs ``(B, S, h, w)`` count as ``B * S`` slices.
    """

    def __init__(self, ssim_weight: float, l1_weight: float):
        super().__init__()
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=7, k1=0.01, k2=0.03)
        self.ssim_weight, self.l1_weight = ssim_weight, l1_weight

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        prediction, target = prediction.flatten(0, -3), target.flatten(0, -3)
        peak = target.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        p, t = (prediction / peak).unsqueeze(1), (target / peak).unsqueeze(1)
        return self.ssim_weight * self.ssim(p, t) + self.l1_weight * (p - t).abs().mean()


def _estimates(model: nn.Module, kind: str, measurement) -> list[Tensor]:
    """The estimates the loss averages over: every time step for the RIM, the last for IRIM."""
    args = (measurement.kspace, measurement.mask, measurement.sensitivities)
    outputs = model(*args, return_all=True) if kind == "rim" else [model(*args)]
    return [o * measurement.scale.view(-1, *[1] * (o.ndim - 1)).to(o.real.dtype) for o in outputs]


def train_reconstruction(
    config: ReconstructionConfig,
    out_dir: Path,
    device: torch.device,
    resume: bool = False,
    progress: Progress | None = None,
    job: Distributed | None = None,
) -> pd.DataFrame:
    """Train; validate every ``val_interval`` epochs (NMSE, PSNR, SSIM per volume at each
    acceleration); keep ``last.pt`` and ``best.pt`` (best validation SSIM); write
    ``metrics.csv`` and TensorBoard logs under ``out_dir``. Returns the epoch table."""
    t, d = config.train, config.data
    torch.manual_seed(t.seed)
    kind, kwargs = config.model.kind, config.model.kwargs()
    model = build_model(kind, kwargs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    if t.lr_step_fraction is None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, t.lr_step_epochs, t.lr_gamma)
    else:

        def share_done() -> float:  # the run is made below; the furthest process decides
            return largest(run.progress(), job)

        scheduler = ProgressStepLR(optimizer, t.lr_step_fraction, t.lr_gamma, share_done)
    loss_fn = ReconstructionLoss(t.ssim_weight, t.l1_weight)
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
    train_ds = slice_dataset(d.train, config, fixed_masks=False, stride=d.slab_stride)
    generator = torch.Generator().manual_seed(t.seed)
    train_sampler = sampler(train_ds, job, t.seed)
    micro_batch, accumulation = t.micro_batch_size or t.batch_size, t.accumulation
    loader = DataLoader(
        train_ds,
        batch_size=micro_batch,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        num_workers=t.num_workers,
        generator=generator,
        collate_fn=MeasuredBatches(config),
        worker_init_fn=_seed_worker_masks,
    )
    ddp = isinstance(net, DistributedDataParallel)
    for epoch in run.epochs(train_sampler):
        losses = []
        count = run.batch_count(loader, accumulation)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(run.batches(loader, epoch, progress, accumulation)):
            measurement = batch["measurement"].to(device)
            target = batch["target"].to(device)
            # Step after every accumulation-th micro-batch and after the epoch's last; in a
            # multi-process job gradients are averaged over the processes only then. Each
            # step's gradient is the mean over its passes (the last step may have fewer).
            passes = min(accumulation, count - i // accumulation * accumulation)
            stepping = (i + 1) % accumulation == 0 or i + 1 == count
            with nullcontext() if stepping or not ddp else net.no_sync():
                with run.autocast():
                    estimates = _estimates(net, kind, measurement)
                losses_t = [
                    loss_fn(magnitude_crop(e, target.shape[-2:]).float(), target) for e in estimates
                ]
                loss = torch.stack(losses_t).mean()
                run.backward(loss / passes)
            losses.append(loss.item())
            if stepping:
                run.update()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        row = run.epoch_row(epoch + 1, losses)
        last = agree(run.budget_used(row), job)  # the time budget ends the run here
        if d.val is not None and (run.validation_due(epoch) or last) and run.main:
            row.update(validate(model, config, device))
        run.end_epoch(row, row.get("SSIM", -row["loss"]))
        if last:
            break
    return run.close()


@torch.no_grad()
def validate(model: nn.Module, config: ReconstructionConfig, device: torch.device) -> dict:
    """Mean NMSE, PSNR and SSIM over validation volumes, at each acceleration
    (``SSIM_4x``, ...) and averaged (``SSIM``, ...); fixed fastMRI masks per file.

    A 3D model sees each volume in non-overlapping slabs, the last aligned to the end; a
    slice that two slabs share is scored once, from the first.
    """
    d = config.data
    model.eval()
    results: dict[str, float] = {}
    per_acceleration = []
    for fraction, acceleration in zip(d.center_fractions, d.accelerations, strict=True):
        dataset = slice_dataset(d.val, config, True, [acceleration], [fraction])
        slices: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
        for item in DataLoader(dataset, batch_size=1):
            measurement = _measure(item, config).to(device)
            target = item["target"][0]
            estimate = _estimates(model, config.model.kind, measurement)[-1]
            image = magnitude_crop(estimate, target.shape[-2:])[0].float().cpu()
            volume = slices[item["filename"][0]]
            first = int(item["slice"])
            for i, pair in enumerate(zip(_slab(target), _slab(image), strict=True)):
                volume.setdefault(first + i, pair)
        rows = []
        for volume in slices.values():
            order = sorted(volume)
            rows.append(
                volume_metrics(
                    np.stack([volume[i][0] for i in order]), np.stack([volume[i][1] for i in order])
                )
            )
        means = pd.DataFrame(rows).mean()
        per_acceleration.append(means)
        results.update({f"{k}_{acceleration}x": float(v) for k, v in means.items()})
    results.update(
        {k: float(v) for k, v in pd.concat(per_acceleration, axis=1).mean(axis=1).items()}
    )
    return results


def _slab(images: Tensor) -> np.ndarray:
    """A slice ``(h, w)`` or slab ``(S, h, w)`` as an array of slices ``(S, h, w)``."""
    return images.reshape(-1, *images.shape[-2:]).numpy()


def _collate(items: list[dict]) -> dict:
    try:
        return default_collate(items)
    except RuntimeError as err:
        shapes = sorted({tuple(i["kspace"].shape) for i in items})
        raise ConfigError(
            f"slices or slabs of different shapes {shapes} (matrices) cannot share a batch; "
            "set train.batch_size to 1"
        ) from err
