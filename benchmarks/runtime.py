"""End-to-end runtime benchmark: generation speed and resident memory, compressed vs dense, side by side.

    python benchmarks/runtime.py                       # synthetic switch-base-8-sized model + tiny-switch
    python benchmarks/runtime.py --models synthetic --rounds 7 --new-tokens 32
    python benchmarks/runtime.py --models synthetic --device cuda --dtype bf16   # against bf16 on a GPU
    python benchmarks/runtime.py --models tiny-qwen3-moe,synthetic-32 --dtype fp32,bf16 --batch 1,8 \
        --compressed tiny-qwen3-moe=DIR                # issue 16: both dense dtypes, batch 1 and 8

Models:
- ``synthetic``: SwitchTransformers with switch-base-8's shape (d_model 768, d_ff 3072, 12+12 blocks, every
  other one MoE with 8 experts, vocabulary 32128; 620M parameters), random weights. Its compressed form is
  built here in under a minute by ``qmoe compress`` itself: every expert rounded to QMoE's ternary grid
  (``--method rtn``, 32 calibration samples, no evaluation pass) and entropy coded.
- ``synthetic-32``: the same with 32 experts per MoE layer, switch-base-32's shape (2.0B parameters, 8 GB of
  fp32, its 12 x 32 experts 7.3 GB): a model whose experts do not fit in the last-level cache. Compressed the
  same way (round to nearest: GPTQ on 384 experts would take hours on a CPU and random weights gain nothing
  from it).
- ``tiny-switch``, ``tiny-qwen3-moe``: the built-in models and their compressed forms (``--compressed
  NAME=DIR``, e.g. from ``qmoe compress tiny-qwen3-moe --out DIR``; else built with round to nearest).

``--dtype`` takes a list: one dense worker per dtype (fp32, bf16, fp16 in transformers), all interleaved with
the compressed one. ``--batch`` takes a list: batch b generates from b different prompts of the same length
(32-token windows of the Bible's validation books), so at b = 8 a MoE layer routes 8 different tokens.

Each model (dense fp32 via ``qmoe.sources.load_model``, compressed via ``qmoe.load``) lives in its own worker
process, with every weight paged in after loading (transformers maps safetensors lazily), so that each one's
resident set (RSS) is its own; the workers generate in alternation (interleaved rounds, greedy, exactly
``--new-tokens`` tokens from the same prompt) and the table shows medians. Tokens/s
counts the whole ``generate`` call (encoder pass included). Work files go to ``--work`` (kept between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = (
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness."
)
SYNTHETIC = dict(
    vocab_size=32128,
    d_model=768,
    d_kv=64,
    d_ff=3072,
    num_heads=12,
    num_layers=12,
    num_decoder_layers=12,
    num_sparse_encoder_layers=6,
    num_sparse_decoder_layers=6,
    num_experts=8,
    expert_capacity=64,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
SYNTHETIC_32 = {**SYNTHETIC, "num_experts": 32}
PROMPT_TOKENS = 32
# The same family at toy size: what ``benchmarks/gpu_check.sh --dry-run`` times under Triton's interpreter.
SYNTHETIC_TINY = {
    **SYNTHETIC,
    "vocab_size": 8192,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_sparse_encoder_layers": 1,
    "num_sparse_decoder_layers": 1,
    "num_experts": 4,
}


# -- building the checkpoints --------------------------------------------------------------------------
def build_synthetic(dense: Path, config: dict | None = None) -> None:
    import torch
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from qmoe.calib import bible_split
    from qmoe.calib.tokenizer import train_tokenizer

    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**(config or SYNTHETIC)))
    model.save_pretrained(dense)
    train_tokenizer(bible_split("train")).save_pretrained(dense)


def build_compressed(dense: Path, out: Path) -> None:
    """Round-to-nearest ternary experts through ``qmoe compress`` itself (RTN needs no Hessians, so a few
    calibration samples suffice and no evaluation pass is run)."""
    from qmoe.config import CompressConfig
    from qmoe.pipeline import compress

    shutil.rmtree(out, ignore_errors=True)
    compress(str(dense), str(out), CompressConfig(method="rtn", calib_samples=32, eval=False), progress=False)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def expert_bytes(path: Path) -> tuple[int, int]:
    """(encoded expert bytes, expert weights) of a compressed directory, from the shards' headers."""
    import qmoe

    model = qmoe.load(path)
    from qmoe.runtime.experts import CompressedExperts

    mods = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    nbytes = sum(m.nbytes for m in mods)
    weights = sum(m.num_experts * sum(r * c for r, c in m.shapes.values()) for m in mods)
    return nbytes, weights


# -- worker: one loaded model, generating on request ----------------------------------------------------
def worker(
    source: str,
    threads: int | None,
    clock: str,
    device: str = "cpu",
    dtype: str = "fp32",
    backend: str | None = None,
) -> None:
    import numba
    import psutil
    import torch

    from qmoe.runtime.generate import generate
    from qmoe.sources import load_model

    if threads:
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model, tokenizer, _ = load_model(source, dtype=torch_dtype, device=device, backend=backend)
    with torch.no_grad():  # page every weight in: transformers maps checkpoints lazily, and a weight left on
        for p in model.parameters():  # disk would be read during the timed generation
            p.view(-1)[:: max(1, 4096 // p.element_size())].sum()
    load_s = time.perf_counter() - t
    rss_load = proc.memory_info().rss
    generate(model, tokenizer, PROMPT, max_new_tokens=2, exact=True)  # warm up: kernels compiled, pages in
    print(
        json.dumps(
            {
                "rss_base": rss0,
                "rss_load": rss_load,
                "rss_warm": proc.memory_info().rss,
                "load_s": load_s,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    windows = prompt_windows(tokenizer)
    for line in sys.stdin:
        n, batch = (int(v) for v in line.split())
        cpu = time.process_time()
        if batch == 0:  # the historical single prompt
            g = generate(model, tokenizer, PROMPT, max_new_tokens=n, exact=True)
            tokens, wall, text = g.new_tokens, g.seconds, g.text
        else:
            tokens, wall, text = generate_batch(model, tokenizer, windows[:batch], n)
        seconds = wall if clock == "wall" else time.process_time() - cpu  # cpu: all threads' time
        rss = proc.memory_info().rss
        print(json.dumps({"tokens": tokens, "seconds": seconds, "text": text[:60], "rss": rss}), flush=True)


def prompt_windows(tokenizer, count: int = 8) -> list[list[int]]:
    """``count`` different prompts of PROMPT_TOKENS tokens each: consecutive windows of validation text."""
    from qmoe.calib import bible_split

    ids: list[int] = []
    for doc in bible_split("validation"):
        ids += tokenizer(doc)["input_ids"]
        if len(ids) >= count * PROMPT_TOKENS:
            break
    return [ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(count)]


def generate_batch(model, tokenizer, windows: list[list[int]], n: int) -> tuple[int, float, str]:
    """Greedy, exactly ``n`` new tokens for each prompt in one batch: (new tokens, seconds, first text)."""
    import torch

    ids = torch.tensor(windows)  # [B, PROMPT_TOKENS]: equal lengths, no padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - start
    skip = 1 if getattr(model.config, "is_encoder_decoder", False) else ids.shape[1]
    new = out[:, skip:]
    return int(new.numel()), seconds, tokenizer.decode(new[0], skip_special_tokens=True)


class Worker:
    def __init__(self, source: Path, threads: int | None, clock: str, args: argparse.Namespace,
                 dtype: str, cpu_kernel: str | None = None) -> None:
        argv = [
            sys.executable,
            __file__,
            "--clock",
            clock,
            "--device",
            args.device,
            "--dtype",
            dtype,
            *(["--backend", args.backend] if args.backend else []),
            *(["--threads", str(threads)] if threads else []),
            "--worker",
            str(source),
        ]
        env = {**os.environ, **({"QMOE_CPU_KERNEL": cpu_kernel} if cpu_kernel else {})}
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                  env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            self.p.kill()
            raise RuntimeError(f"worker for {self.p.args[-1]} failed (its traceback is above)")
        return json.loads(line)

    def generate(self, n: int, batch: int) -> dict:
        self.p.stdin.write(f"{n} {batch}\n")
        return self._read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def compare(name: str, dense: Path, compressed: Path, args: argparse.Namespace, batch: int = 0) -> dict:
    """One model at one batch size (0: the historical single prompt): every dense dtype and the compressed
    model, each in its own worker, generating in interleaved rounds."""
    rounds, new_tokens = args.rounds, args.new_tokens
    dtypes = args.dtype.split(",")
    label = f"dense {dtypes[0]}"
    workers: dict[str, Worker] = {}
    try:
        for dt in dtypes:
            workers[f"dense {dt}"] = Worker(dense, args.threads, args.clock, args, dt)
        workers["compressed"] = Worker(compressed, args.threads, args.clock, args, dtypes[0])
        for mode in filter(None, args.cpu_kernels.split(",")):  # the same model, another CPU kernel mode
            workers[f"compressed ({mode})"] = Worker(compressed, args.threads, args.clock, args, dtypes[0],
                                                     mode)
        runs: dict[str, list[dict]] = {k: [] for k in workers}
        for _ in range(rounds):  # interleaved: all see the same background load
            for k, w in workers.items():
                runs[k].append(w.generate(new_tokens, batch))
    finally:
        for w in workers.values():
            w.close()
    out = {"model": name, "device": args.device, "dtype": args.dtype, "dense": label, "batch": max(batch, 1)}
    for k, w in workers.items():
        tps = [r["tokens"] / r["seconds"] for r in runs[k]]
        out[k] = {
            "tokens_per_s": statistics.median(tps),
            "all_tokens_per_s": tps,
            "rss_load_mib": (w.info["rss_load"] - w.info["rss_base"]) / 2**20,
            "rss_mib": max(r["rss"] for r in runs[k]) / 2**20,
            "rss_base_mib": w.info["rss_base"] / 2**20,
            "load_s": w.info["load_s"],
            "sample": runs[k][-1]["text"],
        }
    out["ratio"] = out["compressed"]["tokens_per_s"] / out[label]["tokens_per_s"]
    out["modes"] = {k: out[k]["tokens_per_s"] for k in workers if k.startswith("compressed (")}
    out["ratios"] = {k: out["compressed"]["tokens_per_s"] / out[k]["tokens_per_s"] for k in workers
                     if k.startswith("dense")}
    out["disk_mib"] = {"dense": dir_bytes(dense) / 2**20, "compressed": dir_bytes(compressed) / 2**20}
    nbytes, weights = expert_bytes(compressed)
    out["experts"] = {
        "encoded_mib": nbytes / 2**20,
        "dense_fp32_mib": 4 * weights / 2**20,
        "bits_per_weight": 8 * nbytes / weights,
    }
    return out


def table_dtypes(results: list[dict], args: argparse.Namespace) -> str:
    """Tokens/s of every worker and compressed / dense speed ratios (> 1: compressed faster)."""
    dts = [f"dense {d}" for d in args.dtype.split(",")]
    lines = [
        f"median of {args.rounds} interleaved rounds, {args.new_tokens} new tokens per prompt, greedy; clock "
        f"{args.clock}, threads {args.threads or 'default'}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores",
        "| model | batch | " + " | ".join(f"{d} tok/s" for d in dts) + " | compressed tok/s | "
        + " | ".join(f"speed vs {d}" for d in dts) + " | RSS " + " / ".join(dts) + " / compressed MiB |",
        "|---|---|" + "---|" * (2 * len(dts) + 2),
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['batch']} | " + " | ".join(f"{r[d]['tokens_per_s']:.2f}" for d in dts)
            + f" | {r['compressed']['tokens_per_s']:.2f} | "
            + " | ".join(f"{r['ratios'][d]:.2f}x" for d in dts)
            + " | " + " / ".join(f"{r[k]['rss_mib']:.0f}" for k in [*dts, "compressed"]) + " |"
        )
    for r in results:
        for k, v in r.get("modes", {}).items():
            lines.append(f"{r['model']} batch {r['batch']}: {k} {v:.2f} tok/s (default mode "
                         f"{r['compressed']['tokens_per_s']:.2f})")
    return "\n".join(lines)


def table(results: list[dict], args: argparse.Namespace) -> str:
    if "," in args.dtype or args.batch:
        return table_dtypes(results, args)
    threads = args.threads or "default"
    lines = [
        f"median of {args.rounds} interleaved rounds, {args.new_tokens} new tokens each, greedy; clock "
        f"{args.clock}, threads {threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "cores",
        f"| model | dense {args.dtype} tok/s ({args.device}) | compressed tok/s | ratio | RSS dense MiB | "
        "RSS compressed MiB | "
        "experts fp32 -> encoded MiB (bits/w) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, c, e = r[r["dense"]], r["compressed"], r["experts"]
        lines.append(
            f"| {r['model']} | {d['tokens_per_s']:.2f} | {c['tokens_per_s']:.2f} | "
            f"{r['ratio']:.2f}x | "
            f"{d['rss_mib']:.0f} (+{d['rss_load_mib']:.0f} at load) | "
            f"{c['rss_mib']:.0f} (+{c['rss_load_mib']:.0f} at load) | "
            f"{e['dense_fp32_mib']:.0f} -> {e['encoded_mib']:.1f} ({e['bits_per_weight']:.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="synthetic,tiny-switch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qmoe-bench-runtime"))
    ap.add_argument("--tiny-compressed", type=Path, help="a compressed tiny-switch (e.g. from qmoe compress)")
    ap.add_argument("--compressed", action="append", default=[], metavar="NAME=DIR",
                    help="a compressed form of model NAME to use (repeatable)")
    ap.add_argument("--batch", default="", help="batch sizes, e.g. 1,8 (default: the historical prompt)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--threads", type=int, help="torch and numba threads per worker (default: theirs)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: the worker's CPU time over all threads, i.e. the work "
        "done, unaffected by other processes on a shared machine (use with --threads 1)",
    )
    ap.add_argument("--device", default="cpu", help="where both models run (cpu, cuda)")
    ap.add_argument(
        "--dtype",
        default="fp32",
        help="the dense model's dtype (and the compressed one's non-expert weights): fp32, bf16 or fp16; a "
        "comma list runs one dense worker per dtype (the compressed one then uses the first)",
    )
    ap.add_argument(
        "--backend", default=None, help="kernel backend of the compressed experts (default by device)"
    )
    ap.add_argument("--cpu-kernels", default="", help="also time the compressed model with these CPU kernel "
                    "modes (QMOE_CPU_KERNEL: numba, native, auto), e.g. numba")
    ap.add_argument("--prepare-only", action="store_true", help="build the checkpoints, time nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.threads, args.clock, args.device, args.dtype, args.backend)
    results = []
    given = dict(item.split("=", 1) for item in args.compressed)
    if args.tiny_compressed:
        given.setdefault("tiny-switch", str(args.tiny_compressed))
    configs = {"synthetic": SYNTHETIC, "synthetic-32": SYNTHETIC_32, "synthetic-tiny": SYNTHETIC_TINY}
    for name in args.models.split(","):
        if name in configs:
            dense = args.work / f"{name}-dense"
            if not (dense / "config.json").is_file():
                print(f"building {dense} ...", file=sys.stderr)
                build_synthetic(dense, configs[name])
        elif name in ("tiny-switch", "tiny-qwen3-moe"):
            from qmoe.sources import resolve_source

            dense = resolve_source(name)
        else:
            raise SystemExit(f"unknown model {name!r}")
        compressed = Path(given[name]) if name in given else args.work / f"{name}-compressed"
        if not (compressed / "config.json").is_file():
            print(f"compressing into {compressed} ...", file=sys.stderr)
            t = time.perf_counter()
            build_compressed(dense, compressed)
            print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if args.prepare_only:
            continue
        for batch in [int(b) for b in args.batch.split(",")] if args.batch else [0]:
            print(f"timing {name} at batch {max(batch, 1)} ...", file=sys.stderr)
            results.append(compare(name, dense, compressed, args, batch))
            print(json.dumps(results[-1], indent=1), file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
