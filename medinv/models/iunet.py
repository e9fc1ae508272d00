"""Fully invertible U-Nets with learnable orthogonal resampling (Etmann, Ke, Schönlieb 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from medinv.invertible import (
    AdditiveCoupling,
    AffineCoupling,
    ChannelSubset,
    InvertibleDownsampling,
    InvertibleModule,
    InvertibleSequential,
    InvertibleUpsampling,
    OrthogonalConv,
)
from medinv.invertible.orthogonal import Parametrization
from medinv.invertible.resampling import Init

from .blocks import BlockBuilder, Norm, conv_norm_act

Stride = int | Sequence[int]
PaddingMode = Literal["constant", "reflect", "replicate", "circular"]
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class InvertibleUNet(InvertibleModule):
    """The invertible U-Net: one bijection ``(B, C, *S) -> (B, C, *S)``.

    Scale ``i`` (of ``len(architecture)``) runs ``architecture[i]`` coupling layers on the
    way down (``Phi_i^L``), sets aside the first ``skip_i`` channels as the skip connection,
    downsamples the other ``d_i = C_i * split_fraction`` channels with a learnable orthogonal
    downsampling (``C_{i+1} = d_i * prod(stride_i)``), and on the way up upsamples back,
    restores the skip channels and runs ``architecture[i]`` more coupling layers
    (``Phi_i^R``); the bottom scale runs both sides back to back. With ``channel_mixing``,
    a 1x1 orthogonal convolution (starting at the identity) mixes the channels before each
    split and after each merge, so the skip is not a fixed channel subset. Coupling layers
    are additive (``coupling="additive"``, volume-preserving; with two functions, the
    RevNet form, or one function, alternating halves) or affine (with a log-det, for
    flows); their functions come from ``block_builder`` and start at zero, so the network
    starts as the identity.

    Memory-efficient training stores only the output, whatever the depth and number of
    scales (the skip connections live inside one chain, see
    :class:`~medinv.invertible.ChannelSubset`).

    Inputs whose spatial size is not a multiple of the total stride are padded
    (``padding_mode``) and the output cropped back; such outputs cannot be inverted.

    Args:
        channels: ``C_0``, the channels of input and output.
        dim: 1, 2 or 3 spatial dimensions.
        architecture: coupling layers per side, per scale (its length is the number of
            scales).
        strides: downsampling stride after each scale but the last: one int for all, or
            one int or per-axis tuple per downsampling (anisotropic strides allowed).
        split_fraction: fraction of the channels that is downsampled at each scale (the
            rest is the skip). Default 1/2 in 1D/2D and 1/4 in 3D, which doubles the
            channels per scale with stride 2.
        coupling: ``"additive"`` or ``"affine"``.
        coupling_functions: functions per additive coupling layer: 2 (F and G, both halves
            updated) or 1 (one half updated, alternating from layer to layer).
        channel_mixing: orthogonal 1x1 channel mixing around each split and merge.
        norm: normalisation inside the default coupling functions.
        block_builder: ``builder(in_channels, out_channels, dim)`` for custom coupling
            functions; the default is :func:`~medinv.models.blocks.conv_norm_act`.
        resampling_init, parametrization: of the orthogonal resampling layers.
        padding_mode: how inputs are padded to a multiple of the total stride.
        memory_efficient: store only the output and recompute in backward.
    """

    def __init__(
        self,
        channels: int,
        dim: int = 2,
        architecture: Sequence[int] = (2, 2, 2, 2),
        strides: Stride | Sequence[Stride] = 2,
        split_fraction: float | None = None,
        coupling: Literal["additive", "affine"] = "additive",
        coupling_functions: Literal[1, 2] = 2,
        channel_mixing: bool = True,
        norm: Norm = "group",
        block_builder: BlockBuilder | None = None,
        resampling_init: Init = "haar",
        parametrization: Parametrization = "exp",
        padding_mode: PaddingMode = "constant",
        memory_efficient: bool = True,
    ):
        super().__init__()
        if dim not in (1, 2, 3):
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        if not architecture or any(n < 0 for n in architecture):
            raise ValueError(f"architecture needs one non-negative count per scale: {architecture}")
        if coupling not in ("additive", "affine"):
            raise ValueError(f"unknown coupling {coupling!r}; choose 'additive' or 'affine'")
        if coupling_functions not in (1, 2):
            raise ValueError(f"coupling_functions must be 1 or 2, got {coupling_functions}")
        self.dim = dim
        self.architecture = tuple(architecture)
        self.strides = _strides_per_scale(strides, len(architecture) - 1, dim)
        self.split_fraction = split_fraction or (0.25 if dim == 3 else 0.5)
        self.coupling = coupling
        self.coupling_functions = coupling_functions
        self.channel_mixing = channel_mixing
        self.padding_mode = padding_mode
        self.channels_per_scale = self._channel_plan(channels)
        builder = block_builder or partial(conv_norm_act, norm=norm)
        resample = {"init": resampling_init, "parametrization": parametrization}
        self.net = InvertibleSequential(
            *self._level(0, builder, resample), memory_efficient=memory_efficient
        )

    @property
    def memory_efficient(self) -> bool:
        return self.net.memory_efficient

    @property
    def total_stride(self) -> tuple[int, ...]:
        """The spatial size of inputs that need no padding is a multiple of this, per axis."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.dim))

    def _channel_plan(self, channels: int) -> list[tuple[int, int]]:
        """``(channels, skip channels)`` per scale; validated here, with clear messages."""
        plan = []
        for i, stride in enumerate(self.strides):
            down = channels * self.split_fraction
            if down != int(down) or not 1 <= down <= channels:
                raise ValueError(
                    f"scale {i}: split_fraction {self.split_fraction} of {channels} channels is "
                    "not a whole number of channels"
                )
            plan.append((channels, channels - int(down)))
            channels = int(down) * math.prod(stride)
        plan.append((channels, 0))
        for i, (c, _) in enumerate(plan):
            if c < 2 and self.architecture[i] > 0:
                raise ValueError(f"scale {i} has {c} channel(s); a coupling layer needs 2")
        return plan

    def _couplings(self, count: int, channels: int, builder: BlockBuilder) -> list:
        c1 = channels // 2
        c2 = channels - c1
        if self.coupling == "affine":
            return [AffineCoupling(builder(c1, 2 * c2, self.dim), split=c1) for _ in range(count)]
        if self.coupling_functions == 2:
            return [
                AdditiveCoupling(builder(c1, c2, self.dim), builder(c2, c1, self.dim), split=c1)
                for _ in range(count)
            ]
        return [
            AdditiveCoupling(
                builder(c2, c1, self.dim) if j % 2 else builder(c1, c2, self.dim),
                split=c1,
                swap=bool(j % 2),
            )
            for j in range(count)
        ]

    def _level(self, i: int, builder: BlockBuilder, resample: dict) -> list[InvertibleModule]:
        channels, skip = self.channels_per_scale[i]
        left = self._couplings(self.architecture[i], channels, builder)
        right = self._couplings(self.architecture[i], channels, builder)
        if i == len(self.architecture) - 1:
            return [*left, *right]
        inner = InvertibleSequential(
            InvertibleDownsampling(channels - skip, self.strides[i], self.dim, **resample),
            *self._level(i + 1, builder, resample),
            InvertibleUpsampling(
                self.channels_per_scale[i + 1][0], self.strides[i], self.dim, **resample
            ),
        )

        def mixing() -> list[InvertibleModule]:
            if not self.channel_mixing:
                return []
            return [OrthogonalConv(channels, resample["parametrization"], init="identity")]

        return [*left, *mixing(), ChannelSubset(inner, keep=skip), *mixing(), *right]

    def _padding(self, spatial: Sequence[int]) -> list[int]:
        """``F.pad`` widths (last axis first) that make ``spatial`` a multiple of the stride."""
        widths = []
        for n, s in zip(reversed(spatial), reversed(self.total_stride), strict=True):
            extra = -n % s
            widths += [extra // 2, extra - extra // 2]
        return widths

    def _check(self, x: Tensor) -> None:
        c = self.channels_per_scale[0][0]
        if x.ndim != self.dim + 2 or x.shape[1] != c:
            raise ValueError(
                f"expected input of shape (B, {c}, <{self.dim} spatial dims>), got {tuple(x.shape)}"
            )

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        padded, widths = self.pad(x)
        y, log_det = self.net.forward_and_log_det(padded)
        return self.crop(y, widths), log_det

    def forward(self, x: Tensor, overwrite_input: bool = False) -> Tensor:
        """``overwrite_input``: without a graph, the network may work in ``x``'s memory
        (see :meth:`InvertibleSequential.forward`); a padded input is its own anyway."""
        self._check(x)
        padded, widths = self.pad(x)
        return self.crop(self.net(padded, overwrite_input=overwrite_input or any(widths)), widths)

    def pad(self, x: Tensor) -> tuple[Tensor, list[int]]:
        """``x`` padded (``padding_mode``) to a multiple of the total stride, or ``x`` itself
        where it is one, and the ``F.pad`` widths that :meth:`crop` takes."""
        widths = self._padding(x.shape[2:])
        return (F.pad(x, widths, mode=self.padding_mode) if any(widths) else x), widths

    @staticmethod
    def crop(y: Tensor, widths: Sequence[int]) -> Tensor:
        """``y`` cropped back to the size before :meth:`pad` (a view)."""
        return _crop(y, widths) if any(widths) else y

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        if any(self._padding(y.shape[2:])):
            raise ValueError(
                f"cannot invert an output of spatial size {tuple(y.shape[2:])}: it is not a "
                f"multiple of the total stride {self.total_stride}, so the forward pass padded "
                "its input and cropped the output, which loses information; invert outputs of "
                "inputs whose size is a multiple of the total stride"
            )
        return self.net.inverse(y)

    def summary(self, spatial_shape: Sequence[int] | None = None) -> str:
        """The layout per scale: channels, skip channels, couplings, stride and shape."""
        shape = list(spatial_shape) if spatial_shape is not None else None
        if shape is not None:
            widths = self._padding(shape)
            shape = [n + widths[-2 - 2 * a] + widths[-1 - 2 * a] for a, n in enumerate(shape)]
        lines = [
            f"InvertibleUNet({self.dim}D, {self.coupling} couplings, "
            f"split fraction {self.split_fraction:g}, "
            f"{'memory-efficient' if self.memory_efficient else 'plain autograd'})",
            f"{'scale':>5} {'channels':>9} {'skip':>6} {'couplings':>10} {'stride':>10}"
            + ("  shape" if shape is not None else ""),
        ]
        for i, (channels, skip) in enumerate(self.channels_per_scale):
            last = i == len(self.architecture) - 1
            couplings = f"{self.architecture[i]}+{self.architecture[i]}"
            stride = "-" if last else "x".join(map(str, self.strides[i]))
            line = f"{i:>5} {channels:>9} {skip:>6} {couplings:>10} {stride:>10}"
            if shape is not None:
                line += "  " + "x".join(map(str, shape))
                if not last:
                    shape = [n // s for n, s in zip(shape, self.strides[i], strict=True)]
            lines.append(line)
        params = sum(p.numel() for p in self.parameters())
        lines.append(f"total stride {'x'.join(map(str, self.total_stride))}, {params:,} parameters")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


class IUNet(nn.Module):
    """An iUNet for segmentation or regression (the paper's Figure 5).

    ``out(core(in(x)))``: a learnable 1x1 projection from ``in_channels`` to ``channels``
    (the channel blow-up), the :class:`InvertibleUNet` core, and a 1x1 projection to
    ``out_channels`` (class logits or outputs). The projections store only their inputs:
    the input itself and the core's output, which the engine keeps anyway.

    Args:
        in_channels: input channels (e.g. 4 MRI contrasts).
        out_channels: output channels (e.g. 3 tumour regions).
        channels: the channel blow-up ``C_0`` of the invertible core.
        **core: keyword arguments of :class:`InvertibleUNet` (``dim``, ``architecture``,
            ``strides``, ``split_fraction``, ``norm``, ``memory_efficient``, ...).

    Example::

        model = IUNet(4, 3, channels=16, dim=3, architecture=(2, 2, 2, 2, 2))
        logits = model(torch.randn(1, 4, 128, 128, 128))
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 64, **core):
        super().__init__()
        self.core = InvertibleUNet(channels, **core)
        conv = _CONV[self.core.dim]
        self.project_in = conv(in_channels, channels, 1)
        self.project_out = conv(channels, out_channels, 1)

    @property
    def total_stride(self) -> tuple[int, ...]:
        return self.core.total_stride

    def forward(self, x: Tensor) -> Tensor:
        # Padded here, the projection's unpadded output is freed before the core runs; the
        # core then works in the memory of the (padded) projection (no copy in inference).
        h, widths = self.core.pad(self.project_in(x))
        return self.project_out(self.core.crop(self.core(h, overwrite_input=True), widths))

    def summary(self, spatial_shape: Sequence[int] | None = None) -> str:
        return (
            f"IUNet: {self.project_in.in_channels} -> 1x1 -> {self.project_in.out_channels}"
            f" channels -> 1x1 -> {self.project_out.out_channels}\n"
            + self.core.summary(spatial_shape)
        )

    def __repr__(self) -> str:
        return self.summary()


def _strides_per_scale(strides: Stride | Sequence[Stride], count: int, dim: int):
    """One stride tuple per downsampling from an int (all scales, all axes) or a sequence
    with one int or tuple per downsampling."""

    def one(s) -> tuple[int, ...]:
        t = (s,) * dim if isinstance(s, int) else tuple(s)
        if len(t) != dim or any(not isinstance(v, int) or v < 1 for v in t):
            raise ValueError(f"a stride must be an int or {dim} positive integers, got {s}")
        return t

    if isinstance(strides, int):
        return [one(strides)] * count
    if len(strides) != count:
        raise ValueError(
            f"expected one stride per downsampling ({count}), got {len(strides)}: {strides}; "
            "pass an int for the same isotropic stride everywhere"
        )
    return [one(s) for s in strides]


def _crop(y: Tensor, widths: Sequence[int]) -> Tensor:
    index = [slice(None), slice(None)]
    spatial = y.shape[2:]
    for a, n in enumerate(spatial):
        before, after = widths[-2 - 2 * a], widths[-1 - 2 * a]
        index.append(slice(before, n - after))
    return y[tuple(index)]
