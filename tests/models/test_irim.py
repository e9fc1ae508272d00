"""IRIM: exact inversion with per-step weights, gradients against plain autograd, flat memory,
the gradient injection against autograd of the data term, identity at initialisation."""

from __future__ import annotations

import pytest
import torch

from medinv.invertible import saved_activations, using_context
from medinv.models import IRIM, build_model
from medinv.mri.operators import SenseOperator, SingleCoilOperator

COILS = 3


def _data(dim, coils, shape=(12, 10), slices=4, batch=2, dtype=torch.complex128, seed=0):
    """Masked k-space, its column mask and coil maps (None for single-coil)."""
    generator = torch.Generator().manual_seed(seed)
    lead = (batch, slices) if dim == 3 else (batch,)
    coil_axis = (coils,) if coils else ()
    kspace = torch.randn(*lead, *coil_axis, *shape, generator=generator, dtype=dtype)
    mask_shape = (*lead, *(1,) * len(coil_axis), 1, shape[1])
    mask = (torch.rand(mask_shape, generator=generator) < 0.5).to(kspace.real.dtype)
    mask[..., shape[1] // 2] = 1
    sensitivities = None
    if coils:
        sensitivities = torch.randn(kspace.shape, generator=generator, dtype=dtype)
    return kspace * mask, mask, sensitivities


def _model(dim=2, steps=2, memory_efficient=True, dilations=(1, 2, 4), **kwargs):
    torch.manual_seed(0)
    return IRIM(
        dim=dim,
        state_channels=6,
        steps=steps,
        layers_per_step=len(dilations),
        dilations=dilations,
        hidden_channels=5,
        memory_efficient=memory_efficient,
        **kwargs,
    ).double()


def _perturb(model, scale=0.1, seed=1):
    """Move every parameter off its initialisation (the last layers of G start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


CASES = {
    "2d-single": dict(dim=2, coils=0, shape=(12, 10)),
    "2d-multi-odd": dict(dim=2, coils=COILS, shape=(13, 11)),
    "3d-multi": dict(dim=3, coils=COILS, shape=(8, 6)),
}


@pytest.mark.parametrize("shared_weights", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_inverse_state_recovers_initial_state_float64(case, shared_weights):
    dim, coils, shape = CASES[case]["dim"], CASES[case]["coils"], CASES[case]["shape"]
    model = _perturb(_model(dim, steps=3, shared_weights=shared_weights))
    kspace, mask, sensitivities = _data(dim, coils, shape)
    with torch.no_grad():
        initial = model.initial_state(kspace, mask, sensitivities)
        final = model.final_state(kspace, mask, sensitivities)
        recovered = model.inverse_state(final, kspace, mask, sensitivities)
    assert (final - initial).norm() > 0.1 * initial.norm()  # the machine is far from identity
    assert (recovered - initial).norm() / initial.norm() < 1e-10


def test_steps_have_their_own_weights_unless_shared():
    separate = _model(steps=3)
    shared = _model(steps=3, shared_weights=True)
    count = sum(p.numel() for p in separate.parameters())
    assert count == 3 * sum(p.numel() for p in shared.parameters())
    assert len(separate.network) == len(shared.network) == 3 * separate.blocks_per_step


def _loss(image):
    weights = torch.cos(torch.arange(image.numel(), dtype=image.real.dtype)).view(image.shape)
    return (weights * image.real).sum() + (weights.flip(-1) * image.imag).sum()


@pytest.mark.parametrize(
    ("case", "shared_weights"), [("2d-multi-odd", False), ("3d-multi", False), ("2d-single", True)]
)
def test_parameter_gradients_match_plain_autograd_float64(case, shared_weights):
    dim, coils, shape = CASES[case]["dim"], CASES[case]["coils"], CASES[case]["shape"]
    kspace, mask, sensitivities = _data(dim, coils, shape)
    results = []
    for memory_efficient in (False, True):
        model = _perturb(_model(dim, 2, memory_efficient, shared_weights=shared_weights))
        loss = _loss(model(kspace, mask, sensitivities))
        results.append(torch.autograd.grad(loss, list(model.parameters())))
    for got, want in zip(results[1], results[0], strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_orthogonal_weights_are_computed_once_per_pass_for_all_layers(monkeypatch, steps):
    """A memory-efficient training step computes the weights of all its orthogonal layers
    in one batched call in forward and back-propagates them in one in backward, however
    many steps and layers (each layer uses its weight twice, U and U^T); inference, one."""
    import medinv.invertible.orthogonal as orthogonal

    calls = []
    original = orthogonal.orthogonal_weight

    def counted(theta, parametrization):
        calls.append(tuple(theta.shape))
        return original(theta, parametrization)

    monkeypatch.setattr(orthogonal, "orthogonal_weight", counted)
    model = _model(2, steps)
    layers = steps * len(model.dilations)
    data = _data(2, COILS, (16, 16), batch=1)
    model(*data).abs().sum().backward()
    assert calls == [(layers, model.state_channels, model.state_channels)] * 2
    calls.clear()
    with torch.no_grad():
        model(*data)
    assert calls == [(layers, model.state_channels, model.state_channels)]


def _saved_bytes(model, data):
    with saved_activations(exclude=model.parameters()) as saved:
        image = model(*data)
    image.abs().sum().backward()
    return saved.total


def test_saved_activations_do_not_grow_with_steps():
    data = _data(2, COILS, (16, 16), batch=1)
    efficient = {n: _saved_bytes(_model(steps=n), data) for n in (1, 4)}
    plain = {n: _saved_bytes(_model(steps=n, memory_efficient=False), data) for n in (1, 4)}
    state_bytes = 6 * 16 * 16 * 8
    assert efficient[4] == efficient[1]
    # The final state, and what turning it into a complex image keeps: a few states.
    assert efficient[4] <= 3 * state_bytes
    assert plain[4] > 3 * plain[1] > 3 * efficient[4]


@pytest.mark.gpu
def test_cuda_peak_memory_does_not_grow_with_steps():
    device = torch.device("cuda")
    data = [t.to(device) for t in _data(2, COILS, (128, 128), batch=1, dtype=torch.complex64)]
    peaks = {}
    for steps in (1, 4):
        torch.manual_seed(0)
        model = IRIM(
            state_channels=16,
            steps=steps,
            layers_per_step=3,
            dilations=(1, 2, 4),
            hidden_channels=16,
            shared_weights=True,
        ).to(device)
        model(*data).abs().sum().backward()  # gradients and FFT plans exist from here on
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(*data).abs().sum().backward()
        peaks[steps] = torch.cuda.max_memory_allocated(device) - before
    assert peaks[4] <= 1.1 * peaks[1]


@pytest.mark.parametrize("coils", [0, COILS])
def test_injection_adds_the_data_term_gradient_to_channels_2_and_3(coils):
    model = _model()
    kspace, mask, sensitivities = _data(2, coils)
    state = torch.randn(2, 6, 12, 10, dtype=torch.float64)
    with using_context(model.measurements(kspace, mask, sensitivities)):
        injected = model.network[0](state)
    # Oracle: autograd of 1/2 ||A x - y||^2 with respect to the real and imaginary channels.
    real, imag = (state[:, i].clone().requires_grad_() for i in (0, 1))
    operator = SingleCoilOperator(mask) if coils == 0 else SenseOperator(sensitivities, mask)
    residual = operator(torch.complex(real, imag)) - kspace
    (0.5 * residual.abs().square().sum()).backward()
    torch.testing.assert_close(injected[:, 2] - state[:, 2], real.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(injected[:, 3] - state[:, 3], imag.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(injected[:, :2], state[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(injected[:, 4:], state[:, 4:], rtol=0, atol=0)


def test_injection_without_measurements_is_reported():
    with pytest.raises(RuntimeError, match="needs the measurements"):
        _model().network(torch.zeros(1, 6, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("case", CASES)
def test_untrained_machine_returns_the_zero_filled_image(case):
    dim, coils, shape = CASES[case]["dim"], CASES[case]["coils"], CASES[case]["shape"]
    kspace, mask, sensitivities = _data(dim, coils, shape)
    operator = SingleCoilOperator(mask) if coils == 0 else SenseOperator(sensitivities, mask)
    image = _model(dim)(kspace, mask, sensitivities)
    torch.testing.assert_close(image, operator.adjoint(kspace), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("dim", "coils", "shape", "expected"),
    [
        (2, 0, (13, 7), (2, 13, 7)),
        (2, COILS, (9, 11), (2, 9, 11)),
        (3, 0, (5, 7), (2, 3, 5, 7)),
        (3, COILS, (6, 9), (2, 3, 6, 9)),
    ],
)
def test_output_shapes_for_sizes_not_divisible_by_the_strides(dim, coils, shape, expected):
    kspace, mask, sensitivities = _data(dim, coils, shape, slices=3, dtype=torch.complex64)
    torch.manual_seed(0)
    model = IRIM(
        dim=dim, state_channels=5, steps=2, layers_per_step=2, dilations=(4, 2), hidden_channels=4
    )
    image = _perturb(model)(kspace, mask, sensitivities)
    assert image.shape == expected and image.dtype == torch.complex64
    image.abs().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_one_training_step_reduces_the_loss():
    kspace, mask, sensitivities = _data(2, COILS, (16, 16), batch=1)
    target = SenseOperator(sensitivities).adjoint(_data(2, COILS, (16, 16), batch=1, seed=3)[0])
    model = _perturb(_model(steps=2), scale=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = (model(kspace, mask, sensitivities) - target).abs().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_build_model_accepts_plain_json_values():
    model = build_model(
        "irim",
        {"state_channels": 6, "steps": 2, "layers_per_step": 2, "dilations": [1, 2], "dim": 3},
    )
    assert isinstance(model, IRIM)
    assert model.dilations == (1, 2) and model.dim == 3 and len(model.network) == 2 * 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"state_channels": 3}, "state_channels must be at least 4"),
        ({"layers_per_step": 3}, "one factor per layer of a step"),
        ({"layers_per_step": 2, "dilations": (1, 0)}, "positive integers"),
        ({"dim": 1}, "dim must be 2 or 3"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"hidden_channels": 0}, "hidden_channels must be positive"),
    ],
)
def test_invalid_configurations_are_reported(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IRIM(**kwargs)


def test_inconsistent_inputs_are_reported():
    model = _model()
    kspace, mask, sensitivities = _data(2, COILS)
    with pytest.raises(ValueError, match="multi-coil k-space needs coil sensitivities"):
        model(kspace, mask)
    with pytest.raises(ValueError, match="must both be"):
        model(kspace, mask, sensitivities[:, :2])
    with pytest.raises(ValueError, match="must be complex"):
        model(kspace.real, mask, sensitivities)
    with pytest.raises(ValueError, match=r"\(B, S, H, W\)"):
        _model(dim=3)(kspace[:, 0], mask[:, 0])


@pytest.mark.parametrize("case", list(CASES))
def test_inference_in_place_matches_the_forward_with_a_graph(case):
    """Without a graph the network works in its state's memory; the estimate must not
    change, nor may the measured k-space."""
    spec = CASES[case]
    model = _perturb(_model(dim=spec["dim"])).eval()
    kspace, mask, sensitivities = _data(spec["dim"], spec["coils"], spec["shape"])
    before = kspace.clone()
    with torch.no_grad():
        estimate = model(kspace, mask, sensitivities)
    with torch.enable_grad():
        reference = model(kspace, mask, sensitivities)
    assert torch.equal(kspace, before)
    torch.testing.assert_close(estimate, reference.detach(), rtol=1e-10, atol=1e-12)
