"""The memory planner: how to run a model on inputs of any size within a memory budget.

Given a budget (``16GiB``, ``auto``) less a safety margin, and a memory model of the step
calibrated on the device (:mod:`medinv.inference.memory_model`), a plan chooses, in order
of preference:

- segmentation: the whole volume at once (padded up to a multiple of ``bucket`` voxels per
  axis where one is given); else MONAI's sliding window with the largest ROI
  (a multiple of the model's stride, at most the volume padded up to it), then the largest
  window batch, with the stitched output on the device, else in CPU memory; fp32 first,
  bf16 autocast only where fp32 cannot fit (or when asked);
- reconstruction: the largest batch of slices (2D models) or of slabs (3D models);
- training: the largest (cubic-ish) crop.

:meth:`Planner.run` runs a plan and, when the device runs out of memory all the same, frees
it and retries ever smaller plans, one log line per retry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from medinv.data.kspace_transforms import slab_starts
from medinv.errors import InputError, ResourceError

from .memory_model import Calibration, Mode, calibrate
from .peak import release_memory
from .plans import (
    ReconstructionPlan,
    SegmentationPlan,
    TrainingPlan,
    format_bytes,
    rounded_up,
    size_text,
)
from .workloads import Reconstructor, Segmenter, check_bucket, workload

_FLOAT = 4  # bytes of the float32 maps that inference keeps (inputs, outputs, weights)
T = TypeVar("T")
AnyPlan = TypeVar("AnyPlan", SegmentationPlan, ReconstructionPlan)


class Planner:
    """Plans for one model on one device within a memory budget.

    Args:
        model: the model; on ``device`` for inference plans (it is run to calibrate).
        device: where it runs.
        budget: bytes the process may use there (:func:`resolve_budget`); None: no limit.
        margin: the fraction of the budget left free (allocator fragmentation, workspaces).
        precision: ``"fp32"`` or ``"bf16"`` for inference whatever fits; None: fp32, and
            bf16 autocast only where fp32 cannot fit.
        cache_dir: also keep calibrations there (JSON files).
        log: receives one line per out-of-memory retry.
        min_roi: the smallest window edge worth stitching on the device; below it the
            output is stitched in CPU memory instead.
        max_sw_batch: the most windows per model call.
        bucket: whole volumes run zero-padded up to a multiple of this many voxels per axis
            (a multiple of the model's stride; :func:`~medinv.inference.plans.rounded_up`).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        budget: int | None,
        margin: float = 0.1,
        precision: str | None = None,
        cache_dir: Path | None = None,
        log: Callable[[str], None] | None = None,
        min_roi: int = 64,
        max_sw_batch: int = 4,
        bucket: int | None = None,
    ):
        if not 0 <= margin < 1:
            raise InputError(f"the safety margin must be in [0, 1), got {margin}")
        if precision not in (None, "fp32", "bf16"):
            raise InputError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model, self.device, self.budget, self.margin = model, device, budget, margin
        self.precision, self.cache_dir = precision, cache_dir
        self.log = log or logging.getLogger(__name__).warning
        self.min_roi, self.max_sw_batch = min_roi, max_sw_batch
        self.work = workload(model)
        if bucket is not None and not isinstance(self.work, Segmenter):
            raise InputError("a bucket pads whole volumes for segmenters; this is a reconstructor")
        check_bucket(model, bucket)
        self.bucket = bucket
        self._calibrations: dict[tuple, Calibration] = {}
        self.used: list[SegmentationPlan | ReconstructionPlan] = []  # by :meth:`run`
        self.retries = 0

    @property
    def limit(self) -> int | None:
        """The usable bytes: the budget less the margin."""
        return None if self.budget is None else int(self.budget * (1 - self.margin))

    def calibration(self, mode: Mode, precision: str, coils: int | None = None) -> Calibration:
        """The model's calibrated step (measured once per mode, precision and coils)."""
        key = (mode, precision, coils)
        if key not in self._calibrations:
            self._calibrations[key] = calibrate(
                self.model, self.device, mode, precision, coils, self.cache_dir
            )
        return self._calibrations[key]

    # -- segmentation --------------------------------------------------------------------

    def plan_segmentation(
        self, shape: Sequence[int], overlap: float = 0.5, tta: bool = False
    ) -> SegmentationPlan:
        """The preferred plan for a volume of spatial ``shape`` that fits (see the module)."""
        shape = tuple(shape)
        segmenter = self._segmenter()
        padded, floor, smallest = self._bounds(shape)
        stitching = [(False, floor if self.device.type == "cuda" else smallest)]
        if self.device.type == "cuda":
            stitching.append((True, smallest))
        plan = None
        for precision in [self.precision] if self.precision else ["fp32", "bf16"]:
            plan = self._segmentation(shape, None, 1, False, precision, tta)
            # a network that does not pad its input itself takes only multiples of its stride
            if plan.fits and (segmenter.pads_inputs or shape == padded or self.bucket):
                return plan
            for on_cpu, lowest in stitching:
                roi = _largest_roi(
                    lambda r, on_cpu=on_cpu, p=precision: (
                        self._segmentation(shape, r, 1, on_cpu, p, tta).fits
                    ),
                    padded,
                    lowest,
                    segmenter.stride,
                )
                if roi is not None:
                    plan = self._segmentation(shape, roi, 1, on_cpu, precision, tta)
                    return self._widen(plan, overlap, tta)
            plan = self._segmentation(shape, smallest, 1, stitching[-1][0], precision, tta)
        return plan

    def _widen(self, plan: SegmentationPlan, overlap: float, tta: bool) -> SegmentationPlan:
        """``plan`` with the window batch doubled while it fits and there are windows."""
        windows = _window_count(plan.shape, plan.roi_size, overlap)
        while 2 * plan.sw_batch_size <= min(self.max_sw_batch, windows):
            wider = self._segmentation(
                plan.shape,
                plan.roi_size,
                2 * plan.sw_batch_size,
                plan.stitch_on_cpu,
                plan.precision,
                tta,
            )
            if not wider.fits:
                break
            plan = wider
        return plan

    def _segmentation(self, shape, roi, sw_batch, on_cpu, precision, tta) -> SegmentationPlan:
        peak = self._segmentation_peak(shape, roi, sw_batch, on_cpu, precision, tta)
        return SegmentationPlan(
            predicted_peak=peak,
            limit=self.limit,
            shape=tuple(shape),
            roi_size=None if roi is None else tuple(roi),
            sw_batch_size=sw_batch,
            stitch_on_cpu=on_cpu,
            precision=precision,
            tta=tta,
            bucket=self.bucket,
        )

    def _segmentation_peak(self, shape, roi, sw_batch, on_cpu, precision, tta) -> int:
        """The calibrated step plus what inference holds beside it (``predict_probabilities``):
        the image (and its flipped copy with ``tta``), MONAI's stitched output and count map
        (on the device unless ``on_cpu``), the sigmoid and mean of the logits, and with
        ``tta`` the previous flip's logits and probabilities and their running sum."""
        segmenter = self._segmenter()
        calibration = self.calibration("inference", precision)
        voxels = math.prod(shape)
        image = segmenter.in_channels * voxels * _FLOAT
        output = segmenter.out_channels * voxels * _FLOAT
        flip = image if tta else 0
        if roi is None:
            # the model runs at ``whole``; padded outside it, its logits keep that size
            whole = rounded_up(shape, self.bucket) if self.bucket else self._bounds(shape)[0]
            outside = self.bucket is not None or not segmenter.pads_inputs
            logits = segmenter.out_channels * math.prod(whole if outside else shape) * _FLOAT
            logits = logits if precision == "fp32" else logits // 2
            held = logits + 2 * output if tta else 0
            step = calibration.step_peak(math.prod(whole)) + flip + held
            after = image + flip + logits + (4 if tta else 2) * output
            return calibration.resident + max(step, after)
        window = math.prod(roi)
        step = calibration.step_peak(sw_batch * window) + window * _FLOAT  # + importance map
        if on_cpu:
            return calibration.resident + step
        spanned = math.prod(max(n, r) for n, r in zip(shape, roi, strict=True))  # MONAI pads
        padding = segmenter.in_channels * spanned * _FLOAT if spanned > voxels else 0
        logits = segmenter.out_channels * spanned * _FLOAT  # stitched in float32
        held = logits + 2 * output if tta else 0
        during = padding + logits + spanned * _FLOAT + step + held  # with the count map
        after = logits + (4 if tta else 2) * output
        return calibration.resident + image + flip + max(during, after)

    def _bounds(self, shape) -> tuple[tuple[int, ...], ...]:
        """The volume padded up to the stride, the smallest ROI stitched on the device, and
        the smallest ROI at all: two strides, so that the coarsest scale keeps two voxels
        per axis for its normalisation statistics."""
        stride = self._segmenter().stride
        if len(shape) != len(stride):
            raise InputError(f"the model takes {len(stride)}D volumes, got {size_text(shape)}")
        padded = rounded_up(shape, stride)
        floor = tuple(map(min, padded, rounded_up((self.min_roi,) * len(stride), stride)))
        smallest = tuple(min(p, 2 * s) for p, s in zip(padded, stride, strict=True))
        return padded, floor, smallest

    def _segmenter(self) -> Segmenter:
        if not isinstance(self.work, Segmenter):
            raise InputError("this model is a reconstructor; plan slice batches for it instead")
        return self.work

    # -- reconstruction and training -------------------------------------------------------

    def plan_reconstruction(
        self,
        shape: Sequence[int],
        mode: Mode = "inference",
        max_batch: int | None = None,
        slab: int = 8,
        overlap: int = 0,
        precision: str = "fp32",
    ) -> ReconstructionPlan:
        """The largest batch (at most ``max_batch``) for a file of ``shape``
        ``(slices, [coils,] H, W)``: of slices for a 2D model, of the volume's slabs of
        ``slab`` slices (consecutive slabs sharing ``overlap``) for a 3D one; ``precision``
        (fp32, bf16 or fp16 autocast) of a training step."""
        shape = tuple(shape)
        if not isinstance(self.work, Reconstructor):
            raise InputError("this model is a segmenter; plan volumes for it instead")
        if len(shape) not in (3, 4):
            raise InputError(f"expected (slices, [coils,] height, width), got {shape}")
        items, depth = shape[0], None
        if self.work.dim == 3:
            depth = min(slab, shape[0])
            if not 0 <= overlap < depth:
                raise InputError(f"slab overlap must lie in [0, {depth}), got {overlap}")
            items = len(slab_starts(shape[0], depth, depth - overlap))
        cap = max(1, min(items, max_batch or items))
        batch = cap
        if self.limit is not None:
            calibration = self._reconstruction_calibration(shape, mode, precision)
            room = self.limit - calibration.resident - calibration.intercept
            per_item = calibration.slope * (depth or 1) * math.prod(shape[-2:])
            batch = int(min(cap, max(1, room // per_item))) if per_item > 0 else cap
        return self._reconstruction(shape, batch, mode, depth, precision)

    def plan_micro_batch(
        self,
        item_shape: Sequence[int],
        batch_size: int,
        slab: int = 8,
        precision: str = "fp32",
    ) -> ReconstructionPlan:
        """The training step's largest micro-batch that divides ``batch_size``, for items
        of ``item_shape`` ``([coils,] H, W)``: slices of a 2D model, slabs of ``slab``
        slices of a 3D one. Its ``batch_size`` is the micro-batch; where ``fits`` is False,
        not even one item fits."""
        if not isinstance(self.work, Reconstructor):
            raise InputError("this model is a segmenter; plan training crops for it instead")
        depth = slab if self.work.dim == 3 else 1
        shape = (batch_size * depth, *item_shape)  # room for batch_size items

        def plan(most: int) -> ReconstructionPlan:
            return self.plan_reconstruction(shape, "train", most, slab, precision=precision)

        largest = plan(batch_size)
        if not largest.fits:
            return largest
        return plan(max(n for n in range(1, largest.batch_size + 1) if batch_size % n == 0))

    def _reconstruction(
        self,
        shape,
        batch: int,
        mode: Mode = "inference",
        slab: int | None = None,
        precision: str = "fp32",
    ) -> ReconstructionPlan:
        calibration = self._reconstruction_calibration(shape, mode, precision)
        units = batch * (slab or 1) * math.prod(shape[-2:])
        return ReconstructionPlan(
            predicted_peak=calibration.resident + calibration.step_peak(units),
            limit=self.limit,
            shape=shape,
            batch_size=batch,
            slab=slab,
            precision=precision,
        )

    def _reconstruction_calibration(self, shape, mode: Mode, precision: str) -> Calibration:
        return self.calibration(mode, precision, shape[1] if len(shape) == 4 else None)

    def plan_training_crop(
        self, shape: Sequence[int], batch_size: int = 1, precision: str = "fp32"
    ) -> TrainingPlan:
        """The largest crop, at most ``shape`` padded up to the stride, whose training step
        with ``batch_size`` crops in ``precision`` (fp32, bf16 or fp16 autocast) fits."""
        stride = self._segmenter().stride
        padded, _, smallest = self._bounds(shape)
        calibration = self.calibration("train", precision)

        def plan(crop) -> TrainingPlan:
            peak = calibration.resident + calibration.step_peak(batch_size * math.prod(crop))
            return TrainingPlan(
                predicted_peak=peak,
                limit=self.limit,
                crop=tuple(crop),
                batch_size=batch_size,
                precision=precision,
            )

        crop = _largest_roi(lambda c: plan(c).fits, padded, smallest, stride)
        return plan(crop or smallest)

    # -- running with fallbacks ------------------------------------------------------------

    def smaller(self, plan: AnyPlan) -> AnyPlan | None:
        """The next plan to try after ``plan`` ran out of memory, or None when there is none:
        half the slice batch; for volumes half the window batch, else half the ROI (down to
        ``min_roi``), then stitching in CPU memory, then bf16, then half the ROI down to two
        strides."""
        if isinstance(plan, ReconstructionPlan):
            if plan.batch_size == 1:
                return None
            return self._reconstruction(
                plan.shape, plan.batch_size // 2, slab=plan.slab, precision=plan.precision
            )
        stride = self._segmenter().stride
        padded, floor, smallest = self._bounds(plan.shape)
        roi, on_cpu, precision = plan.roi_size, plan.stitch_on_cpu, plan.precision

        def make(roi, sw_batch=1, on_cpu=on_cpu, precision=precision) -> SegmentationPlan:
            return self._segmentation(plan.shape, roi, sw_batch, on_cpu, precision, plan.tta)

        if plan.sw_batch_size > 1:
            return make(roi, plan.sw_batch_size // 2)
        half = _halved(padded if roi is None else roi, smallest if roi is None else floor, stride)
        if half is not None:
            return make(half)
        roi = roi or padded
        if not on_cpu and self.device.type == "cuda":
            return make(roi, on_cpu=True)
        if precision == "fp32":
            return make(roi, precision="bf16")
        half = _halved(roi, smallest, stride)
        return None if half is None else make(half)

    def run(self, plan: AnyPlan, attempt: Callable[[AnyPlan], T], name: str) -> T:
        """``attempt(plan)``; when it runs out of memory, free the memory and retry with
        :meth:`smaller` plans, logging one line per retry. Raises :class:`ResourceError`
        when even the smallest plan does not fit."""
        try:
            while True:
                try:
                    result = attempt(plan)
                    self.used.append(plan)
                    return result
                except RuntimeError as err:  # torch.OutOfMemoryError, or MONAI's wrapping
                    if not _out_of_memory(err):
                        raise
                # out of the handler, the traceback's frames (and their tensors) are gone
                release_memory(self.device)
                smaller = self.smaller(plan)
                if smaller is None:
                    raise ResourceError(f"{name}: out of memory even with {plan.describe()}")
                self.log(
                    f"{name}: out of memory with {plan.describe()}; "
                    f"retrying with {smaller.describe()}"
                )
                self.retries += 1
                plan = smaller
        finally:
            release_memory(self.device, collect=False)

    def summary(self) -> str:
        """One line: how many inputs ran with which kind of plan, and the retries."""
        counts: dict[str, int] = {}
        for plan in self.used:
            counts[plan.kind] = counts.get(plan.kind, 0) + 1
        text = "; ".join(f"{kind} x{n}" for kind, n in counts.items()) or "nothing ran"
        budget = "no limit" if self.budget is None else f"{format_bytes(self.budget)} budget"
        return f"memory planner ({budget}): {text}; {self.retries} out-of-memory retries"


def use_cudnn_benchmark(shapes: Sequence[Sequence[int]]) -> bool:
    """Let cuDNN benchmark its kernels only when all ``shapes`` are equal (with varying
    shapes it would benchmark, and hold workspaces, anew for each); returns the setting."""
    benchmark = None not in shapes and len({tuple(s) for s in shapes}) == 1
    torch.backends.cudnn.benchmark = benchmark
    return benchmark


def _out_of_memory(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, torch.OutOfMemoryError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _largest_roi(
    fits: Callable[[tuple[int, ...]], bool],
    start: Sequence[int],
    floor: Sequence[int],
    stride: Sequence[int],
) -> tuple[int, ...] | None:
    """From ``start``, shrink the longest axis by one stride at a time (so that the ROI stays
    cubic-ish) until ``fits``; None when nothing down to ``floor`` fits."""
    roi = list(start)
    while not fits(tuple(roi)):
        axes = [a for a in range(len(roi)) if roi[a] - stride[a] >= floor[a]]
        if not axes:
            return None
        longest = max(axes, key=lambda a: roi[a])
        roi[longest] -= stride[longest]
    return tuple(roi)


def _halved(roi: Sequence[int], floor: Sequence[int], stride: Sequence[int]):
    """``roi`` with half the volume (its longest axis that can be halved, rounded down to
    the stride, not below ``floor``), or None where no axis can."""
    for axis in sorted(range(len(roi)), key=lambda a: -roi[a]):
        half = max(floor[axis], roi[axis] // 2 // stride[axis] * stride[axis])
        if half < roi[axis]:
            return tuple(half if a == axis else n for a, n in enumerate(roi))
    return None


def _window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """The number of sliding windows, as MONAI places them."""
    count = 1
    for n, r in zip(shape, roi, strict=True):
        if r >= n:
            continue
        interval = max(1, int(r * (1 - overlap)))
        count *= math.ceil((n - r) / interval) + 1
    return count
