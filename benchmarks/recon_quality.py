"""Reconstruction quality on held-out subjects: i-RIM against the RIM, zero-filled and CS.

Trains one or more i-RIMs and the RIM baseline on ``<set>/<challenge>_train`` with the same
training-time budget (``--minutes``, or the configs' epochs), reconstructs the held-out test
files (their own 4x/8x masks) and scores everything against ``<challenge>_test_full``, next
to the classical baselines of ``recon_baselines.py`` (zero-filled and sigpy L1-wavelet):
NMSE, PSNR and SSIM per acceleration, with parameters, training time and peak memory.
Training time is the sum of the epochs' training seconds (what the budget counts, without
validation); ``--reuse`` scores a run already in the work folder instead of training again.

    medinv data kspace --out data/kspace                       # the realistic set
    python benchmarks/recon_quality.py --data data/kspace --minutes 120 \\
        --out benchmarks/results/recon_quality_h100.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_kspace_set_arguments, folder_name, header, publish  # noqa: E402
from benchmarks.recon_baselines import run as run_baselines  # noqa: E402
from medinv.inference.reconstruction import (  # noqa: E402
    ReconstructionSettings,
    reconstruct_file,
)
from medinv.metrics.reconstruction import METRICS  # noqa: E402
from medinv.training.checkpoint import load_model, read_checkpoint  # noqa: E402
from medinv.training.config import load_config  # noqa: E402
from medinv.training.reconstruction import train_reconstruction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_kspace_set_arguments(parser)
    parser.add_argument(
        "--irim",
        type=Path,
        nargs="+",
        default=[ROOT / "configs/irim_multicoil.yaml"],
        help="one or more i-RIM configs; with several, each row names its config",
    )
    parser.add_argument("--rim", type=Path, default=ROOT / "configs/rim_multicoil.yaml")
    parser.add_argument("--minutes", type=float, help="training budget per model")
    parser.add_argument("--epochs", type=int, help="override the configs' epochs")
    parser.add_argument(
        "--lr-step-fraction",
        type=float,
        help="override the configs' schedules: every model's learning rate drops at the same "
        "shares of its budget (train.lr_step_fraction)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        help="override the configs' train.num_workers: every model's loader prepares its "
        "batches (coil maps) in as many worker processes",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="override the configs' train.batch_size: every model trains on batches of as "
        "many slices (slices with fewer coils padded with zero coils)",
    )
    parser.add_argument("--cs-iters", type=int, default=50)
    parser.add_argument("--cs-lambda", type=float, default=1e-3)
    parser.add_argument("--work", type=Path, default=Path("runs/recon_quality"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="score a model whose --work run folder already holds best.pt and metrics.csv "
        "(e.g. pipelines/train_default_reconstructor.py's run, copied there) instead of "
        "training it again; its model and training settings must be the config's",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    tests = sorted((args.data / f"{args.challenge}_test").glob("*.h5"))
    full = args.data / f"{args.challenge}_test_full"

    rows = []
    models = [(_label("i-RIM", p, len(args.irim) > 1), p) for p in args.irim]
    for name, path in [*models, ("RIM", args.rim)]:
        run = args.work / folder_name(name)  # i-RIM_irim_small
        config = load_config(path, task="reconstruct")
        config.data.train = args.data / f"{args.challenge}_train"
        config.data.val = args.data / f"{args.challenge}_val"
        config.data.challenge = args.challenge
        if args.minutes is not None:
            config.train.time_budget_minutes = args.minutes
        if args.epochs is not None:
            config.train.epochs = args.epochs
        if args.lr_step_fraction is not None:
            config.train.lr_step_fraction = args.lr_step_fraction
        if args.num_workers is not None:
            config.train.num_workers = args.num_workers
        if args.batch_size is not None:
            config.train.batch_size = args.batch_size
        if args.reuse and (run / "best.pt").is_file():
            history = reused_history(run, config)
        else:
            history = train_reconstruction(config, run, device)
        minutes = history["train_seconds"].sum() / 60
        model, _ = load_model(run / "best.pt")
        model.to(device)
        settings = ReconstructionSettings(overwrite=True)
        scores = pd.DataFrame(
            [
                reconstruct_file(
                    model, t, run / "test", settings, device, target_file=full / t.name
                )
                for t in tests
            ]
        )
        for acceleration, group in scores.groupby("acceleration"):
            row = {"method": name, "acceleration": acceleration, "volumes": len(group)}
            row.update({m: group[m].mean() for m in METRICS})
            row["parameters"] = sum(p.numel() for p in model.parameters())
            row["train min"] = minutes
            row["epochs"] = len(history)
            if "peak_memory_GiB" in history:
                row["train peak GiB"] = history["peak_memory_GiB"].max()
            rows.append(row)
        print(pd.DataFrame(rows).to_string(index=False), flush=True)

    baselines = run_baselines(
        args.data, args.challenge, args.cs_lambda, args.cs_iters, args.work / "baselines"
    )
    for _, b in baselines.iterrows():
        rows.append(
            {
                "method": b["method"],
                "acceleration": b["acceleration"],
                "volumes": b["volumes"],
                **{m: b[f"{m} mean"] for m in METRICS},
            }
        )
    table = pd.DataFrame(rows).sort_values(["acceleration", "SSIM"], ascending=[True, False])
    text = "\n".join(
        [
            f"# Reconstruction quality on held-out subjects ({args.challenge})",
            "",
            header(device),
            "",
            table.to_markdown(index=False, floatfmt=".4f"),
        ]
    )
    publish(text, args.out)


def reused_history(run: Path, config) -> pd.DataFrame:
    """The epoch table of a finished run in ``run``, checked against ``config``: the same
    model and training settings, and no more training time than the budget, so that the
    scores compare at equal budgets."""
    payload = read_checkpoint(run / "best.pt")
    wanted = (config.model.kind, config.model.kwargs())
    if (payload["kind"], payload["model_config"]) != wanted:
        raise SystemExit(
            f"{run}: --reuse found a run of {payload['kind']} {payload['model_config']}, "
            f"not the config's {wanted[0]} {wanted[1]}"
        )
    trained, wanted_train = payload.get("config", {}).get("train", {}), config.train.model_dump()
    differ = sorted(k for k in wanted_train if trained.get(k) != wanted_train[k])
    if differ:
        raise SystemExit(f"{run}: --reuse found a run trained otherwise ({', '.join(differ)})")
    history = pd.read_csv(run / "metrics.csv")
    budget = config.train.time_budget_minutes
    used = history["train_seconds"].iloc[:-1].sum() / 60  # the last epoch may overrun
    if budget is not None and used >= budget:
        raise SystemExit(f"{run}: --reuse found {used:.1f} min of training, budget {budget}")
    return history


def _label(kind: str, config: Path, named: bool) -> str:
    return f"{kind} ({config.stem})" if named else kind


if __name__ == "__main__":
    main()
