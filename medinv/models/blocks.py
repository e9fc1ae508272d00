"""Coupling functions: the small convolutional networks inside coupling layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch import nn

Norm = Literal["group", "instance", "layer", "batch", "none"]
NORMS: tuple[str, ...] = ("group", "instance", "layer", "batch", "none")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

#: ``builder(in_channels, out_channels, dim) -> nn.Module`` makes one coupling function.
BlockBuilder = Callable[[int, int, int], nn.Module]


def normalization(kind: Norm, channels: int, dim: int) -> nn.Module:
    """A normalisation layer over ``channels`` feature maps.

    ``"group"``: GroupNorm with up to 8 groups; ``"instance"``: one group per channel;
    ``"layer"``: one group for all channels; ``"batch"``: BatchNorm; ``"none"``: identity.
    """
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "batch":
        return _BATCH_NORM[dim](channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose from {NORMS}")


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    dim: int,
    hidden_channels: int | None = None,
    norm: Norm = "group",
    kernel_size: int = 3,
) -> nn.Sequential:
    """``conv -> norm -> LeakyReLU -> conv``, the last convolution initialised to zero.

    With its last layer at zero the function is 0, so the coupling layer holding it starts
    as the identity (as in the iUNet paper). ``hidden_channels`` defaults to
    ``max(in_channels, out_channels)``. The activation overwrites the normalisation's
    output (no normalisation layer reads its own output in backward), so a training step
    keeps two hidden-sized tensors for backward, not three.
    """
    if dim not in _CONV:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
    hidden = hidden_channels or max(in_channels, out_channels)
    conv = _CONV[dim]
    last = conv(hidden, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        conv(in_channels, hidden, kernel_size, padding=kernel_size // 2),
        normalization(norm, hidden, dim),
        nn.LeakyReLU(0.1, inplace=True),
        last,
    )
