"""3D reconstruction over slabs of adjacent slices (``IRIM(dim=3)``).

A slab of ``S`` consecutive slices becomes one :class:`~.reconstruction.Measurement` with
k-space ``(B, S, [C,] H, W)`` (:func:`~.reconstruction.prepare` builds slices and slabs):
coil sensitivities are estimated slice by slice exactly as for 2D models, one column mask
serves the whole slab, and the slab is divided by one scale, the peak of its zero-filled
image over all its slices, so the 3D network sees the slices' intensities relative to
each other.
:func:`reconstruct_volume_in_slabs` tiles a whole volume with slabs and puts it back
together.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medinv.data.kspace_transforms import slab_starts

from .reconstruction import Measurement, scaled_measurement


def reconstruct_slabs(model: nn.Module, measurement: Measurement) -> Tensor:
    """A 3D model's complex estimate ``(B, S, H, W)`` of slabs, in the units of the input."""
    image = model(measurement.kspace, measurement.mask, measurement.sensitivities)
    return image * measurement.scale.view(-1, 1, 1, 1).to(image.real.dtype)


def reconstruct_volume_in_slabs(
    model: nn.Module,
    kspace: Tensor,
    mask: Tensor,
    sensitivities: Tensor | None,
    slab: int,
    overlap: int = 0,
    batch_size: int = 1,
    device: torch.device | None = None,
) -> Tensor:
    """Reconstruct every slice of a volume with a 3D model run on slabs of ``slab`` slices.

    Slabs start every ``slab - overlap`` slices, and one more is aligned to the end where
    they stop short (:func:`~medinv.data.kspace_transforms.slab_starts`); a slice that lies
    in several slabs gets the mean of their complex estimates. A volume of fewer than
    ``slab`` slices is one slab. Each slab is scaled by its own peak
    (:func:`~.reconstruction.scaled_measurement`) and the result returned in the units of
    ``kspace``. Runs
    without gradients, in the model's current mode (call ``model.eval()`` first).

    Args:
        model: a 3D reconstructor, e.g. ``IRIM(dim=3)``: ``model(kspace (B, S, [C,] H, W),
            mask, sensitivities) -> (B, S, H, W)`` complex.
        kspace: masked k-space of the whole volume, complex ``(N, [C,] H, W)``.
        mask: real 0/1 column mask ``(W,)`` of the volume.
        sensitivities: complex coil maps ``(N, C, H, W)`` for multi-coil data (e.g.
            ``prepare(kspace, mask, num_low, True).sensitivities``), None for single-coil.
        slab: slices per slab (the model's training ``data.slab``).
        overlap: slices shared by consecutive slabs, ``0 <= overlap < slab``.
        batch_size: slabs per model call.
        device: where the model runs (default: where its parameters are).

    Returns:
        The complex images ``(N, H, W)`` on the full k-space matrix, on ``kspace``'s device;
        ``magnitude_crop(images, recon_shape)`` gives the fastMRI reconstruction.

    Example::

        m = prepare(kspace, mask, num_low, multicoil=True)           # 2D sensitivities
        images = reconstruct_volume_in_slabs(model, kspace, mask, m.sensitivities, slab=8)
    """
    num_slices = kspace.shape[0]
    slab = min(slab, num_slices)
    if not 0 <= overlap < slab:
        raise ValueError(f"overlap must lie in [0, {slab}) for slabs of {slab}, got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    starts = slab_starts(num_slices, slab, slab - overlap)
    total = kspace.new_zeros((num_slices, *kspace.shape[-2:]))
    counts = torch.zeros(num_slices, device=kspace.device)
    for first in range(0, len(starts), batch_size):
        group = starts[first : first + batch_size]
        maps = None
        if sensitivities is not None:
            maps = torch.stack([sensitivities[s : s + slab] for s in group])
        slabs = torch.stack([kspace[s : s + slab] for s in group])
        measurement = scaled_measurement(slabs, mask, maps).to(device)
        with torch.no_grad():
            estimates = reconstruct_slabs(model, measurement).to(total)
        for start, estimate in zip(group, estimates, strict=True):
            total[start : start + slab] += estimate
            counts[start : start + slab] += 1
    return total / counts.view(-1, 1, 1)
