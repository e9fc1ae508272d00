"""3D i-RIM training on slabs of adjacent slices: data, validation reassembly, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from medinv.errors import ConfigError, InputError
from medinv.models import IRIM
from medinv.mri.io import KSpaceFile
from medinv.training import reconstruction
from medinv.training.checkpoint import load_model
from medinv.training.config import ReconstructionConfig, load_config

from ..synthetic_cases import tiny_kspace_set
from .test_reconstruction_training import ScaledZeroFilled

SLICES, SLAB = 5, 2


@pytest.fixture(scope="module")
def kspace_set(tmp_path_factory):
    return tiny_kspace_set(
        tmp_path_factory.mktemp("kspace"), 4, {"train": 2, "val": 1, "test": 0}, slices=SLICES
    )


def _raw(root, dim: int = 3, slab: int = SLAB, epochs: int = 2) -> dict:
    return {
        "task": "reconstruct",
        "data": {
            "train": str(root / "multicoil_train"),
            "val": str(root / "multicoil_val"),
            "slab": slab,
        },
        "model": {
            "kind": "irim",
            "dim": dim,
            "state_channels": 4,
            "steps": 1,
            "layers_per_step": 2,
            "dilations": [1, 2],
            "hidden_channels": 4,
        },
        "train": {"epochs": epochs, "lr": 0.01, "seed": 0},
    }


def _config(root, **kwargs) -> ReconstructionConfig:
    return ReconstructionConfig.model_validate(_raw(root, **kwargs))


def test_training_slabs_are_consecutive_slices_with_one_mask(kspace_set):
    config = _config(kspace_set)
    dataset = reconstruction.slice_dataset(config.data.train, config, fixed_masks=False)
    # 5 slices in slabs of 2: starts 0, 2 and the last aligned to the end, 3.
    assert [start for _, start in dataset.index] == [0, 2, 3] * 2
    item = dataset[2]
    path = dataset.index[2][0]
    with KSpaceFile(path) as f:
        slab = torch.stack([f.kspace(i) for i in (3, 4)])
        target = torch.stack([f.target(i) for i in (3, 4)])
    assert item["slice"] == 3 and item["kspace"].shape == (SLAB, 4, 64, 32)
    assert item["mask"].shape == (32,)
    torch.testing.assert_close(item["kspace"], slab * item["mask"])
    torch.testing.assert_close(item["target"], target)
    measurement = reconstruction._measure(reconstruction._collate([item]), config)
    assert measurement.kspace.shape == measurement.sensitivities.shape == (1, SLAB, 4, 64, 32)
    assert measurement.mask.shape == (1, 1, 1, 1, 32)


def test_3d_validation_scores_each_slice_once_in_order_as_2d_does(kspace_set, monkeypatch):
    # A per-slice linear model gives the same images slice by slice and slab by slab (the
    # scale cancels), so the 3D scores equal the 2D ones only if every slice of each volume
    # is put back once and in order; the stacked targets are checked against the file.
    stacked = []

    def recording(target, image):
        stacked.append(target)
        return volume_metrics(target, image)

    volume_metrics = reconstruction.volume_metrics
    monkeypatch.setattr(reconstruction, "volume_metrics", recording)
    model = ScaledZeroFilled()
    slab_scores = reconstruction.validate(model, _config(kspace_set), torch.device("cpu"))
    (path,) = sorted((kspace_set / "multicoil_val").glob("*.h5"))
    with KSpaceFile(path) as f:
        targets = np.stack([f.target(i).numpy() for i in range(f.num_slices)])
    assert len(stacked) == 2  # one volume, two accelerations
    for target in stacked:
        np.testing.assert_array_equal(target, targets)
    slice_scores = reconstruction.validate(model, _config(kspace_set, dim=2), torch.device("cpu"))
    assert slab_scores.keys() == slice_scores.keys()
    for key, value in slice_scores.items():
        assert slab_scores[key] == pytest.approx(value, rel=1e-4), key


def test_3d_irim_trains_and_its_checkpoint_rebuilds_a_3d_model(kspace_set, tmp_path):
    path = tmp_path / "irim3d.yaml"
    path.write_text(yaml.safe_dump(_raw(kspace_set)))
    config = load_config(path, task="reconstruct")
    out = tmp_path / "run"
    history = reconstruction.train_reconstruction(config, out, torch.device("cpu"))
    assert list(history["epoch"]) == [1, 2]
    for column in ("loss", "SSIM", "PSNR", "NMSE", "SSIM_4x", "SSIM_8x"):
        assert np.isfinite(history[column]).all(), column
    model, payload = load_model(out / "best.pt")
    assert isinstance(model, IRIM) and model.dim == 3
    assert payload["config"]["data"]["slab"] == SLAB
    kspace = torch.randn(1, SLAB, 4, 64, 32, dtype=torch.complex64)
    sensitivities = torch.randn(1, SLAB, 4, 64, 32, dtype=torch.complex64)
    assert model(kspace, torch.ones(1, 1, 1, 1, 32), sensitivities).shape == (1, SLAB, 64, 32)


def test_a_file_shorter_than_the_slab_is_named(kspace_set, tmp_path):
    with pytest.raises(InputError, match=r"_train_000\.h5: 5 slices, fewer than a slab of 6"):
        reconstruction.train_reconstruction(
            _config(kspace_set, slab=6), tmp_path / "run", torch.device("cpu")
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"slab": 0}}, "data.slab: Input should be greater than or equal to 1"),
        ({"data": {"slab": 4, "slab_stride": 5}}, "slab_stride 5 would skip slices"),
        ({"model": {"dim": 4}}, "model.dim: Input should be 2 or 3"),
        ({"model": {"kind": "rim", "dim": 3}}, "model.dim 3 needs model.kind irim"),
    ],
)
def test_invalid_3d_settings_are_named(tmp_path, change, message):
    raw = _raw(tmp_path)
    for section, values in change.items():
        raw[section].update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("gpu_memory", [None, "1GiB"])
def test_medinv_reconstruct_runs_a_3d_checkpoint_slab_by_slab(kspace_set, tmp_path, gpu_memory):
    """`medinv reconstruct` reads the slab size from the checkpoint and writes every slice:
    the file equals the slab helper's result on the same masked k-space; with a memory
    budget the planner batches the slabs (here all three at once)."""
    import h5py

    from medinv.inference.reconstruction import magnitude_crop, prepare
    from medinv.inference.slabs import reconstruct_volume_in_slabs

    from ..test_cli_segmentation import medinv

    path = tmp_path / "irim3d.yaml"
    path.write_text(yaml.safe_dump(_raw(kspace_set, epochs=1)))
    config = load_config(path, task="reconstruct")
    reconstruction.train_reconstruction(config, tmp_path / "run", torch.device("cpu"))
    (source,) = sorted((kspace_set / "multicoil_val").glob("*.h5"))
    done = medinv(
        "reconstruct",
        source,
        "--model",
        tmp_path / "run" / "best.pt",
        "--acceleration",
        "4",
        "--out",
        tmp_path / "recon",
        "--device",
        "cpu",
        *(["--gpu-memory", gpu_memory] if gpu_memory else []),
    )
    assert done.returncode == 0, done.stderr
    if gpu_memory:
        assert f"batches of 3 slabs of {SLAB} slices x1" in done.stdout
    with h5py.File(tmp_path / "recon" / source.name) as f:
        written = torch.from_numpy(f["reconstruction"][()])

    from medinv.inference.reconstruction import ReconstructionSettings, _mask_of

    model, _ = load_model(tmp_path / "run" / "best.pt")
    model.eval()
    with KSpaceFile(source) as f:
        mask, num_low, _ = _mask_of(f, source, ReconstructionSettings(acceleration=4))
        kspace = torch.stack([f.kspace(i) for i in range(f.num_slices)]) * mask
        shape = tuple(f.header.recon_size[:2])
    maps = prepare(kspace, mask, num_low, True).sensitivities
    expected = magnitude_crop(reconstruct_volume_in_slabs(model, kspace, mask, maps, SLAB), shape)
    assert written.shape == (SLICES, *shape)
    torch.testing.assert_close(written, expected.float(), rtol=1e-4, atol=1e-6)


def test_train_reconstruct_plans_micro_batches_of_slabs_for_a_3d_model(kspace_set, tmp_path):
    """With a budget, a 3D recipe's steps of 4 slabs are planned as slabs of the config's
    depth (here all four fit at once) and train."""
    from typer.testing import CliRunner

    from medinv import cli

    raw = _raw(kspace_set, epochs=1)
    raw["train"]["batch_size"] = 4
    path = tmp_path / "irim3d.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    args = ["train", "reconstruct", "--config", str(path), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(cli.app, [*args, "--gpu-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    assert f"memory planner: batches of 4 slabs of {SLAB} slices" in result.stdout
    assert "steps of 4 in 1 pass of 4" in result.stdout
    assert (out / "best.pt").is_file()
