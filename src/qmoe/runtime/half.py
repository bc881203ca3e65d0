"""Non-expert weights kept in the checkpoint's 16-bit type on the CPU, computed in float32.

``qmoe.load`` on the CPU used to widen every non-expert tensor to float32: on the real-shaped benchmark
(Qwen3-30B-A3B's layers, docs/runtime.md) that doubled the memory of the attention projections and the LM
head, and their float32 reads were 40% of a decode step. When the checkpoint stores them in fp16 or bf16
(almost every published MoE does), ``narrow`` instead keeps the 16-bit tensors and swaps the modules that
read them for ones that widen in registers:

- ``HalfLinear`` (an ``nn.Linear``): ``y = x W^T + b`` with ``W`` 16-bit, ``x``, ``b`` and ``y`` float32,
  through ``qmoe.kernels.dense16`` (native for a few tokens, torch's GEMM on widened blocks of rows for a
  prompt);
- ``HalfEmbedding`` (an ``nn.Embedding``): the rows of a 16-bit table, returned as float32;
- every other floating tensor (norms, routers, biases, buffers) becomes float32, as before.

Every fp16 and bf16 value is a float32 value, so the model computes what the float32 load computes, up to
the order of the sums (tests/runtime/test_half.py holds it to the float32 load). Tied weights stay one
tensor: the modules keep the loaded ``Parameter`` objects.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

HALF = (torch.float16, torch.bfloat16)


class HalfLinear(nn.Linear):
    """``nn.Linear`` whose weight ``[out, in]`` stays fp16/bf16; float32 in, float32 out."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # no new weight: keep the loaded Parameter (tied weights stay tied)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(),
                                                                  requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        # Anything but float32 activations on the CPU with a 16-bit weight (a family that casts its router
        # with .to(dtype), as Switch does, makes the weight float32 again) is a plain Linear.
        if (x.dtype != torch.float32 or x.device.type != "cpu" or self.weight.dtype not in HALF
                or torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        from qmoe.kernels.dense16 import matmul16

        y = matmul16(self.weight, x.reshape(-1, self.in_features))  # [T, out] float32
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


class HalfEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table ``[num, dim]`` stays fp16/bf16; the looked-up rows are float32."""

    def __init__(self, emb: nn.Embedding) -> None:
        nn.Module.__init__(self)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse"):
            setattr(self, k, getattr(emb, k))
        self.weight = emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()


def checkpoint_dtype(path: Any) -> torch.dtype | None:
    """The floating dtype of the checkpoint's first non-expert tensor in ``path`` (a compressed directory's
    dense shards), or None if it has none."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = files or sorted(p.name for p in path.glob("*.safetensors"))
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            for key in f.keys():
                dt = names.get(f.get_slice(key).get_dtype())
                if dt is not None:
                    return dt
    return None


def narrow(model: nn.Module, wide: tuple[str, ...] = ()) -> int:
    """Swap ``model``'s 16-bit Linear and Embedding modules for HalfLinear / HalfEmbedding, except Linears
    named in ``wide`` (the adapter's ``wide_linears``), and make every other floating parameter and buffer
    float32. Returns the bytes the 16-bit weights take."""
    kept = 0
    seen: set[int] = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in HALF and name not in wide:
                setattr(parent, name, HalfLinear(child))
            elif type(child) is nn.Embedding and child.weight.dtype in HALF:
                setattr(parent, name, HalfEmbedding(child))
            else:
                continue
            w = getattr(parent, name).weight
            if id(w) not in seen:
                seen.add(id(w))
                kept += w.numel() * w.element_size()
    widened: dict[int, nn.Parameter] = {}  # one float32 copy per shared parameter: ties stay ties
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != torch.float32 and id(p) not in seen:
                if id(p) not in widened:
                    widened[id(p)] = nn.Parameter(p.detach().float(), requires_grad=False)
                module._parameters[key] = widened[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                module._buffers[key] = b.float()
    return kept
