"""Forward models of Cartesian MRI and the data-consistency gradient.

Single coil: ``A x = M F x``. Multi-coil SENSE: ``A x = M F S x`` with coil sensitivities
``S`` (one complex map per coil). ``F`` is the centred orthonormal FFT
(:func:`~medinv.mri.fft.fft2c`) and ``M`` a real 0/1 column mask, so ``M^H = M`` and the
adjoints are ``A^H y = F^H M y`` and ``A^H y = sum_c conj(S_c) F^H M y_c``. The i-RIM's
data-consistency gradient is that of ``1/2 ||A x - y||^2``: ``A^H (A x - y)``.
"""

from __future__ import annotations

import torch

from medinv.mri.fft import fft2c, ifft2c


class SingleCoilOperator:
    """``A x = M F x`` for images ``x`` ``(*, H, W)`` and k-space ``y`` ``(*, H, W)``.

    Args:
        mask: real 0/1 tensor broadcastable to ``(*, H, W)`` (e.g. ``(1, W)``); ``None``
            for fully sampled data.
    """

    def __init__(self, mask: torch.Tensor | None = None) -> None:
        self.mask = mask

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``A x = M F x``."""
        return _masked(fft2c(image), self.mask)

    __call__ = forward

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """``A^H y = F^H M y``."""
        return ifft2c(_masked(kspace, self.mask))

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        """``A^H A x``."""
        return self.adjoint(self.forward(image))

    def dc_gradient(self, image: torch.Tensor, kspace: torch.Tensor) -> torch.Tensor:
        """``A^H (A x - y)``, the gradient of ``1/2 ||A x - y||^2`` with respect to ``x``."""
        return self.adjoint(self.forward(image) - kspace)


class SenseOperator(SingleCoilOperator):
    """``A x = M F S x`` for images ``x`` ``(*, H, W)`` and coil k-space ``y`` ``(*, C, H, W)``.

    Args:
        sensitivities: complex coil maps ``(*, C, H, W)``; conventionally normalised so
            that ``sum_c |S_c|^2 = 1`` inside the object.
        mask: real 0/1 tensor broadcastable to ``(*, C, H, W)``; ``None`` if fully sampled.

    Raises:
        TypeError: ``sensitivities`` is not complex.
    """

    def __init__(self, sensitivities: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not sensitivities.is_complex():
            raise TypeError(f"coil sensitivities must be complex, got {sensitivities.dtype}")
        super().__init__(mask)
        self.sensitivities = sensitivities

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``A x = M F (S_c x)_c``: ``(*, H, W) -> (*, C, H, W)``."""
        return _masked(fft2c(self.sensitivities * image.unsqueeze(-3)), self.mask)

    __call__ = forward

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """``A^H y = sum_c conj(S_c) F^H M y_c``: ``(*, C, H, W) -> (*, H, W)``."""
        coil_images = ifft2c(_masked(kspace, self.mask))
        return (self.sensitivities.conj() * coil_images).sum(-3)


def _masked(kspace: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return kspace
    return kspace * mask.to(device=kspace.device, dtype=kspace.real.dtype)
