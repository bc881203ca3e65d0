"""The peers' own environments and builds, under one cache directory, each made once and reused.

Every environment gets torch 2.13.0 (the CPU wheel on this machine's disk; any other pin pulls a multi-GB CUDA
build) and a pinned release of the peer from PyPI. llama.cpp is built from the source its published Python
package (llama-cpp-python's sdist) vendors. A finished step leaves a ``.ok`` marker; a failed one leaves
``error.txt`` with its last lines, which the comparison reports in place of the tool's numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

TORCH = "torch==2.13.0"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
HQQ = "hqq==0.2.8.post1"
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
LLAMA_TARGETS = ("llama-quantize", "llama-imatrix", "llama-bench")


def default_cache() -> Path:
    return Path(os.environ.get("QMOE_PEERS_CACHE", Path.home() / ".cache" / "qmoe-peers"))


@dataclass(frozen=True)
class Tool:
    name: str
    python: Path  # the interpreter of the tool's own environment
    extra: dict  # tool-specific paths (llama.cpp: source and binaries)


class SetupError(RuntimeError):
    pass


def _run(cmd: list, log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        r = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if r.returncode:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-3:]
        raise SetupError(
            f"{Path(str(cmd[0])).name} {cmd[1] if len(cmd) > 1 else ''} failed: {' | '.join(tail)}"
        )


def _step(cache: Path, name: str, build) -> float:
    """Run ``build(log)`` once; returns the seconds it took (0 when cached). Records failures."""
    ok, err, log = cache / f"{name}.ok", cache / f"{name}.error.txt", cache / f"{name}.log"
    if ok.is_file():
        return 0.0
    err.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        build(log)
    except SetupError as exc:
        err.write_text(str(exc) + "\n")
        raise
    seconds = time.perf_counter() - t0
    ok.write_text(json.dumps({"seconds": seconds, "python": sys.version.split()[0]}) + "\n")
    return seconds


def _venv(path: Path, packages: list[str], log: Path) -> None:
    if path.exists():
        shutil.rmtree(path)  # a half-made environment from a killed run
    _run([sys.executable, "-m", "venv", path], log)
    _run([path / "bin" / "python", "-m", "pip", "install", "-q", TORCH, *packages], log)


def setup_llamacpp(cache: Path, threads: int) -> Tool:
    src = cache / "src"
    version = LLAMA_CPP_PYTHON.split("==")[1]
    root = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = root / "build"

    def fetch(log: Path) -> None:
        src.mkdir(parents=True, exist_ok=True)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                LLAMA_CPP_PYTHON,
                "-d",
                src,
            ],
            log,
        )
        with tarfile.open(src / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(src, filter="data")

    def compile_(log: Path) -> None:
        _run(
            [
                "cmake",
                "-S",
                root,
                "-B",
                build,
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
            ],
            log,
        )
        _run(["cmake", "--build", build, "-j", str(threads), "--target", *LLAMA_TARGETS], log)

    venv = cache / "venv-llamacpp"
    _step(cache, "llamacpp-fetch", fetch)
    _step(cache, "llamacpp-build", compile_)
    _step(
        cache,
        "llamacpp-venv",
        lambda log: _venv(
            venv, ["numpy", "safetensors", "sentencepiece", "transformers", str(root / "gguf-py")], log
        ),
    )
    return Tool("llama.cpp", venv / "bin" / "python", {"llama_dir": str(root), "bin": str(build / "bin")})


def setup_hqq(cache: Path) -> Tool:
    venv = cache / "venv-hqq"
    _step(cache, "hqq-venv", lambda log: _venv(venv, [HQQ, "safetensors", "numpy"], log))
    return Tool("HQQ", venv / "bin" / "python", {})


def setup_llmcompressor(cache: Path) -> Tool:
    venv = cache / "venv-llmcompressor"
    _step(cache, "llmcompressor-venv", lambda log: _venv(venv, [LLMCOMPRESSOR], log))
    return Tool("llm-compressor", venv / "bin" / "python", {})


def setup_seconds(cache: Path) -> dict[str, float]:
    """Seconds each finished setup step took when it ran (the first run's cost)."""
    return {p.name[: -len(".ok")]: json.loads(p.read_text())["seconds"] for p in sorted(cache.glob("*.ok"))}
