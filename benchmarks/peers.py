"""qmoe side by side with the tools users would pick instead, on the same model and the same tokens.

    python benchmarks/peers.py [--model tiny-qwen3-moe] [--seeds 0 1] [--only qmoe llama.cpp gptq hqq]
        [--data FILE] [--cache DIR] [--work runs/peers] [--json docs/peers.json] [--figure docs/peers.png]
        [--write-docs] [--no-speed]

Only the expert weights differ between variants. Each peer compresses them with its own code, installed
from its published package into its own environment under ``--cache`` (default ``~/.cache/qmoe-peers`` or
``$QMOE_PEERS_CACHE``; built once, reused), and hands back dense expert weights plus the bytes it stores for
them (``peerlib/workers``). Every variant is then measured here with qmoe's evaluation on identical tokens:

- llama.cpp (source vendored by llama-cpp-python): ``convert_hf_to_gguf.py`` -> ``llama-imatrix`` on the
  calibration windows -> ``llama-quantize`` to TQ1_0, IQ1_S, IQ1_M, IQ2_XXS, Q2_K (llama.cpp's own tensor
  mix for each file type) -> read back with the gguf package's dequantization. Its sub-3-bit types need rows
  in multiples of 256 and tiny-qwen3-moe's are 192 wide, so llama.cpp gets an exactly equivalent copy
  zero-padded to 256 (``peerlib/pad.py``) and is charged its bytes per *padded* weight: the rate the format
  has on models whose rows fit it, never the padding;
- GPTQ through llm-compressor: 2 and 3 bits, groups of 128 and 64, asymmetric, on the calibration windows;
- HQQ: 1 and 2 bits (calibration-free);
- qmoe: the default recipe and QMoE's (ternary), 2-bit, ``--target-bits`` points per group
  (``target B``, ``--allocation uniform``) and for the whole model (``budget B``, ``--allocation global``),
  through ``benchmarks/quality.py``'s runs (shared work directory, so its outputs are reused).

Calibration: for seed s, the same 512 token windows of the held-out calibration books that qmoe draws with
``--seed s`` (llama-imatrix gets them as text). Loss increases are paired per evaluation sample against the
uncompressed model, averaged over seeds; the 95% interval combines the spread over samples and seeds.
Generation speed (batch 1, this machine): ``llama-bench`` for the GGUF files and ``qmoe.runtime.generate``
for qmoe and the dense model. A tool that fails to install or run is reported with its error.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (benchmarks/quality.py: the qmoe runs and their protocol)
from peerlib import envs  # noqa: E402
from peerlib.experts import done  # noqa: E402

SPLITS = quality.SPLITS
TOOLS = ("qmoe", "llama.cpp", "gptq", "hqq")
LLAMA_TYPES = (("TQ1_0", False), ("IQ1_S", True), ("IQ1_M", True), ("IQ2_XXS", True), ("Q2_K", True))
GPTQ_SETTINGS = ((2, 128), (2, 64), (3, 128), (3, 64))  # (bits, group size)
HQQ_SETTINGS = ((1, 64), (1, 32), (2, 128), (2, 64))
QMOE_VARIANTS = ("qmoe default", "QMoE recipe", "qmoe default 2-bit")
QMOE_TARGETS = (1.0, 1.2, 1.25, 1.4, 1.56)  # 1.56: IQ1_S's 1.5625 bits/w; 1.25: 0.8x that (issue 22)
QMOE_BUDGETS = (0.6, 0.8, 1.0, 1.2, 1.25, 1.4, 1.6)  # --allocation global (model-wide budget, dropping on)
MARK_BEGIN, MARK_END = "<!-- peers:begin -->", "<!-- peers:end -->"


# ---------------------------------------------------------------------------------------------- data


def calibration(args: argparse.Namespace, tokenizer: Any, adapter: Any, seq_len: int, work: Path) -> dict:
    """Per seed: the token windows qmoe calibrates on (.npy) and the same windows as text (.txt)."""
    from qmoe.calib import load_texts

    out = {}
    for seed in args.seeds:
        npy, txt = work / f"calib-s{seed}.npy", work / f"calib-s{seed}.txt"
        if not txt.is_file():
            ids = adapter.samples(tokenizer, load_texts(args.calib_data), args.calib_samples, seed, seq_len)
            np.save(npy, ids["input_ids"])
            text = "\n".join(tokenizer.decode(r, skip_special_tokens=True) for r in ids["input_ids"])
            txt.with_suffix(".tmp").write_text(text)
            txt.with_suffix(".tmp").replace(txt)
        out[str(seed)] = {"npy": str(npy), "txt": str(txt)}
    return out


def split_user_data(path: str, work: Path) -> tuple[str, str]:
    """``--data FILE``: alternate documents go to calibration and to evaluation, so the two never share
    text. Returns the two files (jsonl, one {"text": ...} per document)."""
    from qmoe.calib import load_texts

    docs = load_texts(path)
    if len(docs) < 4:
        sys.exit(f"--data {path}: {len(docs)} documents; need at least 4 (half calibrate, half evaluate)")
    files = []
    for name, part in (("calib", docs[0::2]), ("eval", docs[1::2])):
        f = work / f"data-{name}.jsonl"
        f.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        files.append(str(f))
    return files[0], files[1]


# ---------------------------------------------------------------------------------------------- peers


def padded_model(src: Path, work: Path) -> tuple[Path, dict[str, int]]:
    """The 256-padded equivalent of ``src`` (made once) and the real widths ``{hidden, intermediate}``."""
    from peerlib.pad import pad_qwen3_moe

    padded, meta = work / "padded-model", work / "padded-model.json"
    if not meta.is_file():
        meta.write_text(json.dumps(pad_qwen3_moe(src, padded)))
    w = json.loads(meta.read_text())
    return padded, {"hidden": w["hidden"], "intermediate": w["intermediate"]}


def peer_jobs(args: argparse.Namespace, work: Path, src: Path) -> dict[str, list[dict]]:
    """tool -> variants: name, seed, output directory and the tool's settings."""
    calibrated_seeds = [str(s) for s in args.seeds]
    padded, widths = padded_model(src, work)
    jobs: dict[str, list[dict]] = {"llama.cpp": [], "gptq": [], "hqq": []}
    for t, imat in LLAMA_TYPES:
        for seed in calibrated_seeds if imat else calibrated_seeds[:1]:
            name = f"llama.cpp {t}" + (" (imatrix)" if imat else "")
            jobs["llama.cpp"].append(
                {
                    "name": name,
                    "type": t,
                    "imatrix": imat,
                    "seed": seed,
                    "out": str(work / "llama.cpp" / f"{t}-s{seed}"),
                }
            )
    for bits, group in GPTQ_SETTINGS:
        for seed in calibrated_seeds:
            v = {
                "name": f"GPTQ {bits}-bit g{group}",
                "bits": bits,
                "group": group,
                "seed": seed,
                "out": str(work / "gptq" / f"w{bits}g{group}-s{seed}"),
            }
            if any(n % group for n in widths.values()):  # llm-compressor refuses partial groups
                v.update(name=v["name"] + " (padded)", model=str(padded), real=widths)
            jobs["gptq"].append(v)
    for bits, group in HQQ_SETTINGS:
        jobs["hqq"].append(
            {
                "name": f"HQQ {bits}-bit g{group}",
                "nbits": bits,
                "group": group,
                "seed": calibrated_seeds[0],
                "out": str(work / "hqq" / f"{bits}bit-g{group}"),
            }
        )
    return jobs


def run_peer(
    tool: str, variants: list[dict], args: argparse.Namespace, work: Path, calib: dict, src: Path
) -> str | None:
    """Set the tool up and run its worker on every variant not yet done. Returns an error or None."""
    import subprocess

    if all(done(Path(v["out"])) for v in variants):
        return None
    cache = Path(args.cache)
    try:
        if tool == "llama.cpp":
            t = envs.setup_llamacpp(cache, args.threads)
        elif tool == "hqq":
            t = envs.setup_hqq(cache)
        else:
            t = envs.setup_llmcompressor(cache)
    except envs.SetupError as exc:
        return f"setup failed: {exc}"
    job: dict[str, Any] = {"variants": variants}
    if tool == "llama.cpp":
        padded, widths = padded_model(src, work)
        job.update(
            t.extra,
            padded=str(padded),
            work=str(work / "llama.cpp" / "files"),
            ctx=args.seq_len,
            threads=args.threads,
            real=widths,
            calib={s: c["txt"] for s, c in calib.items()},
        )
    else:
        job.update(model=str(src), calib={s: c["npy"] for s, c in calib.items()})
    worker = (
        Path(__file__).resolve().parent
        / "peerlib"
        / "workers"
        / {"llama.cpp": "llamacpp_worker.py", "gptq": "llmcompressor_worker.py", "hqq": "hqq_worker.py"}[tool]
    )
    job_file = work / f"job-{tool}.json"
    job_file.write_text(json.dumps(job, indent=1))
    log = work / f"{tool}.log"
    print(
        f"  {tool}: running {sum(not done(Path(v['out'])) for v in variants)} variants (log: {log})",
        flush=True,
    )
    with open(log, "a") as f:
        r = subprocess.run([str(t.python), str(worker), str(job_file)], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-2:]
        return f"worker exited {r.returncode}: {' | '.join(tail)}"
    return None


# ---------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """The uncompressed model and the evaluation windows; swaps expert weights in and scores them."""

    def __init__(
        self, src: Path, eval_data: tuple[str, ...], samples: int, seq_len: int, cache: Path | None = None
    ):
        import torch
        from safetensors.torch import load_file

        from qmoe.adapters import get_adapter
        from qmoe.calib import load_texts
        from qmoe.evaluation import sample_losses
        from qmoe.pipeline.run import EVAL_SEED
        from qmoe.sources import load_model, read_config

        self.model, self.tokenizer, _ = load_model(src)
        self.adapter = get_adapter(read_config(src))
        self.arrays = {
            s: (
                self.adapter.samples(self.tokenizer, load_texts(s), samples, EVAL_SEED, seq_len)["input_ids"],
            )
            for s in eval_data
        }
        self.original = {}
        for f in sorted(src.glob("*.safetensors")):
            self.original.update(load_file(str(f)))
        self._sample_losses = sample_losses
        loaded = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.set_experts(self.original)  # the mapping must reproduce the loaded model exactly
        for name, p in self.model.named_parameters():
            assert torch.equal(p, loaded[name]), f"{name}: expert mapping does not round-trip"
        self.reference = self._cached_reference(cache) if cache is not None else self._score()

    def _cached_reference(self, cache: Path) -> dict[str, np.ndarray]:
        """The uncompressed model's per-sample scores, kept in ``cache`` with a fingerprint of the model's
        weights and the evaluation tokens, so that a rerun on an unchanged model skips that pass."""
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.original):
            h.update(name.encode())
            h.update(self.original[name].float().numpy().tobytes())
        for split in sorted(self.arrays):
            h.update(split.encode())
            h.update(np.ascontiguousarray(self.arrays[split][0]).tobytes())
        key = h.hexdigest()
        if cache.is_file():
            got = dict(np.load(cache))
            if str(got.pop("_key")) == key and set(got) == set(self.arrays):
                return got
        ref = self._score()
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, _key=np.array(key), **ref)
        tmp.replace(cache)
        return ref

    def _score(self) -> dict[str, np.ndarray]:
        return {s: self._sample_losses(self.model, a) for s, a in self.arrays.items()}

    def set_experts(self, weights: dict) -> None:
        """On-disk per-expert keys -> transformers 5's fused ``gate_up_proj [E, 2I, H]``, ``down_proj
        [E, H, I]`` (gate rows first, as its forward chunks them)."""
        import torch

        layers = self.model.model.layers
        for i, layer in enumerate(layers):
            ex = layer.mlp.experts
            n_exp = ex.gate_up_proj.shape[0]
            key = f"model.layers.{i}.mlp.experts.{{}}.{{}}_proj.weight"
            gate_up = torch.stack(
                [
                    torch.cat(
                        [
                            torch.as_tensor(weights[key.format(e, "gate")]),
                            torch.as_tensor(weights[key.format(e, "up")]),
                        ]
                    )
                    for e in range(n_exp)
                ]
            )
            down = torch.stack([torch.as_tensor(weights[key.format(e, "down")]) for e in range(n_exp)])
            with torch.no_grad():
                ex.gate_up_proj.copy_(gate_up.float())
                ex.down_proj.copy_(down.float())

    def score(self, weights: dict) -> dict[str, np.ndarray]:
        self.set_experts(weights)
        try:
            return self._score()
        finally:
            self.set_experts(self.original)


def interval(reference: np.ndarray, per_seed: list[np.ndarray]) -> dict[str, Any]:
    """Loss increase (seed-averaged, paired over samples) and its 95% interval, as in quality.py."""
    from qmoe.evaluation import paired_delta

    tok = reference[:, 1]
    comp = np.mean([c[:, 0] for c in per_seed], 0)
    delta, h = paired_delta(reference[:, 0], comp, tok)
    seeds = [paired_delta(reference[:, 0], c[:, 0], tok)[0] for c in per_seed]
    sd = float(np.std(seeds, ddof=1)) if len(seeds) > 1 else 0.0
    h = float(np.hypot(h, 1.96 * sd / np.sqrt(len(seeds))))
    return {"delta": delta, "ci95": [delta - h, delta + h], "per_seed": seeds}


def qmoe_rows(args: argparse.Namespace, ev: Evaluator) -> list[dict]:
    specs = {k: v for k, v in quality.variants().items() if k in args.qmoe_variants}
    sweep = quality.sweep_variants(args.qmoe_targets, len(args.seeds), args.qmoe_budgets)
    specs.update({k: v for k, v in sweep.items() if not k.endswith(("no-drop", " untuned"))})
    qargs = argparse.Namespace(
        work=args.qmoe_work,
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        eval_samples=args.eval_samples,
    )
    rows = []
    for name, spec in specs.items():
        seeds = list(args.seeds)
        if args.qmoe_existing:  # the longest prefix of --seeds already compressed: computes nothing
            d = quality.model_work_dir(args.qmoe_work, args.model)
            have = [(d / f"{name.replace(' ', '_')}-s{s}" / "qmoe_report.json").is_file() for s in seeds]
            seeds = seeds[: have.index(False)] if False in have else seeds
            if not seeds:
                print(f"  qmoe {name}: no output for seed {args.seeds[0]} yet; left out", flush=True)
                continue
        reps = [quality.run_one(args.model, name, spec, s, qargs) for s in seeds]
        bits = float(np.mean([r["totals"]["expert_bits_per_weight"] for r in reps]))
        for split in SPLITS if args.data is None else ev.arrays:
            evs = [quality._evals(r)[split] for r in reps]
            ref = np.stack([evs[0]["sample_loss_reference"], evs[0]["sample_tokens"]], 1)
            drift = float(np.abs(ref[:, 0] - ev.reference[split][:, 0]).max())
            assert np.array_equal(ref[:, 1], ev.reference[split][:, 1]), f"{split}: different tokens"
            per_seed = [np.stack([e["sample_loss_compressed"], e["sample_tokens"]], 1) for e in evs]
            rows.append(
                {
                    "tool": "qmoe",
                    "variant": name,
                    "expert_bits_per_weight": bits,
                    "split": split,
                    **interval(ref, per_seed),
                    "_inc": [c[:, 0] - ref[:, 0] for c in per_seed],  # per seed, per sample: vs its own ref
                    "_tok": ref[:, 1],
                    "seeds": len(reps),
                    "reference_drift": drift,
                    "dir": str(
                        quality.model_work_dir(args.qmoe_work, args.model)
                        / f"{name.replace(' ', '_')}-s{args.seeds[0]}"
                    ),
                }
            )
    return rows


def peer_rows(tool: str, variants: list[dict], error: str | None, ev: Evaluator) -> list[dict]:
    from safetensors.numpy import load_file

    rows = []
    by_name: dict[str, list[dict]] = {}
    for v in variants:
        by_name.setdefault(v["name"], []).append(v)
    for name, vs in by_name.items():
        ok = [v for v in vs if done(Path(v["out"]))]
        if not ok:
            errs = [(Path(v["out"]) / "error.txt") for v in vs]
            msg = next((e.read_text().strip() for e in errs if e.is_file()), error or "no output")
            rows += [{"tool": tool, "variant": name, "split": s, "error": msg} for s in ev.arrays]
            continue
        infos = [json.loads((Path(v["out"]) / "info.json").read_text()) for v in ok]
        scores = []
        for v in ok:
            cache = Path(v["out"]) / "scores.npz"
            if not cache.is_file():
                np.savez(cache, **ev.score(load_file(str(Path(v["out"]) / "experts.safetensors"))))
            scores.append(dict(np.load(cache)))
        bits = float(np.mean([i["expert_bits_per_weight"] for i in infos]))
        for split in ev.arrays:
            rows.append(
                {
                    "tool": tool,
                    "variant": name,
                    "expert_bits_per_weight": bits,
                    "split": split,
                    **interval(ev.reference[split], [s[split] for s in scores]),
                    "_inc": [s[split][:, 0] - ev.reference[split][:, 0] for s in scores],
                    "_tok": ev.reference[split][:, 1],
                    "seeds": len(ok),
                    "detail": infos[0],
                }
            )
    return rows


def speed_phase(args: argparse.Namespace, rows: list[dict], src: Path, work: Path) -> dict[str, dict]:
    """Batch-1 generation in tokens/s, measured one after the other in this phase: the dense model in
    transformers and qmoe's outputs through ``qmoe.runtime.generate`` (3 timed runs of ``--gen-tokens``
    after a warm-up), and every llama.cpp file (seed 0) and its F16 source through ``llama-bench -p 0 -n``
    (5 repetitions). Saved to ``work/speed.json``; ``--no-speed`` reuses it."""
    import subprocess

    import torch

    from qmoe.runtime.generate import generate
    from qmoe.sources import load_model

    torch.set_num_threads(args.threads)
    first = [r for r in rows if r["split"] == rows[0]["split"] and "error" not in r]
    dirs = {"dense fp32 (transformers)": src}
    dirs.update(
        {
            r["variant"]: Path(r["dir"])
            for r in first
            if r["tool"] == "qmoe" and r["variant"] in ("qmoe default", "qmoe default 2-bit")
        }
    )
    out: dict[str, dict] = {}
    for name, d in dirs.items():
        model, tok, _ = load_model(d)
        generate(model, tok, "In the beginning", max_new_tokens=8, exact=True)  # warm-up
        runs = [
            generate(model, tok, "In the beginning", max_new_tokens=args.gen_tokens, exact=True).tokens_per_s
            for _ in range(3)
        ]
        out[name] = {
            "tokens_per_second": float(np.mean(runs)),
            "stddev": float(np.std(runs)),
            "threads": args.threads,
            "tokens": args.gen_tokens,
            "note": "qmoe.runtime.generate",
        }
        print(f"  speed {name}: {out[name]['tokens_per_second']:.1f} tokens/s", flush=True)
    files = work / "llama.cpp" / "files"
    ggufs = {"llama.cpp F16": files / "f16.gguf"}
    ggufs.update({r["variant"]: files / r["detail"]["file"] for r in first if r["tool"] == "llama.cpp"})
    ggufs = {k: v for k, v in ggufs.items() if v.is_file()}
    if ggufs:
        bench = Path(envs.setup_llamacpp(Path(args.cache), args.threads).extra["bin"]) / "llama-bench"
        for name, f in ggufs.items():
            cmd = [
                str(bench),
                "-m",
                str(f),
                "-p",
                "0",
                "-n",
                str(args.gen_tokens),
                "-r",
                "5",
                "-t",
                str(args.threads),
                "-o",
                "json",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                out[name] = {"error": r.stderr.strip().splitlines()[-1:]}
                continue
            b = json.loads(r.stdout)[0]
            out[name] = {
                "tokens_per_second": b["avg_ts"],
                "stddev": b["stddev_ts"],
                "threads": b["n_threads"],
                "tokens": b["n_gen"],
                "note": "llama-bench, 256-padded model (1.8x the expert weights)",
            }
            print(f"  speed {name}: {b['avg_ts']:.1f} tokens/s", flush=True)
    (work / "speed.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- report


def targets(rows: list[dict]) -> list[str]:
    """The issue's three targets, checked per split on the rows."""
    lines = []
    for split in sorted({r["split"] for r in rows}):
        ok = [r for r in rows if r["split"] == split and "error" not in r]
        peers = [r for r in ok if r["tool"] != "qmoe"]
        mine = {r["variant"]: r for r in ok if r["tool"] == "qmoe"}
        if not peers or "qmoe default" not in mine:
            continue
        d = mine["qmoe default"]
        dominating = [
            p["variant"]
            for p in peers
            if p["expert_bits_per_weight"] < d["expert_bits_per_weight"] and p["delta"] < d["delta"]
        ]
        smallest = min(peers, key=lambda p: p["expert_bits_per_weight"])
        limit = smallest["expert_bits_per_weight"] * 1.01  # "at that size": within 1% of it, or below
        at = [m for m in mine.values() if m["expert_bits_per_weight"] <= limit]
        best = min(at, key=lambda m: m["delta"]) if at else None
        rivals = [p for p in peers if p["expert_bits_per_weight"] <= limit]
        beaten = best is not None and all(best["ci95"][1] < p["ci95"][0] for p in rivals)
        ratio = d["expert_bits_per_weight"] / smallest["expert_bits_per_weight"]
        lines.append(
            f"{split}: default ternary ({d['expert_bits_per_weight']:.3f} b/w, {d['delta']:+.4f}) "
            f"{'dominated by ' + ', '.join(dominating) if dominating else 'not dominated'}; smallest peer "
            f"{smallest['variant']} {smallest['expert_bits_per_weight']:.3f} b/w {smallest['delta']:+.4f}; "
            + (
                f"qmoe at that size: {best['variant']} {best['expert_bits_per_weight']:.3f} b/w "
                f"{best['delta']:+.4f} "
                f"{'beats' if beaten else 'does NOT beat (intervals overlap or worse)'} all "
                f"{len(rivals)} peer variants at or below that size; "
                if best
                else "no qmoe point at that size; "
            )
            + f"ternary/smallest-peer bits {ratio:.2f}x (target <= 0.6x)"
        )
    return lines


def paired(a: dict, b: dict) -> dict[str, float]:
    """Paired difference of loss increases ``a - b`` (rows of one split) over the seeds both ran: per sample
    (seed-averaged increases, each against its own reference pass) with its 95% interval, widened by the
    spread of the per-seed differences when both have several seeds, as ``quality.compare``. Also the ratio
    of the two increases over those seeds."""
    from qmoe.evaluation import paired_delta

    n = min(len(a["_inc"]), len(b["_inc"]))
    tok = a["_tok"]
    ia, ib = np.mean(a["_inc"][:n], 0), np.mean(b["_inc"][:n], 0)
    diff, h = paired_delta(ib, ia, tok)
    if n > 1:
        per_seed = [paired_delta(y, x, tok)[0] for x, y in zip(a["_inc"][:n], b["_inc"][:n], strict=True)]
        h = float(np.hypot(h, 1.96 * np.std(per_seed, ddof=1) / np.sqrt(n)))
    da, db = ia.sum() / tok.sum(), ib.sum() / tok.sum()
    return {"difference": diff, "ci95": h, "ratio": float(da / db) if db else float("nan"), "seeds": n}


def _fmt(c: dict) -> str:
    return f"{c['difference']:+.4f} ± {c['ci95']:.4f} ({c['ratio']:.2f}x, {c['seeds']} seeds)"


def issue_targets(rows: list[dict]) -> list[str]:
    """Issues 22 and 23 against the peers, per split, paired on the same samples and seeds: qmoe at 1.25
    bits/w (0.8x IQ1_S) against IQ1_S; no qmoe point in 0.6-2.2 bits/w dominated by a peer (fewer bits and a
    smaller increase, paired interval below zero); qmoe's 2-bit point against IQ2_XXS."""
    lines = []
    for split in dict.fromkeys(r["split"] for r in rows):
        if split == "pydoc":  # out of domain: damaged models gain there, so it ranks nothing
            continue
        ok = [r for r in rows if r["split"] == split and "error" not in r and "_inc" in r]
        peers = [r for r in ok if r["tool"] != "qmoe"]
        mine = [r for r in ok if r["tool"] == "qmoe"]
        by = {r["variant"]: r for r in ok}
        iq1, iq2 = by.get("llama.cpp IQ1_S (imatrix)"), by.get("llama.cpp IQ2_XXS (imatrix)")
        if iq1:
            for m in mine:
                if abs(m["expert_bits_per_weight"] - 0.8 * iq1["expert_bits_per_weight"]) < 0.02:
                    c = paired(m, iq1)
                    verdict = "smaller" if c["difference"] + c["ci95"] < 0 else "NOT smaller (paired)"
                    lines.append(
                        f"{split}: {m['variant']} ({m['expert_bits_per_weight']:.3f} b/w, {m['delta']:+.4f}) "
                        f"vs IQ1_S ({iq1['expert_bits_per_weight']:.3f} b/w, {iq1['delta']:+.4f}): "
                        f"{_fmt(c)} -> {verdict}"
                    )
        dominated = []
        for m in sorted(mine, key=lambda r: r["expert_bits_per_weight"]):
            if not 0.6 <= m["expert_bits_per_weight"] <= 2.2:
                continue
            for p in peers:
                if p["expert_bits_per_weight"] < m["expert_bits_per_weight"] and p["delta"] < m["delta"]:
                    c = paired(m, p)
                    sig = "significant" if c["difference"] - c["ci95"] > 0 else "within the interval"
                    dominated.append(f"{m['variant']} by {p['variant']} ({_fmt(c)}, {sig})")
        n_in = sum(0.6 <= m["expert_bits_per_weight"] <= 2.2 for m in mine)
        lines.append(
            f"{split}: qmoe points in 0.6-2.2 b/w dominated by a peer row: "
            + ("; ".join(dominated) if dominated else f"none of {n_in}")
        )
        two = by.get("qmoe default 2-bit")
        if iq2 and two:
            c = paired(two, iq2)
            fewer = two["expert_bits_per_weight"] < iq2["expert_bits_per_weight"]
            better = c["difference"] + c["ci95"] < 0
            lines.append(
                f"{split}: qmoe default 2-bit ({two['expert_bits_per_weight']:.3f} b/w, {two['delta']:+.4f}) "
                f"vs "
                f"IQ2_XXS ({iq2['expert_bits_per_weight']:.3f} b/w, {iq2['delta']:+.4f}): {_fmt(c)}; "
                f"{'fewer' if fewer else 'NOT fewer'} bits, "
                f"{'smaller increase (paired)' if better else 'increase NOT smaller (paired)'} -> "
                f"{'dominates' if fewer and better else 'does NOT dominate'}; ratio "
                f"{c['ratio']:.2f}x (target <= 0.8x{'' if fewer else ', but at more bits'})"
            )
        if iq2:  # every qmoe point below IQ2_XXS's size whose mean increase is below its: the verdict either way
            below = [m for m in mine if m["expert_bits_per_weight"] < iq2["expert_bits_per_weight"]]
            for m in sorted(below, key=lambda r: r["expert_bits_per_weight"]):
                c = paired(m, iq2)
                if c["difference"] < 0:
                    verdict = "dominates" if c["difference"] + c["ci95"] < 0 else "does NOT dominate (paired)"
                    lines.append(
                        f"{split}: {m['variant']} ({m['expert_bits_per_weight']:.3f} b/w, {m['delta']:+.4f}) "
                        f"vs IQ2_XXS ({iq2['expert_bits_per_weight']:.3f} b/w, {iq2['delta']:+.4f}): "
                        f"{_fmt(c)} -> {verdict}"
                    )
    return lines


def markdown(rows: list[dict], speed: dict, meta: dict) -> str:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    names = list(dict.fromkeys((r["tool"], r["variant"]) for r in rows))
    lines = [
        f"`{meta['command']}` ({meta['machine']}; seeds {meta['seeds']}; {meta['eval_samples']} samples "
        "per split)\n",
        "| tool | variant | expert bits/w | "
        + " | ".join(f"{s}: loss increase [95% CI]" for s in splits)
        + " | seeds |",
        "|---|---|---|" + "---|" * len(splits) + "---|",
    ]
    for tool, variant in sorted(
        names,
        key=lambda n: min(
            r.get("expert_bits_per_weight", 99) for r in rows if (r["tool"], r["variant"]) == n
        ),
    ):
        rs = {r["split"]: r for r in rows if (r["tool"], r["variant"]) == (tool, variant)}
        first = rs[splits[0]]
        if "error" in first:
            lines.append(f"| {tool} | {variant} | failed | {first['error'][:160]} |" + " |" * len(splits))
            continue
        cells = " | ".join(
            f"{rs[s]['delta']:+.4f} [{rs[s]['ci95'][0]:+.4f}, {rs[s]['ci95'][1]:+.4f}]" for s in splits
        )
        name = f"**{variant}**" if tool == "qmoe" else variant
        lines.append(
            f"| {tool} | {name} | {first['expert_bits_per_weight']:.3f} | {cells} | {first['seeds']} |"
        )
    if speed:
        lines += ["", "| generation, batch 1 | tokens/s | threads | note |", "|---|---|---|---|"]
        for name, s in speed.items():
            if "error" in s:
                lines.append(f"| {name} | failed: {s['error']} | | |")
                continue
            lines.append(
                f"| {name} | {s['tokens_per_second']:.1f} ± {s['stddev']:.1f} | {s['threads']} | "
                f"{s.get('note', '')} |"
            )
    lines += ["", "Targets (from these rows):", ""] + [f"- {t}" for t in targets(rows)]
    lines += ["", "Issues 22 and 23 (paired A - B [95% CI] (A/B), over the seeds both ran):", ""]
    lines += [f"- {t}" for t in issue_targets(rows)]
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, split: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    style = {
        "qmoe": ("C0", "o"),
        "qmoe --allocation global": ("C4", "*"),
        "llama.cpp": ("C3", "s"),
        "gptq": ("C2", "D"),
        "hqq": ("C1", "^"),
    }

    def kind(r: dict) -> str:
        return "qmoe --allocation global" if r["variant"].startswith("budget ") else r["tool"]

    for tool, (color, marker) in style.items():
        rs = sorted(
            (r for r in rows if kind(r) == tool and r["split"] == split and "error" not in r),
            key=lambda r: r["expert_bits_per_weight"],
        )
        for i, r in enumerate(rs):
            lo, hi = r["ci95"]
            ax.errorbar(
                [r["expert_bits_per_weight"]],
                [r["delta"]],
                yerr=[[r["delta"] - lo], [hi - r["delta"]]],
                fmt=marker,
                color=color,
                capsize=3,
                label=tool if i == 0 else None,
            )
            ax.annotate(
                r["variant"].replace("llama.cpp ", "").replace(" (imatrix)", "*"),
                (r["expert_bits_per_weight"], r["delta"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_yscale("log")
    ax.set_xlabel("expert bits/weight (every stored byte)")
    ax.set_ylabel(f"{split} loss increase, nats (95% CI)")
    ax.set_title(f"{model}: expert weights compressed by each tool")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="tiny-qwen3-moe", help="a Qwen3-MoE checkpoint (built-in or directory)"
    )
    ap.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1], help="calibration seeds (same windows per tool)"
    )
    ap.add_argument("--only", nargs="+", choices=TOOLS, default=list(TOOLS), help="rerun only these tools")
    ap.add_argument(
        "--data", default=None, help="your own .txt/.jsonl: half its documents calibrate, half evaluate"
    )
    ap.add_argument("--cache", default=str(envs.default_cache()), help="peer environments and builds")
    ap.add_argument("--work", default="runs/peers", help="peer outputs and scores, reused on rerun")
    ap.add_argument("--qmoe-work", default="runs/quality", help="qmoe outputs (shared with quality.py)")
    ap.add_argument(
        "--qmoe-variants", nargs="*", default=list(QMOE_VARIANTS), help="quality.py's qmoe recipes to show"
    )
    ap.add_argument(
        "--qmoe-targets", nargs="*", type=float, default=list(QMOE_TARGETS), help="per-group --target-bits"
    )
    ap.add_argument(
        "--qmoe-budgets",
        nargs="*",
        type=float,
        default=list(QMOE_BUDGETS),
        help="--target-bits with --allocation global (model-wide budget)",
    )
    ap.add_argument(
        "--qmoe-existing",
        action="store_true",
        help="qmoe rows from outputs already in --qmoe-work only (per variant the seeds done, in order)",
    )
    ap.add_argument("--figure-split", default="test", help="the split the figure plots (test: the headline)")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--no-speed", dest="speed", action="store_false", help="skip the generation timings")
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None)
    ap.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/peers.md")
    args = ap.parse_args()

    import torch

    from qmoe.config import CompressConfig
    from qmoe.sources import resolve_source

    t0 = time.perf_counter()
    src = resolve_source(args.model)
    work = quality.model_work_dir(args.work, args.model)
    if args.data is not None:
        work = work.with_name(f"{work.name}-{Path(args.data).stem}")
    work.mkdir(parents=True, exist_ok=True)
    args.seq_len = CompressConfig().seq_len
    args.calib_data, eval_data = "calibration", SPLITS
    if args.data is not None:
        args.calib_data, eval_file = split_user_data(args.data, work)
        eval_data = (eval_file, "pydoc")
        args.qmoe_work = str(work / "qmoe")
        quality.SPLITS = eval_data  # qmoe's runs evaluate the same texts
    ev = Evaluator(
        src, eval_data, args.eval_samples, args.seq_len, work / f"reference-{args.eval_samples}.npz"
    )
    calib = calibration(args, ev.tokenizer, ev.adapter, args.seq_len, work)

    rows: list[dict] = []
    jobs = peer_jobs(args, work, src)
    for tool in ("llama.cpp", "gptq", "hqq"):
        if tool not in args.only and not any(done(Path(v["out"])) for v in jobs[tool]):
            continue  # neither run now nor earlier: not a row
        error = run_peer(tool, jobs[tool], args, work, calib, src) if tool in args.only else None
        if error:
            print(f"  {tool}: {error}", flush=True)
        rows += peer_rows(tool, jobs[tool], error, ev)
    rows += qmoe_rows(args, ev)

    speed: dict[str, dict] = {}
    if args.speed:
        speed = speed_phase(args, rows, src, work)
    elif (work / "speed.json").is_file():
        speed = json.loads((work / "speed.json").read_text())
    meta = {
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor()} {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": args.model,
        "seeds": args.seeds,
        "eval_samples": args.eval_samples,
        "calib_samples": args.calib_samples,
        "setup_seconds": envs.setup_seconds(Path(args.cache)),
        "wall_seconds": time.perf_counter() - t0,
        "pins": {"llama.cpp": envs.LLAMA_CPP_PYTHON, "hqq": envs.HQQ, "llm-compressor": envs.LLMCOMPRESSOR},
    }
    text = markdown(rows, speed, meta)
    print(text)
    if args.json:
        keep = (
            "tool",
            "variant",
            "expert_bits_per_weight",
            "split",
            "delta",
            "ci95",
            "seeds",
            "per_seed",
            "error",
            "detail",
            "reference_drift",
        )
        out = [{("loss_increase" if k == "delta" else k): r[k] for k in keep if k in r} for r in rows]
        Path(args.json).write_text(json.dumps({"meta": meta, "speed": speed, "rows": out}, indent=1) + "\n")
    if args.figure:
        split = args.figure_split if args.figure_split in eval_data else eval_data[0]
        figure(rows, Path(args.figure), split, Path(args.model).name)
    if args.write_docs:
        doc = Path(__file__).resolve().parents[1] / "docs" / "peers.md"
        body = doc.read_text()
        i, j = body.index(MARK_BEGIN), body.index(MARK_END)
        doc.write_text(f"{body[: i + len(MARK_BEGIN)]}\n{text}\n{body[j:]}")


if __name__ == "__main__":
    main()
