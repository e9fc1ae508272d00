"""Realistic fastMRI-schema k-space sets built from real brain anatomy.

Each volume is a stack of axial slices of a fetched template (:mod:`medinv.data.anatomy`)
turned into what a scanner would record:

1. the slice is resampled to ``matrix`` x ``matrix`` (320 by default) and scaled to [0, 1];
2. it is multiplied by a smooth random phase ``exp(i phi)``, ``phi`` a sum of a few
   low-frequency cosines of up to about pi, so its k-space is not Hermitian;
3. multi-coil: ``C`` birdcage sensitivities (``C`` drawn per volume, 8-20 by default, with a
   random complex gain per coil) weight the image; the coil images are placed in a
   ``2 matrix`` x ``matrix`` field of view (2x readout oversampling, as fastMRI);
4. the centred orthonormal FFT gives k-space, to which correlated complex Gaussian noise is
   added: ``n = sigma L w``, ``w`` white, ``L L^H`` a random coil covariance with unit
   diagonal, ``sigma`` = ``noise`` x the peak coil-image magnitude;
5. the target is the RSS (multi-coil, ``reconstruction_rss``) or magnitude (single-coil,
   ``reconstruction_esc``) of the noisy fully sampled data, centre-cropped to the matrix.

Train and val files hold fully sampled k-space and the target. Test files hold k-space
undersampled with a fastMRI mask seeded from the file name, with ``mask``,
``acceleration`` and ``num_low_frequency`` (the manifest adds the sampled fraction); the
matching fully sampled files with targets go to ``<challenge>_test_full``. Subjects are
kept apart: ``icbm152`` (T1 and T2) gives the training volumes and ``colin27`` (T1) the
validation and test volumes, from disjoint slabs.
Without the optional ``colin27`` set, validation and test come from ``icbm152`` slabs
disjoint from the training slabs, and :func:`build_kspace_set` says so in its result.

Everything is drawn from one seed, so a set is rebuilt bit for bit. A ``manifest.csv`` in the
output folder lists every file (columns: ``data_manifests/kspace_manifest.schema.json``).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medinv.errors import InputError
from medinv.mri.coils import birdcage_maps
from medinv.mri.fft import center_crop, fft2c, ifft2c, rss
from medinv.mri.io import KSpaceHeader, write_kspace_file
from medinv.mri.masks import create_mask_func, sampled_fraction, seed_from_name

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = (
    "file",
    "split",
    "challenge",
    "subject",
    "anatomy",
    "acquisition",
    "slices",
    "coils",
    "height",
    "width",
    "acceleration",
    "num_low_frequency",
    "sampled_fraction",
    "target_file",
)
CHALLENGES = ("multicoil", "singlecoil")
SPLITS = ("train", "val", "test")
# Axial range of the brain used for slices, as fractions of the volume's z extent.
_Z_RANGE = (0.30, 0.80)


@dataclass(frozen=True)
class Source:
    """One anatomy volume: the subject it belongs to, its name and fastMRI acquisition."""

    subject: str
    anatomy: str
    acquisition: str


TRAIN_SOURCES = (Source("icbm152", "icbm152/t1", "AXT1"), Source("icbm152", "icbm152/t2", "AXT2"))
HELD_OUT_SOURCES = (Source("colin27", "colin27/t1", "AXT1"),)


@dataclass(frozen=True)
class KSpaceSetConfig:
    """What to build.

    Attributes:
        seed: the one seed everything is drawn from.
        volumes: volumes per split, ``{"train": n, "val": n, "test": n}``.
        slices: slices per volume.
        matrix: reconstruction matrix (k-space is ``2 matrix`` x ``matrix``).
        coils: inclusive range of the coil count, drawn per volume.
        noise: noise standard deviation relative to the peak coil-image magnitude.
        challenges: ``"multicoil"`` and/or ``"singlecoil"``.
        mask_type: mask of the test files (see :func:`medinv.mri.masks.create_mask_func`).
        center_fractions: mask centre fractions, paired with ``accelerations``.
        accelerations: mask accelerations.
    """

    seed: int = 0
    volumes: dict[str, int] = field(default_factory=lambda: {"train": 4, "val": 2, "test": 2})
    slices: int = 16
    matrix: int = 320
    coils: tuple[int, int] = (8, 20)
    noise: float = 0.01
    challenges: tuple[str, ...] = CHALLENGES
    mask_type: str = "equispaced_fraction"
    center_fractions: tuple[float, ...] = (0.08, 0.04)
    accelerations: tuple[int, ...] = (4, 8)

    def validate(self) -> None:
        """Raise :class:`InputError` for values that cannot give a valid set."""
        if set(self.volumes) - set(SPLITS) or any(n < 0 for n in self.volumes.values()):
            raise InputError(f"volumes must map {', '.join(SPLITS)} to counts >= 0")
        if self.slices < 1 or self.matrix < 16 or self.matrix % 2:
            raise InputError("slices must be >= 1 and matrix an even number >= 16")
        low, high = self.coils
        if not 1 <= low <= high:
            raise InputError(f"coil range {low}-{high} is not a range of positive counts")
        if not 0 <= self.noise < 1:
            raise InputError(f"noise {self.noise} must lie in [0, 1)")
        if not self.challenges or set(self.challenges) - set(CHALLENGES):
            raise InputError(f"challenges must be among {', '.join(CHALLENGES)}")
        try:
            create_mask_func(self.mask_type, self.center_fractions, self.accelerations)
        except ValueError as err:
            raise InputError(str(err)) from None


@dataclass
class BuildResult:
    """What :func:`build_kspace_set` wrote: the manifest and its rows, and notes (e.g. that
    the held-out subject was unavailable)."""

    manifest: Path
    rows: list[dict[str, object]]
    notes: list[str]


def build_kspace_set(
    out: str | os.PathLike[str],
    config: KSpaceSetConfig | None = None,
    anatomy: Callable[[str], Path] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build a k-space set in ``out`` (see the module docstring).

    Args:
        out: output folder; created if missing.
        config: what to build; defaults to :class:`KSpaceSetConfig`.
        anatomy: maps an anatomy name to its NIfTI file; defaults to
            :func:`medinv.data.anatomy.require_anatomy`.
        overwrite: replace existing files of the same names.
        progress: called with each file name before it is written.

    Returns:
        The :class:`BuildResult`.

    Raises:
        InputError: a bad configuration, or a file exists without ``overwrite``.
        ResourceError: the required anatomy has not been fetched.
    """
    from medinv.data.anatomy import require_anatomy
    from medinv.errors import ResourceError

    config = config or KSpaceSetConfig()
    config.validate()
    locate = anatomy or require_anatomy
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    try:
        held_out = [(s, locate(s.anatomy)) for s in HELD_OUT_SOURCES]
        ranges = {"train": _Z_RANGE, "val": (0.55, 0.80), "test": (0.30, 0.55)}
    except ResourceError:
        held_out = []
        notes.append(
            "colin27 is not fetched: val and test use icbm152 slabs disjoint from training"
        )
        ranges = {"train": (0.30, 0.55), "val": (0.55, 0.675), "test": (0.675, 0.80)}
    train = [(s, locate(s.anatomy)) for s in TRAIN_SOURCES]
    sources = {"train": train, "val": held_out or train, "test": held_out or train}
    seeds = np.random.SeedSequence(config.seed)
    plan = []
    for split, split_seed in zip(SPLITS, seeds.spawn(len(SPLITS)), strict=True):
        for index, volume_seed in enumerate(split_seed.spawn(config.volumes.get(split, 0))):
            source, path = sources[split][index % len(sources[split])]
            name = f"file_brain_{source.acquisition}_{source.subject}_{split}_{index:03d}.h5"
            plan.append((split, volume_seed, source, path, name))
    if not overwrite:
        _refuse_existing(out, [(split, name) for split, *_, name in plan], config.challenges)
    volumes: dict[Path, np.ndarray] = {}
    rows: list[dict[str, object]] = []
    for split, volume_seed, source, path, name in plan:
        if path not in volumes:
            volumes[path] = _load(path)
        rng = np.random.default_rng(volume_seed)
        images = _slices(volumes[path], ranges[split], config, rng)
        for challenge in config.challenges:
            rows += _write_volume(
                out, name, split, challenge, source, images, config, rng, overwrite, progress
            )
    manifest = out / MANIFEST_NAME
    _write_manifest(manifest, rows)
    return BuildResult(manifest, rows, notes)


def _refuse_existing(
    out: Path, files: Sequence[tuple[str, str]], challenges: Sequence[str]
) -> None:
    """Raise before writing anything if one of the planned files exists."""
    for split, name in files:
        suffixes = ("test", "test_full") if split == "test" else (split,)
        for challenge in challenges:
            for suffix in suffixes:
                path = out / f"{challenge}_{suffix}" / name
                if path.exists():
                    raise InputError(f"{path}: exists; pass overwrite to replace it")
    if (out / MANIFEST_NAME).exists():
        raise InputError(f"{out / MANIFEST_NAME}: exists; pass overwrite to replace it")


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types for a bad file
        raise InputError(f"{path}: cannot read NIfTI volume ({err})") from None


def _slices(
    volume: np.ndarray,
    z_range: tuple[float, float],
    config: KSpaceSetConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """``slices`` axial images ``(slices, matrix, matrix)`` in [0, 1], anterior up."""
    from scipy.ndimage import zoom

    depth = volume.shape[2]
    start, stop = z_range[0] * depth, z_range[1] * depth
    jitter = rng.uniform(-0.5, 0.5) * (stop - start) / max(config.slices, 1)
    positions = np.linspace(start, stop, config.slices + 2)[1:-1] + jitter
    indices = np.clip(np.round(positions).astype(int), 0, depth - 1)
    scale = np.percentile(volume, 99.5)
    out = np.empty((config.slices, config.matrix, config.matrix), np.float32)
    for i, z in enumerate(indices):
        image = np.rot90(volume[:, :, z])  # (A-P rows, R-L columns), anterior up
        side = max(image.shape)
        square = np.zeros((side, side), np.float32)
        top, left = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
        square[top : top + image.shape[0], left : left + image.shape[1]] = image
        resized = zoom(square, config.matrix / side, order=3, grid_mode=True, mode="grid-constant")
        out[i] = np.clip(resized[: config.matrix, : config.matrix] / scale, 0, None)
    return out


def _smooth_phase(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``phi(y, x) = sum_k a_k cos(2 pi (u_k y + v_k x) + c_k)`` with frequencies below 1.5
    cycles per field of view; amplitudes sum to at most pi."""
    y, x = np.meshgrid(*(np.linspace(-0.5, 0.5, n) for n in shape), indexing="ij")
    phase = np.zeros(shape)
    amplitudes = rng.dirichlet(np.ones(4)) * rng.uniform(0.5, np.pi)
    for amplitude in amplitudes:
        u, v = rng.uniform(-1.5, 1.5, size=2)
        phase += amplitude * np.cos(2 * np.pi * (u * y + v * x) + rng.uniform(0, 2 * np.pi))
    return phase


def _noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Complex Gaussian noise ``sigma L w`` correlated over axis 0 (coils)."""
    coils = shape[0]
    mixing = rng.standard_normal((coils, coils)) + 1j * rng.standard_normal((coils, coils))
    covariance = np.eye(coils) + 0.3 * (mixing @ mixing.conj().T) / coils
    scale = np.sqrt(np.real(np.diag(covariance)))
    covariance /= np.outer(scale, scale)  # unit variance per coil
    chol = np.linalg.cholesky(covariance)
    white = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)
    return sigma * np.einsum("cd,d...->c...", chol, white)


def _write_volume(
    out: Path,
    name: str,
    split: str,
    challenge: str,
    source: Source,
    images: np.ndarray,
    config: KSpaceSetConfig,
    rng: np.random.Generator,
    overwrite: bool,
    progress: Callable[[str], None] | None,
) -> list[dict[str, object]]:
    n = config.matrix
    multicoil = challenge == "multicoil"
    coils = int(rng.integers(config.coils[0], config.coils[1] + 1)) if multicoil else 1
    if multicoil:
        gains = rng.uniform(0.8, 1.2, coils) * np.exp(1j * rng.uniform(0, 2 * np.pi, coils))
        maps = birdcage_maps(coils, (n, n), dtype=torch.complex128).numpy()
        maps = maps * gains[:, None, None]
    else:
        maps = np.ones((1, n, n), complex)
    kspace = np.empty((config.slices, coils, 2 * n, n), np.complex64)
    targets = np.empty((config.slices, n, n), np.float32)
    for i, image in enumerate(images):
        complex_image = image * np.exp(1j * _smooth_phase((n, n), rng))
        coil_images = np.zeros((coils, 2 * n, n), complex)
        coil_images[:, n // 2 : n // 2 + n] = maps * complex_image
        sigma = config.noise * np.abs(coil_images).max()
        k = fft2c(torch.from_numpy(coil_images)).numpy() + _noise(coil_images.shape, sigma, rng)
        kspace[i] = k
        noisy = ifft2c(torch.from_numpy(k))
        targets[i] = center_crop(rss(noisy, dim=0), (n, n)).numpy()
    if not multicoil:
        kspace = kspace[:, 0]
    header = KSpaceHeader((2 * n, n, 1), (n, n, 1), n // 2, n - 1, coils if multicoil else None)
    patient = hashlib.sha256(f"{source.subject}:{config.seed}".encode()).hexdigest()[:16]
    attrs = {
        "acquisition": source.acquisition,
        "max": float(targets.max()),
        "norm": float(np.linalg.norm(targets)),
        "patient_id": patient,
    }
    target_key = "reconstruction_rss" if multicoil else "reconstruction_esc"
    folder = out / f"{challenge}_{split}"
    row = {
        "split": split,
        "challenge": challenge,
        "subject": source.subject,
        "anatomy": source.anatomy,
        "acquisition": source.acquisition,
        "slices": config.slices,
        "coils": coils,
        "height": 2 * n,
        "width": n,
        "acceleration": "",
        "num_low_frequency": "",
        "sampled_fraction": "",
        "target_file": "",
    }
    if split != "test":
        _emit(progress, folder / name)
        _write(folder / name, kspace, header, attrs, {target_key: targets}, overwrite)
        return [{"file": f"{folder.name}/{name}", **row}]
    full = out / f"{challenge}_test_full"
    _emit(progress, full / name)
    _write(full / name, kspace, header, attrs, {target_key: targets}, overwrite)
    mask_func = create_mask_func(config.mask_type, config.center_fractions, config.accelerations)
    mask, num_low, acceleration = mask_func(kspace.shape, seed=seed_from_name(name))
    columns = mask.flatten().numpy()
    test_attrs = {**attrs, "acceleration": int(acceleration), "num_low_frequency": num_low}
    _emit(progress, folder / name)
    masked = (kspace * columns).astype(np.complex64)
    _write(folder / name, masked, header, test_attrs, {"mask": columns > 0}, overwrite)
    full_row = {"file": f"{full.name}/{name}", **row, "split": "test_full"}
    test_row = {
        "file": f"{folder.name}/{name}",
        **row,
        "acceleration": int(acceleration),
        "num_low_frequency": num_low,
        "sampled_fraction": round(sampled_fraction(mask), 6),
        "target_file": f"{full.name}/{name}",
    }
    return [full_row, test_row]


def _write(
    path: Path,
    kspace: np.ndarray,
    header: KSpaceHeader,
    attrs: dict[str, object],
    datasets: dict[str, np.ndarray],
    overwrite: bool,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_kspace_file(path, kspace, header, attrs, datasets, overwrite=overwrite)


def _emit(progress: Callable[[str], None] | None, path: Path) -> None:
    if progress is not None:
        progress(f"{path.parent.name}/{path.name}")


def _write_manifest(path: Path, rows: Sequence[dict[str, object]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
