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
    model.eval()
    with torch.no_grad():
        if payload["kind"] == "iunet":
            stride = model.total_stride
            out = model(torch.randn(1, 4, *(2 * s for s in stride)))
            assert out.shape[:2] == (1, 3)
        else:
            kspace = torch.randn(1, 4, 16, 12, dtype=torch.complex64)
            sens = torch.randn(1, 4, 16, 12, dtype=torch.complex64)
            mask = torch.ones(1, 1, 1, 12)
            out = model(kspace * mask, mask, sens)
            assert payload["kind"] == "irim" and out.shape == (1, 16, 12) and out.is_complex()
    assert torch.isfinite(torch.view_as_real(out) if out.is_complex() else out).all()


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


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_config_holds_no_machine_paths(name):
    from pathlib import Path

    from medinv.training.checkpoint import read_checkpoint

    data = read_checkpoint(WEIGHTS_DIR / f"{name}.pt")["config"]["data"]
    paths = [v for v in data.values() if isinstance(v, str) and "/" in v]
    assert paths and not any(Path(v).is_absolute() for v in paths)
