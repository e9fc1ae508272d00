"""Undersampling masks: fastMRI parity, sampled fraction, centre lines, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medinv.mri import (
    EquispacedMaskFractionFunc,
    EquispacedMaskFunc,
    RandomMaskFunc,
    apply_mask,
    create_mask_func,
    sampled_fraction,
    seed_from_name,
)

TYPES = {
    "random": RandomMaskFunc,
    "equispaced": EquispacedMaskFunc,
    "equispaced_fraction": EquispacedMaskFractionFunc,
}
SETTINGS = [([0.08], [4]), ([0.04], [8]), ([0.08, 0.04], [4, 8])]


@pytest.mark.parametrize("mask_type", list(TYPES))
@pytest.mark.parametrize(("fractions", "accelerations"), SETTINGS)
@pytest.mark.parametrize("num_cols", [320, 368, 97])
def test_masks_equal_fastmri_masks_for_the_same_file_name(
    mask_type: str, fractions: list[float], accelerations: list[int], num_cols: int
) -> None:
    subsample = pytest.importorskip("fastmri.data.subsample")
    theirs_cls = {
        "random": subsample.RandomMaskFunc,
        "equispaced": subsample.EquiSpacedMaskFunc,
        "equispaced_fraction": subsample.EquispacedMaskFractionFunc,
    }[mask_type]
    for name in ("file1000001.h5", "file_brain_AXT2_200_2000019.h5"):
        seed = seed_from_name(name)
        ours, ours_low, _ = create_mask_func(mask_type, fractions, accelerations)(
            (16, 640, num_cols), seed=seed
        )
        theirs, theirs_low = theirs_cls(fractions, accelerations)((16, 640, num_cols, 2), seed=seed)
        assert ours.shape == (1, 1, num_cols)
        np.testing.assert_array_equal(ours.flatten().numpy(), theirs.flatten().numpy())
        assert ours_low == theirs_low


@pytest.mark.parametrize("mask_type", list(TYPES))
@pytest.mark.parametrize(("fraction", "acceleration"), [(0.08, 4), (0.04, 8)])
def test_centre_columns_are_all_kept(mask_type: str, fraction: float, acceleration: int) -> None:
    num_cols = 320
    mask, num_low, drawn = TYPES[mask_type]([fraction], [acceleration], seed=3)((640, num_cols))
    assert num_low == round(num_cols * fraction) and drawn == acceleration
    start = (num_cols - num_low + 1) // 2
    columns = mask.flatten()
    assert torch.all(columns[start : start + num_low] == 1)
    assert set(columns.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(("fraction", "acceleration"), [(0.08, 4), (0.04, 8)])
def test_random_mask_keeps_one_over_acceleration_in_expectation(
    fraction: float, acceleration: int
) -> None:
    func = RandomMaskFunc([fraction], [acceleration], seed=0)
    fractions = [sampled_fraction(func((1, 368)).mask) for _ in range(400)]
    # Binomial columns: the mean of 400 draws is within 4 standard errors of 1/acceleration.
    n_low = round(368 * fraction)
    p = (368 / acceleration - n_low) / (368 - n_low)
    stderr = np.sqrt((368 - n_low) * p * (1 - p)) / 368 / np.sqrt(400)
    assert abs(np.mean(fractions) - 1 / acceleration) < 4 * stderr


@pytest.mark.parametrize(("fraction", "acceleration"), [(0.08, 4), (0.04, 8)])
def test_equispaced_fraction_mask_keeps_close_to_one_over_acceleration(
    fraction: float, acceleration: int
) -> None:
    for offset in range(3):
        mask = EquispacedMaskFractionFunc([fraction], [acceleration])((320,), offset=offset).mask
        assert abs(mask.sum().item() - 320 / acceleration) <= 2


def test_equispaced_mask_keeps_every_acceleration_th_column_from_the_offset() -> None:
    mask, num_low, _ = EquispacedMaskFunc([0.08], [4])((1, 320), offset=1)
    columns = mask.flatten()
    assert torch.all(columns[1::4] == 1)
    outside = torch.ones(320, dtype=torch.bool)
    outside[1::4] = False
    start = (320 - num_low + 1) // 2
    outside[start : start + num_low] = False
    assert torch.all(columns[outside] == 0)
    assert sampled_fraction(mask) > 1 / 4


def test_seeding_by_file_name_is_deterministic_and_differs_between_names() -> None:
    func = RandomMaskFunc([0.08], [4])
    first = func((640, 320), seed=seed_from_name("a.h5")).mask
    again = RandomMaskFunc([0.08], [4], seed=99)((640, 320), seed=seed_from_name("a.h5")).mask
    torch.testing.assert_close(first, again)
    others = [func((640, 320), seed=seed_from_name(f"b{i}.h5")).mask for i in range(3)]
    assert any(not torch.equal(first, other) for other in others)


def test_apply_mask_gives_every_slice_and_coil_the_same_columns() -> None:
    kspace = torch.randn(3, 4, 16, 32, dtype=torch.complex64) + 1
    masked, mask, _ = apply_mask(kspace, RandomMaskFunc([0.08], [4]), seed=seed_from_name("v.h5"))
    kept = masked.abs().sum(dim=(0, 1, 2)) > 0
    torch.testing.assert_close(kept.float(), mask.flatten())
    torch.testing.assert_close(masked, kspace * mask)


def test_apply_mask_never_samples_padding_columns() -> None:
    kspace = torch.ones(2, 8, 40, dtype=torch.complex64)
    _, mask, _ = apply_mask(kspace, EquispacedMaskFunc([0.5], [2]), offset=0, padding=(4, 36))
    columns = mask.flatten()
    assert torch.all(columns[:4] == 0) and torch.all(columns[36:] == 0)
    assert columns[4:36].sum() > 0


def test_mask_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="same length"):
        RandomMaskFunc([0.08, 0.04], [4])
    with pytest.raises(ValueError, match="center fractions"):
        RandomMaskFunc([1.5], [4])
    with pytest.raises(ValueError, match="unknown mask type"):
        create_mask_func("poisson", [0.08], [4])
