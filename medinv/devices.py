"""Choosing and describing the device a command runs on."""

from __future__ import annotations

import platform

import torch

from medinv.errors import ResourceError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` (CUDA where available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ResourceError(f"device {name}: no CUDA GPU is available")
    return device


def describe(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
