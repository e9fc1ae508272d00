"""Centred FFTs, RSS and crops against NumPy and fastMRI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medinv.mri import center_crop, fft2c, ifft2c, rss


def _random_complex(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.complex128, generator=gen)


@pytest.mark.parametrize("shape", [(3, 16, 12), (2, 6, 8), (2, 4, 15, 9), (2, 14, 9)])
def test_fft2c_matches_numpy_with_explicit_shifts_and_ortho_norm(shape: tuple[int, ...]) -> None:
    x = _random_complex(shape)
    axes = (-2, -1)
    expected = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=axes), norm="ortho"), axes=axes
    )
    np.testing.assert_allclose(fft2c(x).numpy(), expected, rtol=0, atol=1e-12)
    expected_inv = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(x.numpy(), axes=axes), norm="ortho"), axes=axes
    )
    np.testing.assert_allclose(ifft2c(x).numpy(), expected_inv, rtol=0, atol=1e-12)


def test_fft2c_matches_fastmri_real_view_convention() -> None:
    fastmri = pytest.importorskip("fastmri")
    x = _random_complex((2, 5, 20, 14)).to(torch.complex64)
    ours = fft2c(x)
    theirs = torch.view_as_complex(fastmri.fft2c(torch.view_as_real(x)))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    theirs_inv = torch.view_as_complex(fastmri.ifft2c(torch.view_as_real(x)))
    torch.testing.assert_close(ifft2c(x), theirs_inv, rtol=1e-5, atol=1e-5)


def test_fft2c_after_inference_mode_still_differentiates() -> None:
    """Even sizes use cached sign grids; one first made under inference_mode must still
    serve a later autograd pass."""
    with torch.inference_mode():
        fft2c(_random_complex((1, 10, 6)))
    x = _random_complex((1, 10, 6)).requires_grad_()
    (grad,) = torch.autograd.grad(fft2c(x).abs().square().sum(), x)
    torch.testing.assert_close(grad, 2 * x.detach())  # ||F x||^2 = ||x||^2 (unitary)


def test_fft2c_is_unitary_and_ifft2c_inverts_it() -> None:
    x = _random_complex((4, 17, 10))
    k = fft2c(x)
    torch.testing.assert_close(torch.linalg.vector_norm(k), torch.linalg.vector_norm(x))
    torch.testing.assert_close(ifft2c(k), x)


def test_fft2c_of_a_constant_image_is_a_peak_at_the_centre_index() -> None:
    height, width = 8, 6
    k = fft2c(torch.ones(height, width, dtype=torch.complex128))
    peak = divmod(int(k.abs().argmax()), width)
    assert peak == (height // 2, width // 2)
    assert k[height // 2, width // 2].real == pytest.approx((height * width) ** 0.5)


def test_fft2c_rejects_real_input() -> None:
    with pytest.raises(TypeError, match="complex"):
        fft2c(torch.ones(4, 4))


def test_rss_is_root_sum_of_squared_magnitudes_over_coils() -> None:
    x = _random_complex((2, 6, 5, 4))
    expected = np.sqrt((np.abs(x.numpy()) ** 2).sum(axis=1))
    np.testing.assert_allclose(rss(x).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(rss(x, dim=0).numpy(), np.sqrt((np.abs(x.numpy()) ** 2).sum(0)))


@pytest.mark.parametrize(("size", "crop"), [((9, 10), (4, 4)), ((640, 320), (320, 320))])
def test_center_crop_takes_the_window_fastmri_takes(
    size: tuple[int, int], crop: tuple[int, int]
) -> None:
    x = _random_complex((2, *size))
    top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    expected = x[..., top : top + crop[0], left : left + crop[1]]
    torch.testing.assert_close(center_crop(x, crop), expected)
    fastmri_transforms = pytest.importorskip("fastmri.data.transforms")
    torch.testing.assert_close(
        center_crop(x.abs(), crop), fastmri_transforms.center_crop(x.abs(), crop)
    )


def test_center_crop_rejects_a_larger_shape() -> None:
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(torch.zeros(4, 4), (5, 4))
