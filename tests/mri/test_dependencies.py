"""medinv.mri depends on torch and NumPy only; h5py stays in its file module."""

from __future__ import annotations

import subprocess
import sys


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_mri_imports_neither_monai_nor_h5py() -> None:
    modules = _imported_after("import medinv.mri")
    assert "torch" in modules and not {"monai", "h5py", "sigpy", "fastmri"} & modules


def test_mri_io_imports_h5py_but_not_monai() -> None:
    modules = _imported_after("import medinv.mri.io")
    assert "h5py" in modules and "monai" not in modules
