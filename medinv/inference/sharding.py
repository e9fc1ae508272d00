"""Splitting a batch of cases between workers (``--shard i/n``), with resume."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

from medinv.errors import InputError

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (worker ``i`` of ``n``, from 0) or ``"auto"`` (torchrun's ``RANK`` and
    ``WORLD_SIZE``; ``0/1`` outside torchrun)."""
    if text == "auto":
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: expected i/n with 0 <= i < n (e.g. 0/4), or auto")
    return index, count


def take_shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Worker ``index``'s share of ``items``: every ``count``-th item from ``index`` on, so
    that shards differ in size by at most one and together cover every item once."""
    return list(items[index::count])


def shard_table_name(command: str, index: int, count: int) -> str:
    """The per-shard results table, e.g. ``segment_shard_0_of_4.csv``."""
    return f"{command}_shard_{index}_of_{count}.csv"
