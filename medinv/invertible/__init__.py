"""Invertible building blocks and the memory-efficient engine (depends on torch only)."""

from .actnorm import ActNorm, ChannelSplit
from .base import InvertibleModule, chain_context, using_context
from .coupling import AdditiveCoupling, AffineCoupling
from .engine import ChannelSubset, InvertibleSequential
from .memory import saved_activations
from .orthogonal import OrthogonalConv, orthogonal_matrix
from .resampling import InvertibleDownsampling, InvertibleUpsampling, haar_matrix

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ChannelSplit",
    "ChannelSubset",
    "InvertibleDownsampling",
    "InvertibleModule",
    "InvertibleSequential",
    "InvertibleUpsampling",
    "OrthogonalConv",
    "chain_context",
    "haar_matrix",
    "orthogonal_matrix",
    "saved_activations",
    "using_context",
]
