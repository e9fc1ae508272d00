"""Measuring what autograd keeps for backward: the memory the engine saves."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class SavedBytes:
    """Bytes of the distinct storages saved for backward (see :func:`saved_activations`)."""

    def __init__(self, exclude: Iterable[Tensor]):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}

    def _pack(self, t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._excluded:
            self._storages[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self._storages.values())


@contextmanager
def saved_activations(exclude: Iterable[Tensor] = ()) -> Iterator[SavedBytes]:
    """Count the bytes autograd saves for backward while the block runs, each storage once.

    ``exclude``: tensors not to count, e.g. ``model.parameters()``. Example::

        with saved_activations(exclude=model.parameters()) as saved:
            loss = model(x).sum()
        print(saved.total)
    """
    saved = SavedBytes(exclude)
    with torch.autograd.graph.saved_tensors_hooks(saved._pack, lambda t: t):
        yield saved


def storage_uses(t: Tensor) -> int | None:
    """How many tensors share ``t``'s storage, or None where torch does not say."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return None


def _fresh_output_uses() -> int | None:
    with torch.enable_grad():
        return storage_uses(torch.ones(1, requires_grad=True) * 2)


# Storage uses of an operator's output that nothing (its graph included) saved.
UNSAVED_OUTPUT_USES = _fresh_output_uses()
