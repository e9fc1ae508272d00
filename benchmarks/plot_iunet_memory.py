"""Plot the iUNet memory table: peak training memory against depth, medinv and the peer.

Reads the ``2d.csv`` (and, if present, ``3d.csv``) that ``iunet_memory.py --out DIR``
writes and saves ``DIR/memory_vs_depth.png``: left, peak and activation memory of the 2D
iUNet against the coupling layers per side and scale; right, the 3D training-step peak per
channel blowup and precision. Needs matplotlib (``pip install -e ".[bench]"``).

    python benchmarks/plot_iunet_memory.py benchmarks/results/iunet_memory_h100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

STYLE = {
    "medinv memory-efficient": {"color": "tab:blue", "marker": "o"},
    "medinv plain": {"color": "tab:blue", "marker": "o", "linestyle": ":"},
    "iunets memory-efficient": {"color": "tab:orange", "marker": "s"},
    "iunets conventional": {"color": "tab:orange", "marker": "s", "linestyle": ":"},
}


def numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """Out-of-memory and failed rows become gaps in the plot."""
    return pd.to_numeric(frame[column], errors="coerce")


def plot_2d(ax, table: pd.DataFrame) -> None:
    for variant, rows in table.groupby("variant", sort=False):
        style = STYLE.get(variant, {})
        ax.plot(rows["delta"], numeric(rows, "peak_GiB"), label=f"{variant}", **style)
        if variant.endswith("memory-efficient"):
            activation = {**style, "linestyle": "--", "alpha": 0.6}
            ax.plot(rows["delta"], numeric(rows, "activation_GiB"), **activation)
    ax.set_xlabel("coupling layers per side and scale (delta)")
    ax.set_ylabel("GiB")
    ax.set_title("2D iUNet (1, 64, 512, 512): peak (solid), activation (dashed)")
    ax.set_xticks(sorted(table["delta"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_3d(ax, table: pd.DataFrame) -> None:
    groups = [f"C={c} {p}" for c, p in table[["C", "precision"]].drop_duplicates().values]
    variants = list(dict.fromkeys(table["variant"]))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        rows = table[table["variant"] == variant]
        positions = [g + i * width for g in range(len(rows))]
        color = STYLE.get(variant, {}).get("color")
        hatch = "//" if not variant.endswith("memory-efficient") else None
        ax.bar(positions, numeric(rows, "peak_GiB"), width, label=variant, color=color, hatch=hatch)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=30)
    ax.set_ylabel("peak GiB")
    ax.set_title("3D segmenter on 240x240x160, one training step")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, help="the folder iunet_memory.py --out wrote")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("2d", "3d") if (args.results / f"{p}.csv").exists()]
    if not parts:
        parser.error(f"no 2d.csv or 3d.csv in {args.results}")
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 5), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        table = pd.read_csv(args.results / f"{part}.csv")
        (plot_2d if part == "2d" else plot_3d)(ax, table)
    fig.tight_layout()
    out = args.results / "memory_vs_depth.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
