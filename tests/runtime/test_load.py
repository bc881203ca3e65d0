"""Loading compressed checkpoints both ways (qmoe.load, AutoModel*.from_pretrained) for every family."""

from __future__ import annotations

import pytest
import torch

import qmoe
from qmoe.runtime.experts import CompressedExperts

FAMILIES = ["switch_compressed", "qwen3_compressed"]


def _auto(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(path).is_encoder_decoder
    return AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM


def _logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1024, (3, 17), generator=g)  # [B, S], fresh random tokens
    kwargs = {"decoder_input_ids": ids[:, :9]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_dequantized_dense_model(family, request, reference_of) -> None:
    path = request.getfixturevalue(family)
    model = qmoe.load(path)
    dense = _auto(path).from_pretrained(reference_of(path), dtype=torch.float32).eval()
    for seed in range(2):
        got, want = _logits(model, seed), _logits(dense, seed)
        err = (got - want).abs().max() / want.abs().max()
        assert err <= 1e-4, f"relative logit error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_builds_the_same_model(family, request) -> None:
    path = request.getfixturevalue(family)
    a = qmoe.load(path)
    b = _auto(path).from_pretrained(path)  # registered by `import qmoe`
    assert type(a) is type(b) and not b.training
    assert torch.equal(_logits(a), _logits(b))
    assert [n for n, m in b.named_modules() if isinstance(m, CompressedExperts)] == \
        [n for n, m in a.named_modules() if isinstance(m, CompressedExperts)]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_dense_expert_weights(family, request, reference_of) -> None:
    from qmoe.adapters import get_adapter
    from qmoe.sources import read_config

    path = request.getfixturevalue(family)
    model = qmoe.load(path)
    cfg = read_config(path)
    adapter = get_adapter(cfg)
    layers = adapter.moe_layers(cfg)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, CompressedExperts)}
    assert len(experts) == len(layers) and all(not m.missing() for m in experts.values())
    assert all(list(m.parameters()) == [] and list(m.buffers()) == [] for m in experts.values())
    # Inside the MoE layers nothing has an expert projection's shape; nothing anywhere is left on meta.
    shapes = [adapter.experts.shape(cfg, p) for p in adapter.experts.projections]
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type != "meta", name
        if any(name.startswith(f"{layer}.") for layer in layers):
            assert tuple(t.shape[-2:]) not in shapes, name
    # The dense model holds exactly the expert weights more.
    dense = _auto(path).from_pretrained(reference_of(path))
    expert_weights = len(layers) * adapter.num_experts(cfg) * sum(r * c for r, c in shapes)
    numel = sum(t.numel() for t in model.parameters())
    assert sum(t.numel() for t in dense.parameters()) - numel == expert_weights
    m = next(iter(experts.values()))
    assert "bits/weight" in repr(m) and m.nbytes > 0
    if model.config.is_encoder_decoder:  # tied embeddings stay tied (T5: shared = both stacks' embeddings)
        assert model.encoder.embed_tokens.weight is model.shared.weight


def test_base_model_class_loads(switch_compressed) -> None:
    """The task-less base model (checkpoint keys carry no head) converts the same MoE layers."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(switch_compressed)
    assert sum(isinstance(m, CompressedExperts) for m in model.modules()) == 2
