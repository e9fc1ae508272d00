"""The engine against plain autograd over the same modules (the oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medinv.inference.peak import measure_peak
from medinv.invertible import (
    AdditiveCoupling,
    ChannelSubset,
    InvertibleDownsampling,
    InvertibleSequential,
    InvertibleUpsampling,
    saved_activations,
)

from .chains import CountingConv, additive_chain, coupling_functions, mixed_chain


def assert_close64(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10 * max(scale, 1.0))


def gradients(chain, x, with_log_det=True, seed=123):
    torch.manual_seed(seed)
    if with_log_det:
        y, log_det = chain.forward_and_log_det(x)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        loss = loss + (y**2).mean() + log_det.sum()
    else:
        y = chain(x)
        loss = (y**2).mean() + y.sum()
    params = list(chain.parameters())
    inputs = [x, *params] if x.requires_grad else params
    return y.detach(), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("with_log_det", [False, True])
def test_backward_matches_autograd_float64_deep_mixed_chain(with_log_det):
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for memory_efficient in (False, True):
        chain = mixed_chain(32, memory_efficient).double()
        results.append(gradients(chain, x, with_log_det))
    (y_ref, g_ref), (y_me, g_me) = results
    assert len(mixed_chain(32, True).leaf_blocks()) >= 30
    assert_close64(y_me, y_ref)
    for got, want in zip(g_me, g_ref, strict=True):
        assert_close64(got, want)


def test_round_trip_deep_mixed_chain():
    chain = mixed_chain(32, True).double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close64(chain.inverse(chain(x)), x)


def test_leaf_input_gradient_is_not_accumulated_twice():
    grads = []
    for memory_efficient in (False, True):
        torch.manual_seed(5)
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
        chain = additive_chain(6, memory_efficient).double()
        chain(x).square().sum().backward()
        grads.append(x.grad)
    assert_close64(grads[1], grads[0])


def test_relu_before_chain_and_input_untouched():
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for memory_efficient in (False, True):
        chain = additive_chain(5, memory_efficient).double()
        x = torch.relu(x0)
        copy, version, ptr = x.detach().clone(), x._version, x.untyped_storage().nbytes()
        loss = chain(x).square().sum()
        (g,) = torch.autograd.grad(loss, [x0])
        # The caller's tensor is still readable, unchanged, and its storage intact.
        assert x._version == version and x.untyped_storage().nbytes() == ptr
        torch.testing.assert_close(x.detach(), copy, rtol=0, atol=0)
        results.append(g)
    assert_close64(results[1], results[0])


def test_input_without_grad_gives_parameter_gradients():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    (_, ref), (_, got) = (gradients(mixed_chain(10, me).double(), x) for me in (False, True))
    for a, b in zip(got, ref, strict=True):
        assert_close64(a, b)


def test_each_coupling_function_runs_once_per_backward():
    chain = mixed_chain(14, True)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = chain(x)
    functions = coupling_functions(chain)
    assert functions and all(f.calls == 1 for f in functions)
    y.sum().backward()
    assert all(f.calls == 2 for f in functions)


def test_batchnorm_statistics_update_once_per_step():
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    buffers = []
    for memory_efficient in (False, True):
        chain = mixed_chain(8, memory_efficient).double().train()
        chain(x).square().sum().backward()
        buffers.append([b.clone() for b in chain.buffers()])
    assert len(buffers[0]) > 0
    for got, want in zip(buffers[1], buffers[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_dropout_replays_its_rng_state_in_the_recompute():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for memory_efficient in (False, True):
        chain = mixed_chain(8, memory_efficient, dropout=0.5).double().train()
        results.append(gradients(chain, x, with_log_det=False, seed=7))
    for got, want in zip(results[1][1], results[0][1], strict=True):
        assert_close64(got, want)
    # The replay must not disturb the caller's RNG stream.
    torch.manual_seed(3)
    chain = mixed_chain(4, True, dropout=0.5)
    torch.manual_seed(3)
    y = chain(x.float())
    after_forward = torch.rand(3)
    torch.manual_seed(3)
    y = chain(x.float())
    y.sum().backward()
    torch.testing.assert_close(torch.rand(3), after_forward)


def test_gradient_hooks_fire_once():
    counts = []
    for memory_efficient in (False, True):
        chain = additive_chain(4, memory_efficient)
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        calls = []
        x.register_hook(lambda g, log=calls: log.append("x"))
        for p in chain.parameters():
            p.register_hook(lambda g, log=calls: log.append("param"))
        chain(x).sum().backward()
        counts.append((calls.count("x"), calls.count("param")))
    assert counts[1] == counts[0] == (1, len(list(chain.parameters())))


def test_saved_activations_do_not_grow_with_depth():
    def saved_bytes(depth, memory_efficient):
        chain = additive_chain(depth, memory_efficient, channels=8)
        x = torch.randn(2, 8, 16, 16, requires_grad=True)
        with saved_activations() as saved:  # parameters counted too
            y = chain(x)
        y.sum().backward()
        params = sum(p.numel() * p.element_size() for p in chain.parameters())
        return saved.total, params

    efficient4, _ = saved_bytes(4, True)
    efficient32, params32 = saved_bytes(32, True)
    plain4, _ = saved_bytes(4, False)
    plain32, _ = saved_bytes(32, False)
    output_bytes = 2 * 8 * 16 * 16 * 4
    assert efficient32 <= efficient4 + params32
    assert efficient32 <= output_bytes
    assert plain32 > 4 * plain4 > 4 * efficient32


def test_autocast_is_honoured_in_the_recompute():
    dtypes = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            dtypes.append(out.dtype)
            return out

    torch.manual_seed(0)
    chain = InvertibleSequential(AdditiveCoupling(Probe()), AdditiveCoupling(Probe()))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = chain(x)
    y.float().sum().backward()
    assert dtypes == [torch.bfloat16] * 4
    # The invertible state stays in the input's precision: fp32 in, fp32 gradient out.
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    plain = InvertibleSequential(*chain.blocks, memory_efficient=False)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(x_ref).float().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2)


def test_modifying_parameters_between_forward_and_backward_is_an_error():
    chain = additive_chain(3, True)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = chain(x)
    with torch.no_grad():
        next(chain.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_no_grad_forward_builds_no_graph():
    chain = additive_chain(3, True)
    with torch.no_grad():
        y = chain(torch.randn(1, 4, 8, 8))
    assert y.grad_fn is None


def test_nested_chains_are_flattened():
    inner = additive_chain(3, False)
    outer = InvertibleSequential(inner, *additive_chain(2, False).blocks)
    assert len(outer.leaf_blocks()) == 5


def test_non_invertible_block_is_rejected():
    with pytest.raises(TypeError, match="not an InvertibleModule"):
        InvertibleSequential(nn.ReLU())


def test_shared_weights_across_blocks_match_autograd():
    torch.manual_seed(0)
    shared = AdditiveCoupling(CountingConv(2, 2), CountingConv(2, 2)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for memory_efficient in (False, True):
        chain = InvertibleSequential(shared, shared, shared, memory_efficient=memory_efficient)
        results.append(gradients(chain, x, with_log_det=False))
    for got, want in zip(results[1][1], results[0][1], strict=True):
        assert_close64(got, want)


def _u_shaped(memory_efficient: bool):
    """Two nested skip connections around orthogonal down/upsampling."""
    torch.manual_seed(0)
    inner = InvertibleSequential(
        InvertibleDownsampling(2, 2, dim=2),
        AdditiveCoupling(CountingConv(4, 4), CountingConv(4, 4)),
        ChannelSubset(AdditiveCoupling(CountingConv(3, 3)), keep=2),
        InvertibleUpsampling(8, 2, dim=2),
    )
    return InvertibleSequential(
        AdditiveCoupling(CountingConv(2, 2), CountingConv(2, 2)),
        ChannelSubset(inner, keep=2),
        AdditiveCoupling(CountingConv(2, 2), CountingConv(2, 2)),
        memory_efficient=memory_efficient,
    ).double()


def test_channel_subsets_match_autograd_and_invert():
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    (y_ref, g_ref), (y_me, g_me) = (gradients(_u_shaped(me), x) for me in (False, True))
    assert_close64(y_me, y_ref)
    for got, want in zip(g_me, g_ref, strict=True):
        assert_close64(got, want)
    chain = _u_shaped(True)
    with torch.no_grad():
        assert_close64(chain.inverse(chain(x)), x)
    assert all(f.calls == 2 for f in coupling_functions(chain))
    with torch.no_grad():
        standalone = chain.blocks[1]
        expected = torch.cat([x[:, :2], standalone.inner(x[:, 2:])], dim=1)
        assert_close64(standalone(x), expected)


class _Scaled(nn.Module):
    """A coupling function that multiplies by the chain's context (data, not a parameter)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        from medinv.invertible import chain_context

        return torch.tanh(self.conv(x)) * chain_context()


def test_context_reaches_blocks_in_forward_inverse_and_recompute():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    context = torch.rand(1, 2, 8, 8, dtype=torch.float64) + 0.5
    results = []
    for memory_efficient in (False, True):
        torch.manual_seed(1)
        blocks = [AdditiveCoupling(_Scaled(), _Scaled()) for _ in range(3)]
        chain = InvertibleSequential(*blocks, memory_efficient=memory_efficient).double()
        y = chain(x, context=context)
        results.append(torch.autograd.grad(y.square().sum(), [x, *chain.parameters()]))
        with torch.no_grad():
            assert_close64(chain.inverse(chain(x, context=context), context=context), x)
    for got, want in zip(results[1], results[0], strict=True):
        assert_close64(got, want)


def _between_convolutions(chain: nn.Module, channels: int) -> nn.Module:
    """The chain inside a network: nothing but autograd holds its output."""
    return nn.Sequential(nn.Conv2d(channels, channels, 1), chain, nn.Conv2d(channels, 3, 1))


@pytest.mark.parametrize("make_chain", ["mixed", "iunet"])
def test_backward_through_an_unheld_output_matches_autograd(make_chain):
    """The engine works in the memory of the output and its gradient when nothing else
    can see them; the gradients must not change."""
    from medinv.models import InvertibleUNet

    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for memory_efficient in (False, True):
        torch.manual_seed(0)
        if make_chain == "mixed":
            chain = mixed_chain(16, memory_efficient)
        else:
            chain = InvertibleUNet(
                4, dim=2, architecture=(2, 2, 1), memory_efficient=memory_efficient
            )
            for p in chain.parameters():  # leave the identity initialisation
                nn.init.normal_(p, std=0.1)
        model = _between_convolutions(chain, 4).double()
        loss = model(x).square().mean()
        results.append(torch.autograd.grad(loss, [x, *model.parameters()]))
    for got, want in zip(*results[::-1], strict=True):
        assert_close64(got, want)


def test_output_the_caller_holds_is_unchanged_by_backward():
    chain = mixed_chain(8, True).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y = chain(x)
    before = y.detach().clone()
    (y**2).mean().backward()
    assert torch.equal(y.detach(), before)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    # Nothing but the chain itself saves its output (the loss is linear in it), so only
    # retain_graph tells the engine that a second backward will read it again.
    model = nn.Sequential(nn.Conv2d(4, 4, 1), mixed_chain(8, True)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    loss = (model(x) * weights).sum()
    first = torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *model.parameters()])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_an_unheld_output_is_reused_not_copied():
    """Holding the chain's output forces a copy of it in backward: one state's bytes more."""
    channels, size = 8, 96

    def f():
        return nn.Sequential(nn.Conv2d(channels // 2, channels // 2, 1), nn.GroupNorm(1, 4))

    chain = InvertibleSequential(*(AdditiveCoupling(f(), swap=i % 2 == 1) for i in range(4)))
    model = _between_convolutions(chain, channels)
    x = torch.randn(1, channels, size, size)
    state_bytes = x.numel() * x.element_size()

    def unheld():
        model(x).square().mean().backward()

    def held():
        y = model[:2](x)
        model[2](y).square().mean().backward()

    unheld(), held()  # allocate gradients and warm up
    cpu = torch.device("cpu")
    assert measure_peak(held, cpu) - measure_peak(unheld, cpu) > 0.9 * state_bytes


def test_skip_connection_is_rejoined_in_place_in_backward():
    """Leaving a channel subset, the walk writes the inner channels back into the buffers
    the subset started from instead of concatenating into a new state and gradient."""
    channels, inner, size = 8, 2, 128
    chain = InvertibleSequential(
        ChannelSubset(
            InvertibleSequential(
                InvertibleDownsampling(inner, 2, dim=2),
                InvertibleUpsampling(4 * inner, 2, dim=2),
            ),
            keep=channels - inner,
        )
    )
    x = torch.randn(1, channels, size, size)
    weights = torch.randn_like(x)
    state_bytes = x.numel() * x.element_size()
    (chain(x) * weights).sum().backward()  # allocate the parameter gradients
    loss = (chain(x) * weights).sum()  # the product saves the weights, not the output
    peak = measure_peak(loss.backward, torch.device("cpu"))
    # The output's gradient (1 state; the output was allocated in forward), the inner
    # quarter's state and gradient and a resampling layer's temporaries (2.26 states
    # measured); concatenating the skip back allocates a new state and gradient (3.5).
    assert peak < 2.75 * state_bytes


@pytest.mark.parametrize("make_chain", ["mixed", "u_shaped"])
def test_no_grad_forward_in_place_matches_and_leaves_the_input(make_chain):
    """Without a graph the chain updates the states it made in place; the result equals
    the out-of-place forward (run with a graph) and the caller's input is untouched."""
    chain = (mixed_chain(16, True).double() if make_chain == "mixed" else _u_shaped(True)).eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        y, log_det = chain.forward_and_log_det(x)
    with torch.enable_grad():
        y_ref, log_det_ref = chain.forward_and_log_det(x.requires_grad_())
    assert torch.equal(x.detach(), before)
    assert_close64(y, y_ref.detach())
    assert_close64(log_det, log_det_ref.detach())


def test_hooked_blocks_run_through_their_call():
    chain = additive_chain(3, True).eval()
    seen = []
    chain[1].register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    with torch.no_grad():
        y = chain(torch.randn(1, 4, 8, 8))
    assert len(seen) == 1
    with torch.no_grad():
        assert torch.equal(chain[2](seen[0]), y)


def test_no_grad_forward_keeps_one_state_not_three():
    """Out of place, each coupling holds its input, the function's output, the updated
    half and the joined result (3 states); in place, the state and the function's output
    (1.5). An elementwise function keeps convolution workspaces out of the count."""
    channels, size = 8, 128
    chain = InvertibleSequential(*(AdditiveCoupling(nn.Tanh(), swap=i % 2 == 1) for i in range(4)))
    x = torch.randn(1, channels, size, size)
    state_bytes = x.numel() * x.element_size()

    def forward():
        with torch.no_grad():
            chain(x)

    forward()
    assert measure_peak(forward, torch.device("cpu")) < 2 * state_bytes
