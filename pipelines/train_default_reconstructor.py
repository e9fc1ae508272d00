"""Train, evaluate and bundle the default reconstruction model (medinv/weights/).

1. builds the small multi-coil k-space set from the fetched anatomy unless it exists;
2. trains the recipe in configs/irim_multicoil_small.yaml;
3. reconstructs the held-out test files (their own 4x/8x masks) and scores them against
   their fully sampled twins, next to the zero-filled images;
4. writes ``medinv/weights/<name>.pt`` (model description and weights, loadable with
   ``weights_only=True``) and its model card with data, recipe, metrics and SHA-256.

    python pipelines/train_default_reconstructor.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from medinv.data.kspace import KSpaceSetConfig, build_kspace_set
from medinv.devices import describe
from medinv.inference.reconstruction import ReconstructionSettings, reconstruct_file
from medinv.training.checkpoint import (
    WEIGHTS_DIR,
    load_model,
    portable_config,
    read_checkpoint,
    save_checkpoint,
    sha256,
)
from medinv.training.config import load_config
from medinv.training.reconstruction import train_reconstruction

ROOT = Path(__file__).resolve().parents[1]
SMALL_SET = KSpaceSetConfig(
    seed=0,
    volumes={"train": 6, "val": 2, "test": 2},
    slices=8,
    matrix=128,
    coils=(8, 12),
    challenges=("multicoil",),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/irim_multicoil_small.yaml")
    parser.add_argument("--name", default="irim_multicoil_small")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/default_reconstructor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate and bundle --work's run, no training"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config(args.config, task="reconstruct")
    root = config.data.train.parent
    if not any(config.data.train.glob("*.h5")):
        print(f"building the k-space set in {root}")
        build_kspace_set(root, SMALL_SET)

    if args.reuse and (args.work / "best.pt").is_file():
        history = pd.read_csv(args.work / "metrics.csv")
        minutes = history["train_seconds"].sum() / 60
    else:
        started = time.perf_counter()
        history = train_reconstruction(
            config,
            args.work,
            device,
            progress=lambda what, step, total: print(f"\r{what}: step {step}/{total}", end=""),
        )
        minutes = (time.perf_counter() - started) / 60
    print(f"\ntrained {len(history)} epochs in {minutes:.1f} min")

    model, payload = load_model(args.work / "best.pt")
    model.to(device)
    settings = ReconstructionSettings(overwrite=True)
    rows = []
    for path in sorted((root / "multicoil_test").glob("*.h5")):
        rows.append(
            reconstruct_file(
                model,
                path,
                args.work / "test",
                settings,
                device,
                target_file=root / "multicoil_test_full" / path.name,
            )
        )
    table = pd.DataFrame(rows)
    table.to_csv(args.work / "test_metrics.csv", index=False)
    print(table.to_string(index=False))

    weights = WEIGHTS_DIR / f"{args.name}.pt"
    save_checkpoint(
        weights,
        payload["kind"],
        payload["model_config"],
        model.cpu(),
        config=portable_config(payload["config"], ROOT),
        epoch=payload["epoch"],
    )
    read_checkpoint(weights)
    card = WEIGHTS_DIR / f"{args.name}.md"
    card.write_text(model_card(args, config, history, table, minutes, weights, device))
    print(f"wrote {weights} and {card}")


def model_card(args, config, history, table, minutes, weights, device) -> str:
    m, t, d = config.model, config.train, config.data
    params = sum(p.numel() for p in load_model(weights)[0].parameters())
    best = history.loc[history["SSIM"].idxmax()]
    rows = []
    for acceleration, group in table.groupby("acceleration"):
        for who, suffix in (("i-RIM", ""), ("zero-filled", " zero-filled")):
            rows.append(
                f"| {int(acceleration)}x | {who} | {len(group)} | "
                f"{group['NMSE' + suffix].mean():.4f} | {group['PSNR' + suffix].mean():.2f} | "
                f"{group['SSIM' + suffix].mean():.4f} |"
            )
    v = SMALL_SET.volumes
    schedule = (
        f"every {t.lr_step_epochs} epochs"
        if t.lr_step_fraction is None
        else f"at every {t.lr_step_fraction:.0%} of the run"
    )
    sharpening = (
        f"\n- Augmentation: a share {d.sharpen_probability} of the training slices sharpened in "
        f"k-space (`data.sharpen`,\n  strengths up to {d.sharpen}), the targets recomputed."
        if d.sharpen > 0
        else ""
    )
    return f"""# {args.name}: default multi-coil i-RIM

**Not for clinical use.** A small i-RIM trained on simulated multi-coil k-space made from
real brain templates (smooth random phase, simulated coil maps, correlated noise); it shows
the pipeline end to end and is a starting point for fine-tuning, not a reconstructor for
patient data.

- Model: `IRIM`, {m.state_channels} state channels, {m.steps} time steps x {m.layers_per_step}
  invertible layers (dilations {list(m.dilations)}), {m.hidden_channels} hidden channels,
  separate weights per step; {params:,} parameters.
- Data: `medinv data kspace --seed {SMALL_SET.seed} --matrix {SMALL_SET.matrix} --slices
  {SMALL_SET.slices} --coils-min {SMALL_SET.coils[0]} --coils-max {SMALL_SET.coils[1]}`:
  {v["train"]} training volumes (ICBM 2009c), {v["val"]} validation and {v["test"]} test
  volumes (Colin27, a different subject), {2 * SMALL_SET.matrix}x{SMALL_SET.matrix} k-space.
- Recipe: `configs/{args.config.name}`: {len(history)} epochs, masks drawn per slice ({d.mask_type})
  at {d.accelerations}x (centre fractions {d.center_fractions}), ACS coil maps, Adam lr
  {t.lr} (x{t.lr_gamma} {schedule}), loss {t.ssim_weight} (1 - SSIM)
  + {t.l1_weight} L1 on the target grid, seed {t.seed}; trained in {minutes:.0f} min on
  {describe(device)}, torch {torch.__version__}.{sharpening}
- Best validation SSIM {best["SSIM"]:.4f} at epoch {int(best["epoch"])}.

Held-out test volumes (their own equispaced masks; fastMRI's NMSE, PSNR, SSIM per volume,
averaged):

| acceleration | method | volumes | NMSE | PSNR (dB) | SSIM |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- File: `{weights.name}`, SHA-256 `{sha256(weights)}`
"""


if __name__ == "__main__":
    main()
