"""The ``medinv`` command: help, doctor, and how errors reach the user."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from medinv import cli
from medinv.errors import ConfigError, InputError, MedinvError, ResourceError

runner = CliRunner()


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run :func:`medinv.cli.main` as the console script would; its exit status."""
    monkeypatch.setattr(sys, "argv", ["medinv", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code or 0


def test_help_lists_commands_with_an_example() -> None:
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    assert "doctor" in result.output and "data" in result.output
    assert "Example:" in result.output
    for command in (["doctor"], ["data"], ["data", "fetch"]):
        help_text = runner.invoke(cli.app, [*command, "--help"]).output
        assert "Example:" in help_text, command


def test_doctor_json_reports_installed_torch_version() -> None:
    import torch

    result = runner.invoke(cli.app, ["doctor", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["versions"]["torch"] == torch.__version__
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert "icbm152/t1" in report["data"]["anatomy"]


def test_doctor_table_exits_zero() -> None:
    result = runner.invoke(cli.app, ["doctor"])
    assert result.exit_code == 0
    assert "torch" in result.output and "data directory" in result.output


@pytest.mark.parametrize(
    ("error", "code"), [(MedinvError, 1), (InputError, 2), (ConfigError, 3), (ResourceError, 4)]
)
def test_medinv_error_is_one_stderr_line_and_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: type, code: int
) -> None:
    failing = typer.Typer()

    @failing.command()
    def fail() -> None:
        raise error("scan.nii.gz: not a NIfTI file\n(second line)")

    monkeypatch.setattr(cli, "app", failing)
    assert run_main(monkeypatch) == code
    captured = capsys.readouterr()
    assert captured.err == "medinv: error: scan.nii.gz: not a NIfTI file (second line)\n"
    assert captured.out == ""


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    interrupted = typer.Typer()

    @interrupted.command()
    def stop() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    assert run_main(monkeypatch) == 130


def test_fetch_into_a_file_is_an_input_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    not_a_dir = tmp_path / "anatomy"
    not_a_dir.write_text("")
    assert run_main(monkeypatch, "data", "fetch", "--dest", str(not_a_dir)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"medinv: error: {not_a_dir}: ")


def test_importing_medinv_and_its_cli_does_not_import_torch() -> None:
    code = "import sys, medinv, medinv.cli; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
