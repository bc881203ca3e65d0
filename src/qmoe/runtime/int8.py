"""Non-expert Linear weights as weight-only int8 on the CPU (``qmoe.load(..., int8_weights=True)``).

A compressed model keeps its non-expert weights (attention projections, the LM head, Switch's dense MLPs) as
the checkpoint stored them. At batch 1 a decode step reads all of them once per token, and with the experts
on column lists they were the largest part of a token on the real-shaped benchmark (docs/runtime.md). This
opt-in load quantizes them at load time, one float32 scale per output row, symmetric, round to nearest
(``qmoe.kernels.dense8``): half the bytes of 16-bit weights, a quarter of float32.

It changes the model, unlike the 16-bit path (``qmoe.runtime.half``), which computes what the float32 load
computes: every weight moves by at most half its row's step, ``absmax(row) / 254``. Routers and the other
Linears an adapter names in ``wide_linears`` stay as they are (a routing decision flips on small changes),
as do embeddings (a lookup reads one row per token) and norms. docs/results.md has the measured loss.
Each 16-bit weight's pages are given back to the kernel once it is quantized (``qmoe.runtime.pages``), so
the load's peak memory is the int8 weights plus one 16-bit matrix, not both sets.

``Int8Linear`` (an ``nn.Linear``): ``y = (x Q^T) * s + b``, ``Q [out, in]`` int8 and ``s [out]`` float32
buffers, float32 activations; any other input (a dtype, a device, autograd) computes with the dequantized
weight, so the module is correct everywhere and fast where it is meant to be.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Int8Linear(nn.Linear):
    """``nn.Linear`` with its weight ``[out, in]`` held as int8 ``qweight`` and per-row float32 ``scale``."""

    def __init__(self, linear: nn.Linear, shared: Int8Linear | None = None) -> None:
        """``linear`` quantized, or holding ``shared``'s int8 weight and scales (a tied weight), with
        ``linear``'s own bias either way."""
        nn.Module.__init__(self)
        from qmoe.kernels.dense8 import quantize

        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize(linear.weight.detach().cpu()) if shared is None else (shared.qweight, shared.scale)
        self.register_buffer("qweight", q)  # [out, in] int8
        self.register_buffer("scale", s)  # [out] float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(),
                                                                  requires_grad=False)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The dequantized weight ``[out, in]`` float32 (what this module computes with), made on request."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            w = self.weight.to(device=x.device, dtype=x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        from qmoe.kernels.dense8 import matmul8

        y = matmul8(self.qweight, self.scale, x.reshape(-1, self.in_features))  # [T, out] float32
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def routers(model: nn.Module, router: str) -> set[int]:
    """``id`` of every module inside the routers of ``model``'s MoE layers: ``router`` (the adapter's, e.g.
    ``gate``) relative to each module that holds a ``CompressedExperts``."""
    from qmoe.runtime.experts import CompressedExperts

    out: set[int] = set()
    for layer in model.modules():
        if any(isinstance(c, CompressedExperts) for c in layer.children()) and hasattr(layer, router):
            out.update(id(m) for m in layer.get_submodule(router).modules())
    return out


def quantize_linears(model: nn.Module, wide: tuple[str, ...] = (), keep: set[int] = frozenset()) -> int:
    """Replace every dense ``nn.Linear`` (or ``HalfLinear``) of ``model`` by an ``Int8Linear``, except those
    named in ``wide`` (the adapter's ``wide_linears``) and the modules in ``keep`` (``routers``). A weight
    shared by several Linears (tied) is quantized once and the modules share the buffers. Returns the bytes
    the int8 weights and their scales hold."""
    from qmoe.runtime.half import HalfLinear
    from qmoe.runtime.pages import release

    done: dict[int, Int8Linear] = {}
    held = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (nn.Linear, HalfLinear) or name in wide or id(child) in keep:
                continue
            key = id(child.weight)
            new = Int8Linear(child, done.get(key))  # a tied weight: one int8 copy, shared
            if key not in done:
                done[key] = new
                held += new.qweight.numel() + 4 * new.scale.numel()
                # the 16-bit pages just read (mapped from the shard) are not read again: out of the
                # resident set now, not when the whole shard's mapping goes (qmoe.runtime.pages)
                release(child.weight.detach())
            setattr(parent, name, new)
    return held
