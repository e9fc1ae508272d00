"""The memory planner: calibrated peaks against measured ones, plans within the budget, and
the out-of-memory fallback, on the CPU (whose peaks the profiler measures)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medinv import cli
from medinv.errors import InputError, ResourceError
from medinv.inference.memory_model import calibrate
from medinv.inference.peak import measure_peak
from medinv.inference.planner import Planner
from medinv.inference.plans import parse_memory, resolve_budget
from medinv.inference.reconstruction import scaled_measurement
from medinv.inference.segmentation import SegmentationSettings, predict_volume, segment_case
from medinv.inference.slabs import reconstruct_slabs
from medinv.models import IRIM, IUNet

from ..synthetic_cases import tiny_kspace_set, tiny_segmentation_config, write_case
from .test_segmentation_inference import RecordsShapes

CPU = torch.device("cpu")
SHAPE = (40, 36, 28)


@pytest.fixture(scope="module")
def iunet() -> IUNet:
    torch.manual_seed(0)
    return IUNet(4, 3, channels=4, dim=3, architecture=(1, 1, 1)).eval()  # stride 4


def test_parse_memory_reads_binary_and_decimal_units():
    assert parse_memory("16GiB") == 16 * 2**30
    assert parse_memory("32gib") == 32 * 2**30
    assert parse_memory("16GB") == 16 * 10**9
    assert parse_memory("1.5GiB") == 3 * 2**29
    assert parse_memory("512 MiB") == 2**29
    assert parse_memory("4096") == 4096
    assert parse_memory("auto") is None
    assert resolve_budget("auto", CPU) is None  # on the CPU: no limit
    for bad in ("16XB", "-1GiB", "0GiB", "GiB", ""):
        with pytest.raises(InputError, match="expected e.g. 16GiB"):
            parse_memory(bad)


def test_calibration_predicts_the_measured_peak_of_a_larger_shape(iunet):
    calibration = calibrate(iunet, CPU, "inference")
    assert len(calibration.probes) == 3 and calibration.slope > 0
    # Larger than every probe, with the largest probe's first two axes: ATen chooses CPU
    # convolution algorithms (with different workspaces) by batch x channels x D x H.
    shape = (64, 64, 96)

    def step() -> None:
        with torch.no_grad():
            iunet(torch.randn(1, 4, *shape))

    measured = measure_peak(step, CPU)
    predicted = calibration.step_peak(math.prod(shape))
    assert measured > max(peak for _, peak in calibration.probes)
    assert abs(predicted - measured) <= 0.15 * measured


def test_a_3d_reconstructor_is_calibrated_per_voxel_of_its_slabs():
    """Probes are slabs of a few slices; the fit predicts a deeper, larger slab run as
    ``medinv reconstruct`` runs it (the measurement copied to the device, then the model),
    and bounds a batch of them (on the CPU a 3D convolution's workspace is per sample, so
    batches cost less than their units say); the plan counts slabs."""
    torch.manual_seed(0)
    irim = IRIM(
        dim=3, state_channels=4, steps=2, layers_per_step=2, dilations=(1, 2), hidden_channels=4
    ).eval()
    calibration = calibrate(irim, CPU, "inference", coils=3)
    slab, height, width = 12, 160, 144

    def peak(batch: int) -> int:
        kspace = torch.randn(batch, slab, 3, height, width, dtype=torch.complex64)
        measurement = scaled_measurement(kspace, torch.ones(width), torch.randn_like(kspace))

        def step() -> None:
            moved = dataclasses.replace(  # what moving it to a GPU allocates there
                measurement,
                kspace=measurement.kspace.clone(),
                sensitivities=measurement.sensitivities.clone(),
            )
            with torch.no_grad():
                reconstruct_slabs(irim, moved).abs()

        return measure_peak(step, CPU)

    units = slab * height * width
    assert units > max(u for u, _ in calibration.probes)
    assert abs(calibration.step_peak(units) - peak(1)) <= 0.1 * peak(1)
    assert calibration.step_peak(2 * units) >= peak(2)

    budget = calibration.resident + calibration.step_peak(2 * units) + 1024
    planner = Planner(irim, CPU, budget, margin=0.0)
    plan = planner.plan_reconstruction((36, 3, height, width), slab=slab)  # 3 slabs
    assert (plan.slab, plan.batch_size) == (slab, 2) and plan.fits
    assert plan.kind == f"batches of 2 slabs of {slab} slices"
    overlapping = planner.plan_reconstruction((36, 3, height, width), slab=slab, overlap=6)
    assert overlapping.batch_size == 2  # 5 slabs now, still 2 at a time
    with pytest.raises(InputError, match="slab overlap must lie in"):
        planner.plan_reconstruction((36, 3, height, width), slab=slab, overlap=12)
    smaller = planner.smaller(plan)
    assert (smaller.slab, smaller.batch_size) == (slab, 1)


def test_plans_stay_within_the_budget_whole_volume_first(iunet):
    unlimited = Planner(iunet, CPU, None).plan_segmentation(SHAPE)
    assert unlimited.roi_size is None and unlimited.fits

    roomy = Planner(iunet, CPU, int(1.5 * unlimited.predicted_peak / 0.9))
    plan = roomy.plan_segmentation(SHAPE)
    assert plan.roi_size is None and plan.predicted_peak <= roomy.budget * (1 - roomy.margin)

    tight = Planner(iunet, CPU, int(0.5 * unlimited.predicted_peak / 0.9))
    plan = tight.plan_segmentation(SHAPE)
    assert plan.roi_size is not None and plan.fits
    assert plan.predicted_peak <= tight.budget * (1 - tight.margin)
    assert all(
        r % 4 == 0 and r <= -(-n // 4) * 4 for r, n in zip(plan.roi_size, SHAPE, strict=True)
    )
    assert "sliding window" in plan.describe()

    hopeless = Planner(iunet, CPU, 10_000).plan_segmentation(SHAPE)
    assert not hopeless.fits and "does not fit" in hopeless.describe()


def test_training_crops_and_slice_batches_are_the_largest_that_fit(iunet):
    planner = Planner(iunet, CPU, 48 * 2**20)
    crops = planner.plan_training_crop((96, 96, 96))
    assert crops.fits and all(n % 4 == 0 for n in crops.crop)
    assert crops.predicted_peak <= planner.limit
    assert crops.crop != (96, 96, 96)  # the whole volume would not fit

    torch.manual_seed(0)
    irim = IRIM(state_channels=8, steps=2, layers_per_step=2, dilations=(1, 2), hidden_channels=8)
    planner = Planner(irim, CPU, 32 * 2**20)
    shape = (40, 6, 128, 96)  # slices, coils, height, width
    plan = planner.plan_reconstruction(shape)
    assert plan.fits and 1 <= plan.batch_size < 40
    one_more = planner._reconstruction(shape, plan.batch_size + 1)
    assert not one_more.fits


def test_micro_batch_is_the_largest_divisor_of_the_batch_that_fits():
    torch.manual_seed(0)
    irim = IRIM(state_channels=8, steps=2, layers_per_step=2, dilations=(1, 2), hidden_channels=8)
    calibration = Planner(irim, CPU, None).calibration("train", "fp32", 6)
    fixed = calibration.resident + calibration.intercept
    item = (6, 128, 96)  # coils, height, width
    room_for = 4.5  # slices
    planner = Planner(irim, CPU, int((fixed + room_for * calibration.slope * 128 * 96) / 0.9))
    assert planner.plan_micro_batch(item, batch_size=8).batch_size == 4
    plan = planner.plan_micro_batch(item, batch_size=6)
    assert plan.fits and plan.batch_size == 3  # 4 would fit but does not divide 6
    assert not Planner(irim, CPU, int(fixed)).plan_micro_batch(item, batch_size=6).fits


def test_stitching_in_cpu_memory_gives_the_same_probabilities(iunet):
    torch.manual_seed(0)
    image = torch.randn(4, *SHAPE)
    settings = SegmentationSettings(roi_size=(16, 16, 16), overlap=0.25)
    on_device = predict_volume(iunet, image, settings, CPU)
    in_memory = predict_volume(iunet, image, dataclasses.replace(settings, stitch_on_cpu=True), CPU)
    torch.testing.assert_close(in_memory, on_device)


class RunsOutOnce(RecordsShapes):
    """Raises CUDA's out-of-memory error on its first call, then is ``inner``."""

    def forward(self, x):
        if not self.shapes:
            self.shapes.append(tuple(x.shape[2:]))
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return super().forward(x)


def test_out_of_memory_retries_a_smaller_plan_and_logs_one_line(tmp_path, iunet):
    case = write_case(tmp_path / "in", "c0", shape=SHAPE)
    lines: list[str] = []
    planner = Planner(iunet, CPU, None, log=lines.append)
    flaky = RunsOutOnce(iunet)
    settings = SegmentationSettings(overlap=0.25)
    outputs = segment_case(flaky, case, tmp_path / "out", settings, CPU, planner)
    assert outputs["labels"].is_file()
    first, second = flaky.shapes[:2]
    assert math.prod(second) < math.prod(first)  # whole volume, then windows of half of it
    assert len(lines) == 1 and "c0: out of memory with whole volume" in lines[0]
    assert "retrying with sliding window" in lines[0]


def test_out_of_memory_on_the_smallest_plan_is_a_resource_error(iunet):
    lines: list[str] = []
    planner = Planner(iunet, CPU, None, log=lines.append)

    def always_out(plan):
        raise RuntimeError("MONAI wraps it") from torch.OutOfMemoryError("out of memory")

    with pytest.raises(ResourceError, match="c1: out of memory even with"):
        planner.run(planner.plan_segmentation((16, 16, 8)), always_out, "c1")
    assert len(lines) >= 2  # halved windows, then bf16, ...
    with pytest.raises(ValueError, match="not memory"):
        planner.run(planner.plan_segmentation((16, 16, 8)), _not_memory, "c1")


def _not_memory(plan):
    raise ValueError("not memory")


runner = CliRunner()


def test_plan_command_prints_a_plan_for_the_bundled_segmenter():
    result = runner.invoke(
        cli.app, ["plan", "--shape", "240,240,155", "--gpu-memory", "1GiB", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "sliding window" in result.output and "predicted peak" in result.output
    assert "1.00 GiB" in result.output
    too_small = runner.invoke(cli.app, ["plan", "--shape", "240,240,155", "--gpu-memory", "1MiB"])
    assert isinstance(too_small.exception, ResourceError)


def test_plan_command_plans_slabs_for_a_3d_reconstructor():
    config = Path(__file__).resolve().parents[2] / "configs" / "irim3d_multicoil_small.yaml"
    args = ["plan", "--model", str(config), "--shape", "12,8,256,128", "--device", "cpu"]
    result = runner.invoke(cli.app, [*args, "--gpu-memory", "4GiB"])
    assert result.exit_code == 0, result.output
    assert "slab batch" in result.output and "4 slices" in result.output  # the config's slab
    assert "batches of 3 slabs of 4 slices" in result.output


def test_plan_command_plans_training_micro_batches_for_a_reconstructor():
    config = Path(__file__).resolve().parents[2] / "configs" / "irim_multicoil_small.yaml"
    args = ["plan", "--model", str(config), "--mode", "train", "--shape", "8,10,256,128"]
    result = runner.invoke(cli.app, [*args, "--batch-size", "4", "--gpu-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    assert "batches of 4 slices" in result.output and "4 slices in 1 pass" in result.output
    too_small = runner.invoke(cli.app, [*args, "--batch-size", "4", "--gpu-memory", "1MiB"])
    assert isinstance(too_small.exception, ResourceError)


def test_segment_with_a_memory_budget_writes_the_same_labels(tmp_path):
    write_case(tmp_path / "cases", "c0", shape=SHAPE, seed=3)
    labels, printed = {}, {}
    # Without the planner, whole-volume inference as the planner chooses it for a roomy
    # budget (the checkpoint's 96x96x64 window would pad this small case, which changes the
    # group-norm statistics); with 16 MiB the volume goes through in windows.
    for option in (["--roi", "whole"], ["--gpu-memory", "1GiB"], ["--gpu-memory", "16MiB"]):
        out = tmp_path / option[1]
        args = ["segment", str(tmp_path / "cases"), "--out", str(out), "--device", "cpu"]
        result = runner.invoke(cli.app, args + option)
        assert result.exit_code == 0, result.output
        labels[option[1]] = np.asarray(nib.load(out / "c0.nii.gz").dataobj)
        printed[option[1]] = result.stdout
    assert "whole volume x1; 0 out-of-memory retries" in printed["1GiB"]
    np.testing.assert_array_equal(labels["1GiB"], labels["whole"])
    assert "sliding window x1" in printed["16MiB"]
    reference, windowed = labels["whole"] > 0, labels["16MiB"] > 0
    assert reference.sum() > 100
    dice = 2 * (windowed & reference).sum() / (windowed.sum() + reference.sum())
    assert dice > 0.95 and (labels["16MiB"] == labels["whole"]).mean() > 0.99


def test_reconstruct_with_a_memory_budget_batches_slices_without_changing_the_result(tmp_path):
    kspace = tiny_kspace_set(tmp_path, 5, {"train": 0, "val": 0, "test": 1}) / "multicoil_test"
    volumes, printed = {}, {}
    for option in (["--batch-size", "1"], ["--gpu-memory", "1GiB"]):
        out = tmp_path / option[1]
        args = ["reconstruct", str(kspace), "--out", str(out), "--device", "cpu", *option]
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        (written,) = out.glob("*.h5")
        with h5py.File(written) as f:
            volumes[option[1]] = f["reconstruction"][()]
        printed[option[1]] = result.stdout
    assert "batches of 2 slices x1" in printed["1GiB"]  # both slices of the file at once
    np.testing.assert_allclose(volumes["1GiB"], volumes["1"], rtol=1e-4, atol=1e-6)


def test_train_segment_with_a_memory_budget_trains_on_the_planned_crops(tmp_path):
    config = tiny_segmentation_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "segment", "--config", str(config), "--out", str(run), "--device", "cpu"]
    result = runner.invoke(cli.app, [*args, "--gpu-memory", "8MiB"])
    assert result.exit_code == 0, result.output
    found = re.search(r"memory planner: training crops (\d+)x(\d+)x(\d+)", result.stdout)
    crop = [int(n) for n in found.groups()]
    assert all(n % 4 == 0 for n in crop) and crop != [16, 16, 16]
    saved = torch.load(run / "last.pt", weights_only=True)["config"]["data"]["roi_size"]
    assert list(saved) == crop


def test_train_reconstruct_with_a_memory_budget_runs_steps_in_micro_batches(tmp_path):
    """A budget between the predicted peaks of 2 and 3 slices: steps of 4 slices run in
    two passes of 2; a budget below one slice stops before training with a clear error."""
    import yaml

    from medinv.models import build_model

    root = tiny_kspace_set(tmp_path, 6, {"train": 1, "val": 0, "test": 0}, slices=4)
    model = {"state_channels": 4, "steps": 1, "layers_per_step": 1, "dilations": [1]}
    model["hidden_channels"] = 4
    config = tmp_path / "irim.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "reconstruct",
                "data": {"train": str(root / "multicoil_train")},
                "model": {"kind": "irim", **model},
                "train": {"epochs": 1, "batch_size": 4},
            }
        )
    )
    calibration = Planner(build_model("irim", model), CPU, None).calibration("train", "fp32", 4)
    (file,) = (root / "multicoil_train").glob("*.h5")
    with h5py.File(file) as f:
        height, width = f["kspace"].shape[-2:]

    def peak(slices: int) -> int:
        return calibration.resident + calibration.step_peak(slices * height * width)

    between = int((peak(2) + peak(3)) / 2 / 0.9)  # the planner keeps a 10% margin
    run = tmp_path / "run"
    args = ["train", "reconstruct", "--config", str(config), "--out", str(run), "--device", "cpu"]
    result = runner.invoke(cli.app, [*args, "--gpu-memory", str(between)])
    assert result.exit_code == 0, result.output
    assert "memory planner: batches of 2 slices" in result.stdout
    assert "steps of 4 in 2 passes of 2" in result.stdout
    saved = torch.load(run / "last.pt", weights_only=True)["config"]["train"]
    assert saved["batch_size"] == 4 and saved["micro_batch_size"] == 2

    too_small = runner.invoke(
        cli.app, [*args, "--overwrite", "--gpu-memory", str(int(peak(1) / 2))]
    )
    assert isinstance(too_small.exception, ResourceError)
    message = f"one training slice (4 coils, {height}x{width}) does not fit"
    assert message in str(too_small.exception)


def test_bucketed_whole_volume_plans_predict_the_padded_run(iunet):
    """The planner predicts a bucketed whole-volume run at the padded shape: the measured
    peak of the run as ``medinv segment`` makes it lies within 15% of the prediction."""
    image = torch.randn(4, *SHAPE)
    bucketed = Planner(iunet, CPU, None, bucket=32).plan_segmentation(SHAPE)
    plain = Planner(iunet, CPU, None).plan_segmentation(SHAPE)
    assert bucketed.roi_size is None and bucketed.bucket == 32
    assert "whole volume padded to 64x64x32" in bucketed.describe()
    assert bucketed.predicted_peak > plain.predicted_peak
    settings = bucketed.apply(SegmentationSettings())
    assert settings.bucket == 32 and settings.roi_size is None
    measured = measure_peak(lambda: predict_volume(iunet, image, settings, CPU), CPU)
    assert abs(bucketed.predicted_peak - measured) <= 0.15 * measured
    with pytest.raises(InputError, match="bucket 6 is not a multiple of the model's total stride"):
        Planner(iunet, CPU, None, bucket=6)
    irim = IRIM(state_channels=4, steps=1, layers_per_step=1, dilations=(1,), hidden_channels=4)
    with pytest.raises(InputError, match="for segmenters; this is a reconstructor"):
        Planner(irim, CPU, None, bucket=8)


def test_segment_and_plan_take_a_bucket(tmp_path):
    write_case(tmp_path / "cases", "c0", shape=SHAPE, seed=3)
    labels = {}
    for option in (["--roi", "whole"], ["--roi", "whole", "--bucket", "32"]):
        out = tmp_path / str(len(option))
        args = ["segment", str(tmp_path / "cases"), "--out", str(out), "--device", "cpu"]
        result = runner.invoke(cli.app, args + option)
        assert result.exit_code == 0, result.output
        labels[len(option)] = np.asarray(nib.load(out / "c0.nii.gz").dataobj)
    assert labels[4].shape == labels[2].shape == SHAPE
    # the padded zeros enter the group norms' statistics: close, not equal
    reference, padded = labels[2] > 0, labels[4] > 0
    assert reference.sum() > 100
    assert 2 * (padded & reference).sum() / (padded.sum() + reference.sum()) > 0.9

    args = ["segment", str(tmp_path / "cases"), "--out", str(tmp_path / "x"), "--device", "cpu"]
    for option, message in [
        (["--bucket", "32"], "--bucket pads whole volumes"),
        (["--roi", "whole", "--bucket", "20"], "--bucket 20 is not a multiple"),
    ]:
        result = runner.invoke(cli.app, args + option)
        assert result.exit_code != 0 and isinstance(result.exception, InputError)
        assert message in str(result.exception)
    assert not (tmp_path / "x").exists()

    plan = ["plan", "--shape", "150,170,140", "--gpu-memory", "8GiB", "--device", "cpu"]
    result = runner.invoke(cli.app, [*plan, "--bucket", "32"])
    assert result.exit_code == 0, result.output
    assert "padded to" in result.output and "160x192x160" in result.output
