"""3D reconstruction over slabs: slab measurements and whole volumes put back together."""

from __future__ import annotations

import pytest
import torch

from medinv.inference.reconstruction import prepare
from medinv.inference.slabs import reconstruct_volume_in_slabs
from medinv.models import IRIM
from medinv.mri.fft import ifft2c

COILS, H, W = 3, 12, 10


@pytest.fixture(scope="module")
def model() -> IRIM:
    torch.manual_seed(0)
    model = IRIM(
        dim=3, state_channels=4, steps=2, layers_per_step=2, dilations=[1, 2], hidden_channels=4
    )
    # G starts at zero (the machine returns A^H y); random weights make slabs matter.
    for name, parameter in model.named_parameters():
        if ".up." in name:
            torch.nn.init.normal_(parameter, std=0.3)
    return model.eval()


def _volume(num_slices: int, multicoil: bool):
    torch.manual_seed(num_slices)
    shape = (num_slices, COILS, H, W) if multicoil else (num_slices, H, W)
    mask = (torch.rand(W) < 0.5).float()
    mask[W // 2 - 1 : W // 2 + 2] = 1
    kspace = 7 * torch.randn(shape, dtype=torch.complex64) * mask
    sensitivities = None
    if multicoil:
        sensitivities = prepare(kspace, mask, 3, multicoil=True).sensitivities
    return kspace, mask, sensitivities


def _direct(model, kspace, mask, sensitivities, start, slab):
    """The model on one slab, scaled by the slab's zero-filled peak computed here."""
    k = kspace[start : start + slab][None]
    images = ifft2c(k)
    s = None
    if sensitivities is not None:
        s = sensitivities[start : start + slab][None]
        images = (s.conj() * images).sum(-3)
    scale = images.abs().max()
    view = (1, *[1] * (k.ndim - 2), W)
    with torch.no_grad():
        return model(k / scale, mask.view(view), s)[0] * scale


@pytest.mark.parametrize("multicoil", [True, False])
def test_non_overlapping_slabs_equal_the_model_on_each_slab(model, multicoil):
    kspace, mask, sensitivities = _volume(8, multicoil)
    images = reconstruct_volume_in_slabs(model, kspace, mask, sensitivities, slab=4)
    assert images.shape == (8, H, W) and images.is_complex()
    for start in (0, 4):
        expected = _direct(model, kspace, mask, sensitivities, start, 4)
        torch.testing.assert_close(images[start : start + 4], expected)


def test_a_volume_not_a_multiple_of_the_slab_averages_the_shared_slices(model):
    kspace, mask, sensitivities = _volume(7, True)
    images = reconstruct_volume_in_slabs(model, kspace, mask, sensitivities, slab=3)
    # Slabs start at 0, 3 and, aligned to the end, 4: slices 4 and 5 lie in two slabs.
    first, middle, last = (_direct(model, kspace, mask, sensitivities, s, 3) for s in (0, 3, 4))
    torch.testing.assert_close(images[:3], first)
    torch.testing.assert_close(images[3], middle[0])
    torch.testing.assert_close(images[4:6], (middle[1:] + last[:2]) / 2)
    torch.testing.assert_close(images[6], last[2])


def test_overlap_batching_and_short_volumes(model):
    kspace, mask, sensitivities = _volume(6, True)
    overlapping = reconstruct_volume_in_slabs(model, kspace, mask, sensitivities, 4, overlap=2)
    a, b = (_direct(model, kspace, mask, sensitivities, s, 4) for s in (0, 2))
    torch.testing.assert_close(overlapping[:2], a[:2])
    torch.testing.assert_close(overlapping[2:4], (a[2:] + b[:2]) / 2)
    torch.testing.assert_close(overlapping[4:], b[2:])
    batched = reconstruct_volume_in_slabs(
        model, kspace, mask, sensitivities, 4, overlap=2, batch_size=2
    )
    torch.testing.assert_close(batched, overlapping)
    whole = reconstruct_volume_in_slabs(model, kspace[:2], mask, sensitivities[:2], slab=4)
    torch.testing.assert_close(whole, _direct(model, kspace, mask, sensitivities, 0, 2))
    with pytest.raises(ValueError, match="overlap must lie in"):
        reconstruct_volume_in_slabs(model, kspace, mask, sensitivities, 4, overlap=4)


def test_prepare_of_slabs_keeps_2d_sensitivities_and_scales_each_slab_once():
    torch.manual_seed(1)
    kspace = torch.randn(2, 3, COILS, H, W, dtype=torch.complex64)
    kspace[1] *= 20
    mask = torch.zeros(W)
    mask[3:7] = 1
    kspace = kspace * mask
    slabs = prepare(kspace, mask, 4, multicoil=True)
    slices = prepare(kspace.flatten(0, 1), mask, 4, multicoil=True)
    torch.testing.assert_close(slabs.sensitivities, slices.sensitivities.unflatten(0, (2, 3)))
    torch.testing.assert_close(slabs.scale, slices.scale.view(2, 3).amax(1))
    torch.testing.assert_close(slabs.kspace * slabs.scale.view(-1, 1, 1, 1, 1), kspace)
    assert slabs.mask.shape == (2, 1, 1, 1, W)
    single = prepare(kspace[:, :, 0], mask, 4, multicoil=False)
    assert single.sensitivities is None and single.mask.shape == (2, 1, 1, W)
