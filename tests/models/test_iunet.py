"""IUNet: invertibility, identity at init, gradients against plain autograd, memory, padding."""

from __future__ import annotations

import pytest
import torch

from medinv.inference.peak import measure_peak
from medinv.invertible import saved_activations
from medinv.models import InvertibleUNet, IUNet

SPATIAL = {1: (32,), 2: (16, 16), 3: (8, 8, 8)}


def _perturb(model, scale=0.1, seed=0):
    """Move every parameter off its (identity) initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _core(dim, architecture, memory_efficient=True, **kwargs):
    torch.manual_seed(0)
    return InvertibleUNet(
        8, dim=dim, architecture=architecture, memory_efficient=memory_efficient, **kwargs
    )


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("coupling_functions", [1, 2])
def test_round_trip_fp32_depth_4_per_scale(dim, coupling_functions):
    model = _perturb(_core(dim, (4, 4, 4), coupling_functions=coupling_functions)).eval()
    x = torch.randn(2, 8, *SPATIAL[dim])
    with torch.no_grad():
        y = model(x)
        error = (model.inverse(y) - x).norm() / x.norm()
    assert (y - x).abs().max() > 1e-2  # the perturbed network is not the identity
    assert error < 1e-5


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_identity_at_initialisation(dim):
    model = _core(dim, (2, 2, 2))
    x = torch.randn(2, 8, *SPATIAL[dim])
    torch.testing.assert_close(model(x), x, rtol=0, atol=1e-5)


def _grads(model, x, with_log_det):
    if with_log_det:
        y, log_det = model.forward_and_log_det(x)
        loss = (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)).sum()
        loss = loss + log_det.sum()
    else:
        y = model(x)
        loss = (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)).sum()
    return torch.autograd.grad(loss, [x, *model.parameters()])


@pytest.mark.parametrize(
    ("dim", "coupling", "strides", "init", "functions"),
    [
        (2, "additive", 2, "haar", 2),
        (3, "affine", [(2, 2, 1), (1, 2, 2)], "haar", 2),
        (1, "additive", [2, 4], "random", 1),
    ],
)
def test_gradients_match_plain_autograd_float64(dim, coupling, strides, init, functions):
    shape = {1: (16,), 2: (8, 12), 3: (8, 8, 4)}[dim]
    x = torch.randn(2, 8, *shape, dtype=torch.float64, requires_grad=True)
    results = []
    for memory_efficient in (False, True):
        model = _core(
            dim,
            (2, 1, 2),
            memory_efficient,
            coupling=coupling,
            strides=strides,
            resampling_init=init,
            coupling_functions=functions,
        )
        model = _perturb(model.double())
        results.append(_grads(model, x, with_log_det=coupling == "affine"))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_segmentation_iunet_gradients_match_plain_autograd_float64():
    x = torch.randn(1, 4, 8, 8, 8, dtype=torch.float64)
    results = []
    for memory_efficient in (False, True):
        torch.manual_seed(0)
        model = IUNet(
            4, 3, channels=8, dim=3, architecture=(1, 1, 1), memory_efficient=memory_efficient
        )
        model = _perturb(model.double())
        logits = model(x)
        assert logits.shape == (1, 3, 8, 8, 8)
        results.append(torch.autograd.grad(logits.square().mean(), list(model.parameters())))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def _saved_bytes(model, x):
    with saved_activations(exclude=model.parameters()) as saved:
        y = model(x)
    y.sum().backward()
    return saved.total


def test_saved_activations_do_not_depend_on_couplings_per_scale():
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    saved = {}
    for depth in (1, 4):
        torch.manual_seed(0)
        model = IUNet(4, 3, channels=8, dim=2, architecture=(depth,) * 3)
        saved[depth] = _saved_bytes(model, x)
    torch.manual_seed(0)
    plain = _saved_bytes(
        IUNet(4, 3, channels=8, dim=2, architecture=(4,) * 3, memory_efficient=False), x
    )
    assert saved[4] == saved[1]
    # Input of the first projection and the core's output: about two input-sized tensors.
    assert saved[4] <= 4 * 16 * 16 * 4 + 8 * 16 * 16 * 4
    assert plain > 10 * saved[4]


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate"])
def test_padding_and_cropping(padding_mode):
    model = _perturb(_core(2, (1, 1, 1), padding_mode=padding_mode))
    x = torch.randn(1, 8, 13, 18)
    y = model(x)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 2), mode=padding_mode)
    torch.testing.assert_close(y, model.net(padded)[:, :, 1:-2, 1:-1])
    with pytest.raises(ValueError, match="cannot invert an output of spatial size"):
        model.inverse(y)


def test_summary_lists_channels_and_shapes_per_scale():
    model = _core(3, (2, 2, 2), strides=[(2, 2, 1), 2])
    text = model.summary((20, 16, 10))
    assert "scale  channels   skip  couplings     stride  shape" in text
    assert "    0         8      6        2+2      2x2x1  20x16x10" in text
    assert "    1         8      6        2+2      2x2x2  10x8x10" in text
    assert "    2        16      0        2+2          -  5x4x5" in text
    assert repr(model).startswith("InvertibleUNet(3D")


def test_invalid_configurations_are_reported():
    with pytest.raises(ValueError, match="not a whole number of channels"):
        InvertibleUNet(6, dim=3, architecture=(1, 1))
    with pytest.raises(ValueError, match="one stride per downsampling"):
        InvertibleUNet(8, dim=2, architecture=(1, 1, 1), strides=[2])
    with pytest.raises(ValueError, match="expected input of shape"):
        _core(2, (1, 1))(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("shape", [(8, 8, 8), (7, 9, 8)])
def test_segmenter_inference_in_place_matches_the_forward_with_a_graph(shape):
    """Without a graph the core works in the memory of the projection's output (and of the
    padded input); the logits must not change, nor may the input."""
    torch.manual_seed(0)
    model = _perturb(IUNet(4, 3, channels=8, dim=3, architecture=(1, 1, 1))).double().eval()
    x = torch.randn(2, 4, *shape, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        logits = model(x)
    with torch.enable_grad():
        reference = model(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(logits, reference.detach(), rtol=1e-10, atol=1e-12)


def test_padded_inference_frees_the_unpadded_projection():
    """An input that needs padding costs no more than one that does not: the projection's
    unpadded output is freed once padded, before the core runs (it was a whole extra state
    at the peak, and the planner's model has no room for it)."""
    torch.manual_seed(0)
    model = IUNet(4, 3, channels=16, dim=3, architecture=(1, 1, 1)).eval()
    state_bytes = 16 * 32 * 32 * 32 * 4

    def peak(shape):
        x = torch.randn(1, 4, *shape)

        def run():
            with torch.no_grad():
                model(x)

        run()
        return measure_peak(run, torch.device("cpu"))

    multiple = peak((32, 32, 32))
    assert peak((30, 32, 32)) <= multiple + state_bytes // 4
    assert peak((29, 30, 31)) <= multiple + state_bytes // 4
