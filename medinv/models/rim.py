"""The Recurrent Inference Machine baseline of the i-RIM supplement (Putzky & Welling, 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .irim import image_to_channels, measurements, state_to_image


class ConvGRUCell(nn.Module):
    """A convolutional GRU cell with 1x1 convolutions.

    ``z = sigmoid(W_z x + U_z h)``, ``r = sigmoid(W_r x + U_r h)``,
    ``n = tanh(W_n x + r * (U_n h))``, ``h' = (1 - z) * n + z * h``.
    """

    def __init__(self, in_channels: int, hidden_channels: int):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.input_gates = nn.Conv2d(in_channels, 3 * hidden_channels, 1)
        self.hidden_gates = nn.Conv2d(hidden_channels, 3 * hidden_channels, 1, bias=False)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        xz, xr, xn = self.input_gates(x).chunk(3, dim=1)
        hz, hr, hn = self.hidden_gates(h).chunk(3, dim=1)
        z = torch.sigmoid(xz + hz)
        r = torch.sigmoid(xr + hr)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class RIM(nn.Module):
    """A 2D RIM for Cartesian MRI: ``x_{t+1} = x_t + g_phi(x_t, A^H (A x_t - y), h_t)``.

    Per step the input ``[Re x_t, Im x_t, Re, Im of A^H (A x_t - y)]`` runs through
    ``Conv 5x5 -> ReLU -> ConvGRU (1x1) -> Conv 3x3 dilation 2 -> ReLU -> ConvGRU (1x1) ->
    Conv 3x3 (no bias)`` to the two-channel update; ``x_0 = A^H y`` and the hidden states
    start at zero. The last convolution starts at zero, so an untrained machine returns
    the zero-filled image. It trains with plain autograd: its memory grows with the number
    of steps (the comparison for :class:`~medinv.models.IRIM`).

    Args:
        steps: time steps ``T``.
        hidden_channels: width of every hidden layer and recurrent state.
    """

    def __init__(self, *, steps: int = 8, hidden_channels: int = 64):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if hidden_channels < 1:
            raise ValueError(f"hidden_channels must be positive, got {hidden_channels}")
        self.steps = steps
        self.hidden_channels = hidden_channels
        self.conv_in = nn.Conv2d(4, hidden_channels, 5, padding=2)
        self.gru1 = ConvGRUCell(hidden_channels, hidden_channels)
        self.conv_mid = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=2, dilation=2)
        self.gru2 = ConvGRUCell(hidden_channels, hidden_channels)
        self.conv_out = nn.Conv2d(hidden_channels, 2, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv_out.weight)

    def forward(
        self,
        kspace: Tensor,
        mask: Tensor,
        sensitivities: Tensor | None = None,
        return_all: bool = False,
    ) -> Tensor | list[Tensor]:
        """The complex image estimate ``(B, H, W)`` after the last step, or all ``steps``
        estimates with ``return_all`` (the training loss averages over them).

        Args: as :meth:`IRIM.forward <medinv.models.IRIM.forward>` in 2D.
        """
        data = measurements(kspace, mask, sensitivities, dim=2)
        image = data.operator.adjoint(data.kspace)
        x = image_to_channels(image)
        h1 = h2 = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[2:])
        estimates = []
        for _ in range(self.steps):
            with torch.autocast(x.device.type, enabled=False):
                gradient = image_to_channels(data.dc_gradient(image))
            features = F.relu(self.conv_in(torch.cat([x, gradient], 1)))
            h1 = self.gru1(features, h1)
            h2 = self.gru2(F.relu(self.conv_mid(h1)), h2)
            x = x + self.conv_out(h2)
            image = state_to_image(x)
            estimates.append(image)
        return estimates if return_all else estimates[-1]

    def extra_repr(self) -> str:
        return f"steps={self.steps}, hidden_channels={self.hidden_channels}"
