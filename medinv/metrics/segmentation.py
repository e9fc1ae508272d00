"""Segmentation metrics per case and region, with the BraTS conventions, on MONAI.

Regions: WT = {1, 2, ET}, TC = {1, ET}, ET = {ET} with ET = 4 (BraTS 2018-2021) or 3
(BraTS 2023). Conventions for empty masks (as the BraTS evaluation applies them):

- Dice: empty truth and empty prediction score 1; empty truth with a non-empty
  prediction scores 0 (MONAI ``compute_dice(..., ignore_empty=False)``).
- Sensitivity: with an empty truth there is nothing to miss: 1.
- Specificity: TN / (TN + FP) over the whole volume (always defined).
- HD95 (mm, MONAI ``compute_hausdorff_distance``, 95th percentile, voxel spacing from the
  header): 0 when both masks are empty; :data:`HD95_EMPTY_PENALTY` (the diagonal of the
  240x240x155 BraTS grid at 1 mm) when exactly one of them is empty.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, get_confusion_matrix

from medinv.errors import InputError

REGIONS = ("WT", "TC", "ET")
HD95_EMPTY_PENALTY = math.sqrt(240**2 + 240**2 + 155**2)  # 373.13 mm


def region_masks(labels: np.ndarray, et_label: int = 4) -> dict[str, np.ndarray]:
    """Boolean WT, TC and ET masks of a BraTS label map."""
    return {
        "WT": np.isin(labels, (1, 2, et_label)),
        "TC": np.isin(labels, (1, et_label)),
        "ET": labels == et_label,
    }


def region_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> dict[str, float]:
    """Dice, sensitivity, specificity and HD95 of one binary mask against the truth."""
    p = torch.from_numpy(np.ascontiguousarray(prediction, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))[None, None]
    dice = float(compute_dice(p, t, include_background=True, ignore_empty=False))
    tp, fp, tn, fn = (float(v) for v in get_confusion_matrix(p, t).flatten())
    sensitivity = 1.0 if tp + fn == 0 else tp / (tp + fn)
    specificity = 1.0 if tn + fp == 0 else tn / (tn + fp)
    empty_p, empty_t = not prediction.any(), not truth.any()
    if empty_p and empty_t:
        hd95 = 0.0
    elif empty_p or empty_t:
        hd95 = HD95_EMPTY_PENALTY
    else:
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal call
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            distance = compute_hausdorff_distance(
                p, t, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
            )
        hd95 = float(distance)
    return {"dice": dice, "sensitivity": sensitivity, "specificity": specificity, "hd95": hd95}


def case_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], et_label: int = 4
) -> list[dict[str, float | str]]:
    """One row per region for a pair of BraTS label maps on the same grid."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    pred_masks, truth_masks = region_masks(prediction, et_label), region_masks(truth, et_label)
    return [
        {"region": r, **region_metrics(pred_masks[r], truth_masks[r], spacing)} for r in REGIONS
    ]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, median and standard deviation of each metric per region."""
    metrics = ["dice", "sensitivity", "specificity", "hd95"]
    summary = table.groupby("region", sort=False)[metrics].agg(["mean", "median", "std"])
    summary.columns = [f"{m}_{s}" for m, s in summary.columns]
    return summary.reset_index()


def _truth_for(case_id: str, truth_dir: Path) -> Path | None:
    """The ground-truth label file of ``case_id`` in any of the usual BraTS layouts."""
    for candidate in (
        truth_dir / case_id / f"{case_id}_seg.nii.gz",
        truth_dir / case_id / f"{case_id}-seg.nii.gz",
        truth_dir / f"{case_id}_seg.nii.gz",
        truth_dir / f"{case_id}-seg.nii.gz",
        truth_dir / f"{case_id}.nii.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def evaluate_directories(
    pred_dir: Path, truth_dir: Path, et_label: int = 4
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Score every ``<case_id>.nii.gz`` label map in ``pred_dir`` against its truth.

    Returns the per-case, per-region table, its summary, and one line per case that could
    not be scored (missing truth, grids that disagree); those cases are left out.
    """
    predictions = sorted(
        p for p in pred_dir.glob("*.nii.gz") if not p.name.endswith("_probabilities.nii.gz")
    )
    if not predictions:
        raise InputError(f"{pred_dir}: no predicted label maps (*.nii.gz)")
    rows, failures = [], []
    for path in predictions:
        case_id = path.name[: -len(".nii.gz")]
        truth_path = _truth_for(case_id, truth_dir)
        if truth_path is None:
            failures.append(f"{path}: no ground truth for case {case_id} in {truth_dir}")
            continue
        pred, truth = nib.load(path), nib.load(truth_path)
        if pred.shape != truth.shape or not np.allclose(pred.affine, truth.affine, atol=1e-3):
            failures.append(f"{path}: grid {pred.shape} does not match {truth_path} {truth.shape}")
            continue
        spacing = truth.header.get_zooms()[:3]
        labels = np.asarray(pred.dataobj).astype(np.int16)
        reference = np.asarray(truth.dataobj).astype(np.int16)
        rows += [
            {"case_id": case_id, **row}
            for row in case_metrics(labels, reference, spacing, et_label)
        ]
    if not rows:
        raise InputError(f"{pred_dir}: no case could be scored; first problem: {failures[0]}")
    table = pd.DataFrame(rows)
    return table, summarize(table), failures
