"""BraTS cases in the layouts users have, as uniform records ready for MONAI.

:func:`discover_cases` reads any of these and returns one :class:`BratsCase` per case:

============  ==================================================================  ==========
layout        files                                                               labels
============  ==================================================================  ==========
``brats2021`` BraTS 2018-2021: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``,   1, 2, 4
              found at any depth (2018/2019 keep cases under ``HGG/`` and
              ``LGG/``)
``brats2023`` BraTS 2023: ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``          1, 2, 3
``msd``       Medical Segmentation Decathlon Task01_BrainTumour: one 4D image     2, 1, 3
              per case, ``imagesTr/BRATS_xxx.nii.gz`` (channels FLAIR, T1w,
              T1gd, T2w), ``labelsTr/``, ``imagesTs/``
``datalist``  Decathlon datalist JSON: ``{"training": [{"image": ..., "label":    from JSON
              ...}], "validation": [...], "test": [...]}``, ``image`` a list of
              four paths or one 4D path, relative to the JSON
``csv``       CSV manifest: ``case_id,t1,t1ce,t2,flair[,label][,split]``, paths   1, 2, 4
              relative to the manifest (``data_manifests/brats_manifest.schema.
              json``)
============  ==================================================================  ==========

The labels column gives the values of necrotic/non-enhancing core (NCR), peritumoral
oedema (ED) and enhancing tumour (ET), in that order: see :class:`LabelConvention`. The
BraTS regions are TC = NCR + ET, WT = NCR + ED + ET and ET, so MONAI's
``ConvertToMultiChannelBasedOnBratsClassesd(et_label=case.et_label)`` makes the region
channels of the BraTS layouts directly. The Decathlon swaps the first two values (1 is
oedema, 2 non-enhancing tumour, 3 enhancing tumour): map its labels to the BraTS 2018-2021
values first: ``MapLabelValued("label", *case.labels.to_brats2021())``.

Records keep paths, not arrays (:meth:`BratsCase.to_dict` is what ``LoadImaged`` expects);
the four modalities are listed in the fixed order :data:`MODALITIES`. A 4D image keeps its
file's channel order, named in :attr:`BratsCase.channels`.
:func:`check_case` validates a case from the file headers only; :func:`load_case` reads
it, resampling modalities onto the first one's grid where asked.

NIfTI is read with nibabel; NRRD and MHA/MHD headers and images with SimpleITK.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medinv.errors import InputError

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""The fixed channel order of every record: T1, contrast-enhanced T1, T2, T2-FLAIR."""

MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""Channel order of the Decathlon's 4D images (FLAIR, T1w, T1gd, T2w)."""

Layout = Literal["auto", "brats2021", "brats2023", "msd", "datalist", "csv"]
LAYOUTS: tuple[str, ...] = ("brats2021", "brats2023", "msd", "datalist", "csv")

MANIFEST_COLUMNS: tuple[str, ...] = ("case_id", "t1", "t1ce", "t2", "flair", "label", "split")
"""Columns of a CSV manifest; ``label`` and ``split`` are optional."""

DEFAULT_AFFINE_TOL_MM = 1e-3

_NIFTI = (".nii", ".nii.gz")
_SITK = (".nrrd", ".nhdr", ".mha", ".mhd")
_IMAGE_SUFFIX = r"\.(?:nii|nii\.gz|nrrd|mha)"
_BRATS2021 = re.compile(rf"^(?P<case>.+)_(?P<key>t1|t1ce|t2|flair|seg){_IMAGE_SUFFIX}$", re.I)
_BRATS2023 = re.compile(rf"^(?P<case>.+)-(?P<key>t1n|t1c|t2w|t2f|seg){_IMAGE_SUFFIX}$", re.I)
_BRATS2023_KEYS = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}
_SPLITS = {"training": "train", "validation": "val", "test": "test"}
_MODALITY_ALIASES = {
    "t1": "t1",
    "t1n": "t1",
    "t1w": "t1",
    "native": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t1-gd": "t1ce",
    "t1post": "t1ce",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
    "t2-flair": "flair",
}


@dataclass(frozen=True)
class LabelConvention:
    """Which label value marks each BraTS tumour sub-region in a layout's segmentations.

    The regions evaluated by BraTS are built from the three values:
    ``TC = {necrotic, enhancing}``, ``WT = {necrotic, oedema, enhancing}``,
    ``ET = {enhancing}``; 0 is background.

    Args:
        name: a short name of the convention.
        necrotic: necrotic and non-enhancing tumour core (NCR/NET).
        oedema: peritumoral oedema (ED).
        enhancing: GD-enhancing tumour (ET).
    """

    name: str
    necrotic: int
    oedema: int
    enhancing: int

    @property
    def et_label(self) -> int:
        """The enhancing-tumour value, for ``ConvertToMultiChannelBasedOnBratsClasses``."""
        return self.enhancing

    def regions(self) -> dict[str, tuple[int, ...]]:
        """The label values of each region: ``{"TC": ..., "WT": ..., "ET": ...}``."""
        return {
            "TC": (self.necrotic, self.enhancing),
            "WT": (self.necrotic, self.oedema, self.enhancing),
            "ET": (self.enhancing,),
        }

    def to_brats2021(self) -> tuple[list[int], list[int]]:
        """``(orig_labels, target_labels)`` for MONAI's ``MapLabelValue`` to values 1, 2, 4."""
        return [self.necrotic, self.oedema, self.enhancing], [1, 2, 4]


BRATS2021 = LabelConvention("brats2021", necrotic=1, oedema=2, enhancing=4)
"""BraTS 2018-2021 (and 2022): NCR 1, ED 2, ET 4."""
BRATS2023 = LabelConvention("brats2023", necrotic=1, oedema=2, enhancing=3)
"""BraTS 2023: NCR 1, ED 2, ET 3."""
MSD_BRAIN_TUMOUR = LabelConvention("msd", necrotic=2, oedema=1, enhancing=3)
"""Decathlon Task01_BrainTumour: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour."""


@dataclass(frozen=True)
class BratsCase:
    """One case: its images, optional segmentation and how to read them.

    Attributes:
        case_id: the case's name, unique within a discovery.
        image: four paths in the order of :data:`MODALITIES`, or one 4D path.
        channels: the modality of each channel of the loaded image; :data:`MODALITIES`
            except for a 4D file in another order (the Decathlon's is :data:`MSD_CHANNELS`).
        label: the segmentation, or ``None`` (validation/test data).
        labels: the label values of the segmentation.
        layout: the layout the case was found in.
        split: ``"train"``, ``"val"``, ``"test"`` where the source says, else ``None``.
    """

    case_id: str
    image: tuple[Path, ...]
    channels: tuple[str, ...] = MODALITIES
    label: Path | None = None
    labels: LabelConvention = BRATS2021
    layout: str = "brats2021"
    split: str | None = None

    @property
    def et_label(self) -> int:
        """The enhancing-tumour label value of :attr:`label`."""
        return self.labels.et_label

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file of the case: the images, then the label if any."""
        return self.image + ((self.label,) if self.label is not None else ())

    def channel_order(self) -> list[int]:
        """Indices that put the loaded channels in :data:`MODALITIES` order (``x[order]``)."""
        return [self.channels.index(m) for m in MODALITIES]

    def to_dict(self) -> dict[str, Any]:
        """The record ``LoadImaged(keys=["image", "label"])`` expects.

        Keys: ``image`` (four paths or one 4D path), ``label`` if any, ``case_id``, and
        ``split`` if known.
        """
        image: str | list[str]
        image = str(self.image[0]) if len(self.image) == 1 else [str(p) for p in self.image]
        record: dict[str, Any] = {"image": image, "case_id": self.case_id}
        if self.label is not None:
            record["label"] = str(self.label)
        if self.split is not None:
            record["split"] = self.split
        return record


@dataclass(frozen=True)
class CaseGrid:
    """The voxel grid a case's files share (that of its first image).

    Attributes:
        shape: spatial shape.
        affine: the 4x4 voxel-to-world (RAS+ mm) matrix.
        mismatched: files on another grid; empty unless resampling was allowed.
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    mismatched: tuple[Path, ...] = ()


@dataclass(frozen=True)
class LoadedCase:
    """A case read into memory on one grid.

    Attributes:
        image: ``(4, X, Y, Z)`` float32, channels in :data:`MODALITIES` order.
        label: ``(X, Y, Z)`` with the values of the case's :class:`LabelConvention`, or None.
        affine: the grid's voxel-to-world (RAS+ mm) matrix, that of the first image.
    """

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray


def discover_cases(
    source: str | Path,
    layout: Layout = "auto",
    *,
    et_label: int | None = None,
    channels: Sequence[str] | None = None,
) -> list[BratsCase]:
    """Find the BraTS cases in a folder, a datalist JSON or a CSV manifest.

    Only names are examined (no file is opened except the JSON/CSV); see :func:`check_case`.

    Args:
        source: a folder (BraTS 2018-2021 or 2023 case folders at any depth, or a Decathlon
            task folder with ``imagesTr/``), a Decathlon datalist ``.json`` or a ``.csv``
            manifest.
        layout: one of :data:`LAYOUTS`, or ``"auto"`` to tell it from ``source``.
        et_label: the enhancing-tumour label value, replacing the layout's default (4 for
            BraTS 2018-2021 and CSV manifests, 3 for BraTS 2023 and the Decathlon).
        channels: the modality of each channel of a datalist's 4D images, or of its image
            lists, when the JSON has no ``"modality"`` entry (default :data:`MODALITIES`).

    Returns:
        The cases: training, validation, test, other or no split, each sorted by case id.

    Raises:
        InputError: no case found, a missing modality or label, an unknown layout,
            a malformed JSON or CSV, or duplicate case ids.
    """
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if layout == "auto":
        layout = _detect_layout(path)
    if layout in ("brats2021", "brats2023"):
        cases = _discover_brats_folders(path, layout)
    elif layout == "msd":
        cases = _discover_msd(path)
    elif layout == "datalist":
        cases = _discover_datalist(path, channels)
    elif layout == "csv":
        cases = _discover_csv(path)
    else:
        raise InputError(f"unknown BraTS layout '{layout}'; known: {', '.join(LAYOUTS)}")
    if not cases:
        raise InputError(f"{path}: no BraTS cases found (layout {layout})")
    seen: dict[str, BratsCase] = {}
    for case in cases:
        if case.case_id in seen:
            other = seen[case.case_id].image[0]
            raise InputError(f"{case.image[0]}: case id '{case.case_id}' also used by {other}")
        seen[case.case_id] = case
    if et_label is not None:
        if et_label in (0, cases[0].labels.necrotic, cases[0].labels.oedema):
            raise InputError(f"et_label {et_label} is already background, NCR or ED")
        cases = [
            dataclasses.replace(c, labels=dataclasses.replace(c.labels, enhancing=et_label))
            for c in cases
        ]
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(cases, key=lambda c: (order.get(c.split or "", 3), c.split or "", c.case_id))


def case_from_files(images: Sequence[str | Path], et_label: int | None = None) -> BratsCase:
    """One case from its four images (T1, T1ce, T2, FLAIR, in this order) or its 4D image
    (channels in that order); ``et_label`` 4 (default) or 3 for its label values."""
    paths = tuple(Path(p) for p in images)
    if len(paths) not in (1, 4):
        raise InputError(
            f"give a case's four images (T1, T1ce, T2, FLAIR) or its 4D image, not {len(paths)}"
        )
    labels = BRATS2023 if et_label == 3 else BRATS2021
    return BratsCase(case_id=case_id_from(paths), image=paths, labels=labels, layout="files")


def check_case(
    case: BratsCase, *, resample: bool = False, atol: float = DEFAULT_AFFINE_TOL_MM
) -> CaseGrid:
    """Check from the headers that a case's files exist, are images and share one grid.

    The reference grid is that of the first image. Shapes must be equal and affines equal
    within ``atol`` mm (each entry), unless ``resample``, where files on another grid are
    returned in :attr:`CaseGrid.mismatched` for :func:`load_case` to resample.

    Raises:
        InputError: naming the file: missing, unreadable or not an image, a 4D image without
            four channels, or a grid that differs from the first image's.
    """
    headers = [(p, _read_header(p)) for p in case.files]
    ref_path, (ref_shape, ref_affine) = headers[0]
    expected_dims = 4 if len(case.image) == 1 else 3
    mismatched = []
    for i, (path, (shape, affine)) in enumerate(headers):
        is_image = i < len(case.image)
        dims = expected_dims if is_image else 3
        if len(shape) == 4 and shape[3] == 1 and dims == 3:
            shape = shape[:3]
        if len(shape) != dims:
            raise InputError(f"{path}: {len(shape)}D, expected a {dims}D image")
        if dims == 4 and shape[3] != len(MODALITIES):
            raise InputError(f"{path}: {shape[3]} channels, expected {len(MODALITIES)}")
        if shape[:3] != ref_shape[:3]:
            if not resample:
                raise InputError(
                    f"{path}: shape {_fmt(shape[:3])} differs from {_fmt(ref_shape[:3])} "
                    f"of {ref_path.name}"
                )
            mismatched.append(path)
        elif not np.allclose(affine, ref_affine, atol=atol, rtol=0):
            if not resample:
                diff = float(np.abs(affine - ref_affine).max())
                raise InputError(
                    f"{path}: affine differs from that of {ref_path.name} by up to "
                    f"{diff:.3g} mm (tolerance {atol:g})"
                )
            mismatched.append(path)
    return CaseGrid(tuple(ref_shape[:3]), ref_affine, tuple(mismatched))


def load_case(
    case: BratsCase, *, resample: bool = False, atol: float = DEFAULT_AFFINE_TOL_MM
) -> LoadedCase:
    """Read a case onto the grid of its first image.

    Args:
        case: the case.
        resample: resample images on another grid linearly, and the label by nearest
            neighbour, onto the first image's grid (SimpleITK); otherwise such a file is an
            error.
        atol: affine tolerance in mm, as in :func:`check_case`.

    Returns:
        The image in :data:`MODALITIES` order, the label (values as in the file) and the
        affine.

    Raises:
        InputError: as :func:`check_case`, or a file that cannot be read.
    """
    grid = check_case(case, resample=resample, atol=atol)
    volumes = []
    for path in case.image:
        if path in grid.mismatched:
            volumes.append(_resample_onto(path, grid, "linear"))
        else:
            volumes.append(_read_array(path))
    if len(case.image) == 1:
        image = np.moveaxis(volumes[0], -1, 0)[case.channel_order()]
    else:
        image = np.stack(volumes)
    label = None
    if case.label is not None:
        if case.label in grid.mismatched:
            label = _resample_onto(case.label, grid, "nearest")
        else:
            label = _read_array(case.label).reshape(grid.shape)
        label = np.rint(label).astype(np.int16)
    return LoadedCase(np.ascontiguousarray(image, dtype=np.float32), label, grid.affine)


def oriented_shape(
    image: str | Path | Sequence[str | Path], spacing: Sequence[float] | None = None
) -> tuple[int, int, int]:
    """The spatial shape of an image (its first file) once oriented to RAS and, with
    ``spacing`` (mm), resampled: the grid the model sees before the foreground crop, read
    from the header only."""
    import nibabel as nib

    path = Path(image if isinstance(image, (str, Path)) else image[0])
    shape, affine = _read_header(path)
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(0))
    oriented, voxel = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(nib.orientations.io_orientation(affine)):
        oriented[int(target)], voxel[int(target)] = shape[axis], float(sizes[axis])
    if spacing is not None:
        oriented = [
            math.ceil(n * v / s - 1e-6) for n, v, s in zip(oriented, voxel, spacing, strict=True)
        ]
    return tuple(oriented)


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def _detect_layout(path: Path) -> str:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "datalist"
        if suffix == ".csv":
            return "csv"
        raise InputError(f"{path}: expected a folder, a datalist .json or a manifest .csv")
    if (path / "imagesTr").is_dir() or (path / "imagesTs").is_dir():
        return "msd"
    found = [
        name
        for name, pattern in (("brats2021", _BRATS2021), ("brats2023", _BRATS2023))
        if any(pattern.match(f.name) for f in _image_files(path))
    ]
    if len(found) > 1:
        raise InputError(f"{path}: holds both BraTS 2018-2021 and 2023 names; pass the layout")
    if not found:
        raise InputError(
            f"{path}: no BraTS cases found (expected <case>/<case>_t1.nii.gz, "
            "<case>/<case>-t1n.nii.gz, imagesTr/, a .json datalist or a .csv manifest)"
        )
    return found[0]


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, hidden files (e.g. ``._x``) left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.name.lower().endswith(_NIFTI + _SITK)
        and p.is_file()
    )


def _discover_brats_folders(folder: Path, layout: str) -> list[BratsCase]:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    pattern = _BRATS2021 if layout == "brats2021" else _BRATS2023
    groups: dict[tuple[Path, str], dict[str, Path]] = {}
    for path in _image_files(folder):
        match = pattern.match(path.name)
        if match is None:
            continue
        key = match["key"].lower()
        key = _BRATS2023_KEYS[key] if layout == "brats2023" else key
        files = groups.setdefault((path.parent, match["case"]), {})
        if key in files:
            raise InputError(f"{path}: a second {key} file of case {match['case']}")
        files[key] = path
    convention = BRATS2021 if layout == "brats2021" else BRATS2023
    names = (
        dict(zip(MODALITIES, MODALITIES, strict=True))
        if layout == "brats2021"
        else {v: k for k, v in _BRATS2023_KEYS.items()}
    )
    separator = "_" if layout == "brats2021" else "-"
    cases = []
    for (parent, case_id), files in groups.items():
        for modality in MODALITIES:
            if modality not in files:
                expected = parent / f"{case_id}{separator}{names[modality]}.nii.gz"
                raise InputError(f"{expected}: missing {modality} image of case {case_id}")
        cases.append(
            BratsCase(
                case_id=case_id,
                image=tuple(files[m] for m in MODALITIES),
                label=files.get("seg"),
                labels=convention,
                layout=layout,
            )
        )
    return cases


def _discover_msd(folder: Path) -> list[BratsCase]:
    dataset = folder / "dataset.json"
    if dataset.is_file():
        return [
            dataclasses.replace(c, layout="msd")
            for c in _discover_datalist(dataset, None, default_channels=MSD_CHANNELS)
        ]
    cases = []
    for images, labels, split in (("imagesTr", "labelsTr", "train"), ("imagesTs", None, "test")):
        for path in _image_files(folder / images) if (folder / images).is_dir() else []:
            label = None
            if labels is not None:
                label = folder / labels / path.name
                if not label.is_file():
                    raise InputError(f"{label}: missing label of training case {path.name}")
            cases.append(
                BratsCase(
                    case_id=_strip_image_suffix(path.name),
                    image=(path,),
                    channels=MSD_CHANNELS,
                    label=label,
                    labels=MSD_BRAIN_TUMOUR,
                    layout="msd",
                    split=split,
                )
            )
    return cases


def _discover_datalist(
    path: Path,
    channels: Sequence[str] | None,
    default_channels: Sequence[str] = MODALITIES,
) -> list[BratsCase]:
    from monai.data import load_decathlon_datalist

    try:
        content = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(content, dict) or not any(k in content for k in _SPLITS):
        raise InputError(f"{path}: no 'training', 'validation' or 'test' list")
    if channels is None and "modality" in content:
        channels = _parse_modalities(path, content["modality"])
    channels = tuple(_canonical_modality(path, m) for m in (channels or default_channels))
    if sorted(channels) != sorted(MODALITIES):
        raise InputError(f"{path}: channels {channels} are not the four BraTS modalities")
    convention = _parse_labels(path, content.get("labels"))
    cases = []
    for key, split in _SPLITS.items():
        if key not in content:
            continue
        if not isinstance(content[key], list):
            raise InputError(f"{path}: '{key}' is not a list")
        if not content[key]:
            continue
        try:
            entries = load_decathlon_datalist(path, True, key, path.parent)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}: bad '{key}' entry ({_reason(err)})") from None
        for index, entry in enumerate(entries):
            cases.append(_datalist_case(path, key, index, entry, channels, convention, split))
    return cases


def _datalist_case(
    path: Path,
    key: str,
    index: int,
    entry: dict[str, Any],
    channels: tuple[str, ...],
    convention: LabelConvention,
    split: str,
) -> BratsCase:
    where = f"{path}: '{key}' entry {index}"
    image = entry.get("image")
    if isinstance(image, str):
        images: tuple[Path, ...] = (Path(image),)
        image_channels = channels
    elif isinstance(image, list) and len(image) == len(MODALITIES):
        listed = dict(zip(channels, (Path(p) for p in image), strict=True))
        images = tuple(listed[m] for m in MODALITIES)
        image_channels = MODALITIES
    else:
        raise InputError(f"{where}: 'image' must be one 4D path or a list of four paths")
    label = Path(entry["label"]) if entry.get("label") else None
    for file in images + ((label,) if label is not None else ()):
        if not file.is_file():
            raise InputError(f"{file}: missing (listed in {path.name}, '{key}' entry {index})")
    case_id = entry.get("case_id") or case_id_from(images)
    return BratsCase(
        case_id=str(case_id),
        image=images,
        channels=image_channels,
        label=label,
        labels=convention,
        layout="datalist",
        split=split,
    )


def _parse_modalities(path: Path, modality: Any) -> tuple[str, ...]:
    if isinstance(modality, dict):
        try:
            order = sorted(modality.items(), key=lambda item: int(item[0]))
        except ValueError:
            raise InputError(f"{path}: 'modality' keys must be channel indices") from None
        return tuple(str(name) for _, name in order)
    if isinstance(modality, list):
        return tuple(str(name) for name in modality)
    raise InputError(f"{path}: 'modality' must map channel indices to names")


def _canonical_modality(path: Path, name: str) -> str:
    key = re.sub(r"[\s_]", "", name.lower())
    if key not in _MODALITY_ALIASES:
        raise InputError(f"{path}: unknown modality '{name}' (expected one of {MODALITIES})")
    return _MODALITY_ALIASES[key]


def _parse_labels(path: Path, labels: Any) -> LabelConvention:
    """The convention named by a datalist's ``"labels"`` entry; BraTS 2018-2021 if absent."""
    if not isinstance(labels, dict):
        return BRATS2021
    values: dict[str, int] = {}
    for value, name in labels.items():
        text = str(name).lower().replace("-", " ")
        if "edema" in text or text == "ed":
            region = "oedema"
        elif "non enhancing" in text or "necro" in text or text in ("ncr", "net", "ncr/net"):
            region = "necrotic"
        elif "enhancing" in text or text == "et":
            region = "enhancing"
        else:
            continue
        try:
            values[region] = int(value)
        except ValueError:
            raise InputError(f"{path}: 'labels' key '{value}' is not an integer") from None
    if len(values) != 3:
        raise InputError(
            f"{path}: 'labels' must name oedema, non-enhancing/necrotic and enhancing tumour"
        )
    for known in (BRATS2021, BRATS2023, MSD_BRAIN_TUMOUR):
        if dataclasses.astuple(known)[1:] == (
            values["necrotic"],
            values["oedema"],
            values["enhancing"],
        ):
            return known
    return LabelConvention("datalist", **values)


def _discover_csv(path: Path) -> list[BratsCase]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            fields = rows[0].keys() if rows else ()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: not a valid CSV manifest ({err})") from None
    missing = [c for c in ("case_id", *MODALITIES) if c not in fields]
    if rows and missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    cases = []
    for line, row in enumerate(rows, start=2):
        case_id = (row.get("case_id") or "").strip()
        where = f"{path}: line {line}"
        if not case_id:
            raise InputError(f"{where}: empty case_id")
        files = {}
        for column in (*MODALITIES, "label"):
            cell = (row.get(column) or "").strip()
            if not cell:
                if column == "label":
                    continue
                raise InputError(f"{where} (case {case_id}): empty {column}")
            file = Path(os.path.normpath(path.parent / cell))
            if not file.is_file():
                raise InputError(f"{file}: missing {column} of case {case_id} (line {line})")
            files[column] = file
        split = (row.get("split") or "").strip() or None
        cases.append(
            BratsCase(
                case_id=case_id,
                image=tuple(files[m] for m in MODALITIES),
                label=files.get("label"),
                layout="csv",
                split=split,
            )
        )
    return cases


def _strip_image_suffix(name: str) -> str:
    return re.sub(rf"{_IMAGE_SUFFIX}$", "", name, flags=re.I)


def case_id_from(images: Sequence[Path]) -> str:
    """A case id from image file names: the BraTS case prefix, the stem, or the folder."""
    for pattern in (_BRATS2021, _BRATS2023):
        match = pattern.match(images[0].name)
        if match is not None:
            return match["case"]
    if len(images) == 1:
        return _strip_image_suffix(images[0].name)
    return images[0].parent.name


def _read_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and voxel-to-world (RAS+) affine from the header only."""
    if not path.is_file():
        raise InputError(f"{path}: missing")
    name = path.name.lower()
    if name.endswith(_NIFTI):
        import nibabel as nib

        try:
            image = nib.load(path)
            return tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=float)
        except Exception as err:  # nibabel raises many types for corrupt files
            raise InputError(f"{path}: not a readable NIfTI file ({_reason(err)})") from None
    if name.endswith(_SITK):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise InputError(f"{path}: not a readable image ({_reason(err)})") from None
        affine = _lps_to_ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
        shape = tuple(int(n) for n in reader.GetSize())
        if reader.GetNumberOfComponents() > 1:
            shape = (*shape, int(reader.GetNumberOfComponents()))
        return shape, affine
    raise InputError(f"{path}: not a NIfTI, NRRD or MHA file")


def _read_array(path: Path) -> np.ndarray:
    """The voxels in NIfTI index order ``(X, Y, Z[, C])``, as float32."""
    try:
        if path.name.lower().endswith(_NIFTI):
            import nibabel as nib

            return np.asarray(nib.load(path).dataobj, dtype=np.float32)
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        spatial = image.GetDimension()
        # SimpleITK puts the spatial axes in reverse (z, y, x) order, channels last.
        return array.transpose(*reversed(range(spatial)), *range(spatial, array.ndim))
    except Exception as err:  # a header that reads but data that does not (truncated file)
        raise InputError(f"{path}: cannot read the image data ({_reason(err)})") from None


def _resample_onto(path: Path, grid: CaseGrid, interpolation: str) -> np.ndarray:
    """``path`` resampled onto ``grid`` with SimpleITK (identity transform in world space)."""
    import SimpleITK as sitk

    try:
        moving = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read the image data ({_reason(err)})") from None
    reference = sitk.Image([int(n) for n in grid.shape], sitk.sitkFloat32)
    direction, spacing, origin = _ras_affine_to_lps(grid.affine)
    reference.SetDirection(direction)
    reference.SetSpacing(spacing)
    reference.SetOrigin(origin)
    method = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
    resampled = sitk.Resample(moving, reference, sitk.Transform(), method, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)


_LPS = np.diag([-1.0, -1.0, 1.0])


def _lps_to_ras_affine(
    direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    """ITK's direction/spacing/origin (LPS) as a NIfTI-style RAS+ affine (3D part)."""
    n = len(spacing)
    affine = np.eye(4)
    rotation = np.asarray(direction, dtype=float).reshape(n, n)[:3, :3]
    affine[:3, :3] = _LPS @ rotation @ np.diag(spacing[:3])
    affine[:3, 3] = _LPS @ np.asarray(origin[:3], dtype=float)
    return affine


def _ras_affine_to_lps(
    affine: np.ndarray,
) -> tuple[list[float], list[float], list[float]]:
    """The inverse of :func:`_lps_to_ras_affine`: direction, spacing, origin (LPS)."""
    linear = _LPS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = _LPS @ affine[:3, 3]
    return direction.ravel().tolist(), spacing.tolist(), origin.tolist()


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


__all__ = [
    "BRATS2021",
    "BRATS2023",
    "LAYOUTS",
    "MANIFEST_COLUMNS",
    "MODALITIES",
    "MSD_BRAIN_TUMOUR",
    "MSD_CHANNELS",
    "BratsCase",
    "CaseGrid",
    "LabelConvention",
    "LoadedCase",
    "check_case",
    "discover_cases",
    "load_case",
]
