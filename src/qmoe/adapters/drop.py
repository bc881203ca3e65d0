"""Dropped experts: a router that can no longer choose them.

A model-wide bit budget may give an expert no weights at all (``qmoe.pipeline.budget``). Storing it as an
all-zero matrix would still cost its per-row metadata and, worse, keep a top-k slot for an output of zero;
a dropped expert is instead one the router never chooses, and the remaining top-k gates renormalise exactly
as the family's router does for any other choice. The semantics are those of the same model with the expert
deleted (its router row and its weights removed), which is what the tests compare against.

Two mechanisms, declared per family on the adapter:

- ``router_drop_bias`` names a router tensor that is added to the choice scores (DeepSeek-V3's and GLM-4's
  ``e_score_correction_bias``, gpt-oss's router ``bias``): that tensor's entry becomes ``-inf``. This is
  transformers-native: ``qmoe decompress`` writes it, and the dense model reproduces the routing.
- otherwise the router's logits are masked: every family computes them with one ``F.linear`` inside its
  router module (``adapter.router``, e.g. ``mlp.gate``), so while that module runs, the output of a linear
  map onto the expert dimension gets ``-inf`` in the dropped columns, before softmax and top-k. transformers
  has no stored tensor for this (no router bias in those configs), so ``decompress`` refuses such a model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from qmoe.errors import SourceError


class _LogitMask(TorchFunctionMode):
    """Adds ``mask [E]`` (0 or -inf) to the output of every linear map onto ``E`` features."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is F.linear and out.shape[-1] == self.mask.shape[0]:
            out = out + self.mask.to(out.device, out.dtype)
        return out


def _masked_forward(forward: Any, mask: torch.Tensor) -> Any:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _LogitMask(mask):
            return forward(*args, **kwargs)

    run.qmoe_dropped_mask = mask  # type: ignore[attr-defined]
    return run


def router_of(adapter: Any, moe_module: torch.nn.Module) -> torch.nn.Module:
    """The router module of an MoE layer (``adapter.router`` relative to it)."""
    return moe_module.get_submodule(adapter.router)


def drop_experts(
    adapter: Any, moe_module: torch.nn.Module, dropped: Sequence[int], n_experts: int, top_k: int
) -> None:
    """Make the router of ``moe_module`` (an MoE layer of ``adapter``'s family) never choose ``dropped``.

    Permanent for the module (the runtime); ``dropping`` is the scoped form (the compression pipeline)."""
    dropped = sorted(set(int(e) for e in dropped))
    if not dropped:
        return
    if dropped[0] < 0 or dropped[-1] >= n_experts:
        raise SourceError(f"dropped experts {dropped} are outside 0..{n_experts - 1}; the checkpoint's "
                          "quantization_config does not match its config.json")
    if n_experts - len(dropped) < top_k:
        raise SourceError(f"{len(dropped)} of {n_experts} experts dropped leaves fewer than the router's "
                          f"top-k ({top_k}) to choose from; the checkpoint's quantization_config is corrupt")
    router = router_of(adapter, moe_module)
    if adapter.router_drop_bias is not None:
        bias = getattr(router, adapter.router_drop_bias)
        with torch.no_grad():
            bias[dropped] = float("-inf")
        return
    mask = torch.zeros(n_experts)
    mask[dropped] = float("-inf")
    if hasattr(router.forward, "qmoe_dropped_mask"):  # dropping more: widen the mask in place
        router.forward.qmoe_dropped_mask.copy_(torch.minimum(router.forward.qmoe_dropped_mask, mask))
    else:
        router.forward = _masked_forward(router.forward, mask)


@contextlib.contextmanager
def dropping(
    adapter: Any, moe_module: torch.nn.Module, dropped: Sequence[int], n_experts: int, top_k: int
) -> Iterator[None]:
    """``drop_experts`` for the duration of the block (the router restored after)."""
    if not dropped:
        yield
        return
    router = router_of(adapter, moe_module)
    saved_bias = None
    if adapter.router_drop_bias is not None:
        saved_bias = getattr(router, adapter.router_drop_bias).detach().clone()
    had_forward = "forward" in vars(router)
    saved_forward = vars(router).get("forward")
    drop_experts(adapter, moe_module, dropped, n_experts, top_k)
    try:
        yield
    finally:
        if saved_bias is not None:
            with torch.no_grad():
                getattr(router, adapter.router_drop_bias).copy_(saved_bias)
        elif had_forward:
            router.forward = saved_forward
        else:
            del router.forward
