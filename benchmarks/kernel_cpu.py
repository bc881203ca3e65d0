"""CPU kernel benchmark: fused decode-matmul on entropy-coded matrices vs torch's dense fp32 / bf16 / fp16
matmul, with the matrices in cache and in memory.

    python benchmarks/kernel_cpu.py                  # all shapes, batch 1 and 8, ternary and int2
    python benchmarks/kernel_cpu.py --quick          # 768x3072 and 2080x6144, ternary
    python benchmarks/kernel_cpu.py --clock cpu      # 1 thread each, CPU time of the calling thread
    python benchmarks/kernel_cpu.py --json runs/kernel_cpu.json
    python benchmarks/kernel_cpu.py --formats         # format version 2 vs 1: parse and kernel, same matrices

Random codes with P(background) = 0.885 (QMoE's ternary sparsity; for int2 the other three codes share the
rest), per-row fp16 levels. Dense = ``x @ W.T`` with W contiguous ``[rows, cols]``; qmoe =
``qmoe.kernels.matmul(enc, x)`` with the CPU kernel in each mode: ``numba``, ``native`` (cpu_lanes.c, rows
decoded across AVX2 lanes) and ``auto`` (what qmoe uses: numba for single tokens, native from 2 tokens).

Two residencies per shape:

- ``cache``: one matrix, called again and again (a dense matrix under the last-level cache size is then read
  from the cache, not DRAM, which favours dense);
- ``memory``: a ring of distinct matrices, called in turn, whose total dense size is at least 4x the
  last-level cache (read from /sys/devices/system/cpu/cpu0/cache; ``--llc-mib`` overrides), separately for
  each dense dtype, as in a MoE where each token touches a few of thousands of experts. The compressed side
  uses a ring of the same number of distinct encoded matrices as the fp32 ring (their encoded total is ~50x
  smaller and may well stay in the cache: that is the point of compressing). Dense rings hold random
  values (the timing does not depend on them); every ring is walked once before timing. Memory: three
  dense rings of >= 4x the LLC at once (~6 GB here), and up to 14 GB RSS at 4096x14336 int2 (encoding
  temporaries); ``--cache-only`` or ``--llc-mib`` for smaller machines.

All variants are timed interleaved (one call of each in turn, ``--reps`` rounds) and medians reported: the
machine is shared, so single timings are noisy. Decode rate: weights of the matrix per second per thread.
Numbers in docs/results.md came from a 2-core shared KVM guest (Intel Xeon, AVX2, 48 KiB L1d, 2 MiB L2,
480 MiB L3).

Targets (issue 16): at batch 1 qmoe <= 1.0x dense fp32 cache-resident on every shape; memory-resident
<= 0.25x on the c2048 shapes (2080x6144, 6144x2080) and 4096x14336, <= 0.35x on 768x3072 and 3072x768; at
batch 8 <= 1.0x memory-resident; decode rate >= 3x the numba kernel's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qmoe import codec, kernels
from qmoe.kernels import cpu

SHAPES = [(768, 3072), (3072, 768), (2080, 6144), (6144, 2080), (4096, 14336)]
TARGET_MEM = {(768, 3072): 0.35, (3072, 768): 0.35, (2080, 6144): 0.25, (6144, 2080): 0.25,
              (4096, 14336): 0.25}
P_ZERO = 0.885
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("numba", "native", "auto")


def llc_bytes() -> int:
    """Size of the highest-level CPU cache, from sysfs (Linux); 32 MiB if unreadable."""
    best = (0, 0)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((d / "level").read_text())
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        best = max(best, (level, int(size.rstrip("KMG")) * mult))
    return best[1] or 32 * 2**20


def codes_levels(
    kind: str, rows: int, cols: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random codes ``[rows, cols]`` with P(background) = ``P_ZERO`` and per-row levels (ternary
    ``[rows, 2]``: lo, hi; int2 ``[rows, 4]``)."""
    u = rng.random((rows, cols), dtype=np.float32)
    lv = rng.uniform(0.5, 1.5, size=(rows, 4)).astype(np.float16).astype(np.float32)
    if kind == "ternary":
        codes = np.where(u < (1 - P_ZERO) / 2, -1, np.where(u < 1 - P_ZERO, 1, 0)).astype(np.int8)
        return codes, np.stack([-lv[:, 0], lv[:, 1]], axis=1)
    other = (1 - P_ZERO) / 3  # background code 1, the others share the rest
    codes = np.where(u < other, 0, np.where(u < 2 * other, 2, np.where(u < 3 * other, 3, 1))).astype(np.uint8)
    return codes, np.sort(lv * [-1.5, -0.5, 0.5, 1.5], axis=1)


def encode(
    kind: str, codes: np.ndarray, levels: np.ndarray, version: int | None = None
) -> codec.EncodedMatrix:
    if kind == "ternary":
        return codec.encode_ternary(codes, levels[:, 0], levels[:, 1], version=version)
    return codec.encode_int2(codes, levels, version=version)


def make(kind: str, rows: int, cols: int, rng: np.random.Generator) -> codec.EncodedMatrix:
    return encode(kind, *codes_levels(kind, rows, cols, rng))


CLOCK = time.perf_counter


def qmoe_call(mode: str, enc: codec.EncodedMatrix, x: torch.Tensor) -> None:
    cpu.set_kernel(mode)
    kernels.matmul(enc, x)


def run_cell(fns: dict[str, list], reps: int, rng: np.random.Generator) -> dict[str, float]:
    """Median seconds per variant; ``fns[name]`` is a list of zero-argument calls walked in a ring. Each
    round calls the variants in a fresh random order, so none always follows the same one (waking a thread
    pool that the previous call let sleep costs tens of µs)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for j in rng.permutation(len(names)):
            k = names[j]
            f = fns[k][i % len(fns[k])]
            t = CLOCK()
            f()
            times[k].append(CLOCK() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def check(enc: codec.EncodedMatrix, x: torch.Tensor) -> None:
    w = torch.from_numpy(codec.dequantize(enc)).double()
    ref = x.double() @ w.T
    scale = (x.abs().double() @ w.abs().T).max()
    for mode in ("numba", "native"):
        cpu.set_kernel(mode)
        err = ((kernels.matmul(enc, x) - ref).abs().max() / scale).item()
        assert err < 1e-5, f"{mode} result off by {err:.2e}"


def bench_shape(kind: str, rows: int, cols: int, args, rng, llc: int, threads: int) -> list[dict]:
    n_ring = math.ceil(4 * llc / (4 * rows * cols))  # fp32 ring >= 4x LLC
    t0 = time.perf_counter()
    encs = [make(kind, rows, cols, rng) for _ in range(n_ring if not args.cache_only else 1)]
    w = torch.from_numpy(codec.dequantize(encs[0]))  # the cache-resident dense matrix: the same weights
    dense_cache = {name: w.to(dt).contiguous() for name, dt in DTYPES.items()}
    rings = {}
    if not args.cache_only:
        for name, dt in DTYPES.items():
            n = math.ceil(4 * llc / (dense_cache[name].element_size() * rows * cols))
            rings[name] = [torch.randn(rows, cols).to(dt) for _ in range(n)]
    build_s = time.perf_counter() - t0
    out = []
    for tokens in args.batches:
        x = torch.from_numpy(rng.standard_normal((tokens, cols), dtype=np.float32))
        xs = {name: x.to(dt) for name, dt in DTYPES.items()}
        check(encs[0], x)
        for mode in MODES:
            qmoe_call(mode, encs[0], x)  # compile / load the caches, build the handles
        for residency in ("cache", "memory"):
            if residency == "memory" and args.cache_only:
                continue
            fns = {}
            for name in DTYPES:
                mats = [dense_cache[name]] if residency == "cache" else rings[name]
                fns[name] = [lambda m=m, xx=xs[name]: xx @ m.T for m in mats]
            mats_c = encs[:1] if residency == "cache" else encs
            for mode in MODES:
                fns[mode] = [lambda e=e, mode=mode, x=x: qmoe_call(mode, e, x) for e in mats_c]
            if residency == "memory":  # walk every ring once: each matrix then was last touched a ring ago
                for ring in fns.values():
                    for f in ring:
                        f()
            med = run_cell(fns, max(args.reps, 1), rng)
            row = {"kind": kind, "shape": f"{rows}x{cols}", "batch": tokens, "residency": residency,
                   "ring": 1 if residency == "cache" else {k: len(v) for k, v in fns.items()},
                   "bits_per_weight": encs[0].bits_per_weight, "ms": {k: 1e3 * v for k, v in med.items()},
                   "decode_weights_per_s_per_thread": {m: rows * cols / med[m] / threads for m in ("numba",
                                                                                               "native")},
                   "build_s": build_s}
            row["ratio"] = {d: med["auto"] / med[d] for d in DTYPES}
            row["native_ratio"] = {d: med["native"] / med[d] for d in DTYPES}
            row["native_speedup"] = med["numba"] / med["native"]
            out.append(row)
            print_row(row, (rows, cols), flush=True)
    return out


def make_on_grid(
    kind: str, rows: int, cols: int, rng: np.random.Generator, version: int
) -> codec.EncodedMatrix:
    """A random matrix with its levels on format 2's grid (as the quantizer leaves them), as ``version``."""
    from qmoe.codec.levels import round_levels

    codes, levels = codes_levels(kind, rows, cols, rng)
    return encode(kind, codes, round_levels(levels, kind), version)


def bench_formats(kind: str, rows: int, cols: int, args, rng, threads: int) -> list[dict]:
    """The same matrices read back from version-1 and version-2 blobs: parse time (``from_blob``, which
    expands version 2's row metadata into the arrays every decoder reads) and the kernel's time on each
    (``auto`` mode), interleaved, cache-resident and in a ring of distinct matrices."""
    from qmoe.codec import EncodedMatrix

    seed = int(rng.integers(1 << 30))
    n = 1 if args.cache_only else 8
    blobs = {v: [make_on_grid(kind, rows, cols, np.random.default_rng(seed + i), v).to_blob().copy()
                 for i in range(n)] for v in (1, 2)}
    mats = {v: [EncodedMatrix.from_blob(b) for b in blobs[v]] for v in (1, 2)}
    for a, b in zip(mats[1], mats[2], strict=True):  # the same matrix: every array the decoders read
        same = [np.array_equal(getattr(a, k), getattr(b, k)) for k in ("stream", "row_deltas", "levels")]
        assert all(same), "version 1 and 2 of one matrix must expand to the same arrays"
    parse = run_cell({f"v{v}": [lambda b=b: EncodedMatrix.from_blob(b) for b in blobs[v]] for v in (1, 2)},
                     max(args.reps, 3), rng)
    out = []
    for tokens in args.batches:
        x = torch.from_numpy(rng.standard_normal((tokens, cols), dtype=np.float32))
        for v in (1, 2):
            check(mats[v][0], x)
            qmoe_call("auto", mats[v][0], x)
        fns = {f"v{v}": [lambda e=e, x=x: qmoe_call("auto", e, x) for e in mats[v]] for v in (1, 2)}
        med = run_cell(fns, max(args.reps, 1), rng)
        row = {"kind": kind, "shape": f"{rows}x{cols}", "batch": tokens, "ring": n, "threads": threads,
               "blob_bytes": {f"v{v}": int(blobs[v][0].nbytes) for v in (1, 2)},
               "parse_ms": {k: 1e3 * t for k, t in parse.items()},
               "kernel_ms": {k: 1e3 * t for k, t in med.items()},
               "kernel_ratio_v2_v1": med["v2"] / med["v1"]}
        out.append(row)
        b, pm, km = row["blob_bytes"], row["parse_ms"], row["kernel_ms"]
        print(f"{kind:7} {rows}x{cols:<6} T={tokens:<2} bytes v1 {b['v1']:9d} v2 {b['v2']:9d} | parse ms v1 "
              f"{pm['v1']:7.3f} v2 {pm['v2']:7.3f} | kernel ms v1 {km['v1']:7.3f} v2 {km['v2']:7.3f} "
              f"ratio v2/v1 {row['kernel_ratio_v2_v1']:.3f}", flush=True)
    return out


def print_header() -> None:
    print(f"{'kind':7} {'shape':>10} {'b/w':>5} {'T':>2} {'where':6} {'fp32':>7} {'bf16':>7} {'fp16':>7} "
          f"{'numba':>7} {'native':>7} {'auto':>7} | {'auto/fp32':>9} {'/bf16':>6} {'/fp16':>6} "
          f"{'nat/fp32':>8} | {'nat/numba':>9} {'Mw/s numba':>10} {'native':>7} {'target':>11}")


def print_row(r: dict, shape: tuple[int, int], flush: bool = False) -> None:
    ms, rt = r["ms"], r["ratio"]
    target = ""
    if r["batch"] == 1 and r["residency"] == "cache":
        target = f"1.0 {'ok' if rt['fp32'] <= 1.0 else 'MISS'}"
    elif r["batch"] == 1:
        t = TARGET_MEM[shape]
        target = f"{t:.2f} {'ok' if rt['fp32'] <= t else 'MISS'}"
    elif r["residency"] == "memory":
        target = f"1.0 {'ok' if rt['fp32'] <= 1.0 else 'MISS'}"
    dec = r["decode_weights_per_s_per_thread"]
    print(f"{r['kind']:7} {r['shape']:>10} {r['bits_per_weight']:5.3f} {r['batch']:2d} {r['residency']:6} "
          f"{ms['fp32']:7.3f} {ms['bf16']:7.3f} {ms['fp16']:7.3f} {ms['numba']:7.3f} {ms['native']:7.3f} "
          f"{ms['auto']:7.3f} | {rt['fp32']:9.2f} {rt['bf16']:6.2f} {rt['fp16']:6.2f} "
          f"{r['native_ratio']['fp32']:8.2f} | {r['native_speedup']:9.2f} {dec['numba'] / 1e6:10.0f} "
          f"{dec['native'] / 1e6:7.0f} {target:>11}", flush=flush)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="768x3072 and 2080x6144, ternary only")
    ap.add_argument("--shapes", help="e.g. 768x3072,4096x14336 (default: all five)")
    ap.add_argument("--reps", type=int, default=15, help="interleaved rounds per cell (median reported)")
    ap.add_argument("--kinds", default="ternary,int2")
    ap.add_argument("--batches", default="1,8", help="tokens per call, e.g. 1,8,64")
    ap.add_argument("--cache-only", action="store_true", help="skip the memory-resident rings")
    ap.add_argument("--llc-mib", type=float, help="last-level cache size (default: read from sysfs)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--formats", action="store_true",
                    help="instead: the same matrices from format version 1 and 2 blobs (parse, kernel)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: 2 threads, perf_counter; cpu: 1 thread each, thread_time")
    args = ap.parse_args()
    import numba

    global CLOCK
    threads = 2 if args.clock == "wall" else 1
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    args.batches = [int(b) for b in args.batches.split(",")]
    llc = int(args.llc_mib * 2**20) if args.llc_mib else llc_bytes()
    shapes = [(768, 3072), (2080, 6144)] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    kinds = ["ternary"] if args.quick and args.kinds == "ternary,int2" else args.kinds.split(",")
    try:
        cpu.set_kernel("native")
    except Exception as err:  # noqa: BLE001 - report and stop: the benchmark compares both kernels
        raise SystemExit(f"the native kernel is unavailable: {err}") from err
    head = (f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}, "
            f"P(zero) {P_ZERO}, clock {args.clock}, median of {args.reps} interleaved rounds (random order), "
            f"LLC {llc / 2**20:.0f} MiB (memory rings >= {4 * llc / 2**30:.2f} GiB per dense dtype), load "
            f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; times in ms, ratios = time / dense "
            "time")
    print(head)
    if not args.formats:
        print_header()
    rng = np.random.default_rng(0)
    results = []
    for kind in kinds:
        for rows, cols in shapes:
            if args.formats:
                results += bench_formats(kind, rows, cols, args, rng, threads)
            else:
                results += bench_shape(kind, rows, cols, args, rng, llc, threads)
            if args.json:
                args.json.write_text(json.dumps({"header": head, "machine": platform.processor() or
                                                 platform.machine(), "torch": torch.__version__,
                                                 "numba": numba.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
