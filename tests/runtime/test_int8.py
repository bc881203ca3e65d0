"""Weight-only int8 non-expert Linears (qmoe.runtime.int8, ``qmoe.load(int8_weights=True)``): the model
computes exactly what the float32 model with its Linear weights replaced by their dequantized int8 values
computes (prompt through torch, single tokens through the native kernel, cached generation), on a decoder
(Qwen3-MoE) and an encoder-decoder with a tied head (Switch); routers, embeddings and norms stay; one-line
refusals."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import qmoe
from qmoe.errors import ConfigError
from qmoe.runtime.int8 import Int8Linear


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(ids).logits


def _reference(path, int8_model) -> nn.Module:
    """The float32 load of ``path`` with every Linear that ``int8_model`` quantized holding ``Q * s``."""
    ref = qmoe.load(path, half_weights=False)
    mods = dict(ref.named_modules())
    for name, m in int8_model.named_modules():
        if isinstance(m, Int8Linear):
            lin = mods[name]
            assert type(lin) is nn.Linear, name
            lin.weight = nn.Parameter(m.qweight.double().mul(m.scale.double()[:, None]).float(),
                                      requires_grad=False)
    return ref


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == torch.float32 and a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("which", ["qwen3_compressed", "switch_compressed"])
def test_computes_the_dequantized_model(which, request, tmp_path, sixteen_bit) -> None:
    path = sixteen_bit(request.getfixturevalue(which), tmp_path / "m", torch.bfloat16)
    model = qmoe.load(path, int8_weights=True)
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    kinds = {n.rsplit(".", 1)[-1] for n in names}  # every attention projection and the head, in every layer
    cfg = model.config
    if which == "switch_compressed":
        assert {"q", "k", "v", "o", "lm_head"} <= kinds
        blocks = cfg.num_layers + cfg.num_decoder_layers  # encoder and decoder self-attention
        assert sum(n.endswith("SelfAttention.q") for n in names) == blocks
    else:
        assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}
        assert sum(n.endswith("q_proj") for n in names) == cfg.num_hidden_layers
    assert not any("router" in n or n.endswith("mlp.gate") for n in names)  # routers keep their weights
    linears = [n for n, m in model.named_modules() if type(m) is not Int8Linear and isinstance(m, nn.Linear)]
    if which == "switch_compressed":  # the routers' classifiers, and the dense FF's "wo" (wide_linears)
        assert linears and all(n.endswith(("router.classifier", ".wo")) for n in linears)
        assert model.shared.weight.dtype == torch.bfloat16  # the tied embedding keeps its 16-bit table
    else:
        assert linears == []  # Qwen3-MoE's router is no nn.Linear; everything else is quantized
    ref = _reference(path, model)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    _close(_logits(model, ids), _logits(ref, ids))  # a prompt: torch's GEMM
    one = ids[:1, :1]
    _close(_logits(model, one), _logits(ref, one))  # one token: the native kernel
    # and it is not the 16-bit model: the weights did move
    assert not torch.allclose(_logits(model, ids), _logits(qmoe.load(path), ids), atol=1e-6, rtol=0)
    qs = [m.qweight for m in model.modules() if isinstance(m, Int8Linear)]
    held = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if n.endswith(("qweight", "scale")))
    assert held == sum(q.numel() + 4 * q.shape[0] for q in qs)  # a byte a weight, a float32 scale a row


def test_generation_with_cache_matches_the_reference(qwen3_compressed) -> None:
    model = qmoe.load(qwen3_compressed, int8_weights=True)  # a float32 checkpoint quantizes too
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    ref = _reference(qwen3_compressed, model)
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_refused_where_it_cannot_apply(qwen3_compressed) -> None:
    with pytest.raises(ConfigError, match="int8_weights=True is a CPU path for float32 activations") as info:
        qmoe.load(qwen3_compressed, dtype=torch.bfloat16, int8_weights=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not device 'cuda'"):
        qmoe.load(qwen3_compressed, device="cuda", int8_weights=True)


def test_cli_flag_quantizes_the_compressed_model_only(qwen3_compressed, reference_of, capsys) -> None:
    """``qmoe eval --int8-weights`` scores the int8 load (its loss is the library's, and not the default
    one); ``qmoe generate --int8-weights --compare`` quantizes the compressed side only; a dense source is
    refused in one line."""
    import json

    from qmoe.cli import main
    from qmoe.evaluation import evaluate

    assert main(["eval", str(qwen3_compressed), "--samples", "8", "--json", "--int8-weights"]) == 0
    got = json.loads(capsys.readouterr().out)["loss"]
    want = evaluate((qmoe.load(qwen3_compressed, int8_weights=True), _tokenizer(qwen3_compressed)), samples=8)
    default = evaluate(str(qwen3_compressed), samples=8)
    assert got == pytest.approx(want.loss, abs=1e-6) and got != pytest.approx(default.loss, abs=1e-6)
    dense = reference_of(qwen3_compressed)
    argv = ["generate", str(qwen3_compressed), "--prompt", "In the beginning", "--max-new-tokens", "2",
            "--repeats", "1", "--compare", str(dense), "--int8-weights"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"  {dense}: " in err and "[dense float32]" in err
    assert re.search(rf"^  {re.escape(str(qwen3_compressed))}: .*\[int8 attention and head, float32, experts "
                     "compressed", err, re.MULTILINE), err
    assert main(["eval", str(dense), "--samples", "8", "--int8-weights"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--int8-weights quantizes the attention and head of a qmoe-compressed model" in err
    assert "is a dense model" in err and "\n" not in err


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
