"""The invertible Recurrent Inference Machine (Putzky & Welling, "Invert to Learn to Invert", 2019).

The machine's state ``eta`` stacks the image estimate (real and imaginary channel) and
hidden channels. Each time step injects the data-consistency gradient ``A^H (A x - y)`` of
the current estimate ``x`` and then runs invertible layers; the whole unrolled machine is
one :class:`~medinv.invertible.InvertibleSequential`, so memory-efficient training stores
only the final state, whatever the number of steps and layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medinv.invertible import (
    AdditiveCoupling,
    InvertibleModule,
    InvertibleSequential,
    OrthogonalConv,
    chain_context,
)
from medinv.invertible.base import ParamGrads
from medinv.invertible.orthogonal import (
    _mix_in_place,
    backward_weight,
    unmix,
    weight_grads,
)
from medinv.mri.operators import SenseOperator, SingleCoilOperator

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

#: The image estimate occupies the first two state channels (real, imaginary).
IMAGE_CHANNELS = 2


@dataclass(frozen=True)
class Measurements:
    """What the machine inverts: measured k-space ``y`` and its forward operator ``A``."""

    kspace: Tensor
    operator: SingleCoilOperator

    def dc_gradient(self, image: Tensor) -> Tensor:
        """``A^H (A x - y)`` for a complex image ``x`` ``(B, [S,] H, W)``."""
        return self.operator.dc_gradient(image, self.kspace.to(image.dtype))


def measurements(
    kspace: Tensor, mask: Tensor, sensitivities: Tensor | None, dim: int = 2
) -> Measurements:
    """Check shapes and pair k-space with its single-coil or SENSE operator.

    Args:
        kspace: measured (masked) k-space, complex: ``(B, H, W)`` single-coil or
            ``(B, C, H, W)`` multi-coil in 2D; ``(B, S, H, W)`` or ``(B, S, C, H, W)`` in 3D.
        mask: real 0/1 sampling mask broadcastable to ``kspace``.
        sensitivities: complex coil maps shaped like multi-coil ``kspace``; None for
            single-coil data.
        dim: 2 or 3, the model's spatial dimensions.
    """
    if not kspace.is_complex():
        raise ValueError(f"k-space must be complex, got {kspace.dtype}")
    single = dim + 1
    if sensitivities is None:
        if kspace.ndim != single:
            raise ValueError(
                f"single-coil k-space for a {dim}D model must have {single} dimensions "
                f"(B, {'S, ' if dim == 3 else ''}H, W), got {tuple(kspace.shape)}; multi-coil "
                "k-space needs coil sensitivities"
            )
        return Measurements(kspace, SingleCoilOperator(mask))
    if kspace.ndim != single + 1 or sensitivities.shape != kspace.shape:
        raise ValueError(
            f"multi-coil k-space and sensitivities for a {dim}D model must both be "
            f"(B, {'S, ' if dim == 3 else ''}C, H, W), got {tuple(kspace.shape)} and "
            f"{tuple(sensitivities.shape)}"
        )
    return Measurements(kspace, SenseOperator(sensitivities, mask))


def state_to_image(state: Tensor) -> Tensor:
    """The complex image ``(B, [S,] H, W)`` held in the first two channels of ``state``."""
    return torch.complex(state[:, 0], state[:, 1])


def image_to_channels(image: Tensor) -> Tensor:
    """Complex ``(B, *spatial)`` -> real ``(B, 2, *spatial)`` (real, imaginary)."""
    return torch.view_as_real(image).movedim(-1, 1)


class DataConsistencyGradient(nn.Module):
    """The gradient-injection function: image channels -> ``[Re, Im of A^H(A x - y), 0...]``.

    It reads the image ``x`` from its two input channels and the measurements from
    :func:`~medinv.invertible.chain_context`, and returns ``out_channels`` channels: the
    real and imaginary part of ``A^H (A x - y)`` followed by zeros. Inside an
    :class:`~medinv.invertible.AdditiveCoupling` with ``split=2`` it adds the gradient to
    state channels 2 and 3 and leaves the image unchanged, an invertible injection. The
    gradient is computed in the state's precision with autocast off.
    """

    def __init__(self, out_channels: int):
        super().__init__()
        if out_channels < IMAGE_CHANNELS:
            raise ValueError(f"out_channels must be at least 2, got {out_channels}")
        self.out_channels = out_channels

    def forward(self, image_channels: Tensor) -> Tensor:
        context = chain_context()
        if not isinstance(context, Measurements):
            raise RuntimeError(
                "the data-consistency gradient needs the measurements: call the chain as "
                "chain(state, context=Measurements(...))"
            )
        with torch.autocast(image_channels.device.type, enabled=False):
            gradient = image_to_channels(context.dc_gradient(state_to_image(image_channels)))
        zeros = gradient.new_zeros(
            gradient.shape[0], self.out_channels - IMAGE_CHANNELS, *gradient.shape[2:]
        )
        return torch.cat([gradient, zeros], 1)


class MultiScaleBlock(nn.Module):
    """The i-RIM coupling function ``G``: down by ``d``, a 3x3 convolution, back up by ``d``.

    ``conv(kernel d, stride d) -> ReLU -> conv(3x3) -> ReLU -> conv_transpose(kernel d,
    stride d)``, ``hidden_channels`` wide; with ``d = 1`` all are plain convolutions
    (1x1, 3x3, 1x1). Inputs whose size is not a multiple of ``d`` are zero-padded at the end
    and the output is cropped back. The last layer starts at zero, so a coupling layer
    holding the block starts as the identity.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, stride: int, dim: int
    ):
        super().__init__()
        self.stride = stride
        conv, conv_transpose = _CONV[dim], _CONV_TRANSPOSE[dim]
        self.down = conv(in_channels, hidden_channels, kernel_size=stride, stride=stride)
        self.mid = conv(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.up = conv_transpose(hidden_channels, out_channels, kernel_size=stride, stride=stride)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.shape[2:]
        widths = [w for n in reversed(spatial) for w in (0, -n % self.stride)]
        if any(widths):
            x = F.pad(x, widths)
        out = self.up(F.relu(self.mid(F.relu(self.down(x)))))
        return out[(slice(None), slice(None), *(slice(0, n) for n in spatial))]


class TransposedOrthogonalConv(InvertibleModule):
    """``y = W^T x`` for the orthogonal matrix ``W`` of ``conv`` (parameters shared).

    Its forward is ``conv.inverse`` and its inverse ``conv.forward``; the memory-efficient
    backward uses ``x = W y`` and ``dL/dW = x (dL/dy)^T`` instead of recomputing anything.
    """

    def __init__(self, conv: OrthogonalConv):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv.inverse(x)

    def forward_in_place(self, x: Tensor) -> Tensor | None:
        return _mix_in_place(x, self.conv.weight().mT)

    def inverse(self, y: Tensor) -> Tensor:
        return self.conv(y)

    def backward_pass(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None, params: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, ParamGrads]:
        w = backward_weight(self.conv)
        # y = W^T x: x = W y, and y_i = sum_j W_ji x_j gives dL/dW_ji = sum x_j grad_y_i,
        # the transpose of what unmix returns.
        x, grad_x, grad_w_t = unmix(y, grad_y, w.detach())
        if not params:
            return x, grad_x, []
        return x, grad_x, weight_grads(self.conv, w, grad_w_t.mT.to(w.dtype), params)


class IRIM(nn.Module):
    """The invertible RIM for Cartesian MRI reconstruction, single- or multi-coil, 2D or 3D.

    State ``eta`` ``(B, state_channels, *spatial)``: channels 0-1 hold the real and imaginary
    part of the image estimate ``x``, the rest are hidden. ``eta_0 = [A^H y, 0, ...]``. Each
    of the ``steps`` time steps applies

    1. gradient injection, an additive coupling: ``eta[2:4] += [Re, Im](A^H (A x - y))``
       with ``x`` read from the unchanged channels 0-1;
    2. ``layers_per_step`` invertible layers ``eta' = U eta; eta'_2 += G(eta'_1);
       eta = U^T eta'`` with ``U`` a 1x1 orthogonal convolution (random rotation at
       initialisation), ``eta'_1`` the first ``state_channels // 2`` channels, and ``G`` a
       :class:`MultiScaleBlock` with stride ``dilations[l]`` and ``hidden_channels`` width.

    The estimate is the complex image in channels 0-1 of the final state. ``G`` starts at
    zero, so an untrained machine returns the zero-filled image ``A^H y``. ``A`` is the
    per-slice 2D single-coil or SENSE operator (:mod:`medinv.mri.operators`); the 3D
    variant runs 3D convolutions over a slab of slices. The measurements reach the
    injection blocks through the chain's context; they receive no gradient in
    memory-efficient training.

    Args:
        dim: 2 (images) or 3 (slabs of slices).
        state_channels: channels of the machine state, at least 4.
        steps: time steps.
        layers_per_step: invertible layers per time step.
        dilations: the down/up-sampling factor ``d`` of ``G``, one per layer of a step.
        hidden_channels: width of ``G``.
        shared_weights: all time steps share one step's layers (a recurrent machine);
            by default every step has its own.
        memory_efficient: store only the final state and recompute in backward.

    Example::

        model = IRIM(state_channels=64, steps=8, hidden_channels=96)
        image = model(kspace, mask, sensitivities)   # (B, C, H, W) -> (B, H, W), complex
    """

    def __init__(
        self,
        *,
        dim: int = 2,
        state_channels: int = 64,
        steps: int = 8,
        layers_per_step: int = 10,
        dilations: Sequence[int] = (1, 1, 2, 2, 4, 4, 2, 2, 1, 1),
        hidden_channels: int = 64,
        shared_weights: bool = False,
        memory_efficient: bool = True,
    ):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if state_channels < 2 * IMAGE_CHANNELS:
            raise ValueError(
                f"state_channels must be at least 4 (image and gradient), got {state_channels}"
            )
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if layers_per_step < 1:
            raise ValueError(f"layers_per_step must be at least 1, got {layers_per_step}")
        dilations = tuple(dilations)
        if len(dilations) != layers_per_step:
            raise ValueError(
                f"dilations needs one factor per layer of a step ({layers_per_step}), got "
                f"{len(dilations)}: {dilations}"
            )
        if any(not isinstance(d, int) or d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {dilations}")
        if hidden_channels < 1:
            raise ValueError(f"hidden_channels must be positive, got {hidden_channels}")
        self.dim = dim
        self.state_channels = state_channels
        self.steps = steps
        self.dilations = dilations
        self.hidden_channels = hidden_channels
        self.shared_weights = shared_weights
        if shared_weights:
            per_step = [self._step_blocks()] * steps
        else:
            per_step = [self._step_blocks() for _ in range(steps)]
        self.blocks_per_step = len(per_step[0])
        self.network = InvertibleSequential(
            *itertools.chain.from_iterable(per_step), memory_efficient=memory_efficient
        )

    @property
    def memory_efficient(self) -> bool:
        return self.network.memory_efficient

    def _step_blocks(self) -> list[InvertibleModule]:
        c = self.state_channels
        c1 = c // 2
        blocks: list[InvertibleModule] = [
            AdditiveCoupling(DataConsistencyGradient(c - IMAGE_CHANNELS), split=IMAGE_CHANNELS)
        ]
        for d in self.dilations:
            mixing = OrthogonalConv(c, init="random")
            g = MultiScaleBlock(c1, c - c1, self.hidden_channels, d, self.dim)
            blocks += [mixing, AdditiveCoupling(g, split=c1), TransposedOrthogonalConv(mixing)]
        return blocks

    def measurements(
        self, kspace: Tensor, mask: Tensor, sensitivities: Tensor | None = None
    ) -> Measurements:
        """The chain context for ``kspace`` (see :func:`measurements`)."""
        return measurements(kspace, mask, sensitivities, self.dim)

    def initial_state(
        self, kspace: Tensor, mask: Tensor, sensitivities: Tensor | None = None
    ) -> Tensor:
        """``eta_0``: the zero-filled image ``A^H y`` in channels 0-1, zeros elsewhere."""
        return self._initial_state(self.measurements(kspace, mask, sensitivities))

    def _initial_state(self, data: Measurements) -> Tensor:
        image = image_to_channels(data.operator.adjoint(data.kspace))
        hidden = image.new_zeros(
            image.shape[0], self.state_channels - IMAGE_CHANNELS, *image.shape[2:]
        )
        return torch.cat([image, hidden], 1)

    def final_state(
        self, kspace: Tensor, mask: Tensor, sensitivities: Tensor | None = None
    ) -> Tensor:
        """The state after the last time step, ``(B, state_channels, *spatial)``."""
        data = self.measurements(kspace, mask, sensitivities)
        # The initial state is the network's own: it may work in its memory.
        return self.network(self._initial_state(data), context=data, overwrite_input=True)

    def inverse_state(
        self, final_state: Tensor, kspace: Tensor, mask: Tensor, sensitivities: Tensor | None = None
    ) -> Tensor:
        """The initial state that :meth:`final_state` maps to ``final_state``.

        The time steps run last to first, each with its own layers, inverted last to first.
        """
        data = self.measurements(kspace, mask, sensitivities)
        return self.network.inverse(final_state, context=data)

    def forward(self, kspace: Tensor, mask: Tensor, sensitivities: Tensor | None = None) -> Tensor:
        """The complex image estimate ``(B, [S,] H, W)`` on the full k-space matrix.

        Args:
            kspace: measured k-space, complex ``(B, [S,] [C,] H, W)`` (see
                :func:`measurements`).
            mask: real 0/1 mask broadcastable to ``kspace``, e.g. ``(B, 1, 1, W)``.
            sensitivities: complex coil maps shaped like ``kspace`` (multi-coil only).
        """
        return state_to_image(self.final_state(kspace, mask, sensitivities))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, state_channels={self.state_channels}, steps={self.steps}, "
            f"dilations={self.dilations}, hidden_channels={self.hidden_channels}, "
            f"shared_weights={self.shared_weights}"
        )
