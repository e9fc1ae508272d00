"""BraTS-like sets: synthetic tumours in real brain anatomy, in four MR contrasts.

No public package ships BraTS cases, so :func:`build_brats_like` makes cases that look like
them from the fetched templates (:mod:`medinv.data.anatomy`) and writes them in the BraTS
2018-2021 layout, so that every reader of real BraTS data reads them too.

**Subjects.** Training cases come from ICBM152 2009c, test cases from a different anatomy,
so that a score measures generalisation rather than memory:

- ``icbm152`` (train): the real ICBM 2009c T1 and T2.
- ``colin27`` (test, when the optional set is fetched): the real Colin27 T1, skull-stripped
  with a mask made from its 0.5 mm brain (closed and hole-filled, so CSF is kept); its T2 is
  synthesised from the T1, see below.
- ``icbm152-heldout`` (test, when Colin27 is absent): ICBM 2009c again, with the T2
  synthesised from its T1 instead of the real one, and geometry drawn from a deformation
  family disjoint from the training one (global scale 9-14% away from 1 instead of within 8%,
  larger rotations, stronger and finer elastic warps). This tests robustness to shape and
  contrast, not to a new brain: the result says so.

Each case is a new pseudo-subject: a random affine (per-axis scale, rotation, shift; for
Colin27 also a left-right flip, pointless for the symmetric ICBM template) and a smooth
random elastic warp (Gaussian displacements on a control grid 20-30 mm apart, interpolated by
a tensor-product cubic spline), applied in one linear resampling together with the translation
that centres the brain in the grid (its top 4 mm under the grid's top).

**Grid.** ``size="full"``: 240x240x155 at 1 mm, BraTS's SRI24 grid, with BraTS's affine
(voxel axes towards left, posterior, superior). ``size="small"``: 96x96x64 at 2.5 mm, the
same field of view, for fast tests.

**Contrasts.** Tissue classes come from the T1 within the brain mask: three-class Otsu
thresholds give the CSF, GM and WM means, and a two-tissue partial-volume model (linear
between neighbouring class means) gives CSF and WM fractions per voxel.

- T1, T2: the template's. A synthesised T2 maps each T1 value through the same
  partial-volume model onto ICBM's real T2 class means, so partial volumes carry over.
- FLAIR: the T2 with CSF nulled, ``T2 * (1 - 0.9 p_csf)``.
- T1ce: the T1 plus tumour enhancement; normal tissue does not enhance.

**Tumours.** One per case, centred in cerebral white matter (not in cerebellum or brain stem:
CerebrA labels for ICBM, AAL labels and a brain-stem box for Colin27), deep enough for its
core to lie inside the brain. Its core is a ball of radius 10-22 mm whose radius is modulated
by a smooth random field (an irregular blob); an enhancing rim (label 4) 3-7 mm thick
surrounds a necrotic centre (label 1) with its own irregular inner border; oedema (label 2)
spreads around it to 1.3-1.9 core radii, further in white matter than in grey matter and not
into CSF. Compartment borders are soft (a logistic profile, sharp for the core, about 2 mm
wide for oedema); labels are where a compartment's weight exceeds one half. Inside, each
contrast takes values between the subject's class means as in glioblastoma (necrosis dark on
T1 and bright on T2, rim bright on T1ce, oedema bright on T2 and brightest on FLAIR), with a
smooth multiplicative texture. Mass effect: in the resampling, tissue is pushed radially away
from the centre by 15-33% of the core radius, fading over about the oedema radius. A tumour
with fewer than 8 voxels of a label is drawn again.

**Acquisition.** Per contrast a smooth multiplicative bias field (MONAI ``RandBiasField``,
degree 2: within about 0.9-1.15 over the brain) and Rician noise of 1.5% of white matter
(MONAI ``RandRicianNoise``); the contrast is then scaled to a BraTS-like range with a random
gain. Non-brain voxels are 0, as in BraTS's skull-stripped images; brain voxels are at least 1.
Images are int16, segmentations uint8 with the BraTS 2018-2021 labels (1 necrotic core,
2 oedema, 4 enhancing).

**Output.** ``<out>/<split>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``, a ``manifest.csv``
(``data_manifests/brats_manifest.schema.json``) and a ``dataset.json`` that records the seed,
the grid, the counts, each case's anatomy and parameters, and lists the cases as a Decathlon
datalist (``training``, ``test``). Every case is drawn from its own seed,
``SeedSequence([seed, split, index])``, so a set is rebuilt bit for bit (with the same
library versions) and adding cases leaves the others unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medinv.data.brats import MANIFEST_COLUMNS, MODALITIES
from medinv.errors import InputError

Size = Literal["small", "full"]
SPLITS: tuple[str, ...] = ("train", "test")
MANIFEST_NAME = "manifest.csv"
DATASET_NAME = "dataset.json"
LABELS = {
    0: "background",
    1: "necrotic tumour core",
    2: "peritumoral oedema",
    4: "enhancing tumour",
}

_CSF_NULLING = 0.9
_NOISE = 0.015
_MIN_LABEL_VOXELS = 8
_ATTEMPTS = 20
_TOP_MARGIN_MM = 4.0
# Contrast -> compartment -> (reference, factor): "gm_csf" is gm + factor (csf - gm),
# "gm"/"wm" are factor x that class mean; class means are those of the subject's contrast.
_TUMOUR_CONTRAST = {
    "t1": {"necrotic": ("gm_csf", 0.65), "enhancing": ("gm_csf", 0.15), "oedema": ("gm_csf", 0.3)},
    "t1ce": {"necrotic": ("gm_csf", 0.65), "enhancing": ("wm", 1.55), "oedema": ("gm_csf", 0.3)},
    "t2": {"necrotic": ("gm_csf", 0.9), "enhancing": ("gm_csf", 0.4), "oedema": ("gm_csf", 0.65)},
    "flair": {"necrotic": ("gm", 1.0), "enhancing": ("gm", 1.4), "oedema": ("gm", 1.8)},
}
# White-matter intensity of each contrast after scaling (before a random gain of 0.8-1.25).
_WHITE_MATTER = {"t1": 700.0, "t1ce": 750.0, "t2": 350.0, "flair": 300.0}
# CerebrA structures below the tentorium: no tumour is centred near them.
_INFRATENTORIAL = ("brainstem", "cerebellum", "vermal", "fourth ventricle")
_AAL_CEREBELLUM = 91


@dataclass(frozen=True)
class Grid:
    """An output grid: shape and spacing (mm), in BraTS's orientation.

    BraTS volumes have the affine ``diag(-1, -1, 1)`` with origin ``(0, 239, 0)``: voxel axes
    run towards left, posterior and superior. :attr:`affine` generalises it to any spacing.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """The voxel-to-world (RAS+ mm) matrix."""
        sx, sy, sz = self.spacing
        affine = np.diag([-sx, -sy, sz, 1.0])
        affine[1, 3] = (self.shape[1] - 1) * sy
        return affine


GRIDS: dict[str, Grid] = {
    "full": Grid((240, 240, 155), (1.0, 1.0, 1.0)),
    "small": Grid((96, 96, 64), (2.5, 2.5, 2.5)),
}


@dataclass(frozen=True)
class Family:
    """The ranges a case's geometry is drawn from.

    Args:
        name: the family's name.
        log_scale: ``(low, high)`` range of ``|log s|`` of each axis's scale ``s``; the sign
            of ``log s`` is drawn too, so the brain grows or shrinks.
        rotation_deg: largest rotation about each axis.
        shift_mm: largest translation along each axis.
        elastic_mm: standard deviation of the elastic displacement at the control points.
        control_mm: spacing of the elastic control grid.
        flip: whether a left-right flip is drawn, with probability one half.
    """

    name: str
    log_scale: tuple[float, float]
    rotation_deg: float
    shift_mm: float
    elastic_mm: float
    control_mm: float
    flip: bool = False


TRAIN_FAMILY = Family("train", (0.0, float(np.log(1.08))), 6.0, 4.0, 3.0, 30.0)
COLIN_FAMILY = dataclasses.replace(TRAIN_FAMILY, name="colin27", flip=True)
HELDOUT_FAMILY = Family("heldout", (float(np.log(1.09)), float(np.log(1.14))), 10.0, 4.0, 4.0, 24.0)


@dataclass
class Subject:
    """One anatomy prepared for synthesis; arrays are float32 on the subject's own grid.

    Attributes:
        name: ``"icbm152"``, ``"colin27"`` or ``"icbm152-heldout"``.
        affine: voxel-to-world (RAS+ mm) matrix of the arrays.
        t1, t2: skull-stripped contrasts, 0 outside the brain.
        p_csf, p_wm: CSF and white-matter fractions (partial-volume model).
        mask: the brain mask, 0 or 1.
        seedable: cerebral white matter where a tumour may be centred, 0 or 1.
        depth: distance to the outside of the brain, mm.
        refs: per contrast (``"t1"``, ``"t2"``) the CSF, GM and WM means.
        centre: the centre of the brain's bounding box, world mm.
        top_mm: height of the brain's top above ``centre``, mm.
        t2_source: ``"real"`` or how the T2 was made.
        family: the deformation family of the subject's cases.
    """

    name: str
    affine: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    p_csf: np.ndarray
    p_wm: np.ndarray
    mask: np.ndarray
    seedable: np.ndarray
    depth: np.ndarray
    refs: dict[str, np.ndarray]
    centre: np.ndarray
    top_mm: float
    t2_source: str
    family: Family


@dataclass(frozen=True)
class BratsLikeConfig:
    """What to build: case counts per split, the seed and the grid.

    Args:
        train: training cases (ICBM152 anatomy).
        test: test cases (Colin27 anatomy, or ICBM152 with held-out geometry and contrast).
        seed: the seed every case is drawn from, a non-negative integer.
        size: ``"full"`` (240x240x155 at 1 mm) or ``"small"`` (96x96x64 at 2.5 mm).
    """

    train: int = 4
    test: int = 2
    seed: int = 0
    size: Size = "full"

    def validate(self) -> None:
        """Raises :class:`InputError` for negative counts or seed, or an unknown size."""
        if self.train < 0 or self.test < 0:
            raise InputError(f"case counts must be non-negative, got {self.train}, {self.test}")
        if self.train + self.test == 0:
            raise InputError("nothing to build: no training and no test cases")
        if self.seed < 0:
            raise InputError(f"seed must be non-negative, got {self.seed}")
        if self.size not in GRIDS:
            raise InputError(f"unknown size '{self.size}'; known: {', '.join(GRIDS)}")


@dataclass
class SyntheticCase:
    """One synthesised case.

    Attributes:
        images: contrast -> int16 volume, for each of :data:`MODALITIES`.
        seg: uint8 labels 0, 1, 2, 4.
        info: what was drawn (anatomy, geometry, tumour), ready for JSON.
    """

    images: dict[str, np.ndarray]
    seg: np.ndarray
    info: dict[str, Any]


@dataclass
class BuildResult:
    """What :func:`build_brats_like` wrote: manifest and summary paths, the manifest rows."""

    manifest: Path
    dataset: Path
    rows: list[dict[str, str]]
    notes: list[str] = field(default_factory=list)


def build_brats_like(
    out: str | Path,
    config: BratsLikeConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build a BraTS-like set in ``out``, as the module documentation describes.

    Args:
        out: the output folder, created if absent; nothing is written outside it.
        config: what to build (default :class:`BratsLikeConfig`).
        overwrite: replace existing cases, manifest and summary; cases of an earlier build
            listed in its ``dataset.json`` and not rebuilt are removed.
        progress: called with each case id before the case is made.

    Returns:
        The manifest and summary paths, the manifest rows, and notes (e.g. that Colin27 is
        absent, so test cases come from held-out ICBM152 geometry and contrast).

    Raises:
        InputError: a bad configuration, an existing output without ``overwrite``, or an
            output folder that cannot be written.
        ResourceError: the sample anatomy is not fetched.
    """
    config = config or BratsLikeConfig()
    config.validate()
    out = Path(out)
    grid = GRIDS[config.size]
    counts = dict(zip(SPLITS, (config.train, config.test), strict=True))
    plan = [
        (split, index, f"BraTSLike_{split}_{index:04d}")
        for split in SPLITS
        for index in range(counts[split])
    ]
    stale = _check_outputs(out, {(split, case_id) for split, _, case_id in plan}, overwrite)
    notes: list[str] = []
    subjects = load_subjects({split for split, n in counts.items() if n}, notes)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot create the output folder ({err.strerror})") from None

    rows, infos = [], []
    for split, index, case_id in plan:
        if progress is not None:
            progress(case_id)
        entropy = [config.seed, SPLITS.index(split), index]
        case = synthesize_case(subjects[split], grid, np.random.default_rng(entropy))
        paths = _write_case(out / split / case_id, case_id, case, grid)
        rows.append(
            {
                "case_id": case_id,
                **{m: paths[m] for m in MODALITIES},
                "label": paths["seg"],
                "split": split,
            }
        )
        infos.append({"case_id": case_id, "split": split, "seed": entropy, **case.info})
    for split, case_id in stale:
        shutil.rmtree(out / split / case_id, ignore_errors=True)

    manifest = out / MANIFEST_NAME
    _write_atomic(manifest, _manifest_bytes(rows))
    dataset = out / DATASET_NAME
    summary = _summary(config, grid, subjects, rows, infos, notes)
    _write_atomic(dataset, (json.dumps(summary, indent=2) + "\n").encode())
    return BuildResult(manifest, dataset, rows, notes)


def load_subjects(splits: set[str], notes: list[str]) -> dict[str, Subject]:
    """The subject of each split: ``icbm152`` for train; ``colin27`` for test, else held out.

    Appends to ``notes`` what a reader of the set should know (a missing Colin27).
    """
    from medinv.data.anatomy import anatomy_status

    icbm = _load_icbm152()
    subjects = {"train": icbm}
    if "test" in splits:
        status = anatomy_status()
        if all(status[f"colin27/{v}"] is not None for v in ("t1", "t1_brain_hires", "aal")):
            subjects["test"] = _load_colin27(icbm)
        else:
            subjects["test"] = _heldout_icbm152(icbm)
            notes.append(
                "optional anatomy colin27 not fetched: test cases use ICBM152 with a held-out "
                "deformation family and a synthesised T2, so they test robustness to shape "
                "and contrast, not to a new brain"
            )
    return subjects


def synthesize_case(subject: Subject, grid: Grid, rng: np.random.Generator) -> SyntheticCase:
    """One case: ``subject`` deformed onto ``grid``, with a synthetic tumour.

    Deterministic in the state of ``rng``.

    A drawn tumour is replaced by another if it has fewer than 8 voxels of a label.

    Raises:
        RuntimeError: no tumour fits the subject (not expected for the fetched anatomy).
    """
    from scipy import ndimage

    geometry = _draw_geometry(subject.family, rng)
    coords, linear = _source_coords(subject, grid, geometry, rng)
    for _ in range(_ATTEMPTS):
        tumour = _draw_tumour(grid, rng)
        centre = _tumour_centre(subject, grid, coords, tumour, geometry, rng)
        if centre is None:
            continue
        warped = coords.copy()
        _apply_mass_effect(warped, linear, centre, tumour, grid)
        mask, t1, t2, p_csf, p_wm = (
            ndimage.map_coordinates(volume, warped, order=1, output=np.float32)
            for volume in (subject.mask, subject.t1, subject.t2, subject.p_csf, subject.p_wm)
        )
        del warped
        mask = mask >= 0.5
        box = _box(centre, tumour["extent_mm"], grid)
        seg, weights = _tumour_maps(tumour, centre, box, grid, mask, p_csf, p_wm, rng)
        if all(np.count_nonzero(seg[box] == v) >= _MIN_LABEL_VOXELS for v in (1, 2, 4)):
            break
    else:
        raise RuntimeError(f"no tumour with all three labels fits {subject.name}")
    del coords
    refs = {
        "t1": subject.refs["t1"],
        "t1ce": subject.refs["t1"],
        "t2": subject.refs["t2"],
        "flair": subject.refs["t2"] * np.array([1 - _CSF_NULLING, 1, 1], dtype=np.float32),
    }
    normal = {"t1": t1, "t1ce": t1.copy(), "t2": t2, "flair": t2 * (1 - _CSF_NULLING * p_csf)}
    texture = 1 + tumour["texture"] * _smooth_noise(_shape(box), 1.5, grid, rng)
    images = {}
    for modality in MODALITIES:
        volume = normal[modality]
        _add_tumour(volume[box], modality, refs[modality], weights, texture, tumour, rng)
        images[modality] = _acquire(volume, mask, modality, refs[modality][2], rng)

    world = grid.affine[:3, :3] @ np.asarray(centre, dtype=float) + grid.affine[:3, 3]
    info = {
        "anatomy": subject.name,
        "t2": subject.t2_source,
        "family": subject.family.name,
        "geometry": geometry,
        "tumour": {
            "centre_voxel": [int(c) for c in centre],
            "centre_world_mm": [round(float(c), 1) for c in world],
            "core_radius_mm": round(tumour["core_mm"], 2),
            "rim_mm": round(tumour["rim_mm"], 2),
            "oedema_radius_mm": round(tumour["oedema_mm"], 2),
            "mass_effect_mm": round(tumour["push_mm"], 2),
            "voxels": {str(v): int(np.count_nonzero(seg == v)) for v in (1, 2, 4)},
        },
    }
    return SyntheticCase(images, seg, info)


def _draw_geometry(family: Family, rng: np.random.Generator) -> dict[str, Any]:
    low, high = family.log_scale
    log_scale = rng.uniform(low, high, 3) * rng.choice([-1.0, 1.0], 3)
    return {
        "scale": [round(float(s), 4) for s in np.exp(log_scale)],
        "rotation_deg": [round(float(a), 3) for a in rng.uniform(-1, 1, 3) * family.rotation_deg],
        "shift_mm": [round(float(t), 3) for t in rng.uniform(-1, 1, 3) * family.shift_mm],
        "flip_lr": bool(family.flip and rng.random() < 0.5),
        "elastic_mm": family.elastic_mm,
        "control_mm": family.control_mm,
    }


def _source_coords(
    subject: Subject, grid: Grid, geometry: dict[str, Any], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Where each output voxel samples the subject: ``(3, *grid.shape)`` voxel coordinates.

    An output voxel ``x`` at world offset ``d`` from the grid centre samples the subject at
    world ``centre + shift + Q d + e(x)``, ``Q = R diag(1/scale) F`` (rotation, scale,
    flip) and ``e`` the elastic displacement. Also returns the linear part, in subject voxels
    per output voxel.
    """
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("xyz", geometry["rotation_deg"], degrees=True).as_matrix()
    scale = np.asarray(geometry["scale"])
    flip = np.diag([-1.0 if geometry["flip_lr"] else 1.0, 1.0, 1.0])
    q = rotation @ np.diag(1 / scale) @ flip
    # Lower the brain so its top sits _TOP_MARGIN_MM under the grid's top at any scale.
    half_height = (grid.shape[2] - 1) * grid.spacing[2] / 2
    drop = subject.top_mm - (half_height - _TOP_MARGIN_MM) / scale[2]
    centre = subject.centre + np.array([0.0, 0.0, drop]) + np.asarray(geometry["shift_mm"])
    to_source = np.linalg.inv(subject.affine)
    middle = (np.asarray(grid.shape) - 1) / 2
    linear = to_source[:3, :3] @ q @ grid.affine[:3, :3]
    offset = to_source[:3, :3] @ centre + to_source[:3, 3] - linear @ middle

    control = [
        max(4, int(np.ceil(n * s / geometry["control_mm"])) + 1)
        for n, s in zip(grid.shape, grid.spacing, strict=True)
    ]
    knots = rng.normal(0.0, geometry["elastic_mm"], (3, *control))
    knots = np.tensordot(to_source[:3, :3], knots, axes=1)  # world mm -> subject voxels
    splines = [_spline_matrix(c, n) for c, n in zip(control, grid.shape, strict=True)]
    coords = np.empty((3, *grid.shape), dtype=np.float32)
    axes = [np.arange(n, dtype=np.float32) for n in grid.shape]
    for k in range(3):
        coords[k] = np.einsum("ia,jb,kc,abc->ijk", *splines, knots[k], optimize=True)
        coords[k] += (
            linear[k, 0] * axes[0][:, None, None]
            + linear[k, 1] * axes[1][None, :, None]
            + linear[k, 2] * axes[2][None, None, :]
            + offset[k]
        )
    return coords, linear


def _spline_matrix(knots: int, samples: int) -> np.ndarray:
    """``(samples, knots)`` weights of the cubic spline through evenly spaced knots."""
    from scipy.interpolate import make_interp_spline

    spline = make_interp_spline(np.linspace(0, 1, knots), np.eye(knots), k=3)
    return spline(np.linspace(0, 1, samples))


def _draw_tumour(grid: Grid, rng: np.random.Generator) -> dict[str, float]:
    coarsest = max(grid.spacing)
    core = rng.uniform(10.0, 22.0)
    rim = min(max(rng.uniform(3.0, 7.0), 1.2 * coarsest), 0.6 * core)
    oedema = core * rng.uniform(1.3, 1.9)
    tumour = {
        "core_mm": core,
        "rim_mm": rim,
        "oedema_mm": oedema,
        "core_irregularity": rng.uniform(0.10, 0.22),
        "core_corr_mm": core * rng.uniform(0.35, 0.6),
        "rim_irregularity": rng.uniform(0.2, 0.4),
        "oedema_irregularity": rng.uniform(0.12, 0.2),
        "oedema_corr_mm": oedema * rng.uniform(0.3, 0.5),
        "oedema_strength": rng.uniform(0.65, 0.95),
        "texture": rng.uniform(0.05, 0.12),
        "push_mm": core * rng.uniform(0.15, 0.33),
        "reach_mm": 0.6 * oedema,
        "core_edge_mm": 0.5 * coarsest,
        "oedema_edge_mm": max(1.5, 0.5 * coarsest),
    }
    # Smooth fields are clipped to +-2.5 std, so no compartment reaches further than this.
    tumour["extent_mm"] = oedema * (1 + 2.5 * tumour["oedema_irregularity"]) / 0.8 + 3 * coarsest
    tumour["core_extent_mm"] = core * (1 + 2.5 * tumour["core_irregularity"])
    return tumour


def _tumour_centre(
    subject: Subject,
    grid: Grid,
    coords: np.ndarray,
    tumour: dict[str, float],
    geometry: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[int, int, int] | None:
    """A voxel of cerebral white matter deep enough for the whole core, or None."""
    from scipy import ndimage

    step = max(1, round(2.0 / min(grid.spacing)))
    sparse = coords[:, ::step, ::step, ::step]
    seedable = ndimage.map_coordinates(subject.seedable, sparse, order=1, output=np.float32)
    depth = ndimage.map_coordinates(subject.depth, sparse, order=1, output=np.float32)
    # Depth is in subject mm; the brain is scaled by at least min(scale) here.
    need = (tumour["core_extent_mm"] + 3.0) / min(geometry["scale"])
    candidates = np.flatnonzero((seedable >= 0.5) & (depth >= need))
    if candidates.size == 0:
        return None
    chosen = np.unravel_index(candidates[rng.integers(candidates.size)], seedable.shape)
    return tuple(int(c) * step for c in chosen)


def _box(centre: tuple[int, ...], radius_mm: float, grid: Grid) -> tuple[slice, ...]:
    """The part of the grid within ``radius_mm`` of ``centre`` along each axis."""
    return tuple(
        slice(max(0, c - int(np.ceil(radius_mm / s))), min(n, c + int(np.ceil(radius_mm / s)) + 1))
        for c, s, n in zip(centre, grid.spacing, grid.shape, strict=True)
    )


def _offsets_mm(box: tuple[slice, ...], centre: tuple[int, ...], grid: Grid) -> list[np.ndarray]:
    """Per axis, broadcastable offsets (mm) of the box's voxels from ``centre``."""
    offsets = []
    for axis, (part, c, s) in enumerate(zip(box, centre, grid.spacing, strict=True)):
        shape = [1, 1, 1]
        shape[axis] = part.stop - part.start
        offsets.append(
            ((np.arange(part.start, part.stop) - c) * s).astype(np.float32).reshape(shape)
        )
    return offsets


def _apply_mass_effect(
    coords: np.ndarray,
    linear: np.ndarray,
    centre: tuple[int, ...],
    tumour: dict[str, float],
    grid: Grid,
) -> None:
    """Sample the anatomy at ``x - u(x)``, ``u`` pointing away from the centre.

    ``|u|`` grows linearly to ``push_mm`` at the core radius and then decays as a Gaussian
    of width ``reach_mm``; since ``push_mm`` is below the core radius, ``x - u(x)`` does not
    fold. The elastic part of ``coords`` is taken at ``x`` rather than ``x - u``: the
    difference is a slightly different, equally smooth, warp.
    """
    core, reach, push = tumour["core_mm"], tumour["reach_mm"], tumour["push_mm"]
    box = _box(centre, core + 2.5 * reach, grid)
    offsets = _offsets_mm(box, centre, grid)
    r = np.sqrt(offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2)
    magnitude = push * np.where(r < core, r / core, np.exp(-(((r - core) / reach) ** 2)))
    magnitude /= np.maximum(r, 1e-6)
    part = coords[(slice(None), *box)]
    for axis in range(3):
        step = magnitude * offsets[axis] / grid.spacing[axis]  # output voxels
        for k in range(3):
            part[k] -= linear[k, axis] * step


def _shape(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(part.stop - part.start for part in box)


def _smooth_noise(
    shape: tuple[int, ...], corr_mm: float, grid: Grid, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian-smoothed white noise on ``shape`` voxels of ``grid``: unit std, within +-2.5."""
    from scipy import ndimage

    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, [corr_mm / s for s in grid.spacing], mode="reflect")
    noise /= max(float(noise.std()), 1e-6)
    return np.clip(noise, -2.5, 2.5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _tumour_maps(
    tumour: dict[str, float],
    centre: tuple[int, ...],
    box: tuple[slice, ...],
    grid: Grid,
    mask: np.ndarray,
    p_csf: np.ndarray,
    p_wm: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The label map and the soft weights of necrosis, enhancing rim and oedema in ``box``.

    Each compartment is where a signed distance (mm, positive inside) is positive:
    core ``R_c (1 + a n1) - r``; necrosis the core less a rim of thickness
    ``t (1 + b n3)``; oedema ``R_e (1 + c n2) / (1.2 - 0.4 p_wm) - r`` (further in white
    matter), with ``n1..n3`` smooth noise. Weights are logistic in that distance.
    """
    offsets = _offsets_mm(box, centre, grid)
    r = np.sqrt(offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2)
    inside, csf, wm = mask[box], p_csf[box], p_wm[box]
    core_shape = _smooth_noise(r.shape, tumour["core_corr_mm"], grid, rng)
    rim_shape = _smooth_noise(r.shape, 0.3 * tumour["core_mm"], grid, rng)
    oedema_shape = _smooth_noise(r.shape, tumour["oedema_corr_mm"], grid, rng)

    core_radius = tumour["core_mm"] * (1 + tumour["core_irregularity"] * core_shape)
    rim = tumour["rim_mm"] * np.clip(1 + tumour["rim_irregularity"] * rim_shape, 0.5, 2.0)
    core = _sigmoid((core_radius - r) / tumour["core_edge_mm"])
    necrotic = np.minimum(_sigmoid((core_radius - rim - r) / tumour["core_edge_mm"]), core)
    reach = tumour["oedema_mm"] * (1 + tumour["oedema_irregularity"] * oedema_shape)
    oedema = _sigmoid((reach / (1.2 - 0.4 * wm) - r) / tumour["oedema_edge_mm"])
    whole = np.maximum(oedema * (1 - csf) * inside, core)

    seg = np.zeros(mask.shape, dtype=np.uint8)
    part = seg[box]
    part[whole >= 0.5] = 2
    part[core >= 0.5] = 4
    part[necrotic >= 0.5] = 1
    part[~inside] = 0
    weights = {"necrotic": necrotic, "enhancing": core - necrotic, "oedema": whole - core}
    return seg, weights


def _add_tumour(
    volume: np.ndarray,
    modality: str,
    refs: np.ndarray,
    weights: dict[str, np.ndarray],
    texture: np.ndarray,
    tumour: dict[str, float],
    rng: np.random.Generator,
) -> None:
    """Blend each compartment's textured value into ``volume`` (a view of the box)."""
    csf, gm, wm = (float(v) for v in refs)
    for compartment in ("oedema", "enhancing", "necrotic"):
        reference, factor = _TUMOUR_CONTRAST[modality][compartment]
        factor *= rng.uniform(0.9, 1.1)
        if reference == "gm_csf":
            value = gm + factor * (csf - gm)
        else:
            value = factor * (gm if reference == "gm" else wm)
        weight = weights[compartment]
        if compartment == "oedema":
            weight = weight * tumour["oedema_strength"]
            tex = 1 + 0.5 * (texture - 1)
        else:
            tex = texture
        volume += weight * (value * tex - volume)


def _acquire(
    volume: np.ndarray, mask: np.ndarray, modality: str, white: float, rng: np.random.Generator
) -> np.ndarray:
    """Bias field, Rician noise, a BraTS-like scale; int16, 0 outside the brain."""
    from monai.transforms import RandBiasField, RandRicianNoise

    bias = RandBiasField(degree=2, coeff_range=(-0.05, 0.05), prob=1.0)
    bias.set_random_state(seed=int(rng.integers(2**31)))
    noise = RandRicianNoise(prob=1.0, std=float(_NOISE * white), sample_std=False)
    noise.set_random_state(seed=int(rng.integers(2**31)))
    volume = np.asarray(noise(bias(volume[None])))[0]
    gain = _WHITE_MATTER[modality] / white * rng.uniform(0.8, 1.25)
    scaled = np.clip(np.rint(volume * gain), 1, np.iinfo(np.int16).max)
    return np.where(mask, scaled, 0).astype(np.int16)


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    from medinv.data.anatomy import require_anatomy

    image = nib.load(require_anatomy(name))
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=float)


def _tissue_model(t1: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSF, GM and WM means of the T1 in the brain, and CSF and WM fractions per voxel.

    The means are those of the three classes split by multi-level Otsu thresholds; a voxel
    between two neighbouring means is a linear mixture of those two tissues.
    """
    from skimage.filters import threshold_multiotsu

    values = t1[mask]
    low, high = threshold_multiotsu(values, classes=3)
    means = np.array(
        [
            values[values < low].mean(),
            values[(values >= low) & (values < high)].mean(),
            values[values >= high].mean(),
        ],
        dtype=np.float32,
    )
    p_csf = np.interp(t1, means[:2], [1.0, 0.0]).astype(np.float32) * mask
    p_wm = np.interp(t1, means[1:], [0.0, 1.0]).astype(np.float32) * mask
    return means, p_csf, p_wm


def _class_means(volume: np.ndarray, p_csf: np.ndarray, p_wm: np.ndarray) -> np.ndarray:
    """Means of ``volume`` over nearly pure CSF, GM and WM voxels."""
    pure_gm = (p_csf < 0.1) & (p_wm < 0.1) & (volume > 0)
    return np.array(
        [volume[p_csf > 0.9].mean(), volume[pure_gm].mean(), volume[p_wm > 0.9].mean()],
        dtype=np.float32,
    )


def _distance_mm(binary: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel of ``binary`` to the nearest voxel outside it."""
    from scipy import ndimage

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return ndimage.distance_transform_edt(binary, sampling=spacing).astype(np.float32)


def _placement(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """The world centre of the brain's bounding box, and the height of its top above it."""
    corners = np.argwhere(mask)
    low, high = corners.min(axis=0), corners.max(axis=0)
    world = affine[:3, :3] @ np.stack([low, high], axis=1) + affine[:3, 3:4]
    centre = world.mean(axis=1)
    return centre, float(world[2].max() - centre[2])


def _subject(
    name: str,
    t1: np.ndarray,
    t2: np.ndarray,
    mask: np.ndarray,
    p_csf: np.ndarray,
    p_wm: np.ndarray,
    t1_means: np.ndarray,
    allowed: np.ndarray,
    affine: np.ndarray,
    t2_source: str,
    family: Family,
) -> Subject:
    centre, top = _placement(mask, affine)
    seedable = allowed & mask & (p_wm > 0.5)
    return Subject(
        name=name,
        affine=affine,
        t1=t1,
        t2=t2,
        p_csf=p_csf,
        p_wm=p_wm,
        mask=mask.astype(np.float32),
        seedable=seedable.astype(np.float32),
        depth=_distance_mm(mask, affine),
        refs={"t1": t1_means, "t2": _class_means(t2, p_csf, p_wm)},
        centre=centre,
        top_mm=top,
        t2_source=t2_source,
        family=family,
    )


def _load_icbm152() -> Subject:
    from medinv.data.anatomy import require_anatomy

    t1, affine = _load("icbm152/t1")
    t2, _ = _load("icbm152/t2")
    mask = _load("icbm152/mask")[0] >= 0.5
    cerebra = np.rint(_load("icbm152/cerebra")[0]).astype(np.int16)
    t1 *= mask
    t2 *= mask
    means, p_csf, p_wm = _tissue_model(t1, mask)
    infratentorial = np.isin(cerebra, _cerebra_labels(require_anatomy("icbm152/t1").parent))
    allowed = (cerebra == 0) & (_distance_mm(~infratentorial, affine) > 6.0)
    return _subject(
        "icbm152", t1, t2, mask, p_csf, p_wm, means, allowed, affine, "real", TRAIN_FAMILY
    )


def _cerebra_labels(folder: Path) -> list[int]:
    """CerebrA label values (both hemispheres) of brain stem, cerebellum and 4th ventricle."""
    from medinv.errors import ResourceError

    path = folder / "cerebra_labels.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [
            int(row[column])
            for row in rows
            if any(word in row["Label Name"].lower() for word in _INFRATENTORIAL)
            for column in ("RH Label", "LH Labels")
        ]
    except (OSError, KeyError, ValueError) as err:
        raise ResourceError(f"{path}: cannot read the CerebrA label table ({err})") from None


def _heldout_icbm152(icbm: Subject) -> Subject:
    """ICBM152 with a T2 synthesised from its T1 and the held-out deformation family."""
    t2 = _synthetic_t2(icbm.t1, icbm.refs["t1"], icbm.refs["t2"], icbm.mask > 0)
    return dataclasses.replace(
        icbm,
        name="icbm152-heldout",
        t2=t2,
        refs={"t1": icbm.refs["t1"], "t2": _class_means(t2, icbm.p_csf, icbm.p_wm)},
        t2_source="synthesised from the T1 tissue model",
        family=HELDOUT_FAMILY,
    )


def _synthetic_t2(
    t1: np.ndarray, t1_means: np.ndarray, t2_means: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """A T2 from a T1: each T1 value mapped piecewise-linearly from T1 to T2 class means."""
    return (np.interp(t1, t1_means, t2_means) * mask).astype(np.float32)


def _load_colin27(icbm: Subject) -> Subject:
    from scipy import ndimage

    t1, affine = _load("colin27/t1")
    aal = np.rint(_load("colin27/aal")[0]).astype(np.int16)
    hires, hires_affine = _load("colin27/t1_brain_hires")
    # The 0.5 mm brain leaves CSF out: resample its support, close sulci, fill ventricles.
    matrix = np.linalg.inv(hires_affine) @ affine
    support = ndimage.affine_transform(
        (hires > 0).astype(np.float32), matrix, output_shape=t1.shape, order=1
    )
    brain = support >= 0.5
    closed = _distance_mm(_distance_mm(~brain, affine) <= 4.0, affine) > 4.0
    mask = ndimage.binary_fill_holes(closed | brain)
    labels, count = ndimage.label(mask)
    if count > 1:
        mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    t1 *= mask
    means, p_csf, p_wm = _tissue_model(t1, mask)
    t2 = _synthetic_t2(t1, means, icbm.refs["t2"], mask)
    cerebellum = _distance_mm(aal < _AAL_CEREBELLUM, affine) <= 6.0
    allowed = (aal == 0) & ~cerebellum & ~_brainstem_box(t1.shape, affine)
    return _subject(
        "colin27",
        t1,
        t2,
        mask,
        p_csf,
        p_wm,
        means,
        allowed,
        affine,
        "synthesised from the T1 tissue model with ICBM152's T2 class means",
        COLIN_FAMILY,
    )


def _brainstem_box(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Voxels of an MNI-space box around the brain stem and midbrain (AAL leaves it out)."""
    axes = [np.arange(n) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    world = [sum(affine[k, j] * grids[j] for j in range(3)) + affine[k, 3] for k in range(3)]
    return (np.abs(world[0]) < 18) & (world[1] > -50) & (world[1] < -5) & (world[2] < -5)


def _check_outputs(
    out: Path, planned: set[tuple[str, str]], overwrite: bool
) -> set[tuple[str, str]]:
    """Refuse existing outputs unless ``overwrite``; the earlier build's cases to remove."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    existing = [out / MANIFEST_NAME, out / DATASET_NAME] + [out / s / c for s, c in sorted(planned)]
    if not overwrite:
        for path in existing:
            if path.exists():
                raise InputError(f"{path}: exists; pass --overwrite to replace it")
        return set()
    try:
        earlier = json.loads((out / DATASET_NAME).read_text())["cases"]
        listed = {(c["split"], c["case_id"]) for c in earlier}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {
        (s, c) for s, c in listed if s in SPLITS and "/" not in c and c not in ("", ".", "..")
    } - planned


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file; ``mtime=0`` makes its bytes depend on the content only."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _write_case(folder: Path, case_id: str, case: SyntheticCase, grid: Grid) -> dict[str, str]:
    """Write a case folder under a temporary name, then rename it; relative file paths."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    volumes = {**case.images, "seg": case.seg}
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for key, data in volumes.items():
            (tmp / f"{case_id}_{key}.nii.gz").write_bytes(_nifti_bytes(data, grid.affine))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{err.filename or folder}: cannot write ({err.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    split = folder.parent.name
    return {key: f"{split}/{case_id}/{case_id}_{key}.nii.gz" for key in volumes}


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write ({err.strerror})") from None


def _manifest_bytes(rows: list[dict[str, str]]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def _summary(
    config: BratsLikeConfig,
    grid: Grid,
    subjects: dict[str, Subject],
    rows: list[dict[str, str]],
    infos: list[dict[str, Any]],
    notes: list[str],
) -> dict[str, Any]:
    from medinv import __version__
    from medinv.data.anatomy import ANATOMY_SETS

    counts = {split: sum(r["split"] == split for r in rows) for split in SPLITS}
    used = {subjects[s].name.split("-")[0] for s in SPLITS if counts[s]}

    def datalist(split: str) -> list[dict[str, Any]]:
        return [
            {"case_id": r["case_id"], "image": [r[m] for m in MODALITIES], "label": r["label"]}
            for r in rows
            if r["split"] == split
        ]

    return {
        "name": "BraTS-like",
        "description": "Synthetic tumours in real brain anatomy, BraTS 2018-2021 layout "
        "(medinv.data.brats_like)",
        "medinv_version": __version__,
        "seed": config.seed,
        "size": config.size,
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing),
        "affine": grid.affine.tolist(),
        "counts": counts,
        "anatomy": {s: subjects[s].name for s in SPLITS if counts[s]},
        "label_convention": "brats2021",
        "modality": {str(i): m for i, m in enumerate(MODALITIES)},
        "labels": {str(k): v for k, v in LABELS.items()},
        "notes": notes,
        "sources": {s.name: s.licence for s in ANATOMY_SETS if s.name in used},
        "manifest": MANIFEST_NAME,
        "training": datalist("train"),
        "test": datalist("test"),
        "cases": infos,
    }
