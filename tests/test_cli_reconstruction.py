"""`medinv train reconstruct` and `medinv reconstruct`, end to end on a tiny k-space set."""

from __future__ import annotations

import h5py
import pandas as pd
import pytest
import yaml

from .synthetic_cases import tiny_kspace_set
from .test_cli_segmentation import medinv


@pytest.fixture(scope="module")
def kspace_set(tmp_path_factory):
    return tiny_kspace_set(tmp_path_factory.mktemp("kspace"), 5, {"train": 1, "val": 1, "test": 1})


def test_train_reconstruct_and_score(kspace_set, tmp_path):
    config = tmp_path / "irim.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "reconstruct",
                "data": {
                    "train": str(kspace_set / "multicoil_train"),
                    "val": str(kspace_set / "multicoil_val"),
                },
                "model": {
                    "kind": "irim",
                    "state_channels": 6,
                    "steps": 2,
                    "layers_per_step": 2,
                    "dilations": [1, 2],
                    "hidden_channels": 6,
                },
                "train": {"epochs": 1, "lr": 0.001},
            }
        )
    )
    trained = medinv("train", "reconstruct", "--config", config, "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "best.pt").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())

    test = kspace_set / "multicoil_test"
    run = medinv(
        "reconstruct",
        test,
        "--model",
        tmp_path / "run" / "best.pt",
        "--out",
        tmp_path / "recon",
        "--targets",
        kspace_set / "multicoil_test_full",
        "--preview",
    )
    assert run.returncode == 0, run.stderr
    (written,) = sorted((tmp_path / "recon").glob("*.h5"))
    with h5py.File(written) as f:
        assert f["reconstruction"].dtype == "float32"
        assert f["reconstruction"].shape == (2, 32, 32)
    table = pd.read_csv(tmp_path / "recon" / "metrics.csv")
    assert {"SSIM", "PSNR", "NMSE", "SSIM zero-filled"} <= set(table.columns)
    assert (tmp_path / "recon" / f"{written.stem}.png").is_file()

    full = medinv(
        "reconstruct",
        kspace_set / "multicoil_val",
        "--model",
        tmp_path / "run" / "best.pt",
        "--out",
        tmp_path / "val",
    )
    assert full.returncode == 2
    assert "pass --acceleration" in full.stderr and full.stderr.count("medinv: error") == 2
