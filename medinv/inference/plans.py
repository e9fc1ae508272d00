"""Plans: how to run a model on one input within a memory budget, and the budget itself."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medinv.errors import InputError

from .memory_model import PRECISIONS

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int | None:
    """Bytes of ``"16GiB"``, ``"32GiB"``, ``"16GB"``, ``"1.5GiB"`` or ``"4096"``; None for
    ``"auto"``."""
    value = text.strip().lower()
    if value == "auto":
        return None
    found = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?", value)
    if found is None or float(found[1]) <= 0:
        raise InputError(f"memory size {text!r}: expected e.g. 16GiB, 32GB or auto")
    return int(float(found[1]) * _UNITS[found[2] or ""])


def resolve_budget(text: str, device: torch.device) -> int | None:
    """The budget in bytes: :func:`parse_memory`, where ``auto`` is the free memory of a
    CUDA device plus what this process's allocator already holds there, and no limit (None)
    on the CPU."""
    budget = parse_memory(text)
    if budget is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    return budget


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB, or in MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def size_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def rounded_up(shape: Sequence[int], multiple: int | Sequence[int]) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of ``multiple`` per axis (one int for all axes, or
    one per axis): a model's stride, or a bucket.

    With a bucket, volumes of similar size run at one padded shape, so the CUDA allocator
    reuses its blocks from case to case and cuDNN's kernel choice carries over, for the price
    of the padded voxels.
    """
    multiples = [multiple] * len(shape) if isinstance(multiple, int) else multiple
    return tuple(-(-n // m) * m for n, m in zip(shape, multiples, strict=True))


@dataclass(frozen=True)
class Plan:
    """What every plan has: the predicted peak and the usable budget (None: no limit)."""

    predicted_peak: int
    limit: int | None

    @property
    def fits(self) -> bool:
        return self.limit is None or self.predicted_peak <= self.limit

    def _peak(self) -> str:
        peak = f"predicted peak {format_bytes(self.predicted_peak)}"
        if self.limit is None:
            return peak
        return f"{peak} of {format_bytes(self.limit)}{'' if self.fits else ', does not fit'}"


@dataclass(frozen=True)
class SegmentationPlan(Plan):
    """How to segment one volume of spatial ``shape``: whole (``roi_size`` None) or in
    windows of ``roi_size``, ``sw_batch_size`` at a time, stitched on the device or in CPU
    memory, in ``precision``, with or without flip test-time augmentation; a whole volume
    padded up to a multiple of ``bucket`` voxels per axis where one is given."""

    shape: tuple[int, ...]
    roi_size: tuple[int, ...] | None
    sw_batch_size: int
    stitch_on_cpu: bool
    precision: str
    tta: bool = False
    bucket: int | None = None

    @property
    def kind(self) -> str:
        """The strategy without the sizes, e.g. ``"sliding window, bf16"``."""
        how = "whole volume" if self.roi_size is None else "sliding window"
        if self.stitch_on_cpu and self.roi_size is not None:
            how += " stitched in CPU memory"
        return how if self.precision == "fp32" else f"{how}, {self.precision}"

    def describe(self) -> str:
        if self.roi_size is None:
            how = "whole volume"
            if self.bucket is not None:
                padded = rounded_up(self.shape, self.bucket)
                how += f" padded to {size_text(padded)}" if padded != self.shape else ""
        else:
            where = "in CPU memory" if self.stitch_on_cpu else "on the device"
            windows = f"{self.sw_batch_size} per call"
            how = f"sliding window {size_text(self.roi_size)} ({windows}), stitched {where}"
        return f"{how}, {self.precision}: {self._peak()}"

    def apply(self, settings: Any) -> Any:
        """``settings`` (a ``SegmentationSettings``) with this plan's choices."""
        return dataclasses.replace(
            settings,
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            stitch_on_cpu=self.stitch_on_cpu,
            autocast_dtype=PRECISIONS[self.precision],
            bucket=self.bucket,
        )


@dataclass(frozen=True)
class ReconstructionPlan(Plan):
    """How to reconstruct a file of ``shape`` ``(slices, [coils,] H, W)``: batches of
    ``batch_size`` slices (2D models) or of ``batch_size`` slabs of ``slab`` slices (3D)."""

    shape: tuple[int, ...]
    batch_size: int
    slab: int | None = None
    precision: str = "fp32"

    @property
    def kind(self) -> str:
        items = "slice" if self.slab is None else "slab"
        kind = f"batches of {self.batch_size} {items}{'s' if self.batch_size > 1 else ''}"
        return kind if self.slab is None else f"{kind} of {self.slab} slices"

    def describe(self) -> str:
        return f"{self.kind}, {self.precision}: {self._peak()}"


@dataclass(frozen=True)
class TrainingPlan(Plan):
    """The largest training crop for ``batch_size`` crops per step in ``precision``."""

    crop: tuple[int, ...]
    batch_size: int
    precision: str

    def describe(self) -> str:
        return (
            f"training crops {size_text(self.crop)}, batch {self.batch_size}, {self.precision}: "
            f"{self._peak()}"
        )
