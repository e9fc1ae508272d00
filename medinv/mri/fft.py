"""Centred orthonormal 2D Fourier transforms, coil combination and centre crops.

The conventions are fastMRI's: k-space has its zero frequency at index ``n // 2`` of each
of the last two axes, and the transform is unitary, so ``ifft2c(fft2c(x)) == x`` and
``||fft2c(x)|| == ||x||``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

_SPATIAL = (-2, -1)


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes.

    ``k = fftshift(fft2(ifftshift(x), norm="ortho"))``.

    Args:
        image: complex tensor ``(*, H, W)``.

    Returns:
        Its k-space, complex ``(*, H, W)``.
    """
    _require_complex(image, "fft2c")
    modulation = _modulation(image)
    if modulation is not None:
        before, after = modulation
        return torch.fft.fft2(image * before, dim=_SPATIAL, norm="ortho") * after
    shifted = torch.fft.ifftshift(image, dim=_SPATIAL)
    return torch.fft.fftshift(torch.fft.fft2(shifted, dim=_SPATIAL, norm="ortho"), dim=_SPATIAL)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D inverse FFT over the last two axes, the adjoint of :func:`fft2c`.

    ``x = fftshift(ifft2(ifftshift(k), norm="ortho"))``.

    Args:
        kspace: complex tensor ``(*, H, W)``.

    Returns:
        The image, complex ``(*, H, W)``.
    """
    _require_complex(kspace, "ifft2c")
    modulation = _modulation(kspace)
    if modulation is not None:
        before, after = modulation
        return torch.fft.ifft2(kspace * before, dim=_SPATIAL, norm="ortho") * after
    shifted = torch.fft.ifftshift(kspace, dim=_SPATIAL)
    return torch.fft.fftshift(torch.fft.ifft2(shifted, dim=_SPATIAL, norm="ortho"), dim=_SPATIAL)


def _modulation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For even ``H`` and ``W``, the shifts around a 2D (inverse) FFT as sign flips:
    ``fftshift(F(ifftshift(x))) = s m F(m x)`` with ``m = (-1)^(i + j)`` and
    ``s = (-1)^(H/2 + W/2)``, two multiplications in place of four rolls. None for odd
    sizes."""
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        return None
    return _sign_grids(height, width, x.real.dtype, x.device)


@functools.lru_cache(maxsize=16)
def _sign_grids(height: int, width: int, dtype: torch.dtype, device: torch.device):
    with torch.inference_mode(False):  # usable in autograd even if first made in inference
        i = torch.arange(height, device=device).view(-1, 1)
        j = torch.arange(width, device=device).view(1, -1)
        grid = (1 - 2 * ((i + j) % 2)).to(dtype)
        return grid, grid * (-1) ** (height // 2 + width // 2)


def rss(coil_images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root sum of squares over the coil axis: ``sqrt(sum_c |x_c|^2)``.

    Args:
        coil_images: real or complex tensor, coils along ``dim`` (default ``(*, C, H, W)``).
        dim: the coil axis.

    Returns:
        Real tensor with ``dim`` removed.
    """
    return torch.sqrt((coil_images.abs() ** 2).sum(dim))


def center_crop(data: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop the last two axes to ``shape`` around their centre (real or complex data).

    The window starts at ``(n - m) // 2`` on an axis of length ``n`` cropped to ``m``, as in
    fastMRI, so the k-space centre ``n // 2`` of an even axis stays at ``m // 2``.

    Args:
        data: tensor ``(*, H, W)``.
        shape: ``(h, w)`` with ``0 < h <= H`` and ``0 < w <= W``.

    Returns:
        A view ``(*, h, w)``.

    Raises:
        ValueError: ``shape`` is larger than the data or not positive.
    """
    height, width = int(shape[0]), int(shape[1])
    if not (0 < height <= data.shape[-2] and 0 < width <= data.shape[-1]):
        raise ValueError(f"cannot crop {tuple(data.shape[-2:])} to {(height, width)}")
    top = (data.shape[-2] - height) // 2
    left = (data.shape[-1] - width) // 2
    return data[..., top : top + height, left : left + width]


def _require_complex(data: torch.Tensor, what: str) -> None:
    if not data.is_complex():
        raise TypeError(f"{what} needs a complex tensor, got {data.dtype}")
