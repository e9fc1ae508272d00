"""Learning-rate schedules that follow the run's progress (its time budget or its epochs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medinv.training.run import ProgressCosineLR, ProgressStepLR


def _rates(scheduler_type, shares, **kwargs):
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=2.0)
    it = iter(shares)
    scheduler = scheduler_type(optimizer, progress=lambda: next(it), **kwargs)
    rates = []
    for _ in shares:
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_cosine_follows_the_share_of_the_run_and_ends_at_zero():
    shares = [0.1, 0.5, 0.9, 1.0, 1.3]  # a run past its budget stays at the end
    expected = [2.0 * 0.5 * (1 + math.cos(math.pi * min(s, 1.0))) for s in shares]
    assert _rates(ProgressCosineLR, shares) == pytest.approx(expected)
    assert expected[-1] == pytest.approx(0.0)


def test_step_drops_at_each_fraction():
    rates = _rates(ProgressStepLR, [0.2, 0.25, 0.5, 0.74, 0.75, 1.0], fraction=0.25, gamma=0.1)
    assert rates == pytest.approx([2.0, 0.2, 0.02, 0.02, 0.002, 0.0002])
