"""Compress a checkpoint larger than this machine's RAM, and measure what GPTQ's stages need on a smaller one.

    python benchmarks/synthetic_switch.py --out runs/scale/switch-31gb --target-gb 31     # ~31 GB bf16
    python benchmarks/larger_than_ram.py --large runs/scale/switch-31gb [--small-layers 2]

1. ``--large``: ``qmoe compress --method rtn --rate 0`` of the given checkpoint (nearest rounding, for
   speed; every stage but GPTQ's math runs: streaming, calibration forward passes, routing counts,
   encoding, the evaluation streams), in a child process whose resident set is sampled every 0.2 s
   (psutil) besides the report's ``ru_maxrss``; swap use of the machine is read before and after. Then
   ``qmoe eval`` of the output.
2. ``--small-layers N``: a checkpoint of the same block shape with N encoder + N decoder blocks is written
   and compressed with GPTQ (the default recipe), the same way, so the memory of the GPTQ stages (Hessians,
   GPTQ, dequantized copies) is measured on the same per-block sizes: the pipeline's memory is per block, so
   it does not grow with depth (``benchmarks/memory.py`` checks that at 4x the blocks).

Targets (issue 14): the large run's peak RSS <= 4 GB, no swap, the output loads and evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil


def run_sampled(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """(wall s, peak RSS sampled, return code) of ``cmd`` (RSS of the process and its children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    return time.perf_counter() - t0, peak, proc.returncode


def compress(src: Path, out: Path, method: str, args: argparse.Namespace) -> dict:
    if not (out / "config.json").is_file():  # a finished output is reused (rerun: resume)
        cmd = [sys.executable, "-m", "qmoe", "compress", str(src), "--out", str(out), "--method", method]
        cmd += ["--calib-samples", str(args.calib_samples), "--eval-samples", str(args.eval_samples)]
        if method == "rtn":  # plain nearest rounding (QMoE's RTN): the default's priced rounding is slow
            cmd += ["--rate", "0"]
        cmd += ["--device", "cpu", "--quiet"]
        swap0 = psutil.swap_memory().used
        wall, sampled, rc = run_sampled(cmd)
        if rc != 0:
            raise SystemExit(f"qmoe compress failed with code {rc}: {' '.join(cmd)}")
        rep = json.loads((out / "qmoe_report.json").read_text())
        rep["_bench"] = {
            "wall": wall,
            "sampled_peak_rss": sampled,
            "swap_delta": psutil.swap_memory().used - swap0,
        }
        (out / "bench.json").write_text(json.dumps(rep["_bench"]) + "\n")
        return rep
    rep = json.loads((out / "qmoe_report.json").read_text())
    rep["_bench"] = json.loads((out / "bench.json").read_text())
    return rep


def evaluate(out: Path, samples: int) -> dict:
    cmd = [sys.executable, "-m", "qmoe", "eval", str(out), "--samples", str(samples), "--json"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {**json.loads(res.stdout), "_wall": time.perf_counter() - t0}


def size_of(src: Path) -> int:
    return json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--large", default=None, help="a checkpoint directory larger than RAM (synthetic_switch.py)"
    )
    ap.add_argument("--small-layers", type=int, default=0, help="also: GPTQ on N+N blocks of the same shape")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--work", default="runs/scale")
    args = ap.parse_args()

    ram = psutil.virtual_memory().total
    swap = psutil.swap_memory()
    print(
        f"machine: {os.cpu_count()} cores, RAM {ram / 1e9:.1f} GB, swap {swap.total / 1e9:.1f} GB "
        f"({swap.used / 1e9:.2f} GB used)",
        flush=True,
    )
    rows = []
    if args.large:
        src = Path(args.large)
        size = size_of(src)
        print(f"large: {src}, {size / 1e9:.1f} GB ({size / ram:.2f}x RAM)", flush=True)
        rep = compress(src, Path(args.work) / (src.name + "-rtn"), "rtn", args)
        ev = evaluate(Path(args.work) / (src.name + "-rtn"), args.eval_samples)
        rows.append(("large, RTN", src, size, rep, ev))
    if args.small_layers:
        from synthetic_switch import switch_config, tokenizer, write_checkpoint

        big = json.loads((Path(args.large) / "config.json").read_text()) if args.large else None
        experts, d_model, d_ff = (big["num_experts"], big["d_model"], big["d_ff"]) if big else (32, 768, 3072)
        src = Path(args.work) / f"switch-{args.small_layers}x{experts}x{d_model}x{d_ff}"
        if not (src / "config.json").is_file():
            cfg = switch_config(args.small_layers, experts, d_model, d_ff, 8192, "bf16")
            write_checkpoint(src, tokenizer(Path(args.work) / "tokenizer-8192", 8192), cfg, log=False)
        for method in ("rtn", "gptq"):
            rep = compress(src, Path(args.work) / f"{src.name}-{method}", method, args)
            rows.append((f"small, {method.upper()}", src, size_of(src), rep, None))

    print()
    print(
        "| run | checkpoint (bf16) | blocks | compressed | peak RSS (report / sampled) | swap used during "
        "| wall | eval after (loss, wall) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, src, size, rep, ev in rows:
        b = rep["_bench"]
        blocks = sum(1 for _ in (src.glob("model-*.safetensors"))) - 1
        evs = f"{ev['loss']:.4f}, {ev['_wall']:.0f} s" if ev else "-"
        print(
            f"| {label} | {size / 1e9:.1f} GB | {blocks} | {rep['totals']['bytes'] / 1e9:.2f} GB "
            f"({rep['totals']['expert_bits_per_weight']:.3f} bits/w) | {rep['peak_rss_bytes'] / 1e9:.2f} / "
            f"{b['sampled_peak_rss'] / 1e9:.2f} GB | {b['swap_delta'] / 1e6:.0f} MB | {b['wall']:.0f} s "
            f"| {evs} |"
        )
    for label, _, _, rep, _ in rows:
        peak = max(rep["peak_rss_bytes"], rep["_bench"]["sampled_peak_rss"]) / 1e9
        print(f"{label}: peak RSS {peak:.2f} GB (target <= 4 GB: {'MET' if peak <= 4 else 'NOT MET'})")


if __name__ == "__main__":
    main()
