"""Sharded batch inference: two workers split the cases, resume skips finished ones."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from medinv.errors import InputError
from medinv.inference.sharding import parse_shard, take_shard

from .synthetic_cases import write_case


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [take_shard(items, i, 4) for i in range(4)]
    assert sorted(x for s in shards for x in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_parse_shard(monkeypatch):
    assert parse_shard("2/5") == (2, 5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard("auto") == (1, 3)
    for bad in ("5/5", "a/b", "-1/2", "3"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


def test_two_workers_segment_their_shares_and_resume(tmp_path):
    for i in range(3):
        write_case(tmp_path / "cases", f"case{i}", shape=(24, 24, 16), seed=i)
    out = tmp_path / "seg"

    def worker(index):
        command = ["segment", tmp_path / "cases", "--out", out, "--shard", f"{index}/2"]
        return subprocess.Popen(
            [sys.executable, "-m", "medinv", *map(str, command)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    workers = [worker(0), worker(1)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    assert sorted(p.name for p in out.glob("case*.nii.gz")) == [
        "case0.nii.gz",
        "case1.nii.gz",
        "case2.nii.gz",
    ]
    first = pd.read_csv(out / "segment_shard_0_of_2.csv")
    second = pd.read_csv(out / "segment_shard_1_of_2.csv")
    assert list(first["item"]) == ["case0", "case2"] and list(second["item"]) == ["case1"]
    assert set(first["status"]) == {"done"}

    again = worker(0)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert set(pd.read_csv(out / "segment_shard_0_of_2.csv")["status"]) == {"skipped"}
