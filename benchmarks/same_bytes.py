"""Do two commits write the same bytes? Compress the same models with each and compare every output file.

    python benchmarks/same_bytes.py --base REV [--head REV] [--cases switch qwen qwen-1.2 ...] [--threads 1]

For a change meant to keep the output (a refactor, a speed-up), this is the check: each commit's tree is
exported with ``git archive`` (uncommitted changes are not seen: commit first, or pass ``--head WORKTREE``,
a directory, to use the working tree as it is) and run as ``python -m qmoe compress`` with its own ``src``
on ``PYTHONPATH``, one case after another, with the same thread count (the bytes depend on it), both on
the same copy of the built-in models (the base's). Outputs are kept under ``--work/<commit>/<case>`` and
reused on a rerun, so a base is compressed once.

Compared: every file of the output directory byte for byte, except ``qmoe_report.json``, whose fields are
compared after removing what measures the run rather than its result (times, memory, where it resumed);
fields only the head's report has are listed (new information), not counted as a difference.
A resumed case kills the run after its second block (``QMOE_TEST_KILL``) and runs the same command again.

Prints one line per case (identical or the files that differ) and exits 1 if any case differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = "qmoe_report.json"
DONE = ".same_bytes_done"  # written next to a finished case's output: reuse it on a rerun
# Report fields that describe the run, not its result (the report's own VOLATILE_FIELDS, written out here
# so this script does not depend on either commit's code).
VOLATILE = {"wall_seconds", "cpu_seconds", "peak_rss_bytes", "resumed_from_block", "seconds", "rss_bytes"}


# name -> (ranks, killed and resumed, compress arguments)
CASES: dict[str, tuple[int, bool, list[str]]] = {
    "switch": (1, False, ["tiny-switch"]),
    "qwen": (1, False, ["tiny-qwen3-moe"]),
    "qwen-1.2": (1, False, ["tiny-qwen3-moe", "--target-bits", "1.2"]),
    "qwen-global-1.0": (1, False, ["tiny-qwen3-moe", "--allocation", "global", "--target-bits", "1.0"]),
    "switch-2ranks": (2, False, ["tiny-switch"]),
    "qwen-2ranks-1.2": (2, False, ["tiny-qwen3-moe", "--target-bits", "1.2"]),
    "qwen-resumed": (1, True, ["tiny-qwen3-moe"]),
}
DEFAULT_CASES = ("switch", "qwen", "qwen-1.2", "qwen-global-1.0", "switch-2ranks", "qwen-resumed")


def export(rev: str, work: Path) -> tuple[str, Path]:
    """``(label, source tree)`` of a commit (exported once) or of a directory used as it is."""
    if Path(rev).is_dir():
        path = Path(rev).resolve()
        return f"dir-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}", path
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if sha.returncode:
        sys.exit(f"same_bytes: {rev!r} is neither a commit nor a directory; pass a commit or a source tree")
    sha_s = sha.stdout.strip()[:12]
    tree = work / sha_s / "tree"
    if not (tree / "src" / "qmoe").is_dir():
        tmp = tree.with_name("tree.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha_s], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        tmp.rename(tree)
    return sha_s, tree


def shared_sources(tree: Path, work: Path) -> dict[str, str]:
    """Built-in model name -> one copy of its directory that both commits read. The run fingerprint in
    ``config.json`` hashes the source files' sizes and modification times, and each exported tree has its
    own; reading one copy keeps that hash a function of the code alone."""
    names = {args[0] for _, _, args in CASES.values()}
    out = {}
    for name in sorted(names):
        dst = work / "models" / name
        if not dst.is_dir():
            tmp = dst.with_name(name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(tree / "src" / "qmoe" / "models" / name, tmp)
            tmp.rename(dst)
        out[name] = str(dst)
    return out


def compress(
    tree: Path, out: Path, case: str, threads: int, extra: list[str], reuse: bool, sources: dict[str, str]
) -> float:
    """Run one case with the code of ``tree`` into ``out`` (reused when already done and ``reuse``: a
    commit's code does not change, a working tree's may); seconds spent (0: reused)."""
    done = out.parent / f"{out.name}{DONE}"
    if reuse and done.is_file():
        return 0.0
    done.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    ranks, resumed, args = CASES[case]
    args = [sources.get(args[0], args[0]), *args[1:]]
    launcher = [sys.executable, "-m", "qmoe"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += [f"--nproc-per-node={ranks}", "-m", "qmoe"]
    cmd = [*launcher, "compress", *args, "--out", str(out), "--device", "cpu", "--quiet", *extra]
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "OMP_NUM_THREADS": str(threads),
        "NUMBA_NUM_THREADS": str(threads),
    }
    t0 = time.perf_counter()
    if resumed:  # killed after its second block, then the same command again
        r = subprocess.run(cmd, env={**env, "QMOE_TEST_KILL": "after:1"}, capture_output=True, text=True)
        if r.returncode == 0:
            sys.exit(f"same_bytes: {case} was meant to be killed after block 1 but finished")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"same_bytes: {case} failed with {tree}:\n{r.stderr[-2000:]}")
    done.write_text(" ".join(cmd) + "\n")
    return time.perf_counter() - t0


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def differences(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """``(files of two output directories that differ, report fields only the second has)``. The report is
    compared on its stable fields; a field the newer commit adds (new information, not a changed result) is
    listed apart, a field it drops or changes is a difference."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    diff, added = [], []
    for n in names:
        fa, fb = a / n, b / n
        if not fa.is_file() or not fb.is_file():
            diff.append(f"{n} (only in one)")
        elif n == REPORT:
            ra, rb = _stable(json.loads(fa.read_text())), _stable(json.loads(fb.read_text()))
            added = sorted(set(rb) - set(ra))
            if ra != {k: v for k, v in rb.items() if k in ra}:
                diff.append(n)
        elif fa.read_bytes() != fb.read_bytes():
            diff.append(n)
    return diff, added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit whose bytes are the reference")
    ap.add_argument("--head", default="HEAD", help="the commit (or source directory) to check")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(DEFAULT_CASES))
    ap.add_argument("--threads", type=int, default=1, help="threads per process (the bytes depend on it)")
    ap.add_argument("--work", default="runs/same_bytes", help="exported trees and outputs, reused on rerun")
    ap.add_argument("extra", nargs="*", help="more compress arguments for every case, after --")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    sides = [export(args.base, work), export(args.head, work)]
    sources = shared_sources(sides[0][1], work)
    print(f"base {sides[0][0]}  head {sides[1][0]}  threads {args.threads}", flush=True)
    failed = []
    for case in args.cases:
        outs = []
        seconds = []
        for label, tree in sides:
            out = work / label / case
            reuse = not label.startswith("dir-")
            seconds.append(compress(tree, out, case, args.threads, args.extra, reuse, sources))
            outs.append(out)
        diff, added = differences(*outs)
        files = sum(1 for _ in outs[0].iterdir())
        took = " ".join(f"{s:.0f}s" if s else "cached" for s in seconds)
        verdict = "identical" if not diff else "DIFFERENT: " + ", ".join(diff)
        verdict += f" (the report adds {', '.join(added)})" if added else ""
        print(f"{case:18s} {files:3d} files  {verdict}  ({took})", flush=True)
        if diff:
            failed.append(case)
        if CASES[case][1] and "qwen" in args.cases:  # a resumed run must also equal the run never killed
            same, _ = differences(outs[1].with_name("qwen"), outs[1])
            verdict = "identical" if not same else ", ".join(same)
            print(f"{'':18s} resumed vs uninterrupted (head): {verdict}", flush=True)
            failed += [f"{case} vs qwen"] if same else []
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
