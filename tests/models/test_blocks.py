"""Coupling functions: gradients against a copy without in-place steps, saved memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medinv.invertible import saved_activations
from medinv.models.blocks import NORMS, conv_norm_act


def _without_inplace(block: nn.Module) -> nn.Module:
    twin = copy.deepcopy(block)
    for module in twin.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return twin


@pytest.mark.parametrize("norm", NORMS)
def test_in_place_activation_keeps_gradients_exact_float64(norm):
    torch.manual_seed(0)
    block = conv_norm_act(3, 5, dim=2, hidden_channels=8, norm=norm).double()
    for p in block.parameters():  # leave the zero initialisation of the last layer
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    results = []
    for net in (block, _without_inplace(block)):
        loss = (net(x) * torch.linspace(-1, 1, 5 * 42 * 2).view(2, 5, 6, 7)).sum()
        results.append(torch.autograd.grad(loss, [x, *net.parameters()]))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_block_saves_two_hidden_tensors_for_backward():
    block = conv_norm_act(4, 4, dim=3, hidden_channels=8, norm="group")
    x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    hidden_bytes = 8 * 8**3 * 4
    with saved_activations(exclude=[x, *block.parameters()]) as saved:
        block(x)
    # The first convolution's output (read by the normalisation) and the activation's
    # output (read by the last convolution and, overwritten in place, by the activation),
    # and the normalisation's per-group statistics (bytes); a separate activation output
    # would make it three.
    assert 2 * hidden_bytes <= saved.total < 2.5 * hidden_bytes
