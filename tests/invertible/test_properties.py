"""Property-based checks over shapes, strides and parametrizations."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medinv.invertible import InvertibleDownsampling, InvertibleUpsampling, OrthogonalConv


@st.composite
def resampling_cases(draw):
    dim = draw(st.integers(1, 3))
    stride = tuple(draw(st.lists(st.integers(1, 3), min_size=dim, max_size=dim)))
    channels = draw(st.integers(1, 3))
    blocks = tuple(draw(st.lists(st.integers(1, 3), min_size=dim, max_size=dim)))
    init = draw(st.sampled_from(["pixel_shuffle", "random"]))
    parametrization = draw(st.sampled_from(["exp", "cayley", "householder"]))
    return dim, stride, channels, blocks, init, parametrization


@settings(max_examples=40, deadline=None)
@given(resampling_cases(), st.integers(0, 2**16))
def test_resampling_is_an_orthogonal_bijection(case, seed):
    dim, stride, channels, blocks, init, parametrization = case
    torch.manual_seed(seed)
    down = InvertibleDownsampling(channels, stride, dim, init, parametrization).double()
    shape = [b * s for b, s in zip(blocks, stride, strict=True)]
    x = torch.randn(2, channels, *shape, dtype=torch.float64)
    y = down(x)
    assert y.shape == (2, channels * math.prod(stride), *blocks)
    torch.testing.assert_close(down.inverse(y), x, rtol=0, atol=1e-12)
    # Orthogonal: the norm of every sample is preserved.
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    up = InvertibleUpsampling(y.shape[1], stride, dim, init, parametrization).double()
    torch.testing.assert_close(up.inverse(up(y)), y, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 12),
    st.sampled_from(["exp", "cayley", "householder"]),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_orthogonal_conv_preserves_norms_and_inverts(channels, parametrization, dim, seed):
    torch.manual_seed(seed)
    conv = OrthogonalConv(channels, parametrization).double()
    x = torch.randn(2, channels, *(3,) * dim, dtype=torch.float64)
    y = conv(x)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    torch.testing.assert_close(conv.inverse(y), x, rtol=0, atol=1e-12)
