"""Calibrated memory models: the peak memory of one step, measured on the device and fitted.

A convolutional network's activation memory is proportional to the voxels it processes, so
the peak of one step is affine in ``units = batch * voxels``:
``peak(units) = intercept + slope * units`` bytes above what stays on the device between
steps (``resident``: parameters and buffers, and in training Adam's two moments).
:func:`calibrate` runs the real step (an inference forward pass, or forward, loss, backward
and optimizer step as medinv's training does) at a few small probe shapes on the actual
device, measures each peak and fits ``intercept`` and ``slope`` by least squares. A 2D
reconstructor's step also holds coil-sized k-space tensors, so it is calibrated per number of
coils and its units are ``batch * height * width``.

Calibrations are cached in memory per (model fingerprint, device, mode, precision, coils)
and, where a folder is given, as JSON files in it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from medinv.devices import describe
from medinv.errors import ConfigError, ResourceError
from medinv.io import write_atomically

from .peak import measure_peak, release_memory
from .workloads import Reconstructor, workload

Mode = Literal["inference", "train"]
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def fingerprint(model: nn.Module) -> str:
    """A hash of what a model's memory use depends on: its structure, tensor shapes and
    dtypes and memory-efficient settings (not its weights)."""
    parts = [type(model).__qualname__, repr(model)]
    parts += [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    parts += [
        f"{name}:{module.memory_efficient}"
        for name, module in model.named_modules()
        if hasattr(module, "memory_efficient")
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def resident_bytes(model: nn.Module, mode: Mode) -> int:
    """Bytes that stay on the device between steps: parameters and buffers, and in training
    Adam's two moments (gradients are freed each step and counted in the step's peak)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params * (3 if mode == "train" else 1) + buffers


@dataclass(frozen=True)
class Calibration:
    """A fitted memory model of one step: ``peak(units) = intercept + slope * units`` bytes
    above ``resident``.

    Attributes:
        fingerprint, device, mode, precision, coils: what it was measured for (``coils``:
            None for segmenters and single-coil reconstructors).
        resident: bytes that stay on the device between steps (:func:`resident_bytes`).
        intercept, slope: the least-squares fit, bytes and bytes per unit.
        probes: ``(units, measured peak bytes)`` of each probe.
    """

    fingerprint: str
    device: str
    mode: str
    precision: str
    coils: int | None
    resident: int
    intercept: float
    slope: float
    probes: tuple[tuple[int, int], ...]

    def step_peak(self, units: int) -> int:
        """Predicted peak bytes of a step over ``units`` (batch x voxels), above resident."""
        return max(0, round(self.intercept + self.slope * units))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        data["probes"] = tuple(tuple(p) for p in data["probes"])
        return cls(**data)


_CACHE: dict[tuple, Calibration] = {}


def calibrate(
    model: nn.Module,
    device: torch.device,
    mode: Mode = "inference",
    precision: str = "fp32",
    coils: int | None = None,
    cache_dir: Path | None = None,
) -> Calibration:
    """Measure ``model``'s step peak at the probe shapes on ``device`` and fit the model.

    In inference ``model`` must already be on ``device`` (it is run, not changed); training
    probes run on a copy, so the weights stay as they are.

    Args:
        mode: ``"inference"`` (a ``no_grad`` forward) or ``"train"`` (a training step).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast.
        coils: coils of a multi-coil reconstructor's input (None: single-coil).
        cache_dir: also keep calibrations there as JSON files.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    work = workload(model, coils)
    coils = coils if isinstance(work, Reconstructor) else None
    key = (fingerprint(model), describe(device), mode, precision, coils, torch.__version__)
    if key in _CACHE:
        return _CACHE[key]
    path = None
    if cache_dir is not None:
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"{name}.json"
        if path.is_file():
            try:
                _CACHE[key] = Calibration.from_json(path.read_text())
                return _CACHE[key]
            except (ValueError, TypeError, KeyError):
                pass  # an unreadable cache file is measured again and replaced
    try:
        probes = _measure_probes(model, work, device, mode, PRECISIONS[precision])
    finally:
        release_memory(device)  # the training copy and the probes' tensors
    units = np.array([u for u, _ in probes], dtype=float)
    peaks = np.array([p for _, p in probes], dtype=float)
    (intercept, slope), *_ = np.linalg.lstsq(
        np.stack([np.ones_like(units), units], 1), peaks, rcond=None
    )
    calibration = Calibration(
        fingerprint=key[0],
        device=key[1],
        mode=mode,
        precision=precision,
        coils=coils,
        resident=resident_bytes(model, mode),
        intercept=float(intercept),
        slope=float(slope),
        probes=tuple(probes),
    )
    _CACHE[key] = calibration
    if path is not None:
        write_atomically(path, lambda tmp: Path(tmp).write_text(calibration.to_json()))
    return calibration


def _measure_probes(model, work, device, mode, dtype) -> list[tuple[int, int]]:
    """``(units, peak)`` per probe shape, after a warm-up step (lazy initialisation, and in
    training the optimizer's state, are not part of a step's peak)."""
    train = mode == "train"
    was_training = model.training
    net = copy.deepcopy(model).to(device).train() if train else model.eval()
    optimizer = torch.optim.AdamW(net.parameters()) if train else None

    def step(shape) -> Callable[[], None]:
        def run() -> None:
            inputs = work.inputs(shape, 1, device, train)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                if not train:
                    with torch.no_grad():
                        work.infer(net, inputs)
                    return
                loss = work.loss(net, inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()

        return run

    shapes = work.probe_shapes(device)
    repeats = 2 if device.type == "cuda" else 1  # the first CUDA run at a shape picks kernels
    probes, shape = [], shapes[0]
    try:
        step(shape)()
        for shape in shapes:
            peaks = []
            for _ in range(repeats):
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                peaks.append(measure_peak(step(shape), device))
            probes.append((work.units(shape), min(peaks)))
    except torch.OutOfMemoryError as err:
        raise ResourceError(
            f"out of memory while measuring the model at {'x'.join(map(str, shape))}: "
            "it does not fit on this device"
        ) from err
    finally:
        model.train(was_training)
    return probes
