"""MONAI bundles of medinv segmenters, for MONAI users who do not use the medinv CLI.

A bundle is a folder that MONAI's bundle runner executes
(``python -m monai.bundle run --config_file configs/inference.json``)::

    configs/inference.json   the inference workflow as a MONAI config (ConfigParser syntax)
    configs/metadata.json    versions, task, inputs and outputs (``network_data_format``)
    models/model.pt          the network's plain state dict
    docs/README.md           what the model is, how to run it, its model card

The workflow repeats ``medinv segment``'s pipeline with MONAI components: the same loading,
RAS orientation, non-zero intensity normalisation and foreground crop, sliding-window
inference with Gaussian blending at the checkpoint's ROI and overlap, sigmoid, inversion to
the input grid, threshold 0.5, and the BraTS label map (0/1/2/4) by
:func:`medinv.inference.segmentation.regions_to_labels`; so medinv must be installed where the
bundle runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from medinv import __version__
from medinv.errors import InputError
from medinv.training.checkpoint import load_model

#: Checkpoint kinds a bundle can hold, and the class its config builds.
SEGMENTERS = {"iunet": "medinv.models.IUNet", "segresnet": "monai.networks.nets.SegResNet"}
#: File patterns of the four contrasts in a case folder (BraTS 2018-2021 names).
IMAGE_PATTERNS = ["*_t1.nii*", "*_t1ce.nii*", "*_t2.nii*", "*_flair.nii*"]
_DEFAULT_ROI = [128, 128, 128]  # as medinv segment, for checkpoints that record none
_DEFAULT_OVERLAP = 0.5


def export_bundle(checkpoint: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write a MONAI bundle of the segmentation model in ``checkpoint`` to ``out_dir``.

    The bundle is assembled in a temporary folder beside ``out_dir`` and renamed into place
    when complete. A model card next to the checkpoint (``<name>.md``, as for the bundled
    weights) is copied into ``docs/README.md``.

    Returns ``out_dir``. Raises :class:`InputError` if ``out_dir`` exists and ``overwrite``
    is off, or if the checkpoint does not hold a segmentation model.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and not (overwrite and out_dir.is_dir()):
        problem = "exists; pass --overwrite to replace it" if out_dir.is_dir() else "not a folder"
        raise InputError(f"{out_dir}: {problem}")
    model, payload = load_model(checkpoint)
    kind = payload["kind"]
    task = payload.get("config", {}).get("task", "segment")
    if kind not in SEGMENTERS or task != "segment":
        raise InputError(
            f"{checkpoint}: a {kind} {task} checkpoint; bundles hold segmentation models "
            f"({', '.join(SEGMENTERS)})"
        )
    settings = _inference_settings(payload)
    card = checkpoint.with_suffix(".md")
    texts = {
        "configs/inference.json": _json(inference_config(kind, payload["model_config"], settings)),
        "configs/metadata.json": _json(bundle_metadata(model, kind, checkpoint.stem)),
        "docs/README.md": bundle_readme(
            checkpoint.stem, settings, card.read_text() if card.is_file() else None
        ),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        for name, text in texts.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        (staging / "models").mkdir()
        torch.save(model.state_dict(), staging / "models" / "model.pt")
        _replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def inference_config(kind: str, model_config: dict[str, Any], settings: dict) -> dict:
    """The bundle's ``configs/inference.json``: MONAI components and ``$`` expressions.

    ``dataset_dir`` is a case folder or a folder of case folders, each holding the four
    contrasts (``image_patterns``); ``datalist`` may be overridden with records
    ``{"image": [t1, t1ce, t2, flair]}`` instead. Label maps go to ``output_dir`` as
    ``<case>.nii.gz``, the case being the T1 file's name without its last ``_``/``-`` part.
    """
    roi, spacing = settings["roi_size"], settings["spacing"]
    preprocessing: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {
            "_target_": "Orientationd",
            "keys": "image",
            "axcodes": "RAS",
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
        },
    ]
    if spacing is not None:
        preprocessing.append(
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(spacing), "mode": "bilinear"}
        )
    preprocessing += [
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
        {
            "_target_": "CropForegroundd",
            "keys": "image",
            "source_key": "image",
            "margin": 4,
            "allow_smaller": True,
        },
    ]
    if roi is None:
        inferer: dict[str, Any] = {"_target_": "SimpleInferer"}
    else:
        inferer = {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(roi),
            "sw_batch_size": settings["sw_batch_size"],
            "overlap": settings["overlap"],
            "mode": "gaussian",
        }
    case_name = (
        "$lambda meta, saver: {'subject': re.split('[_-][^_-]*$', "
        "os.path.basename(str(meta['filename_or_obj'])).split('.')[0])[0]}"
    )
    return {
        "imports": [
            "$import glob",
            "$import os",
            "$import re",
            "$from medinv.inference.segmentation import regions_to_labels",
        ],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "image_patterns": IMAGE_PATTERNS,
        "case_dirs": "$[@dataset_dir] + sorted(glob.glob(os.path.join(@dataset_dir, '*')))",
        "datalist": "$[{'image': [sorted(glob.glob(os.path.join(c, p)))[0] "
        "for p in @image_patterns]} for c in @case_dirs "
        "if all(glob.glob(os.path.join(c, p)) for p in @image_patterns)]",
        "label_values": [1, 2, 4],
        "threshold": 0.5,
        "network_def": {"_target_": SEGMENTERS[kind], **model_config},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": "@threshold"},
                {
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": "$lambda x: monai.data.MetaTensor("
                    "regions_to_labels(x, @label_values)[None], meta=x.meta)",
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "",
                    "output_dtype": "$numpy.uint8",
                    "separate_folder": False,
                    "resample": False,
                    "output_name_formatter": case_name,
                },
            ],
        },
        "predict": "$lambda d: @postprocessing("
        "{**d, 'pred': @inferer(d['image'][None].to(@device), @network)[0].cpu()})",
        "initialize": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, "
            "weights_only=True))",
            "$@network.eval()",
        ],
        "run": ["$[@predict(d) for d in @dataset]"],
    }


def bundle_metadata(model: torch.nn.Module, kind: str, name: str) -> dict:
    """The bundle's ``configs/metadata.json`` (MONAI's metadata schema)."""
    if hasattr(model, "total_stride"):
        stride = model.total_stride
    else:  # SegResNet halves the size at every level but the first
        stride = (2 ** (len(model.down_layers) - 1),) * 3
    shape = [f"{s}*n" for s in stride]
    packages = {"medinv": __version__}
    for package in ("nibabel", "fire"):
        try:
            packages[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from {name} by medinv {__version__}"},
        "monai_version": metadata.version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": metadata.version("numpy"),
        "required_packages_version": packages,
        "name": f"medinv {name}",
        "task": "Brain tumour segmentation (TC, WT, ET) in BraTS-style multi-contrast MRI",
        "description": f"A medinv {kind} segmenter exported as a MONAI bundle; "
        "research and demonstration only, not for clinical use.",
        "authors": "medinv",
        "copyright": "medinv",
        "intended_use": "Research and demonstration only; not for clinical use.",
        "data_type": "nibabel",
        "image_classes": "4 channels: T1, T1ce, T2, FLAIR MRI",
        "label_classes": "BraTS labels: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing",
        "pred_classes": "3 sigmoid channels: TC, WT, ET; written as a label map 0/1/2/4",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": 4,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 3,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "TC", "1": "WT", "2": "ET"},
                }
            },
        },
    }


def bundle_readme(name: str, settings: dict, card: str | None) -> str:
    """The bundle's ``docs/README.md``: the model, how to run it, and its model card."""
    roi = settings["roi_size"]
    window = (
        "whole-volume inference"
        if roi is None
        else f"sliding window {'x'.join(map(str, roi))}, overlap {settings['overlap']}, "
        "Gaussian blending"
    )
    source = card.strip() if card else "No model card was found next to the checkpoint."
    return f"""# medinv {name}: brain tumour segmentation

**Not for clinical use.** A medinv segmenter for research and demonstration, exported as a
MONAI bundle. It takes the four BraTS contrasts of a case (T1, T1ce, T2, FLAIR) and writes a
label map in the case's own grid, orientation and affine: 0 background, 1 necrotic and
non-enhancing core, 2 oedema, 4 enhancing tumour.

## Running

MONAI's bundle runner needs `fire`, and the workflow calls medinv (the network class and the
label-map conversion), so install both where it runs: medinv (the package that exported this
bundle) and `pip install fire`. From the bundle folder:

```bash
python -m monai.bundle run --config_file configs/inference.json \\
    --dataset_dir /path/to/cases --output_dir /path/to/labels
```

- `dataset_dir`: one case folder, or a folder of case folders, each holding the four
  contrasts as `*_t1.nii.gz`, `*_t1ce.nii.gz`, `*_t2.nii.gz`, `*_flair.nii.gz`
  (`image_patterns`; other names, for example BraTS 2023's, by overriding it), or override
  `datalist` with records `{{"image": [t1, t1ce, t2, flair]}}`.
- `output_dir` (default `eval/` in the bundle): one `<case>.nii.gz` per case, the case being
  the T1 file's name without its last `_`/`-` part.
- `label_values` (default `[1, 2, 4]`; BraTS 2023: `[1, 2, 3]`), `threshold` (0.5),
  `bundle_root` when running from another folder.

## What the workflow does

The same steps as `medinv segment`, with MONAI components: load, channel first, RAS
orientation, non-zero channel-wise intensity normalisation, crop to the foreground (margin
4); {window} (`inferer`); sigmoid (`Activationsd`);
back to the input grid (`Invertd`); threshold (`AsDiscreted`). The three regions TC, WT, ET
then become one label map (ET over TC over WT) with
`medinv.inference.segmentation.regions_to_labels`, and `SaveImaged` writes it as uint8
NIfTI. The network is built from `network_def`; its weights are `models/model.pt`, a plain
state dict loaded with `weights_only=True`.

## Model card of the source weights

The card describes the checkpoint the bundle was exported from; `models/model.pt` holds only
its state dict, so that file's SHA-256 differs from the one the card gives.

{source}
"""


def _inference_settings(payload: dict) -> dict:
    """ROI, overlap and spacing that ``medinv segment`` would use for this checkpoint."""
    trained = payload.get("config", {})
    inference = trained.get("inference", {})
    roi = inference.get("roi_size", _DEFAULT_ROI)
    spacing = trained.get("data", {}).get("spacing")
    return {
        "roi_size": list(roi) if roi is not None else None,
        "overlap": inference.get("overlap", _DEFAULT_OVERLAP),
        "sw_batch_size": inference.get("sw_batch_size", 1),
        "spacing": list(spacing) if spacing is not None else None,
    }


def _json(content: dict) -> str:
    return json.dumps(content, indent=4) + "\n"


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing an existing ``target`` folder."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
