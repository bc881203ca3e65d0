"""Shared fixtures: a small tokenizer and tiny random MoE model directories (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qmoe.calib import bible_split
    from qmoe.calib.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    # A few books are enough for a 1k vocabulary and keep this under a second.
    train_tokenizer(bible_split("train")[:200], vocab_size=1024).save_pretrained(path)
    return path


def _copy_tokenizer(tokenizer_dir: Path, path: Path) -> None:
    import shutil

    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)


def save_tiny_switch(path: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    cfg = dict(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
               num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=64,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    cfg.update(overrides)
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**cfg))
    model.save_pretrained(path)
    _copy_tokenizer(tokenizer_dir, path)
    return path


@pytest.fixture(scope="session")
def tiny_switch_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_tiny_switch(tmp_path_factory.mktemp("tiny-switch"), tokenizer_dir)


def save_tiny_qwen3_moe(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import json

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, bos_token_id=2,
                         eos_token_id=1, pad_token_id=0)
    model = Qwen3MoeForCausalLM(cfg)
    # Random-init experts are tiny (std 0.02); scale them so the MoE path visibly changes the logits.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(20)
            layer.mlp.experts.down_proj.mul_(20)
    model.save_pretrained(path)
    # transformers 5 writes the expert count as "num_local_experts"; Qwen3-MoE checkpoints on the Hub (and
    # qmoe's adapter) use "num_experts". Keep both, as a Hub config.json has.
    cfg_file = path / "config.json"
    cfg_dict = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg_dict, "num_experts": cfg_dict["num_local_experts"]}, indent=2))
    _copy_tokenizer(tokenizer_dir, path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3-dense"), tokenizer_dir)
