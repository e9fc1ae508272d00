"""Every committed config validates."""

from pathlib import Path

import pytest
import yaml

from medinv.training.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    if yaml.safe_load(path.read_text()).get("task") != "segment":
        pytest.skip(f"{path.name} is not a segmentation config")
    config = load_config(path)
    assert config.data.manifest.is_absolute()
