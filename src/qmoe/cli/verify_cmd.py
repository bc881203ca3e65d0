"""qmoe verify: check every byte of a compressed checkpoint (crc32 and structure), without running it."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "verify"
HELP = ("check every tensor and encoded matrix of a compressed directory (crc32, structure, shapes) without "
        "loading the model; exit code 1 if anything is damaged")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a qmoe-compressed model directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qmoe.runtime.verify import verify_dir

    with tqdm(total=0, unit="B", unit_scale=True, desc="verify", disable=args.quiet, file=sys.stderr,
              leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        r = verify_dir(args.dir, progress)
    if args.json:
        print(json.dumps(r.to_dict(), indent=1))
    else:
        for line in r.problems:
            print(line)
        state = "OK" if r.ok else f"{len(r.problems)} problem(s)"
        print(f"{r.path}: {state}: {r.matrices} encoded matrices and {r.tensors} tensors in {r.files} "
              f"file(s), {r.bytes / 1e9:.2f} GB checked in {r.seconds:.1f} s")
    return 0 if r.ok else 1
