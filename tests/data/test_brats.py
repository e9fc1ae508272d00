"""Reading BraTS cases: every layout, the label conventions, validation errors, resampling.

Each test writes tiny NIfTI volumes with nibabel in a temporary folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medinv.data.brats import (
    BRATS2021,
    BRATS2023,
    MODALITIES,
    MSD_BRAIN_TUMOUR,
    MSD_CHANNELS,
    check_case,
    discover_cases,
    load_case,
)
from medinv.errors import InputError

SHAPE = (6, 5, 4)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def constant(value: float, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.full(shape, value, dtype=np.float32)


def label_map() -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1:3, 1:3, 1:3] = 2
    label[2, 2, 2] = 4
    label[2, 2, 1] = 1
    return label


def brats2021_case(root: Path, case: str, seg: bool = True, skip: str = "") -> Path:
    folder = root / case
    for value, modality in enumerate(MODALITIES):
        if modality != skip:
            write(folder / f"{case}_{modality}.nii.gz", constant(value))
    if seg:
        write(folder / f"{case}_seg.nii.gz", label_map())
    return folder


def test_brats2021_cases_are_found_at_any_depth_in_modality_order(tmp_path: Path) -> None:
    brats2021_case(tmp_path / "HGG", "Brats18_2013_10_1")
    brats2021_case(tmp_path / "LGG", "Brats18_2013_0_1", seg=False)
    (tmp_path / "HGG" / "._Brats18_2013_10_1_t1.nii.gz").write_bytes(b"resource fork")
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Brats18_2013_0_1", "Brats18_2013_10_1"]
    hgg = cases[1]
    assert hgg.layout == "brats2021" and hgg.labels == BRATS2021 and hgg.et_label == 4
    assert [p.name for p in hgg.image] == [f"Brats18_2013_10_1_{m}.nii.gz" for m in MODALITIES]
    assert hgg.label is not None and hgg.label.name == "Brats18_2013_10_1_seg.nii.gz"
    assert cases[0].label is None and "label" not in cases[0].to_dict()


def test_brats2023_names_map_to_modalities_and_et_label_3(tmp_path: Path) -> None:
    case = "BraTS-GLI-00000-000"
    names = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    for value, modality in enumerate(MODALITIES):
        write(tmp_path / case / f"{case}-{names[modality]}.nii.gz", constant(value))
    write(tmp_path / case / f"{case}-seg.nii.gz", label_map())
    (found,) = discover_cases(tmp_path)
    assert found.layout == "brats2023" and found.labels == BRATS2023 and found.et_label == 3
    assert [p.name.split("-")[-1] for p in found.image] == [
        f"{names[m]}.nii.gz" for m in MODALITIES
    ]
    assert np.array_equal(load_case(found).image[:, 0, 0, 0], [0, 1, 2, 3])


def msd_task(root: Path) -> Path:
    """A Decathlon Task01 folder: 4D images with channels FLAIR, T1w, T1gd, T2w."""
    channels = np.stack([constant(MODALITIES.index(m)) for m in MSD_CHANNELS], axis=-1)
    write(root / "imagesTr" / "BRATS_001.nii.gz", channels)
    write(root / "labelsTr" / "BRATS_001.nii.gz", label_map())
    write(root / "imagesTs" / "BRATS_485.nii.gz", channels)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"resource fork")
    return root


def test_msd_task_gives_4d_records_and_msd_label_convention(tmp_path: Path) -> None:
    cases = discover_cases(msd_task(tmp_path / "Task01_BrainTumour"))
    assert [(c.case_id, c.split, c.label is not None) for c in cases] == [
        ("BRATS_001", "train", True),
        ("BRATS_485", "test", False),
    ]
    train = cases[0]
    assert train.layout == "msd" and train.labels == MSD_BRAIN_TUMOUR
    assert train.channels == MSD_CHANNELS and len(train.image) == 1
    loaded = load_case(train)
    assert loaded.image.shape == (4, *SHAPE)
    assert np.array_equal(loaded.image[:, 0, 0, 0], [0, 1, 2, 3])  # back in MODALITIES order


def test_msd_dataset_json_names_channels_and_labels(tmp_path: Path) -> None:
    root = msd_task(tmp_path)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {
                    "0": "background",
                    "1": "edema",
                    "2": "non-enhancing tumor",
                    "3": "enhancing tumour",
                },
                "training": [
                    {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
                ],
                "test": ["./imagesTs/BRATS_485.nii.gz"],
            }
        )
    )
    cases = discover_cases(root)
    assert [(c.case_id, c.split, c.layout) for c in cases] == [
        ("BRATS_001", "train", "msd"),
        ("BRATS_485", "test", "msd"),
    ]
    assert all(c.channels == MSD_CHANNELS and c.labels == MSD_BRAIN_TUMOUR for c in cases)


def test_msd_labels_map_to_brats_regions_with_monai(tmp_path: Path) -> None:
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses, MapLabelValue

    msd = np.array([0, 1, 2, 3])  # background, oedema, non-enhancing, enhancing
    orig, target = MSD_BRAIN_TUMOUR.to_brats2021()
    brats = MapLabelValue(orig, target)(msd)
    assert brats.tolist() == [0, 2, 1, 4]
    tc, wt, et = ConvertToMultiChannelBasedOnBratsClasses(et_label=4)(brats)
    regions = MSD_BRAIN_TUMOUR.regions()
    for channel, region in ((tc, "TC"), (wt, "WT"), (et, "ET")):
        assert channel.tolist() == np.isin(msd, regions[region]).tolist(), region


def test_datalist_of_four_paths_follows_its_modality_entry(tmp_path: Path) -> None:
    folder = brats2021_case(tmp_path / "data", "case7")
    names = ("flair", "t1", "t1ce", "t2")  # listed in this order in the JSON
    datalist = {
        "modality": {str(i): n for i, n in enumerate(names)},
        "training": [
            {
                "image": [f"data/case7/case7_{n}.nii.gz" for n in names],
                "label": "data/case7/case7_seg.nii.gz",
            }
        ],
        "validation": [{"image": [f"data/case7/case7_{n}.nii.gz" for n in names]}],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    with pytest.raises(InputError, match="case id 'case7' also used"):
        discover_cases(path)
    datalist["validation"][0]["case_id"] = "case7_val"
    path.write_text(json.dumps(datalist))
    train, val = discover_cases(path)
    assert (train.split, val.split) == ("train", "val")
    assert train.image == tuple(folder / f"case7_{m}.nii.gz" for m in MODALITIES)
    assert train.labels == BRATS2021 and val.label is None


def test_datalist_4d_image_uses_given_channels(tmp_path: Path) -> None:
    write(tmp_path / "vol.nii.gz", np.stack([constant(i) for i in range(4)], axis=-1))
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [{"image": "vol.nii.gz"}]}))
    (case,) = discover_cases(path, channels=("t2", "t1", "flair", "t1ce"))
    assert case.case_id == "vol" and case.to_dict()["image"] == str(tmp_path / "vol.nii.gz")
    assert np.array_equal(load_case(case).image[:, 0, 0, 0], [1, 3, 0, 2])


def test_csv_manifest_paths_are_relative_to_it(tmp_path: Path) -> None:
    brats2021_case(tmp_path / "cases", "a")
    brats2021_case(tmp_path / "cases", "b", seg=False)
    manifest = tmp_path / "manifests" / "set.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", *MODALITIES, "label", "split"])
        for case, label, split in (("a", "../cases/a/a_seg.nii.gz", "train"), ("b", "", "test")):
            images = [f"../cases/{case}/{case}_{m}.nii.gz" for m in MODALITIES]
            writer.writerow([case, *images, label, split])
    train, test = discover_cases(manifest)
    assert (train.case_id, train.split, test.case_id, test.split) == ("a", "train", "b", "test")
    assert train.layout == "csv" and test.label is None
    assert train.image[0] == tmp_path / "cases" / "a" / "a_t1.nii.gz"
    record = train.to_dict()
    assert record["split"] == "train" and record["label"] == str(train.label)


def test_example_manifests_follow_the_schema_and_read_alike(tmp_path: Path) -> None:
    import shutil

    root = Path(__file__).resolve().parents[2] / "data_manifests"
    schema = json.loads((root / "brats_manifest.schema.json").read_text())
    assert list(schema["properties"]) == ["case_id", *MODALITIES, "label", "split"]
    assert schema["required"] == ["case_id", *MODALITIES]
    for name in ("brats_example.csv", "brats_example_datalist.json"):
        shutil.copy(root / name, tmp_path / name)
    for case in ("BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"):
        brats2021_case(tmp_path, case, seg=case != "BraTS2021_00003")
    from_csv = discover_cases(tmp_path / "brats_example.csv")
    from_json = discover_cases(tmp_path / "brats_example_datalist.json")
    assert [(c.case_id, c.split) for c in from_csv] == [
        ("BraTS2021_00000", "train"),
        ("BraTS2021_00002", "val"),
        ("BraTS2021_00003", "test"),
    ]
    assert [(c.case_id, c.split, c.image, c.label) for c in from_json] == [
        (c.case_id, c.split, c.image, c.label) for c in from_csv
    ]


def test_loadimaged_reads_a_record(tmp_path: Path) -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    brats2021_case(tmp_path, "c1")
    (case,) = discover_cases(tmp_path)
    keys = ["image", "label"]
    load = Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)])
    data = load(case.to_dict())
    assert tuple(data["image"].shape) == (4, *SHAPE) and tuple(data["label"].shape) == (1, *SHAPE)
    assert np.array_equal(np.asarray(data["image"][:, 0, 0, 0]), [0, 1, 2, 3])


def test_et_label_override_replaces_the_layout_default(tmp_path: Path) -> None:
    brats2021_case(tmp_path, "c1")
    (case,) = discover_cases(tmp_path, et_label=3)
    assert case.et_label == 3 and case.labels.regions()["TC"] == (1, 3)
    with pytest.raises(InputError, match="et_label 2"):
        discover_cases(tmp_path, et_label=2)


def test_missing_modality_names_the_expected_file(tmp_path: Path) -> None:
    brats2021_case(tmp_path, "c1", skip="t1ce")
    with pytest.raises(InputError, match=r"c1_t1ce\.nii\.gz: missing t1ce image of case c1"):
        discover_cases(tmp_path)


def test_csv_missing_file_and_column_are_named(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,t1,t1ce,t2\nx,a.nii.gz,b.nii.gz,c.nii.gz\n")
    with pytest.raises(InputError, match=r"m\.csv: missing column\(s\) flair"):
        discover_cases(manifest)
    manifest.write_text("case_id,t1,t1ce,t2,flair\nx,a.nii.gz,b.nii.gz,c.nii.gz,d.nii.gz\n")
    with pytest.raises(InputError, match=r"a\.nii\.gz: missing t1 of case x \(line 2\)"):
        discover_cases(manifest)


def test_empty_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no BraTS cases found"):
        discover_cases(tmp_path)


def test_shape_mismatch_names_the_file(tmp_path: Path) -> None:
    folder = brats2021_case(tmp_path, "c1")
    write(folder / "c1_t2.nii.gz", constant(2, (6, 5, 5)))
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputError, match=r"c1_t2\.nii\.gz: shape 6x5x5 differs from 6x5x4"):
        check_case(case)


def test_affine_mismatch_names_the_file_and_small_differences_pass(tmp_path: Path) -> None:
    folder = brats2021_case(tmp_path, "c1")
    nearly = AFFINE.copy()
    nearly[0, 3] += 1e-5
    write(folder / "c1_flair.nii.gz", constant(3), nearly)
    (case,) = discover_cases(tmp_path)
    assert check_case(case).mismatched == ()
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    write(folder / "c1_flair.nii.gz", constant(3), shifted)
    with pytest.raises(InputError, match=r"c1_flair\.nii\.gz: affine differs .* by up to 0\.5 mm"):
        check_case(case)


def test_label_on_another_grid_is_an_error(tmp_path: Path) -> None:
    folder = brats2021_case(tmp_path, "c1")
    write(folder / "c1_seg.nii.gz", np.zeros((3, 5, 4), dtype=np.uint8))
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputError, match=r"c1_seg\.nii\.gz: shape 3x5x4"):
        check_case(case)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    folder = brats2021_case(tmp_path, "c1")
    (folder / "c1_t2.nii.gz").write_bytes(b"not a nifti file")
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputError, match=r"c1_t2\.nii\.gz: not a readable NIfTI file"):
        check_case(case)


def test_4d_image_must_have_four_channels(tmp_path: Path) -> None:
    write(tmp_path / "imagesTr" / "BRATS_001.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    write(tmp_path / "labelsTr" / "BRATS_001.nii.gz", label_map())
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputError, match=r"BRATS_001\.nii\.gz: 3 channels, expected 4"):
        check_case(case)


def test_resample_puts_modalities_and_label_on_the_first_grid(tmp_path: Path) -> None:
    """World x, stored on a finer grid, comes back exactly (linear interpolation is exact)."""
    folder = brats2021_case(tmp_path, "c1")
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine[:3, 3] = [-6.0, -5.0, -1.0]  # covers the 1 mm grid (x -5..0, y -4..0, z 0..3)
    x_world = np.broadcast_to(-6.0 + 0.5 * np.arange(16)[:, None, None], (16, 14, 12))
    write(folder / "c1_t2.nii.gz", x_world.astype(np.float32), fine)
    write(folder / "c1_seg.nii.gz", np.where(x_world >= -2.0, 4, 0).astype(np.uint8), fine)
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputError, match=r"c1_t2\.nii\.gz: shape 16x14x12 differs"):
        check_case(case)
    assert check_case(case, resample=True).mismatched == (folder / "c1_t2.nii.gz", case.label)
    loaded = load_case(case, resample=True)
    assert loaded.image.shape == (4, *SHAPE) and np.array_equal(loaded.affine, AFFINE)
    world_x = -np.arange(SHAPE[0], dtype=np.float32)[:, None, None]  # AFFINE flips x
    assert np.allclose(loaded.image[2], np.broadcast_to(world_x, SHAPE), atol=1e-4)
    assert np.array_equal(loaded.image[0], constant(0))
    assert loaded.label is not None
    assert np.array_equal(loaded.label, np.broadcast_to(np.where(world_x >= -2, 4, 0), SHAPE))


def test_nrrd_and_mha_headers_give_the_nifti_affine(tmp_path: Path) -> None:
    """SimpleITK's LPS geometry converts to the RAS affine nibabel reads from NIfTI."""
    import SimpleITK as sitk

    affine = np.array(
        [[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 5.0], [0, 0, 0, 1]]
    )
    write(tmp_path / "ref.nii.gz", constant(1), affine)
    image = sitk.ReadImage(str(tmp_path / "ref.nii.gz"))
    rows = []
    for value, modality in enumerate(MODALITIES):
        suffix = ".nrrd" if value % 2 else ".mha"
        image_m = sitk.GetImageFromArray(constant(value).transpose(2, 1, 0))
        image_m.CopyInformation(image)
        sitk.WriteImage(image_m, str(tmp_path / f"{modality}{suffix}"))
        rows.append(f"{modality}{suffix}")
    (tmp_path / "m.csv").write_text("case_id,t1,t1ce,t2,flair\nc," + ",".join(rows) + "\n")
    (case,) = discover_cases(tmp_path / "m.csv")
    grid = check_case(case)
    assert np.allclose(grid.affine, affine, atol=1e-5)
    assert np.array_equal(load_case(case).image[:, 1, 2, 3], [0, 1, 2, 3])
