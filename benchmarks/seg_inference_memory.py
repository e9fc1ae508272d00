"""Peak GPU memory of `medinv segment` on one whole BraTS-size case (240x240x155).

Writes one synthetic four-contrast case of BraTS size (NIfTI, as `medinv segment` reads it),
then segments it with each model through the same code path as the CLI
(:func:`medinv.inference.segmentation.segment_case`: MONAI preprocessing, inference,
inversion to the input grid, NIfTI output), whole-volume and with a sliding window, in fp32
and under bf16 autocast. Weights are the untrained initialisation: memory and time do not
depend on them. Reported: CUDA peak allocated during the case and seconds per case; on
the CPU (``--device cpu``, smaller shapes) the profiler's peak of one more case plus the
model's parameters and buffers, which CUDA's counter would include.

    python benchmarks/seg_inference_memory.py --out benchmarks/results/seg_inference_memory_h100.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import gib, header, measure, publish  # noqa: E402
from medinv.inference.memory_model import PRECISIONS, resident_bytes  # noqa: E402
from medinv.inference.peak import measure_peak  # noqa: E402
from medinv.inference.segmentation import SegmentationSettings, segment_case  # noqa: E402
from medinv.models import build_model  # noqa: E402
from medinv.training.config import load_config  # noqa: E402
from tests.synthetic_cases import write_case  # noqa: E402

MODELS = {
    "iUNet-16": ("iunet", 16),
    "iUNet-32": ("iunet", 32),
    "iUNet-64": ("iunet", 64),
    "SegResNet-16": ("segresnet", 16),
    "SegResNet-32": ("segresnet", 32),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs/iunet_brats_like.yaml")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--windows", nargs="+", default=["whole", "roi"], choices=["whole", "roi"])
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        case = write_case(Path(tmp) / "cases", "BraTSSize_0000", shape=tuple(args.shape))
        out = Path(tmp) / "out"
        for name in args.models:
            config.model.kind, config.model.channels = MODELS[name]
            model = build_model(config.model.kind, config.model_kwargs()).to(device)
            windows = {"whole": "whole volume", "roi": f"ROI {'x'.join(map(str, args.roi))}"}
            for window in (windows[w] for w in args.windows):
                for precision in args.precisions:
                    dtype = PRECISIONS[precision]
                    settings = SegmentationSettings(
                        roi_size=None if window == "whole volume" else tuple(args.roi),
                        overlap=0.5,
                        overwrite=True,
                        autocast_dtype=dtype,
                    )
                    row = {"model": name, "inference": window, "precision": precision}
                    try:

                        def run(m=model, s=settings):
                            segment_case(m, case, out, s, device)

                        seconds, peak = measure(run, device, warmup=1, repeats=1)
                        if device.type == "cpu":
                            peak = resident_bytes(model, "inference") + measure_peak(run, device)
                        row.update(peak_GiB=gib(peak), s_per_case=seconds)
                    except torch.OutOfMemoryError:
                        row.update(peak_GiB="OOM", s_per_case=float("nan"))
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    print(row, flush=True)
            del model
    shape = "x".join(map(str, args.shape))
    text = "\n".join(
        [
            f"# `medinv segment` on one {shape} case: peak memory",
            "",
            header(device),
            "",
            pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"),
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
