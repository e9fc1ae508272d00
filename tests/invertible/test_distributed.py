"""The engine under DistributedDataParallel (gloo, CPU, two processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medinv.invertible import (
    AdditiveCoupling,
    AffineCoupling,
    InvertibleDownsampling,
    InvertibleSequential,
    OrthogonalConv,
)

STEPS = 3


def _model(memory_efficient: bool) -> InvertibleSequential:
    torch.manual_seed(0)

    def f(c_in, c_out):
        return nn.Sequential(
            nn.Conv2d(c_in, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.Conv2d(8, c_out, 3, padding=1),
        )

    blocks = [
        AdditiveCoupling(f(2, 2), f(2, 2)),
        OrthogonalConv(4),
        AffineCoupling(f(2, 4)),
        InvertibleDownsampling(4, 2),
        OrthogonalConv(16, "householder"),
    ]
    return InvertibleSequential(*blocks, memory_efficient=memory_efficient).double()


def _batch() -> torch.Tensor:
    return torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _train(model: nn.Module, data: torch.Tensor, parameters) -> None:
    optimizer = torch.optim.SGD(parameters, lr=0.05)
    for _ in range(STEPS):
        optimizer.zero_grad()
        # Not a norm: an orthogonal last layer would get no gradient from one.
        model(data)[:, :3].square().mean().backward()
        optimizer.step()


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model(memory_efficient=True)
    ddp = DistributedDataParallel(model)
    _train(ddp, _batch()[rank::world], ddp.parameters())
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_match_one_process_with_the_combined_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    single = _model(memory_efficient=False)
    _train(single, _batch(), single.parameters())
    initial = _model(memory_efficient=False).state_dict()
    for name, value in single.state_dict().items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12)
