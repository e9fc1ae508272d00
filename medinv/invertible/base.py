"""The invertible-module protocol shared by every block and by the engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

ParamGrads = list[Tensor | None]


class InvertibleModule(nn.Module):
    """A bijection ``y = f(x)`` on tensors of shape ``(B, C, *spatial)``.

    Subclasses implement :meth:`forward` and :meth:`inverse`. Blocks whose Jacobian
    determinant is not 1 override :meth:`forward_and_log_det`. Blocks that can
    reconstruct their input more cheaply than "invert, then recompute the forward"
    override :meth:`backward_pass`, which the memory-efficient engine calls.
    """

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x), log|det df/dx|)``; the log-det has shape ``(B,)``."""
        return self(x), zero_log_det(x)

    def forward_in_place(self, x: Tensor) -> Tensor | None:
        """``forward(x)`` written into ``x``'s memory, or None where the block cannot.

        The engine calls it without a graph, on states the chain made itself, for
        volume-preserving blocks only (their log-det is 0). The default declines.
        """
        return None

    def log_det(self, x: Tensor) -> Tensor:
        """``log|det df/dx|`` per sample, shape ``(B,)`` (0 for volume-preserving blocks)."""
        return self.forward_and_log_det(x)[1]

    def backward_pass(
        self,
        y: Tensor,
        grad_y: Tensor,
        grad_log_det: Tensor | None,
        params: Sequence[Tensor],
    ) -> tuple[Tensor, Tensor | None, ParamGrads]:
        """Reconstruct the input from the output and back-propagate through the block.

        Args:
            y: the block's output (no graph attached). The engine owns it: the block may
                overwrite it, e.g. to build the input in its storage.
            grad_y: gradient of the loss with respect to ``y``; may be overwritten too.
            grad_log_det: gradient with respect to the block's log-det, ``(B,)``, or None
                when the log-det is not part of the loss.
            params: the tensors the block's trainable parameters currently stand for (the
                engine substitutes detached aliases, so that gradient hooks fire once).

        Returns:
            ``(x, grad_x, grads)``: the reconstructed input (detached), the gradient with
            respect to it, and one gradient (or None) per entry of ``params``.

        This default inverts without a graph and then re-runs the forward with one; blocks
        with a cheaper exact route (couplings, orthogonal layers) override it.
        """
        with torch.no_grad():
            x = self.inverse(y)
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            if grad_log_det is None:
                outputs, grad_outputs = [self(x)], [grad_y]
            else:
                y_graph, log_det = self.forward_and_log_det(x)
                outputs, grad_outputs = [y_graph, log_det], [grad_y, grad_log_det]
        grad_x, grads = vjp(outputs, grad_outputs, x, params)
        return x.detach(), grad_x, grads


_CONTEXT: ContextVar[Any] = ContextVar("medinv_chain_context", default=None)


def chain_context() -> Any:
    """The ``context`` the running chain was called with, or None.

    Blocks whose map depends on data besides their input read it here (the i-RIM's
    measurements and forward operator, for instance); the engine makes the same context
    current again when it recomputes the block in backward.
    """
    return _CONTEXT.get()


@contextmanager
def using_context(context: Any) -> Iterator[None]:
    """Make ``context`` what :func:`chain_context` returns inside the block."""
    token = _CONTEXT.set(context)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def zero_log_det(x: Tensor) -> Tensor:
    """The log-det of a volume-preserving map: zeros of shape ``(B,)``."""
    return x.new_zeros(x.shape[0])


def vjp(
    outputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    leaf: Tensor,
    params: Sequence[Tensor],
) -> tuple[Tensor | None, ParamGrads]:
    """Vector-Jacobian product of ``outputs`` with respect to ``leaf`` and ``params``.

    Outputs that carry no graph (e.g. a constant log-det) are skipped.
    """
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    if not pairs:
        return None, [None] * len(params)
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        [leaf, *params],
        [g for _, g in pairs],
        allow_unused=True,
    )
    return grads[0], list(grads[1:])


def add_grads(a: ParamGrads, b: Sequence[Tensor | None]) -> ParamGrads:
    """Sum two gradient lists entry by entry, treating None as zero."""
    return [
        gb if ga is None else ga if gb is None else ga + gb for ga, gb in zip(a, b, strict=True)
    ]


def split_channels(x: Tensor, first: int | None) -> tuple[Tensor, Tensor]:
    """Views of the first ``first`` channels (default ``C // 2``) and the rest."""
    c1 = x.shape[1] // 2 if first is None else first
    if not 0 < c1 < x.shape[1]:
        raise ValueError(f"cannot split {x.shape[1]} channels into {c1} and {x.shape[1] - c1}")
    return x[:, :c1], x[:, c1:]
