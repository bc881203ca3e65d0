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


def budget_figure_path(path: str | Path) -> Path:
    """Where ``qmoe inspect --plot PATH`` writes the budget figure: ``PATH`` with ``-budget`` added."""
    p = Path(path)
    return p.with_name(f"{p.stem}-budget{p.suffix}")


def plot_budget(report: dict[str, Any], path: str | Path) -> None:
    """The planner's choices (``--allocation global``): each expert's stored bits/weight against its share of
    the routed tokens and against its importance (loss per unit relative error), one colour per layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendUnavailable("--plot needs matplotlib; pip install 'qmoe[plot]'") from exc
    budget = report["budget"]
    sens = {s["name"]: s for s in budget["layers"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for i, row in enumerate(report["layers"]):
        s = sens.get(row["name"])
        if s is None:
            continue
        bits = [e["bits_per_weight"] for e in row["per_expert"]]
        routed = [r / max(1, sum(s["routed"])) for r in s["routed"]]
        imp = [max(s["kappa"], 0.0) * en / max(1, s["positions"]) for en in s["energy"]]
        label = f"{row['name']} (kappa {s['kappa']:.2g})"
        axes[0].scatter(routed, bits, s=14, color=f"C{i % 10}", label=label)
        axes[1].scatter(imp, bits, s=14, color=f"C{i % 10}")
    axes[0].set_xlabel("share of the layer's routed tokens (plan sample)")
    axes[0].set_ylabel("expert bits / weight (arrays)")
    axes[1].set_xlabel("importance: nats per unit relative squared error")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.axhline(budget["budget"], ls="--", c="gray")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{report.get('source')}: budget {budget['budget']:g} bits/weight, one price per bit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
