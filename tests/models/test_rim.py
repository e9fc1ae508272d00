"""RIM baseline: shapes, all time steps, zero-filled start, trainability, the GRU update."""

from __future__ import annotations

import pytest
import torch

from medinv.models import RIM, build_model
from medinv.models.rim import ConvGRUCell
from medinv.mri.operators import SenseOperator, SingleCoilOperator


def _data(coils, shape=(12, 10), batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coil_axis = (coils,) if coils else ()
    kspace = torch.randn(batch, *coil_axis, *shape, generator=generator, dtype=torch.complex64)
    mask = torch.rand(batch, *(1,) * len(coil_axis), 1, shape[1], generator=generator) < 0.5
    mask = mask.float()
    sensitivities = torch.randn(kspace.shape, generator=generator, dtype=kspace.dtype)
    return kspace * mask, mask, sensitivities if coils else None


def _model(steps=3):
    torch.manual_seed(0)
    return RIM(steps=steps, hidden_channels=8)


def _perturb(model, scale=0.1):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize(("coils", "shape"), [(0, (12, 10)), (4, (13, 9))])
def test_output_shapes_and_all_time_steps(coils, shape):
    kspace, mask, sensitivities = _data(coils, shape)
    model = _perturb(_model(steps=3))
    estimates = model(kspace, mask, sensitivities, return_all=True)
    assert len(estimates) == 3
    assert all(e.shape == (2, *shape) and e.dtype == torch.complex64 for e in estimates)
    torch.testing.assert_close(model(kspace, mask, sensitivities), estimates[-1])
    assert (estimates[1] - estimates[0]).abs().max() > 1e-3  # every step updates


@pytest.mark.parametrize("coils", [0, 4])
def test_untrained_machine_returns_the_zero_filled_image(coils):
    kspace, mask, sensitivities = _data(coils)
    operator = SingleCoilOperator(mask) if coils == 0 else SenseOperator(sensitivities, mask)
    for estimate in _model()(kspace, mask, sensitivities, return_all=True):
        torch.testing.assert_close(estimate, operator.adjoint(kspace))


def test_training_reduces_the_loss_averaged_over_time_steps():
    kspace, mask, sensitivities = _data(4, batch=1)
    target = SenseOperator(sensitivities).adjoint(_data(4, batch=1, seed=3)[0])
    model = _perturb(_model(steps=2), scale=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        estimates = model(kspace, mask, sensitivities, return_all=True)
        loss = torch.stack([(e - target).abs().mean() for e in estimates]).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        assert all(p.grad.abs().max() > 0 for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_conv_gru_cell_matches_the_gru_equations():
    torch.manual_seed(0)
    cell = ConvGRUCell(3, 2).double()
    gru = torch.nn.GRUCell(3, 2).double()
    with torch.no_grad():
        # nn.GRUCell orders its gates (r, z, n); ConvGRUCell orders them (z, r, n).
        order = torch.cat([torch.arange(2, 4), torch.arange(0, 2), torch.arange(4, 6)])
        gru.weight_ih.copy_(cell.input_gates.weight[order, :, 0, 0])
        gru.bias_ih.copy_(cell.input_gates.bias[order])
        gru.weight_hh.copy_(cell.hidden_gates.weight[order, :, 0, 0])
        gru.bias_hh.zero_()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    h = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    want = gru(x.movedim(1, -1).reshape(-1, 3), h.movedim(1, -1).reshape(-1, 2))
    torch.testing.assert_close(cell(x, h), want.view(2, 4, 5, 2).movedim(-1, 1))


def test_build_model_and_invalid_configurations():
    assert build_model("rim", {"steps": 2, "hidden_channels": 4}).steps == 2
    with pytest.raises(ValueError, match="steps must be at least 1"):
        RIM(steps=0)
    with pytest.raises(ValueError, match="hidden_channels must be positive"):
        RIM(hidden_channels=0)
