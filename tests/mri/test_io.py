"""fastMRI HDF5 files: schema round trip, header parsing, lazy reads and one-line errors."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from medinv.errors import InputError
from medinv.mri.io import (
    KSpaceFile,
    KSpaceHeader,
    parse_header,
    read_attrs,
    read_reconstruction,
    write_kspace_file,
    write_reconstruction,
)

SLICES, COILS, HEIGHT, WIDTH = 3, 4, 32, 24
HEADER = KSpaceHeader((HEIGHT, WIDTH, 1), (16, 16, 1), WIDTH // 2 - 2, WIDTH - 5, COILS)
ATTRS = {"acquisition": "AXT2", "max": 1.5, "norm": 9.0, "patient_id": "abc"}


def _kspace(multicoil: bool = True) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (SLICES, COILS, HEIGHT, WIDTH) if multicoil else (SLICES, HEIGHT, WIDTH)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _write(path: Path, **datasets: np.ndarray) -> np.ndarray:
    kspace = datasets.pop("kspace", _kspace())
    header = datasets.pop("header", HEADER)
    write_kspace_file(path, kspace, header, ATTRS, datasets)
    return kspace


def test_written_file_has_the_fastmri_schema_read_back_with_h5py(tmp_path: Path) -> None:
    path = tmp_path / "file1.h5"
    target = np.random.default_rng(1).random((SLICES, 16, 16), dtype=np.float32)
    kspace = _write(path, reconstruction_rss=target)
    with h5py.File(path, "r") as f:
        assert f["kspace"].dtype == np.complex64 and f["kspace"].shape == kspace.shape
        np.testing.assert_array_equal(f["kspace"][()], kspace)
        np.testing.assert_array_equal(f["reconstruction_rss"][()], target)
        assert isinstance(f["ismrmrd_header"][()], bytes)
        assert dict(f.attrs) == ATTRS
    assert not [p for p in tmp_path.iterdir() if p.name != "file1.h5"]


def test_header_reads_the_same_with_fastmri_element_queries(tmp_path: Path) -> None:
    mri_data = pytest.importorskip("fastmri.data.mri_data")
    root = ElementTree.fromstring(HEADER.to_xml())
    enc = ["encoding", "encodedSpace", "matrixSize"]
    rec = ["encoding", "reconSpace", "matrixSize"]
    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    assert tuple(int(mri_data.et_query(root, enc + [a])) for a in "xyz") == HEADER.encoding_size
    assert tuple(int(mri_data.et_query(root, rec + [a])) for a in "xyz") == HEADER.recon_size
    center = int(mri_data.et_query(root, lims + ["center"]))
    maximum = int(mri_data.et_query(root, lims + ["maximum"])) + 1
    left = HEADER.encoding_size[1] // 2 - center
    assert HEADER.padding == (left, left + maximum)
    assert parse_header(HEADER.to_xml()) == HEADER


def test_kspace_file_reads_one_slice_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "file2.h5"
    mask = np.zeros(WIDTH, dtype=bool)
    mask[::3] = True
    kspace = _write(path, mask=mask)
    with KSpaceFile(path) as f:
        assert f.num_slices == SLICES and f.multicoil and f.shape == kspace.shape
        assert f.header == HEADER
        assert f.attrs == ATTRS
        assert f.target_key is None
        second = f.kspace(1)
        assert second.dtype == torch.complex64 and second.shape == (COILS, HEIGHT, WIDTH)
        np.testing.assert_array_equal(second.numpy(), kspace[1])
        np.testing.assert_array_equal(f.mask().numpy(), mask.astype(np.float32))
        with pytest.raises(InputError, match="no reconstruction_rss"):
            f.target(0)
        with pytest.raises(IndexError):
            f.kspace(SLICES)


def test_reading_a_slice_reads_only_that_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lazy.h5"
    _write(path)
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(self: h5py.Dataset, key: object) -> object:
        reads.append((self.name, key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    with KSpaceFile(path) as f:
        f.kspace(2)
    assert [key for name, key in reads if name == "/kspace"] == [2]


def test_single_coil_file_with_esc_target(tmp_path: Path) -> None:
    path = tmp_path / "sc.h5"
    target = np.ones((SLICES, 16, 16), dtype=np.float32)
    header = KSpaceHeader((HEIGHT, WIDTH, 1), (16, 16, 1), WIDTH // 2, WIDTH - 1)
    _write(path, kspace=_kspace(multicoil=False), header=header, reconstruction_esc=target)
    with KSpaceFile(path) as f:
        assert not f.multicoil and f.target_key == "reconstruction_esc"
        torch.testing.assert_close(f.target(2), torch.ones(16, 16))
        assert f.kspace(0).shape == (HEIGHT, WIDTH)


def test_reconstruction_round_trip_and_no_silent_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "file1.h5"
    volume = torch.rand(SLICES, 320, 320, dtype=torch.float64)
    write_reconstruction(path, volume)
    with h5py.File(path, "r") as f:
        assert list(f) == ["reconstruction"] and f["reconstruction"].dtype == np.float32
    np.testing.assert_array_equal(read_reconstruction(path), volume.numpy().astype(np.float32))
    with pytest.raises(InputError, match="exists"):
        write_reconstruction(path, volume)
    write_reconstruction(path, volume * 0, overwrite=True)
    assert read_reconstruction(path).max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file1.h5"]
    assert read_attrs(path) == {}


def _assert_one_line_error(path: Path, match: str) -> None:
    with pytest.raises(InputError) as info:
        with KSpaceFile(path) as f:
            for index in range(f.num_slices):
                f.kspace(index)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert match in message, message


def test_not_hdf5_is_named(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    _assert_one_line_error(path, "not an HDF5 file")
    _assert_one_line_error(tmp_path / "missing.h5", "no such file")


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    _write(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    _assert_one_line_error(path, "truncated HDF5 file")


def test_missing_kspace_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nokspace.h5"
    with h5py.File(path, "w") as f:
        f["reconstruction_rss"] = np.zeros((1, 4, 4), np.float32)
    _assert_one_line_error(path, "no 'kspace' dataset")


def test_real_kspace_is_named(tmp_path: Path) -> None:
    path = tmp_path / "real.h5"
    with h5py.File(path, "w") as f:
        f["kspace"] = np.zeros((1, 2, HEIGHT, WIDTH), np.float32)
        f["ismrmrd_header"] = np.bytes_(HEADER.to_xml())
    _assert_one_line_error(path, "dtype float32, expected complex")


def test_wrong_rank_is_named(tmp_path: Path) -> None:
    path = tmp_path / "rank.h5"
    _write(path, kspace=_kspace()[0, 0])
    _assert_one_line_error(path, "rank 2")


def test_nan_slice_is_named_when_read(tmp_path: Path) -> None:
    path = tmp_path / "nan.h5"
    kspace = _kspace()
    kspace[2, 1, 3, 4] = np.nan
    _write(path, kspace=kspace)
    with KSpaceFile(path) as f:
        f.kspace(0)
    _assert_one_line_error(path, "kspace slice 2 holds NaN or Inf")


def test_header_disagreeing_with_data_is_named(tmp_path: Path) -> None:
    wrong_size = KSpaceHeader((HEIGHT, WIDTH + 2, 1), (16, 16, 1), WIDTH // 2, WIDTH - 1, COILS)
    _write(tmp_path / "size.h5", header=wrong_size)
    _assert_one_line_error(tmp_path / "size.h5", "encodedSpace 32x26 disagrees with kspace 32x24")
    wrong_coils = KSpaceHeader((HEIGHT, WIDTH, 1), (16, 16, 1), WIDTH // 2, WIDTH - 1, COILS + 1)
    _write(tmp_path / "coils.h5", header=wrong_coils)
    _assert_one_line_error(tmp_path / "coils.h5", "receiverChannels 5 disagrees with 4 coils")
    wrong_limits = KSpaceHeader((HEIGHT, WIDTH, 1), (16, 16, 1), 2, WIDTH - 1, COILS)
    _write(tmp_path / "limits.h5", header=wrong_limits)
    _assert_one_line_error(tmp_path / "limits.h5", "encoding limits")
    path = tmp_path / "noheader.h5"
    with h5py.File(path, "w") as f:
        f["kspace"] = _kspace()
    _assert_one_line_error(path, "no 'ismrmrd_header'")
    bad_xml = tmp_path / "badxml.h5"
    with h5py.File(bad_xml, "w") as f:
        f["kspace"] = _kspace()
        f["ismrmrd_header"] = np.bytes_(b"<ismrmrdHeader")
    _assert_one_line_error(bad_xml, "not valid XML")


def test_mask_and_target_shapes_are_checked(tmp_path: Path) -> None:
    _write(tmp_path / "mask.h5", mask=np.ones(WIDTH + 1, bool))
    _assert_one_line_error(tmp_path / "mask.h5", "mask has shape (25,)")
    _write(tmp_path / "target.h5", reconstruction_rss=np.ones((SLICES + 1, 8, 8), np.float32))
    _assert_one_line_error(tmp_path / "target.h5", "reconstruction_rss has shape (4, 8, 8)")


def test_read_reconstruction_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        f["reconstruction"] = np.full((1, 4, 4), np.inf, np.float32)
        f["other"] = np.zeros((4, 4), np.float32)
    with pytest.raises(InputError, match=f"^{path}: reconstruction holds NaN or Inf"):
        read_reconstruction(path)
    with pytest.raises(InputError, match=f"^{path}: no 'missing' dataset"):
        read_reconstruction(path, "missing")
    with pytest.raises(InputError, match=f"^{path}: other is float32"):
        read_reconstruction(path, "other")


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_reconstruction(tmp_path / "x.h5", np.zeros((1, 4, 4)))
    assert list(tmp_path.iterdir()) == []
