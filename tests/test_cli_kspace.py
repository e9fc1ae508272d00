"""`medinv data kspace` and `medinv evaluate reconstruction` end to end."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medinv import cli
from medinv.metrics.reconstruction import volume_metrics
from medinv.mri import center_crop, ifft2c, rss
from medinv.mri.io import KSpaceFile, read_reconstruction, write_reconstruction

runner = CliRunner()


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["medinv", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code or 0


@pytest.fixture
def anatomy_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory holding small synthetic stand-ins for the fetched volumes."""
    root = tmp_path / "anatomy"
    for i, name in enumerate(["icbm152/t1", "icbm152/t2", "colin27/t1"]):
        z, y, x = np.mgrid[:20, :26, :24]
        head = ((x - 12) / 10) ** 2 + ((y - 13) / 11) ** 2 + ((z - 10) / 9) ** 2 < 1
        volume = head * (1 + 0.4 * np.sin(x / (2 + i)) * np.cos(y / 3)) * 50
        path = root / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(volume.astype(np.float32).T, np.eye(4)), path)
    monkeypatch.setenv("MEDINV_DATA_DIR", str(root))
    return root


def test_new_commands_have_help_with_an_example() -> None:
    for command in (["evaluate"], ["evaluate", "reconstruction"], ["data", "kspace"]):
        result = runner.invoke(cli.app, [*command, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, command


def test_build_then_evaluate_zero_filled(
    anatomy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "set"
    args = ["data", "kspace", "--out", str(out), "--train", "0", "--val", "0", "--test", "2"]
    args += ["--slices", "2", "--matrix", "32", "--coils-max", "8", "--challenge", "multicoil"]
    assert run_main(monkeypatch, *args) == 0
    assert "4 files and manifest.csv" in capsys.readouterr().out
    with open(out / "manifest.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4

    recon = tmp_path / "recon"
    recon.mkdir()
    expected = {}
    for path in sorted((out / "multicoil_test").glob("*.h5")):
        with KSpaceFile(path) as f:
            volume = np.stack(
                [center_crop(rss(ifft2c(f.kspace(i))), (32, 32)).numpy() for i in range(2)]
            )
        write_reconstruction(recon / path.name, volume)
        target = read_reconstruction(out / "multicoil_test_full" / path.name, "reconstruction_rss")
        expected[path.name] = volume_metrics(target, volume)

    metrics = tmp_path / "metrics.csv"
    evaluate = ["evaluate", "reconstruction", "--pred", str(recon)]
    evaluate += ["--target", str(out / "multicoil_test_full"), "--out", str(metrics)]
    assert run_main(monkeypatch, *evaluate) == 0
    with open(metrics, newline="") as f:
        rows = {row["file"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(expected)
    for name, scores in expected.items():
        for metric, value in scores.items():
            assert float(rows[name][metric]) == pytest.approx(value, rel=1e-9)

    capsys.readouterr()
    assert run_main(monkeypatch, *evaluate) == 2
    assert (
        capsys.readouterr().err
        == f"medinv: error: {metrics}: exists; pass --overwrite to replace it\n"
    )

    (recon / sorted(expected)[0]).unlink()
    assert run_main(monkeypatch, *evaluate, "--overwrite") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medinv:")]
    assert len(err) == 2
    assert err[0].startswith(f"medinv: error: {recon / sorted(expected)[0]}: no prediction")
    assert err[-1] == "medinv: error: 1 volume(s) could not be scored (see above)"
    with open(metrics, newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_kspace_without_anatomy_is_a_resource_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MEDINV_DATA_DIR", str(tmp_path / "empty"))
    assert run_main(monkeypatch, "data", "kspace", "--out", str(tmp_path / "s")) == 4
    assert "run `medinv data fetch`" in capsys.readouterr().err


def test_kspace_bad_option_is_an_input_error(
    anatomy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    args = ["data", "kspace", "--out", str(tmp_path / "s"), "--coils-min", "9", "--coils-max", "8"]
    assert run_main(monkeypatch, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "coil range 9-8" in err
