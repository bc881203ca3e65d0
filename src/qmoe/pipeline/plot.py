"""Figure of a compression report: bits/weight, zero fraction and GPTQ objective per MoE layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qmoe.errors import BackendUnavailable


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Write a PNG (or any matplotlib format, by suffix) with one panel per statistic, x = MoE layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendUnavailable("--plot needs matplotlib; pip install 'qmoe[plot]'") from exc
    layers = report["layers"]
    names = [r["name"] for r in layers]
    x = list(range(len(layers)))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.5 * len(layers) + 3), 8), sharex=True)
    axes[0].bar(x, [r["bits_per_weight"] for r in layers], color="tab:blue")
    axes[0].set_ylabel("bits / weight")
    axes[0].axhline(report["totals"]["expert_bits_per_weight"], ls="--", c="gray", label="all experts")
    axes[0].legend(loc="best")
    axes[1].bar(x, [100 * r["zero_fraction"] for r in layers], color="tab:green")
    axes[1].set_ylabel("zero weights (%)")
    projections = list(layers[0]["objective_mean"]) if layers else []
    width = 0.8 / max(1, len(projections))
    for j, proj in enumerate(projections):
        vals = [r["objective_mean"][proj] or 0.0 for r in layers]
        axes[2].bar([i + (j - (len(projections) - 1) / 2) * width for i in x], vals, width, label=proj)
    axes[2].set_ylabel("mean GPTQ objective")
    if any(r["objective_mean"][p] for r in layers for p in projections):
        axes[2].set_yscale("log")
        axes[2].legend(loc="best")
    else:
        axes[2].text(
            0.5, 0.5, "no objective (round-to-nearest)", ha="center", va="center", transform=axes[2].transAxes
        )
    axes[2].set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    cfg = report["config"]
    fig.suptitle(
        f"{report.get('source')}: {cfg['method']} {cfg['grid']}, "
        f"{report['totals']['bits_per_param']:.3f} bits/param overall"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
