"""Sliding-window attention as transformers applies it: per ``layer_types`` when the config has them
(gpt-oss), on every layer when only ``sliding_window`` is set (Mixtral). The adapters' block-by-block
forward (what calibration and the reference loss run) against transformers' own hidden states, on a
sequence four times the window."""

from __future__ import annotations

import pytest
import torch

from qmoe.adapters import get_adapter


def _tiny(family: str, window: int | None):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=16, num_hidden_layers=2, max_position_embeddings=128)
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, sliding_window=window, **common))
    return tf.GptOssForCausalLM(tf.GptOssConfig(num_local_experts=4, head_dim=8, sliding_window=window,
                                                **common))


@pytest.mark.parametrize(("family", "window"), [("mixtral", 8), ("mixtral", None), ("gpt_oss", 8)])
def test_blocks_match_transformers(family: str, window: int | None) -> None:
    torch.manual_seed(0)
    model = _tiny(family, window).eval()
    model.config._attn_implementation = "eager"
    adapter = get_adapter(model.config.to_dict())
    stack = adapter.stacks(model.config.to_dict())[0]
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states  # [B, S, d] per layer
        state = adapter.prepare_stack(model.config, stack, lambda key: None)
        hidden = model.model.embed_tokens(ids)
        for i, block in enumerate(model.model.layers[:-1]):  # the last entry of hidden_states is normed
            hidden = adapter.block_forward(block, i, hidden, None, state)
            err = (hidden - want[i + 1]).abs().max().item()
            assert err < 1e-5, f"layer {i}: max difference {err} from transformers"
    # the window matters on this sequence: full causal attention gives other states
    if window:
        full = adapter.prepare_stack(model.config, stack, lambda key: None)
        full["windows"] = [None] * len(full["windows"])
        with torch.no_grad():
            other = adapter.block_forward(model.model.layers[0], 0, model.model.embed_tokens(ids), None, full)
        assert (other - want[1]).abs().max().item() > 1e-3
