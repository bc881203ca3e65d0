"""Per-expert rates of every compression stage, measured on this machine, and what they imply for giant MoEs.

    OMP_NUM_THREADS=1 python benchmarks/scale.py [--shapes c2048] [--tokens 4096] [--read DIR] [--json FILE]

One thread, one expert (or one expert's worth) at a time, at the real sizes of each model's experts:

- ``hessian``: ``sum x x^T`` of ``--tokens`` routed tokens into the expert's ``[cols, cols]`` Hessian
  (``gptq.HessianAccumulator``), for each projection's input width;
- ``gptq``: one expert's projection quantized by GPTQ (ternary, QMoE's grid, block 128, act-order), per
  projection shape;
- ``rtn``: the same by round-to-nearest;
- ``encode``: entropy coding of its ternary codes (``codec.encode_ternary``, P(zero) ~ 0.9 as GPTQ gives);
- ``read``: with ``--read DIR``, the sequential read rate of a checkpoint's shards that are not in the page
  cache (it reads until 4 GiB, or the whole directory).

It prints each rate and, for switch-c-2048, DeepSeek-V3 and Qwen3-235B-A22B, the single-core time of each
stage and the memory a layer needs under qmoe's pipeline (docs/scale.md turns these into the capacity
plan). Each time is the median over ``--reps`` runs of the calling thread's CPU time (``time.thread_time``),
so other processes on a shared machine do not inflate it; reads are timed by the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

# Experts per MoE layer, MoE layers, each expert's projections as (rows, cols) in nn.Linear orientation
# (cols: the input width, the Hessian's size), routed experts per token, hidden size (model configs).
MODELS = {
    "switch-c-2048": {
        "experts": 2048,
        "layers": 30,
        "proj": [(6144, 2080), (2080, 6144)],
        "top_k": 1,
        "d": 2080,
    },
    "deepseek-v3": {
        "experts": 256,
        "layers": 58,
        "proj": [(2048, 7168), (2048, 7168), (7168, 2048)],
        "top_k": 8,
        "d": 7168,
    },
    "qwen3-235b-a22b": {
        "experts": 128,
        "layers": 94,
        "proj": [(1536, 4096), (1536, 4096), (4096, 1536)],
        "top_k": 8,
        "d": 4096,
    },
}


def _median_time(fn, reps: int) -> float:
    """Median CPU time of this thread over ``reps`` calls (one torch thread: the work itself, not the time
    other processes on a shared machine take from it)."""
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def hessian_rate(cols: int, tokens: int, reps: int) -> float:
    """Seconds to accumulate ``tokens`` tokens into one ``[cols, cols]`` Hessian."""
    from qmoe.gptq import HessianAccumulator

    x = torch.randn(tokens, cols)
    idx = torch.zeros(tokens, dtype=torch.int64)

    def run() -> None:
        HessianAccumulator(1, cols).add(idx, x)

    return _median_time(run, reps)


def gptq_time(rows: int, cols: int, tokens: int, reps: int) -> tuple[float, float, np.ndarray]:
    """(GPTQ s, RTN s, codes) for one expert ``[rows, cols]`` with a Hessian of ``tokens`` tokens."""
    from qmoe.gptq import HessianAccumulator, gptq_quantize, rtn_quantize

    g = torch.Generator().manual_seed(0)
    acc = HessianAccumulator(1, cols)
    x = torch.randn(tokens, cols, generator=g)
    acc.add(torch.zeros(tokens, dtype=torch.int64), x)
    W = torch.randn(1, rows, cols, generator=g) * cols**-0.5
    H = acc.H
    out = {}

    def run_gptq() -> None:
        out["q"] = gptq_quantize(
            W,
            H,
            grid="ternary",
            damp=0.1,
            block_size=128,
            act_order=True,
            counts=acc.counts,
            min_tokens=1,
            rate=0.05,
        )

    def run_rtn() -> None:
        rtn_quantize(W, grid="ternary")

    t_gptq = _median_time(run_gptq, reps)
    t_rtn = _median_time(run_rtn, reps)
    return t_gptq, t_rtn, out["q"].codes[0].numpy()


def encode_time(codes: np.ndarray, reps: int) -> float:
    from qmoe.codec import encode_ternary

    rows = codes.shape[0]
    lo, hi = -np.ones(rows, np.float32), np.ones(rows, np.float32)
    encode_ternary(codes[:8], lo[:8], hi[:8])  # compile the numba encoder outside the timing
    return _median_time(lambda: encode_ternary(codes, lo, hi), reps)


def read_rate(path: Path, limit: int = 4 << 30) -> tuple[float, int]:
    """(bytes/s, bytes) reading the shards of ``path`` in order with 64 MiB reads, until ``limit`` bytes."""
    files = sorted(path.glob("*.safetensors"))
    done, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                done += len(chunk)
        if done >= limit:
            break
    return done / (time.perf_counter() - t0), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens per expert in its Hessian")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--read", default=None, help="a checkpoint directory to time cold sequential reads on")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    print(f"threads 1 (torch {torch.__version__}), {os.cpu_count()} cores; tokens per expert {args.tokens}")
    rates: dict[str, dict] = {}
    for name in args.models.split(","):
        spec = MODELS[name]
        per = {"hessian_s": 0.0, "gptq_s": 0.0, "rtn_s": 0.0, "encode_s": 0.0, "weights": 0, "proj": []}
        seen_cols: dict[int, float] = {}
        for rows, cols in spec["proj"]:
            if cols not in seen_cols:  # projections sharing an input share one Hessian
                seen_cols[cols] = hessian_rate(cols, args.tokens, args.reps)
                per["hessian_s"] += seen_cols[cols]
            t_gptq, t_rtn, codes = gptq_time(rows, cols, args.tokens, args.reps)
            t_enc = encode_time(codes, args.reps)
            per["gptq_s"] += t_gptq
            per["rtn_s"] += t_rtn
            per["encode_s"] += t_enc
            per["weights"] += rows * cols
            zeros = float((codes == 0).mean())
            per["proj"].append(
                {
                    "rows": rows,
                    "cols": cols,
                    "gptq_s": t_gptq,
                    "rtn_s": t_rtn,
                    "encode_s": t_enc,
                    "hessian_s": seen_cols[cols],
                    "zero_fraction": zeros,
                }
            )
            print(
                f"{name} {rows}x{cols}: hessian {seen_cols[cols]:.3f} s, gptq {t_gptq:.2f} s, "
                f"rtn {t_rtn:.3f} s, encode {t_enc:.3f} s ({rows * cols / t_enc / 1e6:.0f} M weights/s), "
                f"zeros {zeros:.2f}",
                flush=True,
            )
        rates[name] = per
    if args.read:
        rate, nbytes = read_rate(Path(args.read))
        rates["read"] = {"bytes_per_s": rate, "bytes": nbytes}
        print(f"read {args.read}: {rate / 1e9:.2f} GB/s over {nbytes / 1e9:.1f} GB")

    print()
    print(
        "| model | experts x layers | per expert: Hessians / GPTQ / RTN / encode (s) | one core, whole "
        "model: Hessians + GPTQ + encode | host memory per layer (weights fp32 + Hessians) |"
    )
    print("|---|---|---|---|---|")
    for name, per in rates.items():
        if name == "read":
            continue
        spec = MODELS[name]
        n = spec["experts"] * spec["layers"]
        total_h = n * (per["hessian_s"] + per["gptq_s"] + per["encode_s"]) / 3600
        w_bytes = 4 * spec["experts"] * per["weights"]
        h_bytes = 4 * spec["experts"] * sum(c * c for c in {c for _, c in spec["proj"]})
        print(
            f"| {name} | {spec['experts']} x {spec['layers']} | {per['hessian_s']:.2f} / "
            f"{per['gptq_s']:.2f} / {per['rtn_s']:.2f} / {per['encode_s']:.2f} | {total_h:,.0f} h | "
            f"{w_bytes / 2**30:.0f} GiB + {h_bytes / 2**30:.0f} GiB |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "rates": rates}, indent=1) + "\n")


if __name__ == "__main__":
    main()
