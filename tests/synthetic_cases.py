"""Small synthetic inputs (BraTS-layout cases, head-like anatomy): no fetched data needed."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medinv.errors import ResourceError

MODALITIES = ("t1", "t1ce", "t2", "flair")


def tiny_segmentation_config(
    root: Path, cases: int = 3, val_fraction: float = 0.34, epochs: int = 1, **inference
) -> Path:
    """``cases`` synthetic 32x32x24 cases in ``root/cases`` and ``root/config.yaml``, a
    recipe that trains a tiny 3D iUNet on them on 16^3 crops; ``inference`` adds to the
    config's inference section (e.g. ``overlap=0.25``). Returns the config's path."""
    import yaml

    for i in range(cases):
        write_case(root / "cases", f"case{i}", shape=(32, 32, 24), seed=i)
    config = root / "config.yaml"
    recipe = {
        "task": "segment",
        "data": {"manifest": "cases", "roi_size": [16, 16, 16], "val_fraction": val_fraction},
        "model": {"channels": 4, "architecture": [1, 1, 1]},
        "train": {"epochs": epochs, "seed": 0},
        "inference": {"roi_size": [16, 16, 16], **inference},
    }
    config.write_text(yaml.safe_dump(recipe))
    return config


def write_case(root: Path, case_id: str, shape=(40, 36, 28), seed: int = 0, affine=None) -> dict:
    """A skull-stripped ellipsoid 'brain' with a tumour (core 1, oedema 2, enhancing 4).

    Returns the record a loader expects: ``{"case_id", "image": [4 paths], "label"}``.
    """
    rng = np.random.default_rng(seed)
    affine = np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    centre = rng.uniform(-0.3, 0.3, size=3)
    r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[(r < 0.45) & brain] = 2
    label[r < 0.3] = 4
    label[r < 0.18] = 1
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    contrast = {
        "t1": (1.0, 0.6, 0.3, 0.8),
        "t1ce": (1.0, 0.6, 0.4, 1.6),
        "t2": (0.5, 1.2, 1.0, 0.9),
        "flair": (0.6, 1.4, 0.8, 1.0),
    }
    paths = []
    for m in MODALITIES:
        base, oedema, core, enhancing = contrast[m]
        image = np.where(brain, base, 0.0)
        image = np.where(label == 2, oedema, image)
        image = np.where(label == 1, core, image)
        image = np.where(label == 4, enhancing, image)
        image = (image + 0.05 * rng.standard_normal(shape)) * brain
        path = folder / f"{case_id}_{m}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path)
        paths.append(str(path))
    label_path = folder / f"{case_id}_seg.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return {"case_id": case_id, "image": paths, "label": str(label_path)}


def synthetic_anatomy(tmp_path: Path, with_colin: bool = True):
    """A locator returning small head-like NIfTI volumes, different per anatomy name."""
    paths = {}
    names = ["icbm152/t1", "icbm152/t2"] + (["colin27/t1"] if with_colin else [])
    for i, name in enumerate(names):
        z, y, x = np.mgrid[:24, :30, :28]
        head = ((x - 14) / 12) ** 2 + ((y - 15) / 13) ** 2 + ((z - 12) / 11) ** 2 < 1
        texture = 1 + 0.5 * np.sin(x / (2 + i)) * np.cos(y / 3) * np.sin(z / 4 + i)
        path = tmp_path / f"{name.replace('/', '_')}.nii.gz"
        nib.save(nib.Nifti1Image((head * texture * 100).astype(np.float32).T, np.eye(4)), path)
        paths[name] = path

    def locate(name: str) -> Path:
        if name not in paths:
            raise ResourceError(f"sample anatomy '{name}' is missing")
        return paths[name]

    return locate


def tiny_kspace_set(
    tmp_path: Path,
    seed: int,
    volumes: dict[str, int],
    slices: int = 2,
    coils: tuple[int, int] = (4, 4),
) -> Path:
    """A multi-coil fastMRI-schema set (``slices`` per volume, 32x32, 4 coils or a number
    drawn per volume from ``coils``) from synthetic anatomy."""
    from medinv.data.kspace import KSpaceSetConfig, build_kspace_set

    config = KSpaceSetConfig(
        seed=seed,
        volumes=volumes,
        slices=slices,
        matrix=32,
        coils=coils,
        challenges=("multicoil",),
    )
    build_kspace_set(tmp_path / "set", config, anatomy=synthetic_anatomy(tmp_path))
    return tmp_path / "set"
