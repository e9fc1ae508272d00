"""Bundled default weights: present, verified, loadable without running code."""

from __future__ import annotations

import shutil

import pytest
import torch

from medinv.errors import InputError
from medinv.training import checkpoint
from medinv.training.checkpoint import WEIGHTS_DIR, bundled_weights, load_model

BUNDLED = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))


def test_every_bundled_model_has_a_card():
    assert BUNDLED, "no bundled weights"
    for name in BUNDLED:
        card = (WEIGHTS_DIR / f"{name}.md").read_text()
        assert "Not for clinical use" in card and "SHA-256" in card


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_loads_and_runs(name):
    model, payload = load_model(bundled_weights(name))
    assert payload["kind"] == "iunet"
    stride = model.total_stride
    logits = model.eval()(torch.randn(1, 4, *(2 * s for s in stride)))
    assert logits.shape[:2] == (1, 3)


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    name = BUNDLED[0]
    for suffix in (".pt", ".md"):
        shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    assert checkpoint.bundled_weights(name) == tmp_path / f"{name}.pt"
    with open(tmp_path / f"{name}.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="SHA-256 does not match"):
        checkpoint.bundled_weights(name)
