"""Decoder-only families beyond Qwen3-MoE (OLMoE; Qwen2-MoE with its shared expert) end to end, each on a
tiny random config written as published checkpoints are (per-expert ``mlp.experts.{e}.{gate,up,down}_proj``
keys): GPTQ compression, ``qmoe.load`` equal to ``from_pretrained``, ``qmoe decompress`` logits within 1e-4,
generation, and parameter counts equal to the model's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qmoe
from qmoe.config import CompressConfig

COMMON = dict(
    vocab_size=1024,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    eos_token_id=1,
    pad_token_id=0,
    bos_token_id=2,
)
# family -> the names of its MoE layers as its published checkpoints spell them
LAYERS = {
    "olmoe": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "qwen2_moe": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "mixtral": ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"],
    "deepseek_v3": ["model.layers.1.mlp", "model.layers.2.mlp"],  # layer 0 dense (first_k_dense_replace)
    "glm4_moe": ["model.layers.1.mlp", "model.layers.2.mlp"],
    "gpt_oss": ["model.layers.0.mlp", "model.layers.1.mlp"],
}


def _model(family: str):
    import transformers as tf

    two = dict(num_hidden_layers=2, num_experts=6)
    if family == "olmoe":
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(intermediate_size=16, **two, **COMMON))
    if family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            **two,
            **COMMON,
        )
        return tf.Qwen2MoeForCausalLM(cfg)
    if family == "gpt_oss":
        # a sliding window shorter than the test's 32-token windows, so that the sliding layer's mask matters
        cfg = tf.GptOssConfig(
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=6,
            head_dim=8,
            sliding_window=8,
            **COMMON,
        )
        model = tf.GptOssForCausalLM(cfg)
        with torch.no_grad():  # nonzero expert biases and attention sinks (zeros after init)
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.5)
                layer.mlp.experts.down_proj_bias.normal_(0, 0.5)
                layer.self_attn.sinks.normal_(0, 1)
        return model
    if family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=16, num_hidden_layers=2, num_local_experts=6, **COMMON)
        return tf.MixtralForCausalLM(cfg)
    # DeepSeek-V3 / GLM-4-MoE: one dense layer first, 8 experts in 2 groups of which the router keeps 1
    # (group-limited routing), one shared expert, sigmoid scores with a correction bias.
    moe = dict(
        num_hidden_layers=3,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
    )
    if family == "deepseek_v3":
        mla = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**moe, **mla, **COMMON))
    else:
        model = tf.Glm4MoeForCausalLM(tf.Glm4MoeConfig(**moe, partial_rotary_factor=0.5, **COMMON))
    with torch.no_grad():  # a nonzero correction bias, so that it matters which experts are chosen
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    return model


def _family(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["model_type"]


# One family end to end in the fast tier; every family (compress, load, decompress, CLI) in the slow tier.
FAST_FAMILY = "olmoe"
FAMILIES = [f if f == FAST_FAMILY else pytest.param(f, marks=pytest.mark.slow) for f in LAYERS]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    model = _model(request.param)
    with torch.no_grad():  # random-init experts are tiny (std 0.02): make the MoE path matter
        for layer in model.model.layers:
            if not hasattr(layer.mlp, "experts"):
                continue  # a dense layer
            layer.mlp.experts.gate_up_proj.mul_(20)
            layer.mlp.experts.down_proj.mul_(20)
    path = tmp_path_factory.mktemp(request.param) / "dense"
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def family_compressed(family_dir: Path) -> tuple[Path, dict]:
    from qmoe.pipeline import compress

    out = family_dir.parent / "compressed"
    rep = compress(
        family_dir,
        out,
        CompressConfig(calib_samples=16, seq_len=32, eval_samples=8, batch_size=8),
        device="cpu",
        progress=False,
    )
    return out, rep


def test_compresses_and_reports_the_models_own_counts(family_dir: Path, family_compressed) -> None:
    from transformers import AutoModelForCausalLM

    _, rep = family_compressed
    assert [r["name"] for r in rep["layers"]] == LAYERS[_family(family_dir)]
    assert rep["layers"][0]["tokens"]["total"] == 2 * 16 * 32  # top-2: every token reaches two experts
    model = AutoModelForCausalLM.from_pretrained(family_dir)
    # every stored number: parameters plus persistent buffers (DeepSeek-V3's e_score_correction_bias)
    stored = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    assert rep["totals"]["params"] == sum(stored.values())
    # the compressed expert weights; gpt-oss's expert biases stay as stored and count as the rest
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "bias" not in n)
    assert rep["totals"]["expert_params"] == experts
    # the pipeline runs the family as transformers does: its reference loss is transformers' own
    from transformers import AutoTokenizer

    from qmoe.adapters import get_adapter
    from qmoe.calib import load_texts
    from qmoe.pipeline.run import EVAL_SEED

    adapter = get_adapter(json.loads((family_dir / "config.json").read_text()))
    s = adapter.samples(AutoTokenizer.from_pretrained(family_dir), load_texts("validation"), 8, EVAL_SEED, 32)
    ids = torch.from_numpy(s["input_ids"])
    with torch.no_grad():
        ref = model.float().eval()(input_ids=ids, labels=ids).loss.item()
    assert abs(rep["eval"]["loss_reference"] - ref) < 1e-4


def test_runtime_hf_and_decompressed_agree(family_compressed, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmoe.runtime.decompress import decompress
    from qmoe.runtime.generate import generate

    out, rep = family_compressed
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    a = qmoe.load(out)
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # after import qmoe
    dense_dir = tmp_path / "dense"
    decompress(out, dense_dir, "fp32")
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    c = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        la, lb, lc = (m(input_ids=ids).logits for m in (a, b, c))
    torch.testing.assert_close(la, lb, atol=0, rtol=0)
    torch.testing.assert_close(lc, la, atol=1e-4, rtol=1e-4)
    g = generate(a, AutoTokenizer.from_pretrained(out), "In the beginning", max_new_tokens=4, exact=True)
    assert g.new_tokens == 4


def test_cli_eval_and_generate(family_compressed, capsys: pytest.CaptureFixture) -> None:
    from qmoe.cli import main

    out, rep = family_compressed
    assert main(["eval", str(out), "--samples", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] > 0 and res["tokens"] > 0
    assert main(["generate", str(out), "--prompt", "In the beginning", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("family", ["qwen2_moe", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_shared_experts_quantized(family: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    """``--shared-experts ternary``: the shared experts are encoded (Hessians from every calibration token),
    reported on their own line, run compressed by ``qmoe.load`` and decompressed back to dense weights."""
    from transformers import AutoModelForCausalLM

    from qmoe.pipeline import compress
    from qmoe.pipeline.report import summary
    from qmoe.runtime.decompress import decompress
    from qmoe.runtime.linear import CompressedLinear

    torch.manual_seed(0)
    model = _model(family)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dense / f.name)
    cfg = dict(calib_samples=16, seq_len=32, eval_samples=8, batch_size=8)
    kept = compress(dense, tmp_path / "kept", CompressConfig(**cfg), device="cpu", progress=False)
    out = tmp_path / "shared"
    rep = compress(dense, out, CompressConfig(shared_experts="ternary", **cfg), device="cpu", progress=False)

    shared_name = "shared_expert" if family == "qwen2_moe" else "shared_experts"
    shared_params = sum(p.numel() for n, p in model.named_parameters() if f".{shared_name}." in n)
    t, tk = rep["totals"], kept["totals"]
    assert t["shared_expert_params"] == tk["shared_expert_params"] == shared_params
    assert tk["shared_expert_bits_per_weight"] == 32.0  # kept as stored (float32 here)
    # ternary codes plus per-matrix tables, levels and headers, which dominate matrices this small: about
    # what the routed experts' matrices of the same or smaller size cost
    assert 1 < t["shared_expert_bits_per_weight"] < 1.25 * t["expert_bits_per_weight"]
    assert t["expert_params"] == tk["expert_params"] and t["params"] == tk["params"]
    assert all(r["shared"]["tokens_used"] == 16 * 32 for r in rep["layers"])  # every token, no cap
    assert "quantized at ternary" in summary(rep) and "kept as stored" in summary(kept)
    assert rep["eval"]["loss_compressed"] != kept["eval"]["loss_compressed"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sum(f".{shared_name}." in k for k in index["qmoe_encoded"]) == 3 * len(rep["layers"])

    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    a = qmoe.load(out)
    assert sum(isinstance(m, CompressedLinear) for m in a.modules()) == 3 * len(rep["layers"])
    decompress(out, tmp_path / "back", "fp32")
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(c(input_ids=ids).logits, a(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_shared_experts_refused_without_any(tmp_path: Path) -> None:
    from qmoe.errors import ConfigError
    from qmoe.pipeline import compress

    _model("mixtral").save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="mixtral models have no shared experts"):
        compress(tmp_path / "dense", tmp_path / "out", CompressConfig(shared_experts="2"), progress=False)


def test_remote_code_model_type_is_one_line(tmp_path: Path) -> None:
    """Kimi-K2 names DeepseekV3ForCausalLM but a model_type that only its remote code defines."""
    from qmoe.errors import SourceError
    from qmoe.pipeline import compress

    _model("deepseek_v3").save_pretrained(tmp_path / "kimi")
    cfg = json.loads((tmp_path / "kimi" / "config.json").read_text())
    (tmp_path / "kimi" / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    with pytest.raises(SourceError, match="needs a model_type transformers knows \\(deepseek_v3\\)") as info:
        compress(tmp_path / "kimi", tmp_path / "out", CompressConfig(), progress=False)
    assert "\n" not in str(info.value)


def test_quantized_source_is_refused_in_one_line(tmp_path: Path) -> None:
    """gpt-oss and DeepSeek-V3 are published in mxfp4 / fp8: qmoe needs the dequantized weights."""
    from qmoe.errors import SourceError
    from qmoe.pipeline import compress

    _model("gpt_oss").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="holds mxfp4-quantized weights; qmoe compresses 16/32-bit"):
        compress(tmp_path / "m", tmp_path / "out", CompressConfig(), progress=False)
