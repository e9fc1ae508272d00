"""Segmentation training: runs, checkpoints load safely, resume continues, config errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from medinv.errors import ConfigError
from medinv.training.checkpoint import load_model, read_checkpoint
from medinv.training.config import SegmentationConfig, load_config
from medinv.training.segmentation import split_cases, train_segmentation

from ..synthetic_cases import write_case


def _config(tmp_path, epochs):
    return SegmentationConfig.model_validate(
        {
            "task": "segment",
            "data": {"manifest": str(tmp_path), "roi_size": [16, 16, 16], "cache": True},
            "model": {"channels": 4, "architecture": [1, 1, 1]},
            "train": {"epochs": epochs, "lr": 3e-3, "seed": 0},
            "inference": {"roi_size": [32, 32, 16], "overlap": 0.25},
        }
    )


def test_training_writes_metrics_and_checkpoints_and_resumes(tmp_path):
    cases = [write_case(tmp_path / "cases", f"case{i}", seed=i) for i in range(3)]
    train, val = split_cases(cases, val_fraction=0.34, seed=0)
    assert len(train) == 2 and len(val) == 1
    out = tmp_path / "run"
    history = train_segmentation(_config(tmp_path, 2), train, val, out, torch.device("cpu"))
    assert list(history["epoch"]) == [1, 2]
    assert {"loss", "dice_TC", "dice_WT", "dice_ET", "dice_mean"} <= set(history.columns)
    assert history["loss"].notna().all() and history["dice_mean"].between(0, 1).all()
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), history, check_dtype=False)
    model, payload = load_model(out / "best.pt")
    assert payload["kind"] == "iunet" and payload["epoch"] in (1, 2)
    resumed = train_segmentation(
        _config(tmp_path, 3), train, val, out, torch.device("cpu"), resume=True
    )
    assert list(resumed["epoch"]) == [1, 2, 3]
    assert read_checkpoint(out / "last.pt")["epoch"] == 3


def test_manifest_split_column_is_respected():
    cases = [
        {"case_id": str(i), "split": s} for i, s in enumerate(["train", "val", "test", "train"])
    ]
    train, val = split_cases(cases, val_fraction=0.2, seed=0)
    assert [c["case_id"] for c in train] == ["0", "3"] and [c["case_id"] for c in val] == ["1"]


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump({"task": "segment", "data": {"manifest": "m.csv"}, "train": {"epochs": 0}})
    )
    with pytest.raises(ConfigError, match="train.epochs: Input should be greater than"):
        load_config(path)
    path.write_text(
        yaml.safe_dump({"task": "segment", "data": {"manifest": "m.csv", "roi_size": [30, 32, 32]}})
    )
    with pytest.raises(ConfigError, match="divisible by the model's total stride 16"):
        load_config(path)
    path.write_text("task: segment\ndata: {manifest: m.csv, unknown: 1}\n")
    with pytest.raises(ConfigError, match="data.unknown"):
        load_config(path)
    path.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_checkpoint_that_is_not_ours_is_a_clear_error(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    from medinv.errors import InputError

    with pytest.raises(InputError, match="not a medinv checkpoint"):
        read_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable medinv checkpoint"):
        read_checkpoint(path)


def test_time_budget_stops_training_and_segresnet_baseline_trains(tmp_path):
    """The epoch that uses up the budget is validated, whatever the interval."""
    cases = [write_case(tmp_path / "cases", f"case{i}", seed=i) for i in range(2)]
    config = _config(tmp_path, epochs=5)
    config.model.kind = "segresnet"
    config.model.channels = 8  # SegResNet normalises in groups of 8
    config.train.time_budget_minutes = 1e-6
    config.train.val_interval = 4
    history = train_segmentation(
        config, cases[:1], cases[1:], tmp_path / "run", torch.device("cpu")
    )
    assert list(history["epoch"]) == [1]
    assert history["dice_mean"].notna().all()
    assert (tmp_path / "run" / "best.pt").is_file()
    model, payload = load_model(tmp_path / "run" / "last.pt")
    assert payload["kind"] == "segresnet" and type(model).__name__ == "SegResNet"


def test_cosine_over_the_run_is_cosine_over_the_epochs_without_a_budget(tmp_path):
    """Without a time budget the run's share is its share of epochs: the same rates."""
    cases = [write_case(tmp_path / "cases", f"case{i}", seed=i) for i in range(2)]
    rates = {}
    for over in ("epochs", "run"):
        config = _config(tmp_path, epochs=3)
        config.train.lr_schedule_over = over
        config.train.val_interval = 10
        history = train_segmentation(
            config, cases[:1], cases[1:], tmp_path / over, torch.device("cpu")
        )
        rates[over] = history["lr"].tolist()
    assert rates["epochs"] == pytest.approx([3e-3, 3e-3 * 0.75, 3e-3 * 0.25])
    assert rates["run"] == pytest.approx(rates["epochs"])
