"""Coil sensitivities: simulated birdcage maps and ESPIRiT estimation from k-space."""

from __future__ import annotations

import numpy as np
import torch

from medinv.mri.fft import ifft2c


def birdcage_maps(
    num_coils: int, shape: tuple[int, int], radius: float = 1.5, dtype=torch.complex64
) -> torch.Tensor:
    """Sensitivities of ``num_coils`` loops evenly spaced on a ring around the field of view.

    Coil ``c`` sits at ``radius (cos t_c, sin t_c)`` in coordinates where the image spans
    ``[-1, 1)``, with ``t_c = 2 pi c / C``; its map is ``exp(i (phi - t_c)) / r``, ``r`` the
    distance to the coil and ``phi`` the angle of the offset (Biot-Savart fall-off of a
    small loop; the same model as ``sigpy.mri.birdcage_maps``), normalised so that
    ``sum_c |S_c|^2 = 1`` at every pixel.

    Args:
        num_coils: number of coils ``C``.
        shape: image shape ``(H, W)``.
        radius: ring radius relative to the half field of view (> 1 keeps coils outside).
        dtype: complex dtype of the result.

    Returns:
        Complex maps ``(C, H, W)``.
    """
    height, width = shape
    c, y, x = np.mgrid[:num_coils, :height, :width].astype(np.float64)
    angle = c * (2 * np.pi / num_coils)
    x_co = (x - width / 2.0) / (width / 2.0) - radius * np.cos(angle)
    y_co = (y - height / 2.0) / (height / 2.0) - radius * np.sin(angle)
    maps = np.exp(1j * (np.arctan2(x_co, -y_co) - angle)) / np.hypot(x_co, y_co)
    return normalize_sensitivities(torch.from_numpy(maps)).to(dtype)


def normalize_sensitivities(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale maps ``(*, C, H, W)`` so that ``sum_c |S_c|^2 = 1`` at every pixel."""
    norm = torch.sqrt((maps.abs() ** 2).sum(-3, keepdim=True)).clamp_min(eps)
    return maps / norm


def espirit_maps(
    kspace: torch.Tensor,
    calib_width: int = 24,
    kernel_width: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
) -> torch.Tensor:
    """ESPIRiT coil sensitivities (one set of maps) from the fully sampled k-space centre.

    The ``calib_width`` x ``calib_width`` centre gives a calibration matrix whose rows are
    all ``kernel_width`` x ``kernel_width`` multi-coil patches; its right singular vectors
    with singular value above ``threshold * s_max`` span the null-space complement. Their
    images ``v_k(r)`` (kernels zero-padded to the grid, inverse FFT) form at each pixel
    ``G(r) = (HW / k^2) sum_k v_k(r) v_k(r)^H``, whose leading eigenvector is the
    sensitivity vector and whose eigenvalue is about 1 inside the object (Uecker et al.,
    MRM 71:990, 2014). The phase is referred to coil 0, and pixels with eigenvalue
    ``<= crop`` are set to zero, as in ``sigpy.mri.app.EspiritCalib``.

    Args:
        kspace: complex ``(C, H, W)`` with a fully sampled centre of at least
            ``calib_width`` columns.
        calib_width: side of the calibration region.
        kernel_width: side of the kernel (at most ``calib_width``).
        threshold: relative singular-value threshold.
        crop: eigenvalue threshold for the support.

    Returns:
        Complex maps ``(C, H, W)`` with ``sum_c |S_c|^2`` 1 on the support, 0 outside.
    """
    if not kspace.is_complex() or kspace.ndim != 3:
        shape = tuple(kspace.shape)
        raise ValueError(f"need complex k-space (C, H, W), got {kspace.dtype} {shape}")
    if calib_width < 2:
        raise ValueError(
            f"ESPIRiT needs a calibration region of 2 columns or more, got {calib_width}"
        )
    ksp = kspace.detach().cpu().numpy().astype(np.complex128)
    num_coils, height, width = ksp.shape
    k = min(kernel_width, calib_width)  # narrow centres (e.g. 8x of a small matrix)
    calib = _centre_resize(ksp, (num_coils, calib_width, calib_width))
    patches = np.lib.stride_tricks.sliding_window_view(calib, (k, k), axis=(1, 2))
    # (C, by, bx, k, k) -> rows of coil-major patches (blocks, C k k)
    matrix = patches.reshape(num_coils, -1, k * k).transpose(1, 0, 2).reshape(-1, num_coils * k * k)
    _, singular, vh = np.linalg.svd(matrix, full_matrices=False)
    kernels = vh[singular > threshold * singular.max()].reshape(-1, num_coils, k, k)
    gram = _kernel_gram(kernels, (height, width)) * (np.sqrt(height * width) / k**2)
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    top = eigenvectors[..., -1]  # (H, W, C), unit norm
    top = top * np.exp(-1j * np.angle(top[..., :1]))
    maps = top.transpose(2, 0, 1) * (eigenvalues[..., -1] > crop)
    return torch.from_numpy(maps).to(kspace.dtype)


def _kernel_gram(kernels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``sum_k v_k(r) v_k(r)^H`` ``(H, W, C, C)`` times ``sqrt(HW)``, ``v_k`` the centred
    inverse FFT of kernel ``k`` zero-padded to ``shape``.

    ``v_{k,c}(r) conj(v_{k,d}(r))`` only depends on differences of kernel positions, so the
    sum is the inverse FFT of the kernels' cross-correlations ``R_cd(delta)``, placed at
    ``centre + delta``: ``C^2`` FFTs instead of one per kernel and coil.
    """
    _, num_coils, k, _ = kernels.shape
    products = np.einsum("ncab,ndef->cdabef", kernels, kernels.conj())
    correlation = np.zeros((num_coils, num_coils, 2 * k - 1, 2 * k - 1), dtype=kernels.dtype)
    for a in range(k):
        for b in range(k):
            correlation[..., a : a + k, b : b + k] += products[:, :, a, b, ::-1, ::-1]
    height, width = shape
    placed = np.zeros((num_coils, num_coils, height, width), dtype=kernels.dtype)
    top, left = height // 2 - (k - 1), width // 2 - (k - 1)
    placed[..., top : top + 2 * k - 1, left : left + 2 * k - 1] = correlation
    return _ifft2c_numpy(placed).transpose(2, 3, 0, 1)


def _centre_resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-pad every axis about its centre index ``n // 2`` (k-space convention)."""
    out = np.zeros(shape, dtype=array.dtype)
    src, dst = [], []
    for n_in, n_out in zip(array.shape, shape, strict=True):
        start_in = max(n_in // 2 - n_out // 2, 0)
        start_out = max(n_out // 2 - n_in // 2, 0)
        length = min(n_in - start_in, n_out - start_out)
        src.append(slice(start_in, start_in + length))
        dst.append(slice(start_out, start_out + length))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _ifft2c_numpy(kspace: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    shifted = np.fft.ifftshift(kspace, axes=axes)
    return np.fft.fftshift(np.fft.ifft2(shifted, axes=axes, norm="ortho"), axes=axes)


def acs_sensitivities(
    kspace: torch.Tensor, num_low_frequencies: int, eps: float = 1e-12
) -> torch.Tensor:
    """Coil sensitivities from the fully sampled centre columns: fast, smooth estimates.

    The ``num_low_frequencies`` central columns of each coil, tapered by a Hann window to
    limit ringing, are transformed to low-resolution coil images and normalised so that
    ``sum_c |S_c|^2 = 1`` (as in E2E-VarNet's sensitivity initialisation). Cheaper than
    :func:`espirit_maps` by orders of magnitude; good where a network refines the image.

    Args:
        kspace: complex ``(*, C, H, W)``.
        num_low_frequencies: the number of fully sampled central columns.
    """
    width = kspace.shape[-1]
    n = max(1, min(int(num_low_frequencies), width))
    start = (width - n + 1) // 2
    window = torch.zeros(width, dtype=kspace.real.dtype, device=kspace.device)
    window[start : start + n] = torch.hann_window(n + 2, periodic=False, dtype=window.dtype)[1:-1]
    return normalize_sensitivities(ifft2c(kspace * window), eps)
