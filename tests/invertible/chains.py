"""Small invertible networks shared by the engine tests."""

from __future__ import annotations

import torch
from torch import nn

from medinv.invertible import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    InvertibleDownsampling,
    InvertibleSequential,
    InvertibleUpsampling,
    OrthogonalConv,
)


class CountingConv(nn.Module):
    """conv-BatchNorm-ReLU-conv coupling function that counts its calls."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.calls = 0
        self.body = nn.Sequential(
            nn.Conv2d(c_in, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(8, c_out, 3, padding=1),
        )

    def forward(self, x):
        self.calls += 1
        return self.body(x)


def mixed_chain(depth: int, memory_efficient: bool, seed: int = 0, dropout: float = 0.0):
    """``depth`` blocks cycling through every block type, each with its own weights.

    Operates on (B, 4, H, W); H and W must be even.
    """
    torch.manual_seed(seed)
    makers = [
        lambda: AdditiveCoupling(CountingConv(2, 2, dropout)),
        lambda: OrthogonalConv(4, "exp"),
        lambda: AffineCoupling(CountingConv(2, 4, dropout)),
        lambda: ActNorm(4),
        lambda: AdditiveCoupling(CountingConv(2, 2), CountingConv(2, 2)),
        lambda: OrthogonalConv(4, "cayley"),
        lambda: OrthogonalConv(4, "householder"),
    ]
    blocks = [makers[i % len(makers)]() for i in range(depth)]
    # Down and up again through learnable orthogonal resampling in the middle of the chain.
    middle = depth // 2
    blocks[middle:middle] = [
        InvertibleDownsampling(4, 2, dim=2, init="haar"),
        OrthogonalConv(16, "exp"),
        InvertibleUpsampling(16, 2, dim=2, init="random"),
    ]
    return InvertibleSequential(*blocks, memory_efficient=memory_efficient)


def additive_chain(depth: int, memory_efficient: bool, channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    half = channels // 2
    blocks = [AdditiveCoupling(CountingConv(half, half)) for _ in range(depth)]
    return InvertibleSequential(*blocks, memory_efficient=memory_efficient)


def coupling_functions(chain: InvertibleSequential) -> list[CountingConv]:
    return [m for m in chain.modules() if isinstance(m, CountingConv)]
