"""Build models from plain configuration dictionaries (as stored in checkpoints)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .iunet import IUNet

_BUILDERS = {"iunet": IUNet}


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """The model ``kind`` (e.g. ``"iunet"``) made from keyword arguments ``config``."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(_BUILDERS)}")
    config = dict(config)
    if "architecture" in config:
        config["architecture"] = tuple(config["architecture"])
    return _BUILDERS[kind](**config)
