"""`medinv train` under torchrun: two CPU processes (gloo) train one model together."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

from medinv.models.rim import RIM
from medinv.training.checkpoint import read_checkpoint

from ..synthetic_cases import tiny_kspace_set, tiny_segmentation_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TORCHRUN += ["-m", "medinv"]


def test_torchrun_two_processes_train_segment(tmp_path):
    config = tiny_segmentation_config(tmp_path, cases=4, val_fraction=0.25, epochs=2, overlap=0.25)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medinv",
        "train",
        "segment",
        "--config",
        str(config),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    history = pd.read_csv(out / "metrics.csv")
    assert list(history["epoch"]) == [1, 2] and history["dice_mean"].notna().all()
    state = read_checkpoint(out / "last.pt")
    # Saved from the unwrapped model: keys as a single-process run writes them.
    assert not any(k.startswith("module.") for k in state["state_dict"])
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_backend_gives_each_tensor_kind_a_backend_and_shares_gpus_through_gloo():
    from medinv.training.distributed import backend

    # One GPU per process: NCCL for CUDA tensors, gloo for the CPU control messages.
    assert backend("cuda", local_processes=4, gpus=4) == "cpu:gloo,cuda:nccl"
    # More processes than GPUs (e.g. two on one card): NCCL would refuse; gloo carries both.
    assert backend("cuda", local_processes=2, gpus=1) == "gloo"
    assert backend("cpu", local_processes=2, gpus=0) == "gloo"


def test_torchrun_micro_batches_take_the_same_steps_as_whole_batches(tmp_path):
    """Two processes, steps of 2 slices each: in passes of 1 (gradients averaged over the
    processes once per step) the weights end where whole batches take them. The RIM, whose
    every weight gets a gradient: Adam would turn the rounding noise of a gradient that is
    zero in exact arithmetic (e.g. an orthogonal layer's symmetric part) into full steps."""
    import yaml

    root = tiny_kspace_set(tmp_path, 7, {"train": 2, "val": 0, "test": 0}, slices=4)
    weights = {}
    for micro in (None, 1):
        config = tmp_path / f"rim_{micro}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "task": "reconstruct",
                    "data": {
                        "train": str(root / "multicoil_train"),
                        "accelerations": [4],
                        "center_fractions": [0.08],
                    },
                    "model": {"kind": "rim", "steps": 2, "hidden_channels": 4},
                    "train": {
                        "epochs": 1,
                        "batch_size": 2,
                        "micro_batch_size": micro,
                        "lr_step_fraction": 0.5,  # the processes agree on the drops
                    },
                }
            )
        )
        out = tmp_path / f"run_{micro}"
        command = [
            *TORCHRUN,
            *("train", "reconstruct", "--config", str(config), "--out", str(out)),
            *("--device", "cpu"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        state = read_checkpoint(out / "last.pt")
        weights[micro] = state["state_dict"]
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.5**2)
    torch.manual_seed(0)  # as training seeds before building the model
    initial = RIM(steps=2, hidden_channels=4).state_dict()
    for key, value in weights[None].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-6)
    assert all(not torch.equal(v, initial[k]) for k, v in weights[None].items())
