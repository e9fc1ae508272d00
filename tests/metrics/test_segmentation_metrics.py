"""Segmentation metrics against hand-computed definitions and the BraTS conventions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medinv.metrics.segmentation import (
    HD95_EMPTY_PENALTY,
    case_metrics,
    region_masks,
    region_metrics,
    summarize,
)


def _hd95_reference(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile surface distance written out with SciPy: surfaces are the
    voxels removed by one binary erosion; distances from each surface voxel of one mask to
    the nearest surface voxel of the other."""

    def surface(m):
        return m & ~ndimage.binary_erosion(m)

    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return max(np.percentile(to_b[sa], 95), np.percentile(to_a[sb], 95))


def _blob(shape, centre, radius, rng):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0))
    return r < radius + rng.uniform(-1, 1, size=shape)


def test_region_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    shape, spacing = (24, 20, 16), (1.0, 1.2, 2.0)
    truth = _blob(shape, (12, 10, 8), 6, rng)
    prediction = _blob(shape, (13, 9, 8), 5, rng)
    got = region_metrics(prediction, truth, spacing)
    tp = (prediction & truth).sum()
    fp = (prediction & ~truth).sum()
    fn = (~prediction & truth).sum()
    tn = (~prediction & ~truth).sum()
    assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-6)
    assert got["sensitivity"] == pytest.approx(tp / (tp + fn), rel=1e-6)
    assert got["specificity"] == pytest.approx(tn / (tn + fp), rel=1e-6)
    assert got["hd95"] == pytest.approx(_hd95_reference(prediction, truth, spacing), rel=1e-5)


def test_empty_mask_conventions():
    empty, full = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    full[2:5, 2:5, 2:5] = True
    both_empty = region_metrics(empty, empty, (1, 1, 1))
    assert both_empty == {"dice": 1.0, "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0}
    false_alarm = region_metrics(full, empty, (1, 1, 1))
    assert false_alarm["dice"] == 0.0 and false_alarm["hd95"] == HD95_EMPTY_PENALTY
    assert false_alarm["sensitivity"] == 1.0 and false_alarm["specificity"] < 1.0
    missed = region_metrics(empty, full, (1, 1, 1))
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0
    assert missed["hd95"] == pytest.approx(373.13, abs=0.01)


@pytest.mark.parametrize("et_label", [4, 3])
def test_regions_nest_as_brats_defines_them(et_label):
    labels = np.array([0, 1, 2, et_label])
    masks = region_masks(labels, et_label)
    assert masks["WT"].tolist() == [False, True, True, True]
    assert masks["TC"].tolist() == [False, True, False, True]
    assert masks["ET"].tolist() == [False, False, False, True]


def test_case_rows_and_summary():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:8, 2:8, 2:8] = 2
    truth[3:7, 3:7, 3:7] = 1
    truth[4:6, 4:6, 4:6] = 4
    rows = case_metrics(truth, truth, (1, 1, 1))
    assert [r["region"] for r in rows] == ["WT", "TC", "ET"]
    assert all(r["dice"] == 1.0 and r["hd95"] == 0.0 for r in rows)
    import pandas as pd

    table = pd.DataFrame([{"case_id": c, **r} for c in ("a", "b") for r in rows])
    summary = summarize(table)
    assert list(summary["region"]) == ["WT", "TC", "ET"]
    assert (summary["dice_mean"] == 1.0).all() and (summary["dice_std"] == 0.0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        case_metrics(truth, truth[:5], (1, 1, 1))


def test_evaluate_directories_pairs_cases_and_reports_problems(tmp_path):
    import nibabel as nib

    from medinv.errors import InputError
    from medinv.metrics.segmentation import evaluate_directories

    truth = np.zeros((12, 12, 8), np.uint8)
    truth[3:9, 3:9, 2:6] = 2
    truth[4:8, 4:8, 3:5] = 4
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    (tmp_path / "truth" / "a").mkdir(parents=True)
    nib.save(nib.Nifti1Image(truth, affine), tmp_path / "truth" / "a" / "a_seg.nii.gz")
    nib.save(nib.Nifti1Image(truth, affine), tmp_path / "truth" / "b_seg.nii.gz")
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(truth, affine), tmp_path / "pred" / "a.nii.gz")
    nib.save(nib.Nifti1Image(truth[:10], affine), tmp_path / "pred" / "b.nii.gz")
    nib.save(nib.Nifti1Image(truth, affine), tmp_path / "pred" / "c.nii.gz")
    table, summary, failures = evaluate_directories(tmp_path / "pred", tmp_path / "truth")
    assert set(table["case_id"]) == {"a"} and (table["dice"] == 1.0).all()
    assert len(failures) == 2
    assert any("b.nii.gz: grid" in f for f in failures)
    assert any("no ground truth for case c" in f for f in failures)
    with pytest.raises(InputError, match="no case could be scored"):
        evaluate_directories(tmp_path / "truth" / "a", tmp_path / "truth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no predicted label maps"):
        evaluate_directories(tmp_path / "empty", tmp_path / "truth")
