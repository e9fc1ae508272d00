"""Cartesian undersampling masks with fastMRI semantics.

A mask keeps whole phase-encode columns (the last axis of k-space). Of ``N`` columns it
keeps the ``round(N * center_fraction)`` central ones, and a subset of the others chosen so
that about ``N / acceleration`` columns are kept in all. Seeding a call with
:func:`seed_from_name` of the file name gives every slice of a volume the same mask, and the
same mask fastMRI's ``MaskFunc`` gives for that name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

Seed = int | tuple[int, ...] | None


class Mask(NamedTuple):
    """A sampled mask: ``mask`` float32 ``(1, ..., 1, W)`` of zeros and ones, how many
    central columns it keeps (``num_low_frequencies``) and the nominal ``acceleration``
    drawn for it."""

    mask: torch.Tensor
    num_low_frequencies: int
    acceleration: float


def seed_from_name(name: str) -> tuple[int, ...]:
    """fastMRI's per-volume seed: the code points of the file name (``"file1.h5"``)."""
    return tuple(ord(char) for char in name)


def sampled_fraction(mask: torch.Tensor) -> float:
    """The fraction of k-space columns a mask keeps (``1 / effective acceleration``)."""
    return float(mask.float().mean())


class MaskFunc:
    """Base of the column masks: a fully sampled centre plus an outer pattern.

    For ``N`` columns the centre keeps ``n_low = round(N * center_fraction)`` columns
    starting at ``(N - n_low + 1) // 2``; subclasses choose the outer columns. Each call
    draws one ``(center_fraction, acceleration)`` pair uniformly from the given lists
    (paired by position, or any combination with ``allow_any_combination``).

    Args:
        center_fractions: fractions of columns kept in the centre, e.g. ``[0.08, 0.04]``.
        accelerations: nominal accelerations, e.g. ``[4, 8]``.
        allow_any_combination: draw fraction and acceleration independently.
        seed: seed of the generator used by calls without their own ``seed``.

    Raises:
        ValueError: the lists are empty, or of different lengths without
            ``allow_any_combination``, or hold a fraction outside (0, 1] or an
            acceleration below 1.
    """

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[float],
        allow_any_combination: bool = False,
        seed: Seed = None,
    ) -> None:
        if not center_fractions or not accelerations:
            raise ValueError("center_fractions and accelerations must not be empty")
        if len(center_fractions) != len(accelerations) and not allow_any_combination:
            raise ValueError(
                "center_fractions and accelerations must have the same length "
                "unless allow_any_combination is set"
            )
        if any(not 0 < f <= 1 for f in center_fractions):
            raise ValueError(f"center fractions must lie in (0, 1], got {center_fractions}")
        if any(a < 1 for a in accelerations):
            raise ValueError(f"accelerations must be at least 1, got {accelerations}")
        self.center_fractions = list(center_fractions)
        self.accelerations = list(accelerations)
        self.allow_any_combination = allow_any_combination
        self.rng = np.random.RandomState(seed)

    def __call__(self, shape: Sequence[int], offset: int | None = None, seed: Seed = None) -> Mask:
        """Sample a mask for complex k-space of ``shape`` ``(*, H, W)``.

        Args:
            shape: the k-space shape ``(*, W)``; the mask selects along its last axis.
            offset: first outer column of equispaced patterns; random if ``None``.
            seed: seed for this call only (e.g. :func:`seed_from_name`); the generator of
                the instance is used and advanced if ``None``.

        Returns:
            The :class:`Mask`, broadcastable against ``shape``.
        """
        if len(shape) < 1:
            raise ValueError("k-space shape needs at least one axis")
        rng = self.rng if seed is None else np.random.RandomState(seed)
        num_cols = int(shape[-1])
        center_fraction, acceleration = self._choose(rng)
        num_low = round(num_cols * center_fraction)
        center = np.zeros(num_cols, dtype=np.float32)
        start = (num_cols - num_low + 1) // 2
        center[start : start + num_low] = 1
        outer = self.outer_mask(rng, num_cols, acceleration, offset, num_low)
        columns = np.maximum(center, outer.astype(np.float32))
        mask = torch.from_numpy(columns).reshape(*([1] * (len(shape) - 1)), num_cols)
        return Mask(mask, num_low, acceleration)

    def outer_mask(
        self,
        rng: np.random.RandomState,
        num_cols: int,
        acceleration: float,
        offset: int | None,
        num_low_frequencies: int,
    ) -> np.ndarray:
        """The outer columns, a 0/1 vector of length ``num_cols``; defined by subclasses."""
        raise NotImplementedError

    def _choose(self, rng: np.random.RandomState) -> tuple[float, float]:
        if self.allow_any_combination:
            return rng.choice(self.center_fractions), rng.choice(self.accelerations)
        choice = rng.randint(len(self.center_fractions))
        return self.center_fractions[choice], self.accelerations[choice]


class RandomMaskFunc(MaskFunc):
    """Centre plus outer columns drawn independently at random.

    Each of the ``N - n_low`` outer columns is kept with probability
    ``p = (N / acceleration - n_low) / (N - n_low)``, so that ``N / acceleration`` columns
    are kept in expectation.
    """

    def outer_mask(
        self,
        rng: np.random.RandomState,
        num_cols: int,
        acceleration: float,
        offset: int | None,
        num_low_frequencies: int,
    ) -> np.ndarray:
        prob = (num_cols / acceleration - num_low_frequencies) / (num_cols - num_low_frequencies)
        return rng.uniform(size=num_cols) < prob


class EquispacedMaskFunc(MaskFunc):
    """Centre plus every ``acceleration``-th column from ``offset`` (GRAPPA-style).

    The centre adds to the equispaced columns, so the kept fraction exceeds
    ``1 / acceleration``.
    """

    def outer_mask(
        self,
        rng: np.random.RandomState,
        num_cols: int,
        acceleration: float,
        offset: int | None,
        num_low_frequencies: int,
    ) -> np.ndarray:
        if offset is None:
            offset = rng.randint(0, high=round(acceleration))
        mask = np.zeros(num_cols, dtype=np.float32)
        mask[offset :: int(acceleration)] = 1
        return mask


class EquispacedMaskFractionFunc(MaskFunc):
    """Centre plus columns at a spacing chosen so that ``N / acceleration`` are kept in all.

    The outer spacing is ``a' = acceleration (n_low - N) / (n_low acceleration - N)``;
    positions ``offset + k a'`` (``< N - 1``) are rounded to the nearest column, so the
    pattern is only approximately equispaced, as in fastMRI's multi-coil data.
    """

    def outer_mask(
        self,
        rng: np.random.RandomState,
        num_cols: int,
        acceleration: float,
        offset: int | None,
        num_low_frequencies: int,
    ) -> np.ndarray:
        adjusted = (acceleration * (num_low_frequencies - num_cols)) / (
            num_low_frequencies * acceleration - num_cols
        )
        if offset is None:
            offset = rng.randint(0, high=round(adjusted))
        mask = np.zeros(num_cols, dtype=np.float32)
        positions = np.around(np.arange(offset, num_cols - 1, adjusted)).astype(np.int64)
        mask[positions] = 1
        return mask


MASK_TYPES: dict[str, type[MaskFunc]] = {
    "random": RandomMaskFunc,
    "equispaced": EquispacedMaskFunc,
    "equispaced_fraction": EquispacedMaskFractionFunc,
}


def create_mask_func(
    mask_type: str,
    center_fractions: Sequence[float],
    accelerations: Sequence[float],
    seed: Seed = None,
) -> MaskFunc:
    """The mask function named ``mask_type``.

    Args:
        mask_type: ``"random"``, ``"equispaced"`` or ``"equispaced_fraction"``.
        center_fractions: see :class:`MaskFunc`.
        accelerations: see :class:`MaskFunc`.
        seed: seed of the function's own generator.

    Returns:
        The :class:`MaskFunc`.

    Raises:
        ValueError: an unknown ``mask_type``.
    """
    try:
        cls = MASK_TYPES[mask_type]
    except KeyError:
        known = ", ".join(MASK_TYPES)
        raise ValueError(f"unknown mask type '{mask_type}'; known: {known}") from None
    return cls(center_fractions, accelerations, seed=seed)


def apply_mask(
    kspace: torch.Tensor,
    mask_func: MaskFunc,
    seed: Seed = None,
    offset: int | None = None,
    padding: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Undersample ``kspace`` ``(*, H, W)``: ``y = M k``.

    Args:
        kspace: complex k-space.
        mask_func: draws the mask.
        seed: per-call seed, e.g. ``seed_from_name(path.name)``.
        offset: passed to the mask function.
        padding: ``(left, right)``: columns outside ``[left, right)`` are zero-padding of
            the acquisition (from the header) and are never marked as sampled.

    Returns:
        ``(masked k-space, mask (1, ..., 1, W), num_low_frequencies)``.
    """
    mask, num_low, _ = mask_func(tuple(kspace.shape), offset=offset, seed=seed)
    if padding is not None:
        mask = mask.clone()
        mask[..., : padding[0]] = 0
        mask[..., padding[1] :] = 0
    return kspace * mask.to(kspace.device), mask, num_low
