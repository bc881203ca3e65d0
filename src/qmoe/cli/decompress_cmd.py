"""qmoe decompress: a compressed directory back to a plain Hugging Face checkpoint."""

from __future__ import annotations

import argparse

NAME = "decompress"
HELP = "write a plain Hugging Face checkpoint (decoded experts, the family's layout) from a compressed one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a qmoe-compressed model directory")
    p.add_argument("--out", required=True, help="new directory for the dense checkpoint")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of every floating tensor (default: the source's recorded dtype, else bf16)")


def run(args: argparse.Namespace) -> int:
    from qmoe.runtime.decompress import decompress

    r = decompress(args.source, args.out, args.dtype)
    print(f"wrote {r['out']}: {r['expert_matrices']} expert matrices decoded, {r['tensors']} tensors in "
          f"{r['shards']} shard(s), {r['bytes'] / 2**20:.1f} MiB in {r['dtype']} (no qmoe needed to load it)")
    return 0
