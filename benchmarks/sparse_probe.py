"""Probe for issue 26: would a transcoded form of the ternary experts make batch-1 decoding fast enough?

    python benchmarks/sparse_probe.py [--shapes 768x2048 2048x768] [--p-zero 0.9] [--reps 200]

qmoe's CPU kernel decodes the entropy-coded stream inside every matmul: at batch 1 it is a chain of
dependent table lookups per row (docs/kernels.md, "Measured limits"), ~6 G weights/s on two cores on the
real-shaped Qwen3-30B-A3B model, where llama.cpp's whole IQ1_S token is about twice as fast as qmoe's expert
kernel alone (docs/runtime.md). A runtime could instead decode each expert once, on its first use, into
lists of the columns holding +1 and -1 per row, and compute ``y[r] = hi[r] sum(x[P_r]) + lo[r] sum(x[N_r])``
with AVX2 gathers (qmoe does so now). This script measures that, one thread each, on random ternary
matrices of the real-shaped model's expert shapes, next to qmoe's stream kernel on the same matrices in the
same process, timed interleaved (medians of ``--reps`` calls):

- ``qmoe``: ``qmoe.kernels.matmul`` on the coded stream (the native lanes kernel), what runs today;
- ``idx16``: uint16 column lists (``benchmarks/sparse_probe.c``);
- ``lists``: qmoe's own column lists (``qmoe.kernels.lists``: uint8 gaps between columns, decoded by an AVX2
  prefix sum; smaller than idx16, a few more instructions), through its kernel's entry point on all rows.

Every output is checked against the float64 product with the reference-decoded matrix before timing. It
prints each form's size in bits per weight and its speed as a ratio to qmoe's; it changes nothing in qmoe.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def _build() -> ctypes.CDLL:
    src = Path(__file__).with_name("sparse_probe.c")
    lib = Path(tempfile.mkdtemp(prefix="qmoe-probe-")) / "sparse_probe.so"
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-shared", "-fPIC", str(src), "-o", str(lib)],
                   check=True)
    return ctypes.CDLL(str(lib))


def _idx16(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start [2 rows + 1], idx16) for ternary ``codes [rows, cols]`` (see sparse_probe.c)."""
    rows, cols = codes.shape
    idx, start = [], [0]
    for r in range(rows):
        for sign in (1, -1):
            c = np.flatnonzero(codes[r] == sign)
            pad = (-len(c)) % 8
            idx.append(np.concatenate([c, np.full(pad, cols)]).astype(np.uint16))
            start.append(start[-1] + len(c) + pad)
    return np.array(start, np.int64), np.concatenate(idx)


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["768x2048", "2048x768"])
    ap.add_argument("--p-zero", type=float, nargs="+", default=[0.9])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("QMOE_CPU_KERNEL", "native")
    import numba
    import torch

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    lib = _build()
    rng = np.random.default_rng(0)
    print(f"one thread each; medians of {args.reps} interleaved calls; batch 1")
    print(f"{'shape':>10} {'P(0)':>5} | {'form':>5} {'bits/w':>7} {'us/call':>9} {'G w/s':>6} {'vs qmoe':>8}")
    for shape in args.shapes:
        rows, cols = map(int, shape.split("x"))
        for p0 in args.p_zero:
            _measure(lib, rng, rows, cols, p0, args.reps)


def _measure(lib: ctypes.CDLL, rng: np.random.Generator, rows: int, cols: int, p0: float, reps: int) -> None:
    import torch

    from qmoe import codec, kernels
    from qmoe.codec.decode import dequantize
    from qmoe.kernels import _native, lists

    p = [(1 - p0) / 2, p0, (1 - p0) / 2]
    codes = rng.choice([-1, 0, 1], size=(rows, cols), p=p).astype(np.int8)
    lo = (-rng.random(rows) - 0.1).astype(np.float16)
    hi = (rng.random(rows) + 0.1).astype(np.float16)
    enc = codec.encode_ternary(codes, lo, hi)
    w = dequantize(enc, backend="reference").astype(np.float64)  # [rows, cols]
    assert np.array_equal(np.sign(w).astype(np.int8), codes)  # the 16-bit lists below are the stream's own
    start, idx = _idx16(codes)
    listed = lists.build(enc)  # qmoe's column lists, called below through its own kernel's entry point
    _, qlib = _native.lists()
    qlib.qmoe_lists_item.argtypes = [ctypes.c_int64] * 7
    x = np.zeros(cols + 1, np.float32)  # x[cols] = 0: the padding column
    x[:cols] = rng.standard_normal(cols)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    xt = torch.from_numpy(x[:cols].copy())[None]
    y16, y8 = np.empty(rows, np.float32), np.empty(rows, np.float32)
    n, lv = ctypes.c_int64(rows), (_ptr(lo32), _ptr(hi32))
    runs = {
        "qmoe": lambda: kernels.matmul(enc, xt),
        "idx16": lambda: lib.probe_idx16(n, _ptr(start), _ptr(idx), *lv, _ptr(x), _ptr(y16)),
        "lists": lambda: qlib.qmoe_lists_item(listed.address, x.ctypes.data, y8.ctypes.data, 1, 0, 0, rows),
    }
    for f in runs.values():
        f()
    want = w @ x[:cols].astype(np.float64)
    tol = 1e-5 * max(1.0, float((np.abs(w) @ np.abs(x[:cols].astype(np.float64))).max()))
    for name, got in (("qmoe", runs["qmoe"]().numpy()[0]), ("idx16", y16), ("lists", y8)):
        err = float(np.abs(got - want).max())
        assert err <= tol, f"{name} differs from the float64 reference by {err:.3g} (> {tol:.3g})"
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    size = {"qmoe": 8 * enc.nbytes / codes.size, "idx16": 16 * len(idx) / codes.size,
            "lists": 8 * len(listed.gaps) / codes.size}
    for k in runs:
        print(f"{rows}x{cols:<5} {p0:5.3f} | {k:>5} {size[k]:7.3f} {med[k] * 1e6:9.1f} "
              f"{codes.size / med[k] / 1e9:6.2f} {med['qmoe'] / med[k]:7.2f}x")


if __name__ == "__main__":
    main()
