"""SwitchTransformers (Fedus, Zoph & Shazeer, 2021): T5 encoder-decoder, top-1 routing with expert capacity.

Blocks ``encoder.block.{i}`` / ``decoder.block.{i}``; every ``*_sparse_step``-th block (``i % step == 1``)
replaces its dense FF with ``layer.{1|2}.mlp`` = router + ``experts.expert_{e}.{wi,wo}``. The relative
position bias lives only in block 0 and is shared by all blocks of its stack.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qmoe.adapters.base import Adapter, ExpertLayout, Routing, StackSpec, bind


def _sparse_blocks(n_layers: int, step: int) -> list[bool]:
    # transformers' SwitchTransformersStack: sparse iff i % step == 1 (or step == 1); step <= 0: none.
    return [(i % step == 1 or step == 1) if step > 0 else False for i in range(n_layers)]


class SwitchAdapter(Adapter):
    name = "switch"
    router = "router"
    model_types = ("switch_transformers",)
    architectures = ("SwitchTransformersForConditionalGeneration",)
    is_encoder_decoder = True
    capacity_attribute = "expert_capacity"  # SwitchTransformersTop1Router drops tokens beyond it
    wide_linears = ("wo",)  # SwitchTransformersDenseActDense casts its hidden state to wo's weight dtype
    experts = ExpertLayout(
        container="experts",
        key="experts.expert_{e}.{proj}.weight",
        first=("wi",),
        second="wo",
        gated=False,
        activation_field="dense_act_fn",
        dims={"wi": ("d_ff", "d_model"), "wo": ("d_model", "d_ff")},
    )

    def num_experts(self, cfg: dict[str, Any]) -> int:
        return int(cfg["num_experts"])

    def activation(self, cfg: dict[str, Any]) -> str:
        return str(cfg.get("dense_act_fn") or cfg.get("feed_forward_proj", "relu"))

    def stacks(self, cfg: dict[str, Any]) -> tuple[StackSpec, ...]:
        enc = _sparse_blocks(cfg["num_layers"], cfg["encoder_sparse_step"])
        dec_n = cfg.get("num_decoder_layers") or cfg["num_layers"]
        dec = _sparse_blocks(dec_n, cfg["decoder_sparse_step"])
        return (
            StackSpec(
                "encoder",
                "encoder.block",
                len(enc),
                tuple("layer.1.mlp" if s else None for s in enc),
                inputs="input_ids",
                embed_key="shared.weight",
                final_norm_key="encoder.final_layer_norm.weight",
            ),
            StackSpec(
                "decoder",
                "decoder.block",
                len(dec),
                tuple("layer.2.mlp" if s else None for s in dec),
                inputs="decoder_input_ids",
                embed_key="shared.weight",
                final_norm_key="decoder.final_layer_norm.weight",
                memory="encoder",
            ),
        )

    def norm_eps(self, hf_config: Any) -> float:
        return float(hf_config.layer_norm_epsilon)

    def head_keys(self, cfg: dict[str, Any]) -> dict[str, str]:
        tied = cfg.get("tie_word_embeddings", True)
        return {"lm_head": "shared.weight" if tied else "lm_head.weight"}

    def _stack_config(self, hf_config: Any, stack: StackSpec) -> Any:
        c = copy.deepcopy(hf_config)
        c.is_decoder = stack.name == "decoder"
        c.use_cache = False
        return c

    def build_block(self, hf_config: Any, stack: StackSpec, i: int) -> torch.nn.Module:
        from transformers.models.switch_transformers.modeling_switch_transformers import (
            SwitchTransformersBlock,
        )

        return SwitchTransformersBlock(
            self._stack_config(hf_config, stack),
            has_relative_attention_bias=i == 0,
            is_sparse=stack.moe_layers[i] is not None,
            layer_idx=i,
        ).eval()

    def prepare_stack(self, hf_config: Any, stack: StackSpec, get: Callable[[str], Tensor]) -> dict[str, Any]:
        # Block 0's bias table [buckets, heads] serves every block: keep it so any block (also after a resume)
        # can be run without block 0.
        table = get(f"{stack.prefix}.0.layer.0.SelfAttention.relative_attention_bias.weight").float()
        return {"bias_table": table, "decoder": stack.name == "decoder", "config": hf_config, "biases": {}}

    def _position_bias(self, state: dict[str, Any], q: int, k: int, device: torch.device) -> Tensor:
        """``[1, heads, q, k]`` relative position bias (plus the causal mask in the decoder)."""
        key = (q, k, str(device))
        if key not in state["biases"]:
            from transformers.models.switch_transformers.modeling_switch_transformers import (
                SwitchTransformersAttention,
            )

            cfg, decoder = state["config"], state["decoder"]
            rel = torch.arange(k)[None, :] - torch.arange(q)[:, None]  # [q, k] memory - query position
            bucket = SwitchTransformersAttention._relative_position_bucket(
                rel,
                bidirectional=not decoder,
                num_buckets=cfg.relative_attention_num_buckets,
                max_distance=cfg.relative_attention_max_distance,
            )
            bias = F.embedding(bucket, state["bias_table"]).permute(2, 0, 1)[None]  # [1, heads, q, k]
            if decoder:  # the eager path adds the causal mask separately; folding it in is the same sum
                bias = bias + torch.full((q, k), torch.finfo(torch.float32).min).triu(1)
            state["biases"][key] = bias.to(device)
        return state["biases"][key]

    def block_forward(
        self, block: torch.nn.Module, i: int, hidden: Tensor, memory: Tensor | None, state: dict[str, Any]
    ) -> Tensor:
        S = hidden.shape[1]
        bias = self._position_bias(state, S, S, hidden.device)
        out = block(hidden, attention_mask=None, position_bias=bias, encoder_hidden_states=memory)
        return out[0]

    def routing(self, args: tuple, kwargs: dict[str, Any]) -> Routing:
        # SwitchTransformersExperts.forward(hidden_states [T, d], selected_experts [T, 1, E] one-hot with
        # over-capacity tokens zeroed, routing_weights [T, 1]).
        x, selected, weights = bind(args, kwargs, ("hidden_states", "selected_experts", "routing_weights"))
        token, expert = torch.nonzero(selected[:, 0, :], as_tuple=True)  # token-major order
        return Routing(x, token, expert, weights[token, 0])

    def samples(
        self, tokenizer: Any, texts: Sequence[str], n: int, seed: int, seq_len: int
    ) -> dict[str, np.ndarray]:
        from qmoe.calib import span_corruption_samples

        batch = span_corruption_samples(tokenizer, texts, n, seed)
        labels = batch.labels
        start = 0  # T5's decoder_start_token_id (= pad); checked against the config in loss()
        dec_in = np.concatenate([np.full((len(labels), 1), start, dtype=np.int64), labels[:, :-1]], axis=1)
        return {"input_ids": batch.input_ids, "decoder_input_ids": dec_in, "labels": labels}

    def hessian_mask(self, tokenizer: Any, ids: np.ndarray) -> np.ndarray | None:
        # QMoE leaves the span-corruption sentinels (<extra_id_k>) out of the Hessians: they are markers,
        # not text, and in a span-corrupted sample every few tokens is one.
        from qmoe.calib.tokenizer import sentinel_ids

        return ~np.isin(ids, np.asarray(sentinel_ids(tokenizer)))

    def loss(
        self, hf_config: Any, head: dict[str, Tensor], hidden: Tensor, labels: Tensor
    ) -> tuple[float, int]:
        assert hf_config.decoder_start_token_id == 0, (
            "span-corruption samples assume decoder_start_token_id 0"
        )
        h = hidden
        if getattr(hf_config, "tie_word_embeddings", True):
            h = h * hf_config.d_model**-0.5  # T5 rescales before the tied projection
        logits = h @ head["lm_head"].T  # [B, S, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return float(loss), labels.numel()
