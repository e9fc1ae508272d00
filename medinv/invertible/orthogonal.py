"""Orthogonal matrices from unconstrained parameters, and 1x1 orthogonal convolutions."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import Tensor, nn

from .base import InvertibleModule, ParamGrads

Parametrization = Literal["exp", "cayley", "householder"]
PARAMETRIZATIONS: tuple[str, ...] = ("exp", "cayley", "householder")


def orthogonal_matrix(theta: Tensor, parametrization: Parametrization) -> Tensor:
    """Map unconstrained parameters to orthogonal matrices, batched over leading dimensions.

    - ``"exp"``: ``theta (..., n, n)``; ``W = exp(S)`` with ``S = theta - theta^T`` (in SO(n)).
    - ``"cayley"``: ``theta (..., n, n)``; ``W = (I - S)^{-1} (I + S)``.
    - ``"householder"``: ``theta (..., k, n)``, one vector per reflection;
      ``W = H(v_1) ... H(v_k)`` with ``H(v) = I - 2 v v^T / (v^T v)``.

    All three give the identity for the parameters of :func:`initial_parameters`.
    """
    if parametrization == "householder":
        n = theta.shape[-1]
        w = torch.eye(n, dtype=theta.dtype, device=theta.device).expand(*theta.shape[:-2], n, n)
        for i in range(theta.shape[-2]):
            v = theta[..., i, :]
            wv = (w @ v.unsqueeze(-1)) * (2.0 / (v * v).sum(-1))[..., None, None]
            w = w - wv @ v.unsqueeze(-2)
        return w
    skew = theta - theta.mT
    if parametrization == "exp":
        return matrix_exp(skew)
    if parametrization == "cayley":
        eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
        # I - S is invertible for every skew-symmetric S (its eigenvalues are 1 - i*lambda),
        # so the solve skips its error check, which would make the host wait for a GPU.
        return torch.linalg.solve_ex(eye - skew, eye + skew, check_errors=False)[0]
    raise ValueError(f"unknown parametrization {parametrization!r}; choose from {PARAMETRIZATIONS}")


#: Taylor coefficients 1/k! of :func:`matrix_exp`'s degree-16 polynomial.
_TAYLOR = [1.0 / math.factorial(k) for k in range(17)]


def matrix_exp(a: Tensor) -> Tensor:
    """``exp(a)`` for a batch of square matrices ``(..., n, n)``, differentiable.

    Scaling and squaring: ``a / 2^s`` with the batch's largest 1-norm at most 1/2, a
    degree-16 Taylor polynomial (Paterson-Stockmeyer: six matrix products; its remainder is
    below 1e-19 there), then ``s`` squarings. The whole batch shares ``s``, so a call runs
    a few dozen batched operators whatever its size and norms, and waits for the device
    once (to read the norm). ``torch.linalg.matrix_exp`` picks a degree and scaling per
    matrix and runs about 350 operators per call (750 with its backward), which on a GPU
    cost host time per operator.
    """
    shape = a.shape
    x = a.reshape(-1, *shape[-2:])
    norm = x.abs().sum(-2).amax().item()
    squarings = max(0, math.ceil(math.log2(2 * norm))) if norm > 0.5 else 0
    x = x * 0.5**squarings
    eye = torch.eye(shape[-1], dtype=a.dtype, device=a.device)
    x2 = torch.bmm(x, x)
    x3 = torch.bmm(x2, x)
    x4 = torch.bmm(x2, x2)

    def cubic(k: int) -> Tensor:  # c_k I + c_k+1 x + c_k+2 x^2 + c_k+3 x^3
        c = _TAYLOR
        return (x * c[k + 1]).add(eye, alpha=c[k]).add(x2, alpha=c[k + 2]).add(x3, alpha=c[k + 3])

    result = cubic(12).add(x4, alpha=_TAYLOR[16])
    for k in (8, 4, 0):
        result = torch.baddbmm(cubic(k), result, x4)
    for _ in range(squarings):
        result = torch.bmm(result, result)
    return result.reshape(shape)


def orthogonal_weight(theta: Tensor, parametrization: Parametrization) -> Tensor:
    """:func:`orthogonal_matrix` evaluated in float64 and returned in ``theta``'s dtype.

    The matrices are small, so the extra precision costs nothing measurable and keeps
    ``W W^T = I`` to the rounding of ``theta``'s dtype, which exact inversion relies on.
    The map from ``theta`` stays smooth, so gradients are those of the matrix returned.
    """
    with torch.autocast(theta.device.type, enabled=False):
        w = orthogonal_matrix(theta.double(), parametrization)
        # One Newton step towards the polar factor, W (3I - W^T W) / 2, squares the
        # orthogonality error that rounding in the squarings leaves (about 1e-13).
        eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
        return (w @ (1.5 * eye - 0.5 * w.mT @ w)).to(theta.dtype)


def initial_parameters(
    batch: Sequence[int], n: int, parametrization: Parametrization, random: bool = False
) -> Tensor:
    """Parameters for :func:`orthogonal_matrix`: the identity, or a random rotation.

    Householder vectors come in equal pairs (``H(v) H(v) = I``) for the identity; the
    random variants draw from the global torch RNG, like ``nn.Linear``'s init.
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"unknown parametrization {parametrization!r}; choose from {PARAMETRIZATIONS}"
        )
    if parametrization == "householder":
        k = n + n % 2
        if random:
            return torch.randn(*batch, k, n)
        return torch.randn(*batch, k // 2, n).repeat_interleave(2, dim=-2)
    if random:
        return torch.randn(*batch, n, n) / n**0.5
    return torch.zeros(*batch, n, n)


class OrthogonalConv(InvertibleModule):
    """1x1 orthogonal channel mixing ``y[:, i] = sum_j W[i, j] x[:, j]`` for 1D/2D/3D inputs.

    ``W = P(theta)`` with ``P`` the chosen parametrization (see :func:`orthogonal_matrix`),
    starting at a random rotation as in Glow (``init="random"``) or at the identity. It is
    orthogonal to the precision of ``theta`` whatever the values of ``theta``, so
    the inverse and the input gradient both apply ``W^T`` and the log-det is 0; the
    memory-efficient backward uses that transpose instead of recomputing anything.
    Mixing runs in the input's precision with autocast off, so an fp32 state stays exact.

    Args:
        channels: number of channels ``C``.
        parametrization: ``"exp"``, ``"cayley"`` or ``"householder"``.
        init: ``"random"`` or ``"identity"``.
    """

    def __init__(
        self,
        channels: int,
        parametrization: Parametrization = "exp",
        init: Literal["random", "identity"] = "random",
    ):
        super().__init__()
        if init not in ("random", "identity"):
            raise ValueError(f"unknown init {init!r}; choose 'random' or 'identity'")
        self.channels = channels
        self.parametrization = parametrization
        theta = initial_parameters((), channels, parametrization, random=init == "random")
        self.theta = nn.Parameter(theta)

    def weight(self) -> Tensor:
        """The current orthogonal matrix ``W`` of shape ``(C, C)``.

        Without grad mode, inside :func:`batched_weights`, it is the one computed there
        for all the layers at once."""
        return layer_matrices(self)

    def forward(self, x: Tensor) -> Tensor:
        return _mix_channels(x, self.weight())

    def inverse(self, y: Tensor) -> Tensor:
        return _mix_channels(y, self.weight().mT)

    def forward_in_place(self, x: Tensor) -> Tensor | None:
        return _mix_in_place(x, self.weight())

    def backward_pass(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None, params: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, ParamGrads]:
        w = backward_weight(self)
        # y = W x: x = W^T y, and dL/dW = sum over batch and positions of grad_y x^T.
        x, grad_x, grad_w = unmix(y, grad_y, w.detach().mT)
        return x, grad_x, weight_grads(self, w, grad_w.to(w.dtype), params)

    def extra_repr(self) -> str:
        return f"{self.channels}, parametrization={self.parametrization!r}"


def backward_weight(conv: OrthogonalConv) -> Tensor:
    """``conv``'s weight for a memory-efficient backward: the batch's inside
    :func:`batched_weights`, otherwise computed with a graph for :func:`weight_grads`."""
    cached = batch_weight(conv)
    if cached is not None:
        return cached
    with torch.enable_grad():
        return conv.weight()


def weight_grads(
    conv: OrthogonalConv, w: Tensor, grad_w: Tensor, params: Sequence[Tensor]
) -> ParamGrads:
    """The parameters' gradients from ``dL/dW`` of ``conv``'s weight ``w``; inside
    :func:`batched_weights`, ``dL/dW`` is kept for the batch's :meth:`WeightBatch.grads`
    instead, and none are returned here."""
    if batch_weight(conv) is not None:
        add_batch_grad(conv, grad_w)
        return [None] * len(params)
    return list(torch.autograd.grad(w, params, grad_w, allow_unused=True)) if params else []


class WeightBatch:
    """The orthogonal matrices of several layers (:class:`OrthogonalConv`, the resampling
    layers), computed in one batched call per parametrization and size, and their
    parameters' gradients likewise.

    Each ``orthogonal_weight`` call runs dozens of small operators (the matrix
    exponential's products and squarings, the Newton step, in float64), which on a GPU cost
    host time per operator whatever the matrix size; the i-RIM would call it six times per
    layer and training step. In a batch, a chain's forward computes each layer's matrices
    once, and its backward collects every layer's ``dL/dW`` and back-propagates them in one
    call.

    Layers are given by their ``theta`` (``(..., n, n)``, or ``(..., k, n)`` for
    Householder vectors) and ``parametrization``; ``weights[id(layer)]`` is
    ``orthogonal_weight(layer.theta, layer.parametrization)``.
    """

    def __init__(self, layers: Iterable[nn.Module]):
        groups: dict[tuple, list[nn.Module]] = {}
        for layer in {id(m): m for m in layers}.values():
            t = layer.theta
            key = (layer.parametrization, tuple(t.shape[-2:]), t.dtype, t.device)
            groups.setdefault(key, []).append(layer)
        self.groups = list(groups.values())
        self.weights: dict[int, Tensor] = {}
        self._grads: dict[int, Tensor] = {}
        with torch.no_grad():
            for group in self.groups:
                w = orthogonal_weight(_stacked(group), group[0].parametrization)
                self.weights.update(_split(group, w))

    def add_grad(self, layer: nn.Module, grad_w: Tensor) -> None:
        """Add ``dL/dW`` of one use of ``layer``'s matrices."""
        known = self._grads.get(id(layer))
        self._grads[id(layer)] = grad_w if known is None else known + grad_w

    def discard_grads(self) -> None:
        """Forget the ``dL/dW`` gathered so far (before a backward pass starts)."""
        self._grads = {}

    def grads(self) -> list[tuple[nn.Parameter, Tensor]]:
        """``(theta, dL/dtheta)`` of every layer given a ``dL/dW`` since the last call."""
        out = []
        for group in self.groups:
            used = [m for m in group if id(m) in self._grads]
            if not used:
                continue
            theta = _stacked(used, detach=True).requires_grad_()
            with torch.enable_grad():
                w = orthogonal_weight(theta, used[0].parametrization)
            grad_w = torch.cat([self._grads[id(m)].reshape(-1, *w.shape[-2:]) for m in used])
            (grad,) = torch.autograd.grad(w, theta, grad_w)
            sizes = [_count(m) for m in used]
            out += [
                (m.theta, g.view(m.theta.shape))
                for m, g in zip(used, grad.split(sizes), strict=True)
            ]
        self._grads = {}
        return out


def _count(layer: nn.Module) -> int:
    """How many matrices ``layer.theta`` holds."""
    return math.prod(layer.theta.shape[:-2])


def _stacked(layers: Sequence[nn.Module], detach: bool = False) -> Tensor:
    """The layers' parameters as one batch ``(N, *theta.shape[-2:])``."""
    return torch.cat(
        [(m.theta.detach() if detach else m.theta).reshape(-1, *m.theta.shape[-2:]) for m in layers]
    )


def _split(layers: Sequence[nn.Module], w: Tensor) -> dict[int, Tensor]:
    """The batch ``w`` of matrices back to each layer's ``(*theta.shape[:-2], n, n)``."""
    pieces = w.split([_count(m) for m in layers])
    return {
        id(m): piece.view(*m.theta.shape[:-2], *w.shape[-2:])
        for m, piece in zip(layers, pieces, strict=True)
    }


def layer_matrices(layer: nn.Module) -> Tensor:
    """``orthogonal_weight(layer.theta, layer.parametrization)``; without grad mode, inside
    :func:`batched_weights`, the batch's."""
    cached = None if torch.is_grad_enabled() else batch_weight(layer)
    return orthogonal_weight(layer.theta, layer.parametrization) if cached is None else cached


def batch_weight(layer: nn.Module) -> Tensor | None:
    """``layer``'s matrices from the active :class:`WeightBatch`, or None outside one."""
    batch = _BATCH.get()
    return None if batch is None else batch.weights.get(id(layer))


def add_batch_grad(layer: nn.Module, grad_w: Tensor) -> None:
    """Hand ``dL/dW`` of ``layer``'s matrices to the active batch (see :func:`batch_weight`)."""
    batch = _BATCH.get()
    if batch is None:
        raise RuntimeError("no WeightBatch is active")
    batch.add_grad(layer, grad_w)


_BATCH: ContextVar[WeightBatch | None] = ContextVar("orthogonal_weight_batch", default=None)

#: Chains batch their orthogonal layers' weights (:class:`WeightBatch`); False computes each
#: layer's weight on its own at every use, as a baseline for benchmarks.
BATCH_WEIGHTS = True


@contextmanager
def batched_weights(batch: WeightBatch | None) -> Iterator[WeightBatch | None]:
    """Within, :class:`OrthogonalConv` layers of ``batch`` take their weight from it (in
    no-grad mode and in their memory-efficient backward); None leaves them as they are."""
    token = _BATCH.set(batch)
    try:
        yield batch
    finally:
        _BATCH.reset(token)


def _mix_channels(x: Tensor, w: Tensor) -> Tensor:
    """``y[:, i] = sum_j w[i, j] x[:, j]`` for ``x`` of shape ``(B, C, *spatial)``."""
    if x.ndim < 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected input of shape (B, {w.shape[1]}, ...), got {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        flat = _flat(x)
        return torch.bmm(_batched(w.to(x.dtype), flat), flat).view(x.shape)


def _batched(w: Tensor, flat: Tensor) -> Tensor:
    """``w`` ``(C, C)`` as a ``(B, C, C)`` view for ``bmm`` with ``flat`` ``(B, C, N)``: one
    operator, where ``w @ flat`` broadcasts through a dozen."""
    return w.expand(flat.shape[0], *w.shape)


def _flat_view(t: Tensor) -> Tensor | None:
    """``t`` as a ``(B, C, positions)`` view of its own memory, or None where its strides
    do not allow one."""
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return None


#: In-place mixing goes a slab of positions at a time, so that its temporary is a small
#: part of the state; slabs are at least this large, so small states go in one kernel.
MIN_SLAB_BYTES = 4 * 2**20


def _slab_positions(flat: Tensor, chunks: int) -> int:
    """Positions per slab of ``flat`` ``(B, C, N)``: ``N / chunks``, or ``MIN_SLAB_BYTES``
    worth where that is more."""
    n = flat.shape[-1]
    per_position = flat.shape[0] * flat.shape[1] * flat.element_size()
    return max(1, -(-n // chunks), MIN_SLAB_BYTES // per_position)


def _mix_in_place(x: Tensor, w: Tensor, chunks: int = 8) -> Tensor | None:
    """``x`` mixed by ``W`` (as :func:`_mix_channels`) in its own memory, a slab of
    positions at a time (:func:`_slab_positions`); None (``x`` untouched) where its
    strides do not allow."""
    flat = _flat_view(x)
    if flat is None:
        return None
    n, step = flat.shape[-1], _slab_positions(flat, chunks)
    with torch.autocast(flat.device.type, enabled=False):
        w = _batched(w.to(flat.dtype), flat)
        for start in range(0, n, step):
            slab = flat[..., start : start + step]
            slab.copy_(torch.bmm(w, slab))
    return x


def unmix(y: Tensor, grad_y: Tensor, w_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of a mixing ``y = w_t^T x``: ``x = w_t y``, ``grad_x = w_t grad_y`` and
    ``sum grad_y x^T`` over batch and positions (``(C, C)``).

    The engine owns ``y`` and ``grad_y``, so where their strides allow they are mixed in
    place, a slab of positions at a time (:func:`_unmix_in_place`), and the state is never
    held twice; otherwise into new tensors.
    """
    flat_y, flat_grad = _flat_view(y), _flat_view(grad_y)
    if flat_y is not None and flat_grad is not None:
        return y, grad_y, _unmix_in_place(flat_y, flat_grad, w_t)
    x = _mix_channels(y, w_t)
    grad_x = _mix_channels(grad_y, w_t)
    return x, grad_x, torch.einsum("bin,bjn->ij", _flat(grad_y), _flat(x))


def _unmix_in_place(flat_y: Tensor, flat_grad: Tensor, w_t: Tensor, chunks: int = 8) -> Tensor:
    """In place, ``x = W^T y`` and ``grad_x = W^T grad_y`` (both ``(B, C, N)``), a slab of
    positions at a time (:func:`_slab_positions`); returns ``dL/dW = sum grad_y x^T``."""
    n, step = flat_y.shape[-1], _slab_positions(flat_y, chunks)
    with torch.autocast(flat_y.device.type, enabled=False):
        w_t = w_t.to(flat_y.dtype)
        grad_w = flat_y.new_zeros(w_t.shape)
        w_t = _batched(w_t, flat_y)
        for start in range(0, n, step):
            y_slab = flat_y[..., start : start + step]
            grad_slab = flat_grad[..., start : start + step]
            x_slab = torch.bmm(w_t, y_slab)
            for grad_b, x_b in zip(grad_slab, x_slab, strict=True):
                grad_w.addmm_(grad_b, x_b.mT)  # one kernel; no (B, C, C) temporary
            y_slab.copy_(x_slab)
            del x_slab
            grad_slab.copy_(torch.bmm(w_t, grad_slab))
    return grad_w


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)
