"""Per-expert Hessians and batched GPTQ over stacks of experts ``[E, rows, cols]``; no model knowledge.

- ``hessian``: ``HessianAccumulator`` streams ``sum x x^T`` per expert from routed tokens.
- ``solver``: ``gptq_quantize`` / ``rtn_quantize`` and their result, ``QuantizedExperts``.
- ``rate``: entropy-constrained rounding (a price per coded bit in every rounding decision).
- ``refit``: Hessian-weighted least-squares levels for the final codes.
"""

from qmoe.gptq.hessian import HessianAccumulator
from qmoe.gptq.solver import QuantizedExperts, gptq_quantize, rtn_quantize

__all__ = ["HessianAccumulator", "QuantizedExperts", "gptq_quantize", "rtn_quantize"]
