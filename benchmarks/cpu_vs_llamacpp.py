"""CPU inference of qmoe against llama.cpp (and dense bf16 transformers) on a model with real MoE shapes.

    python benchmarks/cpu_vs_llamacpp.py [--layers 6] [--reps 5] [--threads 2] [--json FILE]
        [--llama F16 IQ1_S TQ1_0 IQ2_XXS] [--qmoe ternary 2] [--dense bf16] [--calib-samples 64]
        [--build-nice 19] [--prepare-only] [--profile] [--qmoe-stream] [--qmoe-int8] [--qmoe-fp32]
        [--qmoe-bf16] [--worker-env readme|current]

The model: ``benchmarks/realshape.py``, Qwen3-30B-A3B's layer shapes (hidden 2048, 32/4 heads of 128, 128
experts of 768, top-8) with ``--layers`` layers, random bf16 weights and tiny-qwen3-moe's 8,192-token
vocabulary. Everything is built once and cached under ``~/.cache/qmoe-bench`` (``$QMOE_BENCH_CACHE``);
llama.cpp's build and Python environment are peers.py's (``benchmarks/peerlib/envs.py``, under
``~/.cache/qmoe-peers``). What is built, each step resumable:

- llama.cpp: ``convert_hf_to_gguf.py`` -> F16 GGUF; ``llama-imatrix`` on ``--imatrix-chunks`` chunks of 512
  tokens of the project's calibration text (the Bible's calibration books, as peers.py); ``llama-quantize``
  to each ``--llama`` type (llama.cpp's own per-tensor mix; IQ1_S and IQ2_XXS with the importance matrix);
- qmoe: ``qmoe compress`` ternary (the default) and ``--bits 2``, each on ``--calib-samples`` windows of
  128 tokens, no evaluation pass, and by default ``--method rtn --rate 0``: the default recipe's grid and
  entropy code, every weight rounded to its row's nearest level (QMoE's own rounding) instead of GPTQ with
  entropy-constrained rounding, and ``--tune none`` (the tuning stage changes values of the norms and the
  attention, not their cost; it held the whole 128-expert layer for four passes). Random weights make
  quality meaningless here; what the runtime pays for is the stored stream (bits/weight, reported). Why
  not the full default: on the shared, loaded 2-core machine GPTQ did not finish one layer of 128 experts
  of 2048x768 in 13 minutes, and rate 0.05's price fitting (``qmoe.gptq.rate.fit_prices``, 9 whole-layer
  passes) not in 30 (``--method gptq --rate 0.05`` runs them).

What is measured, the same way for every tool, at batch 1 on ``--threads`` threads, each measurement in a
fresh process, tools interleaved (every repetition runs every tool once, in a rotated order):

- llama.cpp: ``llama-bench -p P -n G -d P -r 1 -t T``, i.e. prompt processing of P tokens (one batch) and
  generation of G tokens one at a time, both after a context of P tokens (``-d``: "G tokens after a P-token
  prompt"), after llama-bench's own warm-up run;
- qmoe and dense transformers: the same in a worker (``--worker``): load, one warm-up (a P-token prompt and
  2 tokens), then P prompt tokens in one forward after a P-token context, and G greedy single-token forwards
  after a P-token prompt (a plain loop over ``model(...)`` with transformers' DynamicCache; only the last
  position's logits computed, as llama.cpp does), twice: the first pass is the process's first generation,
  which meets most experts for the first time (qmoe decodes each ternary expert into column lists then,
  ``qmoe.kernels.lists``), the second, over the same tokens, the steady state that a longer generation
  reaches and that llama-bench measures after its warm-up: the table's generation column;
- peak RSS: the process's ``ru_maxrss`` from ``os.wait4`` (load and warm-up included; the mapped weight
  pages a process touched count, as they do for llama.cpp's mmap). The workers run in the environment the
  README's install command makes (``pip install -e . torch==2.13.0``, built once under the cache as
  ``venv-readme``; ``--worker-env current`` uses this interpreter instead): a development environment
  holds the test extra's triton, which ``torch._dynamo`` imports whenever it is installed (transformers
  imports torch._dynamo), 71 MiB of a CPU process that a user's install does not have. The prompt's token
  ids are made here, not in the worker, so that the corpus a worker would read to make them is not part
  of its memory (llama-bench makes its tokens without text too). The table's "imports" column is the
  peak resident memory of the worker's interpreter importing what a run imports (torch, numba,
  transformers and its masking code, qmoe's runtime), before any model or kernel is loaded.

The table reports medians over ``--reps`` with the min-max spread. ``--profile`` also profiles the decode
step of qmoe ternary and, with ``--qmoe-int8``, of its int8 variant (cProfile and per-module wall time
over G tokens) for docs/runtime.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import realshape  # noqa: E402
from peerlib import envs  # noqa: E402

LLAMA_TYPES = ("F16", "IQ1_S", "TQ1_0", "IQ2_XXS")
NEEDS_IMATRIX = {"IQ1_S", "IQ2_XXS", "IQ1_M", "IQ2_XS"}
QMOE_BITS = ("ternary", "2")
# llama.cpp's converter picks its pre-tokenizer by hashing the tokenizer; the built-in one (byte-level BPE
# with GPT-2's split) is not in its list. As in peerlib/workers/llamacpp_worker.py.
CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list, logfile: Path, nice: int = 0) -> float:
    """Run ``cmd`` (output appended to ``logfile``); SystemExit with its last lines if it fails."""
    cmd = [*(["nice", "-n", str(nice)] if nice else []), *map(str, cmd)]
    t0 = time.perf_counter()
    with open(logfile, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = " | ".join(logfile.read_text().splitlines()[-4:])
        raise SystemExit(f"{Path(cmd[0]).name} ... exited {r.returncode} (log {logfile}): {tail}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- building


def build_qmoe(src: Path, work: Path, bits: str, args: argparse.Namespace) -> Path:
    out = work / f"qmoe-{bits}-{args.method}-r{args.rate:g}-c{args.calib_samples}-untuned"
    if not (out / "qmoe_report.json").is_file():
        log(f"qmoe compress --bits {bits} -> {out} ...")
        cmd = [
            sys.executable,
            "-m",
            "qmoe",
            "compress",
            src,
            "--out",
            out,
            "--bits",
            bits,
            "--calib-samples",
            args.calib_samples,
            "--method",
            args.method,
            "--rate",
            args.rate,
            "--tune",
            "none",  # tuning changes norm and attention values, not what a token costs
            "--no-eval",
            "--quiet",
        ]
        s = run(cmd, work / "qmoe-compress.log", args.build_nice)
        log(f"  {s:.0f} s")
    return out


def calib_text(work: Path, chunks: int, tokenizer_dir: Path) -> Path:
    """About ``chunks`` x 512 tokens of the calibration books as plain text (for llama-imatrix)."""
    from transformers import AutoTokenizer

    from qmoe.calib import load_texts

    out = work / f"calib-{chunks}x512.txt"
    if not out.is_file():
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        parts, n = [], 0
        for doc in load_texts("calibration"):
            parts.append(doc)
            n += len(tok(doc)["input_ids"])
            if n > (chunks + 1) * 512:
                break
        out.with_suffix(".tmp").write_text("\n".join(parts))
        out.with_suffix(".tmp").replace(out)
    return out


def build_llama(src: Path, work: Path, types: list[str], args: argparse.Namespace) -> tuple[Path, dict]:
    """The llama-bench binary and ``{type: gguf}`` for ``types`` (each made once)."""
    tool = envs.setup_llamacpp(Path(args.cache), args.threads)
    bindir, lg = Path(tool.extra["bin"]), work / "llamacpp.log"
    f16 = work / "f16.gguf"
    if not f16.is_file():
        log(f"convert_hf_to_gguf -> {f16} ...")
        tmp = work / "f16.gguf.tmp"
        s = run(
            [tool.python, "-c", CONVERT, tool.extra["llama_dir"], src, "--outtype", "f16", "--outfile", tmp],
            lg,
            args.build_nice,
        )
        os.replace(tmp, f16)
        log(f"  {s:.0f} s")
    imat = work / f"imatrix-{args.imatrix_chunks}.gguf"
    if any(t in NEEDS_IMATRIX for t in types) and not imat.is_file():
        log(f"llama-imatrix ({args.imatrix_chunks} chunks of 512 tokens) -> {imat} ...")
        text = calib_text(work, args.imatrix_chunks, src)
        tmp = work / f"imatrix-{args.imatrix_chunks}.tmp.gguf"
        s = run(
            [
                bindir / "llama-imatrix",
                "-m",
                f16,
                "-f",
                text,
                "-o",
                tmp,
                "-c",
                512,
                "--chunks",
                args.imatrix_chunks,
                "-t",
                args.threads,
                "--no-ppl",
            ],
            lg,
            args.build_nice,
        )
        os.replace(tmp, imat)
        log(f"  {s:.0f} s")
    files = {"F16": f16}
    for t in types:
        if t == "F16":
            continue
        out = work / f"{t}.gguf"
        if not out.is_file():
            log(f"llama-quantize {t} -> {out} ...")
            tmp = work / f"{t}.gguf.tmp"
            cmd = [
                bindir / "llama-quantize",
                *(["--imatrix", imat] if t in NEEDS_IMATRIX else []),
                f16,
                tmp,
                t,
                args.threads,
            ]
            s = run(cmd, lg, args.build_nice)
            os.replace(tmp, out)
            log(f"  {s:.0f} s")
        files[t] = out
    return bindir / "llama-bench", {t: files[t] for t in types}


# ---------------------------------------------------------------------------------------------- measuring


def wait_rss(p: subprocess.Popen) -> int:
    """Wait for ``p``; its peak resident set in bytes (Linux reports ru_maxrss in KiB)."""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


def measure_llama(bench: Path, gguf: Path, args: argparse.Namespace) -> dict:
    cmd = [
        str(bench),
        "-m",
        str(gguf),
        "-p",
        str(args.prompt),
        "-n",
        str(args.gen),
        "-d",
        str(args.prompt),
        "-r",
        "1",
        "-t",
        str(args.threads),
        "-o",
        "json",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.stdout.read(), p.stderr.read()
    rss = wait_rss(p)
    if p.returncode:
        raise SystemExit(f"llama-bench failed on {gguf}: {err.strip().splitlines()[-1:]}")
    res = {"rss": rss}
    for b in json.loads(out):
        res["pp" if b["n_prompt"] else "tg"] = b["avg_ts"]
    return res


def measure_worker(kind: str, path: Path, args: argparse.Namespace, profile: bool = False) -> dict:
    cmd = [
        str(args.worker_python),
        __file__,
        "--worker",
        kind,
        str(path),
        "--ids",
        str(args.ids),
        "--threads",
        str(args.threads),
        "--prompt",
        str(args.prompt),
        "--gen",
        str(args.gen),
        *(["--profile"] if profile else []),
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    rss = wait_rss(p)
    if p.returncode:
        raise SystemExit(f"worker {kind} {path} exited {p.returncode} (its traceback is above)")
    return {**json.loads(out.strip().splitlines()[-1]), "rss": rss}


def prompt_ids(tokenizer, n: int) -> list[int]:
    """``2n`` tokens of validation text: an n-token context, then an n-token prompt."""
    from qmoe.calib import load_texts

    ids: list[int] = []
    for doc in load_texts("validation"):
        ids += tokenizer(doc)["input_ids"]
        if len(ids) >= 2 * n:
            return ids[: 2 * n]
    raise SystemExit(f"the validation split holds fewer than {2 * n} tokens")


def write_ids(src: Path, work: Path, n: int) -> Path:
    """The workers' token ids (``prompt_ids`` with the model's tokenizer) in ``work``, written once."""
    out = work / f"prompt-ids-{n}.json"
    if not out.is_file():
        from transformers import AutoTokenizer

        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(prompt_ids(AutoTokenizer.from_pretrained(src), n)))
        tmp.replace(out)
    return out


def readme_python(cache: Path) -> Path:
    """The interpreter of an environment made by the README's install command (``pip install -e .
    torch==2.13.0``: no test extra, no triton), built once under ``cache``."""
    venv = cache / "venv-readme"
    repo = HERE.parent
    envs._step(cache, "readme-venv", lambda lg: envs._venv(venv, ["-e", str(repo)], lg))
    return venv / "bin" / "python"


def runtime_rss(kind: str, args: argparse.Namespace) -> int:
    """Peak RSS of a worker's interpreter that imports what a run imports, before any model or kernel."""
    code = (
        "import numba, torch, transformers, transformers.masking_utils\n"
        "from transformers import AutoTokenizer, DynamicCache\n"
        + ("import qmoe, qmoe.runtime.load, qmoe.kernels.lists\n" if kind.startswith("qmoe") else "")
    )
    p = subprocess.Popen([str(args.worker_python), "-c", code])
    rss = wait_rss(p)
    if p.returncode:
        raise SystemExit(f"{args.worker_python} could not import the runtime (exit {p.returncode})")
    return rss


def worker(kind: str, path: str, args: argparse.Namespace) -> None:
    """One model in this process: warm up, then time P prompt tokens and G generated tokens (see above).
    Prints one JSON line."""
    import numba
    import torch
    from transformers import DynamicCache

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if kind == "qmoe-stream":  # every expert product from the coded stream: no column lists
        os.environ["QMOE_EXPERT_LISTS"] = "0"
    if kind.startswith("qmoe"):
        import qmoe

        # qmoe: the default load, non-expert weights (attention, embeddings, head) kept in the checkpoint's
        # bf16 and widened in registers, activations float32 (qmoe.runtime.half); qmoe-fp32: those weights
        # widened to float32 at load (the default before); qmoe-bf16: weights and activations bf16. The
        # experts compute in float32 in all three.
        # qmoe-int8: the attention and head Linears quantized to int8 at load (qmoe.runtime.int8).
        if kind == "qmoe-bf16":
            model = qmoe.load(path, dtype=torch.bfloat16)
        elif kind == "qmoe-int8":
            model = qmoe.load(path, int8_weights=True)
        else:
            model = qmoe.load(path, half_weights=False if kind == "qmoe-fp32" else None)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype={"bf16": torch.bfloat16}[kind]).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([json.loads(Path(args.ids).read_text())])  # [1, 2P], made by the parent
    if ids.shape != (1, 2 * args.prompt):
        raise SystemExit(f"{args.ids} holds {ids.shape[1]} token ids, not {2 * args.prompt}")
    ctx, prompt = ids[:, : args.prompt], ids[:, args.prompt :]

    def forward(x, cache):  # x [1, t] -> logits of the last position [1, V]
        return model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def context():  # a fresh cache holding the P-token context, and the token that follows it [1, 1]
        cache = DynamicCache(config=model.config)
        return forward(ctx, cache).argmax(-1, keepdim=True), cache

    def steps(n: int, nxt, cache) -> float:  # n greedy single-token forwards; seconds
        t = time.perf_counter()
        for _ in range(n):
            nxt = forward(nxt, cache).argmax(-1, keepdim=True)
        return time.perf_counter() - t

    with torch.inference_mode():
        t = time.perf_counter()
        steps(2, *context())  # warm-up: kernels compiled or loaded, pages in, allocator grown
        warm_s = time.perf_counter() - t
        _, cache = context()
        t = time.perf_counter()
        forward(prompt, cache)
        pp_s = time.perf_counter() - t
        # The first G tokens meet most experts for the first time (qmoe builds their column lists then,
        # qmoe.kernels.lists); the same G tokens again are the steady state a longer generation reaches.
        first_s = steps(args.gen, *context())
        tg_s = steps(args.gen, *context())
        out = {"pp": args.prompt / pp_s, "tg": args.gen / tg_s, "tg_first": args.gen / first_s,
               "load_s": load_s, "warm_s": warm_s}
        if kind.startswith("qmoe"):  # what the column lists hold after the two generations
            from qmoe.kernels import lists

            c = lists.cache()
            out["lists"] = {"matrices": len(c), "mib": c.used / 2**20} if c is not None else None
        if args.profile:
            out["profile"] = profile(model, context, steps, args.gen)
    print(json.dumps(out))


def profile(model, context, steps, n: int) -> dict:
    """Where a decode token's time goes, over ``n`` tokens after the context: wall time per module kind
    (forward hooks; the rest is the decoder's glue, norms, embedding and Python), then cProfile's top
    functions over another ``n`` tokens."""
    import cProfile
    import io
    import pstats

    from qmoe.runtime.experts import CompressedExperts

    mods = dict(model.named_modules())
    groups = {
        "attention (self_attn: q/k/v/o projections, norms, rotary, cache, sdpa)": [
            m for k, m in mods.items() if k.endswith("self_attn")
        ],
        "router (mlp.gate: linear, softmax, top-8)": [m for k, m in mods.items() if k.endswith("mlp.gate")],
        "experts (CompressedExperts: pairs, grouping, kernel calls, scatter)": [
            m for m in mods.values() if isinstance(m, CompressedExperts)
        ],
        "lm_head": [model.lm_head],
    }
    sums = dict.fromkeys(groups, 0.0)
    on = [False]

    def pre(m, args) -> None:
        m._qmoe_t0 = time.perf_counter()

    def post(label: str):
        def hook(m, args, out) -> None:  # returns None: the module's output stays as it is
            if on[0]:
                sums[label] += time.perf_counter() - m._qmoe_t0

        return hook

    for label, ms in groups.items():
        for m in ms:
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post(label))
    nxt, cache = context()
    on[0] = True
    total = steps(n, nxt, cache)
    on[0] = False
    nxt, cache = context()
    pr = cProfile.Profile()
    pr.enable()
    steps(n, nxt, cache)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20)
    per_token = {k: 1e3 * v / n for k, v in sums.items()}
    per_token["rest (decoder glue, norms, embedding, Python)"] = 1e3 * total / n - sum(per_token.values())
    return {"ms_per_token": 1e3 * total / n, "modules_ms_per_token": per_token, "cprofile": s.getvalue()}


# ---------------------------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict:
    out = {}
    for k in ("pp", "tg", "tg_first", "rss"):
        v = [r.get(k, r["tg"] if k == "tg_first" else None) for r in runs]  # llama-bench: warmed up
        out[k] = {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
    return out


def table(res: dict, meta: dict) -> str:
    ref = res.get("llama.cpp IQ1_S")
    dense = res.get("transformers dense bf16")
    lines = [
        f"`{meta['command']}`; {meta['machine']}; model {meta['model']}; median [min, max] of {meta['reps']} "
        f"interleaved repetitions, each a fresh process; load average {meta['load_before']} before, "
        f"{meta['load_after']} after",
        "",
        f"| tool | variant | expert bits/w | generation tok/s (tg{meta['gen']} @ d{meta['prompt']}) | "
        f"first generation of the process, tok/s | prompt tok/s (pp{meta['prompt']} @ d{meta['prompt']}) | "
        "peak RSS MiB | of which imports MiB | tg vs IQ1_S | pp vs IQ1_S | tg vs dense bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        tool, variant = name.split(" ", 1)
        cells = []
        for k in ("tg", "tg_first", "pp"):
            s = r["stats"][k]
            cells.append(f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]")
        rss = r["stats"]["rss"]["median"] / 2**20
        rel = [
            f"{r['stats'][k]['median'] / ref['stats'][k]['median']:.2f}x" if ref else "" for k in ("tg", "pp")
        ]
        if dense:
            rel.append(f"{r['stats']['tg']['median'] / dense['stats']['tg']['median']:.2f}x")
        else:
            rel.append("")
        bits = f"{r['bits']:.3f}" if r.get("bits") else ""
        runtime = f"{r['runtime_rss'] / 2**20:.0f}" if r.get("runtime_rss") else ""
        lines.append(
            f"| {tool} | {variant} | {bits} | {cells[0]} | {cells[1]} | {cells[2]} | {rss:.0f} | {runtime} | "
            f"{rel[0]} | {rel[1]} | {rel[2]} |"
        )
    return "\n".join(lines)


def expert_bits(kind: str, path: Path) -> float | None:
    """Stored bits per expert weight: qmoe from its report, llama.cpp from the GGUF's expert tensors."""
    if kind.startswith("qmoe"):
        rep = json.loads((path / "qmoe_report.json").read_text())
        return rep["totals"]["expert_bits_per_weight"]
    if kind == "llama.cpp":
        from peerlib.experts import GGUF_EXPERTS
        from peerlib.gguf_bytes import tensor_bytes

        stored = [b for b in tensor_bytes(path) if GGUF_EXPERTS.fullmatch(b.name)]
        return 8 * sum(b.total for b in stored) / sum(b.weights for b in stored)
    return 16.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--llama", nargs="*", default=list(LLAMA_TYPES), help="llama.cpp file types")
    ap.add_argument("--qmoe", nargs="*", default=list(QMOE_BITS), help="qmoe --bits settings")
    ap.add_argument(
        "--dense", nargs="*", default=["bf16"], choices=["bf16"], help="dense transformers dtypes"
    )
    ap.add_argument("--calib-samples", type=int, default=16, help="qmoe compress calibration windows")
    ap.add_argument(
        "--method", default="rtn", choices=["rtn", "gptq"], help="qmoe compress --method (see the docstring)"
    )
    ap.add_argument("--rate", type=float, default=0.0, help="qmoe compress --rate (see the docstring)")
    ap.add_argument("--imatrix-chunks", type=int, default=8, help="llama-imatrix chunks of 512 tokens")
    ap.add_argument("--cache", default=str(envs.default_cache()), help="llama.cpp build (peers.py's)")
    ap.add_argument("--build-nice", type=int, default=0, help="nice level of the build steps")
    ap.add_argument(
        "--qmoe-bf16", action="store_true", help="also qmoe ternary with its non-expert weights and "
        "activations in bf16 (qmoe.load(dtype=torch.bfloat16))"
    )
    ap.add_argument(
        "--qmoe-stream", action="store_true", help="also qmoe ternary with every expert product from the "
        "coded stream (QMOE_EXPERT_LISTS=0, the runtime before column lists)",
    )
    ap.add_argument(
        "--qmoe-int8", action="store_true", help="also qmoe ternary with its attention and head weights "
        "quantized to int8 at load (qmoe.load(int8_weights=True))",
    )
    ap.add_argument(
        "--qmoe-fp32", action="store_true", help="also qmoe ternary with its non-expert weights widened to "
        "float32 at load (qmoe.load(half_weights=False), the default before qmoe.runtime.half)"
    )
    ap.add_argument("--prepare-only", action="store_true", help="build everything, measure nothing")
    ap.add_argument("--profile", action="store_true", help="also profile qmoe's decode step (stderr)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--worker-env",
        choices=("readme", "current"),
        default="readme",
        help="where qmoe and dense workers run: the README's install (built once) or this interpreter",
    )
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], args)

    t0 = time.perf_counter()
    src = realshape.build(realshape.default_dir(args.layers), args.layers, log=log)
    work = src.parent / f"{src.name}-work"
    work.mkdir(exist_ok=True)
    variants: dict[str, tuple[str, Path]] = {}
    for bits in args.qmoe:
        variants[f"qmoe {'default ternary' if bits == 'ternary' else '2-bit'}"] = (
            "qmoe",
            build_qmoe(src, work, bits, args),
        )
    if args.llama:
        bench, files = build_llama(src, work, args.llama, args)
        variants.update({f"llama.cpp {t}": ("llama.cpp", f) for t, f in files.items()})
    if args.qmoe_bf16 and "ternary" in args.qmoe:
        variants["qmoe default ternary, bf16 non-expert weights"] = (
            "qmoe-bf16",
            variants["qmoe default ternary"][1],
        )
    if args.qmoe_stream and "ternary" in args.qmoe:
        ternary = variants["qmoe default ternary"][1]
        variants["qmoe default ternary, no column lists"] = ("qmoe-stream", ternary)
    if args.qmoe_int8 and "ternary" in args.qmoe:
        ternary = variants["qmoe default ternary"][1]
        variants["qmoe default ternary, int8 non-expert weights"] = ("qmoe-int8", ternary)
    if args.qmoe_fp32 and "ternary" in args.qmoe:
        variants["qmoe default ternary, float32 non-expert weights"] = (
            "qmoe-fp32",
            variants["qmoe default ternary"][1],
        )
    for dt in args.dense:
        variants[f"transformers dense {dt}"] = (dt, src)
    args.ids = write_ids(src, work, args.prompt)
    args.worker_python = Path(sys.executable) if args.worker_env == "current" else readme_python(src.parent)
    prepare_s = time.perf_counter() - t0
    log(f"prepared in {prepare_s:.0f} s")
    if args.prepare_only:
        return
    kinds = {kind for kind, _ in variants.values() if kind != "llama.cpp"}
    runtime = {k: min(runtime_rss(k, args) for _ in range(2)) for k in sorted(kinds)}
    names = list(variants)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    load_before = os.getloadavg()[0]
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotated: no tool always first
        for n in order:
            kind, path = variants[n]
            r = measure_llama(bench, path, args) if kind == "llama.cpp" else measure_worker(kind, path, args)
            runs[n].append(r)
            log(
                f"  rep {rep}: {n}: tg {r['tg']:.2f} tok/s, pp {r['pp']:.2f} tok/s, "
                f"RSS {r['rss'] / 2**20:.0f} MiB"
            )
    load_after = os.getloadavg()[0]
    res = {
        n: {"stats": summarize(runs[n]), "bits": expert_bits(*variants[n]), "path": str(variants[n][1]),
            "runtime_rss": runtime.get(variants[n][0]), "runs": runs[n]}
        for n in names
    }
    import torch

    meta = {
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace(
            "  ", " "
        ),
        "model": f"{src.name} (benchmarks/realshape.py)",
        "reps": args.reps,
        "threads": args.threads,
        "prompt": args.prompt,
        "gen": args.gen,
        "calib_samples": args.calib_samples,
        "imatrix_chunks": args.imatrix_chunks,
        "load_before": round(load_before, 2),
        "load_after": round(load_after, 2),
        "prepare_seconds": prepare_s,
        "torch": torch.__version__,
        "llama.cpp": envs.LLAMA_CPP_PYTHON,
        "worker_python": str(args.worker_python),
    }
    text = table(res, meta)
    print(text)
    profiles = {}
    if args.profile:  # each qmoe ternary variant with the column lists (the default and int8 attention)
        for n in names:
            kind, path = variants[n]
            if kind not in ("qmoe", "qmoe-int8") or "ternary" not in n:
                continue
            prof = profiles[n] = measure_worker(kind, path, args, profile=True)["profile"]
            print(f"\nqmoe decode profile ({n}): {prof['ms_per_token']:.1f} ms/token")
            for k, v in prof["modules_ms_per_token"].items():
                print(f"  {v:7.2f} ms  {k}")
            print(prof["cprofile"])
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": res, "profiles": profiles}, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
