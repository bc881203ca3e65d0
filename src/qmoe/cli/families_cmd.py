"""qmoe families: the supported MoE families, their transformers classes, and what qmoe compresses."""

from __future__ import annotations

import argparse

NAME = "families"
HELP = "list the MoE families qmoe compresses and runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from qmoe.adapters import family_table

    for row in family_table():
        print(f"{row['family']:<12} {', '.join(row['architectures']):<45} compresses {row['compresses']}; "
              f"keeps {row['keeps']}")
    return 0
