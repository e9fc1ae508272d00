"""Build models from plain configuration dictionaries (as stored in checkpoints)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .irim import IRIM
from .iunet import IUNet
from .rim import RIM


def _segresnet(**kwargs: Any) -> nn.Module:
    """MONAI's SegResNet, the baseline the iUNet segmenter is compared with."""
    from monai.networks.nets import SegResNet

    return SegResNet(**kwargs)


_BUILDERS = {"iunet": IUNet, "irim": IRIM, "rim": RIM, "segresnet": _segresnet}
#: Keyword arguments that are tuples in the constructors but lists in JSON or YAML.
_TUPLES = ("architecture", "dilations")


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """The model ``kind`` (e.g. ``"iunet"``) made from keyword arguments ``config``."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(_BUILDERS)}")
    config = dict(config)
    for key in _TUPLES:
        if key in config:
            config[key] = tuple(config[key])
    return _BUILDERS[kind](**config)
