"""Segmentation inference: sliding-window prediction, TTA, and label maps in BraTS classes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import imageio.v3 as imageio
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from medinv.data.transforms import (
    CANONICAL,
    IMAGE,
    Convention,
    evaluation_transforms,
    invert_to_input_grid,
)
from medinv.errors import ConfigError, InputError
from medinv.io import write_atomically

from .plans import rounded_up
from .workloads import model_stride

if TYPE_CHECKING:
    from .planner import Planner


def predict_probabilities(
    model: nn.Module,
    image: Tensor,
    roi_size: Sequence[int] | None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    tta: bool = False,
    autocast_dtype: torch.dtype | None = None,
    sw_device: torch.device | None = None,
    bucket: int | None = None,
) -> Tensor:
    """Sigmoid probabilities of the regions (TC, WT, ET) for ``image (B, 4, *S)``, on the
    image's device.

    With ``roi_size``, MONAI's ``sliding_window_inference`` with Gaussian blending; without
    it, the whole volume at once. ``tta`` averages over the 8 combinations of flips along
    the spatial axes. ``sw_device``: the model's device where the image (and so the
    stitched output) is elsewhere, e.g. in CPU memory to spare the GPU's. ``bucket``: whole
    volumes run zero-padded up to a multiple of ``bucket`` voxels per axis
    (:func:`~.plans.rounded_up`).
    """
    flips = [()]
    if tta:
        flips = [
            tuple(a for a, bit in zip((2, 3, 4), f"{i:03b}", strict=True) if bit == "1")
            for i in range(8)
        ]
    total = None
    with (
        torch.no_grad(),
        torch.autocast(
            (sw_device or image.device).type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ),
    ):
        for axes in flips:
            x = image.flip(axes) if axes else image
            if roi_size is None:
                logits = _whole_volume(model, x, bucket)
            else:
                logits = sliding_window_inference(
                    x,
                    roi_size,
                    sw_batch_size,
                    model,
                    overlap=overlap,
                    mode="gaussian",
                    sw_device=sw_device,
                )
            probabilities = torch.sigmoid(logits.float())
            probabilities = probabilities.flip(axes) if axes else probabilities
            total = probabilities if total is None else total + probabilities
    return total / len(flips)


def _whole_volume(model: nn.Module, x: Tensor, bucket: int | None = None) -> Tensor:
    """``model(x)``, zero-padded at the end of each axis and cropped back where needed: up to
    a multiple of ``bucket``, or for models that need sizes divisible by their stride and do
    not pad (MONAI's SegResNet), up to a multiple of the stride."""
    multiple = bucket
    if multiple is None:
        if any(hasattr(m, "total_stride") for m in model.modules()):
            return model(x)  # iUNets pad (and crop) themselves
        try:
            multiple = model_stride(model)
        except ConfigError:
            return model(x)  # a model of unknown stride takes the volume as it is
    sizes = tuple(x.shape[2:])
    padded = rounded_up(sizes, multiple)
    if padded == sizes:
        return model(x)
    widths = [p for n, m in zip(reversed(sizes), reversed(padded), strict=True) for p in (0, m - n)]
    return model(torch.nn.functional.pad(x, widths))[(..., *(slice(0, n) for n in sizes))]


def regions_to_labels(regions: Tensor, values: Sequence[int] = (1, 2, 4)) -> Tensor:
    """Binary (TC, WT, ET) masks ``(3, *S)`` to a BraTS label map ``(*S)``.

    TC outside ET is the necrotic/non-enhancing core, WT outside TC the oedema, ET the
    enhancing tumour; ``values`` gives their label values (BraTS 2018-2021: 1, 2, 4; BraTS
    2023: 1, 2, 3; the Decathlon: 2, 1, 3).
    """
    necrotic, oedema, enhancing = values
    tc, wt, et = (regions[i].bool() for i in range(3))
    labels = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    labels[wt] = oedema
    labels[tc] = necrotic
    labels[et] = enhancing
    return labels


@dataclass
class SegmentationSettings:
    """How to run a segmentation model on whole cases (``stitch_on_cpu``: keep the image
    and the stitched sliding-window output in CPU memory; windows run on the device;
    ``bucket``: pad whole volumes up to a multiple of it, :func:`~.plans.rounded_up`)."""

    roi_size: Sequence[int] | None = (128, 128, 128)
    overlap: float = 0.5
    sw_batch_size: int = 1
    stitch_on_cpu: bool = False
    tta: bool = False
    spacing: Sequence[float] | None = None
    convention: Convention = CANONICAL
    threshold: float = 0.5
    probabilities: bool = False
    preview: bool = False
    overwrite: bool = False
    autocast_dtype: torch.dtype | None = None
    bucket: int | None = None


def predict_volume(
    model: nn.Module, image: Tensor, settings: SegmentationSettings, device: torch.device
) -> Tensor:
    """The probabilities ``(3, *S)`` of one preprocessed image ``(4, *S)``, both in CPU
    memory, computed on ``device`` as ``settings`` say (ROI, window batch, stitching, TTA,
    precision)."""
    on_cpu = settings.stitch_on_cpu and settings.roi_size is not None
    return predict_probabilities(
        model,
        image.unsqueeze(0) if on_cpu else image.unsqueeze(0).to(device),
        settings.roi_size,
        settings.overlap,
        settings.sw_batch_size,
        settings.tta,
        settings.autocast_dtype,
        sw_device=device if on_cpu else None,
        bucket=settings.bucket,
    )[0].cpu()


def segment_case(
    model: nn.Module,
    case: dict,
    out_dir: Path,
    settings: SegmentationSettings,
    device: torch.device,
    planner: Planner | None = None,
) -> dict[str, Path]:
    """Segment one case; write ``<case_id>.nii.gz`` (labels in the input's own grid,
    orientation, affine and label convention) and, if asked, the probability maps (TC, WT,
    ET) and a preview PNG.

    With a ``planner``, its plan for the case's size sets the ROI, window batch, stitching
    and precision of ``settings``, and smaller plans are tried where memory runs out.

    Returns the written paths by kind. Raises :class:`InputError` if an output exists and
    ``overwrite`` is off, before any work is done.
    """
    case_id = case["case_id"]
    outputs = {"labels": out_dir / f"{case_id}.nii.gz"}
    if settings.probabilities:
        outputs["probabilities"] = out_dir / f"{case_id}_probabilities.nii.gz"
    if settings.preview:
        outputs["preview"] = out_dir / f"{case_id}_preview.png"
    existing = [p for p in outputs.values() if p.exists()]
    if existing and not settings.overwrite:
        raise InputError(f"{existing[0]}: exists; pass --overwrite to replace it")

    convention = settings.convention
    preprocessing = evaluation_transforms(settings.spacing, convention, with_label=False)
    data = preprocessing({IMAGE: case[IMAGE]})
    image = data[IMAGE]
    model.eval()
    if planner is None:
        probabilities = predict_volume(model, image, settings, device)
    else:
        plan = planner.plan_segmentation(image.shape[1:], settings.overlap, settings.tta)
        probabilities = planner.run(
            plan, lambda p: predict_volume(model, image, p.apply(settings), device), case_id
        )
    data["pred"] = MetaTensor(
        probabilities, meta=image.meta, applied_operations=image.applied_operations
    )
    restored = invert_to_input_grid("pred", preprocessing)(data)["pred"]
    reference = nib.load(_first_path(case[IMAGE]))
    spatial = reference.shape[:3]
    if tuple(restored.shape[1:]) != tuple(spatial):
        raise RuntimeError(
            f"{case_id}: prediction {tuple(restored.shape[1:])} does not match "
            f"the input grid {tuple(spatial)}"
        )
    labels = regions_to_labels(restored > settings.threshold, convention.label_values).numpy()
    affine, header = reference.affine, reference.header
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_nifti(labels.astype(np.uint8), affine, header, outputs["labels"])
    if settings.probabilities:
        maps = np.moveaxis(restored.numpy().astype(np.float32), 0, -1)
        _save_nifti(maps, affine, header, outputs["probabilities"])
    if settings.preview:
        flair = 3 if convention.channel_order is None else convention.channel_order[3]
        background = np.asarray(nib.load(_first_path(case[IMAGE], flair)).dataobj)
        if background.ndim == 4:
            background = background[..., flair]
        write_preview(background, labels, outputs["preview"], convention.label_values)
    return outputs


def _first_path(image, index: int = 0) -> str:
    """The path of file ``index``, or the 4D file."""
    return str(image[index] if isinstance(image, (list, tuple)) else image)


def _save_nifti(array: np.ndarray, affine, header, path: Path) -> None:
    """Write atomically, keeping the input's affine and spatial header fields."""
    image = nib.Nifti1Image(array, affine, header=header.copy())
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)  # the input's intensity scaling must not apply
    image.header.set_intent("none")
    if array.ndim == 4:
        image.header.set_xyzt_units(*header.get_xyzt_units())
    write_atomically(path, lambda tmp: nib.save(image, tmp), suffix=".nii.gz")


def write_preview(
    background: np.ndarray, labels: np.ndarray, path: Path, values: Sequence[int] = (1, 2, 4)
) -> None:
    """Axial, coronal and sagittal slices through the tumour's centre with the labels drawn
    over the image: necrotic core red, oedema green, enhancing tumour yellow (``values``:
    the label values of the three, as in :func:`regions_to_labels`)."""
    tumour = np.argwhere(labels > 0)
    centre = (tumour.mean(0) if len(tumour) else np.array(labels.shape) / 2).astype(int)
    lo, hi = np.percentile(background[background > 0], [1, 99]) if background.any() else (0, 1)
    gray = np.clip((background - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb_of = ((1.0, 0.1, 0.1), (0.1, 0.9, 0.1), (1.0, 0.9, 0.1))
    colours = dict(zip(values, rgb_of, strict=True))
    panels = []
    for axis in (2, 1, 0):
        index = [slice(None)] * 3
        index[axis] = centre[axis]
        g, lab = gray[tuple(index)], labels[tuple(index)]
        rgb = np.repeat(g[..., None], 3, axis=-1)
        for value, colour in colours.items():
            mask = lab == value
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(colour)
        panels.append(np.rot90(rgb))
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    picture = (np.concatenate(panels, axis=1) * 255).astype(np.uint8)
    zoom = max(1, 240 // height)  # small (low-resolution) volumes are shown enlarged
    picture = picture.repeat(zoom, axis=0).repeat(zoom, axis=1)
    write_atomically(path, lambda tmp: imageio.imwrite(tmp, picture, format="png"), ".png")
