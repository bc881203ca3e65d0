"""``qmoe compress``: translate the options into a ``CompressConfig`` and call ``qmoe.compress``."""

from __future__ import annotations

import argparse

NAME = "compress"
HELP = (
    "Compress a Mixture-of-Experts checkpoint below 1 bit per parameter: stream it block by block, "
    "calibrate, GPTQ-quantize every expert and entropy-code it (QMoE)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qmoe.config import CompressConfig

    d = CompressConfig()
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="built-in model name (tiny-switch, tiny-qwen3-moe) or a local Hugging Face "
        "model directory (safetensors, sharded or not, or pytorch_model*.bin)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory (new or empty; rerunning the same command on an unfinished DIR resumes it)",
    )
    p.add_argument(
        "--bits",
        choices=("ternary", "2"),
        default=d.bits,
        help="ternary {lo, 0, hi} per row, entropy coded (QMoE), or 2-bit (default: %(default)s)",
    )
    p.add_argument(
        "--method",
        choices=("gptq", "rtn"),
        default=d.method,
        help="GPTQ with per-expert Hessians, or round-to-nearest (default: %(default)s)",
    )
    p.add_argument(
        "--grid",
        default=None,
        help="quantization grid: ternary (QMoE's min/max levels) or "
        "ternary-opt (error-minimising levels) for --bits ternary; int2 for --bits 2",
    )
    p.add_argument(
        "--calib-data",
        default=d.calib_data,
        metavar="SRC",
        help="calibration text: a split name, pydoc, or a .txt/.jsonl file (default: %(default)s)",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=d.calib_samples,
        metavar="N",
        help="calibration samples (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        metavar="L",
        help="tokens per sample for decoder-only models (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default: %(default)s)")
    p.add_argument(
        "--token-cap",
        type=float,
        default=d.token_cap,
        metavar="X",
        help="at most X times the mean tokens per expert enter its Hessian; 0: no cap (default: %(default)s)",
    )
    p.add_argument(
        "--min-tokens",
        type=int,
        default=d.min_tokens,
        metavar="N",
        help="experts with fewer calibration tokens are rounded to nearest (default: %(default)s)",
    )
    p.add_argument(
        "--damp",
        type=float,
        default=d.damp,
        help="GPTQ dampening, relative to the mean Hessian diagonal (default: %(default)s)",
    )
    p.add_argument(
        "--block-size", type=int, default=d.block_size, help="GPTQ lazy-batch columns (default: %(default)s)"
    )
    p.add_argument(
        "--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the validation loss before/after")
    p.add_argument(
        "--eval-data",
        nargs="+",
        default=list(d.eval_data),
        metavar="SRC",
        help="evaluation texts; the first is the report's eval (default: %(default)s)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=d.eval_samples,
        metavar="N",
        help="evaluation samples per set (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="samples per forward pass (default: %(default)s)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="where forward passes and GPTQ run: cpu, cuda, cuda:N "
        "(default: cuda if available); activations stay in CPU memory",
    )
    p.add_argument(
        "--buffer-gb",
        type=float,
        default=None,
        metavar="GB",
        help="activations kept in RAM before "
        "spilling to a disk memmap (default: half the free RAM, at most 8)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-layer table")


def run(args: argparse.Namespace) -> int:
    from qmoe.config import CompressConfig
    from qmoe.pipeline import compress
    from qmoe.pipeline.report import summary

    config = CompressConfig(
        bits=args.bits,
        method=args.method,
        grid=args.grid,
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        token_cap=args.token_cap,
        min_tokens=args.min_tokens,
        damp=args.damp,
        block_size=args.block_size,
        act_order=args.act_order,
        eval=not args.no_eval,
        eval_data=tuple(args.eval_data),
        eval_samples=args.eval_samples,
        batch_size=args.batch_size,
    )
    report = compress(
        args.source, args.out, config, device=args.device, buffer_gb=args.buffer_gb, progress=not args.quiet
    )
    # The live table already showed the layers unless --quiet.
    print(summary(report, table=args.quiet))
    print(f"wrote {args.out}")
    return 0
