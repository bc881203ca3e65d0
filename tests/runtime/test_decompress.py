"""qmoe decompress: the dense checkpoint loads in plain transformers (qmoe not imported) and computes what
the compressed model computes; bad output directories are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qmoe
from qmoe.errors import ConfigError
from qmoe.runtime.decompress import decompress

PLAIN = """
import sys, numpy as np, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
path, ids_file, out_file = sys.argv[1:]
ids = torch.from_numpy(np.load(ids_file))
cfg = AutoConfig.from_pretrained(path)
auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
model = auto.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    kw = {"decoder_input_ids": ids[:, :5]} if cfg.is_encoder_decoder else {}
    np.save(out_file, model(input_ids=ids, **kw).logits.numpy())
assert "qmoe" not in sys.modules, "plain transformers imported qmoe"
"""


# switch (13 s) in the slow tier, which CI runs too; the decoder stays in the fast tier
@pytest.mark.parametrize("fixture", [pytest.param("switch_compressed", marks=pytest.mark.slow),
                                     "qwen3_compressed"])
def test_decompressed_checkpoint_matches_the_compressed_model(fixture, request, tmp_path: Path):
    compressed = request.getfixturevalue(fixture)
    out = tmp_path / "dense"
    r = decompress(compressed, out, "fp32")
    assert r["expert_matrices"] > 0 and not (tmp_path / "dense.partial").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "ids.npy", ids.numpy())
    subprocess.run(
        [sys.executable, "-c", PLAIN, str(out), str(tmp_path / "ids.npy"), str(tmp_path / "y.npy")],
        check=True,
        timeout=300,
    )
    model = qmoe.load(compressed)
    with torch.no_grad():
        kw = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
        want = model(input_ids=ids, **kw).logits.numpy()
    got = np.load(tmp_path / "y.npy")
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_decompress_refuses_a_non_empty_output_and_an_unknown_dtype(switch_compressed, tmp_path: Path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty; choose a new --out directory"):
        decompress(switch_compressed, tmp_path / "taken")
    with pytest.raises(ConfigError, match="unknown --dtype 'int8'"):
        decompress(switch_compressed, tmp_path / "new", "int8")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()


def test_bf16_by_default_for_sources_without_a_recorded_dtype(qwen3_compressed, tmp_path: Path):
    from safetensors import safe_open

    cfg = json.loads((qwen3_compressed / "config.json").read_text())
    r = decompress(qwen3_compressed, tmp_path / "d")
    want = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}.get(cfg.get("dtype"), "bf16")
    assert r["dtype"] == want
    f = next((tmp_path / "d").glob("*.safetensors"))
    with safe_open(str(f), "pt") as s:
        key = next(k for k in s.keys() if ".experts." in k)
        assert s.get_tensor(key).dtype == getattr(
            torch, {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}[want]
        )


def test_families_lists_every_adapter_with_its_transformers_class(capsys):
    from qmoe.adapters import ADAPTERS
    from qmoe.cli import main

    assert main(["families"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(ADAPTERS)
    assert any(
        ln.startswith("qwen3_moe") and "Qwen3MoeForCausalLM" in ln and "gate_proj/up_proj/down_proj" in ln
        for ln in lines
    )
    assert any("SwitchTransformersForConditionalGeneration" in ln and "wi/wo" in ln for ln in lines)


def test_decompress_names_matrix_and_row(tmp_path, switch_compressed) -> None:
    """``qmoe decompress`` on a checkpoint whose first expert matrix was replaced by corrupt entries (crc32
    recomputed, so only the rule can catch them): the message names the tensor and the row."""
    import shutil

    from corrupt_corpus import corpus, expected, rebuild, row_bits

    from qmoe.codec import ROW_STATUS_TEXT, load_shard, save_shard
    from qmoe.errors import FormatError

    CORPUS = corpus()
    LABELS = sorted(CORPUS)

    picks = {}
    for label in LABELS:
        kind, msg = expected(CORPUS[label])
        for text in ROW_STATUS_TEXT.values():
            if kind == "error" and text in msg and "ternary" in label:
                picks.setdefault(text, label)
    assert len(picks) == len(ROW_STATUS_TEXT)
    for i, label in enumerate(picks.values()):
        src = tmp_path / f"src{i}"
        shutil.copytree(switch_compressed, src)
        shard_file = next(f for f in sorted(src.glob("*.safetensors")) if load_shard(f).encoded)
        shard = load_shard(shard_file)
        key = sorted(shard.encoded)[0]
        enc = rebuild(CORPUS[label], row_bits(CORPUS[label]))  # a copy: load_shard names its own
        save_shard(shard_file, shard.tensors, {**shard.encoded, key: enc}, metadata=shard.metadata)
        with pytest.raises(FormatError) as info:
            decompress(src, tmp_path / f"out{i}", "fp32")
        enc.name = key
        assert str(info.value).endswith(expected(enc)[1]), str(info.value)
        assert f"'{key}'" in str(info.value) and not (tmp_path / f"out{i}").exists()


def test_partial_folder_of_someone_else_is_refused_not_deleted(switch_compressed, tmp_path: Path) -> None:
    from qmoe.runtime.decompress import PARTIAL_MARKER

    theirs = tmp_path / "out.partial"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not left by qmoe decompress"):
        decompress(switch_compressed, tmp_path / "out", "fp32")
    assert (theirs / "thesis.tex").read_text() == "years of work"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / PARTIAL_MARKER).write_text("")
    link = tmp_path / "linked.partial"
    link.symlink_to(elsewhere)  # a symlink is refused even to a folder that looks like ours
    with pytest.raises(ConfigError, match="not left by qmoe decompress"):
        decompress(switch_compressed, tmp_path / "linked", "fp32")
    assert (elsewhere / PARTIAL_MARKER).exists()
    ours = tmp_path / "again.partial"  # an interrupted run of ours: replaced
    ours.mkdir()
    (ours / PARTIAL_MARKER).write_text("")
    (ours / "model-00001-of-00009.safetensors").write_text("half")
    decompress(switch_compressed, tmp_path / "again", "fp32")
    assert not ours.exists() and not (tmp_path / "again" / PARTIAL_MARKER).exists()


@pytest.mark.parametrize("name", ["../evil.safetensors", "/tmp/evil.safetensors", "sub/x.safetensors", ".."])
def test_index_shard_names_must_be_plain_file_names(switch_compressed, tmp_path: Path, name: str) -> None:
    import shutil

    from qmoe.errors import FormatError
    from qmoe.runtime.load import INDEX_FILE, check_dir

    src = tmp_path / "src"
    shutil.copytree(switch_compressed, src)
    index = json.loads((src / INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (src / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FormatError, match="not a plain file name"):
        check_dir(src)
    with pytest.raises(FormatError, match="not a plain file name"):
        decompress(src, tmp_path / "out", "fp32")
