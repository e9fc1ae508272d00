"""Coil sensitivities: birdcage maps and ESPIRiT against sigpy and a closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medinv.mri import birdcage_maps, espirit_maps, fft2c, normalize_sensitivities

SHAPE = (64, 48)


def _phantom() -> np.ndarray:
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]]
    ellipse = (y - 32) ** 2 / 26**2 + (x - 24) ** 2 / 19**2 < 1
    return ellipse * (1 + 0.3 * np.sin(x / 4.0) * np.cos(y / 6.0))


def _kspace(maps: torch.Tensor) -> torch.Tensor:
    image = torch.from_numpy(_phantom()).to(maps.dtype)
    return fft2c(maps * image)


@pytest.mark.parametrize("num_coils", [8, 15])
def test_birdcage_maps_equal_sigpy(num_coils: int) -> None:
    sigpy_mri = pytest.importorskip("sigpy.mri")
    ours = birdcage_maps(num_coils, SHAPE, dtype=torch.complex128).numpy()
    np.testing.assert_allclose(ours, sigpy_mri.birdcage_maps((num_coils, *SHAPE)), atol=1e-12)


def test_birdcage_maps_are_normalised() -> None:
    maps = birdcage_maps(10, SHAPE)
    torch.testing.assert_close((maps.abs() ** 2).sum(0), torch.ones(SHAPE))


def test_normalize_sensitivities_gives_unit_coil_norm() -> None:
    maps = torch.randn(3, 5, 7, 9, dtype=torch.complex128)
    norm = (normalize_sensitivities(maps).abs() ** 2).sum(-3)
    torch.testing.assert_close(norm, torch.ones_like(norm))


def test_espirit_equals_sigpy_espirit_calib() -> None:
    sigpy_mri = pytest.importorskip("sigpy.mri")
    kspace = _kspace(birdcage_maps(8, SHAPE, dtype=torch.complex128))
    ours = espirit_maps(kspace).numpy()
    theirs = sigpy_mri.app.EspiritCalib(kspace.numpy(), show_pbar=False).run()
    np.testing.assert_array_equal(np.abs(ours).sum(0) > 0, np.abs(theirs).sum(0) > 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_espirit_recovers_known_maps_up_to_the_phase_of_coil_zero() -> None:
    truth = birdcage_maps(8, SHAPE, dtype=torch.complex128)
    estimate = espirit_maps(_kspace(truth))
    inner = torch.zeros(SHAPE, dtype=torch.bool)
    inner[12:52, 10:38] = True
    expected = truth * torch.exp(-1j * truth[:1].angle())
    # A 6x6 kernel from a 24x24 centre approximates the maps to about 1%.
    error = (estimate[:, inner] - expected[:, inner]).abs()
    assert error.max() < 0.02 and error.mean() < 2e-3
    torch.testing.assert_close(
        (estimate[:, inner].abs() ** 2).sum(0), torch.ones(int(inner.sum()), dtype=torch.float64)
    )
