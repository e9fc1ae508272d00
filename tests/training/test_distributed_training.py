"""`medinv train` under torchrun: two CPU processes (gloo) train one model together."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import torch

from medinv.training.checkpoint import read_checkpoint

from ..synthetic_cases import tiny_segmentation_config


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
