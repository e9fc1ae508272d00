"""Data-parallel scaling of `medinv train segment` under torchrun: 1 vs N processes.

Trains the same small 3D iUNet on the same synthetic BraTS-layout cases with 1, 2, ...
processes (``--procs``), gloo on CPUs or NCCL on GPUs, and reports the training time per
epoch (first epoch excluded: caching and start-up), training cases per second, the speed-up
over one process and the parallel efficiency. On CPUs each process gets ``--threads``
threads, so the rows compare equal total compute only where procs x threads is constant.

    python benchmarks/ddp_scaling.py --procs 1 2 --device cpu \
        --out benchmarks/results/ddp_scaling_cpu.md
    python benchmarks/ddp_scaling.py --procs 1 2 --device cuda                 # on one GPU
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import header, publish  # noqa: E402
from tests.synthetic_cases import write_case  # noqa: E402


def run(procs: int, threads: int, args, work: Path) -> dict:
    out = work / f"run_{procs}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(procs),
        "-m",
        "medinv",
        "train",
        "segment",
        "--config",
        str(work / "config.yaml"),
        "--out",
        str(out),
        "--device",
        args.device,
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    history = pd.read_csv(out / "metrics.csv")
    seconds = history["train_seconds"].iloc[1:].median()
    return {
        "processes": procs,
        "threads/process": threads,
        "s/epoch": seconds,
        "cases/s": args.cases / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="per process (CPU)")
    parser.add_argument("--cases", type=int, default=8, help="training cases")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 32])
    parser.add_argument("--roi", type=int, default=32, help="cubic training crop")
    parser.add_argument("--channels", type=int, default=8, help="iUNet channel blowup")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i in range(args.cases):
            write_case(work / "cases", f"case{i}", shape=tuple(args.shape), seed=i)
        (work / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "task": "segment",
                    "data": {
                        "manifest": "cases",
                        "roi_size": [args.roi] * 3,
                        "val_fraction": 0.0,
                    },
                    "model": {"channels": args.channels, "architecture": [2, 2, 2]},
                    "train": {"epochs": args.epochs, "batch_size": 1, "seed": 0},
                }
            )
        )
        rows = [run(p, args.threads, args, work) for p in args.procs]
    table = pd.DataFrame(rows)
    table["speed-up"] = table["cases/s"] / table["cases/s"].iloc[0]
    table["efficiency"] = table["speed-up"] * table["processes"].iloc[0] / table["processes"]
    text = "\n".join(
        [
            "# DDP scaling of `medinv train segment`",
            "",
            header(torch.device(args.device)),
            "",
            f"- {args.cases} training cases of {tuple(args.shape)}, {args.roi}^3 crops, batch 1 "
            f"per process, iUNet C={args.channels} with 3 scales, {args.epochs} epochs (first "
            "excluded); processes sharing one GPU communicate through gloo",
            "",
            table.to_markdown(index=False, floatfmt=".3f"),
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
