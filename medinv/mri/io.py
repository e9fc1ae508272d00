"""fastMRI HDF5 files: lazy, validated reading and atomic writing.

Schema (fastMRI): ``kspace`` complex64 ``(slices, H, W)`` (single-coil) or
``(slices, coils, H, W)`` (multi-coil); ``ismrmrd_header`` ISMRMRD XML bytes whose
``encodedSpace`` matrix is ``(H, W, 1)``; attributes ``acquisition``, ``max``, ``norm``,
``patient_id``; train/val files add ``reconstruction_rss`` (multi-coil) or
``reconstruction_esc`` (single-coil), float32 ``(slices, 320, 320)``; test files add
``mask`` (``W``), ``acceleration`` and ``num_low_frequency``. Submissions hold
``reconstruction`` float32 ``(slices, 320, 320)`` in a file named like the input.

This is the only module of :mod:`medinv.mri` that touches h5py. Every problem with a file is
an :class:`~medinv.errors.InputError` whose one-line message starts with the file's path.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import torch

from medinv.errors import InputError

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"
RECONSTRUCTION_KEY = "reconstruction"
TARGET_KEYS = ("reconstruction_rss", "reconstruction_esc")


@dataclass(frozen=True)
class KSpaceHeader:
    """What the i-RIM and the data pipeline need from ``ismrmrd_header``.

    Attributes:
        encoding_size: encoded matrix ``(x, y, z)``: readout, phase encodes, partitions.
        recon_size: reconstruction matrix ``(x, y, z)``.
        encoding_center: ``kspace_encoding_step_1`` centre, the acquired centre column.
        encoding_maximum: ``kspace_encoding_step_1`` maximum, the last acquired column.
        receiver_channels: coils, where the header states it.
    """

    encoding_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    encoding_center: int
    encoding_maximum: int
    receiver_channels: int | None = None

    @property
    def padding(self) -> tuple[int, int]:
        """Acquired columns ``[left, right)``; outside them k-space is zero-padding.

        ``left = y // 2 - center`` and ``right = left + maximum + 1``, as fastMRI computes it.
        """
        left = self.encoding_size[1] // 2 - self.encoding_center
        return left, left + self.encoding_maximum + 1

    def to_xml(self) -> bytes:
        """The header as ISMRMRD XML (the subset this class describes)."""
        ns = ISMRMRD_NAMESPACE
        root = ElementTree.Element(f"{{{ns}}}ismrmrdHeader")
        if self.receiver_channels is not None:
            system = ElementTree.SubElement(root, f"{{{ns}}}acquisitionSystemInformation")
            _text(system, "receiverChannels", self.receiver_channels)
        encoding = ElementTree.SubElement(root, f"{{{ns}}}encoding")
        for space, size in (("encodedSpace", self.encoding_size), ("reconSpace", self.recon_size)):
            matrix = ElementTree.SubElement(
                ElementTree.SubElement(encoding, f"{{{ns}}}{space}"), f"{{{ns}}}matrixSize"
            )
            for axis, n in zip("xyz", size, strict=True):
                _text(matrix, axis, n)
        limits = ElementTree.SubElement(encoding, f"{{{ns}}}encodingLimits")
        step = ElementTree.SubElement(limits, f"{{{ns}}}kspace_encoding_step_1")
        _text(step, "minimum", 0)
        _text(step, "maximum", self.encoding_maximum)
        _text(step, "center", self.encoding_center)
        _text(encoding, "trajectory", "cartesian")
        ElementTree.register_namespace("", ns)
        return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def parse_header(xml: bytes | str, source: str = "ismrmrd_header") -> KSpaceHeader:
    """Parse the fields of :class:`KSpaceHeader` from ISMRMRD XML.

    Raises:
        InputError: the XML is malformed or lacks a field; the message starts with ``source``.
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise InputError(f"{source}: ismrmrd_header is not valid XML ({err})") from None

    def integer(*path: str, required: bool = True) -> int | None:
        query = "./" + "/".join(f"{{{ISMRMRD_NAMESPACE}}}{p}" for p in path)
        node = root.find(query)
        if node is None or node.text is None:
            if not required:
                return None
            raise InputError(f"{source}: ismrmrd_header lacks {'/'.join(path)}")
        try:
            return int(node.text.strip())
        except ValueError:
            where = "/".join(path)
            raise InputError(f"{source}: ismrmrd_header {where} is not an integer") from None

    def matrix(space: str) -> tuple[int, int, int]:
        return tuple(integer("encoding", space, "matrixSize", a) for a in "xyz")  # type: ignore[return-value]

    limits = ("encoding", "encodingLimits", "kspace_encoding_step_1")
    return KSpaceHeader(
        encoding_size=matrix("encodedSpace"),
        recon_size=matrix("reconSpace"),
        encoding_center=integer(*limits, "center"),  # type: ignore[arg-type]
        encoding_maximum=integer(*limits, "maximum"),  # type: ignore[arg-type]
        receiver_channels=integer(
            "acquisitionSystemInformation", "receiverChannels", required=False
        ),
    )


class KSpaceFile:
    """A fastMRI k-space file, opened and checked, read one slice at a time.

    Opening checks the structure without reading the data: an HDF5 file with a complex
    ``kspace`` of rank 3 or 4 and a header that agrees with its shape, a ``mask`` of
    length ``W`` and targets with as many slices, where present. Reading a slice checks
    that its values are finite.

    Args:
        path: the ``.h5`` file.

    Attributes:
        path: the file.
        header: its parsed :class:`KSpaceHeader`.

    Raises:
        InputError: any problem, as one line naming the file.

    Example:
        >>> with KSpaceFile("file1000.h5") as f:  # doctest: +SKIP
        ...     k = f.kspace(0)  # complex64 (coils, H, W)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = _open_h5(self.path)
        try:
            self._check_structure()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> KSpaceFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._file.close()

    @property
    def num_slices(self) -> int:
        return int(self._kspace.shape[0])

    @property
    def multicoil(self) -> bool:
        return self._kspace.ndim == 4

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``kspace``: ``(slices[, coils], H, W)``."""
        return tuple(self._kspace.shape)

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's attributes, with NumPy scalars and bytes turned into Python values."""
        return {key: _plain(value) for key, value in self._file.attrs.items()}

    @property
    def target_key(self) -> str | None:
        """``reconstruction_rss`` or ``reconstruction_esc`` if the file holds one, else ``None``."""
        for key in TARGET_KEYS:
            if key in self._file:
                return key
        return None

    def kspace(self, index: int) -> torch.Tensor:
        """Slice ``index`` of ``kspace``: complex64 ``([coils,] H, W)``."""
        data = self._read(self._kspace, index, "kspace")
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.complex64))

    def target(self, index: int) -> torch.Tensor:
        """Slice ``index`` of the target reconstruction: float32 ``(h, w)``.

        Raises:
            InputError: the file holds no ``reconstruction_rss``/``_esc``.
        """
        key = self.target_key
        if key is None:
            raise InputError(f"{self.path}: no reconstruction_rss or reconstruction_esc")
        return torch.from_numpy(np.asarray(self._read(self._file[key], index, key), np.float32))

    def mask(self) -> torch.Tensor | None:
        """The test-file ``mask`` as float32 ``(W,)``, or ``None`` if the file has none."""
        if "mask" not in self._file:
            return None
        return torch.from_numpy(np.asarray(self._file["mask"][()], dtype=np.float32))

    def _read(self, dataset: h5py.Dataset, index: int, name: str) -> np.ndarray:
        if not -self.num_slices <= index < self.num_slices:
            raise IndexError(f"{self.path}: slice {index} out of range ({self.num_slices} slices)")
        try:
            data = dataset[index]
        except (OSError, RuntimeError) as err:
            raise InputError(f"{self.path}: cannot read {name} slice {index} ({err})") from None
        if not np.all(np.isfinite(data)):
            raise InputError(f"{self.path}: {name} slice {index} holds NaN or Inf values")
        return data

    def _check_structure(self) -> None:
        path = self.path
        if "kspace" not in self._file:
            raise InputError(f"{path}: no 'kspace' dataset")
        kspace = self._file["kspace"]
        if not isinstance(kspace, h5py.Dataset):
            raise InputError(f"{path}: 'kspace' is not a dataset")
        if kspace.dtype.kind != "c":
            raise InputError(f"{path}: kspace has dtype {kspace.dtype}, expected complex")
        if kspace.ndim not in (3, 4):
            raise InputError(
                f"{path}: kspace has rank {kspace.ndim} {kspace.shape}, "
                "expected (slices, H, W) or (slices, coils, H, W)"
            )
        if 0 in kspace.shape:
            raise InputError(f"{path}: kspace is empty {kspace.shape}")
        self._kspace = kspace
        height, width = kspace.shape[-2:]
        if "ismrmrd_header" not in self._file:
            raise InputError(f"{path}: no 'ismrmrd_header' dataset")
        self.header = parse_header(_plain(self._file["ismrmrd_header"][()]), str(path))
        enc = self.header.encoding_size
        if (enc[0], enc[1]) != (height, width):
            raise InputError(
                f"{path}: ismrmrd_header encodedSpace {enc[0]}x{enc[1]} disagrees with "
                f"kspace {height}x{width}"
            )
        left, right = self.header.padding
        if not 0 <= left < right <= width:
            raise InputError(
                f"{path}: ismrmrd_header encoding limits give columns [{left}, {right}) "
                f"outside kspace width {width}"
            )
        coils = self.header.receiver_channels
        if coils is not None and self.multicoil and coils != kspace.shape[1]:
            raise InputError(
                f"{path}: ismrmrd_header receiverChannels {coils} disagrees with "
                f"{kspace.shape[1]} coils in kspace"
            )
        if "mask" in self._file and self._file["mask"].shape != (width,):
            raise InputError(
                f"{path}: mask has shape {self._file['mask'].shape}, expected ({width},)"
            )
        key = self.target_key
        if key is not None:
            target = self._file[key]
            if target.ndim != 3 or target.shape[0] != kspace.shape[0]:
                raise InputError(
                    f"{path}: {key} has shape {target.shape}, expected ({kspace.shape[0]}, h, w)"
                )


def read_reconstruction(path: str | os.PathLike[str], key: str = RECONSTRUCTION_KEY) -> np.ndarray:
    """A whole reconstruction volume ``key`` as float32 ``(slices, h, w)`` (a few MB).

    Raises:
        InputError: the file is unreadable, lacks ``key``, has the wrong rank or holds
            NaN/Inf values.
    """
    path = Path(path)
    with _open_h5(path) as f:
        if key not in f:
            raise InputError(f"{path}: no '{key}' dataset")
        data = f[key]
        if data.ndim != 3 or data.dtype.kind not in "fiu":
            raise InputError(
                f"{path}: {key} is {data.dtype} {data.shape}, expected real (slices, h, w)"
            )
        try:
            volume = np.asarray(data[()], dtype=np.float32)
        except (OSError, RuntimeError) as err:
            raise InputError(f"{path}: cannot read {key} ({err})") from None
    if not np.all(np.isfinite(volume)):
        raise InputError(f"{path}: {key} holds NaN or Inf values")
    return volume


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The attributes of an HDF5 file as Python values."""
    path = Path(path)
    with _open_h5(path) as f:
        return {key: _plain(value) for key, value in f.attrs.items()}


def write_reconstruction(
    path: str | os.PathLike[str], reconstruction: np.ndarray | torch.Tensor, overwrite: bool = False
) -> None:
    """Write a fastMRI submission file: ``reconstruction`` float32 ``(slices, h, w)``.

    The file is written under a temporary name and renamed when complete.

    Raises:
        InputError: ``path`` exists and not ``overwrite``; the array is not 3D.
    """
    volume = _to_numpy(reconstruction).astype(np.float32)
    if volume.ndim != 3:
        raise InputError(f"{path}: reconstruction must be (slices, h, w), got {volume.shape}")
    _write_h5(Path(path), {RECONSTRUCTION_KEY: volume}, {}, overwrite)


def write_kspace_file(
    path: str | os.PathLike[str],
    kspace: np.ndarray,
    header: KSpaceHeader,
    attrs: Mapping[str, Any],
    datasets: Mapping[str, np.ndarray] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a fastMRI k-space file atomically.

    Args:
        path: the ``.h5`` file.
        kspace: complex ``(slices[, coils], H, W)``, stored as complex64.
        header: written as ``ismrmrd_header``.
        attrs: ``acquisition``, ``max``, ``norm``, ``patient_id`` and, for test files,
            ``acceleration`` and ``num_low_frequency``.
        datasets: further datasets, e.g. ``reconstruction_rss`` or ``mask``.
        overwrite: replace an existing file.

    Raises:
        InputError: ``path`` exists and not ``overwrite``.
    """
    content = {"kspace": np.asarray(kspace, dtype=np.complex64)}
    content["ismrmrd_header"] = np.bytes_(header.to_xml())
    content.update(datasets or {})
    _write_h5(Path(path), content, attrs, overwrite)


def _write_h5(
    path: Path, datasets: Mapping[str, np.ndarray], attrs: Mapping[str, Any], overwrite: bool
) -> None:
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass overwrite to replace it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for name, data in datasets.items():
                f.create_dataset(name, data=data)
            for key, value in attrs.items():
                f.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        text = " ".join(str(err).split())
        if "truncated file" in text:
            raise InputError(f"{path}: truncated HDF5 file ({text.split('(', 1)[-1]}") from None
        raise InputError(f"{path}: cannot open HDF5 file ({text})") from None


def _plain(value: Any) -> Any:
    if isinstance(value, np.void):
        value = value.tobytes()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _text(parent: ElementTree.Element, tag: str, value: object) -> None:
    ElementTree.SubElement(parent, f"{{{ISMRMRD_NAMESPACE}}}{tag}").text = str(value)


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
