"""k-space set builder: schema, physics of the simulation, masks, splits and determinism.

Most tests build from small synthetic NIfTI volumes, so they run without the fetched
anatomy; one builds from the real anatomy and skips when it is absent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from medinv.data.anatomy import anatomy_status
from medinv.data.kspace import KSpaceSetConfig, build_kspace_set
from medinv.errors import InputError
from medinv.mri import create_mask_func, seed_from_name
from medinv.mri.io import KSpaceFile

from ..synthetic_cases import synthetic_anatomy

SCHEMA = Path(__file__).resolve().parents[2] / "data_manifests" / "kspace_manifest.schema.json"
MATRIX = 48
SMALL = KSpaceSetConfig(
    seed=7,
    volumes={"train": 2, "val": 1, "test": 2},
    slices=2,
    matrix=MATRIX,
    coils=(8, 10),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("kspace")
    result = build_kspace_set(tmp / "set", SMALL, anatomy=synthetic_anatomy(tmp))
    return tmp / "set", result


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def test_manifest_rows_follow_the_schema(built) -> None:
    out, result = built
    schema = json.loads(SCHEMA.read_text())
    rows = _rows(result.manifest)
    assert list(rows[0]) == schema["required"] == list(schema["properties"])
    counts = {"train": 2, "val": 1, "test": 2, "test_full": 2}
    for split, n in counts.items():
        assert sum(r["split"] == split for r in rows) == n * 2  # two challenges
    for row in rows:
        assert (out / row["file"]).is_file()
        for key in ("slices", "coils", "height", "width"):
            assert int(row[key]) >= schema["properties"][key]["minimum"]
        for key in ("split", "challenge", "acquisition"):
            assert row[key] in schema["properties"][key]["enum"]
        is_test = row["split"] == "test"
        assert bool(row["target_file"]) == is_test and bool(row["acceleration"]) == is_test
        assert bool(row["sampled_fraction"]) == is_test
        if is_test:
            assert (out / row["target_file"]).is_file()
    assert not list(out.rglob(".*.tmp"))


def test_files_have_the_fastmri_schema(built) -> None:
    out, _ = built
    for path in sorted(out.rglob("*.h5")):
        multicoil = path.parent.name.startswith("multicoil")
        with h5py.File(path, "r") as f:
            kspace = f["kspace"]
            assert kspace.dtype == np.complex64
            assert kspace.ndim == (4 if multicoil else 3)
            assert kspace.shape[-2:] == (2 * MATRIX, MATRIX)
            assert {"acquisition", "max", "norm", "patient_id"} <= set(f.attrs)
            if path.parent.name.endswith("_test"):
                assert set(f) == {"kspace", "ismrmrd_header", "mask"}
                assert f.attrs["acceleration"] in (4, 8)
            else:
                key = "reconstruction_rss" if multicoil else "reconstruction_esc"
                assert set(f) == {"kspace", "ismrmrd_header", key}
                target = f[key][()]
                assert target.dtype == np.float32 and target.shape == (2, MATRIX, MATRIX)
                assert f.attrs["max"] == pytest.approx(target.max())
                assert f.attrs["norm"] == pytest.approx(np.linalg.norm(target), rel=1e-6)
        with KSpaceFile(path) as f:  # the reader's checks pass, header included
            assert f.header.recon_size == (MATRIX, MATRIX, 1)
            assert f.header.padding == (0, MATRIX)
            if multicoil:
                assert f.header.receiver_channels == f.shape[1]
                assert 8 <= f.shape[1] <= 10


def test_targets_are_rss_of_the_noisy_kspace(built) -> None:
    out, _ = built
    for path in sorted(out.glob("multicoil_*/*.h5")) + sorted(out.glob("singlecoil_val/*.h5")):
        if path.parent.name.endswith("_test"):
            continue
        with h5py.File(path, "r") as f:
            kspace, key = f["kspace"][()], "reconstruction_rss"
            target = f[key][()] if key in f else f["reconstruction_esc"][()]
        axes = (-2, -1)
        images = np.fft.fftshift(
            np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), norm="ortho"), axes=axes
        )
        magnitude = np.sqrt((np.abs(images) ** 2).sum(1)) if kspace.ndim == 4 else np.abs(images)
        top = MATRIX // 2
        np.testing.assert_allclose(target, magnitude[:, top : top + MATRIX], rtol=1e-4, atol=1e-6)


def test_test_files_are_the_full_kspace_under_the_named_mask(built) -> None:
    out, result = built
    for row in (r for r in _rows(result.manifest) if r["split"] == "test"):
        with h5py.File(out / row["file"], "r") as f, h5py.File(out / row["target_file"]) as g:
            mask = f["mask"][()]
            expected = create_mask_func("equispaced_fraction", [0.08, 0.04], [4, 8])(
                (MATRIX,), seed=seed_from_name(Path(row["file"]).name)
            )
            np.testing.assert_array_equal(mask, expected.mask.numpy() > 0)
            assert f.attrs["acceleration"] == expected.acceleration
            assert f.attrs["num_low_frequency"] == expected.num_low_frequencies
            np.testing.assert_array_equal(f["kspace"][()], g["kspace"][()] * mask)
            assert abs(mask.mean() - 1 / f.attrs["acceleration"]) < 0.05
            assert float(row["sampled_fraction"]) == pytest.approx(mask.mean(), abs=1e-6)


def test_noise_is_about_one_percent_of_peak_and_correlated_across_coils(built) -> None:
    out, _ = built
    path = sorted(out.glob("multicoil_train/*.h5"))[0]
    with h5py.File(path, "r") as f:
        kspace = f["kspace"][0]
    axes = (-2, -1)
    images = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), norm="ortho"), axes=axes
    )
    # Rows outside the central matrix are the empty half of the oversampled field of view.
    background = np.concatenate([images[:, : MATRIX // 2], images[:, -MATRIX // 2 :]], axis=1)
    background = background.reshape(kspace.shape[0], -1)
    peak = np.abs(images).max()
    assert 0.006 < background.std(axis=1).mean() / peak < 0.013
    correlation = np.abs(np.corrcoef(background))
    assert correlation[~np.eye(len(correlation), dtype=bool)].max() > 0.1


def test_kspace_is_not_hermitian(built) -> None:
    out, _ = built
    path = sorted(out.glob("singlecoil_train/*.h5"))[0]
    with h5py.File(path, "r") as f:
        k = f["kspace"][0][1:, 1:]  # drop the unpaired row/column so k(-r) is a flip
    mirrored = np.conj(k[::-1, ::-1])
    assert np.linalg.norm(k - mirrored) > 0.5 * np.linalg.norm(k)


def test_subjects_are_kept_apart_between_splits(built) -> None:
    _, result = built
    subjects = {
        split: {r["subject"] for r in result.rows if r["split"] == split}
        for split in ("train", "val", "test")
    }
    assert subjects["train"] == {"icbm152"}
    assert not subjects["train"] & (subjects["val"] | subjects["test"])
    assert result.notes == []


def test_build_is_deterministic_from_the_seed(built, tmp_path: Path) -> None:
    out, _ = built
    locate = synthetic_anatomy(tmp_path)
    config = KSpaceSetConfig(
        seed=7, volumes={"train": 1, "val": 0, "test": 0}, slices=2, matrix=MATRIX, coils=(8, 10)
    )
    again = build_kspace_set(tmp_path / "again", config, anatomy=locate)
    build_kspace_set(
        tmp_path / "other",
        KSpaceSetConfig(**{**config.__dict__, "seed": 8}),
        anatomy=locate,
    )
    name = again.rows[0]["file"]
    with h5py.File(out / name) as a, h5py.File(tmp_path / "again" / name) as b:
        np.testing.assert_array_equal(a["kspace"][()], b["kspace"][()])
    with h5py.File(tmp_path / "again" / name) as a, h5py.File(tmp_path / "other" / name) as b:
        assert not np.array_equal(a["kspace"][()], b["kspace"][()])


def test_without_the_held_out_subject_the_note_says_so(tmp_path: Path) -> None:
    config = KSpaceSetConfig(
        volumes={"train": 1, "val": 1, "test": 1},
        slices=1,
        matrix=32,
        coils=(8, 8),
        challenges=("singlecoil",),
    )
    result = build_kspace_set(tmp_path / "s", config, anatomy=synthetic_anatomy(tmp_path, False))
    assert len(result.notes) == 1 and "colin27" in result.notes[0]
    assert {r["subject"] for r in result.rows} == {"icbm152"}


def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    config = KSpaceSetConfig(volumes={"train": 1}, slices=1, matrix=32, coils=(8, 8))
    locate = synthetic_anatomy(tmp_path)
    build_kspace_set(tmp_path / "s", config, anatomy=locate)
    with pytest.raises(InputError, match="exists"):
        build_kspace_set(tmp_path / "s", config, anatomy=locate)
    build_kspace_set(tmp_path / "s", config, anatomy=locate, overwrite=True)
    # A clash is found before anything is written.
    (tmp_path / "s" / "manifest.csv").unlink()
    clash = next((tmp_path / "s").glob("singlecoil_train/*.h5"))
    for path in (tmp_path / "s").rglob("*.h5"):
        if path != clash:
            path.unlink()
    with pytest.raises(InputError, match=f"^{clash}: exists"):
        build_kspace_set(tmp_path / "s", config, anatomy=locate)
    assert [p for p in (tmp_path / "s").rglob("*") if p.is_file()] == [clash]


@pytest.mark.parametrize(
    "changes",
    [
        {"matrix": 31},
        {"coils": (9, 8)},
        {"noise": 2.0},
        {"challenges": ("x",)},
        {"volumes": {"training": 1}},
        {"mask_type": "spiral"},
    ],
)
def test_bad_configurations_are_input_errors(changes: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        build_kspace_set(tmp_path, KSpaceSetConfig(**changes), anatomy=synthetic_anatomy(tmp_path))


def test_small_set_from_the_real_anatomy(tmp_path: Path) -> None:
    status = anatomy_status()
    if status["icbm152/t1"] is None or status["icbm152/t2"] is None:
        pytest.skip("sample anatomy not fetched: run `make data`")
    config = KSpaceSetConfig(
        volumes={"train": 2, "val": 1, "test": 1}, slices=2, coils=(8, 8), challenges=("multicoil",)
    )
    result = build_kspace_set(tmp_path, config)
    expected_notes = [] if status["colin27/t1"] is not None else result.notes
    assert result.notes == expected_notes
    with KSpaceFile(tmp_path / result.rows[0]["file"]) as f:
        assert f.shape == (2, 8, 640, 320)
        target = f.target(0)
    assert target.shape == (320, 320)
    # Real anatomy: brain in the middle, background at the edges.
    assert target[140:180, 140:180].mean() > 5 * torch.cat([target[:10], target[-10:]]).mean()


@pytest.mark.parametrize("challenge", ["multicoil", "singlecoil"])
def test_fastmri_slice_dataset_reads_the_files(built, tmp_path: Path, challenge: str) -> None:
    mri_data = pytest.importorskip("fastmri.data.mri_data")
    out, _ = built
    for split in ("train", "test"):
        dataset = mri_data.SliceDataset(
            out / f"{challenge}_{split}",
            challenge=challenge,
            dataset_cache_file=tmp_path / "cache.pkl",
        )
        assert len(dataset) == SMALL.volumes[split] * SMALL.slices
        kspace, mask, target, attrs, fname, dataslice = dataset[1]
        with KSpaceFile(out / f"{challenge}_{split}" / fname) as f:
            np.testing.assert_array_equal(kspace, f.kspace(dataslice).numpy())
            assert (attrs["padding_left"], attrs["padding_right"]) == f.header.padding
            assert attrs["recon_size"] == f.header.recon_size
            if split == "test":
                np.testing.assert_array_equal(mask, f.mask().numpy() > 0)
                assert target is None
            else:
                np.testing.assert_array_equal(target, f.target(dataslice).numpy())
