"""MRI reconstruction: prepare measured slices for a model, run it, write fastMRI outputs.

A slice becomes a :class:`Measurement`: the undersampled k-space and its mask, coil
sensitivities for multi-coil data (estimated from the fully sampled centre), all scaled by
the peak of the zero-filled image so that every slice reaches the model at the same
intensity; :func:`reconstruct` runs the model and undoes the scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import imageio.v3 as imageio
import numpy as np
import torch
from torch import Tensor, nn

from medinv.errors import InputError
from medinv.io import write_atomically
from medinv.metrics.reconstruction import crop_to_target_width, volume_metrics
from medinv.mri.coils import acs_sensitivities, espirit_maps
from medinv.mri.fft import center_crop, ifft2c, rss
from medinv.mri.io import KSpaceFile, write_reconstruction
from medinv.mri.masks import create_mask_func, seed_from_name
from medinv.mri.operators import SenseOperator, SingleCoilOperator

if TYPE_CHECKING:
    from .planner import Planner

SensitivityMethod = Literal["acs", "espirit"]


@dataclass
class Measurement:
    """What a reconstruction model gets, for a batch of slices.

    Attributes:
        kspace: masked k-space, complex ``(B, H, W)`` or ``(B, C, H, W)``, divided by ``scale``.
        mask: real 0/1 ``(B, 1, W)`` or ``(B, 1, 1, W)``.
        sensitivities: complex ``(B, C, H, W)`` (multi-coil) or None.
        scale: ``(B,)`` the peak magnitude of each zero-filled image.
    """

    kspace: Tensor
    mask: Tensor
    sensitivities: Tensor | None
    scale: Tensor

    def to(self, device: torch.device) -> Measurement:
        sens = None if self.sensitivities is None else self.sensitivities.to(device)
        return Measurement(
            self.kspace.to(device), self.mask.to(device), sens, self.scale.to(device)
        )

    @property
    def multicoil(self) -> bool:
        return self.sensitivities is not None


def prepare(
    masked_kspace: Tensor,
    mask: Tensor,
    num_low_frequencies: int,
    multicoil: bool,
    sensitivities: SensitivityMethod = "acs",
) -> Measurement:
    """Build the :class:`Measurement` of slices ``(B, [C,] H, W)`` or slabs
    ``(B, S, [C,] H, W)`` with column mask ``(W,)`` or ``(B, W)``: coil maps per slice
    (:func:`coil_sensitivities`), then one scale per slice or slab
    (:func:`scaled_measurement`)."""
    sens = None
    if multicoil:
        sens = coil_sensitivities(masked_kspace, num_low_frequencies, sensitivities)
    return scaled_measurement(masked_kspace, mask, sens)


def coil_sensitivities(
    masked_kspace: Tensor, num_low_frequencies: int, method: SensitivityMethod = "acs"
) -> Tensor:
    """Coil maps of slices ``(..., C, H, W)`` (e.g. ``(B, C, H, W)``, or slabs
    ``(B, S, C, H, W)``), the shape of the input, each slice estimated on its own."""
    per_slice = masked_kspace.reshape(-1, *masked_kspace.shape[-3:])
    if method == "espirit":
        maps = torch.stack([espirit_maps(k) for k in per_slice])
    else:
        maps = acs_sensitivities(per_slice, num_low_frequencies)
    return maps.to(masked_kspace.dtype).reshape(masked_kspace.shape)


def scaled_measurement(kspace: Tensor, mask: Tensor, sensitivities: Tensor | None) -> Measurement:
    """The :class:`Measurement` of slices or slabs, each divided by the peak of its
    zero-filled image ``A^H y`` (over all its slices, for a slab).

    Args:
        kspace: masked k-space, complex ``(B, [S,] [C,] H, W)`` in file units (``S``: slab
            slices, ``C``: coils).
        mask: real 0/1 column mask ``(W,)`` or ``(B, W)``; becomes ``(B, 1, ..., W)``.
        sensitivities: complex, the shape of ``kspace`` (multi-coil), or None.
    """
    batch, width = kspace.shape[0], kspace.shape[-1]
    mask = mask.reshape(-1, width).expand(batch, width).to(kspace.real.dtype)
    mask = mask.reshape(batch, *([1] * (kspace.ndim - 2)), width)
    if sensitivities is None:
        operator = SingleCoilOperator(mask)
    else:
        operator = SenseOperator(sensitivities, mask)
    scale = operator.adjoint(kspace).abs().flatten(1).amax(1).clamp_min(1e-12)
    view = (-1, *([1] * (kspace.ndim - 1)))
    return Measurement(kspace / scale.view(view), mask, sensitivities, scale)


def zero_filled(measurement: Measurement) -> Tensor:
    """The zero-filled estimate ``A^H y`` (complex ``(B, H, W)``, in original units)."""
    images = ifft2c(measurement.kspace)
    if measurement.multicoil:
        images = (measurement.sensitivities.conj() * images).sum(-3)
    return images * measurement.scale.view(-1, 1, 1)


def reconstruct(model: nn.Module, measurement: Measurement) -> Tensor:
    """The model's complex image estimate ``(B, H, W)``, in the units of the input."""
    image = model(measurement.kspace, measurement.mask, measurement.sensitivities)
    return image * measurement.scale.view(-1, 1, 1).to(image.real.dtype)


def magnitude_crop(image: Tensor, shape: Sequence[int]) -> Tensor:
    """``|image|`` centre-cropped to ``shape`` (the fastMRI target grid, e.g. 320 x 320)."""
    return center_crop(image.abs(), shape)


def rss_target(kspace: Tensor, shape: Sequence[int]) -> Tensor:
    """The RSS of fully sampled multi-coil k-space, cropped (as ``reconstruction_rss``)."""
    return center_crop(rss(ifft2c(kspace), dim=-3), shape)


@dataclass
class ReconstructionSettings:
    """How ``medinv reconstruct`` treats each file.

    Attributes:
        acceleration, center_fraction, mask_type: undersample fully sampled files with this
            fastMRI mask (seeded from the file name); files with their own ``mask`` keep it.
        sensitivities: ``"acs"`` or ``"espirit"`` for multi-coil data.
        batch_size: slices per model call (None: all of a file's); with a memory planner,
            the most it may choose.
        preview: also write ``<name>.png`` (zero-filled | model | target | error).
        overwrite: replace existing outputs.
        slab, slab_overlap: for 3D models, slices per slab (the training ``data.slab``)
            and slices shared by consecutive slabs (their estimates are averaged);
            ``batch_size`` then counts slabs.
    """

    acceleration: int | None = None
    center_fraction: float | None = None
    mask_type: str = "equispaced_fraction"
    sensitivities: SensitivityMethod = "acs"
    batch_size: int | None = 4
    preview: bool = False
    overwrite: bool = False
    slab: int = 8
    slab_overlap: int = 0


_DEFAULT_FRACTION = {4: 0.08, 8: 0.04}


def reconstruct_file(
    model: nn.Module,
    path: Path,
    out_dir: Path,
    settings: ReconstructionSettings,
    device: torch.device,
    progress: Callable[[], None] | None = None,
    target_file: Path | None = None,
    planner: Planner | None = None,
) -> dict[str, Any]:
    """Reconstruct every slice of a fastMRI file and write ``<out_dir>/<name>`` (the
    ``reconstruction`` float32 ``(slices, h, w)`` on the header's reconstruction matrix).

    With a ``planner``, its plan for the file's shape sets the batch of slices (3D models:
    of slabs; at most ``settings.batch_size``), halved where memory runs out all the same.

    Returns a row for the results table: file, acceleration, and, where the file (or
    ``target_file``, e.g. the fully sampled twin of a test file) holds a target,
    NMSE/PSNR/SSIM of the model and of the zero-filled image.
    """
    out_path = out_dir / path.name
    if out_path.exists() and not settings.overwrite:
        raise InputError(f"{out_path}: exists; pass --overwrite to replace it")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with KSpaceFile(path) as f:
        recon_shape = (f.header.recon_size[0], f.header.recon_size[1])
        mask, num_low, acceleration = _mask_of(f, path, settings)
        has_target = f.target_key is not None

        def run(batch_size: int) -> tuple[Tensor, Tensor]:
            outputs, baselines = [], []
            for start in range(0, f.num_slices, batch_size):
                indices = range(start, min(start + batch_size, f.num_slices))
                kspace = torch.stack([f.kspace(i) for i in indices]) * mask
                measurement = prepare(kspace, mask, num_low, f.multicoil, settings.sensitivities)
                measurement = measurement.to(device)
                with torch.no_grad():
                    estimate = reconstruct(model, measurement)
                outputs.append(magnitude_crop(estimate, recon_shape).float().cpu())
                zero = magnitude_crop(zero_filled(measurement), recon_shape)
                baselines.append(zero.float().cpu())
                if progress is not None:
                    for _ in indices:
                        progress()
            return torch.cat(outputs), torch.cat(baselines)

        @cache
        def whole_volume() -> tuple[Tensor, Measurement]:
            """The masked k-space and measurement of every slice, made once: an
            out-of-memory retry with fewer slabs per batch reuses them."""
            kspace = torch.stack([f.kspace(i) for i in range(f.num_slices)]) * mask
            return kspace, prepare(kspace, mask, num_low, f.multicoil, settings.sensitivities)

        def run_slabs(batch_size: int) -> tuple[Tensor, Tensor]:
            from .slabs import reconstruct_volume_in_slabs

            kspace, measurement = whole_volume()
            images = reconstruct_volume_in_slabs(
                model,
                kspace,
                mask,
                measurement.sensitivities,
                slab=settings.slab,
                overlap=settings.slab_overlap,
                batch_size=batch_size,
                device=device,
            )
            if progress is not None:
                for _ in range(f.num_slices):
                    progress()
            zero = magnitude_crop(zero_filled(measurement), recon_shape)
            return magnitude_crop(images, recon_shape).float().cpu(), zero.float().cpu()

        attempt = run_slabs if getattr(model, "dim", 2) == 3 else run
        if planner is None:
            default = 1 if attempt is run_slabs else f.num_slices
            volume, baseline = attempt(settings.batch_size or default)
        else:
            plan = planner.plan_reconstruction(
                f.shape,
                max_batch=settings.batch_size,
                slab=settings.slab,
                overlap=settings.slab_overlap,
            )
            volume, baseline = planner.run(plan, lambda p: attempt(p.batch_size), path.name)
        target = _targets(f) if has_target else None
    volume, baseline = volume.numpy(), baseline.numpy()
    write_reconstruction(out_path, volume, overwrite=settings.overwrite)
    if target_file is not None:
        with KSpaceFile(target_file) as t:
            if t.target_key is None:
                raise InputError(f"{target_file}: no reconstruction_rss or reconstruction_esc")
            target = _targets(t)
        if target.shape[0] != volume.shape[0]:
            raise InputError(
                f"{target_file}: {target.shape[0]} slices where {path} has {volume.shape[0]}"
            )
    row: dict[str, Any] = {"file": path.name, "acceleration": acceleration}
    if target is not None:
        target_c, volume_c = crop_to_target_width(target, volume)
        _, baseline_c = crop_to_target_width(target, baseline)
        row.update({k: v for k, v in volume_metrics(target_c, volume_c).items()})
        row.update({f"{k} zero-filled": v for k, v in volume_metrics(target_c, baseline_c).items()})
    if settings.preview:
        write_reconstruction_preview(baseline, volume, target, out_dir / f"{path.stem}.png")
    return row


def _targets(f: KSpaceFile) -> np.ndarray:
    return np.stack([f.target(i).numpy() for i in range(f.num_slices)])


def _mask_of(f: KSpaceFile, path: Path, settings: ReconstructionSettings):
    """The file's own mask (test files) or a fastMRI mask drawn from the file name."""
    own = f.mask()
    if own is not None:
        attrs = f.attrs
        num_low = int(attrs.get("num_low_frequency", 0)) or _central_run(own)
        return own, num_low, attrs.get("acceleration")
    if settings.acceleration is None:
        raise InputError(f"{path}: fully sampled (no mask); pass --acceleration to undersample it")
    fraction = settings.center_fraction or _DEFAULT_FRACTION.get(settings.acceleration, 0.08)
    mask_func = create_mask_func(settings.mask_type, [fraction], [settings.acceleration])
    shape = tuple(f.shape[1:])
    mask, num_low, _ = mask_func(shape, seed=seed_from_name(path.name))
    left, right = f.header.padding
    mask = mask.flatten().clone()
    mask[:left], mask[right:] = 0, 0
    return mask, num_low, settings.acceleration


def _central_run(mask: Tensor) -> int:
    """The length of the run of sampled columns through the centre."""
    centre = mask.numel() // 2
    left = right = centre
    while left > 0 and mask[left - 1] > 0:
        left -= 1
    while right < mask.numel() - 1 and mask[right + 1] > 0:
        right += 1
    return right - left + 1


def write_reconstruction_preview(
    baseline: np.ndarray, volume: np.ndarray, target: np.ndarray | None, path: Path
) -> None:
    """The middle slice: zero-filled | reconstruction | target | |error| x 5 (where a
    target exists), on one grey scale set by the target (or reconstruction)."""
    middle = volume.shape[0] // 2
    reference = target if target is not None else volume
    panels = [baseline[middle], volume[middle]]
    if target is not None:
        panels += [target[middle], 5 * np.abs(volume[middle] - target[middle])]
    scale = float(np.percentile(reference[middle], 99.5)) or 1.0
    panels = [np.clip(np.asarray(p) / scale, 0, 1) for p in panels]
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 4))) for p in panels]
    picture = (np.concatenate(panels, axis=1) * 255).astype(np.uint8)
    write_atomically(path, lambda tmp: imageio.imwrite(tmp, picture, extension=".png"), ".png")
