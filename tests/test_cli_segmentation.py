"""`medinv train segment`, `medinv segment` and `medinv evaluate segmentation`, end to end."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd

from .synthetic_cases import tiny_segmentation_config, write_case


def medinv(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "medinv", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_train_segment_evaluate(tmp_path):
    config = tiny_segmentation_config(tmp_path, overlap=0.25)
    cases = tmp_path / "cases"
    trained = medinv("train", "segment", "--config", config, "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "best.pt").is_file()
    again = medinv("train", "segment", "--config", config, "--out", tmp_path / "run")
    assert again.returncode == 2 and "pass --resume" in again.stderr

    seg = medinv(
        "segment",
        cases,
        "--model",
        tmp_path / "run" / "best.pt",
        "--out",
        tmp_path / "seg",
        "--preview",
    )
    assert seg.returncode == 0, seg.stderr
    out = nib.load(tmp_path / "seg" / "case0.nii.gz")
    reference = nib.load(cases / "case0" / "case0_t1.nii.gz")
    assert out.shape == reference.shape and np.allclose(out.affine, reference.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 4}
    assert (tmp_path / "seg" / "case0_preview.png").is_file()

    scored = medinv(
        "evaluate",
        "segmentation",
        "--pred",
        tmp_path / "seg",
        "--truth",
        cases,
        "--out",
        tmp_path / "metrics.csv",
    )
    assert scored.returncode == 0, scored.stderr
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert len(table) == 9 and set(table["region"]) == {"WT", "TC", "ET"}
    assert (tmp_path / "metrics_summary.csv").is_file()


def test_segment_reports_user_errors_in_one_line(tmp_path):
    missing = medinv("segment", tmp_path / "nowhere", "--out", tmp_path / "seg")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("medinv: error:")
    write_case(tmp_path / "cases", "c0", shape=(16, 16, 16))
    bad_roi = medinv("segment", tmp_path / "cases", "--out", tmp_path / "seg", "--roi", "10x10")
    assert bad_roi.returncode == 2 and "--roi 10x10" in bad_roi.stderr
