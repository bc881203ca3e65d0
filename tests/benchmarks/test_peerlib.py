"""benchmarks/peerlib: exact padding for llama.cpp, GGUF byte accounting, expert read-back and writing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from peerlib.experts import unstack_gguf, write_variant
from peerlib.gguf_bytes import tensor_bytes
from peerlib.pad import crop, pad_qwen3_moe


def test_padding_keeps_the_function_and_the_expert_weights(tiny_qwen3_moe_dir: Path, tmp_path: Path):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "padded"
    widths = pad_qwen3_moe(tiny_qwen3_moe_dir, out, multiple=48)
    assert widths == {"hidden": 32, "hidden_padded": 48, "intermediate": 24, "intermediate_padded": 48}
    a = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert b.config.hidden_size == 48 and b.config.moe_intermediate_size == 48
    ids = torch.randint(3, 1000, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert la.abs().max() > 0.1  # logits that are not all zero
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)

    # the real corner of every padded expert matrix is the original, bit for bit; the rest is zero
    sa, sb = (
        load_file(str(next(tiny_qwen3_moe_dir.glob("*.safetensors")))),
        load_file(str(out / "model.safetensors")),
    )
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert sb[key].shape == (48, 48)
    np.testing.assert_array_equal(crop(sb[key], 32, 24), sa[key])
    assert not sb[key][32:].any() and not sb[key][:, 24:].any()


def test_padding_refuses_other_families(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="written for qwen3_moe, not 'mixtral'"):
        pad_qwen3_moe(tmp_path, tmp_path / "out")


def _gguf(path: Path, tensors: list[tuple[str, tuple[int, ...], int]], alignment: int = 32) -> list[int]:
    """A GGUF v3 file written from the spec: a string, an array and the alignment as key-values, then the
    tensors (numpy-order shapes, ggml type ids) with ``nbytes`` of filler each. Returns each data size."""
    sizes = {0: (1, 4), 1: (1, 2), 8: (32, 34), 19: (256, 50), 10: (256, 84)}

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kv = [
        s("general.architecture") + struct.pack("<I", 8) + s("qwen3moe"),
        s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.5, 1.0, 2.0),
        s("general.alignment") + struct.pack("<II", 4, alignment),
    ]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv)
    data, nbytes, offset = b"", [], 0
    for name, shape, t in tensors:
        block, size = sizes[t]
        n = int(np.prod(shape)) // block * size
        head += s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        head += struct.pack("<IQ", t, offset)
        chunk = bytes(range(256)) * (n // 256 + 1)
        pad = -n % alignment
        data += chunk[:n] + b"\0" * pad
        offset += n + pad
        nbytes.append(n)
    head += b"\0" * (-len(head) % alignment)
    path.write_bytes(head + data)
    return nbytes


def test_gguf_bytes_reads_the_header_as_written(tmp_path: Path):
    f = tmp_path / "m.gguf"
    tensors = [
        ("blk.0.ffn_gate_exps.weight", (2, 3, 256), 19),  # IQ1_S: 50 bytes per 256 weights
        ("blk.0.attn_norm.weight", (7,), 0),  # F32, 28 bytes: 4 bytes of alignment padding follow
        ("blk.0.ffn_down_exps.weight", (2, 256, 256), 10),  # Q2_K: 84 bytes per 256
        ("output.weight", (5, 64), 8),
    ]  # Q8_0
    nbytes = _gguf(f, tensors)
    got = tensor_bytes(f)
    assert [t.name for t in got] == [t[0] for t in tensors]
    assert [t.type for t in got] == ["IQ1_S", "F32", "Q2_K", "Q8_0"]
    assert [t.shape for t in got] == [t[1] for t in tensors]
    assert [t.data for t in got] == nbytes == [300, 28, 43008, 340]
    assert [t.padding for t in got] == [20, 4, 0, 12]
    # an entry: name (8 + len) + n_dims (4) + dims (8 each) + type (4) + offset (8)
    assert got[0].info == 8 + len("blk.0.ffn_gate_exps.weight") + 4 + 3 * 8 + 4 + 8
    assert 8 * got[0].data / got[0].weights == 1.5625 and 8 * got[2].data / got[2].weights == 2.625
    # the file is the header, padded to the 32-byte alignment, then every tensor's data and padding
    region = sum(t.data + t.padding for t in got)
    assert region == 300 + 20 + 28 + 4 + 43008 + 0 + 340 + 12
    header = f.stat().st_size - region
    assert header % 32 == 0 and header >= sum(t.info for t in got)


def test_gguf_bytes_rejects_other_files(tmp_path: Path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        tensor_bytes(f)


def test_unstack_gguf_names_every_expert():
    stacked = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # [E, out, in]
    out = unstack_gguf("blk.7.ffn_up_exps.weight", stacked)
    assert sorted(out) == [f"model.layers.7.mlp.experts.{e}.up_proj.weight" for e in range(3)]
    np.testing.assert_array_equal(out["model.layers.7.mlp.experts.2.up_proj.weight"], stacked[2])
    with pytest.raises(AssertionError, match="not a stacked expert tensor"):
        unstack_gguf("blk.7.attn_q.weight", stacked)


def test_write_variant_accounts_and_round_trips(tmp_path: Path):
    from safetensors.numpy import load_file

    w = {"model.layers.0.mlp.experts.0.gate_proj.weight": np.random.default_rng(0).normal(size=(4, 6))}
    write_variant(tmp_path / "v", w, {"expert_bytes": 9, "expert_weights": 24})
    info = json.loads((tmp_path / "v" / "info.json").read_text())
    assert info["expert_bits_per_weight"] == 3.0
    back = load_file(str(tmp_path / "v" / "experts.safetensors"))
    np.testing.assert_array_equal(
        back["model.layers.0.mlp.experts.0.gate_proj.weight"],
        w["model.layers.0.mlp.experts.0.gate_proj.weight"].astype(np.float32),
    )
    assert not list((tmp_path / "v").glob("*.tmp"))
    with pytest.raises(AssertionError, match="lacks the byte accounting"):
        write_variant(tmp_path / "w", w, {"expert_bytes": 9})


def test_saved_expert_bytes_counts_expert_tensors_with_their_header_entries(tmp_path: Path):
    from peerlib.workers.llmcompressor_worker import saved_expert_bytes
    from safetensors.numpy import save_file

    packed = np.zeros((8, 3), dtype=np.int32)  # 96 bytes
    scale = np.ones((8, 2), dtype=np.float32)  # 64 bytes
    save_file(
        {
            "model.layers.0.mlp.experts.1.up_proj.weight_packed": packed,
            "model.layers.0.mlp.experts.1.up_proj.weight_scale": scale,
            "model.layers.0.self_attn.q_proj.weight": np.ones((4, 4), dtype=np.float16),
        },
        str(tmp_path / "m.safetensors"),
    )
    total, parts, scale_data = saved_expert_bytes(tmp_path)
    assert scale_data == 64
    assert set(parts) == {"weight_packed", "weight_scale"}
    header_part = total - 96 - 64
    assert 2 * 60 < header_part < 2 * 200  # two JSON entries, not the attention tensor's


def _row(tool, variant, bits, delta, h=0.01, split="validation"):
    return {
        "tool": tool,
        "variant": variant,
        "expert_bits_per_weight": bits,
        "split": split,
        "delta": delta,
        "ci95": [delta - h, delta + h],
    }


def test_targets_name_a_dominating_peer_and_the_size_comparison():
    from peers import targets

    rows = [
        _row("qmoe", "qmoe default", 1.33, 0.11),
        _row("qmoe", "target 1.56", 1.56, 0.06),
        _row("llama.cpp", "IQ1_S", 1.5625, 0.9),
        _row("hqq", "HQQ 1-bit g64", 1.5, 3.5),
    ]
    (line,) = targets(rows)
    assert "not dominated" in line and "smallest peer HQQ 1-bit g64 1.500" in line
    assert "qmoe at that size: qmoe default 1.330 b/w +0.1100 beats all 1 peer variants" in line
    assert "0.89x" in line
    rows.append(_row("gptq", "GPTQ 1-bit", 1.2, 0.05))
    (line,) = targets(rows)
    assert "dominated by GPTQ 1-bit" in line and "no qmoe point at that size" in line
    rows = [
        _row("qmoe", "qmoe default", 1.33, 0.11),
        _row("qmoe", "target 1.56", 1.56, 0.06),
        _row("llama.cpp", "IQ1_S", 1.5625, 0.061),
    ]  # intervals overlap: not a win
    (line,) = targets(rows)
    assert "target 1.56 1.560 b/w +0.0600 does NOT beat" in line


def test_user_data_is_split_into_disjoint_calibration_and_evaluation_halves(tmp_path: Path):
    from peers import split_user_data

    from qmoe.calib import load_texts

    docs = [f"document number {i} " * 5 for i in range(9)]
    f = tmp_path / "mine.txt"
    f.write_text("\n\n".join(docs))
    calib, evaluation = split_user_data(str(f), tmp_path)
    a, b = load_texts(calib), load_texts(evaluation)
    assert len(a) == 5 and len(b) == 4 and not set(a) & set(b)
    assert sorted(a + b) == sorted(d.strip() for d in docs)
    f.write_text("one\n\ntwo")
    with pytest.raises(SystemExit, match="2 documents; need at least 4"):
        split_user_data(str(f), tmp_path)


def test_work_folder_is_named_from_the_model_never_inside_it(tmp_path: Path):
    import quality

    model = tmp_path / "checkpoints" / "my-moe"
    model.mkdir(parents=True)
    work = tmp_path / "work"
    assert quality.model_work_dir(work, str(model)) == work.resolve() / "my-moe"  # not work/<abs path>
    assert quality.model_work_dir(work, "tiny-switch") == work.resolve() / "tiny-switch"
    with pytest.raises(SystemExit, match="lies inside"):  # --work inside the checkpoint
        quality.model_work_dir(model / "runs", str(model))
    src = tmp_path / "repo" / "src"
    (src / "qmoe").mkdir(parents=True)
    with pytest.raises(SystemExit, match="lies inside"):  # never inside a source tree
        quality.model_work_dir(src / "qmoe", "tiny-switch")


def _sampled(tool: str, variant: str, bits: float, per_seed_shift: list[float], rng) -> dict:
    """A row with per-sample increases: ``shift`` nats per token plus noise, per seed (128 tokens each)."""
    tok = np.full(200, 128.0)
    inc = [s * tok + rng.normal(0, 0.5, tok.size) for s in per_seed_shift]
    delta = float(np.mean(inc, 0).sum() / tok.sum())
    return {
        "tool": tool,
        "variant": variant,
        "expert_bits_per_weight": bits,
        "split": "test",
        "delta": delta,
        "ci95": [delta - 0.001, delta + 0.001],
        "_inc": inc,
        "_tok": tok,
    }


def test_paired_difference_matches_a_direct_sum_over_common_seeds():
    from peers import paired

    rng = np.random.default_rng(0)
    a = _sampled("qmoe", "budget 1.25", 1.25, [0.05, 0.06, 0.07], rng)
    b = _sampled("llama.cpp", "IQ1_S", 1.5625, [0.08, 0.09], rng)
    c = paired(a, b)
    assert c["seeds"] == 2  # only the seeds both ran
    direct = (np.mean(a["_inc"][:2], 0) - np.mean(b["_inc"][:2], 0)).sum() / a["_tok"].sum()
    assert c["difference"] == pytest.approx(direct, abs=1e-12)
    assert c["difference"] == pytest.approx(-0.03, abs=0.002) and 0 < c["ci95"] < 0.01
    same = paired(a, a)
    assert same["difference"] == 0 and same["ci95"] == 0 and same["ratio"] == 1


def test_issue_targets_pair_qmoe_with_iq1s_and_name_dominating_peers():
    from peers import issue_targets

    rng = np.random.default_rng(1)
    rows = [
        _sampled("qmoe", "budget 1.25", 1.25, [0.05, 0.05], rng),
        _sampled("qmoe", "qmoe default 2-bit", 1.8, [0.03, 0.03], rng),
        _sampled("llama.cpp", "llama.cpp IQ1_S (imatrix)", 1.5625, [0.08, 0.08], rng),
        _sampled("llama.cpp", "llama.cpp IQ2_XXS (imatrix)", 2.0625, [0.04, 0.04], rng),
    ]
    iq1, dom, iq2, below = issue_targets(rows)
    assert "budget 1.25" in iq1 and iq1.endswith("-> smaller")
    # every qmoe point below IQ2_XXS's bits with a smaller mean increase is named with its verdict (budget
    # 1.25 is worse: not named)
    assert below.startswith("test: qmoe default 2-bit (1.800 b/w") and "vs IQ2_XXS (2.062 b/w" in below
    assert below.endswith("-> dominates")
    assert dom.endswith("none of 2")
    assert "fewer bits, smaller increase (paired) -> dominates" in iq2
    ratio = float(iq2.split("; ratio ")[1].split("x")[0])
    assert ratio == pytest.approx(0.03 / 0.04, abs=0.03)
    rows.append(_sampled("gptq", "GPTQ 1-bit", 1.2, [0.2, 0.2], rng))  # fewer bits, worse: no domination
    rows.append(_sampled("hqq", "HQQ 1.7-bit", 1.7, [0.01, 0.01], rng))  # dominates the 2-bit point
    _, dom, *_ = issue_targets(rows)
    assert "qmoe default 2-bit by HQQ 1.7-bit" in dom and "significant" in dom and "budget 1.25 by" not in dom
    # a point below IQ2_XXS's bits whose mean is smaller but whose paired interval reaches zero: named, and
    # said not to dominate (a split where it only ties is printed, not left out)
    iq2_row = next(r for r in rows if r["variant"] == "llama.cpp IQ2_XXS (imatrix)")
    wobble = 0.3 * (-1.0) ** np.arange(iq2_row["_tok"].size)  # per-sample differences of mean 0, sd 0.3
    close = {**iq2_row, "tool": "qmoe", "variant": "budget 1.6", "expert_bits_per_weight": 1.6,
             "_inc": [i - 0.0002 * iq2_row["_tok"] + wobble for i in iq2_row["_inc"]]}  # -0.0002 nats/token
    close["delta"] = iq2_row["delta"] - 0.0002
    lines = issue_targets([r for r in rows if r["tool"] != "hqq"] + [close])
    tie = [ln for ln in lines if ln.startswith("test: budget 1.6 ")]
    assert len(tie) == 1 and tie[0].endswith("-> does NOT dominate (paired)"), lines
