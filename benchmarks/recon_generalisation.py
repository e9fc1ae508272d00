"""Reconstruction models on the training subject and on a new one: where their scores part.

The realistic k-space sets train on ICBM 2009c (an average of many brains, smooth) and test
on Colin27 (one subject, finer detail). This benchmark scores trained checkpoints on both:

- "new subject": the set's Colin27 volumes (``<set>/<challenge>_val`` and
  ``<challenge>_test_full``, fully sampled);
- "training subject": ICBM 2009c volumes built here from another seed (new coil maps, phase,
  noise and masks; slices from the training anatomy, which these slabs may overlap);

each undersampled at 4x and 8x with fastMRI masks seeded from the file names (the same for
every model), NMSE, PSNR and SSIM per acceleration next to zero-filled. A model that matches
another on the training subject and trails it on the new one generalises less far.

    python benchmarks/recon_quality.py --data data/kspace_small ... --work runs/rq
    python benchmarks/recon_generalisation.py --data data/kspace_small \\
        --model i-RIM=runs/rq/i-RIM/best.pt RIM=runs/rq/RIM/best.pt \\
        --out benchmarks/results/recon_generalisation_cpu.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_kspace_set_arguments, folder_name, header, publish  # noqa: E402
from medinv.data.anatomy import require_anatomy  # noqa: E402
from medinv.data.kspace import HELD_OUT_SOURCES, KSpaceSetConfig, build_kspace_set  # noqa: E402
from medinv.errors import ResourceError  # noqa: E402
from medinv.inference.reconstruction import ReconstructionSettings, reconstruct_file  # noqa: E402
from medinv.metrics.reconstruction import METRICS  # noqa: E402
from medinv.training.checkpoint import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_kspace_set_arguments(parser)
    parser.add_argument(
        "--model", nargs="+", required=True, metavar="NAME=CHECKPOINT", help="models to score"
    )
    parser.add_argument("--accelerations", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--mask-type", default="random")
    parser.add_argument("--volumes", type=int, default=4, help="training-subject volumes")
    parser.add_argument("--seed", type=int, default=1, help="seed of the training-subject set")
    parser.add_argument("--work", type=Path, default=Path("runs/recon_generalisation"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    models = dict(_named(m) for m in args.model)

    new_subject = sorted((args.data / f"{args.challenge}_val").glob("*.h5"))
    new_subject += sorted((args.data / f"{args.challenge}_test_full").glob("*.h5"))
    if not new_subject:
        raise SystemExit(f"{args.data}: no {args.challenge}_val or _test_full files")
    like = _like(args.data, args.challenge, args.seed, args.volumes)
    seen = build_training_subject_set(args.work, args.challenge, like)
    sets = {"training subject (ICBM)": seen, "new subject (Colin27)": new_subject}

    rows = []
    first = next(iter(models))
    for name, checkpoint in models.items():
        model, _ = load_model(checkpoint)
        model.to(device).eval()
        out = args.work / "out" / folder_name(name)
        # zero-filled is the same for every model (masks seeded by file name): rows once
        methods = [(name, "")] + ([("zero-filled", " zero-filled")] if name == first else [])
        for set_name, files in sets.items():
            for acceleration in args.accelerations:
                settings = ReconstructionSettings(
                    acceleration=acceleration, mask_type=args.mask_type, overwrite=True
                )
                scores = pd.DataFrame(
                    [reconstruct_file(model, f, out, settings, device) for f in files]
                )
                for method, suffix in methods:
                    rows.append(
                        {
                            "subject": set_name,
                            "acceleration": acceleration,
                            "method": method,
                            "volumes": len(scores),
                            **{m: scores[m + suffix].mean() for m in METRICS},
                        }
                    )
        print(pd.DataFrame(rows).to_string(index=False), flush=True)

    table = pd.DataFrame(rows).sort_values(
        ["subject", "acceleration", "SSIM"], ascending=[False, True, False]
    )
    text = "\n".join(
        [
            f"# Reconstruction on the training subject and on a new subject ({args.challenge})",
            "",
            header(device),
            f"- models: {', '.join(f'{n} = `{p}`' for n, p in models.items())}",
            f"- masks: {args.mask_type}, seeded from each file name; training-subject set: "
            f"{len(seen)} volumes, seed {args.seed}",
            "",
            table.to_markdown(index=False, floatfmt=".4f"),
        ]
    )
    publish(text, args.out)


def build_training_subject_set(work: Path, challenge: str, config: KSpaceSetConfig) -> list[Path]:
    """The ``val`` volumes of ``config`` built from the training anatomy alone (new coil
    maps, phase, noise), in ``<work>/training_subject``."""

    def training_anatomy_only(name: str) -> Path:
        if name in {s.anatomy for s in HELD_OUT_SOURCES}:
            raise ResourceError(f"{name} is left out: this set holds the training subject")
        return require_anatomy(name)

    root = work / "training_subject"
    build_kspace_set(root, config, anatomy=training_anatomy_only, overwrite=True)
    return sorted((root / f"{challenge}_val").glob("*.h5"))


def _like(data: Path, challenge: str, seed: int, volumes: int) -> KSpaceSetConfig:
    """``volumes`` validation volumes like those of the set ``data`` (its manifest)."""
    manifest = pd.read_csv(data / "manifest.csv")
    files = manifest[(manifest["challenge"] == challenge) & (manifest["split"] == "val")]
    if files.empty:
        raise SystemExit(f"{data}/manifest.csv lists no {challenge} val files")
    coils = files["coils"].dropna()
    return KSpaceSetConfig(
        seed=seed,
        volumes={"train": 0, "val": volumes, "test": 0},
        slices=int(files["slices"].iloc[0]),
        matrix=int(files["width"].iloc[0]),
        coils=(int(coils.min()), int(coils.max())) if len(coils) else (1, 1),
        challenges=(challenge,),
    )


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--model takes NAME=CHECKPOINT, got {spec!r}")
    return name, Path(path)


if __name__ == "__main__":
    main()
