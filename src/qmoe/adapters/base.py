"""What an adapter declares about an MoE family, and the one piece of expert math every family shares.

An adapter is all the transformers knowledge qmoe has about a model family. The pipeline (and the runtime)
only ever asks it these questions:

- which *stacks* of blocks the model has (``encoder``/``decoder`` for T5-style models, one ``decoder`` for
  causal LMs), where each block's tensors live (``{prefix}.{i}.``), which blocks hold an MoE layer and where;
- how the experts of an MoE layer are stored on disk (``ExpertLayout``: one 2-D ``nn.Linear``-oriented
  weight per expert and projection, under a key pattern) and combined (activation, gated or not);
- how to build one block on the ``meta`` device and run it on a ``[B, S, d]`` batch of hidden states;
- how to read the routing decision (which token goes to which expert, with which gate weight) from the
  arguments that the block passes to its experts module;
- how to make calibration / evaluation samples and compute the loss from the last hidden states.

Everything else (streaming, Hessians, GPTQ, encoding, resume) is family-agnostic in ``qmoe.pipeline``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ExpertLayout:
    """How one MoE layer's experts are stored and combined.

    ``key`` is relative to the MoE layer's on-disk path. Per-expert layouts (most families) have ``{e}``
    (expert index) and ``{proj}`` (projection name) fields, e.g. ``"experts.expert_{e}.{proj}.weight"``, and
    every expert weight is 2-D in ``nn.Linear`` orientation ``[out_features, in_features]`` (``y = x @ W^T``).
    ``stacked`` layouts (gpt-oss) store one ``[E, out, in]`` tensor per projection under a key with only
    ``{proj}`` (``[E, in, out]`` when ``transposed``). qmoe encodes one 2-D ``[out, in]`` matrix per expert
    and projection either way, named by :meth:`expert_key`.

    Expert ``e`` computes ``second(glu(first(x) + b_first)) + b_second``: ``first`` is the fused first
    projections (rows in ``first`` order), the optional biases are stacked ``[E, out]`` tensors under
    ``bias`` (``{proj}`` field), and ``glu`` is the adapter's :meth:`Adapter.expert_glu` (by default
    ``act(gate) * up`` over the two halves when ``gated``, else ``act``); the output is scaled by the
    router's gate weight.
    """

    container: str  # the experts module, relative to the MoE layer ("experts")
    key: str
    first: tuple[str, ...]  # projections of the MoE layer's (normed) input, in fused order
    second: str  # projection of the activation
    gated: bool
    activation_field: str  # config field naming the activation (a transformers ACT2FN key)
    dims: dict[str, tuple[str, str]]  # projection -> (rows, cols) config fields, nn.Linear orientation
    stacked: bool = False  # one [E, ...] tensor per projection on disk instead of one 2-D tensor per expert
    transposed: bool = False  # stacked tensors are [E, in, out] (y = x @ W[e])
    bias: str | None = None  # stacked per-projection biases [E, out], e.g. "experts.{proj}_bias"

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.first, self.second)

    def expert_key(self, moe_layer: str, e: int, proj: str) -> str:
        """Name of expert ``e``'s encoded ``proj`` matrix in the MoE layer at on-disk path ``moe_layer``: its
        on-disk key for per-expert layouts, ``{stacked tensor's key}.{e}`` for stacked ones."""
        if self.stacked:
            return f"{self.disk_key(moe_layer, proj)}.{e}"
        return f"{moe_layer}.{self.key.format(e=e, proj=proj)}"

    def disk_key(self, moe_layer: str, proj: str) -> str:
        """On-disk key of a stacked layout's ``[E, ...]`` tensor of projection ``proj``."""
        assert self.stacked
        return f"{moe_layer}.{self.key.format(proj=proj)}"

    def bias_key(self, moe_layer: str, proj: str) -> str | None:
        return None if self.bias is None else f"{moe_layer}.{self.bias.format(proj=proj)}"

    def disk_tensors(self, moe_layer: str, cfg: dict[str, Any], n_experts: int) -> dict[str, tuple[int, ...]]:
        """``{on-disk key: shape}`` of the layer's expert weights (biases excluded), in projection order."""
        out: dict[str, tuple[int, ...]] = {}
        for p in self.projections:
            rows, cols = self.shape(cfg, p)
            if self.stacked:
                out[self.disk_key(moe_layer, p)] = (
                    (n_experts, cols, rows) if self.transposed else (n_experts, rows, cols)
                )
            else:
                out.update({self.expert_key(moe_layer, e, p): (rows, cols) for e in range(n_experts)})
        return out

    def shape(self, cfg: dict[str, Any], proj: str) -> tuple[int, int]:
        """``(rows, cols)`` of one expert's ``proj``; a dim may be ``"k*field"`` (``2*intermediate_size``)."""

        def size(dim: str) -> int:
            factor, _, name = dim.rpartition("*")
            return int(factor or 1) * int(cfg[name])

        rows, cols = self.dims[proj]
        return size(rows), size(cols)

    def weights(self, tensors: dict[str, Tensor], moe_layer: str, proj: str, experts: range) -> Tensor:
        """``[len(experts), rows, cols]`` (nn.Linear orientation) weights of ``proj`` for ``experts`` from the
        on-disk ``tensors`` (:meth:`keys_of` them)."""
        if self.stacked:
            w = tensors[self.disk_key(moe_layer, proj)][experts.start : experts.stop]
            return w.transpose(1, 2) if self.transposed else w
        return torch.stack([tensors[self.expert_key(moe_layer, e, proj)] for e in experts])

    def keys_of(self, moe_layer: str, experts: range) -> list[str]:
        """On-disk keys holding the weights of ``experts`` (a stacked layout's tensors hold every expert)."""
        if self.stacked:
            return [self.disk_key(moe_layer, p) for p in self.projections]
        return [self.expert_key(moe_layer, e, p) for p in self.projections for e in experts]


@dataclass(frozen=True)
class StackSpec:
    """A stack of transformer blocks: block ``i``'s tensors are the keys under ``{prefix}.{i}.``."""

    name: str  # "encoder" | "decoder"
    prefix: str  # e.g. "encoder.block"
    n_blocks: int
    moe_layers: tuple[str | None, ...]  # per block: MoE layer path relative to the block, None if dense
    inputs: str  # sample field with this stack's input token ids
    embed_key: str  # token embedding [vocab, d]
    final_norm_key: str | None  # applied to the stack's output (memory of the next stack, or the head)
    memory: str | None = None  # name of the stack whose normed output this stack cross-attends to

    def block_prefix(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def moe_path(self, i: int) -> str | None:
        """Full module path of block ``i``'s MoE layer (``None`` for a dense block)."""
        rel = self.moe_layers[i]
        return None if rel is None else f"{self.prefix}.{i}.{rel}"


@dataclass(frozen=True)
class Routing:
    """One MoE call's routing: ``n`` (token, expert) pairs over the layer's ``T`` input tokens.

    Pairs are whatever the model's router produced, after capacity limits (a dropped token has no pair).
    """

    x: Tensor  # [T, d] the experts' input (the normed block input)
    token: Tensor  # [n] int64, index into x
    expert: Tensor  # [n] int64
    weight: Tensor  # [n] gate value scaling the expert's output


class Adapter(ABC):
    """One MoE family. Subclasses are small and mostly declarative; see ``switch.py``, ``qwen3_moe.py``."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    experts: ExpertLayout
    is_encoder_decoder: bool
    keeps: str = "attention, routers, embeddings, norms and head as stored (16-bit)"  # for `qmoe families`
    # Attribute of the router holding a per-expert token capacity (tokens beyond it are dropped), if any;
    # calibration lifts it (``CompressConfig.no_drop``).
    capacity_attribute: str | None = None
    # (on-disk, in-memory) name fragments where the published checkpoints' keys differ from the module names
    # transformers 5 builds (its conversion_mapping's renames), e.g. Mixtral's ("block_sparse_moe", "mlp").
    # qmoe reads and writes the on-disk names; blocks are built and loaded under the module names.
    renames: tuple[tuple[str, str], ...] = ()
    # The MLP every token goes through next to the routed experts, relative to the MoE layer (Qwen2-MoE's
    # "shared_expert", DeepSeek-V3's "shared_experts"); None where the family has none.
    shared_experts: str | None = None
    # The router module, relative to the MoE layer, and the router tensor added to its choice scores where
    # the family has one (DeepSeek-V3's "e_score_correction_bias"): how an expert is dropped (``drop.py``).
    router: str = "gate"
    router_drop_bias: str | None = None
    # Linear layers (attribute names) whose family code casts its activations to the layer's weight dtype
    # (T5's and Switch's dense FF "wo"): qmoe.runtime.half keeps them float32, since a 16-bit weight there
    # would round the activations.
    wide_linears: tuple[str, ...] = ()

    def disk_key(self, name: str) -> str:
        """The on-disk form of a module path or state-dict key (Mixtral: ``model.layers.0.mlp`` ->
        ``model.layers.0.block_sparse_moe``)."""
        parts = name.split(".")
        for disk, module in self.renames:
            parts = [disk if p == module else p for p in parts]
        return ".".join(parts)

    def module_key(self, key: str) -> str:
        """The module form of an on-disk key (inverse of :meth:`disk_key`)."""
        parts = key.split(".")
        for disk, module in self.renames:
            parts = [module if p == disk else p for p in parts]
        return ".".join(parts)

    # -- structure -------------------------------------------------------------------------------------------
    @abstractmethod
    def stacks(self, cfg: dict[str, Any]) -> tuple[StackSpec, ...]:
        """The model's stacks in execution order (an encoder before the decoder that attends to it)."""

    @abstractmethod
    def num_experts(self, cfg: dict[str, Any]) -> int: ...

    def top_k(self, cfg: dict[str, Any]) -> int:
        return 1

    def activation(self, cfg: dict[str, Any]) -> str:
        return str(cfg[self.experts.activation_field])

    def expert_glu(self, cfg: dict[str, Any]) -> Callable[[Tensor], Tensor]:
        """The experts' activation: first projection's output ``[t, F*I]`` -> second's input ``[t, I]``."""
        from transformers.activations import ACT2FN

        return GLU(ACT2FN[self.activation(cfg)], self.experts.gated)

    def head_keys(self, cfg: dict[str, Any]) -> dict[str, str]:
        """``{"lm_head": key}``: tensors the loss needs besides the last stack's final norm."""
        raise NotImplementedError

    def moe_layers(self, cfg: dict[str, Any]) -> list[str]:
        """Full module paths of every MoE layer, in execution order (the runtime replaces these)."""
        return [p for s in self.stacks(cfg) for i in range(s.n_blocks) if (p := s.moe_path(i)) is not None]

    # -- running blocks --------------------------------------------------------------------------------
    def hf_config(self, path: Any) -> Any:
        """The transformers config, with eager attention (the position-bias and mask paths we call)."""
        from transformers import AutoConfig

        from qmoe.errors import SourceError

        try:
            config = AutoConfig.from_pretrained(str(path))
        except (ValueError, KeyError) as exc:  # e.g. a model_type only remote code defines
            raise SourceError(
                f"transformers cannot build the config in {path} ({str(exc).splitlines()[0][:160]}); qmoe "
                f"runs {self.name} models through transformers' own {', '.join(self.architectures)}, so "
                f"config.json needs a model_type transformers knows ({', '.join(self.model_types)})"
            ) from None
        config._attn_implementation = "eager"
        return config

    @abstractmethod
    def build_block(self, hf_config: Any, stack: StackSpec, i: int) -> torch.nn.Module:
        """Block ``i`` of ``stack``, constructed on the current default device (the pipeline uses meta)."""

    def prepare_stack(self, hf_config: Any, stack: StackSpec, get: Callable[[str], Tensor]) -> dict[str, Any]:
        """Per-stack constants every block needs (position biases, rotary tables); ``get`` reads a tensor."""
        return {}

    @abstractmethod
    def block_forward(
        self, block: torch.nn.Module, i: int, hidden: Tensor, memory: Tensor | None, state: dict[str, Any]
    ) -> Tensor:
        """Block ``i`` applied to ``hidden [B, S, d]`` (``memory [B, S_mem, d]`` for cross-attention)."""

    @abstractmethod
    def routing(self, args: tuple, kwargs: dict[str, Any]) -> Routing:
        """The routing, from the arguments the block passes to its experts module's ``forward``."""

    # -- data and loss ---------------------------------------------------------------------------------
    @abstractmethod
    def samples(
        self, tokenizer: Any, texts: Sequence[str], n: int, seed: int, seq_len: int
    ) -> dict[str, np.ndarray]:
        """Token arrays ``[N, *]`` keyed by field (``StackSpec.inputs`` fields plus ``labels``)."""

    def hessian_mask(self, tokenizer: Any, ids: np.ndarray) -> np.ndarray | None:
        """``[N, S]`` bool, False at input positions whose tokens stay out of the Hessians
        (``CompressConfig.skip_sentinels``); ``None``: every position counts."""
        return None

    @abstractmethod
    def loss(
        self, hf_config: Any, head: dict[str, Tensor], hidden: Tensor, labels: Tensor
    ) -> tuple[float, int]:
        """(summed cross-entropy in nats, token count) of the last stack's normed output ``[B, S, d]``."""

    def norm_eps(self, hf_config: Any) -> float:
        return float(hf_config.rms_norm_eps)

    def final_norm(self, hf_config: Any, weight: Tensor, hidden: Tensor) -> Tensor:
        """A stack's final RMS norm (T5 and Qwen alike: no mean subtraction, no bias), in float32."""
        var = hidden.pow(2).mean(-1, keepdim=True)
        return weight * (hidden * torch.rsqrt(var + self.norm_eps(hf_config)))


def bind(args: tuple, kwargs: dict[str, Any], names: Sequence[str]) -> list[Any]:
    """Positional-or-keyword arguments of a hooked ``forward`` call, in the order of ``names``."""
    return [args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)]


class GLU:
    """``act(gate) * up`` over the two halves of ``h [t, 2I]`` when ``gated``, else ``act(h)``."""

    def __init__(self, act: Callable[[Tensor], Tensor], gated: bool) -> None:
        self.act, self.gated = act, gated

    def __call__(self, h: Tensor) -> Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)


def expert_forward(
    r: Routing,
    w_first: Tensor,
    w_second: Tensor,
    glu: Callable[[Tensor], Tensor],
    b_first: Tensor | None = None,
    b_second: Tensor | None = None,
) -> Tensor:
    """The MoE layer's output ``[T, d]`` for stacked experts ``w_first [E, F*I, d]``, ``w_second [E, d, I]``
    and optional biases ``b_first [E, F*I]``, ``b_second [E, d]``.

    Token groups per expert, experts in ascending order, gate weights applied to the output: the same
    arithmetic as the transformers implementations of the families we support.
    """
    return combine(torch.zeros_like(r.x), expert_outputs(r, w_first, w_second, glu, b_first, b_second))


def expert_outputs(
    r: Routing,
    w_first: Tensor,
    w_second: Tensor,
    glu: Callable[[Tensor], Tensor],
    b_first: Tensor | None = None,
    b_second: Tensor | None = None,
    experts: range | None = None,
) -> list[tuple[int, Tensor, Tensor]]:
    """``[(expert, token [t], gate-weighted output [t, d])]`` of the routed experts in ``experts`` (default:
    all), ascending; the weights hold those experts only (row ``e - experts.start``)."""
    experts = range(w_first.shape[0]) if experts is None else experts
    out = []
    for e, tok, w in group_by_expert(r):
        if e not in experts:
            continue
        i = e - experts.start
        y = expert_hidden(r.x[tok], w_first[i], glu, None if b_first is None else b_first[i]) @ w_second[i].T
        if b_second is not None:
            y = y + b_second[i]  # [t, d]
        out.append((e, tok, (y * w[:, None]).to(r.x.dtype)))
    return out


def combine(out: Tensor, parts: list[tuple[int, Tensor, Tensor]]) -> Tensor:
    """Add each expert's weighted output into ``out [T, d]`` in the order given (ascending expert, as
    transformers does), one accumulating ``index_put_`` per expert."""
    for _, tok, y in parts:
        # index_put_ with accumulate: the sums of index_add_, which is ~1000x slower on CPU in torch 2.13.
        out.index_put_((tok,), y, accumulate=True)
    return out


def expert_hidden(
    x: Tensor, w_first: Tensor, glu: Callable[[Tensor], Tensor], b_first: Tensor | None = None
) -> Tensor:
    """The second projection's input ``[t, I]`` for tokens ``x [t, d]``, ``w_first [F*I, d]`` and
    ``b_first [F*I]``."""
    h = x @ w_first.T  # [t, F*I]
    return glu(h if b_first is None else h + b_first)


def group_by_expert(r: Routing) -> list[tuple[int, Tensor, Tensor]]:
    """``[(expert, token indices [t], gate weights [t])]`` in ascending expert order, token order kept."""
    if r.expert.numel() == 0:
        return []
    order = torch.argsort(r.expert, stable=True)
    experts, counts = torch.unique_consecutive(r.expert[order], return_counts=True)
    groups, start = [], 0
    for e, c in zip(experts.tolist(), counts.tolist(), strict=True):
        sel = order[start : start + c]
        groups.append((e, r.token[sel], r.weight[sel]))
        start += c
    return groups
