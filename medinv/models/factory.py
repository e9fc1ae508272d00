"""Build models from plain configuration dictionaries (as stored in checkpoints)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .iunet import IUNet


def _segresnet(**kwargs: Any) -> nn.Module:
    """MONAI's SegResNet, the baseline the iUNet segmenter is compared with."""
    from monai.networks.nets import SegResNet

    return SegResNet(**kwargs)


_BUILDERS = {"iunet": IUNet, "segresnet": _segresnet}


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """The model ``kind`` (e.g. ``"iunet"``) made from keyword arguments ``config``."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(_BUILDERS)}")
    config = dict(config)
    if "architecture" in config:
        config["architecture"] = tuple(config["architecture"])
    return _BUILDERS[kind](**config)
