"""Training configurations: YAML files validated with pydantic, never executed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medinv.errors import ConfigError

Triple = tuple[int, int, int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentationData(_Strict):
    manifest: Path = Field(description="CSV manifest or case folder, relative to the config file")
    et_label: Literal[3, 4] = 4
    spacing: tuple[float, float, float] | None = Field(
        None, description="resample to this spacing (mm); None keeps the input grid"
    )
    roi_size: Triple = (96, 96, 96)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    cache: bool = True


class SegmentationModel(_Strict):
    kind: Literal["iunet", "segresnet"] = "iunet"
    channels: int = Field(16, ge=2, description="iUNet channel blow-up; SegResNet init_filters")
    architecture: list[int] = Field(default_factory=lambda: [2, 2, 2, 2, 2], min_length=1)
    split_fraction: float = Field(0.25, gt=0.0, le=1.0)
    norm: Literal["group", "instance", "layer", "batch", "none"] = "group"
    memory_efficient: bool = True


class SegmentationTraining(_Strict):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(1, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="cap; None: one pass")
    time_budget_minutes: float | None = Field(
        None, gt=0, description="stop after the epoch in which this much training time is used"
    )
    lr: float = Field(1e-3, gt=0)
    lr_schedule_over: Literal["epochs", "run"] = Field(
        "epochs",
        description="the cosine schedule spans the configured epochs, or the run: its epochs "
        "or its time budget, whichever is further along (so that a time-budgeted run anneals "
        "within its budget on any device)",
    )
    weight_decay: float = Field(1e-5, ge=0)
    loss: Literal["dice", "dice_ce"] = "dice"
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_clip: float | None = Field(1.0, gt=0)
    val_interval: int = Field(1, ge=1)
    seed: int = 0
    num_workers: int = Field(0, ge=0)


class SegmentationInference(_Strict):
    roi_size: Triple = (128, 128, 128)
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(1, ge=1)
    tta: bool = False


class SegmentationConfig(_Strict):
    task: Literal["segment"]
    data: SegmentationData
    model: SegmentationModel = SegmentationModel()
    train: SegmentationTraining = SegmentationTraining()
    inference: SegmentationInference = SegmentationInference()

    @model_validator(mode="after")
    def _roi_fits_the_model(self) -> SegmentationConfig:
        scales = len(self.model.architecture) if self.model.kind == "iunet" else 4
        stride = 2 ** (scales - 1)
        for name, roi in (
            ("data.roi_size", self.data.roi_size),
            ("inference.roi_size", self.inference.roi_size),
        ):
            if any(n % stride for n in roi):
                raise ValueError(
                    f"{name} {roi} must be divisible by the model's total stride {stride}"
                )
        return self

    def model_kwargs(self) -> dict:
        """Constructor arguments of the 3D segmenter (4 contrasts -> TC, WT, ET)."""
        m = self.model
        if m.kind == "segresnet":
            return {
                "spatial_dims": 3,
                "in_channels": 4,
                "out_channels": 3,
                "init_filters": m.channels,
            }
        return {
            "in_channels": 4,
            "out_channels": 3,
            "channels": m.channels,
            "dim": 3,
            "architecture": list(m.architecture),
            "split_fraction": m.split_fraction,
            "norm": m.norm,
            "memory_efficient": m.memory_efficient,
        }


class ReconstructionData(_Strict):
    train: Path = Field(description="folder of fully sampled fastMRI training files")
    val: Path | None = Field(None, description="folder of fully sampled validation files")
    challenge: Literal["multicoil", "singlecoil"] = "multicoil"
    mask_type: Literal["random", "equispaced", "equispaced_fraction"] = "random"
    center_fractions: list[float] = Field(default_factory=lambda: [0.08, 0.04])
    accelerations: list[int] = Field(default_factory=lambda: [4, 8])
    sensitivities: Literal["acs", "espirit"] = "acs"
    sharpen: float = Field(
        0.0,
        ge=0,
        description="training only: the largest strength of random k-space sharpening "
        "(medinv.data.kspace_transforms.RandKSpaceSharpend: k-space times 1 + a r^2, r the "
        "normalised radius, 1 at the corners, a drawn from [0, sharpen], the target "
        "recomputed); 0: off",
    )
    sharpen_probability: float = Field(
        0.5, ge=0, le=1, description="share of training items sharpened"
    )
    slab: int = Field(8, ge=1, description="slices per slab of a 3D model (model.dim 3)")
    slab_stride: int | None = Field(
        None, ge=1, description="training slabs start this many slices apart; None: slab"
    )

    @model_validator(mode="after")
    def _paired(self) -> ReconstructionData:
        if len(self.center_fractions) != len(self.accelerations):
            raise ValueError("center_fractions and accelerations must pair up one to one")
        if self.slab_stride is not None and self.slab_stride > self.slab:
            raise ValueError(
                f"slab_stride {self.slab_stride} would skip slices between slabs of "
                f"{self.slab}; use at most data.slab"
            )
        return self


class ReconstructionModel(_Strict):
    kind: Literal["irim", "rim"] = "irim"
    dim: Literal[2, 3] = Field(2, description="2: slice by slice; 3: slabs of data.slab slices")
    state_channels: int = Field(64, ge=4)
    steps: int = Field(8, ge=1)
    layers_per_step: int = Field(10, ge=1)
    dilations: list[int] = Field(default_factory=lambda: [1, 1, 2, 2, 4, 4, 2, 2, 1, 1])
    hidden_channels: int = Field(64, ge=1)
    shared_weights: bool = False
    memory_efficient: bool = True

    def kwargs(self) -> dict:
        if self.kind == "rim":
            return {"steps": self.steps, "hidden_channels": self.hidden_channels}
        return self.model_dump(exclude={"kind"})


class ReconstructionTraining(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(1, ge=1, description="slices (or slabs) per optimizer step")
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="slices (or slabs) per forward and backward pass, a divisor of "
        "batch_size: the gradients of batch_size / micro_batch_size passes are averaged "
        "before each optimizer step; None: batch_size",
    )
    steps_per_epoch: int | None = Field(None, ge=1, description="cap; None: one pass")
    time_budget_minutes: float | None = Field(None, gt=0)
    lr: float = Field(1e-4, gt=0)
    lr_step_epochs: int = Field(10, ge=1, description="the learning rate drops every ...")
    lr_step_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="the learning rate drops each time this share of the run is done: of "
        "its epochs or of its time budget, whichever is further along; replaces "
        "lr_step_epochs, so that a time-budgeted run drops at the same point of its budget "
        "on any device",
    )
    lr_gamma: float = Field(0.5, gt=0, le=1)
    ssim_weight: float = Field(1.0, ge=0)
    l1_weight: float = Field(1.0, ge=0)
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_clip: float | None = Field(1.0, gt=0)
    val_interval: int = Field(1, ge=1)
    seed: int = 0
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> ReconstructionTraining:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} does not divide batch_size "
                f"{self.batch_size}"
            )
        return self

    @property
    def accumulation(self) -> int:
        """Forward and backward passes per optimizer step."""
        return self.batch_size // (self.micro_batch_size or self.batch_size)


class ReconstructionConfig(_Strict):
    task: Literal["reconstruct"]
    data: ReconstructionData
    model: ReconstructionModel = ReconstructionModel()
    train: ReconstructionTraining = ReconstructionTraining()

    @model_validator(mode="after")
    def _layers_match_dilations(self) -> ReconstructionConfig:
        m = self.model
        if m.kind == "irim" and len(m.dilations) != m.layers_per_step:
            raise ValueError(
                f"model.dilations has {len(m.dilations)} entries for "
                f"{m.layers_per_step} layers per step"
            )
        if m.kind == "rim" and m.dim == 3:
            raise ValueError("model.dim 3 needs model.kind irim; the RIM is 2D only")
        return self


Config = SegmentationConfig | ReconstructionConfig
_TASKS = {"segment": SegmentationConfig, "reconstruct": ReconstructionConfig}


def load_config(path: Path, task: str | None = None) -> Config:
    """Read and validate a YAML config; relative paths are taken from the config's folder.

    ``task`` (``"segment"`` or ``"reconstruct"``), when given, must match the config's own.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if raw.get("task") not in _TASKS:
        raise ConfigError(
            f"{path}: task must be one of {', '.join(_TASKS)}, got {raw.get('task')!r}"
        )
    if task is not None and raw["task"] != task:
        raise ConfigError(f"{path}: a '{raw['task']}' config, not a '{task}' one")
    try:
        config = _TASKS[raw["task"]].model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from err
    for field in ("manifest", "train", "val"):
        value = getattr(config.data, field, None)
        if value is not None and not value.is_absolute():
            setattr(config.data, field, (path.parent / value).resolve())
    return config
