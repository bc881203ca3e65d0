"""llama.cpp worker, run with the Python of llama.cpp's environment: ``python llamacpp.py job.json``.

Converts the (padded, see ``peerlib/pad.py``) checkpoint with llama.cpp's ``convert_hf_to_gguf.py``, builds an
importance matrix per calibration seed with ``llama-imatrix``, quantizes with ``llama-quantize`` (llama.cpp's
own per-tensor mix for each file type), reads the expert tensors back with the gguf package's dequantization,
Every step's output is cached in the job's work directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for peerlib

from peerlib.experts import GGUF_EXPERTS, run_variants, unstack_gguf, write_variant  # noqa: E402
from peerlib.gguf_bytes import tensor_bytes  # noqa: E402
from peerlib.pad import crop  # noqa: E402

# The converter hashes the tokenizer's pre-tokenization to pick llama.cpp's; qmoe's built-in tokenizers are
# byte-level BPE with GPT-2's split regex, a hash it does not list. Tokenization only feeds llama-imatrix.
CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        r = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = log.read_text().splitlines()[-5:]
        raise RuntimeError(f"{Path(cmd[0]).name} exited {r.returncode}: {' | '.join(tail)}")


def convert(job: dict, work: Path, log: Path) -> Path:
    f16 = work / "f16.gguf"
    if not f16.is_file():
        tmp = work / "f16.gguf.tmp"
        run(
            [
                sys.executable,
                "-c",
                CONVERT,
                job["llama_dir"],
                job["padded"],
                "--outtype",
                "f16",
                "--outfile",
                tmp,
            ],
            log,
        )
        verify_f16(tmp, Path(job["padded"]))
        os.replace(tmp, f16)
    return f16


def imatrix(job: dict, work: Path, f16: Path, seed: str, log: Path) -> Path:
    out = work / f"imatrix-s{seed}.gguf"
    if not out.is_file():
        tmp = work / f"imatrix-s{seed}.tmp.gguf"
        run(
            [
                Path(job["bin"]) / "llama-imatrix",
                "-m",
                f16,
                "-f",
                job["calib"][seed],
                "-o",
                tmp,
                "-c",
                str(job["ctx"]),
                "-t",
                str(job["threads"]),
                "--no-ppl",
            ],
            log,
        )
        os.replace(tmp, out)
    return out


def verify_f16(f16: Path, padded: Path) -> None:
    """The unquantized GGUF must read back as the checkpoint's own expert weights, bit for bit: this checks
    the layout (stacking, gate/up order, orientation) that every quantized read-back relies on."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    sd: dict = {}
    for f in sorted(padded.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    n = 0
    for t in GGUFReader(str(f16)).tensors:
        if GGUF_EXPERTS.fullmatch(t.name):
            for k, w in unstack_gguf(t.name, dequantize(t.data, t.tensor_type)).items():
                if not np.array_equal(w, sd[k].astype(np.float32)):
                    raise RuntimeError(
                        f"{t.name} does not read back as {k}; the expert layout is not understood"
                    )
                n += 1
    if n == 0:
        raise RuntimeError(f"{f16} holds no stacked expert tensors (blk.L.ffn_*_exps.weight)")


def quantize(job: dict, work: Path, f16: Path, v: dict, log: Path) -> Path:
    out = work / f"{v['type']}-{'s' + v['seed'] if v['imatrix'] else 'noimat'}.gguf"
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        cmd = [Path(job["bin"]) / "llama-quantize"]
        if v["imatrix"]:
            cmd += ["--imatrix", imatrix(job, work, f16, v["seed"], log)]
        run([*cmd, f16, tmp, v["type"], str(job["threads"])], log)
        os.replace(tmp, out)
    return out


def read_back(gguf: Path, real: dict) -> tuple[dict, dict]:
    """Dense real-corner expert weights and the bytes the file spends on expert tensors."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf))
    weights: dict = {}
    types: dict[str, int] = {}
    for t in reader.tensors:
        m = GGUF_EXPERTS.fullmatch(t.name)
        if not m:
            continue
        dense = dequantize(t.data, t.tensor_type)  # [E, out, in] float32 (padded widths)
        rows, cols = (
            (real["intermediate"], real["hidden"])
            if m.group(2) != "down"
            else (real["hidden"], real["intermediate"])
        )
        weights.update(unstack_gguf(t.name, crop(dense, rows, cols)))
    stored = [b for b in tensor_bytes(gguf) if GGUF_EXPERTS.fullmatch(b.name)]
    for b in stored:
        types[b.type] = types.get(b.type, 0) + 1
    acct = {
        "expert_bytes": sum(b.total for b in stored),
        "expert_weights": sum(b.weights for b in stored),  # padded: llama.cpp is charged its 256-row rate
        "expert_weights_real": sum(w.size for w in weights.values()),
        "tensor_types": types,
    }
    return weights, acct


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    work = Path(job["work"])
    work.mkdir(parents=True, exist_ok=True)
    log = work / "llamacpp.log"
    f16 = convert(job, work, log)

    def one(v: dict, out: Path) -> None:
        q = quantize(job, work, f16, v, log)
        weights, acct = read_back(q, job["real"])
        write_variant(out, weights, {**acct, "type": v["type"], "imatrix": v["imatrix"], "file": q.name})

    run_variants(job["variants"], one)


if __name__ == "__main__":
    main()
