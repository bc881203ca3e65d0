"""Streaming compression of MoE checkpoints: ``compress(source, out, config)``. See docs/pipeline.md.

Modules: ``run`` (the orchestrator), ``preflight`` (checks before compute), ``shards`` (lazy reading),
``buffers`` (activations, memmap spill), ``moe`` (routed-token capture and Hessians), ``quantize``
(GPTQ/RTN + codec), ``state`` (resume), ``output`` (the checkpoint directory), ``report`` (statistics),
``plot`` (the report as a figure). Importing this package is light; ``compress`` imports torch on call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compress"]


def compress(source: Any, out: Any, config: Any = None, **kwargs: Any) -> dict[str, Any]:
    """See :func:`qmoe.pipeline.run.compress`."""
    from qmoe.pipeline.run import compress as _compress

    return _compress(source, out, config, **kwargs)
