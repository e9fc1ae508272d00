"""MONAI transform pipelines for BraTS-style segmentation.

Images arrive as four modalities (four files or one 4D file) and labels with the BraTS
classes. A :class:`Convention` says how a dataset's files differ from the canonical form the
models see: channels in the order T1, T1ce, T2, FLAIR, and labels with the BraTS 2018-2021
values (1 necrotic/non-enhancing core, 2 oedema, 4 enhancing). Every pipeline starts the
same way, so predictions can be mapped back to the input's own grid with
:func:`invert_to_input_grid` (MONAI records each transform it applies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai import transforms as mt

IMAGE, LABEL = "image", "label"


@dataclass(frozen=True)
class Convention:
    """How a dataset's files differ from the canonical channel order and label values.

    Args:
        channel_order: indices that put the loaded channels in the order T1, T1ce, T2,
            FLAIR (``x[channel_order]``); None if they already are.
        label_values: the dataset's values for (necrotic core, oedema, enhancing tumour);
            ``(1, 2, 4)`` for BraTS 2018-2021, ``(1, 2, 3)`` for BraTS 2023, ``(2, 1, 3)``
            for the Decathlon.
    """

    channel_order: tuple[int, ...] | None = None
    label_values: tuple[int, int, int] = (1, 2, 4)


CANONICAL = Convention()
"""Channels T1, T1ce, T2, FLAIR and BraTS 2018-2021 labels: nothing to convert."""


class _Reorder:
    """Picklable channel reordering (for worker processes)."""

    def __init__(self, order: Sequence[int]):
        self.order = list(order)

    def __call__(self, x):
        return x[self.order]


def _identity(x):
    return x


def _preprocessing(
    keys: list[str], spacing: Sequence[float] | None, convention: Convention
) -> list[mt.Transform]:
    steps: list[mt.Transform] = [
        mt.LoadImaged(keys=keys, image_only=True),
        mt.EnsureChannelFirstd(keys=keys),
    ]
    if convention.channel_order is not None:
        # Its inverse must leave the (3-channel) prediction alone.
        steps.append(mt.Lambdad(IMAGE, func=_Reorder(convention.channel_order), inv_func=_identity))
    steps.append(
        mt.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    )
    if spacing is not None:
        modes = ["bilinear" if k == IMAGE else "nearest" for k in keys]
        steps.append(mt.Spacingd(keys=keys, pixdim=tuple(spacing), mode=modes))
    steps += [
        mt.NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True),
        mt.CropForegroundd(keys=keys, source_key=IMAGE, margin=4, allow_smaller=True),
    ]
    return steps


def _regions(convention: Convention) -> list[mt.Transform]:
    """Labels -> float channels TC, WT, ET."""
    steps: list[mt.Transform] = []
    if convention.label_values != (1, 2, 4):
        steps.append(
            mt.MapLabelValued(LABEL, list(convention.label_values), [1, 2, 4], dtype=torch.uint8)
        )
    return [
        *steps,
        mt.ConvertToMultiChannelBasedOnBratsClassesd(keys=LABEL, et_label=4),
        mt.CastToTyped(keys=LABEL, dtype=torch.float32),
    ]


def training_transforms(
    roi_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    convention: Convention = CANONICAL,
) -> mt.Compose:
    """Load, resample, normalise, crop to the brain, then random ROI crops and augmentation.

    Labels become three channels TC, WT, ET (``ConvertToMultiChannelBasedOnBratsClassesd``).
    """
    keys = [IMAGE, LABEL]
    return mt.Compose(
        [
            *_preprocessing(keys, spacing, convention),
            *_regions(convention),
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
    spacing: Sequence[float] | None = None,
    convention: Convention = CANONICAL,
    with_label: bool = True,
) -> mt.Compose:
    """The deterministic part of :func:`training_transforms`, whole volumes, for validation
    and inference; keeps the metadata that :func:`invert_to_input_grid` needs."""
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    steps = _preprocessing(keys, spacing, convention)
    if with_label:
        steps += _regions(convention)
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
