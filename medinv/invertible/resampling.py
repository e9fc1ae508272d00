"""Learnable orthogonal down- and upsampling (iUNet, Etmann et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import InvertibleModule, ParamGrads
from .orthogonal import (
    Parametrization,
    add_batch_grad,
    batch_weight,
    initial_parameters,
    layer_matrices,
)

Init = Literal["haar", "pixel_shuffle", "random"]
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_WEIGHT_GRAD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def haar_matrix(stride: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Haar analysis matrix for a patch of shape ``stride`` (each 1 or 2).

    Row ``r`` is the ``r``-th filter flattened in row-major order: the Kronecker product,
    axis by axis, of the low-pass ``[1, 1]/sqrt(2)`` and high-pass ``[1, -1]/sqrt(2)``.
    For ``stride = (2, 2)`` the rows are LL, LH, HL, HH of the 2D Haar transform.
    """
    if any(s not in (1, 2) for s in stride):
        raise ValueError(f"the Haar init needs strides of 1 or 2, got {tuple(stride)}")
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    w = torch.ones(1, 1, dtype=torch.float64)
    for s in stride:
        w = torch.kron(w, h2 if s == 2 else torch.ones(1, 1, dtype=torch.float64))
    return w.to(dtype)


class _OrthogonalResampling(InvertibleModule):
    """Shared machinery: ``channels`` low-resolution channels, ``channels * prod(stride)`` high.

    Per channel ``c`` an orthogonal matrix ``W_c = P(theta_c) H`` of size
    ``sigma = prod(stride)``, with ``P`` a parametrization starting at the identity and ``H``
    the Haar matrix (init ``"haar"``) or the identity (``"pixel_shuffle"``; ``"random"``
    starts ``P`` at a random rotation instead). Its rows, reshaped to ``stride``, are the
    filters of a grouped convolution with kernel = stride. Because the patches do not overlap
    and the filters are orthonormal, the convolution is orthogonal and its inverse is the
    transposed convolution.
    """

    def __init__(
        self,
        channels: int,
        stride: int | Sequence[int],
        dim: int,
        init: Init,
        parametrization: Parametrization,
    ):
        super().__init__()
        if dim not in _CONV:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        stride = (stride,) * dim if isinstance(stride, int) else tuple(stride)
        if len(stride) != dim or any(s < 1 for s in stride):
            raise ValueError(f"stride must be {dim} positive integers, got {stride}")
        self.channels = channels
        self.stride = stride
        self.dim = dim
        self.parametrization = parametrization
        if init not in ("haar", "pixel_shuffle", "random"):
            raise ValueError(f"unknown init {init!r}; choose 'haar', 'pixel_shuffle' or 'random'")
        self.init = init
        if init == "haar":
            haar_matrix(stride)  # fail early on strides the Haar init cannot serve
        theta = initial_parameters(
            (channels,), math.prod(stride), parametrization, random=init == "random"
        )
        self.theta = nn.Parameter(theta)
        self._haar: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def kernel(self) -> Tensor:
        """The convolution kernel ``(channels * sigma, 1, *stride)``."""
        return self._kernel_from(layer_matrices(self))

    def _kernel_from(self, w: Tensor) -> Tensor:
        """The kernel of the per-channel orthogonal matrices ``w`` ``(channels, sigma, sigma)``."""
        if self.init == "haar":
            # Built in the parameters' own precision, so it stays exactly orthonormal.
            key = (self.theta.dtype, self.theta.device)
            if key not in self._haar:
                self._haar[key] = haar_matrix(self.stride, key[0]).to(key[1])
            with torch.autocast(key[1].type, enabled=False):
                w = w @ self._haar[key]
        return w.reshape(-1, 1, *self.stride)

    def _down(self, x: Tensor, k: Tensor) -> Tensor:
        self._check(x, self.channels, "high-resolution")
        with torch.autocast(x.device.type, enabled=False):
            return _CONV[self.dim](x, k.to(x.dtype), stride=self.stride, groups=self.channels)

    def _up(self, y: Tensor, k: Tensor) -> Tensor:
        self._check(y, self.channels * math.prod(self.stride), "low-resolution")
        with torch.autocast(y.device.type, enabled=False):
            return _CONV_T[self.dim](y, k.to(y.dtype), stride=self.stride, groups=self.channels)

    def _check(self, x: Tensor, channels: int, side: str) -> None:
        if x.ndim != self.dim + 2 or x.shape[1] != channels:
            raise ValueError(
                f"{type(self).__name__} expects a {side} input of shape (B, {channels}, "
                f"<{self.dim} spatial dims>), got {tuple(x.shape)}"
            )
        if side == "high-resolution" and any(
            n % s for n, s in zip(x.shape[2:], self.stride, strict=True)
        ):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by stride {self.stride}"
            )

    def _kernel_with_graph(self) -> tuple[Tensor, Tensor | None]:
        """The kernel with its graph, evaluated once for the backward pass (on a GPU each
        orthogonal matrix costs a series of small operators). Inside a
        :class:`~medinv.invertible.orthogonal.WeightBatch` the graph starts at the batch's
        matrices, returned as the second item; otherwise at the parameters (None)."""
        cached = batch_weight(self)
        with torch.enable_grad():
            if cached is None:
                return self.kernel(), None
            w = cached.detach().requires_grad_()
            return self._kernel_from(w), w

    def _kernel_grads(
        self,
        params: Sequence[Tensor],
        kernel: tuple[Tensor, Tensor | None],
        high: Tensor,
        grad_low: Tensor,
    ) -> ParamGrads:
        """Gradients of the parameters given the kernel (from :meth:`_kernel_with_graph`),
        ``low = down(high)`` and ``dL/dlow``; inside a batch, ``dL/dW`` goes to the batch."""
        if not params:
            return []
        k, w = kernel
        grad_k = _CONV_WEIGHT_GRAD[self.dim](
            high, k.shape, grad_low, stride=self.stride, groups=self.channels
        ).to(k.dtype)
        if w is not None:
            (grad_w,) = torch.autograd.grad(k, w, grad_k)
            add_batch_grad(self, grad_w)
            return [None] * len(params)
        return list(torch.autograd.grad(k, params, grad_k, allow_unused=True))

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}, parametrization={self.parametrization!r}"


class InvertibleDownsampling(_OrthogonalResampling):
    """Learnable orthogonal downsampling: ``(B, C, *S) -> (B, C * prod(stride), *S / stride)``.

    Output channel ``c * sigma + r`` holds filter ``r`` of input channel ``c``. Inits:
    ``"haar"`` (exactly the Haar wavelet transform), ``"pixel_shuffle"`` (exactly
    ``pixel_unshuffle`` in 2D) or ``"random"``. Strides may differ per axis.
    """

    def __init__(
        self,
        in_channels: int,
        stride: int | Sequence[int] = 2,
        dim: int = 2,
        init: Init = "haar",
        parametrization: Parametrization = "exp",
    ):
        super().__init__(in_channels, stride, dim, init, parametrization)

    def forward(self, x: Tensor) -> Tensor:
        return self._down(x, self.kernel())

    def inverse(self, y: Tensor) -> Tensor:
        return self._up(y, self.kernel())

    def backward_pass(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None, params: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, ParamGrads]:
        kernel = self._kernel_with_graph()
        k = kernel[0].detach()
        x = self._up(y, k)
        return x, self._up(grad_y, k), self._kernel_grads(params, kernel, x, grad_y)


class InvertibleUpsampling(_OrthogonalResampling):
    """Learnable orthogonal upsampling, the inverse of :class:`InvertibleDownsampling`.

    ``(B, C, *S) -> (B, C / prod(stride), *S * stride)``; ``in_channels`` must be divisible
    by ``prod(stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        stride: int | Sequence[int] = 2,
        dim: int = 2,
        init: Init = "haar",
        parametrization: Parametrization = "exp",
    ):
        sigma = math.prod((stride,) * dim if isinstance(stride, int) else stride)
        if in_channels % sigma:
            raise ValueError(f"in_channels={in_channels} is not divisible by prod(stride)={sigma}")
        super().__init__(in_channels // sigma, stride, dim, init, parametrization)

    def forward(self, x: Tensor) -> Tensor:
        return self._up(x, self.kernel())

    def inverse(self, y: Tensor) -> Tensor:
        return self._down(y, self.kernel())

    def backward_pass(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None, params: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, ParamGrads]:
        kernel = self._kernel_with_graph()
        k = kernel[0].detach()
        x = self._down(y, k)
        # y = up(x) is the adjoint of down, so dL/dK pairs grad_y (as input) with x.
        return x, self._down(grad_y, k), self._kernel_grads(params, kernel, grad_y, x)
