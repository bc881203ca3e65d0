"""Run a compressed model larger than this machine's memory (issue 28): mapped experts, checks on first use.

    python benchmarks/larger_than_memory.py --big runs/ltm/c2048-shapes     # writes it first if missing
    python benchmarks/larger_than_memory.py --speed                        # built-in models, mapped vs read
    python benchmarks/larger_than_memory.py --big DIR --speed --out docs/larger_than_memory.json

``--big DIR``: a SwitchTransformers checkpoint with switch-c-2048's expert shapes (2080x6144, 2048 experts per
sparse block) and enough blocks for ``--ratio`` x this machine's RAM, written straight from codes by
``benchmarks/ltm_checkpoint.py`` (reused encoded experts with 90% zeros; resumable). Then, each step in a
child process whose resident set is sampled every 0.1 s (psutil) besides its ``ru_maxrss``:

1. cold: the page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``, root only; else the run says so), then
   ``qmoe.load`` (timed), one generation of ``--new-tokens`` tokens (exactly that many, greedy; the first
   token's time taken by a streamer), the tokens/s of the whole call;
2. warm: the same again in a new process, the files now in the page cache as far as they fit;
3. ``qmoe generate DIR`` itself (the CLI), its peak RSS;
4. corruption: one byte of the stream of an expert that the prompt routes to is flipped in place;
   ``qmoe.load`` must succeed and the generation fail with a one-line FormatError naming file, matrix and
   row; ``qmoe verify DIR`` must report exactly that matrix; the byte is restored afterwards (also if a
   step fails).

``--speed``: the built-in models (tiny-switch, tiny-qwen3-moe) compressed with round to nearest (as in
benchmarks/runtime.py), each loaded twice in one process, mapped (the default) and read into memory
(``mapped=False``, qmoe's loading before issue 28), one untimed token each on another prompt (compiled
code), then generating in alternation (``--rounds`` rounds, the order alternating; the first round pays the
mapped experts' first-use checks of the experts the warm-up did not route to); medians and the ratio.

Writes ``--out`` (JSON: machine, command, every number; the keys named in issue 28 at the top level), merged
into what the file already holds (so ``--big`` and ``--speed`` may run separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

PROMPT = "And God said, Let there be light: and there was light."
HERE = Path(__file__).resolve().parent


# -- child: one timed load + generation --------------------------------------------------------------------


def child(path: str, new_tokens: int, probe: bool) -> dict:
    """In a fresh process: load (timed), generate ``new_tokens`` (first token timed); with ``probe``, also
    name the first expert matrix the prompt routes to in the first MoE layer (for the corruption step)."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoTokenizer

    import qmoe
    from qmoe.codec.mapped import MappedMatrix
    from qmoe.runtime.experts import CompressedExperts

    t_import = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    model = qmoe.load(path)
    load_s, load_cpu = time.perf_counter() - t1, time.process_time() - c1
    rss_load = psutil.Process().memory_info().rss
    tok = AutoTokenizer.from_pretrained(path)
    layer = next(m for m in model.modules() if isinstance(m, CompressedExperts))
    names = {e: m.name for e, m in enumerate(layer.matrices["wi"]) if isinstance(m, MappedMatrix)}
    routed: list[int] = []
    hook = layer.register_forward_pre_hook(
        lambda mod, args, kwargs: routed.extend(mod.routing(args, kwargs).expert.tolist()), with_kwargs=True)

    class Stamps:  # transformers calls put() with the decoder start, then once per new token
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = tok(PROMPT, return_tensors="pt")
    stamps = Stamps()
    with torch.inference_mode():
        t2, c2 = time.perf_counter(), time.process_time()
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=stamps)
        gen_s, gen_cpu = time.perf_counter() - t2, time.process_time() - c2
    hook.remove()
    n = int(out.shape[1]) - 1
    # CPU seconds next to wall seconds: on a shared machine the wall clock also counts other jobs' time.
    res = {"import_seconds": t_import, "load_seconds": load_s, "load_cpu_seconds": load_cpu,
           "generate_cpu_seconds": gen_cpu, "load_average": os.getloadavg(), "rss_after_load": rss_load,
           "first_token_seconds": stamps.times[1] - t2, "generate_seconds": gen_s, "new_tokens": n,
           "tokens_per_s": n / gen_s, "text": tok.decode(out[0], skip_special_tokens=True),
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if probe:
        res["probe_matrix"] = next(names[e] for e in routed if e in names)
    return res


def child_corrupt(path: str) -> dict:
    """Load (must succeed), then generate one token (must fail with the FormatError)."""
    import qmoe
    from qmoe.errors import FormatError
    from qmoe.runtime.generate import generate

    t = time.perf_counter()
    model = qmoe.load(path)
    res: dict = {"load_ok": True, "load_seconds": time.perf_counter() - t}
    from transformers import AutoTokenizer

    try:
        generate(model, AutoTokenizer.from_pretrained(path), PROMPT, max_new_tokens=1)
        res["error"] = None
    except FormatError as err:
        res["error"] = str(err)
    return res


# -- parent ------------------------------------------------------------------------------------------------


def sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd``; (result, peak RSS of it and its children sampled every 0.1 s, or ru_maxrss if larger)."""
    src = [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(src)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            kids = sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, ps.memory_info().rss + kids)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after > before:
        peak = max(peak, after * 1024)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak


def run_child(args: list[str]) -> tuple[dict, int]:
    res, peak = sampled([sys.executable, __file__, "--child", *args])
    if res.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), peak


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def flip(path: Path, matrix: str) -> tuple[Path, int]:
    """Flip one byte in the middle of ``matrix``'s stream in its shard; returns (file, offset)."""
    from qmoe.codec.mapped import open_shard

    for f in sorted(path.glob("*.safetensors")):
        shard = open_shard(f)
        if matrix in shard.encoded:
            m = shard.encoded[matrix]
            offset = m.parts["qmoe"].begin + 64 + 4 * (m.get().stream.size // 2)  # past the 64-byte header
            del shard, m
            xor_byte(f, offset)
            return f, offset
    raise SystemExit(f"{matrix} is in no shard of {path}")


def xor_byte(f: Path, offset: int) -> None:
    """XOR the byte at ``offset`` of ``f`` with 0x5A: flips it, and a second call restores it."""
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x5A]))


def big(path: Path, args: argparse.Namespace) -> dict:
    ram = psutil.virtual_memory().total
    if not (path / "config.json").is_file():
        cmd = [sys.executable, str(HERE / "ltm_checkpoint.py"), "--out", str(path),
               "--target-gb", str(args.ratio * ram / 1e9)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    out: dict = {"checkpoint": str(path), "checkpoint_bytes": size, "ram_bytes": ram,
                 "checkpoint_over_ram": size / ram, "config": json.loads((path / "config.json").read_text())}
    swap0 = psutil.swap_memory()
    out["dropped_caches"] = drop_caches()
    cold, peak_cold = run_child([str(path), str(args.new_tokens)])
    print(f"cold: {json.dumps(cold)} peak {peak_cold / 2**30:.2f} GiB", flush=True)
    warm, peak_warm = run_child([str(path), str(args.new_tokens), "--probe"])
    print(f"warm: {json.dumps(warm)} peak {peak_warm / 2**30:.2f} GiB", flush=True)
    cli, peak_cli = sampled([sys.executable, "-m", "qmoe", "generate", str(path), "--prompt", PROMPT,
                             "--max-new-tokens", str(args.new_tokens)])
    if cli.returncode != 0:
        raise SystemExit(f"qmoe generate failed:\n{cli.stderr[-3000:]}")
    last = cli.stderr.strip().splitlines()[-1]
    print(f"qmoe generate: peak {peak_cli / 2**30:.2f} GiB; {last}", flush=True)
    out.update(cold={**cold, "peak_rss": peak_cold}, warm={**warm, "peak_rss": peak_warm},
               qmoe_generate={"peak_rss": peak_cli, "stderr_last": cli.stderr.strip().splitlines()[-1]})
    out["peak_rss_bytes"] = max(peak_cold, peak_warm, peak_cli)
    out["load_seconds"] = cold["load_seconds"]
    out["first_token_seconds_cold"] = cold["first_token_seconds"]
    out["first_token_seconds_warm"] = warm["first_token_seconds"]
    out["tokens_per_s_cold"] = cold["tokens_per_s"]
    out["tokens_per_s_warm"] = warm["tokens_per_s"]
    swap1 = psutil.swap_memory()
    out["swap"] = {"total": swap1.total, "used_before": swap0.used, "used_after": swap1.used}
    if args.corrupt:
        out["corruption"] = corruption(path, warm["probe_matrix"])
    return out


def corruption(path: Path, matrix: str) -> dict:
    f, offset = flip(path, matrix)
    res: dict = {"matrix": matrix, "file": str(f), "offset": offset}
    try:
        got, _ = run_child([str(path), "--corrupt"])
        res.update(got)
        res["error_names_file_matrix_row"] = bool(got["error"]) and all(
            s in got["error"] for s in (str(f), repr(matrix), "row ")) and "\n" not in got["error"]
        print(f"corrupt: {json.dumps(got)}", flush=True)
        t = time.perf_counter()
        v, peak = sampled([sys.executable, "-m", "qmoe", "verify", str(path), "--json", "--quiet"])
        report = json.loads(v.stdout)
        res["verify"] = {"exit_code": v.returncode, "seconds": time.perf_counter() - t, "peak_rss": peak,
                         "problems": report["problems"], "bytes": report["bytes"],
                         "matrices": report["matrices"]}
        res["verify_finds_it"] = len(report["problems"]) == 1 and repr(matrix) in report["problems"][0]
        print(f"verify: {json.dumps(res['verify'])}", flush=True)
    finally:
        xor_byte(f, offset)  # the same XOR restores the byte (the matrix no longer opens to find it)
    return res


def speed(args: argparse.Namespace) -> dict:
    """Built-in models: mapped vs read at load, one process, interleaved rounds."""
    sys.path.insert(0, str(HERE))
    from runtime import build_compressed

    import qmoe
    from qmoe.runtime.generate import generate
    from qmoe.sources import load_model, resolve_source

    out = {}
    for name in ("tiny-switch", "tiny-qwen3-moe"):
        comp = Path(args.work) / f"{name}-rtn"
        if not (comp / "config.json").is_file():
            build_compressed(resolve_source(name), comp)
        _, tok, _ = load_model(comp)
        models = {"read": qmoe.load(comp, mapped=False), "mapped": qmoe.load(comp)}
        for m in models.values():  # compiled code and kernel tables, on another prompt than the timed one
            generate(m, tok, "In the beginning", max_new_tokens=1)
        times: dict[str, list[float]] = {k: [] for k in models}
        for r in range(args.rounds):
            for k in (["read", "mapped"] if r % 2 == 0 else ["mapped", "read"]):  # order alternates
                g = generate(models[k], tok, PROMPT, max_new_tokens=args.speed_tokens, exact=True)
                times[k].append(g.tokens_per_s)
        med = {k: statistics.median(v) for k, v in times.items()}
        # Paired: a round's two runs are seconds apart, so the drifting load of the machine cancels.
        paired = statistics.median(m / r for m, r in zip(times["mapped"], times["read"], strict=True))
        out[name] = {"tokens_per_s": med, "first_round": {k: v[0] for k, v in times.items()},
                     "rounds": times, "ratio_mapped_over_read": med["mapped"] / med["read"],
                     "paired_ratio_median": paired}
        print(f"{name}: read {med['read']:.1f} tok/s, mapped {med['mapped']:.1f} tok/s, "
              f"ratio of medians {med['mapped'] / med['read']:.3f}, median of paired ratios {paired:.3f} "
              f"(first round {times['read'][0]:.1f} vs {times['mapped'][0]:.1f})", flush=True)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        res = child_corrupt(a[0]) if "--corrupt" in a else child(a[0], int(a[1]), "--probe" in a)
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", metavar="DIR", help="the larger-than-memory checkpoint (written if missing)")
    ap.add_argument("--ratio", type=float, default=1.3, help="checkpoint size / RAM when writing it")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-corrupt", dest="corrupt", action="store_false", help="skip the corruption step")
    ap.add_argument("--speed", action="store_true", help="built-in models: mapped vs read at load")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--work", default="runs/ltm")
    ap.add_argument("--out", default="docs/larger_than_memory.json")
    args = ap.parse_args()
    import torch
    import transformers

    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "machine": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
                             "platform": platform.platform(), "python": platform.python_version(),
                             "torch": torch.__version__, "transformers": transformers.__version__,
                             "load_average": os.getloadavg()},
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.big:
        res.update(big(Path(args.big), args))
        res["command_big"] = res["command"]
    if args.speed:
        res["speed"] = speed(args)
        res["command_speed"] = res["command"]
    if Path(args.out).is_file():  # runs of --big and --speed at different times add up in one file
        res = {**json.loads(Path(args.out).read_text()), **res}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
