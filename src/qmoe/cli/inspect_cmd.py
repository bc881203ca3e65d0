"""``qmoe inspect``: the compression report of a directory as a summary, JSON, or a figure."""

from __future__ import annotations

import argparse
import json

NAME = "inspect"
HELP = "Show the compression report of a qmoe output directory: sizes, bits/param, ratio, per-layer table."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="output directory of qmoe compress")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also write a figure of bits/weight, zero fraction and GPTQ objective per layer",
    )


def run(args: argparse.Namespace) -> int:
    from qmoe.pipeline.report import load_report, summary

    report = load_report(args.dir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(summary(report))
    if args.plot:
        from qmoe.pipeline.plot import budget_figure_path, plot_budget, plot_report

        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
        if report.get("budget"):  # --allocation global: the planner's choices per expert
            plot_budget(report, budget_figure_path(args.plot))
            print(f"wrote {budget_figure_path(args.plot)}")
    return 0
