"""Adapters: family lookup, the declared layouts, and a decoder-only family (Qwen3-MoE, transformers-5 fused
experts in memory, per-expert keys on disk) compressed end to end and checked against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe.adapters import get_adapter, supported
from qmoe.config import CompressConfig
from qmoe.errors import SourceError


def make_qwen3_moe(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        max_position_embeddings=256,
    )
    Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def test_lookup_and_unsupported_family() -> None:
    assert get_adapter({"model_type": "switch_transformers"}).name == "switch"
    assert get_adapter({"architectures": ["Qwen3MoeForCausalLM"]}).name == "qwen3_moe"
    with pytest.raises(
        SourceError, match="unsupported model family.*SwitchTransformersForConditionalGeneration"
    ):
        get_adapter({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert "Qwen3MoeForCausalLM" in supported()


def test_switch_layout_follows_sparse_step() -> None:
    a = get_adapter({"model_type": "switch_transformers"})
    cfg = {"num_layers": 4, "num_decoder_layers": 4, "encoder_sparse_step": 2, "decoder_sparse_step": 2}
    enc, dec = a.stacks(cfg)
    assert enc.moe_layers == (None, "layer.1.mlp", None, "layer.1.mlp")
    assert dec.moe_layers == (None, "layer.2.mlp", None, "layer.2.mlp") and dec.memory == "encoder"
    assert a.moe_layers(cfg)[0] == "encoder.block.1.layer.1.mlp"
    key = a.experts.expert_key("encoder.block.1.layer.1.mlp", 3, "wi")
    assert key == "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"


def test_qwen3_on_disk_keys_match_layout(tmp_path: Path, tokenizer_dir: Path) -> None:
    from safetensors import safe_open

    src = make_qwen3_moe(tmp_path / "q", tokenizer_dir)
    cfg = json.loads((src / "config.json").read_text())
    a = get_adapter(cfg)
    (stack,) = a.stacks(cfg)
    assert stack.moe_layers == ("mlp", None, "mlp")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in a.moe_layers(cfg):
            for e in range(6):
                for p in a.experts.projections:
                    k = a.experts.expert_key(layer, e, p)
                    assert k in keys and tuple(f.get_slice(k).get_shape()) == a.experts.shape(cfg, p)


def test_qwen3_moe_compress_matches_transformers(tmp_path: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    from qmoe.calib import load_texts
    from qmoe.codec import dequantize, load_shard
    from qmoe.pipeline import compress
    from qmoe.pipeline.run import EVAL_SEED

    src = make_qwen3_moe(tmp_path / "q", tokenizer_dir)
    out = tmp_path / "out"
    config = CompressConfig(calib_samples=16, seq_len=32, eval_samples=8, batch_size=8)
    rep = compress(src, out, config, device="cpu", progress=False)
    assert [r["name"] for r in rep["layers"]] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert set(rep["layers"][0]["objective_mean"]) == {"gate_proj+up_proj", "down_proj"}
    # top-2 routing: every calibration token reaches two experts
    assert rep["layers"][0]["tokens"]["total"] == 2 * 16 * 32

    tok = AutoTokenizer.from_pretrained(src)
    s = get_adapter(json.loads((src / "config.json").read_text())).samples(
        tok, load_texts("validation"), 8, EVAL_SEED, 32
    )
    ids = torch.from_numpy(s["input_ids"])
    model = Qwen3MoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.item()
    assert abs(rep["eval"]["loss_reference"] - ref) < 1e-4

    decoded = {}
    for f in sorted(out.glob("model-*.safetensors")):
        for k, enc in load_shard(f).encoded.items():
            decoded[k] = torch.from_numpy(np.asarray(dequantize(enc))).float()
    sd = model.state_dict()
    for layer in ("model.layers.0.mlp", "model.layers.2.mlp"):  # fuse into transformers' in-memory layout
        sd[f"{layer}.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat(
                    [
                        decoded[f"{layer}.experts.{e}.gate_proj.weight"],
                        decoded[f"{layer}.experts.{e}.up_proj.weight"],
                    ]
                )
                for e in range(6)
            ]
        )
        sd[f"{layer}.experts.down_proj"] = torch.stack(
            [decoded[f"{layer}.experts.{e}.down_proj.weight"] for e in range(6)]
        )
    model.load_state_dict(sd)
    with torch.no_grad():
        comp = model(input_ids=ids, labels=ids).loss.item()
    assert abs(rep["eval"]["loss_compressed"] - comp) < 1e-4
    assert len(decoded) == 2 * 6 * 3
