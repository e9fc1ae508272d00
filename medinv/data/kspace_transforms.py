"""MONAI transforms and a dataset for the k-space path (fastMRI files -> i-RIM inputs).

Each transform has an array form and a dictionary form (``...d``, with ``keys`` and
``allow_missing_keys``), as in MONAI. Items of :class:`KSpaceSliceDataset` are dictionaries:

- ``kspace``: complex64 ``([C,] H, W)`` (a slice) or ``(S, [C,] H, W)`` (a slab or a volume);
- ``target``: float32 ``(h, w)`` / ``(S, h, w)`` where the file has one;
- ``mask``: float32 ``(W,)`` where the file has one (test files);
- ``filename``, ``slice`` (the slice, a slab's first slice, -1 for a volume), ``padding``
  (acquired columns ``[left, right)`` from the header), ``attrs`` (the file's attributes).

A typical training pipeline::

    Compose([
        KSpaceMaskd("kspace", RandomMaskFunc([0.08], [4])),
        ZeroFilledd("kspace", output_key="zero_filled"),
        NormalizeKSpaced("kspace", reference_key="zero_filled", other_keys=("target",)),
    ])
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from torch.utils.data import Dataset

from medinv.errors import InputError
from medinv.mri.fft import center_crop, ifft2c, rss
from medinv.mri.io import KSpaceFile
from medinv.mri.masks import MaskFunc, Seed, apply_mask, seed_from_name


class KSpaceMask(Transform):
    """Undersample k-space ``([C,] H, W)``: ``y = M k``, columns outside ``padding`` unsampled.

    Args:
        mask_func: draws the mask.
    """

    def __init__(self, mask_func: MaskFunc) -> None:
        self.mask_func = mask_func

    def __call__(
        self, kspace: torch.Tensor, seed: Seed = None, padding: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns ``(masked k-space, mask (W,), num_low_frequencies)``."""
        masked, mask, num_low = apply_mask(kspace, self.mask_func, seed=seed, padding=padding)
        return masked, mask.flatten(), num_low


class KSpaceMaskd(MapTransform):
    """Dictionary form of :class:`KSpaceMask`.

    The seed is :func:`~medinv.mri.masks.seed_from_name` of ``data["filename"]`` when
    ``use_seed`` (every slice of a volume gets the same mask, as in fastMRI); the header's
    ``data["padding"]`` is respected. An item that already holds a ``mask`` (a test file)
    keeps it. Writes ``mask`` (float32 ``(W,)``) and ``num_low_frequencies``.

    Args:
        keys: k-space keys.
        mask_func: draws the mask.
        use_seed: seed from the file name; otherwise the mask function's own generator.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_func: MaskFunc,
        use_seed: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.masker = KSpaceMask(mask_func)
        self.use_seed = use_seed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if d.get("mask") is not None:
                d[key] = d[key] * d["mask"].to(d[key].real.dtype)
                d.setdefault("num_low_frequencies", d.get("attrs", {}).get("num_low_frequency"))
                continue
            seed = seed_from_name(d["filename"]) if self.use_seed else None
            d[key], d["mask"], d["num_low_frequencies"] = self.masker(
                d[key], seed=seed, padding=d.get("padding")
            )
        return d


class ZeroFilled(Transform):
    """Zero-filled image of k-space ``([C,] H, W)``: ``F^H y``, then RSS over coils
    (``combine="rss"``, real ``(H, W)``) or not (``combine=None``, complex), optionally
    centre-cropped to ``crop``.

    Args:
        combine: ``"rss"`` or ``None``.
        crop: ``(h, w)`` or ``None``.
        coil_dim: the coil axis of multi-coil input, ``None`` for single-coil
            (then ``"rss"`` takes the magnitude).
    """

    def __init__(
        self,
        combine: str | None = "rss",
        crop: Sequence[int] | None = None,
        coil_dim: int | None = -3,
    ) -> None:
        if combine not in ("rss", None):
            raise ValueError(f"combine must be 'rss' or None, got {combine!r}")
        self.combine, self.crop, self.coil_dim = combine, crop, coil_dim

    def __call__(self, kspace: torch.Tensor) -> torch.Tensor:
        image = ifft2c(kspace)
        if self.combine == "rss":
            image = rss(image, dim=self.coil_dim) if self.coil_dim is not None else image.abs()
        return center_crop(image, self.crop) if self.crop is not None else image


class ZeroFilledd(MapTransform):
    """Dictionary form of :class:`ZeroFilled`; writes to ``output_key`` (default: in place).

    Multi-coil is recognised per item by the rank of k-space: ``kspace.ndim`` of 3 for a
    slice (``(C, H, W)``), 4 for a volume (``(S, C, H, W)``) when ``volume`` is set.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str | None = None,
        combine: str | None = "rss",
        crop: Sequence[int] | None = None,
        volume: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_key, self.combine, self.crop, self.volume = output_key, combine, crop, volume

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            multicoil = d[key].ndim == (4 if self.volume else 3)
            transform = ZeroFilled(self.combine, self.crop, -3 if multicoil else None)
            d[self.output_key or key] = transform(d[key])
        return d


class NormalizeKSpace(Transform):
    """Divide k-space by ``scale = max |reference|`` (e.g. its zero-filled image).

    Args:
        eps: lower bound of the scale.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps

    def __call__(
        self, kspace: torch.Tensor, reference: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(kspace / scale, scale)``."""
        scale = _peak(reference, self.eps)
        return kspace / scale, scale


class NormalizeKSpaced(MapTransform):
    """Divide k-space and related images by one scale per item, recorded in ``scale``.

    The scale is ``max |data[reference_key]|`` (e.g. the zero-filled image), so the network
    sees inputs of unit peak; the same factor applies to ``keys`` and ``other_keys`` (the
    target, the zero-filled image), which keeps ``y = A x`` consistent. Multiply by ``scale``
    to return to file units.

    Args:
        keys: k-space keys.
        reference_key: the image whose peak sets the scale.
        other_keys: further keys divided by the same scale, where present.
        eps: lower bound of the scale.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str = "zero_filled",
        other_keys: Sequence[str] = ("target", "zero_filled"),
        eps: float = 1e-12,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key, self.other_keys, self.eps = reference_key, tuple(other_keys), eps

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scale = _peak(d[self.reference_key], self.eps)
        for key in [*self.key_iterator(d), *(k for k in self.other_keys if k in d)]:
            d[key] = d[key] / scale
        d["scale"] = scale
        return d


class ComplexCenterCrop(Transform):
    """Centre-crop the last two axes of a real or complex tensor to ``size`` with fastMRI's
    window (see :class:`ComplexCenterCropd`)."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(size)

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        return center_crop(data, self.size)


class ComplexCenterCropd(MapTransform):
    """Centre-crop the last two axes of real or complex tensors with fastMRI's window.

    MONAI's ``CenterSpatialCropd`` starts the window at ``n // 2 - m // 2``; fastMRI (and the
    targets in its files) at ``(n - m) // 2``. They differ when ``n - m`` is odd, so this
    transform keeps fastMRI's convention (:func:`medinv.mri.fft.center_crop`).
    """

    def __init__(
        self, keys: KeysCollection, size: Sequence[int], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cropper = ComplexCenterCrop(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key])
        return d


def sharpening_filter(shape: Sequence[int], strength: float) -> torch.Tensor:
    """``1 + strength * r^2`` on a centred k-space grid ``(H, W)``: ``r`` is the distance
    from the centre with each axis's Nyquist frequency at 1, over sqrt(2), so the filter is
    1 at the centre and ``1 + strength`` at the corners."""
    h, w = shape
    ky = (torch.arange(h, dtype=torch.float64) - h // 2) / (h / 2)
    kx = (torch.arange(w, dtype=torch.float64) - w // 2) / (w / 2)
    return 1 + strength * (ky[:, None] ** 2 + kx[None, :] ** 2) / 2


class RandKSpaceSharpend(RandomizableTransform, MapTransform):
    """Training augmentation: emphasise fine detail at random, data and target alike.

    With probability ``prob``, the fully sampled k-space is multiplied by
    :func:`sharpening_filter` with a strength drawn uniformly from ``[0, max_strength]``,
    and the target is recomputed from it. Sets made from smooth average templates (``medinv
    data kspace``) carry less fine detail than a single subject's scan; this lets a model
    see more of it in training. The same filter on every coil is the filter applied to each
    coil image, so the augmented k-space is still a consistent acquisition.

    The target must be what fastMRI's files hold: the RSS (multi-coil) or magnitude
    (single-coil) of the k-space's inverse FFT, centre-cropped. Each augmented item is
    checked, and an item whose target is something else raises :class:`InputError` rather
    than train on an inconsistent pair.

    Args:
        keys: the k-space key, one (the target follows one k-space): a slice
            ``([C,] H, W)`` or slab ``(S, [C,] H, W)``, before undersampling.
        multicoil: whether the k-space has a coil axis (third from last).
        target_key: the target ``([S,] h, w)``.
        prob: share of items augmented.
        max_strength: the largest strength drawn.
    """

    #: The largest relative difference between a file's target and its recomputation.
    TOLERANCE = 1e-3

    def __init__(
        self,
        keys: KeysCollection,
        multicoil: bool,
        target_key: str = "target",
        prob: float = 0.5,
        max_strength: float = 3.0,
        allow_missing_keys: bool = False,
    ) -> None:
        if max_strength < 0:
            raise ValueError(f"max_strength must be non-negative, got {max_strength}")
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(
                f"one k-space key, whose target is recomputed, got {len(self.keys)}: {self.keys}"
            )
        self.multicoil, self.target_key, self.max_strength = multicoil, target_key, max_strength
        self.strength = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.strength = float(self.R.uniform(0.0, self.max_strength))

    def target_of(self, kspace: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The fastMRI target of fully sampled ``kspace``, cropped to ``shape``: its
        zero-filled RSS (or magnitude) image."""
        return ZeroFilled(crop=shape, coil_dim=-3 if self.multicoil else None)(kspace)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform or self.strength == 0.0:
            return d
        target = d[self.target_key]
        for key in self.key_iterator(d):
            kspace = d[key]
            own = self.target_of(kspace, target.shape[-2:])
            difference = float((own - target).norm() / target.norm().clamp_min(1e-30))
            if difference > self.TOLERANCE:
                kind = "RSS" if self.multicoil else "magnitude"
                raise InputError(
                    f"{d.get('filename', 'an item')}: its target is not the {kind} of its "
                    f"k-space's inverse FFT (relative difference {difference:.2g}), so k-space "
                    "sharpening cannot recompute it; set data.sharpen to 0"
                )
            filtered = kspace * sharpening_filter(kspace.shape[-2:], self.strength).to(
                kspace.real.dtype
            )
            d[key] = filtered
            d[self.target_key] = self.target_of(filtered, target.shape[-2:]).to(target.dtype)
        return d


def slab_starts(num_slices: int, slab: int, stride: int | None = None) -> list[int]:
    """First slices of the slabs of ``slab`` consecutive slices that cover ``num_slices``.

    Slabs start every ``stride`` slices (default ``slab``: no overlap); where these stop
    short of the end, one more slab is aligned to the end, so it overlaps its predecessor
    and every slice lies in at least one slab (e.g. 10 slices in slabs of 4: 0, 4, 6).

    Raises:
        ValueError: ``slab < 1``, ``stride`` outside ``[1, slab]``, or fewer slices than
            a slab.
    """
    stride = slab if stride is None else stride
    if slab < 1 or not 1 <= stride <= slab:
        raise ValueError(f"need slab >= 1 and 1 <= stride <= slab, got {slab} and {stride}")
    if num_slices < slab:
        raise ValueError(f"{num_slices} slices, fewer than a slab of {slab}")
    starts = list(range(0, num_slices - slab + 1, stride))
    if starts[-1] + slab < num_slices:
        starts.append(num_slices - slab)
    return starts


class KSpaceSliceDataset(Dataset):
    """Slices, slabs of adjacent slices, or whole volumes of fastMRI files, read lazily.

    Opening the dataset reads each file's header only; an item opens its file, reads one
    slice (or each slice of the slab or volume in turn) and closes it, so workers never
    share file handles. Slabs of a file are laid out by :func:`slab_starts`, in order.

    Args:
        files: ``.h5`` files, or one folder whose ``*.h5`` files are used.
        transform: applied to each item dictionary (e.g. a MONAI ``Compose``).
        volumes: yield whole volumes instead of slices.
        slab: yield slabs of this many consecutive slices instead of slices (3D models).
        stride: first slices of consecutive slabs this far apart (default ``slab``).

    Raises:
        InputError: a file is not a valid fastMRI file, or has fewer slices than ``slab``
            (one line naming it).
        ValueError: both ``volumes`` and ``slab``, or an invalid ``slab`` or ``stride``.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        transform: Any = None,
        volumes: bool = False,
        slab: int | None = None,
        stride: int | None = None,
    ) -> None:
        if isinstance(files, (str, os.PathLike)):
            folder = Path(files)
            paths = sorted(folder.glob("*.h5")) if folder.is_dir() else [folder]
        else:
            paths = [Path(f) for f in files]
        if volumes and slab is not None:
            raise ValueError("a dataset yields volumes or slabs, not both")
        self.transform, self.volumes, self.slab = transform, volumes, slab
        self.index: list[tuple[Path, int | None]] = []
        for path in paths:
            with KSpaceFile(path) as f:
                num_slices = f.num_slices
            if volumes:
                starts: list[int | None] = [None]
            elif slab is None:
                starts = list(range(num_slices))
            elif num_slices < slab:
                raise InputError(f"{path}: {num_slices} slices, fewer than a slab of {slab}")
            else:
                starts = slab_starts(num_slices, slab, stride)
            self.index += [(path, s) for s in starts]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[Hashable, Any]:
        path, start = self.index[i]
        stacked = start is None or self.slab is not None
        with KSpaceFile(path) as f:
            if start is None:
                indices = range(f.num_slices)
            else:
                indices = range(start, start + (self.slab or 1))
            kspace = [f.kspace(s) for s in indices]
            item: dict[Hashable, Any] = {
                "filename": path.name,
                "slice": -1 if start is None else start,
                "padding": f.header.padding,
                "attrs": f.attrs,
            }
            if f.target_key is not None:
                targets = [f.target(s) for s in indices]
                item["target"] = torch.stack(targets) if stacked else targets[0]
            mask = f.mask()
            if mask is not None:
                item["mask"] = mask
        item["kspace"] = torch.stack(kspace) if stacked else kspace[0]
        return self.transform(item) if self.transform is not None else item


def _peak(reference: torch.Tensor, eps: float) -> torch.Tensor:
    return reference.abs().max().clamp_min(eps)
