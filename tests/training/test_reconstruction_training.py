"""Reconstruction training: a stand-in model learns, validation scores volumes, resume works."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from medinv.inference.reconstruction import prepare, reconstruct, zero_filled
from medinv.models import build_model
from medinv.mri.fft import ifft2c
from medinv.training import reconstruction
from medinv.training.checkpoint import read_checkpoint
from medinv.training.config import ReconstructionConfig

from ..synthetic_cases import tiny_kspace_set


class ScaledZeroFilled(nn.Module):
    """``a * A^H y``: one learnable scalar, so the expected optimum is known."""

    def __init__(self, **_):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))

    def forward(self, kspace, mask, sensitivities=None):
        images = ifft2c(kspace)
        if sensitivities is not None:
            images = (sensitivities.conj() * images).sum(-3)
        return self.a * images


@pytest.fixture(scope="module")
def kspace_set(tmp_path_factory):
    return tiny_kspace_set(tmp_path_factory.mktemp("kspace"), 3, {"train": 2, "val": 1, "test": 0})


def _config(root, epochs):
    return ReconstructionConfig.model_validate(
        {
            "task": "reconstruct",
            "data": {"train": str(root / "multicoil_train"), "val": str(root / "multicoil_val")},
            "model": {
                "kind": "irim",
                "state_channels": 4,
                "steps": 1,
                "layers_per_step": 1,
                "dilations": [1],
                "hidden_channels": 4,
            },
            "train": {"epochs": epochs, "lr": 0.05, "lr_step_epochs": 100, "seed": 0},
        }
    )


def test_training_learns_scores_and_resumes(kspace_set, tmp_path, monkeypatch):
    monkeypatch.setattr(reconstruction, "build_model", lambda kind, kwargs: ScaledZeroFilled())
    out = tmp_path / "run"
    history = reconstruction.train_reconstruction(_config(kspace_set, 3), out, torch.device("cpu"))
    assert list(history["epoch"]) == [1, 2, 3]
    # Validation uses each file's fixed mask, so its scores compare across epochs.
    assert history["SSIM"].iloc[-1] > history["SSIM"].iloc[0]
    for column in ("SSIM", "PSNR", "NMSE", "SSIM_4x", "SSIM_8x"):
        assert history[column].notna().all()
    assert (out / "metrics.csv").is_file() and (out / "best.pt").is_file()
    state = read_checkpoint(out / "last.pt")
    assert state["epoch"] == 3 and state["kind"] == "irim"
    resumed = reconstruction.train_reconstruction(
        _config(kspace_set, 4), out, torch.device("cpu"), resume=True
    )
    assert list(resumed["epoch"]) == [1, 2, 3, 4]


def test_loader_workers_prepare_the_measurement(kspace_set, tmp_path):
    """The loader's collate builds each batch's measurement (coil maps, scale) as the
    training loop used to, so loader workers prepare it; a run with a worker trains."""
    config = _config(kspace_set, 1)
    dataset = reconstruction.slice_dataset(config.data.train, config, fixed_masks=True)
    items = [dataset[0], dataset[1]]
    batch = reconstruction.MeasuredBatches(config)(items)
    alone = [reconstruction._measure(reconstruction._collate([i]), config) for i in items]
    for name in ("kspace", "mask", "sensitivities", "scale"):
        expected = torch.cat([getattr(m, name) for m in alone])
        torch.testing.assert_close(getattr(batch["measurement"], name), expected)
    config.train.num_workers = 1
    history = reconstruction.train_reconstruction(config, tmp_path / "run", torch.device("cpu"))
    assert history["loss"].notna().all() and (history["loss"] > 0).all()


def test_slices_with_different_coil_counts_share_a_batch(tmp_path):
    """Slices of 3 and 5 coils in one batch: the fewer coils are padded with zero coils,
    and every slice's i-RIM estimate (and so its loss) is the one it gets alone; a run with
    batches of 2 trains."""
    root = tiny_kspace_set(tmp_path, 0, {"train": 3, "val": 0, "test": 0}, coils=(3, 5))
    config = _config(root, 1)
    config.data.val = None
    dataset = reconstruction.slice_dataset(config.data.train, config, fixed_masks=True)
    by_coils = {}
    for index in range(len(dataset)):
        item = dataset[index]
        by_coils.setdefault(item["kspace"].shape[-3], item)
    assert len(by_coils) >= 2, f"the set drew one coil count only: {sorted(by_coils)}"
    items = [by_coils[min(by_coils)], by_coils[max(by_coils)]]
    batch = reconstruction.MeasuredBatches(config)(items)
    measurement = batch["measurement"]
    fewest = items[0]["kspace"].shape[-3]
    assert measurement.kspace.shape[1] == measurement.sensitivities.shape[1] == max(by_coils)
    assert batch["kspace"].shape[1] == max(by_coils)
    assert not measurement.sensitivities[0, fewest:].any()
    assert not measurement.kspace[0, fewest:].any()

    torch.manual_seed(0)
    model = build_model("irim", config.model.kwargs()).eval()
    for up in model.modules():  # a machine that does something: G's last layers not zero
        if isinstance(up, nn.ConvTranspose2d):
            nn.init.normal_(up.weight, std=0.1)
    with torch.no_grad():
        together = reconstruct(model, measurement)
        for i, item in enumerate(items):
            alone = reconstruction.MeasuredBatches(config)([item])["measurement"]
            torch.testing.assert_close(together[i : i + 1], reconstruct(model, alone))

    config.train.batch_size = 2
    history = reconstruction.train_reconstruction(config, tmp_path / "run", torch.device("cpu"))
    assert history["loss"].notna().all()


def test_prepare_scales_each_slice_and_zero_filled_undoes_it():
    torch.manual_seed(0)
    kspace = torch.randn(2, 3, 16, 12, dtype=torch.complex64)
    kspace[1] = 50 * kspace[0]
    mask = torch.zeros(12)
    mask[4:8] = 1
    m = prepare(kspace * mask, mask, 4, multicoil=True)
    assert m.sensitivities.shape == (2, 3, 16, 12) and m.mask.shape == (2, 1, 1, 12)
    torch.testing.assert_close(m.scale[1] / m.scale[0], torch.tensor(50.0), rtol=0.05, atol=0)
    normalised = zero_filled(m) / m.scale.view(-1, 1, 1)
    torch.testing.assert_close(normalised.abs().flatten(1).amax(1), torch.ones(2))
    torch.testing.assert_close(
        (m.sensitivities.abs() ** 2).sum(1), torch.ones(2, 16, 12), rtol=1e-4, atol=1e-4
    )


def _steps_config(root, micro_batch_size):
    config = _config(root, 1).model_dump()
    config["data"].update(accelerations=[4], center_fractions=[0.08], val=None)
    config["train"].update(batch_size=4, micro_batch_size=micro_batch_size)
    return ReconstructionConfig.model_validate(config)


def test_micro_batches_sum_to_the_gradient_of_the_whole_batch(tmp_path, monkeypatch):
    """Steps of 4 slices in passes of 4, 2 or 1 (one acceleration, so every slice has the
    same calibration lines), over 6 slices: a step of 4 and a last step of 2. The gradient
    the optimizer sees at each step is the same: the mean over the step's slices."""
    from medinv.training.run import TrainingRun

    root = tiny_kspace_set(tmp_path, 4, {"train": 2, "val": 0, "test": 0}, slices=3)
    monkeypatch.setattr(reconstruction, "build_model", lambda kind, kwargs: ScaledZeroFilled())
    seen = []
    update = TrainingRun.update

    def recording_update(run):
        seen.append(run.model.a.grad.clone())
        update(run)

    monkeypatch.setattr(TrainingRun, "update", recording_update)
    gradients = {}
    for micro in (None, 2, 1):
        config = _steps_config(root, micro)
        assert config.train.accumulation == 4 // (micro or 4)
        seen.clear()
        reconstruction.train_reconstruction(config, tmp_path / f"micro{micro}", torch.device("cpu"))
        gradients[micro] = torch.stack(seen)
    assert gradients[None].shape == (2,) and (gradients[None].abs() > 1e-6).all()
    for micro in (2, 1):
        torch.testing.assert_close(gradients[micro], gradients[None], rtol=1e-5, atol=1e-8)


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(ValueError, match="does not divide"):
        ReconstructionConfig.model_validate(
            {
                "task": "reconstruct",
                "data": {"train": "x"},
                "train": {"batch_size": 4, "micro_batch_size": 3},
            }
        )


def test_the_epoch_that_uses_up_the_time_budget_is_validated(kspace_set, tmp_path, monkeypatch):
    monkeypatch.setattr(reconstruction, "build_model", lambda kind, kwargs: ScaledZeroFilled())
    config = _config(kspace_set, 5)
    config.train.time_budget_minutes = 1e-6
    config.train.val_interval = 4
    history = reconstruction.train_reconstruction(config, tmp_path / "run", torch.device("cpu"))
    assert list(history["epoch"]) == [1]
    assert history["SSIM"].notna().all()


def test_lr_drops_at_each_share_of_the_run_and_resumes_there(tmp_path):
    from medinv.training.run import ProgressStepLR

    shares = iter([0.1, 0.3, 0.45, 0.6, 0.95])
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = ProgressStepLR(optimizer, 0.3, 0.5, lambda: next(shares))
    rates = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [1.0, 0.5, 0.5, 0.25]
    # Checkpoints load with weights_only=True: the progress function is not saved.
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        p := tmp_path / "s.pt",
    )
    state = torch.load(p, weights_only=True)
    assert "progress" not in state["scheduler"]
    # Resumed as TrainingRun does: new optimizer and scheduler, then both states loaded.
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = ProgressStepLR(optimizer, 0.3, 0.5, lambda: next(shares))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert optimizer.param_groups[0]["lr"] == 0.25
    optimizer.step()
    scheduler.step()  # 0.95 of the run: three drops from the first rate
    assert optimizer.param_groups[0]["lr"] == 0.125


def test_run_progress_is_the_larger_share_of_epochs_and_of_time_budget():
    import time
    from types import SimpleNamespace

    from medinv.training.run import TrainingRun

    run = SimpleNamespace(
        config=SimpleNamespace(train=SimpleNamespace(epochs=100)),
        history=[{"train_seconds": 30.0}],
        budget=2.0,
        _started=time.perf_counter() - 30.0,
    )
    assert TrainingRun.progress(run) == pytest.approx(0.5, rel=0.02)  # 60 s of 2 minutes
    run.budget = None
    assert TrainingRun.progress(run) == pytest.approx(0.02)  # 2 of 100 epochs
    run.budget, run.config.train.epochs = 60.0, 4
    assert TrainingRun.progress(run) == pytest.approx(0.5)  # 2 of 4 epochs, little time


def test_training_drops_the_lr_at_shares_of_the_run(kspace_set, tmp_path, monkeypatch):
    monkeypatch.setattr(reconstruction, "build_model", lambda kind, kwargs: ScaledZeroFilled())
    config = _config(kspace_set, 4)
    config.train.lr_step_fraction, config.train.lr_gamma = 0.5, 0.5
    reconstruction.train_reconstruction(config, tmp_path / "run", torch.device("cpu"))
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.5**2)
    # metrics.csv: the rate each epoch trained at; the drops after epochs 2 and 4 of 4.
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert history["lr"].tolist() == pytest.approx([0.05, 0.05, 0.025, 0.025])
    config.train.lr_step_fraction = None  # lr_step_epochs 100: no drop in 4 epochs
    reconstruction.train_reconstruction(config, tmp_path / "plain", torch.device("cpu"))
    state = read_checkpoint(tmp_path / "plain" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)


def test_lr_step_fraction_is_a_share():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="lr_step_fraction"):
            ReconstructionConfig.model_validate(
                {"task": "reconstruct", "data": {"train": "x"}, "train": {"lr_step_fraction": bad}}
            )


def test_training_items_are_sharpened_where_asked_and_validation_items_never(kspace_set):
    config = _config(kspace_set, 1)
    config.data.sharpen, config.data.sharpen_probability = 3.0, 1.0
    plain = reconstruction.KSpaceSliceDataset(config.data.train)
    train = reconstruction.slice_dataset(config.data.train, config, fixed_masks=False)
    for i in range(len(train)):
        item, original = train[i], plain[i]
        # masked k-space of the filtered slice, and a target recomputed from it (the
        # generated set's targets are the RSS of their k-space, so the check passes)
        assert (item["target"] - original["target"]).abs().max() > 1e-3 * original["target"].max()
    val = reconstruction.slice_dataset(config.data.val, config, fixed_masks=True)
    val_plain = reconstruction.KSpaceSliceDataset(config.data.val)
    for i in range(len(val)):
        assert torch.equal(val[i]["target"], val_plain[i]["target"])
    config.data.sharpen = 0.0
    train = reconstruction.slice_dataset(config.data.train, config, fixed_masks=False)
    assert train.transform.augment is None
    with pytest.raises(ValueError, match="sharpen"):
        ReconstructionConfig.model_validate(
            {"task": "reconstruct", "data": {"train": "t", "sharpen": -1}}
        )
