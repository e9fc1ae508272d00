"""Reconstruction metrics: parity with fastMRI's evaluate and with the SSIM formula."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from medinv.errors import InputError
from medinv.metrics.reconstruction import (
    evaluate_directories,
    nmse,
    psnr,
    ssim,
    volume_metrics,
)
from medinv.mri.io import KSpaceHeader, write_kspace_file, write_reconstruction


def _volumes(seed: int = 0, shape: tuple[int, ...] = (3, 48, 40)) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[1], : shape[2]]
    anatomy = np.exp(-((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) / 200.0)
    target = anatomy * (2.0 + rng.random(shape))
    prediction = target + 0.05 * rng.standard_normal(shape)
    return target, prediction


def _ssim_formula(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. (2004) SSIM with a 7x7 uniform window and sample covariance, averaged
    over the pixels at least 3 from the border."""
    n = 49
    mean = {k: uniform_filter(v, 7) for k, v in {"x": x, "y": y}.items()}
    second = {
        "xx": uniform_filter(x * x, 7),
        "yy": uniform_filter(y * y, 7),
        "xy": uniform_filter(x * y, 7),
    }
    cov = n / (n - 1)
    vx = cov * (second["xx"] - mean["x"] ** 2)
    vy = cov * (second["yy"] - mean["y"] ** 2)
    vxy = cov * (second["xy"] - mean["x"] * mean["y"])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mean["x"] * mean["y"] + c1) * (2 * vxy + c2)) / (
        (mean["x"] ** 2 + mean["y"] ** 2 + c1) * (vx + vy + c2)
    )
    return float(s[3:-3, 3:-3].mean())


def test_metrics_equal_fastmri_evaluate() -> None:
    evaluate = pytest.importorskip("fastmri.evaluate")
    for seed in range(3):
        target, prediction = _volumes(seed)
        ours = volume_metrics(target, prediction)
        assert ours["NMSE"] == pytest.approx(float(evaluate.nmse(target, prediction)), rel=1e-6)
        assert ours["PSNR"] == pytest.approx(float(evaluate.psnr(target, prediction)), rel=1e-6)
        theirs_ssim = float(np.squeeze(evaluate.ssim(target, prediction)))
        assert ours["SSIM"] == pytest.approx(theirs_ssim, rel=1e-6)


def test_metrics_equal_their_closed_forms() -> None:
    target, prediction = _volumes(4)
    diff = target - prediction
    assert nmse(target, prediction) == pytest.approx((diff**2).sum() / (target**2).sum(), 1e-12)
    expected_psnr = 10 * np.log10(target.max() ** 2 / (diff**2).mean())
    assert psnr(target, prediction) == pytest.approx(expected_psnr, rel=1e-12)
    pairs = zip(target, prediction, strict=True)
    formula = np.mean([_ssim_formula(t, p, target.max()) for t, p in pairs])
    assert ssim(target, prediction) == pytest.approx(formula, rel=1e-6)


def test_perfect_prediction_scores() -> None:
    target, _ = _volumes(5)
    assert nmse(target, target) == 0
    assert ssim(target, target) == pytest.approx(1.0)
    assert psnr(target, target * 1.01) > psnr(target, target * 1.1)


def test_metric_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="differ"):
        nmse(np.ones((2, 8, 8)), np.ones((2, 8, 9)))
    with pytest.raises(ValueError, match="slices, h, w"):
        ssim(np.ones((8, 8)), np.ones((8, 8)))


HEADER = KSpaceHeader((16, 8, 1), (48, 40, 1), 4, 7)


def _target_file(path: Path, target: np.ndarray, **attrs: object) -> None:
    kspace = np.zeros((target.shape[0], 16, 8), np.complex64)
    datasets = {"reconstruction_esc": target.astype(np.float32)}
    write_kspace_file(path, kspace, HEADER, {"acquisition": "AXT1", **attrs}, datasets)


def test_evaluate_directories_reads_files_and_keeps_going_past_bad_ones(tmp_path: Path) -> None:
    targets, predictions = tmp_path / "targets", tmp_path / "predictions"
    targets.mkdir()
    predictions.mkdir()
    expected = {}
    for i in range(2):
        target, prediction = _volumes(10 + i, shape=(2, 48, 40))
        _target_file(targets / f"v{i}.h5", target, acceleration=4)
        padded = np.pad(prediction, ((0, 0), (4, 4), (0, 0)))  # cropped back to 40x40
        write_reconstruction(predictions / f"v{i}.h5", padded)
        expected[f"v{i}.h5"] = volume_metrics(target[:, 4:44], prediction[:, 4:44])
    _target_file(targets / "orphan.h5", _volumes(20)[0])
    (predictions / "broken.h5").write_text("not hdf5")
    _target_file(targets / "broken.h5", _volumes(21)[0])

    evaluation = evaluate_directories(predictions, targets)
    table = evaluation.table.set_index("file")
    assert sorted(table.index) == ["v0.h5", "v1.h5"]
    for name, scores in expected.items():
        for metric, value in scores.items():
            assert table.loc[name, metric] == pytest.approx(value, rel=1e-6)
        assert table.loc[name, "acquisition"] == "AXT1"
        assert table.loc[name, "acceleration"] == 4 and table.loc[name, "slices"] == 2
    assert len(evaluation.failures) == 2
    assert any(f.startswith(str(predictions / "orphan.h5")) for f in evaluation.failures)
    assert any("broken.h5: not an HDF5 file" in f for f in evaluation.failures)
    summary = evaluation.summary()
    assert summary.loc["SSIM", "mean"] == pytest.approx(table["SSIM"].mean())


def test_evaluate_directories_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a directory"):
        evaluate_directories(tmp_path / "nope", tmp_path)
    with pytest.raises(InputError, match="no .h5 target files"):
        evaluate_directories(tmp_path, tmp_path)


def test_target_without_reconstruction_is_a_failure(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    with h5py.File(tmp_path / "t" / "a.h5", "w") as f:
        f["kspace"] = np.zeros((1, 4, 4), np.complex64)
    write_reconstruction(tmp_path / "p" / "a.h5", np.ones((1, 4, 4)))
    evaluation = evaluate_directories(tmp_path / "p", tmp_path / "t")
    assert evaluation.table.empty
    assert evaluation.failures == [
        f"{tmp_path / 't' / 'a.h5'}: no reconstruction_rss or reconstruction_esc target"
    ]
