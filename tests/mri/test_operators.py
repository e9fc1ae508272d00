"""Single-coil and SENSE operators: adjoints, closed forms and the data-consistency gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medinv.mri import (
    RandomMaskFunc,
    SenseOperator,
    SingleCoilOperator,
    birdcage_maps,
    fft2c,
    seed_from_name,
)

SHAPE = (64, 48)


def _complex(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=gen)


def _inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    """``<a, b> = sum conj(a) b`` in float64."""
    return complex((a.conj().to(torch.complex128) * b.to(torch.complex128)).sum())


def _operators(dtype: torch.dtype) -> dict[str, tuple[SingleCoilOperator, tuple[int, ...]]]:
    mask = RandomMaskFunc([0.08], [4])((8, *SHAPE), seed=seed_from_name("adjoint.h5")).mask
    maps = birdcage_maps(8, SHAPE, dtype=dtype) * _complex(8, 1, 1, dtype=dtype, seed=5)
    return {
        "single": (SingleCoilOperator(mask), (2, *SHAPE)),
        "sense": (SenseOperator(maps, mask), (2, 8, *SHAPE)),
        "sense_full": (SenseOperator(maps), (2, 8, *SHAPE)),
    }


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("name", ["single", "sense", "sense_full"])
def test_adjoint_satisfies_the_inner_product_identity(name: str, dtype: torch.dtype) -> None:
    op, kspace_shape = _operators(dtype)[name]
    x = _complex(2, *SHAPE, dtype=dtype, seed=1)
    y = _complex(*kspace_shape, dtype=dtype, seed=2)
    lhs, rhs = _inner(op(x), y), _inner(x, op.adjoint(y))
    assert abs(lhs - rhs) <= 1e-6 * abs(lhs)


def test_sense_forward_matches_numpy_expression() -> None:
    op, _ = _operators(torch.complex128)["sense"]
    x = _complex(2, *SHAPE, dtype=torch.complex128, seed=3)
    coil_images = op.sensitivities.numpy() * x.numpy()[:, None]
    axes = (-2, -1)
    kspace = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(coil_images, axes=axes), norm="ortho"), axes=axes
    )
    np.testing.assert_allclose(op(x).numpy(), kspace * op.mask.numpy(), atol=1e-12)


def test_fully_sampled_sense_with_normalised_maps_is_an_isometry() -> None:
    maps = birdcage_maps(12, SHAPE, dtype=torch.complex128)
    x = _complex(*SHAPE, dtype=torch.complex128, seed=4)
    torch.testing.assert_close(SenseOperator(maps).normal(x), x)


def test_single_coil_normal_operator_is_ifft_of_masked_fft() -> None:
    mask = RandomMaskFunc([0.08], [4])(SHAPE, seed=seed_from_name("n.h5")).mask
    x = _complex(*SHAPE, dtype=torch.complex128, seed=6)
    # With even sizes the centring shifts cancel around a diagonal operator.
    expected = np.fft.ifft2(np.fft.fft2(x.numpy()) * np.fft.ifftshift(mask.numpy()))
    np.testing.assert_allclose(SingleCoilOperator(mask).normal(x).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("name", ["single", "sense"])
def test_dc_gradient_equals_autograd_of_half_squared_residual(name: str) -> None:
    op, kspace_shape = _operators(torch.complex128)[name]
    x = _complex(2, *SHAPE, dtype=torch.complex128, seed=7).requires_grad_()
    y = _complex(*kspace_shape, dtype=torch.complex128, seed=8)
    loss = 0.5 * (op(x) - y).abs().pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(op.dc_gradient(x.detach(), y), grad)


def test_dc_gradient_vanishes_at_the_true_image() -> None:
    op, _ = _operators(torch.complex128)["sense"]
    x = _complex(*SHAPE, dtype=torch.complex128, seed=9)
    assert op.dc_gradient(x, op(x)).abs().max() < 1e-12


def test_masked_forward_only_fills_sampled_columns() -> None:
    op, _ = _operators(torch.complex64)["sense"]
    kspace = op(_complex(*SHAPE, dtype=torch.complex64, seed=10))
    sampled = kspace.abs().sum(dim=(0, 1)) > 0
    torch.testing.assert_close(sampled.float(), op.mask.flatten())
    full = fft2c(op.sensitivities * _complex(*SHAPE, dtype=torch.complex64, seed=10))
    torch.testing.assert_close(kspace, full * op.mask)


def test_sense_rejects_real_sensitivities() -> None:
    with pytest.raises(TypeError, match="complex"):
        SenseOperator(torch.ones(4, 8, 8))
