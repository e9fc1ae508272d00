"""Every committed config validates."""

from pathlib import Path

import pytest

from medinv.training.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(path)
    paths = [getattr(config.data, f, None) for f in ("manifest", "train", "val")]
    assert all(p.is_absolute() for p in paths if p is not None)
