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
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import orthogonal
from .base import InvertibleModule, chain_context, using_context, zero_log_det
from .memory import storage_uses as _storage_uses
from .orthogonal import OrthogonalConv, WeightBatch, batched_weights
from .resampling import InvertibleDownsampling, InvertibleUpsampling

#: Layers whose orthogonal matrices a chain computes in one :class:`WeightBatch`.
ORTHOGONAL_LAYERS = (OrthogonalConv, InvertibleDownsampling, InvertibleUpsampling)


class InvertibleSequential(InvertibleModule):
    """A chain of invertible blocks, trained with memory-efficient backpropagation.

    Args:
        *blocks: :class:`InvertibleModule` instances. Nested chains and the inner chains of
            :class:`ChannelSubset` blocks are flattened into this one; the outermost
            chain's ``memory_efficient`` setting governs them all.
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
        return [item for item in self._program() if isinstance(item, InvertibleModule)]

    def _program(self) -> list[_Step]:
        """The flattened chain: blocks, and the set-aside/restore steps of channel subsets."""
        program: list[_Step] = []
        for block in self.blocks:
            program.extend(_flatten(block))
        return program

    def forward(self, x: Tensor, context: Any = None, overwrite_input: bool = False) -> Tensor:
        """``context``: data the blocks read with :func:`chain_context` (e.g. measurements).

        ``overwrite_input``: without a graph the chain updates its own states in place;
        with this set it may start in ``x``'s memory too (for an input nobody reads
        again, such as a projection's output), which saves a copy of the state.
        """
        with using_context(context):
            return self._run(x, with_log_det=False, overwrite_input=overwrite_input)

    def forward_and_log_det(
        self, x: Tensor, context: Any = None, overwrite_input: bool = False
    ) -> tuple[Tensor, Tensor]:
        with using_context(context):
            return self._run(x, with_log_det=True, overwrite_input=overwrite_input)

    def inverse(self, y: Tensor, context: Any = None) -> Tensor:
        with using_context(context):
            for block in reversed(self.blocks):
                y = block.inverse(y)
            return y

    def _run(self, x: Tensor, with_log_det: bool, overwrite_input: bool = False):
        program = self._program()
        if not torch.is_grad_enabled():
            with batched_weights(_weight_batch(program)):
                return _forward_program(program, x, with_log_det, overwrite_input)
        if not (self.memory_efficient and program):
            return _forward_program(program, x, with_log_det)
        states = [_block_state(s) if isinstance(s, InvertibleModule) else ([], []) for s in program]
        slots = [slot for slot, _ in states]
        params = list({id(p): p for block in slots for _, _, p in block}.values())
        if not (x.requires_grad or params):
            return _forward_program(program, x, with_log_det)
        buffers = [b for _, b in states]
        run = _ChainRun(
            program, slots, buffers, params, with_log_det, self.preserve_rng_state, chain_context()
        )
        return _ChainFunction.apply(x, run, *params)

    def extra_repr(self) -> str:
        return f"memory_efficient={self.memory_efficient}"


class ChannelSubset(InvertibleModule):
    """Apply an invertible ``inner`` module to all channels but the first ``keep``.

    ``y = cat(x[:, :keep], inner(x[:, keep:]))``. The kept channels wait, untouched, while
    ``inner`` runs, which is how skip connections enter a chain: a U-Net level is
    ``ChannelSubset(InvertibleSequential(down, deeper_levels, up), keep=skip_channels)``.
    Inside an :class:`InvertibleSequential` the inner blocks join the outer chain, so the
    whole U-Net stores only its output.
    """

    def __init__(self, inner: InvertibleModule, keep: int):
        super().__init__()
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.inner = inner
        self.keep = keep

    def _check(self, x: Tensor) -> None:
        if x.ndim < 2 or x.shape[1] <= self.keep:
            raise ValueError(
                f"ChannelSubset keeps {self.keep} channels and needs more, got {tuple(x.shape)}"
            )

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        y, log_det = self.inner.forward_and_log_det(x[:, self.keep :])
        return torch.cat([x[:, : self.keep], y], dim=1), log_det

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return torch.cat([x[:, : self.keep], self.inner(x[:, self.keep :])], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        return torch.cat([y[:, : self.keep], self.inner.inverse(y[:, self.keep :])], dim=1)

    def extra_repr(self) -> str:
        return f"keep={self.keep}"


@dataclass(frozen=True)
class _SetAside:
    """Program step: move the first ``keep`` channels onto the side stack."""

    keep: int


@dataclass(frozen=True)
class _Restore:
    """Program step: put the top of the side stack back in front (``keep`` channels)."""

    keep: int


_Step = InvertibleModule | _SetAside | _Restore


def _flatten(block: InvertibleModule) -> list[_Step]:
    if isinstance(block, InvertibleSequential):
        return block._program()
    if isinstance(block, ChannelSubset):
        return [_SetAside(block.keep), *_flatten(block.inner), _Restore(block.keep)]
    return [block]


_Slot = tuple[nn.Module, str, nn.Parameter]


def _block_state(block: nn.Module) -> tuple[list[_Slot], list[Tensor]]:
    """Where the block's trainable parameters live, ``(module, attribute name, parameter)``
    (one parameter may sit in several slots when weights are tied), and its buffers."""
    slots, buffers = [], []
    for module in block.modules():
        slots += [
            (module, name, p)
            for name, p in module._parameters.items()
            if p is not None and p.requires_grad
        ]
        buffers += [b for b in module._buffers.values() if b is not None]
    return slots, buffers


@contextmanager
def _parameters_replaced(slots: list[_Slot], aliases: dict[int, Tensor]) -> Iterator[None]:
    """Let the block compute with ``aliases`` (by parameter id) in place of its parameters."""
    for module, name, p in slots:
        module._parameters[name] = aliases[id(p)]
    try:
        yield
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


def _forward_step(
    step: _Step, x: Tensor, stack: list[Tensor], with_log_det: bool, caller: int
) -> tuple[Tensor, Tensor | None]:
    """Run one program step; returns the new state and the step's log-det (or None).

    Without a graph, a state the chain made itself (not in the memory of the caller's
    input, whose storage is ``caller``; -1 where the caller gave its input up) is updated
    in place where the step can: couplings add to it, orthogonal layers mix it, and a skip
    connection is rejoined in the buffer it left.
    """
    in_place = not torch.is_grad_enabled() and x.untyped_storage().data_ptr() != caller
    if isinstance(step, _SetAside):
        stack.append(x)
        return x[:, step.keep :], None
    if isinstance(step, _Restore):
        outer = stack.pop()
        if in_place and outer.untyped_storage().data_ptr() != caller:
            return _rejoin(outer, step.keep, x), None
        return torch.cat([outer[:, : step.keep], x], dim=1), None
    if in_place and not _has_hooks(step) and (y := step.forward_in_place(x)) is not None:
        return y, (zero_log_det(y) if with_log_det else None)
    if with_log_det:
        return step.forward_and_log_det(x)
    return step(x), None


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (which ``forward_in_place`` skips)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def _weight_batch(program: list[_Step]) -> WeightBatch | None:
    """The chain's orthogonal layers (1x1 convolutions, resampling), their matrices
    computed together."""
    layers = [
        m
        for step in program
        if isinstance(step, nn.Module)
        for m in step.modules()
        if isinstance(m, ORTHOGONAL_LAYERS)
    ]
    return WeightBatch(layers) if layers and orthogonal.BATCH_WEIGHTS else None


def _forward_program(
    program: list[_Step], x: Tensor, with_log_det: bool, overwrite_input: bool = False
):
    caller = -1 if overwrite_input else x.untyped_storage().data_ptr()
    stack: list[Tensor] = []
    total = None
    for step in program:
        x, log_det = _forward_step(step, x, stack, with_log_det, caller)
        if log_det is not None:
            total = log_det if total is None else total + log_det
    if not with_log_det:
        return x
    return x, x.new_zeros(x.shape[0]) if total is None else total


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

    program: list[_Step]
    slots: list[list[_Slot]]
    buffers: list[list[Tensor]]
    params: list[nn.Parameter]
    with_log_det: bool
    preserve_rng_state: bool
    context: Any
    input_dtypes: list[torch.dtype] = field(default_factory=list)
    rng_states: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    autocast: _AutocastState | None = None
    cuda_device: int | None = None
    param_versions: list[int] = field(default_factory=list)
    weights: WeightBatch | None = None

    def forward(self, x: Tensor):
        self.weights = _weight_batch(self.program)
        with batched_weights(self.weights):
            return self._forward(x)

    def _forward(self, x: Tensor):
        self.autocast = _AutocastState.capture(x.device.type)
        self.cuda_device = x.device.index if x.is_cuda else None
        caller = x.untyped_storage().data_ptr()
        stack: list[Tensor] = []
        total = None
        for step in self.program:
            self.input_dtypes.append(x.dtype)
            if self.preserve_rng_state:
                self.rng_states.append((torch.get_rng_state(), self._get_cuda_rng_state()))
            x, log_det = _forward_step(step, x, stack, self.with_log_det, caller)
            if log_det is not None:
                total = log_det if total is None else total + log_det
        # Data-dependent initialisation may legitimately write parameters during forward.
        self.param_versions = [p._version for p in self.params]
        if not self.with_log_det:
            return x
        return x, x.new_zeros(x.shape[0]) if total is None else total

    def backward(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None
    ) -> tuple[Tensor, list[Tensor | None]]:
        if self.weights is not None:
            self.weights.discard_grads()  # what an interrupted backward may have left
        with batched_weights(self.weights):
            return self._backward(y, grad_y, grad_log_det)

    def _backward(
        self, y: Tensor, grad_y: Tensor, grad_log_det: Tensor | None
    ) -> tuple[Tensor, list[Tensor | None]]:
        if [p._version for p in self.params] != self.param_versions:
            raise RuntimeError(
                "a parameter of an InvertibleSequential was modified in place between its "
                "forward and backward passes (e.g. an optimizer step before backward)"
            )
        index = {id(p): i for i, p in enumerate(self.params)}
        grads: list[Tensor | None] = [None] * len(self.params)

        def add(param_id: int, g: Tensor | None) -> None:
            i = index[param_id]
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g

        # Blocks overwrite what they are given: the output and its gradient become the
        # engine's own buffers where nothing else can see them, copies otherwise.
        handed_over = [
            (t, uses)
            for t, uses in ((y, _SAVED_OUTPUT_USES), (grad_y, _INCOMING_GRAD_USES))
            if _exclusive(t, uses)
        ]
        y = y if any(t is y for t, _ in handed_over) else y.clone()
        grad_y = grad_y if any(t is grad_y for t, _ in handed_over) else grad_y.clone()
        # The state and its gradient around each channel subset the walk is inside: their
        # first channels wait, set aside, while the walk goes through the inner blocks.
        stack: list[tuple[Tensor, Tensor]] = []
        for k in reversed(range(len(self.program))):
            # Autograd keeps the handed-over tensors referenced until backward returns:
            # free their memory as soon as the walk no longer views it.
            handed_over = _release_unviewed(handed_over, (y, grad_y))
            step = self.program[k]
            if isinstance(step, _Restore):
                # Views (not the tensors themselves): each counts as a use of the storage.
                stack.append((y[:], grad_y[:]))
                y, grad_y = y[:, step.keep :], grad_y[:, step.keep :]
                continue
            if isinstance(step, _SetAside):
                outer, grad_outer = stack.pop()
                y = _rejoin(outer, step.keep, y)
                grad_y = _rejoin(grad_outer, step.keep, grad_y)
                del outer, grad_outer
                continue
            aliases = {id(p): p.detach().requires_grad_() for _, _, p in self.slots[k]}
            with self._replay(k), _parameters_replaced(self.slots[k], aliases):
                x, grad_x, block_grads = step.backward_pass(
                    y, grad_y, grad_log_det, list(aliases.values())
                )
            for param_id, g in zip(aliases, block_grads, strict=True):
                add(param_id, g)
            y = _writable(x.to(self.input_dtypes[k]))
            grad_y = torch.zeros_like(y) if grad_x is None else _writable(grad_x.to(y.dtype))
        if self.weights is not None:  # the orthogonal layers' gradients, in one call
            for p, g in self.weights.grads():
                add(id(p), g)
        return grad_y, grads

    @contextmanager
    def _replay(self, k: int) -> Iterator[None]:
        """The forward's RNG and autocast state around block ``k``'s recompute, and its
        buffers (e.g. BatchNorm statistics) left as the forward left them."""
        saved_buffers = [b.clone() for b in self.buffers[k]]
        if self.preserve_rng_state:
            outer = torch.get_rng_state(), self._get_cuda_rng_state()
            self._set_rng_state(self.rng_states[k])
        try:
            with self.autocast.enter(), using_context(self.context):
                yield
        finally:
            if self.preserve_rng_state:
                self._set_rng_state(outer)
            with torch.no_grad():
                for b, saved in zip(self.buffers[k], saved_buffers, strict=True):
                    b.copy_(saved)

    def _get_cuda_rng_state(self) -> Tensor | None:
        if self.cuda_device is None:
            return None
        return torch.cuda.get_rng_state(self.cuda_device)

    def _set_rng_state(self, state: tuple[Tensor, Tensor | None]) -> None:
        cpu_state, cuda_state = state
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.cuda_device)


class _Probe(torch.autograd.Function):
    """Measures, in backward, how many storage uses autograd itself holds on a saved
    output and an incoming gradient that nobody else sees."""

    uses: tuple[int | None, int | None] = (None, None)

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x * 2
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        _Probe.uses = (_storage_uses(out), _storage_uses(grad))
        return grad


def _probe_uses() -> tuple[int | None, int | None]:
    with torch.enable_grad():
        x = torch.ones(2, requires_grad=True)
        (_Probe.apply(x) * x).sum().backward()
    return _Probe.uses


_SAVED_OUTPUT_USES, _INCOMING_GRAD_USES = _probe_uses()


def _exclusive(t: Tensor, private_uses: int | None) -> bool:
    """Whether only autograd holds ``t``'s storage and will not read it again, so that
    the engine may write into it and free it (nobody can see it change)."""
    uses = _storage_uses(t)
    return (
        uses is not None
        and private_uses is not None
        and uses <= private_uses
        and not torch._C._autograd._get_current_graph_task_keep_graph()
        and t._base is None
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _release_unviewed(
    handed_over: list[tuple[Tensor, int | None]], working: tuple[Tensor, ...]
) -> list[tuple[Tensor, int | None]]:
    """Free the storage of each handed-over tensor that no working tensor or view
    (e.g. channels set aside on the stack) still uses; return the others."""
    live = {w.untyped_storage().data_ptr() for w in working}
    kept = []
    for t, uses in handed_over:
        storage = t.untyped_storage()
        if storage.data_ptr() not in live and _storage_uses(t) <= uses:
            storage.resize_(0)
        else:
            kept.append((t, uses))
    return kept


def _rejoin(outer: Tensor, keep: int, inner: Tensor) -> Tensor:
    """``cat([outer[:, :keep], inner])``, built in ``outer``'s memory where it can be.

    ``outer`` is the engine's buffer the inner walk started from; its channels after
    ``keep`` are free again (the inner blocks moved on to buffers of their own, or
    ``inner`` is still exactly those channels). Writing ``inner`` there saves allocating
    a whole new state and its gradient while the old ones are alive.
    """
    target = outer[:, keep:]
    same_memory = inner.untyped_storage().data_ptr() == outer.untyped_storage().data_ptr()
    if same_memory and _same_view(inner, target):
        return outer
    if same_memory or inner.shape != target.shape or inner.dtype != target.dtype:
        return torch.cat([outer[:, :keep], inner], dim=1)
    target.copy_(inner)
    return outer


def _same_view(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _writable(t: Tensor) -> Tensor:
    """``t``, or a copy where elements share memory (an expanded gradient), so that the
    next block may write into it in place."""
    overlapping = any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape, strict=True))
    return t.contiguous() if overlapping else t


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
