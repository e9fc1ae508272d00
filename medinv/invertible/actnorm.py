"""Activation normalisation (Glow) and the channel split."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import InvertibleModule


class ActNorm(InvertibleModule):
    """Per-channel affine normalisation ``y = (x + b) * exp(log_s)`` (Glow).

    On the first forward in training mode, ``b`` and ``log_s`` are set from the batch so
    that each output channel has zero mean and unit variance (data-dependent init); after
    that they are ordinary parameters. ``log|det| = prod(spatial) * sum(log_s)``.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _shape(self, x: Tensor) -> tuple[int, ...]:
        if x.ndim < 2 or x.shape[1] != self.bias.numel():
            raise ValueError(
                f"expected input of shape (B, {self.bias.numel()}, ...), got {tuple(x.shape)}"
            )
        return (1, -1) + (1,) * (x.ndim - 2)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).float()
        self.bias.copy_(-flat.mean(1))
        self.log_scale.copy_(-torch.log(flat.std(1, unbiased=False) + self.eps))
        self.initialized.fill_(True)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = self._shape(x)
        if self.training and not self.initialized:
            self._initialize(x)
        y = (x + self.bias.view(shape)) * torch.exp(self.log_scale).view(shape)
        log_det = self.log_scale.sum() * math.prod(x.shape[2:])
        return y, log_det.expand(x.shape[0]).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        shape = self._shape(y)
        return y * torch.exp(-self.log_scale).view(shape) - self.bias.view(shape)


class ChannelSplit(nn.Module):
    """Split ``(B, C, *spatial)`` along channels into views; ``inverse`` concatenates.

    A bijection between one tensor and a tuple of tensors (log-det 0), which stores
    nothing: the parts are views of the input.

    Args:
        sections: channels per part (as ``torch.split``), or an int for equal parts.
    """

    def __init__(self, sections: int | Sequence[int]):
        super().__init__()
        self.sections = sections if isinstance(sections, int) else list(sections)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not isinstance(self.sections, int) and sum(self.sections) != x.shape[1]:
            raise ValueError(f"sections {self.sections} do not add up to {x.shape[1]} channels")
        return torch.split(x, self.sections, dim=1)

    def inverse(self, *parts: Tensor) -> Tensor:
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"sections={self.sections}"
