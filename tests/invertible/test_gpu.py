"""CUDA-only properties of the engine: fp16 autocast, CUDA RNG replay, flat peak memory."""

from __future__ import annotations

import pytest
import torch

from .chains import additive_chain, mixed_chain

pytestmark = pytest.mark.gpu


def _grads(chain, x, autocast: bool, seed: int = 0):
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        y = chain(x)
    return torch.autograd.grad(y.float().square().mean(), [x, *chain.parameters()])


def test_fp16_autocast_matches_plain_autograd_on_cuda():
    x = torch.randn(2, 4, 16, 16, device="cuda", requires_grad=True)
    plain = mixed_chain(12, False).cuda()
    efficient = mixed_chain(12, True).cuda()
    for got, want in zip(_grads(efficient, x, True), _grads(plain, x, True), strict=True):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)


def test_cuda_dropout_replays_its_rng_state():
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float64, requires_grad=True)
    plain = mixed_chain(8, False, dropout=0.5).cuda().double()
    efficient = mixed_chain(8, True, dropout=0.5).cuda().double()
    for got, want in zip(_grads(efficient, x, False, 3), _grads(plain, x, False, 3), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_peak_memory_is_flat_in_depth_on_cuda():
    def activation_peak(depth):
        chain = additive_chain(depth, True, channels=32).cuda()
        x = torch.randn(1, 32, 256, 256, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        chain(x).square().mean().backward()
        torch.cuda.synchronize()
        grads = sum(p.numel() * p.element_size() for p in chain.parameters())
        return torch.cuda.max_memory_allocated() - base - grads

    shallow, deep = activation_peak(4), activation_peak(32)
    assert deep <= 1.1 * shallow
