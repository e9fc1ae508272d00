"""MONAI transform pipelines for BraTS-style segmentation.

Images arrive as four modalities (T1, T1ce, T2, FLAIR: four files or one 4D file) and
labels with the BraTS classes (1 necrotic/non-enhancing core, 2 oedema, 4 or 3 enhancing).
Every pipeline starts the same way, so predictions can be mapped back to the input's own
grid with :func:`invert_to_input_grid` (MONAI records each transform it applies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai import transforms as mt

IMAGE, LABEL = "image", "label"


def _preprocessing(keys: list[str], spacing: Sequence[float] | None) -> list[mt.Transform]:
    steps: list[mt.Transform] = [
        mt.LoadImaged(keys=keys, image_only=True),
        mt.EnsureChannelFirstd(keys=keys),
        mt.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing is not None:
        modes = ["bilinear" if k == IMAGE else "nearest" for k in keys]
        steps.append(mt.Spacingd(keys=keys, pixdim=tuple(spacing), mode=modes))
    steps += [
        mt.NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True),
        mt.CropForegroundd(keys=keys, source_key=IMAGE, margin=4, allow_smaller=True),
    ]
    return steps


def _regions(et_label: int) -> list[mt.Transform]:
    """BraTS labels -> float channels TC, WT, ET."""
    return [
        mt.ConvertToMultiChannelBasedOnBratsClassesd(keys=LABEL, et_label=et_label),
        mt.CastToTyped(keys=LABEL, dtype=torch.float32),
    ]


def training_transforms(
    roi_size: Sequence[int], spacing: Sequence[float] | None = None, et_label: int = 4
) -> mt.Compose:
    """Load, resample, normalise, crop to the brain, then random ROI crops and augmentation.

    Labels become three channels TC, WT, ET (``ConvertToMultiChannelBasedOnBratsClassesd``).
    """
    keys = [IMAGE, LABEL]
    return mt.Compose(
        [
            *_preprocessing(keys, spacing),
            *_regions(et_label),
            mt.SpatialPadd(keys=keys, spatial_size=tuple(roi_size)),
            mt.RandCropByPosNegLabeld(
                keys=keys,
                label_key=LABEL,
                spatial_size=tuple(roi_size),
                pos=2,
                neg=1,
                num_samples=1,
                allow_smaller=False,
            ),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            mt.RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=1.0),
            mt.RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=1.0),
            mt.EnsureTyped(keys=keys, track_meta=False),
        ]
    )


def evaluation_transforms(
    spacing: Sequence[float] | None = None, et_label: int = 4, with_label: bool = True
) -> mt.Compose:
    """The deterministic part of :func:`training_transforms`, whole volumes, for validation
    and inference; keeps the metadata that :func:`invert_to_input_grid` needs."""
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    steps = _preprocessing(keys, spacing)
    if with_label:
        steps += _regions(et_label)
    return mt.Compose(steps)


def invert_to_input_grid(
    prediction_key: str, preprocessing: mt.Compose, nearest: bool = False
) -> mt.Invertd:
    """Undo crop, resampling and reorientation of ``preprocessing`` on a prediction."""
    return mt.Invertd(
        keys=prediction_key,
        transform=preprocessing,
        orig_keys=IMAGE,
        nearest_interp=nearest,
        to_tensor=True,
    )
