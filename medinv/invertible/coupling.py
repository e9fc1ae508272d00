"""Coupling layers: invertible whatever the coupling functions are."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import InvertibleModule, ParamGrads, add_grads, split_channels, vjp
from .memory import UNSAVED_OUTPUT_USES as UNSAVED_USES
from .memory import storage_uses


class AdditiveCoupling(InvertibleModule):
    """Additive coupling (NICE / RevNet).

    The input is split along channels into ``x1`` (the first ``split`` channels, default
    ``C // 2``) and ``x2``. With one function::

        y1 = x1,            y2 = x2 + f(x1)

    and with two functions (the RevNet form), additionally::

        y1 = x1 + g(y2)

    ``swap=True`` exchanges the roles of the halves (``f`` reads ``x2`` and updates
    ``x1``), so that consecutive single-function couplings can alternate. The map is
    volume-preserving (log-det 0). ``f`` maps the read half's channels to the updated
    half's and ``g`` the reverse; both may be any module, including normalisation and
    dropout.

    In the memory-efficient backward each function is evaluated exactly once: the
    evaluation that reconstructs the input also provides the graph for the gradient.
    """

    def __init__(
        self,
        f: nn.Module,
        g: nn.Module | None = None,
        split: int | None = None,
        swap: bool = False,
    ):
        super().__init__()
        self.f = f
        self.g = g
        self.split = split
        self.swap = swap

    def _halves(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(the half ``f`` reads, the half ``f`` updates), as views."""
        first, second = split_channels(t, self.split)
        return (second, first) if self.swap else (first, second)

    def _join(self, read: Tensor, updated: Tensor) -> Tensor:
        return torch.cat([updated, read] if self.swap else [read, updated], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self._halves(x)
        y2 = x2 + self.f(x1)
        y1 = x1 if self.g is None else x1 + self.g(y2)
        return self._join(y1, y2)

    def forward_in_place(self, x: Tensor) -> Tensor:
        x1, x2 = self._halves(x)
        x2.add_(self.f(x1))
        if self.g is not None:
            x1.add_(self.g(x2))
        return x

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = self._halves(y)
        x1 = y1 if self.g is None else y1 - self.g(y2)
        x2 = y2 - self.f(x1)
        return self._join(x1, x2)

    def backward_pass(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None, params: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, ParamGrads]:
        # The engine owns y and grad_y, so the input and its gradient are built in their
        # storage (the halves are views): no copy of the state per block.
        y1, y2 = self._halves(y)
        grad_y1, grad_y2 = self._halves(grad_y)
        grads: ParamGrads = [None] * len(params)
        if self.g is not None:
            # y1 = x1 + g(y2): g's output turns y1 into x1 and its graph takes grad_y1 to y2.
            grads = _undo_addition(self.g, y2, y1, grad_y1, grad_y2, params)
        # y2 = x2 + f(x1): f's output turns y2 into x2 and its graph takes grad_y2 to x1.
        grads_f = _undo_addition(self.f, y1, y2, grad_y2, grad_y1, params)
        return y, grad_y, add_grads(grads, grads_f)


def _undo_addition(
    fn: nn.Module,
    arg: Tensor,
    total: Tensor,
    grad_total: Tensor,
    grad_arg: Tensor,
    params: Sequence[Tensor],
) -> ParamGrads:
    """For ``total = rest + fn(arg)``, in place: ``total -> rest``, ``grad_arg += J^T grad_total``.

    ``fn`` is evaluated once, with a graph; that evaluation serves the reconstruction and
    the vector-Jacobian product alike. Returns the parameter gradients.
    """
    leaf = arg.detach().requires_grad_()
    with torch.enable_grad():
        out = fn(leaf)
    # fn's graph saved views of the state (arg), which share the state's version counter;
    # writing ``total`` through an alias with a counter of its own does not trip it.
    _unversioned(total).sub_(out.detach())
    if out.requires_grad and (uses := storage_uses(out)) is not None and uses <= UNSAVED_USES:
        # Nothing in fn's graph reads its output: free it before the backward needs room.
        out.untyped_storage().resize_(0)
    grad_leaf, grads = vjp([out], [grad_total], leaf, params)
    if grad_leaf is not None:
        grad_arg.add_(grad_leaf)
    return grads


def _unversioned(t: Tensor) -> Tensor:
    """A tensor over ``t``'s memory whose in-place updates autograd does not count."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class AffineCoupling(InvertibleModule):
    """Affine coupling (RealNVP / Glow) with a bounded, smooth scale.

    With ``x1, x2`` split as in :class:`AdditiveCoupling` and ``(h, t) = net(x1)`` split
    in half along channels::

        log s = c * tanh(h / c),     y1 = x1,     y2 = s * x2 + t

    ``tanh(z) = 2 sigmoid(2z) - 1``, so ``log s`` is a rescaled sigmoid of ``h``: it is the
    identity near 0 and bounded by ``c = clamp``, so neither the forward nor the inverse
    can blow up. ``log|det| = sum(log s)`` per sample. A zero-initialised last layer of
    ``net`` makes the block start as the identity. ``net`` maps ``x1``'s channels to twice
    ``x2``'s.
    """

    def __init__(self, net: nn.Module, split: int | None = None, clamp: float = 2.0):
        super().__init__()
        if clamp <= 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        self.net = net
        self.split = split
        self.clamp = clamp

    def _log_scale_and_shift(self, x1: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        h, t = self.net(x1).chunk(2, dim=1)
        # The scale is computed in the state's precision even when net runs in fp16/bf16.
        log_s = self.clamp * torch.tanh(h.to(dtype) / self.clamp)
        return log_s, t.to(dtype)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = split_channels(x, self.split)
        log_s, t = self._log_scale_and_shift(x1, x2.dtype)
        y2 = x2 * torch.exp(log_s) + t
        return torch.cat([x1, y2], dim=1), log_s.flatten(1).sum(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = split_channels(y, self.split)
        log_s, t = self._log_scale_and_shift(y1, y2.dtype)
        return torch.cat([y1, (y2 - t) * torch.exp(-log_s)], dim=1)

    def backward_pass(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None, params: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, ParamGrads]:
        y1, y2 = split_channels(y, self.split)
        grad_y1, grad_y2 = split_channels(grad_y, self.split)
        x1 = y1.detach().requires_grad_()
        with torch.enable_grad():
            log_s, t = self._log_scale_and_shift(x1, y2.dtype)
        x2 = ((y2 - t.detach()) * torch.exp(-log_s.detach())).requires_grad_()
        with torch.enable_grad():
            outputs = [x2 * torch.exp(log_s) + t]
            grad_outputs = [grad_y2]
            if grad_log_det is not None:
                outputs.append(log_s.flatten(1).sum(1))
                grad_outputs.append(grad_log_det)
        grads = torch.autograd.grad(outputs, [x1, x2, *params], grad_outputs, allow_unused=True)
        grad_x1 = grad_y1 if grads[0] is None else grad_y1 + grads[0]
        x = torch.cat([y1, x2.detach()], dim=1)
        return x, torch.cat([grad_x1, grads[1]], dim=1), list(grads[2:])
