"""Peak memory of ``qmoe compress`` does not grow with the model: two synthetic Switch checkpoints with the
same block shape, one with 4x the blocks (>= 2 GB on disk), each compressed in its own process.

    python benchmarks/memory.py [--layers 2] [--experts 32] [--d-model 512] [--d-ff 2048] [--keep DIR]

The checkpoints are random fp16 SwitchTransformers weights (every block sparse) written shard by shard
without ever building the model in memory (``benchmarks/synthetic_switch.py``). Each is compressed with
``--method rtn --no-eval`` (the memory question is about streaming, not about GPTQ's math) and the peak RSS
of the compressing process (``ru_maxrss``, from the report) is compared: target ratio <= 1.25.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_checkpoint(path: Path, tokenizer_dir: Path, n_layers: int, args: argparse.Namespace) -> int:
    """A random fp16 Switch checkpoint with ``n_layers`` encoder and decoder blocks; returns its bytes."""
    from synthetic_switch import switch_config
    from synthetic_switch import write_checkpoint as write

    cfg = switch_config(n_layers, args.experts, args.d_model, args.d_ff, args.vocab, "fp16")
    return write(path, tokenizer_dir, cfg, log=False)


def compress(src: Path, out: Path, calib_samples: int) -> dict:
    code = "import sys; from qmoe.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        "compress",
        str(src),
        "--out",
        str(out),
        "--method",
        "rtn",
        "--no-eval",
        "--calib-samples",
        str(calib_samples),
        "--device",
        "cpu",
        "--quiet",
    ]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *argv], check=True, stdout=subprocess.DEVNULL)
    rep = json.loads((out / "qmoe_report.json").read_text())
    rep["_seconds"] = time.perf_counter() - t0
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="encoder (= decoder) blocks of the small model")
    ap.add_argument("--factor", type=int, default=4, help="the large model has this many times the blocks")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--keep", default=None, help="build in this directory and keep it (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse finished runs there")
    args = ap.parse_args()

    from qmoe.calib import bible_split
    from qmoe.calib.tokenizer import train_tokenizer

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qmoe-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tok_dir = work / "tokenizer"
        train_tokenizer(bible_split("train")[:400], vocab_size=args.vocab).save_pretrained(tok_dir)
        rows = []
        for label, n in (("small", args.layers), ("large", args.factor * args.layers)):
            src = work / f"{label}-src"
            if not (src / "config.json").exists():  # written last: an interrupted build is redone
                shutil.rmtree(src, ignore_errors=True)
                size = write_checkpoint(src, tok_dir, n, args)
            else:
                size = json.loads((src / "model.safetensors.index.json").read_text())["metadata"][
                    "total_size"
                ]
            out = work / f"{label}-out"
            if args.reuse and (out / "qmoe_report.json").is_file():
                rep = json.loads((out / "qmoe_report.json").read_text())
                rep["_seconds"] = rep["wall_seconds"]
            else:
                shutil.rmtree(out, ignore_errors=True)
                rep = compress(src, out, args.calib_samples)
            rows.append((label, 2 * n, size, rep))
            print(
                f"{label}: {2 * n} blocks, checkpoint {size / 2**30:.2f} GiB -> "
                f"{rep['totals']['bytes'] / 2**20:.1f} MiB, "
                f"peak RSS {rep['peak_rss_bytes'] / 2**30:.3f} GiB, {rep['_seconds']:.0f} s",
                flush=True,
            )
        print()
        print("| model | blocks | checkpoint (fp16) | compressed | peak RSS | wall |")
        print("|---|---|---|---|---|---|")
        for label, blocks, size, rep in rows:
            print(
                f"| {label} | {blocks} | {size / 2**30:.2f} GiB | {rep['totals']['bytes'] / 2**20:.1f} MiB | "
                f"{rep['peak_rss_bytes'] / 2**30:.3f} GiB | {rep['_seconds']:.0f} s |"
            )
        ratio = rows[1][3]["peak_rss_bytes"] / rows[0][3]["peak_rss_bytes"]
        print(
            f"\npeak RSS ratio large/small: {ratio:.3f} "
            f"(target <= 1.25: {'MET' if ratio <= 1.25 else 'NOT MET'}); "
            f"checkpoint ratio {rows[1][2] / rows[0][2]:.2f}x"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
