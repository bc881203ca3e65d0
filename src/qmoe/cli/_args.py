"""Arguments that several subcommands share (not a subcommand: ``qmoe.cli`` loads ``*_cmd`` modules)."""

from __future__ import annotations

import argparse


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--backend`` and ``--int8-weights`` for the commands that run a model (``eval``,
    ``generate``)."""
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu (default), cuda, cuda:N; on a GPU the encoded experts are "
        "moved there once and decoded inside the matmul",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=["cpu", "triton", "reference"],
        help="kernel backend of compressed experts (default: triton on CUDA, cpu otherwise; "
        "triton on the CPU needs TRITON_INTERPRET=1, for tests)",
    )
    p.add_argument(
        "--int8-weights",
        action="store_true",
        help="CPU: quantize a compressed model's attention and head weights to int8 at load (a scale per "
        "row): half the bytes a generated token reads, at a measured loss cost (docs/results.md)",
    )
