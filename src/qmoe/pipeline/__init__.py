"""Streaming compression of MoE checkpoints: ``compress(source, out, config)``. See docs/pipeline.md.

Modules: ``run`` (the orchestrator), ``preflight`` (checks before compute), ``shards`` (lazy reading),
``buffers`` (activations, memmap spill), ``moe`` (routed-token capture and Hessians), ``quantize``
(GPTQ/RTN + codec), ``state`` (resume), ``output`` (the checkpoint directory), ``report`` (statistics).
"""

from __future__ import annotations

from qmoe.pipeline.run import compress

__all__ = ["compress"]
