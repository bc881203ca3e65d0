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
        "attn": 24e6,  # per MoE block: encoder self, decoder self + cross, 4 x 2080 x 1920 each, averaged
    },
    "deepseek-v3": {
        "experts": 256,
        "layers": 58,
        "proj": [(2048, 7168), (2048, 7168), (7168, 2048)],
        "top_k": 8,
        "d": 7168,
        "attn": 187e6,  # MLA: q_a/q_b, kv_a/kv_b, o
    },
    "qwen3-235b-a22b": {
        "experts": 128,
        "layers": 94,
        "proj": [(1536, 4096), (1536, 4096), (4096, 1536)],
        "top_k": 8,
        "d": 4096,
        "attn": 71e6,  # 64 query heads and 4 KV heads of 128, o
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


# --- the capacity plan: stated GPU assumptions (sources in docs/scale.md) ---------------------------------
GPUS = {  # name: (FP32 non-tensor peak FLOP/s, memory bytes)
    "H100-80GB": (67e12, 80e9),  # NVIDIA H100 SXM datasheet: FP32 67 TFLOPS, 80 GB HBM3 (3.35 TB/s)
    "H200-141GB": (67e12, 141e9),  # NVIDIA H200 SXM datasheet: same compute, 141 GB HBM3e (4.8 TB/s)
}
EFFICIENCY = 0.25  # optimistic end: GPTQ's mix of GEMMs, Cholesky and per-column steps at 25% of FP32 peak
# Conservative end: QMoE's own measurement, switch-c-2048 (61,440 experts) in under a day on one RTX A6000
# (38.7 TFLOPS FP32), i.e. 1.4 s per c2048 expert for everything; scaled by FLOPs per expert and FP32 peak.
QMOE_S_PER_C2048_EXPERT, A6000_FP32 = 24 * 3600 / 61_440, 38.7e12
NVME, LINK = (
    5e9,
    50e9,
)  # bytes/s: one node's checkpoint reads; one rank's share of an inter-node link (400 Gb/s)
TOKENS = 4096  # mean calibration tokens per expert (QMoE used ~2.5k on c2048)


def flops_per_expert(spec: dict) -> float:
    """Hessians (2 t c^2 per distinct input width) + GPTQ per projection group (c^3 for the inverse, 4 r c^2
    for the updates and the objective); the first projections are one fused group, as the pipeline runs."""
    first = [p for p in spec["proj"] if p[1] == spec["d"]]
    second = [p for p in spec["proj"] if p[1] != spec["d"]]
    groups = [(sum(r for r, _ in first), spec["d"]), *second]
    hessians = sum(2 * TOKENS * c * c for c in {c for _, c in spec["proj"]})
    return hessians + sum(c**3 + 4 * r * c * c for r, c in groups)


def _gpus(hours: float, min_ranks: int | None, compute: float, fixed: float, gather: float) -> str:
    """Fewest ranks (>= the memory minimum) whose conservative compute share plus what every rank does
    whole (reading, the replicated attention passes: ``fixed``; the output exchange) fits in ``hours``."""
    if min_ranks is None:
        return "no (layer too large)"
    for k in range(min_ranks, 4097):
        if compute / k + fixed + (gather if k > 1 else 0) <= hours * 3600:
            return str(k)
    return "> 4096"


def sizes(spec: dict) -> tuple[int, int, int, int]:
    """(experts in all, weights per expert, one layer's expert bytes in fp32, its Hessians' bytes in fp32)."""
    w = sum(r * c for r, c in spec["proj"])
    hess = 4 * spec["experts"] * sum(c * c for c in {c for _, c in spec["proj"]})
    return spec["experts"] * spec["layers"], w, 4 * spec["experts"] * w, hess


def plan(rates: dict) -> None:
    """Print the capacity plan's tables (docs/scale.md) from measured CPU rates and the GPU assumptions."""
    ref = flops_per_expert(MODELS["switch-c-2048"])
    print(
        "\n| model | experts in all | expert weights (bf16) | layer fp32 | layer Hessians fp32 | FLOP/expert "
        "| CPU core-hours (measured rates) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, spec in MODELS.items():
        n, w, layer, hess = sizes(spec)
        per = rates.get(name)
        cpu = f"{n * (per['hessian_s'] + per['gptq_s'] + per['encode_s']) / 3600:,.0f}" if per else "-"
        print(
            f"| {name} | {n:,} | {2 * n * w / 1e12:.2f} TB | {layer / 1e9:.0f} GB "
            f"| {hess / 1e9:.0f} GB | {flops_per_expert(spec) / 1e12:.2f} T | {cpu} |"
        )
    print(
        "\n| model | GPU | per expert: optimistic / conservative | one GPU: optimistic / conservative "
        "| memory: (2 x layer fp32 + Hessians) / ranks | not split: reads + replicated attention; exchange "
        "| GPUs for 24 h | GPUs for 2 h |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, spec in MODELS.items():
        n, w, layer, hess = sizes(spec)
        f = flops_per_expert(spec)
        for gpu, (peak, mem) in GPUS.items():
            opt = f / (EFFICIENCY * peak)
            con = QMOE_S_PER_C2048_EXPERT * (f / ref) * (A6000_FP32 / peak)
            read = 2 * n * w / NVME  # each node reads every expert once
            tokens = TOKENS * spec["experts"] / spec["top_k"]  # calibration tokens for TOKENS per expert
            # Every rank runs every batch through attention and routers: 2 Hessian passes + 2 propagations.
            replicated = 4 * spec["layers"] * tokens * 2 * spec["attn"] / (EFFICIENCY * peak)
            # ... and receives every expert output of the propagations (calibration + evaluation ~ 2 passes).
            gather = 2 * spec["layers"] * tokens * spec["top_k"] * spec["d"] * 4 / LINK
            # per rank: its experts in fp32 twice (original, quantized), its Hessians, 2 GB for the rest
            min_ranks = next(
                (k for k in (1, 2, 4, 8, 16, 32, 64, 128) if (2 * layer + hess) / k + 2e9 <= mem), None
            )
            fits = (
                "> 128 ranks" if min_ranks is None else f"from {min_ranks} rank{'s' if min_ranks > 1 else ''}"
            )
            need = [_gpus(h, min_ranks, n * con, read + replicated, gather) for h in (24, 2)]
            print(
                f"| {name} | {gpu} | {opt:.3f} / {con:.2f} s | {n * opt / 3600:.1f} / {n * con / 3600:.1f} h "
                f"| {fits} | {(read + replicated) / 60:.0f} min; {gather / 60:.0f} min "
                f"| {need[0]} | {need[1]} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens per expert in its Hessian")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--read", default=None, help="a checkpoint directory to time cold sequential reads on")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--plan",
        default=None,
        metavar="RATES_JSON",
        help="print the capacity plan from a --json file of an earlier run (measures nothing)",
    )
    args = ap.parse_args()
    if args.plan:
        plan(json.loads(Path(args.plan).read_text())["rates"])
        return

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
        n, _, w_bytes, h_bytes = sizes(spec)
        total_h = n * (per["hessian_s"] + per["gptq_s"] + per["encode_s"]) / 3600
        print(
            f"| {name} | {spec['experts']} x {spec['layers']} | {per['hessian_s']:.2f} / "
            f"{per['gptq_s']:.2f} / {per['rtn_s']:.2f} / {per['encode_s']:.2f} | {total_h:,.0f} h | "
            f"{w_bytes / 2**30:.0f} GiB + {h_bytes / 2**30:.0f} GiB |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "rates": rates}, indent=1) + "\n")


if __name__ == "__main__":
    main()
