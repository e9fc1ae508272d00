"""What the memory planner runs to measure a model: its step, on inputs of a given shape.

A workload knows a model's input and output channels and stride, the probe shapes to
measure it at, how to make inputs, and the step: the inference forward pass medinv runs,
or a training step's loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medinv.errors import ConfigError, InputError

#: Probe edge lengths (rounded up to the model's stride): small, but large enough that fixed
#: costs no longer dominate the peak.
PROBE_EDGES = {"cpu": (32, 48, 64), "cuda": (48, 64, 96)}
PROBE_EDGES_2D = {"cpu": (64, 96, 128), "cuda": (128, 192, 256)}
#: Slab depth of a 3D reconstructor's probes (the training default); its calibration is per
#: voxel, so it serves every slab depth.
PROBE_SLAB = 8


def model_stride(model: nn.Module) -> tuple[int, ...]:
    """Per axis, the factor that input sizes must be a multiple of to need no padding.

    medinv's iUNets expose ``total_stride``; MONAI's SegResNet downsamples
    ``len(blocks_down) - 1`` times by 2; the i-RIM's multi-scale blocks pad to their
    dilations, so sizes divisible by all of them need none.
    """
    from monai.networks.nets import SegResNet

    from medinv.models import IRIM, RIM

    for module in model.modules():
        if hasattr(module, "total_stride"):
            return tuple(module.total_stride)
        if isinstance(module, SegResNet):
            return (2 ** (len(module.blocks_down) - 1),) * module.spatial_dims
        if isinstance(module, IRIM):
            return (math.lcm(*module.dilations),) * module.dim
        if isinstance(module, RIM):
            return (1, 1)
    raise ConfigError(f"cannot tell the total stride of a {type(model).__name__}")


def check_bucket(model: nn.Module, bucket: int | None, name: str = "bucket") -> None:
    """Raise :class:`InputError`, naming ``name``, unless ``bucket`` is None or a positive
    multiple of the model's total stride on every axis."""
    if bucket is None:
        return
    if bucket < 1:
        raise InputError(f"{name} {bucket}: expected a positive number of voxels")
    try:
        stride = model_stride(model)
    except ConfigError:
        return  # a model of unknown stride takes any size
    if any(bucket % s for s in stride):
        raise InputError(
            f"{name} {bucket} is not a multiple of the model's total stride "
            f"{'x'.join(map(str, stride))}"
        )


def io_channels(model: nn.Module) -> tuple[int, int]:
    """Input and output channels of a segmenter: an iUNet's projections, a SegResNet's
    first and final convolutions, else the first and last convolution registered."""
    from monai.networks.nets import SegResNet

    from medinv.models import IUNet

    for module in model.modules():
        if isinstance(module, IUNet):
            return module.project_in.in_channels, module.project_out.out_channels
        if isinstance(module, SegResNet):
            model = module
            break
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ConfigError(f"a {type(model).__name__} has no convolution to plan for")
    return convs[0].in_channels, convs[-1].out_channels


class Segmenter:
    """Steps of a network taking ``(B, C_in, *S)`` to ``(B, C_out, *S)``; units ``B * prod(S)``.

    The training step is medinv's: autocast forward, Dice loss with sigmoid on the float
    logits against a random label, backward, gradient clipping and an AdamW step.
    """

    def __init__(self, model: nn.Module):
        self.in_channels, self.out_channels = io_channels(model)
        self.stride = model_stride(model)
        #: iUNets pad inputs up to their stride (and crop the output); others need multiples.
        self.pads_inputs = any(hasattr(m, "total_stride") for m in model.modules())

    def probe_shapes(self, device: torch.device) -> list[tuple[int, ...]]:
        return _probe_shapes(PROBE_EDGES["cuda" if device.type == "cuda" else "cpu"], self.stride)

    def units(self, shape: Sequence[int], batch: int = 1) -> int:
        return batch * math.prod(shape)

    def inputs(self, shape, batch, device, train) -> tuple[Tensor, ...]:
        x = torch.randn(batch, self.in_channels, *shape, device=device)
        if not train:
            return (x,)
        return x, (torch.rand(batch, self.out_channels, *shape, device=device) > 0.5).float()

    def infer(self, model: nn.Module, inputs) -> object:
        return model(inputs[0])

    def loss(self, model: nn.Module, inputs) -> Tensor:
        from monai.losses import DiceLoss

        loss_fn = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)
        return loss_fn(model(inputs[0]).float(), inputs[1])


class Reconstructor:
    """Steps of a reconstructor as ``medinv reconstruct`` runs them, on a batch of k-space
    slices ``(B, [C,] H, W)`` (2D models) or of slabs ``(B, S, [C,] H, W)`` (3D models):
    the measurement moved to the device and the model, and for 2D models the zero-filled
    baseline. Units ``B * H * W`` (2D) or ``B * S * H * W`` (3D); the coil count is fixed
    per calibration.

    The training step: L1 loss of the magnitude against a random target (medinv's training
    adds SSIM on the cropped image, a small extra), backward, gradient clipping and an AdamW
    step (the same state as Adam's).
    """

    def __init__(self, model: nn.Module, coils: int | None):
        self.dim = getattr(model, "dim", 2)
        if self.dim not in (2, 3):
            raise ConfigError(f"the memory planner plans 2D and 3D reconstructors, not {self.dim}D")
        self.coils = coils
        self.stride = model_stride(model)

    def probe_shapes(self, device: torch.device) -> list[tuple[int, ...]]:
        edges = PROBE_EDGES_2D["cuda" if device.type == "cuda" else "cpu"]
        shapes = _probe_shapes(edges, self.stride[-2:])
        if self.dim == 3:
            slab = -(-PROBE_SLAB // self.stride[0]) * self.stride[0]
            shapes = [(slab, *shape) for shape in shapes]
        return shapes

    def units(self, shape: Sequence[int], batch: int = 1) -> int:
        return batch * math.prod(shape[-self.dim :])

    def inputs(self, shape, batch, device, train) -> tuple:
        from medinv.inference.reconstruction import Measurement

        *slab, height, width = shape[-self.dim :]
        coils = () if self.coils is None else (self.coils,)
        kspace = torch.randn(
            batch, *slab, *coils, height, width, dtype=torch.complex64, device=device
        )
        sens = None if self.coils is None else torch.randn_like(kspace)
        mask = torch.ones(batch, *([1] * (kspace.ndim - 2)), width, device=device)
        measurement = Measurement(kspace, mask, sens, torch.ones(batch, device=device))
        if not train:
            return (measurement,)
        return measurement, torch.rand(batch, *slab, height, width, device=device)

    def _estimate(self, model: nn.Module, measurement) -> Tensor:
        from medinv.inference.reconstruction import reconstruct
        from medinv.inference.slabs import reconstruct_slabs

        return (reconstruct_slabs if self.dim == 3 else reconstruct)(model, measurement)

    def infer(self, model: nn.Module, inputs) -> object:
        from medinv.inference.reconstruction import zero_filled

        estimate = self._estimate(model, inputs[0]).abs()
        if self.dim == 3:  # the volume's zero-filled image is made on the CPU
            return estimate
        return estimate, zero_filled(inputs[0]).abs()

    def loss(self, model: nn.Module, inputs) -> Tensor:
        return (self._estimate(model, inputs[0]).abs().float() - inputs[1]).abs().mean()


Workload = Segmenter | Reconstructor


def workload(model: nn.Module, coils: int | None = None) -> Workload:
    """The step description of ``model``: a reconstructor (i-RIM, RIM) or a segmenter."""
    from medinv.models import IRIM, RIM

    if any(isinstance(m, (IRIM, RIM)) for m in model.modules()):
        return Reconstructor(model, coils)
    return Segmenter(model)


def _probe_shapes(edges: Sequence[int], stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Per edge, a shape of that edge rounded up to the stride, per axis; each shape has
    more multiples of the stride than the one before, so that no two probes coincide."""
    shapes, previous = [], [0] * len(stride)
    for edge in edges:
        multiples = [max(-(-edge // s), p + 1) for s, p in zip(stride, previous, strict=True)]
        shapes.append(tuple(m * s for m, s in zip(multiples, stride, strict=True)))
        previous = multiples
    return shapes
