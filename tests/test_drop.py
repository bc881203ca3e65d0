"""Dropped experts (a model-wide budget may give an expert no weights): the router never chooses them and
the remaining top-k renormalise as the family does. The reference is transformers itself with the experts
*deleted* (router rows and weights removed, the expert count lowered), for every supported family; then the
pipeline end to end: the plan's drops are not stored, the compressed streams, ``qmoe.load``, ``qmoe verify``
and ``qmoe decompress`` all agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe.adapters.drop import drop_experts, dropping

COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def _tiny(family: str, width: int = 32):
    """A tiny random model of ``family`` with its experts scaled up so that they matter (Qwen3-MoE:
    ``width`` wide, so that a budget near 1 bit/weight leaves room beside the per-row metadata)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "switch_transformers":
        cfg = tf.SwitchTransformersConfig(
            vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
            num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=6, expert_capacity=64,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.SwitchTransformersForConditionalGeneration(cfg)
        with torch.no_grad():  # the router's logits must be large enough that the choice matters
            for n, p in model.named_parameters():
                if "router" in n:
                    p.mul_(50)
        return model
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(vocab_size=1024, hidden_size=width, intermediate_size=2 * width,
                                moe_intermediate_size=width, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
                                norm_topk_prob=True, eos_token_id=1, pad_token_id=0, bos_token_id=2)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "deepseek_v3" and width != 32:  # the published layout, wide enough for a ~1-bit budget
        cfg = tf.DeepseekV3Config(
            vocab_size=1024, hidden_size=width, num_attention_heads=4, num_key_value_heads=4,
            num_experts_per_tok=2, num_hidden_layers=2, intermediate_size=2 * width,
            moe_intermediate_size=width, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
            n_group=2, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, eos_token_id=1, pad_token_id=0,
            bos_token_id=2)
        model = tf.DeepseekV3ForCausalLM(cfg)
        with torch.no_grad():
            model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    else:
        from test_decoder_families import _model

        model = _model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.gate_up_proj.mul_(20)
                layer.mlp.experts.down_proj.mul_(20)
    return model


def _moe_modules(model, adapter) -> list[torch.nn.Module]:
    from qmoe.runtime.load import _submodule

    cfg = model.config.to_dict()
    return [_submodule(model, adapter.module_key(layer)) for layer in adapter.moe_layers(cfg)]


def _without(model, adapter, gone: list[int]):
    """The same model with experts ``gone`` deleted from every MoE layer (transformers' own semantics of an
    expert the router cannot choose)."""
    cfg = model.config.to_dict()
    E = adapter.num_experts(cfg)
    keep = [e for e in range(E) if e not in gone]
    new_cfg = model.config.__class__(**{**cfg, **{k: E - len(gone) for k in COUNT_FIELDS if k in cfg}})
    reduced = model.__class__(new_cfg).eval()
    renumber = {f"expert_{e}.": f"expert_{i}." for i, e in enumerate(keep)}
    sd = {}
    for k, v in model.state_dict().items():
        m = re.search(r"expert_(\d+)\.", k)  # Switch: one module per expert
        if m:
            if int(m.group(1)) in gone:
                continue
            k = k.replace(m.group(0), renumber[m.group(0)])
        elif v.dim() >= 1 and v.shape[0] == E and (".experts." in k or f".{adapter.router}." in k):
            v = v[keep]  # router rows, correction bias, fused expert tensors [E, ...]
        sd[k] = v
    reduced.load_state_dict(sd, strict=True)
    return reduced


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


FAMILIES = ["qwen3_moe", "switch_transformers", "olmoe", "qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe",
            "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_experts_route_as_if_deleted(family: str) -> None:
    from qmoe.adapters import get_adapter

    model = _tiny(family).float().eval()
    cfg = model.config.to_dict()
    adapter = get_adapter(cfg)
    E = adapter.num_experts(cfg)
    # DeepSeek-V3 / GLM-4: 8 experts in 2 groups; drop one of each so the groups keep their members
    gone = [1, 5] if E == 8 else [1]
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    reference = _logits(_without(model, adapter, gone), ids)
    assert not torch.allclose(before, reference, atol=1e-3), "the dropped expert must matter on this input"
    for moe in _moe_modules(model, adapter):
        drop_experts(adapter, moe, gone, E, adapter.top_k(cfg))
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-5, rtol=1e-5)


def test_dropping_is_scoped_and_refuses_too_many() -> None:
    from qmoe.adapters import get_adapter
    from qmoe.errors import SourceError

    model = _tiny("qwen3_moe").float().eval()
    cfg = model.config.to_dict()
    adapter = get_adapter(cfg)
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    moe = _moe_modules(model, adapter)[0]
    with dropping(adapter, moe, [0, 3], 6, 2):
        inside = _logits(model, ids)
    assert not torch.allclose(inside, before, atol=1e-3)
    torch.testing.assert_close(_logits(model, ids), before, atol=0, rtol=0)
    with pytest.raises(SourceError, match=r"5 of 6 experts dropped leaves fewer than the router's top-k"):
        drop_experts(adapter, moe, [0, 1, 2, 3, 4], 6, 2)


def _force_drop(monkeypatch: pytest.MonkeyPatch, gone: list[int]) -> None:
    """Make every budget plan drop experts ``gone`` of every layer, at every price."""
    import qmoe.pipeline.budget as budget

    def drops(first, second, x, top_k):
        out = np.zeros((len(first.multipliers), len(x)), dtype=bool)
        out[gone] = True
        return out

    monkeypatch.setattr(budget, "drop_decisions", drops)


def _eval_loss(model, out: Path, rep: dict) -> float:
    from transformers import AutoTokenizer

    from qmoe.adapters import get_adapter
    from qmoe.calib import load_texts
    from qmoe.pipeline.run import EVAL_SEED

    adapter = get_adapter(json.loads((out / "config.json").read_text()))
    s = adapter.samples(AutoTokenizer.from_pretrained(out), load_texts("validation"),
                        rep["config"]["eval_samples"], EVAL_SEED, rep["config"]["seq_len"])
    ids = torch.from_numpy(s["input_ids"])
    with torch.no_grad():
        return model(input_ids=ids, labels=torch.from_numpy(s["labels"])).loss.item()


def _saved(model, path: Path, tokenizer_dir: Path) -> Path:
    import shutil

    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    if "num_local_experts" in cfg and cfg.get("model_type") == "qwen3_moe":  # as Hub configs spell it
        (path / "config.json").write_text(json.dumps({**cfg, "num_experts": cfg["num_local_experts"]}))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _global_budget(bits: float):
    """A small calibration at a model-wide budget of ``bits`` (the runs below force which experts drop)."""
    from qmoe.config import CompressConfig

    return CompressConfig(calib_samples=16, seq_len=32, eval_samples=8, batch_size=8, target_bits=bits,
                          allocation="global")


@pytest.mark.slow  # two compressions with a size search: ~30 s quiet, ~50 s loaded
def test_budget_drops_experts_end_to_end(tmp_path: Path, tokenizer_dir: Path, monkeypatch) -> None:
    """Dropped experts store nothing and are recorded; the pipeline's compressed stream ran with them
    masked exactly as ``qmoe.load`` runs them; ``qmoe verify`` accepts the checkpoint; decompress says why
    it cannot write this family."""
    import qmoe
    from qmoe.config import CompressConfig
    from qmoe.errors import ConfigError
    from qmoe.pipeline import compress
    from qmoe.runtime.decompress import decompress
    from qmoe.runtime.verify import verify_dir

    _force_drop(monkeypatch, [1])
    src = _saved(_tiny("qwen3_moe", width=128), tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    cfg = _global_budget(1.0)
    rep = compress(src, out, cfg, device="cpu", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dropped_experts"] == {"model.layers.0.mlp": [1], "model.layers.1.mlp": [1]}
    for row in rep["layers"]:
        assert row["dropped"] == [1]
        assert row["per_expert"][1]["bytes"] == 0 and row["per_expert"][1].get("dropped")
    assert rep["totals"]["expert_bits_per_weight"] == pytest.approx(1.0, rel=0.02)  # B over all experts
    from qmoe.codec import load_shard

    names = [k for f in sorted(out.glob("*.safetensors")) for k in load_shard(f).encoded]
    assert names and not [k for k in names if ".experts.1." in k]
    assert verify_dir(out).problems == []
    model = qmoe.load(out)
    assert _eval_loss(model, out, rep) == pytest.approx(rep["eval"]["loss_compressed"], abs=1e-4)
    with pytest.raises(ConfigError, match="has 2 dropped experts .* no dense checkpoint reproduces"):
        decompress(out, tmp_path / "dense")
    # and with dropping disabled the same budget stores every expert
    no_drop = CompressConfig.from_dict({**cfg.to_dict(), "drop_experts": False})
    keep = compress(src, tmp_path / "keep", no_drop, device="cpu", progress=False)
    assert all(r["dropped"] == [] for r in keep["layers"])


@pytest.mark.slow
def test_dropped_experts_decompress_with_the_routers_bias(tmp_path: Path, tokenizer_dir: Path,
                                                          monkeypatch) -> None:
    """DeepSeek-V3 routes by sigmoid scores plus a correction bias: a dense checkpoint reproduces dropped
    experts with ``-inf`` there (and zero weights), so decompress writes it and transformers agrees."""
    from transformers import AutoModelForCausalLM

    import qmoe
    from qmoe.pipeline import compress
    from qmoe.runtime.decompress import decompress

    _force_drop(monkeypatch, [2])
    dense = _saved(_tiny("deepseek_v3", width=128), tmp_path / "dense", tokenizer_dir)
    out = tmp_path / "out"
    rep = compress(dense, out, _global_budget(1.2), device="cpu", progress=False)
    assert all(r["dropped"] == [2] for r in rep["layers"])
    a = qmoe.load(out)
    assert _eval_loss(a, out, rep) == pytest.approx(rep["eval"]["loss_compressed"], abs=1e-4)
    decompress(out, tmp_path / "back", "fp32")
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert torch.isinf(c.model.layers[1].mlp.gate.e_score_correction_bias[2])
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(c, ids), _logits(a, ids), atol=1e-4, rtol=1e-4)
