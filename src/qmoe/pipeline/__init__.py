"""Streaming compression of MoE checkpoints: ``compress(source, out, config)``. See docs/pipeline.md.

Stages, in the order a run goes through them (``run`` is the driver that calls them):
``preflight`` (checks and the block layout, before any compute; ``dryrun`` prints it), ``samples``
(tokenized calibration and evaluation data), ``budget`` + ``sensitivity`` (the model-wide plan of
``--allocation global``), ``moe_block`` (one MoE block: capture, quantize, compressed streams, encode),
``finish`` (evaluation, index, report, config.json). What they share: ``context`` (the run's read-only
inputs, block loading), ``streams`` (the activation streams and their snapshots), ``comm`` / ``dist``
(communication: one process / torchrun). Pieces: ``shards`` (lazy reading), ``buffers`` (activations,
memmap spill), ``moe`` (routed-token capture and Hessians), ``quantize`` (GPTQ/RTN at a price or a size),
``encode`` (codec and stored sizes), ``evaluate``, ``state`` (resume), ``output`` (the checkpoint
directory), ``report`` (statistics), ``plot``. Importing this package is light; ``compress`` imports torch
on call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compress", "dry_run"]


def compress(source: Any, out: Any, config: Any = None, **kwargs: Any) -> dict[str, Any]:
    """See :func:`qmoe.pipeline.run.compress`."""
    from qmoe.pipeline.run import compress as _compress

    return _compress(source, out, config, **kwargs)


def dry_run(source: Any, out: Any, config: Any = None, ranks: int = 1) -> dict[str, Any]:
    """See :func:`qmoe.pipeline.run.dry_run`."""
    from qmoe.pipeline.run import dry_run as _dry_run

    return _dry_run(source, out, config, ranks)
