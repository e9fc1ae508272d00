"""Memory-efficient backpropagation through chains of invertible blocks.

The forward pass runs without a graph and stores only the chain's output. The backward
pass walks the chain in reverse: each block reconstructs its input from its output and
back-propagates through itself (:meth:`InvertibleModule.backward_pass`), so activation
memory is that of one block whatever the depth.

What the reverse walk restores, so that the result equals plain autograd:

- parameters enter the autograd Function explicitly, and their gradients leave it as
  ordinary outputs, so ``torch.autograd.grad``, gradient hooks and DDP see them once;
- during the recompute, blocks compute with detached aliases of their parameters, so
  gradient hooks do not fire twice;
- the RNG state before each block is replayed (dropout draws the same mask);
- autocast settings of the forward are re-entered;
- normalisation buffers (e.g. BatchNorm running statistics) are restored after the
  recompute, so they update once per step, in the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .base import InvertibleModule


class InvertibleSequential(InvertibleModule):
    """A chain of invertible blocks, trained with memory-efficient backpropagation.

    Args:
        *blocks: :class:`InvertibleModule` instances; nested chains are flattened.
        memory_efficient: if True (default) store only the chain's output and recompute
            each block's input in backward; if False run plain autograd over the same
            modules (the reference the engine is tested against).
        preserve_rng_state: replay each block's RNG state in the recompute; switch off
            only when no block draws random numbers.

    Example::

        chain = InvertibleSequential(*(AdditiveCoupling(make_f()) for _ in range(30)))
        y = chain(x)                      # activation memory of one block
        y, log_det = chain.forward_and_log_det(x)
        x_again = chain.inverse(y)
    """

    def __init__(
        self,
        *blocks: InvertibleModule,
        memory_efficient: bool = True,
        preserve_rng_state: bool = True,
    ):
        super().__init__()
        for i, block in enumerate(blocks):
            if not isinstance(block, InvertibleModule):
                raise TypeError(f"block {i} is a {type(block).__name__}, not an InvertibleModule")
        self.blocks = nn.ModuleList(blocks)
        self.memory_efficient = memory_efficient
        self.preserve_rng_state = preserve_rng_state

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> InvertibleModule:
        return self.blocks[index]

    def __iter__(self) -> Iterator[InvertibleModule]:
        return iter(self.blocks)

    def leaf_blocks(self) -> list[InvertibleModule]:
        """The blocks in execution order, nested chains flattened."""
        leaves: list[InvertibleModule] = []
        for block in self.blocks:
            nested = isinstance(block, InvertibleSequential)
            leaves.extend(block.leaf_blocks() if nested else [block])
        return leaves

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, with_log_det=False)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(x, with_log_det=True)

    def inverse(self, y: Tensor) -> Tensor:
        for block in reversed(self.leaf_blocks()):
            y = block.inverse(y)
        return y

    def _run(self, x: Tensor, with_log_det: bool):
        blocks = self.leaf_blocks()
        params = _trainable_parameters(blocks)
        needs_graph = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if not (self.memory_efficient and needs_graph and blocks):
            return _forward_blocks(blocks, x, with_log_det)
        run = _ChainRun(blocks, params, with_log_det, self.preserve_rng_state)
        return _ChainFunction.apply(x, run, *params)

    def extra_repr(self) -> str:
        return f"memory_efficient={self.memory_efficient}"


def _trainable_parameters(blocks: list[InvertibleModule]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for block in blocks:
        for p in block.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _forward_blocks(blocks: list[InvertibleModule], x: Tensor, with_log_det: bool):
    if not with_log_det:
        for block in blocks:
            x = block(x)
        return x
    total = None
    for block in blocks:
        x, log_det = block.forward_and_log_det(x)
        total = log_det if total is None else total + log_det
    return x, total


@dataclass
class _AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device_type: str) -> _AutocastState:
        return cls(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    def enter(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@dataclass
class _ChainRun:
    """What one forward call must remember for its backward (no activations)."""

    blocks: list[InvertibleModule]
    params: list[nn.Parameter]
    with_log_det: bool
    preserve_rng_state: bool
    input_dtypes: list[torch.dtype] = field(default_factory=list)
    rng_states: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    autocast: _AutocastState | None = None
    cuda_device: int | None = None
    param_versions: list[int] = field(default_factory=list)

    def forward(self, x: Tensor):
        self.autocast = _AutocastState.capture(x.device.type)
        self.cuda_device = x.device.index if x.is_cuda else None
        total = None
        for block in self.blocks:
            self.input_dtypes.append(x.dtype)
            if self.preserve_rng_state:
                cuda_state = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
                self.rng_states.append((torch.get_rng_state(), cuda_state))
            if self.with_log_det:
                x, log_det = block.forward_and_log_det(x)
                total = log_det if total is None else total + log_det
            else:
                x = block(x)
        # Data-dependent initialisation may legitimately write parameters during forward.
        self.param_versions = [p._version for p in self.params]
        return (x, total) if self.with_log_det else x

    def backward(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None
    ) -> tuple[Tensor, list[Tensor | None]]:
        if [p._version for p in self.params] != self.param_versions:
            raise RuntimeError(
                "a parameter of an InvertibleSequential was modified in place between its "
                "forward and backward passes (e.g. an optimizer step before backward)"
            )
        index = {id(p): i for i, p in enumerate(self.params)}
        grads: list[Tensor | None] = [None] * len(self.params)
        # Blocks may overwrite what they are given; these copies are the engine's own.
        y, grad_y = y.clone(), grad_y.clone()
        for k in reversed(range(len(self.blocks))):
            block = self.blocks[k]
            names = [n for n, p in block.named_parameters() if p.requires_grad]
            originals = [p for p in block.parameters() if p.requires_grad]
            aliases = [p.detach().requires_grad_() for p in originals]
            with self._replay(k, block):
                x, grad_x, block_grads = torch.func.functional_call(
                    _BackwardPass(block),
                    {f"block.{n}": a for n, a in zip(names, aliases, strict=True)},
                    (y, grad_y, grad_log_det, aliases),
                )
            for p, g in zip(originals, block_grads, strict=True):
                if g is not None:
                    i = index[id(p)]
                    grads[i] = g if grads[i] is None else grads[i] + g
            # Contiguous, so that the next block may write into them in place.
            y = x.to(self.input_dtypes[k]).contiguous()
            grad_y = torch.zeros_like(y) if grad_x is None else grad_x.to(y.dtype).contiguous()
        return grad_y, grads

    @contextmanager
    def _replay(self, k: int, block: nn.Module) -> Iterator[None]:
        buffers = list(block.buffers()) if block.training else []
        saved = [b.clone() for b in buffers]
        devices = [] if self.cuda_device is None else [self.cuda_device]
        with torch.random.fork_rng(devices=devices, enabled=self.preserve_rng_state):
            if self.preserve_rng_state:
                cpu_state, cuda_state = self.rng_states[k]
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, self.cuda_device)
            with self.autocast.enter():
                yield
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)


class _BackwardPass(nn.Module):
    """Lets ``functional_call`` swap parameters for one block's ``backward_pass``."""

    def __init__(self, block: InvertibleModule):
        super().__init__()
        self.block = block

    def forward(self, y, grad_y, grad_log_det, params):
        return self.block.backward_pass(y, grad_y, grad_log_det, params)


class _ChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, run: _ChainRun, *params: Tensor):
        out = run.forward(x)
        ctx.run = run
        ctx.save_for_backward(out[0] if run.with_log_det else out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, grad_log_det: Tensor | None = None):
        (y,) = ctx.saved_tensors
        grad_x, grads = ctx.run.backward(y, grad_y, grad_log_det if ctx.run.with_log_det else None)
        return (grad_x if ctx.needs_input_grad[0] else None, None, *grads)
