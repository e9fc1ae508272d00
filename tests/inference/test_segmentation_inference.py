"""Segmentation outputs land in the input's own grid and open as users open them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medinv.errors import InputError
from medinv.inference.segmentation import (
    SegmentationSettings,
    predict_probabilities,
    regions_to_labels,
    segment_case,
)
from medinv.models import IUNet

from ..synthetic_cases import write_case


class AboveMean(nn.Module):
    """A stand-in model whose answer is known in any grid: region c is where modality c of
    the z-scored image is positive."""

    def forward(self, x):
        return 50.0 * x[:, :3]


def _oracle_labels(case):
    """AboveMean's answer computed directly in the file's own voxel grid."""
    regions = []
    for path in case["image"][:3]:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        brain = data != 0
        regions.append(brain & (data > data[brain].mean()))
    return regions_to_labels(torch.from_numpy(np.stack(regions))).numpy()


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([1.5, 1.5, 2.0, 1.0]),
        np.array([[0, -1.2, 0, 30], [-1.0, 0, 0, 20], [0, 0, 2.0, -10], [0, 0, 0, 1]]),
    ],
    ids=["ras", "oblique-flipped"],
)
def test_labels_come_back_in_the_input_grid(tmp_path, affine):
    case = write_case(tmp_path / "in", "c0", shape=(30, 26, 18), affine=affine)
    settings = SegmentationSettings(
        roi_size=(16, 16, 16), overlap=0.25, probabilities=True, preview=True
    )
    outputs = segment_case(AboveMean(), case, tmp_path / "out", settings, torch.device("cpu"))
    saved = nib.load(outputs["labels"])
    np.testing.assert_allclose(saved.affine, nib.load(case["image"][0]).affine)
    labels = np.asarray(saved.dataobj)
    assert labels.dtype == np.uint8 and saved.shape == (30, 26, 18)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(labels, _oracle_labels(case))
    probabilities = nib.load(outputs["probabilities"])
    assert probabilities.shape == (30, 26, 18, 3)
    assert outputs["preview"].stat().st_size > 0


def test_existing_outputs_are_not_overwritten(tmp_path):
    case = write_case(tmp_path / "in", "c1", shape=(16, 16, 16))
    settings = SegmentationSettings(roi_size=None)
    segment_case(AboveMean(), case, tmp_path / "out", settings, torch.device("cpu"))
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        segment_case(AboveMean(), case, tmp_path / "out", settings, torch.device("cpu"))
    settings.overwrite = True
    segment_case(AboveMean(), case, tmp_path / "out", settings, torch.device("cpu"))


def test_sliding_window_and_tta_agree_with_whole_volume_for_an_equivariant_model():
    torch.manual_seed(0)
    image = torch.randn(1, 4, 24, 24, 16)
    whole = predict_probabilities(AboveMean(), image, None)
    windows = predict_probabilities(AboveMean(), image, (16, 16, 8), overlap=0.5, tta=True)
    torch.testing.assert_close(windows, whole, rtol=1e-5, atol=1e-5)
    model = IUNet(4, 3, channels=4, dim=3, architecture=(1, 1)).eval()
    out = predict_probabilities(model, image, (8, 8, 8), overlap=0.25)
    assert out.shape == (1, 3, 24, 24, 16) and 0 <= out.min() and out.max() <= 1


def test_regions_to_labels_follows_brats_nesting():
    regions = torch.zeros(3, 4)
    regions[1, :3] = 1  # WT
    regions[0, :2] = 1  # TC
    regions[2, :1] = 1  # ET
    assert regions_to_labels(regions).tolist() == [4, 1, 2, 0]
    assert regions_to_labels(regions, (1, 2, 3)).tolist() == [3, 1, 2, 0]
    assert regions_to_labels(regions, (2, 1, 3)).tolist() == [3, 2, 1, 0]


def test_four_dimensional_input_in_another_channel_order_and_label_convention(tmp_path):
    from medinv.data.transforms import Convention

    case = write_case(tmp_path / "in", "c2", shape=(20, 18, 12))
    volumes = [np.asarray(nib.load(p).dataobj) for p in case["image"]]
    # Decathlon order: FLAIR, T1, T1ce, T2 in one 4D file.
    stacked = np.stack([volumes[3], volumes[0], volumes[1], volumes[2]], axis=-1)
    path = tmp_path / "in" / "c2_4d.nii.gz"
    nib.save(nib.Nifti1Image(stacked, nib.load(case["image"][0]).affine), path)
    msd = Convention(channel_order=(1, 2, 3, 0), label_values=(2, 1, 3))
    settings = SegmentationSettings(roi_size=None, convention=msd, preview=True)
    record = {"case_id": "c2", "image": str(path)}
    outputs = segment_case(AboveMean(), record, tmp_path / "out", settings, torch.device("cpu"))
    labels = np.asarray(nib.load(outputs["labels"]).dataobj)
    expected = _oracle_labels(case)  # in BraTS 2018-2021 values
    remapped = np.select([expected == 1, expected == 2, expected == 4], [2, 1, 3], 0)
    np.testing.assert_array_equal(labels, remapped)


def test_whole_volume_pads_for_models_that_need_divisible_sizes():
    """SegResNet needs sizes divisible by 8; a BraTS depth of 155 is not. Whole-volume
    inference pads at the end and crops back: the kept voxels are the padded run's."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    model = SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3).eval()
    image = torch.randn(1, 4, 20, 16, 13)
    out = predict_probabilities(model, image, None)
    padded = torch.nn.functional.pad(image, (0, 3, 0, 0, 0, 4))
    with torch.no_grad():
        expected = torch.sigmoid(model(padded))[..., :20, :16, :13]
    assert out.shape == (1, 3, 20, 16, 13)
    torch.testing.assert_close(out, expected)


class RecordsShapes(nn.Module):
    """``inner``, recording the spatial shape of every input it is given."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[2:]))
        return self.inner(x)


def test_bucketed_whole_volumes_run_at_one_shape_and_crop_back():
    """Volumes of 17-32 voxels per axis all run at 32^3; a voxel-wise model's answer does not
    depend on the padding, so it comes back unchanged; an iUNet's comes back at its size."""
    torch.manual_seed(0)
    recorder = RecordsShapes(AboveMean())
    for shape in [(20, 17, 32), (32, 30, 25)]:
        image = torch.randn(1, 4, *shape)
        bucketed = predict_probabilities(recorder, image, None, bucket=16 * 2)
        torch.testing.assert_close(bucketed, predict_probabilities(AboveMean(), image, None))
    assert recorder.shapes == [(32, 32, 32), (32, 32, 32)]

    iunet = RecordsShapes(IUNet(4, 3, channels=4, dim=3, architecture=(1, 1)).eval())
    out = predict_probabilities(iunet, torch.randn(1, 4, 20, 17, 9), None, bucket=8)
    assert iunet.shapes == [(24, 24, 16)] and out.shape == (1, 3, 20, 17, 9)
