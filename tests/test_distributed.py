"""``torchrun --nproc-per-node 2 -m qmoe compress``: gloo on the CPU, the bytes of one process.

Every run is a subprocess with one thread per process (the bytes depend on the thread count, as in one
process). The models are tiny and the settings small, so each launch takes seconds; what is checked:

- two ranks write exactly the files one process writes (every file but the report, whose timings differ),
  on a decoder-only family with a shared expert, an odd number of experts (uneven split), a size target
  (whose search sums the ranks' byte counts) and evaluation streams;
- a rank that fails stops the job (no hang, even while the other rank waits in a collective) with one line
  naming the rank and the layer, and the rerun resumes after the last finished block with the same bytes;
- a distributed run killed outright (SIGKILL on every rank) and restarted writes the same bytes, on Switch
  (encoder-decoder: the decoder reads the encoder's output buffer).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from qmoe.pipeline.dist import local_launcher
from qmoe.pipeline.run import FAIL_ENV, KILL_ENV

pytestmark = pytest.mark.slow  # process launches: the slow tier (pytest -m slow; .ci/run runs it)

SMALL = ["--calib-samples", "16", "--seq-len", "32", "--eval-samples", "8", "--batch-size", "8", "--quiet"]


def _compress(src: Path, out: Path, args: list[str], ranks: int, env: dict[str, str] | None = None):
    launcher = local_launcher(ranks)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*launcher, "compress", str(src), "--out", str(out), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _why(r: subprocess.CompletedProcess) -> str:
    """The ranks' own stderr: torchrun's summary of a failed job (its last ~2000 characters) follows it."""
    return r.stderr.split("Traceback (most recent call last)")[0][-3000:] + r.stderr[-1500:]


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    differ = [n for n in names if n != "qmoe_report.json" and (a / n).read_bytes() != (b / n).read_bytes()]
    assert not differ, f"files differ: {differ}"


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    import shutil

    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(
        vocab_size=1024,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=5,
        num_experts_per_tok=2,
        intermediate_size=48,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=96,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    model = tf.Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(20)
            layer.mlp.experts.down_proj.mul_(20)
    path = tmp_path_factory.mktemp("qwen2-dist") / "dense"
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


QWEN2_ARGS = [*SMALL, "--shared-experts", "ternary", "--target-bits", "2.2"]


@pytest.fixture(scope="module")
def qwen2_one(qwen2_dir: Path) -> Path:
    out = qwen2_dir.parent / "one"
    r = _compress(qwen2_dir, out, QWEN2_ARGS, ranks=1)
    assert r.returncode == 0, _why(r)
    return out


def test_two_ranks_write_the_bytes_of_one_process(qwen2_dir: Path, qwen2_one: Path) -> None:
    out = qwen2_dir.parent / "two"
    r = _compress(qwen2_dir, out, QWEN2_ARGS, ranks=2)
    assert r.returncode == 0, _why(r)
    _same_files(qwen2_one, out)
    rep = json.loads((out / "qmoe_report.json").read_text())
    one = json.loads((qwen2_one / "qmoe_report.json").read_text())
    assert rep["ranks"] == 2 and one["ranks"] == 1
    assert rep["layers"][0]["tokens"] == one["layers"][0]["tokens"]
    assert rep["eval"]["sample_loss_compressed"] == one["eval"]["sample_loss_compressed"]
    assert r.stdout.count("wrote ") == 1  # rank 0 speaks for the job


def test_failing_rank_is_named_and_the_rerun_resumes(qwen2_dir: Path, qwen2_one: Path) -> None:
    out = qwen2_dir.parent / "failed"
    r = _compress(qwen2_dir, out, QWEN2_ARGS, ranks=2, env={FAIL_ENV: "1:model.layers.1.mlp"})
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("qmoe compress: error:")]
    # rank 1 says what failed where; rank 0 (waiting in a collective of the size search) is either stopped
    # by torchrun or says it lost a rank; torchrun names rank 1 as the root cause
    failed = "rank 1 of 2 failed at GPTQ of MoE layer model.layers.1.mlp: RuntimeError:"
    assert sum(failed in ln for ln in lines) == 1, _why(r)
    assert all(failed in ln or "rank 0 of 2 lost another rank" in ln for ln in lines)
    assert "rerun the same command to resume" in lines[0]
    assert not (out / "config.json").exists()  # no finished-looking output
    # every rank ends its process group before exiting (Dist.close); a gloo group left to interpreter exit
    # aborted ranks at random with this line, and SIGABRT, after successful (resumed) runs too
    assert "terminate called" not in r.stderr, _why(r)
    r = _compress(qwen2_dir, out, QWEN2_ARGS, ranks=2)
    assert r.returncode == 0, _why(r)
    assert json.loads((out / "qmoe_report.json").read_text())["resumed_from_block"] == 1
    _same_files(qwen2_one, out)


def _save_tiny_switch(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    """tests/conftest.py's builder (loaded by path: tests/runtime has a conftest of its own)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_qmoe_tests_conftest", Path(__file__).parent / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_tiny_switch(path, tokenizer_dir, **overrides)


def test_killed_distributed_run_restarts_to_the_same_bytes(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = _save_tiny_switch(tmp_path / "switch", tokenizer_dir, num_experts=5)
    args = [*SMALL, "--no-eval"]
    one = tmp_path / "one"
    assert _compress(src, one, args, ranks=1).returncode == 0
    out = tmp_path / "two"
    r = _compress(src, out, args, ranks=2, env={KILL_ENV: "after:2"})  # every rank SIGKILLs itself
    assert r.returncode != 0 and not (out / "config.json").exists()
    r = _compress(src, out, args, ranks=2)
    assert r.returncode == 0, _why(r)
    assert json.loads((out / "qmoe_report.json").read_text())["resumed_from_block"] == 3
    _same_files(one, out)


def test_expert_ranges_cover_every_expert_once() -> None:
    from qmoe.pipeline.dist import Dist

    for world in (1, 2, 3, 5, 8):
        for n in (world, 7, 16, 2048):
            ranges = [Dist(r, world).owned(n) for r in range(world)]
            assert [e for rg in ranges for e in rg] == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.timeout(1500)  # two whole compressions of the built-in model (each capped at 600 s below)
def test_builtin_tiny_switch_two_ranks_match_one_process(tmp_path: Path) -> None:
    """The issue's case: the built-in model, 1 process x 1 thread and 2 ranks x 1 thread, byte for byte; the
    report records the threads of every rank."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--eval-samples", "8", "--quiet"]
    for out, ranks in ((one, 1), (two, 2)):
        r = _compress("tiny-switch", out, args, ranks)  # type: ignore[arg-type]
        assert r.returncode == 0, _why(r)
    _same_files(one, two)
    for out, ranks in ((one, 1), (two, 2)):
        ex = json.loads((out / "qmoe_report.json").read_text())["execution"]
        assert ex["threads"] == 1 and ex["rank_threads"] == [1] * ranks, ex
