"""MONAI bundle export: the bundle runs under MONAI's runner and matches medinv segment."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_net_in_out

from medinv.errors import InputError
from medinv.inference.bundle import export_bundle
from medinv.inference.segmentation import SegmentationSettings, segment_case
from medinv.models import build_model
from medinv.training.checkpoint import bundled_weights, load_model, save_checkpoint
from tests.synthetic_cases import write_case

DEFAULT = "iunet_brats_like_small"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return export_bundle(bundled_weights(DEFAULT), tmp_path_factory.mktemp("export") / "bundle")


def test_bundle_has_monai_layout_and_loadable_state_dict(bundle):
    for name in ("configs/inference.json", "configs/metadata.json", "docs/README.md"):
        assert (bundle / name).is_file(), name
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    model, _ = load_model(bundled_weights(DEFAULT))
    assert state.keys() == model.state_dict().keys()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert {"version", "monai_version", "pytorch_version", "network_data_format"} <= set(meta)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 4
    verify_net_in_out(  # MONAI's check that the network fits the declared inputs/outputs
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
    )
    readme = (bundle / "docs" / "README.md").read_text()
    assert "not for clinical use" in readme.lower() and "SHA-256" in readme  # the model card


def test_bundle_run_matches_medinv_segment(bundle, tmp_path):
    pytest.importorskip("fire", reason="MONAI's bundle runner needs fire (the dev extra)")
    case = write_case(tmp_path / "cases", "case_001", shape=(40, 36, 28))
    out = tmp_path / "bundle_out"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(tmp_path / "cases"),
        "--output_dir",
        str(out),
    ]
    result = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    model, payload = load_model(bundled_weights(DEFAULT))
    inference = payload["config"]["inference"]
    settings = SegmentationSettings(roi_size=inference["roi_size"], overlap=inference["overlap"])
    reference = segment_case(model, case, tmp_path / "medinv_out", settings, torch.device("cpu"))

    ours, theirs = nib.load(reference["labels"]), nib.load(out / "case_001.nii.gz")
    assert theirs.shape == ours.shape == (40, 36, 28)
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-6)
    labels = np.asarray(ours.dataobj)
    assert set(np.unique(labels)) > {0}, "the reference found no tumour: a vacuous comparison"
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), labels)


def test_export_refuses_existing_folder_and_non_segmenters(bundle, tmp_path):
    with pytest.raises(InputError, match="--overwrite"):
        export_bundle(bundled_weights(DEFAULT), bundle)
    with pytest.raises(InputError, match="segmentation models"):
        export_bundle(bundled_weights("irim_multicoil_small"), tmp_path / "irim_bundle")
    assert not (tmp_path / "irim_bundle").exists()


def test_export_overwrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "bundle"
    (out / "stale").mkdir(parents=True)
    export_bundle(bundled_weights(DEFAULT), out, overwrite=True)
    assert not (out / "stale").exists() and (out / "models" / "model.pt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left


def test_cli_export_bundle_writes_default_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    from medinv import cli

    out = tmp_path / "bundle"
    for expected_status in (0, 2):
        monkeypatch.setattr(
            sys, "argv", ["medinv", "export-bundle", "--model", "default", "--out", str(out)]
        )
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert (exit_info.value.code or 0) == expected_status
    assert (out / "configs" / "inference.json").is_file()
    assert capsys.readouterr().err.strip().endswith("exists; pass --overwrite to replace it")


def test_segresnet_checkpoint_exports_a_bundle_monai_verifies(tmp_path):
    config = {"spatial_dims": 3, "in_channels": 4, "out_channels": 3, "init_filters": 8}
    checkpoint = tmp_path / "segresnet.pt"
    save_checkpoint(checkpoint, "segresnet", config, build_model("segresnet", config))
    bundle = export_bundle(checkpoint, tmp_path / "bundle")
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"]["_target_"] == "monai.networks.nets.SegResNet"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
    )
