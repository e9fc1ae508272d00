"""Checkpoints: the one place where model weights are written and read.

A checkpoint is a ``torch.save`` dictionary of tensors and plain data only, so it loads
with ``weights_only=True`` (no code runs on load): the model kind and its constructor
arguments, the state dict, and optionally optimizer state, epoch and metrics.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medinv.errors import InputError
from medinv.io import write_atomically
from medinv.models import build_model

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def save_checkpoint(
    path: Path, kind: str, model_config: dict[str, Any], model: nn.Module, **extra: Any
) -> None:
    """Write atomically (temporary file, then rename)."""
    payload = {
        "kind": kind,
        "model_config": model_config,
        "state_dict": model.state_dict(),
        **extra,
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dictionary, loaded with ``weights_only=True``."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise InputError(f"{path}: not a readable medinv checkpoint ({err})") from err
    if not isinstance(payload, dict) or not {"kind", "model_config", "state_dict"} <= set(payload):
        raise InputError(f"{path}: not a medinv checkpoint (kind/model_config/state_dict missing)")
    return payload


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights."""
    payload = read_checkpoint(path)
    try:
        model = build_model(payload["kind"], payload["model_config"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"{path}: weights do not fit the model they describe ({err})") from err
    return model, payload


def portable_config(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """``config`` with the data paths under ``root`` made relative to it, for weights that
    are shipped: no path of the machine that trained them goes along."""
    data = dict(config.get("data", {}))
    for key, value in data.items():
        if isinstance(value, str) and Path(value).is_absolute():
            path = Path(value)
            data[key] = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    return {**config, "data": data}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_weights(name: str) -> Path:
    """A bundled default model, verified against the SHA-256 in its model card."""
    path = WEIGHTS_DIR / f"{name}.pt"
    card = WEIGHTS_DIR / f"{name}.md"
    if not path.is_file() or not card.is_file():
        raise InputError(f"bundled model '{name}' is not installed (looked in {WEIGHTS_DIR})")
    found = re.search(r"SHA-256\D*?\b([0-9a-f]{64})\b", card.read_text())
    if found is None or sha256(path) != found.group(1):
        raise InputError(f"{path}: SHA-256 does not match its model card {card.name}")
    return path
