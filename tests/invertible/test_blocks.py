"""Each block: inverse, log-det and memory-efficient gradients against independent oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medinv.invertible import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelSplit,
    InvertibleDownsampling,
    InvertibleSequential,
    InvertibleUpsampling,
    OrthogonalConv,
    haar_matrix,
    orthogonal_matrix,
)
from medinv.invertible.orthogonal import matrix_exp

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SHAPE = {1: (8,), 2: (4, 6), 3: (4, 2, 4)}


def _conv(dim, c_in, c_out):
    return nn.Sequential(CONV[dim](c_in, 6, 3, padding=1), nn.Tanh(), CONV[dim](6, c_out, 1))


def _perturb(module):
    """Move every parameter off its initial value so no block is tested at the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


BLOCKS = {
    "additive": lambda d: AdditiveCoupling(_conv(d, 2, 2)),
    "additive_fg": lambda d: AdditiveCoupling(_conv(d, 1, 3), _conv(d, 3, 1), split=1),
    "additive_swapped": lambda d: AdditiveCoupling(_conv(d, 3, 1), split=1, swap=True),
    "additive_fg_swapped": lambda d: AdditiveCoupling(
        _conv(d, 3, 1), _conv(d, 1, 3), split=1, swap=True
    ),
    "affine": lambda d: AffineCoupling(_conv(d, 2, 4)),
    "actnorm": lambda d: ActNorm(4),
    "orthogonal_exp": lambda d: OrthogonalConv(4, "exp"),
    "orthogonal_cayley": lambda d: OrthogonalConv(4, "cayley"),
    "orthogonal_householder": lambda d: OrthogonalConv(4, "householder"),
    "down_haar": lambda d: InvertibleDownsampling(4, 2, dim=d, init="haar"),
    "down_random_anisotropic": lambda d: InvertibleDownsampling(
        4, (2,) + (1,) * (d - 1), dim=d, init="random", parametrization="cayley"
    ),
    "up_pixel_shuffle": lambda d: InvertibleUpsampling(4 * 2**d, 2, dim=d, init="pixel_shuffle"),
}


def _input(name, dim, batch=2):
    channels = 4 * 2**dim if name.startswith("up") else 4
    shape = SHAPE[dim] if not name.startswith("up") else tuple(s // 2 for s in SHAPE[dim])
    return torch.randn(batch, channels, *shape, dtype=torch.float64)


def _block(name, dim):
    torch.manual_seed(0)
    return _perturb(BLOCKS[name](dim).double())


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", BLOCKS)
def test_round_trip(name, dim):
    block = _block(name, dim)
    x = _input(name, dim)
    with torch.no_grad():
        torch.testing.assert_close(block.inverse(block(x)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", BLOCKS)
def test_block_backward_matches_autograd_float64(name, dim):
    block = _block(name, dim)
    x = _input(name, dim).requires_grad_()
    results = []
    for memory_efficient in (False, True):
        chain = InvertibleSequential(block, memory_efficient=memory_efficient)
        y, log_det = chain.forward_and_log_det(x)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        loss = (weights * y).sum() + (y**2).sum() + (log_det * torch.arange(1.0, 3.0)).sum()
        results.append(torch.autograd.grad(loss, [x, *block.parameters()]))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", BLOCKS)
def test_log_det_equals_log_abs_det_of_the_jacobian(name):
    block = _block(name, 1)
    x = _input(name, 1, batch=1)
    jacobian = torch.autograd.functional.jacobian(block, x).reshape(x.numel(), x.numel())
    _, expected = torch.linalg.slogdet(jacobian)
    torch.testing.assert_close(block.log_det(x), expected.reshape(1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("parametrization", ["exp", "cayley", "householder"])
def test_parametrizations_are_orthogonal(parametrization):
    torch.manual_seed(0)
    conv = _perturb(OrthogonalConv(32, parametrization))
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(32), rtol=0, atol=1e-6)
    down = _perturb(InvertibleDownsampling(3, (2, 2, 2), dim=3, parametrization=parametrization))
    k = down.kernel().reshape(3, 8, 8)
    torch.testing.assert_close(k @ k.mT, torch.eye(8).expand(3, 8, 8), rtol=0, atol=1e-6)


def test_cayley_matches_the_explicit_inverse_and_its_gradient():
    """W = (I - S)^-1 (I + S), against an explicit inverse, values and gradients."""
    torch.manual_seed(0)
    theta = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 5, 5, dtype=torch.float64)
    eye = torch.eye(5, dtype=torch.float64)
    skew = theta - theta.mT
    expected = torch.linalg.inv(eye - skew) @ (eye + skew)
    w = orthogonal_matrix(theta, "cayley")
    torch.testing.assert_close(w, expected)
    (grad,) = torch.autograd.grad((w * weights).sum(), theta)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), theta)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("shape", [(5, 5), (7, 3, 3), (2, 4, 8, 8)])
def test_matrix_exp_matches_torch_values_and_gradients(shape):
    """Against ``torch.linalg.matrix_exp`` in float64, over a batch whose norms span 1e-6
    to 60 (so the shared scaling is far too fine for most of its matrices) and a zero
    matrix; skew-symmetric inputs give orthogonal matrices. The largest general matrices
    have entries near 1e13, where both results are only as good as their conditioning
    allows (a few 1e-12 relative)."""
    torch.manual_seed(0)
    a = torch.randn(shape, dtype=torch.float64)
    scales = torch.logspace(-6, 1, a[..., 0, 0].numel(), dtype=torch.float64)
    a = a * scales.reshape(a.shape[:-2] + (1, 1))
    if a.ndim > 2:
        a.reshape(-1, *shape[-2:])[0] = 0
    a.requires_grad_()
    weights = torch.randn(shape, dtype=torch.float64)
    expected = torch.linalg.matrix_exp(a)
    got = matrix_exp(a)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad((got * weights).sum(), a)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), a)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-11)
    skew = a.detach() - a.detach().mT
    w = matrix_exp(skew)
    eye = torch.eye(shape[-1], dtype=torch.float64).expand_as(w)
    torch.testing.assert_close(w @ w.mT, eye, rtol=0, atol=1e-12)


def test_matrix_exp_passes_gradcheck():
    torch.manual_seed(0)
    a = (2 * torch.randn(3, 4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(matrix_exp, (a,))


@pytest.mark.parametrize("init", ["random", "identity"])
def test_identity_init_and_random_init(init):
    torch.manual_seed(0)
    w = OrthogonalConv(6, "householder", init=init).weight()
    is_identity = torch.allclose(w, torch.eye(6), atol=1e-6)
    assert is_identity == (init == "identity")


def test_haar_init_is_the_2d_haar_transform():
    x = torch.randn(2, 3, 8, 6)
    y = InvertibleDownsampling(3, 2, dim=2, init="haar")(x)
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    subbands = [(a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2]
    expected = torch.stack(subbands, dim=2).reshape(2, 12, 4, 3)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_haar_init_1d_and_anisotropic_3d():
    x = torch.randn(1, 2, 6)
    y = InvertibleDownsampling(2, 2, dim=1, init="haar")(x)
    lo = (x[..., 0::2] + x[..., 1::2]) / math.sqrt(2)
    hi = (x[..., 0::2] - x[..., 1::2]) / math.sqrt(2)
    torch.testing.assert_close(y, torch.stack([lo, hi], 2).reshape(1, 4, 3), rtol=1e-6, atol=1e-6)
    v = torch.randn(1, 1, 4, 3, 2)
    y3 = InvertibleDownsampling(1, (2, 1, 2), dim=3, init="haar")(v)
    assert y3.shape == (1, 4, 2, 3, 1)
    torch.testing.assert_close(haar_matrix((2, 1, 2)), haar_matrix((2, 2)))
    with pytest.raises(ValueError, match="strides of 1 or 2"):
        InvertibleDownsampling(1, 3, dim=2, init="haar")


def test_pixel_shuffle_init_is_pixel_unshuffle():
    x = torch.randn(2, 3, 6, 4)
    down = InvertibleDownsampling(3, 2, dim=2, init="pixel_shuffle")
    torch.testing.assert_close(down(x), F.pixel_unshuffle(x, 2), rtol=0, atol=0)
    up = InvertibleUpsampling(12, 2, dim=2, init="pixel_shuffle")
    torch.testing.assert_close(up(down(x)), x, rtol=0, atol=0)


def test_orthogonal_matrix_rejects_unknown_parametrization():
    with pytest.raises(ValueError, match="unknown parametrization"):
        orthogonal_matrix(torch.zeros(2, 2), "qr")


@pytest.mark.parametrize("down", [True, False])
def test_resampling_backward_evaluates_the_kernel_once(down, monkeypatch):
    """The memory-efficient step evaluates the orthogonal matrices (each a solve or
    exponential) once in forward and once, with their graph, in backward."""
    import medinv.invertible.orthogonal as orthogonal

    calls = []
    real = orthogonal.orthogonal_weight
    monkeypatch.setattr(orthogonal, "orthogonal_weight", lambda *a: calls.append(1) or real(*a))
    block = _perturb(
        InvertibleDownsampling(2, 2, dim=2, parametrization="cayley")
        if down
        else InvertibleUpsampling(8, 2, dim=2, parametrization="cayley")
    )
    chain = InvertibleSequential(block).double()
    x = torch.randn(2, 2 if down else 8, 4, 4, dtype=torch.float64, requires_grad=True)
    calls.clear()
    chain(x).square().sum().backward()
    assert len(calls) == 2  # forward, then backward
    assert block.theta.grad is not None and x.grad is not None


def test_batched_orthogonal_matrices_give_plain_autograd_gradients():
    """A chain batches its orthogonal layers' matrices per parametrization and size (two
    1x1 convolutions of one size, a Householder one, a Cayley downsampling and an
    exponential upsampling here, one convolution used twice): gradients match plain
    autograd in float64, and match the unbatched memory-efficient walk."""
    from medinv.invertible import orthogonal

    torch.manual_seed(0)
    shared = OrthogonalConv(8)
    blocks = [
        shared,
        OrthogonalConv(8),
        OrthogonalConv(8, "householder"),
        InvertibleDownsampling(8, 2, dim=2, parametrization="cayley"),
        InvertibleUpsampling(32, 2, dim=2),
        shared,
    ]
    chain = _perturb(InvertibleSequential(*blocks)).double()
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    results = []
    for memory_efficient, batched in [(False, True), (True, True), (True, False)]:
        chain.memory_efficient = memory_efficient
        orthogonal.BATCH_WEIGHTS = batched
        try:
            xi = x.clone().requires_grad_()
            loss = (chain(xi) * torch.linspace(-1, 1, 8 * 4 * 6).view(1, 8, 4, 6)).sum()
            results.append(torch.autograd.grad(loss, [xi, *chain.parameters()]))
        finally:
            orthogonal.BATCH_WEIGHTS = True
    for got in results[1:]:
        for g, want in zip(got, results[0], strict=True):
            torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


def test_resampling_reports_bad_shapes():
    with pytest.raises(ValueError, match="not divisible by stride"):
        InvertibleDownsampling(2, 2, dim=2)(torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match=r"expects a high-resolution input of shape \(B, 2"):
        InvertibleDownsampling(2, 2, dim=2)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="not divisible by prod"):
        InvertibleUpsampling(6, 2, dim=2)


def test_actnorm_data_dependent_init_normalises_the_first_batch():
    x = 3.0 + 2.0 * torch.randn(16, 4, 8, 8)
    y = ActNorm(4).train()(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std((0, 2, 3), unbiased=False), torch.ones(4), rtol=0, atol=1e-4)


def test_affine_scale_is_bounded_by_clamp():
    net = nn.Conv1d(2, 4, 1)
    with torch.no_grad():
        net.bias.fill_(100.0)
    block = AffineCoupling(net, clamp=1.5)
    x = torch.randn(1, 4, 5)
    assert block.log_det(x).item() == pytest.approx(1.5 * 10, rel=1e-6)
    torch.testing.assert_close(block.inverse(block(x)), x)


def test_channel_split_round_trip_shares_storage():
    x = torch.randn(2, 7, 3)
    parts = ChannelSplit([3, 4])(x)
    assert [p.shape[1] for p in parts] == [3, 4]
    assert all(p.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for p in parts)
    torch.testing.assert_close(ChannelSplit([3, 4]).inverse(*parts), x)
    with pytest.raises(ValueError, match="do not add up"):
        ChannelSplit([3, 3])(x)


def test_swapped_coupling_reads_the_second_half_and_updates_the_first():
    block = _block("additive_swapped", 2)
    x = _input("additive_swapped", 2)
    y = block(x)
    torch.testing.assert_close(y[:, 1:], x[:, 1:], rtol=0, atol=0)
    assert (y[:, :1] - x[:, :1]).abs().max() > 1e-3


@pytest.mark.parametrize("min_slab_bytes", [0, None], ids=["eight-slabs", "one-slab"])
def test_orthogonal_backward_in_place_and_copying_agree(monkeypatch, min_slab_bytes):
    """The engine's buffers are mixed in place, slab by slab (small states in one slab);
    a state whose strides allow no (B, C, positions) view is mixed into new tensors. All
    give W^T y, W^T grad_y and the same parameter gradient."""
    from medinv.invertible import OrthogonalConv, orthogonal
    from medinv.invertible.orthogonal import orthogonal_weight

    if min_slab_bytes is not None:
        monkeypatch.setattr(orthogonal, "MIN_SLAB_BYTES", min_slab_bytes)
    torch.manual_seed(0)
    block = OrthogonalConv(4).double()
    params = [block.theta]
    y = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    grad_y = torch.randn_like(y)
    strided_y = torch.randn(2, 7, 4, 5, dtype=torch.float64).permute(0, 2, 3, 1)
    strided_grad = torch.randn(2, 7, 4, 5, dtype=torch.float64).permute(0, 2, 3, 1)
    with pytest.raises(RuntimeError):
        strided_y.view(2, 4, -1)  # channels last: no such view
    for state, grad in ((y, grad_y), (strided_y, strided_grad)):
        w = block.weight().detach()
        expected_x = torch.einsum("ji,bj...->bi...", w, state)
        expected_grad = torch.einsum("ji,bj...->bi...", w, grad)
        x, grad_x, (grad_theta,) = block.backward_pass(state.clone(), grad.clone(), None, params)
        torch.testing.assert_close(x, expected_x)
        torch.testing.assert_close(grad_x, expected_grad)
        theta = block.theta.detach().requires_grad_()
        mixed = torch.einsum("ij,bj...->bi...", orthogonal_weight(theta, "exp"), expected_x)
        (expected_theta,) = torch.autograd.grad(mixed, theta, grad)
        torch.testing.assert_close(grad_theta, expected_theta)


@pytest.mark.parametrize("min_slab_bytes", [0, None], ids=["eight-slabs", "one-slab"])
def test_orthogonal_forward_in_place_matches(monkeypatch, min_slab_bytes):
    from medinv.invertible import orthogonal

    if min_slab_bytes is not None:
        monkeypatch.setattr(orthogonal, "MIN_SLAB_BYTES", min_slab_bytes)
    torch.manual_seed(0)
    block = OrthogonalConv(4).double()
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        out = block.forward_in_place(x)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, expected)
