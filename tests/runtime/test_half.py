"""Non-expert weights kept 16-bit on the CPU (qmoe.runtime.half, ``qmoe.load(half_weights=...)``): the same
logits as the float32 load, prompt and cached single tokens, on a decoder (Qwen3-MoE) and an encoder-decoder
with tied embeddings (Switch); half the non-expert bytes; one-line refusals."""

from __future__ import annotations

import pytest
import torch

import qmoe
from qmoe.errors import ConfigError


def _logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids, **kw).logits
        return model(ids, **kw).logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["qwen3_compressed", "switch_compressed"])
def test_same_logits_as_the_float32_load(which, dtype, request, tmp_path, sixteen_bit) -> None:
    from qmoe.runtime.half import HalfEmbedding, HalfLinear

    path = sixteen_bit(request.getfixturevalue(which), tmp_path / "m", dtype)
    half, wide = qmoe.load(path), qmoe.load(path, half_weights=False)
    linears = [m for m in half.modules() if isinstance(m, HalfLinear)]
    assert linears and any(isinstance(m, HalfEmbedding) for m in half.modules())
    # every HalfLinear keeps the checkpoint's 16-bit weight, except Switch's routers, which cast themselves
    wide_ones = [n for n, m in half.named_modules() if isinstance(m, HalfLinear) and m.weight.dtype != dtype]
    assert all(n.endswith("router.classifier") for n in wide_ones)
    assert len(wide_ones) < len(linears)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = _logits(half, ids), _logits(wide, ids)
    assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    one = ids[:1, :1]  # one token: the native kernel's batch
    assert torch.allclose(_logits(half, one), _logits(wide, one), atol=1e-5, rtol=1e-5)
    if which == "switch_compressed":  # tied: the head reads the embedding's own 16-bit tensor
        assert half.lm_head.weight is half.shared.weight and half.shared.weight.dtype == dtype
    kept = sum(p.numel() * p.element_size() for p in half.parameters())
    full = sum(p.numel() * p.element_size() for p in wide.parameters())
    assert kept < 0.6 * full


def test_generation_with_cache_matches(qwen3_compressed, tmp_path, sixteen_bit) -> None:
    path = sixteen_bit(qwen3_compressed, tmp_path / "m", torch.bfloat16)
    half, wide = qmoe.load(path), qmoe.load(path, half_weights=False)
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(half.generate(ids, **kw), wide.generate(ids, **kw))
    from qmoe.runtime.generate import describe

    assert describe(half).startswith("bfloat16 weights on float32 activations, experts compressed")
    assert describe(wide).startswith("float32, experts compressed")


def test_float32_checkpoints_and_other_dtypes_load_as_before(qwen3_compressed, tmp_path, sixteen_bit) -> None:
    from qmoe.runtime.half import HalfLinear

    model = qmoe.load(qwen3_compressed)  # the fixture's checkpoint is float32: nothing to keep
    assert not any(isinstance(m, HalfLinear) for m in model.modules())
    path = sixteen_bit(qwen3_compressed, tmp_path / "m", torch.bfloat16)
    model = qmoe.load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="half_weights=True cannot apply") as info:
        qmoe.load(path, dtype=torch.bfloat16, half_weights=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="stores its non-expert weights as torch.float32"):
        qmoe.load(qwen3_compressed, half_weights=True)
