"""The BraTS-like set: its files, labels, tumour geometry, contrasts and determinism.

A small set (4 training, 2 test cases at size "small") is built once from the fetched
anatomy; the tests skip where the anatomy has not been fetched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from medinv import cli
from medinv.data import anatomy
from medinv.data.brats import MODALITIES, discover_cases
from medinv.data.brats_like import (
    GRIDS,
    BratsLikeConfig,
    Grid,
    _apply_mass_effect,
    build_brats_like,
)
from medinv.errors import InputError

KEYS = (*MODALITIES, "seg")


def require_icbm152() -> None:
    status = anatomy.anatomy_status()
    if any(path is None for name, path in status.items() if name.startswith("icbm152/")):
        pytest.skip("sample anatomy not fetched: run `make data`")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_icbm152()
    out = tmp_path_factory.mktemp("brats_like") / "set"
    build_brats_like(out, BratsLikeConfig(train=4, test=2, seed=0, size="small"))
    return out


@pytest.fixture(scope="module")
def seed1_without_colin27(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Seed 1, one case per split, built as if the optional Colin27 set were not fetched."""
    require_icbm152()
    status = anatomy.anatomy_status()
    hidden = {name: None if name.startswith("colin27/") else path for name, path in status.items()}
    out = tmp_path_factory.mktemp("brats_like_seed1") / "set"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(anatomy, "anatomy_status", lambda root=None: hidden)
        result = build_brats_like(out, BratsLikeConfig(train=1, test=1, seed=1, size="small"))
    return out, result.notes


def dataset(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def volumes(root: Path, split: str, case_id: str) -> dict[str, nib.Nifti1Image]:
    return {k: nib.load(root / split / case_id / f"{case_id}_{k}.nii.gz") for k in KEYS}


def arrays(root: Path, split: str, case_id: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.dataobj) for k, v in volumes(root, split, case_id).items()}


def cases(root: Path) -> list[tuple[str, str]]:
    return [(c["split"], c["case_id"]) for c in dataset(root)["cases"]]


def test_cases_are_in_the_brats2021_layout_on_one_grid(small_set: Path) -> None:
    grid = GRIDS["small"]
    assert len(cases(small_set)) == 6
    for split, case_id in cases(small_set):
        images = volumes(small_set, split, case_id)
        for key, image in images.items():
            assert image.shape == grid.shape, key
            assert np.allclose(image.affine, grid.affine), key
            expected = np.uint8 if key == "seg" else np.int16
            assert image.get_data_dtype() == expected, key


def test_full_grid_is_brats_sri24() -> None:
    grid = GRIDS["full"]
    assert grid.shape == (240, 240, 155)
    assert np.array_equal(grid.affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(grid.affine) == ("L", "P", "S")


def test_labels_are_brats2021_values_and_every_case_has_all_three(small_set: Path) -> None:
    for split, case_id in cases(small_set):
        seg = arrays(small_set, split, case_id)["seg"]
        assert set(np.unique(seg)) == {0, 1, 2, 4}, case_id
        assert all(np.count_nonzero(seg == v) >= 8 for v in (1, 2, 4)), case_id


def test_regions_nest_and_the_rim_encloses_the_necrosis(small_set: Path) -> None:
    for split, case_id in cases(small_set):
        seg = arrays(small_set, split, case_id)["seg"]
        et, tc, wt = seg == 4, np.isin(seg, (1, 4)), seg > 0
        assert np.all(tc[et]) and np.all(wt[tc]), case_id
        necrotic = seg == 1
        border = ndimage.binary_dilation(necrotic) & ~necrotic
        assert np.mean(tc[border]) >= 0.9, case_id
        # one tumour: the core is one connected component
        assert ndimage.label(tc)[1] == 1, case_id


def test_tumour_lies_in_the_skull_stripped_brain(small_set: Path) -> None:
    for split, case_id in cases(small_set):
        data = arrays(small_set, split, case_id)
        brain = data["t1"] > 0
        for modality in MODALITIES:
            assert np.array_equal(data[modality] > 0, brain), (case_id, modality)
            assert data[modality].min() >= 0
        assert np.all(brain[data["seg"] > 0]), case_id
        assert 0.1 < brain.mean() < 0.5, case_id


def test_contrasts_follow_glioblastoma_appearance(small_set: Path) -> None:
    """Necrosis dark on T1 and bright on T2; rim bright on T1ce; oedema bright on FLAIR."""
    for split, case_id in cases(small_set):
        data = arrays(small_set, split, case_id)
        seg = data.pop("seg")
        normal = {m: v[(v > 0) & (seg == 0)] for m, v in data.items()}
        region = {m: {k: v[seg == k].mean() for k in (1, 2, 4)} for m, v in data.items()}
        assert region["t1"][1] < np.median(normal["t1"]), case_id
        assert region["t2"][1] > np.median(normal["t2"]), case_id
        assert region["t1ce"][4] > np.percentile(normal["t1ce"], 90), case_id
        assert region["t1ce"][4] > 1.2 * region["t1"][4], case_id
        assert region["flair"][2] > np.percentile(normal["flair"], 90), case_id
        assert all(100 < np.median(v) < 2000 for v in normal.values()), case_id


def test_train_and_test_anatomy_are_disjoint(small_set: Path) -> None:
    summary = dataset(small_set)
    by_split = {
        split: {c["anatomy"] for c in summary["cases"] if c["split"] == split}
        for split in ("train", "test")
    }
    assert by_split["train"] == {"icbm152"}
    assert by_split["test"] and not by_split["train"] & by_split["test"]
    assert summary["counts"] == {"train": 4, "test": 2}
    assert summary["seed"] == 0 and summary["size"] == "small"


def test_manifest_and_datalist_list_exactly_the_files(small_set: Path) -> None:
    from monai.data import load_decathlon_datalist

    from_manifest = discover_cases(small_set / "manifest.csv")
    from_folders = discover_cases(small_set)
    from_datalist = discover_cases(small_set / "dataset.json")
    expected = sorted(cases(small_set))
    assert sorted((c.split, c.case_id) for c in from_manifest) == expected
    assert sorted((c.split, c.case_id) for c in from_datalist) == expected
    files = sorted(p for c in from_folders for p in c.files)
    assert sorted(p.resolve() for c in from_manifest for p in c.files) == files
    on_disk = sorted(small_set.glob("*/*/*.nii.gz"))
    assert [p.resolve() for p in on_disk] == files
    training = load_decathlon_datalist(small_set / "dataset.json", True, "training")
    assert len(training) == 4 and all(Path(p).is_file() for p in training[0]["image"])


def test_same_seed_rebuilds_identical_files_and_overwrite_drops_stale_cases(
    small_set: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    shutil.copytree(small_set, again)
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        build_brats_like(again, BratsLikeConfig(train=1, test=0, seed=0, size="small"))
    build_brats_like(again, BratsLikeConfig(train=1, test=0, seed=0, size="small"), overwrite=True)
    assert cases(again) == [("train", "BraTSLike_train_0000")]
    assert sorted(p.name for p in again.glob("*/*")) == ["BraTSLike_train_0000"]
    for key in KEYS:
        name = f"train/BraTSLike_train_0000/BraTSLike_train_0000_{key}.nii.gz"
        assert (again / name).read_bytes() == (small_set / name).read_bytes(), key


def test_another_seed_gives_another_case(
    small_set: Path, seed1_without_colin27: tuple[Path, list[str]]
) -> None:
    other, _ = seed1_without_colin27
    first = arrays(small_set, "train", "BraTSLike_train_0000")
    second = arrays(other, "train", "BraTSLike_train_0000")
    for key in KEYS:
        assert not np.array_equal(first[key], second[key]), key


def test_without_colin27_test_cases_use_the_heldout_family(
    seed1_without_colin27: tuple[Path, list[str]],
) -> None:
    out, notes = seed1_without_colin27
    summary = dataset(out)
    assert [(c["split"], c["anatomy"]) for c in summary["cases"]] == [
        ("train", "icbm152"),
        ("test", "icbm152-heldout"),
    ]
    heldout = summary["cases"][1]
    assert heldout["family"] == "heldout" and heldout["t2"] != "real"
    assert notes and "colin27 not fetched" in notes[0] and summary["notes"] == notes
    scale = np.array(heldout["geometry"]["scale"])
    assert np.all(np.abs(np.log(scale)) >= np.log(1.09) - 1e-3)  # outside the training range
    train_scale = np.array(summary["cases"][0]["geometry"]["scale"])
    assert np.all(np.abs(np.log(train_scale)) <= np.log(1.08) + 1e-3)


def test_mass_effect_pushes_tissue_away_from_the_centre() -> None:
    """On an identity mapping, voxels sample from nearer the centre: linear to the core
    radius, then Gaussian decay; sampled positions keep their order (no folding)."""
    grid = Grid((41, 41, 41), (1.0, 1.0, 1.0))
    coords = np.indices(grid.shape, dtype=np.float32)
    before = coords.copy()
    core, reach, push = 8.0, 5.0, 2.0
    tumour = {"core_mm": core, "reach_mm": reach, "push_mm": push}
    _apply_mass_effect(coords, np.eye(3), (20, 20, 20), tumour, grid)
    shift = coords - before
    r = np.arange(21.0)
    expected = -push * np.where(r < core, r / core, np.exp(-(((r - core) / reach) ** 2)))
    assert np.allclose(shift[0, 20:, 20, 20], expected, atol=1e-5)
    assert np.allclose(shift[1:, 20:, 20, 20], 0.0)
    assert np.all(np.diff(coords[0, :, 20, 20]) > 0)


def test_bad_configuration_is_an_input_error(tmp_path: Path) -> None:
    for config in (
        BratsLikeConfig(train=-1),
        BratsLikeConfig(train=0, test=0),
        BratsLikeConfig(seed=-3),
        BratsLikeConfig(size="medium"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InputError):
            build_brats_like(tmp_path, config)
    assert list(tmp_path.iterdir()) == []


def test_cli_help_has_an_example_and_existing_output_is_refused(small_set: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(cli.app, ["data", "brats-like", "--help"]).output
    assert "Example:" in help_text
    result = runner.invoke(
        cli.app, ["data", "brats-like", "--out", str(small_set), "--size", "small"]
    )
    assert result.exit_code != 0 and isinstance(result.exception, InputError)
    assert "--overwrite" in str(result.exception)
