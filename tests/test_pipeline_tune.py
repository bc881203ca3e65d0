"""The norm-tuning stage (qmoe.pipeline.tune): which tensors it fits, that the error it reports is the
compressed model's own distance to the original model's hidden states (measured again through transformers
on the written checkpoint), that the stored norms are the tuned ones, and that it lowers the loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe.config import CompressConfig
from qmoe.errors import ConfigError


def test_norm_parameters_of_a_qwen3_and_a_switch_block() -> None:
    from transformers import Qwen3MoeConfig, SwitchTransformersConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersBlock

    from qmoe.pipeline.tune import norm_parameters

    q = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1)
    names = norm_parameters(Qwen3MoeDecoderLayer(q, 0))
    assert sorted(names) == sorted(["self_attn.q_norm.weight", "self_attn.k_norm.weight",
                                    "input_layernorm.weight", "post_attention_layernorm.weight"])
    s = SwitchTransformersConfig(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_experts=4)
    block = SwitchTransformersBlock(s, has_relative_attention_bias=True, is_sparse=True)
    assert norm_parameters(block) == ["layer.0.layer_norm.weight", "layer.1.layer_norm.weight"]


def test_attention_parameters_of_qwen3_switch_and_deepseek_blocks() -> None:
    """``tune="attention"`` adds every attention weight (MLA's low-rank projections included, the experts
    and the router never), each once."""
    from transformers import DeepseekV3Config, Qwen3MoeConfig, SwitchTransformersConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersBlock

    from qmoe.pipeline.tune import tuned_parameters

    q = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1)
    names = tuned_parameters(Qwen3MoeDecoderLayer(q, 0), "attention")
    assert sorted(names) == sorted(
        ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
         "self_attn.k_norm.weight"] + [f"self_attn.{m}_proj.weight" for m in "qkvo"])
    s = SwitchTransformersConfig(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_experts=4)
    block = SwitchTransformersBlock(s, has_relative_attention_bias=True, is_sparse=True)
    names = tuned_parameters(block, "attention")
    assert sorted(names) == sorted(
        ["layer.0.layer_norm.weight", "layer.1.layer_norm.weight"]
        + [f"layer.0.SelfAttention.{m}.weight" for m in "qkvo"]
        + ["layer.0.SelfAttention.relative_attention_bias.weight"])
    d = DeepseekV3Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                         num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=8,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, first_k_dense_replace=0,
                         num_hidden_layers=1)
    names = tuned_parameters(DeepseekV3DecoderLayer(d, 0), "attention")
    assert len(names) == len(set(names)) and not any("mlp" in n for n in names)
    assert {"self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight",
            "self_attn.o_proj.weight", "self_attn.q_a_layernorm.weight"} <= set(names)
    assert tuned_parameters(DeepseekV3DecoderLayer(d, 0), "norms") == [n for n in names if "norm" in n]


def test_config_tune_settings() -> None:
    assert CompressConfig().tune == "attention"
    old = {k: v for k, v in CompressConfig().to_dict().items() if not k.startswith("tune")}
    assert CompressConfig.from_dict({**old, "config_version": 6}).tune == "none"  # they ran without it
    with pytest.raises(ConfigError, match="tune must be one of none, norms, attention"):
        CompressConfig(tune="all")
    with pytest.raises(ConfigError, match="tune_epochs must be an integer >= 1"):
        CompressConfig(tune_epochs=0)
    with pytest.raises(ConfigError, match="tune_samples must be an integer >= 1"):
        CompressConfig(tune_samples=0)
    with pytest.raises(ConfigError, match="tune_lr must lie in"):
        CompressConfig(tune_lr=0.0)


def test_the_fit_never_draws_a_held_out_sample() -> None:
    """``_fit`` steps only on samples ``[0, fit)``: each epoch draws ``fit // BATCH`` batches of distinct
    samples from there, so the held-out samples ``[fit, n)`` that decide what is kept stay unseen."""
    from types import SimpleNamespace

    from qmoe.pipeline.tune import BATCH, _fit

    w = torch.nn.Parameter(torch.ones(3))
    seen: list[list[int]] = []

    def forward(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(idx.tolist())
        return w.expand(len(idx), 3), torch.zeros(len(idx), 3)

    config = SimpleNamespace(tune_lr=1e-2, tune_epochs=3, seed=0)
    fit = 2 * BATCH + 5  # 37 of, say, 42 samples fitted
    assert list(_fit({"w": w}, {"w"}, forward, fit, config, g=0)) == [1, 2, 3]
    assert len(seen) == 3 * 2 and all(len(b) == BATCH and len(set(b)) == BATCH for b in seen)
    assert max(max(b) for b in seen) < fit
    assert float(w.detach().abs().max()) < 1  # it did step toward the zero target


def _stored_state(out: Path) -> dict[str, torch.Tensor]:
    """The compressed checkpoint as a transformers state dict: decoded experts, stored tensors (float32)."""
    from transformers import AutoModelForCausalLM

    from qmoe.runtime.decompress import decompress

    dec = out.parent / (out.name + "-dense")
    decompress(out, dec, dtype="fp32")
    return AutoModelForCausalLM.from_pretrained(dec, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("tune", ["norms", "attention"])
def test_reported_error_is_the_checkpoint_against_the_original(
    tmp_path: Path, tiny_qwen3_moe_dir: Path, tune: str
) -> None:
    """Per MoE layer, the reported error after tuning is the mean squared distance, on the calibration
    samples, between the written checkpoint's hidden state after that layer and the original model's,
    recomputed through transformers; tuning lowered it where kept; kept norms are stored, others not."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qmoe.pipeline import compress
    from qmoe.pipeline.preflight import plan
    from qmoe.pipeline.samples import load_samples

    cfg = CompressConfig(
        calib_samples=24, seq_len=32, eval=False, tune=tune, tune_epochs=3, tune_lr=1e-2, tune_samples=16
    )
    out = tmp_path / "out"
    rep = compress(tiny_qwen3_moe_dir, out, cfg, device="cpu", progress=False)
    from qmoe.pipeline.report import summary

    assert ("tuned norms and attention" in summary(rep, table=False)) == (tune == "attention")
    layers = rep["layers"]
    norms = 32 + 32 + 8 + 8  # input and post-attention norms [hidden], q and k norms [head_dim]
    source = load_file(str(tiny_qwen3_moe_dir / "model.safetensors"))
    attention = sum(source[f"model.layers.0.self_attn.{m}_proj.weight"].numel() for m in "qkvo")
    want = norms + (attention if tune == "attention" else 0)
    assert len(layers) == 2 and all(layer["tuned"]["params"] == want for layer in layers)
    assert any(layer["tuned"]["kept"] for layer in layers)  # fails if tuning never lowers a block's error

    from qmoe import __version__

    samples = load_samples(plan(tiny_qwen3_moe_dir, tmp_path / "p", cfg, __version__), cfg)
    ids = torch.from_numpy(samples["calib"]["input_ids"])[:16]  # the samples the tuning fitted, measured on
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()
    compressed = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()
    compressed.load_state_dict(_stored_state(out))

    def layer_outputs(model: torch.nn.Module) -> list[torch.Tensor]:
        got: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _a, o: got.append(o[0] if isinstance(o, tuple) else o))
                 for m in model.model.layers]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        return got

    for i, (a, b) in enumerate(zip(layer_outputs(compressed), layer_outputs(original), strict=True)):
        tuned = layers[i]["tuned"]
        mse = float((a.double() - b.double()).pow(2).mean())
        assert mse == pytest.approx(tuned["mse_after" if tuned["kept"] else "mse_before"], rel=1e-3)
        if tune == "norms":  # 448 numbers: kept on the samples they were fitted to
            assert "held_out" not in tuned and tuned["kept"] == (tuned["mse_after"] < tuned["mse_before"])
            continue
        # attention: the last 16 // 8 = 2 samples were never fitted; they alone decide, and their reported
        # error is the checkpoint's own there
        before, after = tuned["held_out_before"], tuned["held_out_after"]
        assert tuned["held_out"] == 2 and tuned["kept"] == (after < before)
        held = float((a[14:].double() - b[14:].double()).pow(2).mean())
        assert held == pytest.approx(after if tuned["kept"] else before, rel=1e-3)
        assert (tuned["epoch"] > 0) == tuned["kept"]

    from qmoe.codec import load_shard

    stored = {}
    for f in sorted(out.glob("model-*.safetensors")):
        stored.update(load_shard(f).tensors)
    for layer in layers:
        for k in layer["tuned"]["keys"]:
            assert stored[k].dtype == source[k].dtype
            assert torch.equal(stored[k], source[k]) != layer["tuned"]["kept"]


def test_untuned_run_stores_the_norms_as_they_were(tmp_path: Path, tiny_qwen3_moe_dir: Path) -> None:
    from safetensors.torch import load_file

    from qmoe.codec import load_shard
    from qmoe.pipeline import compress

    cfg = CompressConfig(calib_samples=8, seq_len=16, eval=False, tune="none")
    rep = compress(tiny_qwen3_moe_dir, tmp_path / "out", cfg, device="cpu", progress=False)
    assert all("tuned" not in layer for layer in rep["layers"])
    from qmoe.pipeline.report import summary

    assert "tuned norms" not in summary(rep, table=False)
    source = load_file(str(tiny_qwen3_moe_dir / "model.safetensors"))
    for f in sorted((tmp_path / "out").glob("model-*.safetensors")):
        for k, t in load_shard(f).tensors.items():
            assert torch.equal(t, source[k]), k


@pytest.mark.slow
def test_tuning_lowers_the_loss_of_tiny_qwen3_moe(tmp_path: Path) -> None:
    """On the built-in model (experts that matter), the default recipe with tuned norms loses less on held-out
    validation text than the same run without: paired on identical tokens, the interval below zero."""
    from qmoe.evaluation import paired_delta
    from qmoe.pipeline import compress

    reps = {}
    for tune in ("norms", "none"):
        cfg = CompressConfig(calib_samples=128, eval_samples=64, tune=tune)
        reps[tune] = compress("tiny-qwen3-moe", tmp_path / tune, cfg, device="cpu", progress=False)["eval"]
    a, b = reps["norms"], reps["none"]
    assert a["sample_tokens"] == b["sample_tokens"]
    delta, ci = paired_delta(np.array(b["sample_loss_compressed"]), np.array(a["sample_loss_compressed"]),
                             np.array(a["sample_tokens"]))
    assert delta + ci < 0, (delta, ci)
