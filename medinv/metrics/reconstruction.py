"""Reconstruction metrics exactly as fastMRI's ``evaluate.py`` defines them, per volume.

For a target volume ``x`` and a prediction ``y`` (``(slices, h, w)``, real):

- ``NMSE = ||x - y||^2 / ||x||^2`` over the whole volume;
- ``PSNR = 10 log10(L^2 / mean((x - y)^2))`` with data range ``L = max(x)`` of the volume;
- ``SSIM`` = mean over slices of the 2D SSIM of each slice (7x7 uniform window, sample
  covariance, ``K1 = 0.01``, ``K2 = 0.03``, ``L = max(x)`` of the volume), as
  ``skimage.metrics.structural_similarity`` computes it.

:func:`evaluate_directories` scores every volume of a prediction folder against its target
file and returns a pandas table, one row per volume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.metrics import structural_similarity

from medinv.errors import InputError
from medinv.mri.fft import center_crop

METRICS = ("NMSE", "PSNR", "SSIM")


def nmse(target: np.ndarray, prediction: np.ndarray) -> float:
    """Normalised mean squared error ``||x - y||^2 / ||x||^2``."""
    target, prediction = _pair(target, prediction)
    return float(np.linalg.norm(target - prediction) ** 2 / np.linalg.norm(target) ** 2)


def psnr(target: np.ndarray, prediction: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(L^2 / MSE)`` in dB; ``L`` defaults to ``max(x)``."""
    target, prediction = _pair(target, prediction)
    data_range = float(target.max()) if data_range is None else data_range
    mse = np.mean((target - prediction) ** 2)
    return float(10 * np.log10(data_range**2 / mse))


def ssim(target: np.ndarray, prediction: np.ndarray, data_range: float | None = None) -> float:
    """Mean over slices of the 2D SSIM of ``(slices, h, w)`` volumes; ``L`` defaults to
    ``max(x)`` of the volume.

    Raises:
        ValueError: the volumes are not 3D or differ in shape.
    """
    target, prediction = _pair(target, prediction)
    if target.ndim != 3:
        raise ValueError(f"SSIM needs (slices, h, w) volumes, got shape {target.shape}")
    data_range = float(target.max()) if data_range is None else data_range
    values = [
        structural_similarity(t, p, data_range=data_range, win_size=7, K1=0.01, K2=0.03)
        for t, p in zip(target, prediction, strict=True)
    ]
    return float(np.mean(values))


def volume_metrics(target: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """NMSE, PSNR and SSIM of one volume, as fastMRI reports them."""
    return {
        "NMSE": nmse(target, prediction),
        "PSNR": psnr(target, prediction),
        "SSIM": ssim(target, prediction),
    }


def crop_to_target_width(target: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centre-crop both volumes to ``(w, w)``, ``w`` the target's width, as fastMRI does."""
    size = (target.shape[-1], target.shape[-1])
    try:
        return center_crop(target, size), center_crop(prediction, size)
    except ValueError as err:
        raise ValueError(
            f"prediction {prediction.shape} is smaller than the target crop {size}"
        ) from err


@dataclass
class Evaluation:
    """Per-volume scores (``table``) and the volumes that could not be scored (``failures``:
    one line each, naming the file)."""

    table: pd.DataFrame
    failures: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Mean and standard deviation of each metric over the volumes."""
        return self.table[list(METRICS)].agg(["mean", "std"]).T


def evaluate_directories(
    prediction_dir: str | os.PathLike[str],
    target_dir: str | os.PathLike[str],
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Score every target file against the prediction of the same name.

    Targets are the ``reconstruction_rss`` (else ``reconstruction_esc``) of the files in
    ``target_dir``; predictions the ``reconstruction`` of ``prediction_dir/<name>``. A
    missing or bad file is recorded in ``failures`` and the others are still scored.

    Args:
        prediction_dir: folder of fastMRI submission files.
        target_dir: folder of ground-truth files.
        progress: called with each file name before it is scored.

    Returns:
        The :class:`Evaluation`; ``table`` has columns ``file``, ``acquisition``,
        ``acceleration``, ``slices``, ``NMSE``, ``PSNR``, ``SSIM``.

    Raises:
        InputError: a folder is missing or holds no ``.h5`` target.
    """
    from medinv.mri.io import TARGET_KEYS, read_attrs, read_reconstruction

    prediction_dir, target_dir = Path(prediction_dir), Path(target_dir)
    for folder in (prediction_dir, target_dir):
        if not folder.is_dir():
            raise InputError(f"{folder}: not a directory")
    targets = sorted(target_dir.glob("*.h5"))
    if not targets:
        raise InputError(f"{target_dir}: no .h5 target files")
    rows, failures = [], []
    for target_path in targets:
        if progress is not None:
            progress(target_path.name)
        prediction_path = prediction_dir / target_path.name
        try:
            if not prediction_path.is_file():
                raise InputError(f"{prediction_path}: no prediction for {target_path.name}")
            attrs = read_attrs(target_path)
            target = _read_target(target_path, TARGET_KEYS, read_reconstruction)
            prediction = read_reconstruction(prediction_path)
            try:
                target, prediction = crop_to_target_width(target, prediction)
                scores = volume_metrics(target, prediction)
            except ValueError as err:
                raise InputError(f"{prediction_path}: {err}") from None
        except InputError as err:
            failures.append(str(err))
            continue
        rows.append(
            {
                "file": target_path.name,
                "acquisition": attrs.get("acquisition"),
                "acceleration": attrs.get("acceleration"),
                "slices": int(target.shape[0]),
                **scores,
            }
        )
    columns = ["file", "acquisition", "acceleration", "slices", *METRICS]
    return Evaluation(pd.DataFrame(rows, columns=columns), failures)


def _read_target(path: Path, keys: tuple[str, ...], read: Callable) -> np.ndarray:
    last: InputError | None = None
    for key in keys:
        try:
            return read(path, key)
        except InputError as err:
            if "no '" not in str(err):
                raise
            last = err
    raise InputError(f"{path}: no {' or '.join(keys)} target") from last


def _pair(target: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target = np.asarray(target, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if target.shape != prediction.shape:
        raise ValueError(f"target {target.shape} and prediction {prediction.shape} differ")
    return target, prediction
