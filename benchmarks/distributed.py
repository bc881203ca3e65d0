"""Distributed compression: 2 ranks x 1 thread against 1 process x 1 thread, same machine, same settings.

    python benchmarks/distributed.py [--experts 16] [--layers 2] [--d-model 512] [--d-ff 2048] [--reps 2]

A synthetic Switch checkpoint (``benchmarks/synthetic_switch.py``, every block sparse, ``--experts`` per
layer) is compressed with GPTQ by ``python -m qmoe compress`` and by ``torchrun --standalone
--nproc-per-node 2 -m qmoe compress`` (gloo), one thread per process for torch and for numba
(``OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1``: numba's encoder otherwise adds a thread per core), alternately
``--reps`` times each. Printed: wall time of each run (the whole command: start-up, calibration, every block,
evaluation, writing), the median ratio, and whether every output file but the report is byte-identical to
the first single-process run. Target (issue 14): ratio >= 1.6x, identical bytes.

The machine is shared: run it when nothing else uses the cores (two ranks need both).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path


def run(src: Path, out: Path, ranks: int, args: argparse.Namespace) -> float:
    shutil.rmtree(out, ignore_errors=True)
    from qmoe.pipeline.dist import local_launcher

    launcher = local_launcher(ranks)
    cmd = [*launcher, "compress", str(src), "--out", str(out), "--calib-samples", str(args.calib_samples)]
    cmd += ["--eval-samples", str(args.eval_samples), "--device", "cpu", "--quiet"]
    t0 = time.perf_counter()
    one_thread = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}  # torch's and numba's (encoding) threads
    subprocess.run(cmd, check=True, env={**os.environ, **one_thread}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def same_bytes(a: Path, b: Path) -> list[str]:
    """Files (besides the report) that differ or exist in one directory only."""
    names = {p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}
    return sorted(
        n
        for n in names
        if n != "qmoe_report.json"
        and (not (a / n).is_file() or not (b / n).is_file() or (a / n).read_bytes() != (b / n).read_bytes())
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2, help="encoder (= decoder) blocks, all sparse")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", default="runs/distributed")
    args = ap.parse_args()

    from synthetic_switch import switch_config, tokenizer, write_checkpoint

    work = Path(args.work)
    src = work / f"switch-{args.layers}x{args.experts}x{args.d_model}x{args.d_ff}"
    if not (src / "config.json").is_file():
        cfg = switch_config(args.layers, args.experts, args.d_model, args.d_ff, 8192, "bf16")
        write_checkpoint(src, tokenizer(work / "tokenizer-8192", 8192), cfg, log=False)
    size = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(
        f"checkpoint {src}: {2 * args.layers} sparse blocks x {args.experts} experts "
        f"({args.d_model}x{args.d_ff}), {size / 2**20:.0f} MiB bf16; GPTQ, {args.calib_samples} calibration "
        f"samples; machine: {os.cpu_count()} cores",
        flush=True,
    )
    times: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.reps):
        for ranks in (1, 2):
            t = run(src, work / f"out-{ranks}-{rep}", ranks, args)
            times[ranks].append(t)
            print(f"  rep {rep}: {ranks} x 1 thread: {t:.1f} s", flush=True)
    diff = [
        d
        for rep in range(args.reps)
        for ranks in (1, 2)
        for d in same_bytes(work / "out-1-0", work / f"out-{ranks}-{rep}")
    ]
    one, two = statistics.median(times[1]), statistics.median(times[2])
    rep2 = json.loads((work / "out-2-0" / "qmoe_report.json").read_text())
    print()
    print("| run | wall (median) | block compute in the report |")
    print("|---|---|---|")
    for ranks, t in ((1, one), (2, two)):
        r = json.loads((work / f"out-{ranks}-0" / "qmoe_report.json").read_text())
        print(
            f"| {ranks} process{'es' if ranks > 1 else ''} x 1 thread | {t:.1f} s | "
            f"{sum(x['seconds'] for x in r['layers']):.1f} s over {len(r['layers'])} MoE layers |"
        )
    print(
        f"\nspeed-up 2 ranks / 1 process: {one / two:.2f}x (target >= 1.6x: "
        f"{'MET' if one / two >= 1.6 else 'NOT MET'}); ranks in report: {rep2['ranks']}"
    )
    print(
        f"byte-identical outputs (every file but the report, all runs against out-1-0): "
        f"{'yes' if not diff else 'NO: ' + ', '.join(sorted(set(diff)))}"
    )


if __name__ == "__main__":
    main()
