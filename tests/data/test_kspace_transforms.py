"""k-space MONAI transforms and the slice/volume dataset, on small files built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from torch.utils.data import DataLoader

from medinv.data.kspace_transforms import (
    ComplexCenterCrop,
    ComplexCenterCropd,
    KSpaceMaskd,
    KSpaceSliceDataset,
    NormalizeKSpace,
    NormalizeKSpaced,
    RandKSpaceSharpend,
    ZeroFilled,
    ZeroFilledd,
    sharpening_filter,
    slab_starts,
)
from medinv.errors import InputError
from medinv.mri import RandomMaskFunc, SenseOperator, birdcage_maps, fft2c, seed_from_name
from medinv.mri.fft import center_crop, ifft2c
from medinv.mri.io import KSpaceHeader, write_kspace_file

SLICES, COILS, H, W = 3, 4, 32, 24


def _file(path: Path, mask: bool = False, padding: int = 0) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, path.name)))
    image = rng.standard_normal((SLICES, H, W)) + 1j * rng.standard_normal((SLICES, H, W))
    maps = birdcage_maps(COILS, (H, W), dtype=torch.complex128)
    kspace = SenseOperator(maps)(torch.from_numpy(image)).numpy().astype(np.complex64)
    target = np.abs(image[:, 8:24, 4:20]).astype(np.float32)
    header = KSpaceHeader((H, W, 1), (16, 16, 1), W // 2 - padding, W - 1 - 2 * padding, COILS)
    datasets: dict[str, np.ndarray] = {"reconstruction_rss": target}
    attrs: dict[str, object] = {"acquisition": "AXT1", "max": 1.0, "norm": 1.0, "patient_id": "p"}
    if mask:
        columns = np.zeros(W, bool)
        columns[::2] = True
        kspace = kspace * columns
        datasets = {"mask": columns}
        attrs |= {"acceleration": 2, "num_low_frequency": 1}
    write_kspace_file(path, kspace, header, attrs, datasets)
    return kspace


def test_dataset_yields_each_slice_of_each_file(tmp_path: Path) -> None:
    kspaces = {name: _file(tmp_path / name) for name in ("a.h5", "b.h5")}
    dataset = KSpaceSliceDataset(tmp_path)
    assert len(dataset) == 2 * SLICES
    item = dataset[SLICES + 1]
    assert item["filename"] == "b.h5" and item["slice"] == 1
    assert item["kspace"].dtype == torch.complex64
    np.testing.assert_array_equal(item["kspace"].numpy(), kspaces["b.h5"][1])
    assert item["target"].shape == (16, 16) and item["padding"] == (0, W)
    assert item["attrs"]["acquisition"] == "AXT1"


def test_volume_mode_stacks_slices(tmp_path: Path) -> None:
    kspace = _file(tmp_path / "a.h5")
    dataset = KSpaceSliceDataset([tmp_path / "a.h5"], volumes=True)
    assert len(dataset) == 1
    item = dataset[0]
    np.testing.assert_array_equal(item["kspace"].numpy(), kspace)
    assert item["target"].shape == (SLICES, 16, 16) and item["slice"] == -1


@pytest.mark.parametrize("num_slices", range(1, 10))
def test_slab_starts_cover_every_slice_and_end_on_the_last(num_slices: int) -> None:
    for slab in range(1, num_slices + 1):
        for stride in range(1, slab + 1):
            starts = slab_starts(num_slices, slab, stride)
            assert starts == sorted(set(starts)) and starts[0] == 0
            assert starts[-1] + slab == num_slices
            covered = {s + i for s in starts for i in range(slab)}
            assert covered == set(range(num_slices))
    assert slab_starts(10, 4) == [0, 4, 6] and slab_starts(8, 4) == [0, 4]


@pytest.mark.parametrize(
    ("num_slices", "slab", "stride", "message"),
    [(3, 4, None, "3 slices, fewer than a slab of 4"), (8, 4, 5, "stride"), (8, 0, None, "slab")],
)
def test_slab_starts_reject_what_cannot_tile(num_slices, slab, stride, message) -> None:
    with pytest.raises(ValueError, match=message):
        slab_starts(num_slices, slab, stride)


def test_slab_mode_yields_consecutive_slices_with_one_mask(tmp_path: Path) -> None:
    kspace = _file(tmp_path / "a.h5")
    masker = KSpaceMaskd("kspace", RandomMaskFunc([0.25], [2], seed=0))
    dataset = KSpaceSliceDataset([tmp_path / "a.h5"], transform=masker, slab=2)
    assert [start for _, start in dataset.index] == [0, 1]
    for start in (0, 1):
        item = dataset[start]
        assert item["slice"] == start and item["target"].shape == (2, 16, 16)
        assert item["mask"].shape == (W,)
        expected = kspace[start : start + 2] * item["mask"].numpy()
        np.testing.assert_array_equal(item["kspace"].numpy(), expected)


def test_slab_mode_names_a_file_shorter_than_the_slab(tmp_path: Path) -> None:
    _file(tmp_path / "a.h5")
    with pytest.raises(InputError, match="a.h5: 3 slices, fewer than a slab of 4"):
        KSpaceSliceDataset(tmp_path, slab=4)
    with pytest.raises(ValueError, match="volumes or slabs"):
        KSpaceSliceDataset(tmp_path, volumes=True, slab=2)


def test_dataset_names_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "bad.h5").write_text("x")
    with pytest.raises(InputError, match="bad.h5: not an HDF5 file"):
        KSpaceSliceDataset(tmp_path)


def test_mask_transform_seeds_from_the_file_name_and_respects_padding(tmp_path: Path) -> None:
    _file(tmp_path / "v.h5", padding=2)
    func = RandomMaskFunc([0.25], [2])
    dataset = KSpaceSliceDataset(tmp_path, transform=KSpaceMaskd("kspace", func))
    masks = [dataset[i]["mask"] for i in range(SLICES)]
    assert all(torch.equal(m, masks[0]) for m in masks)
    expected = func((H, W), seed=seed_from_name("v.h5")).mask.flatten()
    expected[:2] = 0
    expected[W - 2 :] = 0
    torch.testing.assert_close(masks[0], expected)
    item, raw = dataset[1], KSpaceSliceDataset(tmp_path)[1]
    torch.testing.assert_close(item["kspace"], raw["kspace"] * masks[0])
    assert item["num_low_frequencies"] == round(W * 0.25)


def test_mask_transform_keeps_the_mask_of_a_test_file(tmp_path: Path) -> None:
    kspace = _file(tmp_path / "t.h5", mask=True)
    dataset = KSpaceSliceDataset(
        tmp_path, transform=KSpaceMaskd("kspace", RandomMaskFunc([0.5], [2]))
    )
    item = dataset[0]
    np.testing.assert_array_equal(item["mask"].numpy() > 0, np.arange(W) % 2 == 0)
    np.testing.assert_array_equal(item["kspace"].numpy(), kspace[0])
    assert item["num_low_frequencies"] == 1 and "target" not in item


def test_zero_filled_is_rss_of_inverse_fft() -> None:
    image = torch.randn(COILS, H, W, dtype=torch.complex64)
    kspace = fft2c(image)
    expected = image.abs().pow(2).sum(0).sqrt()
    torch.testing.assert_close(ZeroFilled()(kspace), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ZeroFilled(combine=None)(kspace), image, rtol=1e-5, atol=1e-5)
    cropped = ZeroFilled(crop=(16, 16))(kspace)
    torch.testing.assert_close(cropped, expected[8:24, 4:20], rtol=1e-5, atol=1e-5)
    single = ZeroFilled(coil_dim=None)(kspace[0])
    torch.testing.assert_close(single, image[0].abs(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="combine"):
        ZeroFilled(combine="sense")


def test_pipeline_normalises_consistently_and_batches(tmp_path: Path) -> None:
    _file(tmp_path / "a.h5")
    pipeline = Compose(
        [
            KSpaceMaskd("kspace", RandomMaskFunc([0.25], [2])),
            ZeroFilledd("kspace", output_key="zero_filled"),
            NormalizeKSpaced("kspace", reference_key="zero_filled"),
            ComplexCenterCropd(["zero_filled"], (16, 16)),
        ]
    )
    raw = KSpaceSliceDataset(
        tmp_path, transform=KSpaceMaskd("kspace", RandomMaskFunc([0.25], [2]))
    )[0]
    item = KSpaceSliceDataset(tmp_path, transform=pipeline)[0]
    scale = item["scale"]
    assert scale == ZeroFilled()(raw["kspace"]).max()
    torch.testing.assert_close(item["kspace"] * scale, raw["kspace"])
    torch.testing.assert_close(item["target"] * scale, raw["target"])
    assert item["zero_filled"].shape == (16, 16)
    full = ZeroFilled(crop=(16, 16))(item["kspace"])
    torch.testing.assert_close(item["zero_filled"], full)
    loader = DataLoader(
        KSpaceSliceDataset(tmp_path, transform=pipeline),
        batch_size=3,
        collate_fn=lambda items: torch.stack([i["kspace"] for i in items]),
    )
    assert next(iter(loader)).shape == (3, COILS, H, W)


def test_zero_filled_dict_handles_volumes_and_single_coil() -> None:
    volume = {"kspace": torch.randn(2, COILS, H, W, dtype=torch.complex64)}
    out = ZeroFilledd("kspace", output_key="zf", volume=True)(volume)
    assert out["zf"].shape == (2, H, W)
    single = ZeroFilledd("kspace", output_key="zf")({"kspace": volume["kspace"][0, 0]})
    torch.testing.assert_close(single["zf"], ZeroFilled(coil_dim=None)(volume["kspace"][0, 0]))


def test_array_forms_of_normalise_and_crop() -> None:
    kspace = torch.randn(COILS, H, W, dtype=torch.complex64)
    reference = ZeroFilled()(kspace)
    normalised, scale = NormalizeKSpace()(kspace, reference)
    assert scale == reference.max()
    assert ZeroFilled()(normalised).max() == pytest.approx(1.0, rel=1e-5)
    odd = torch.arange(9 * 7).reshape(9, 7)
    # fastMRI's window starts at (n - m) // 2: rows 2..5, columns 1..4 here.
    torch.testing.assert_close(ComplexCenterCrop((4, 4))(odd), odd[2:6, 1:5])


def test_sharpening_filter_is_one_at_the_centre_and_one_plus_strength_at_the_corners() -> None:
    f = sharpening_filter((8, 6), 3.0)
    assert f.shape == (8, 6)
    assert f[4, 3] == 1.0  # the centre, index n // 2
    assert f[0, 0] == pytest.approx(4.0)  # a corner: both axes at Nyquist
    assert f[0, 3] == pytest.approx(2.5) and f[4, 0] == pytest.approx(2.5)
    assert torch.equal(sharpening_filter((8, 6), 0.0), torch.ones(8, 6, dtype=torch.float64))


def _consistent_item(multicoil: bool, slab: int | None = None) -> dict:
    """Fully sampled k-space with the target fastMRI defines for it (RSS or magnitude of
    its inverse FFT, centre-cropped to 16x16)."""
    generator = torch.Generator().manual_seed(3)
    lead = (slab,) if slab else ()
    coils = (COILS,) if multicoil else ()
    image = torch.randn(*lead, *coils, H, W, dtype=torch.complex64, generator=generator)
    kspace = fft2c(image)
    magnitude = image.abs().pow(2).sum(-3).sqrt() if multicoil else image.abs()
    return {"kspace": kspace, "target": center_crop(magnitude, (16, 16)), "filename": "a.h5"}


@pytest.mark.parametrize(
    ("multicoil", "slab"), [(True, None), (False, None), (True, 2), (False, 3)]
)
def test_sharpening_filters_kspace_and_recomputes_the_target(multicoil, slab) -> None:
    item = _consistent_item(multicoil, slab)
    sharpen = RandKSpaceSharpend("kspace", multicoil, prob=1.0, max_strength=3.0)
    sharpen.set_random_state(0)
    out = sharpen(item)
    assert 0.0 < sharpen.strength <= 3.0
    # every coil (and slice) is the input times the same real filter
    expected = item["kspace"] * sharpening_filter((H, W), sharpen.strength).to(torch.float32)
    torch.testing.assert_close(out["kspace"], expected)
    # the target is the filtered images' RSS (magnitude), computed from the images directly
    images = ifft2c(expected)
    magnitude = images.abs().pow(2).sum(-3).sqrt() if multicoil else images.abs()
    torch.testing.assert_close(out["target"], center_crop(magnitude, (16, 16)))
    assert out["target"].dtype == item["target"].dtype
    # emphasising high frequencies changes the image: the pair is not what it was
    assert (out["target"] - item["target"]).norm() > 1e-2 * item["target"].norm()


def test_sharpening_leaves_items_alone_at_probability_zero() -> None:
    item = _consistent_item(True)
    out = RandKSpaceSharpend("kspace", True, prob=0.0)(item)
    assert out["kspace"] is item["kspace"] and out["target"] is item["target"]


def test_sharpening_draws_reproducibly_from_its_seed() -> None:
    def strengths(seed):
        t = RandKSpaceSharpend("kspace", True, prob=0.5, max_strength=3.0)
        t.set_random_state(seed)
        out = []
        for _ in range(32):
            t.randomize()
            out.append(t.strength if t._do_transform else None)
        return out

    assert strengths(1) == strengths(1) != strengths(2)
    assert any(s is None for s in strengths(1)) and any(s is not None for s in strengths(1))


def test_sharpening_refuses_a_target_it_cannot_recompute() -> None:
    item = _consistent_item(True)
    item["target"] = item["target"] * 1.1  # not the RSS of this k-space
    with pytest.raises(InputError, match="a.h5: its target is not the RSS"):
        RandKSpaceSharpend("kspace", True, prob=1.0)(item)
    with pytest.raises(ValueError, match="max_strength"):
        RandKSpaceSharpend("kspace", True, max_strength=-1.0)
    with pytest.raises(ValueError, match="one k-space key"):
        RandKSpaceSharpend(["kspace", "kspace_2"], True)
