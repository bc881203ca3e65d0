"""The GPU path on a CUDA device: the Triton kernel against the float64 reference and the CPU backend for
every shape class and batch 1-64, and the routed runtime path against the host path.

Runs where CUDA is visible, or in ``benchmarks/gpu_check.sh --dry-run`` (``QMOE_GPU_DRY_RUN=1`` with
``TRITON_INTERPRET=1``: the same tests on CPU tensors, tiny shapes); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# Not imported here: triton reads TRITON_INTERPRET once, at its first import, and the interpreter tests of
# this suite set it at theirs; importing it first without it would break them.
HAS_TRITON = importlib.util.find_spec("triton") is not None

DRY = os.environ.get("QMOE_GPU_DRY_RUN") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_TRITON, reason="needs triton"),
    pytest.mark.skipif(not (torch.cuda.is_available() or DRY), reason="needs CUDA (or gpu_check's dry run)"),
]
DEVICE = "cpu" if DRY else "cuda"
# shape classes: tiny and odd, QMoE's switch-base expert (768x3072 both ways), c2048 (2080x6144 both ways)
SHAPES = [(13, 61)] if DRY else [(13, 301), (768, 3072), (3072, 768), (2080, 6144), (6144, 2080)]
BATCHES = [1, 3] if DRY else [1, 2, 8, 64]

from qmoe import codec  # noqa: E402
from qmoe.kernels import matmul  # noqa: E402


def _matrix(kind: str, rows: int, cols: int, seed: int) -> codec.EncodedMatrix:
    rng = np.random.default_rng(seed)
    if kind == "ternary":
        codes = rng.choice([-1, 0, 1], size=(rows, cols), p=[0.0575, 0.885, 0.0575]).astype(np.int8)
        return codec.encode_ternary(
            codes, -rng.random(rows).astype(np.float16) - 0.1, rng.random(rows).astype(np.float16) + 0.1
        )
    codes = rng.choice(4, size=(rows, cols), p=[0.1, 0.15, 0.6, 0.15]).astype(np.uint8)
    return codec.encode_int2(codes, rng.standard_normal((rows, 4)).astype(np.float32))


@pytest.mark.parametrize("kind", ["ternary", "int2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_and_cpu_backend(kind: str, shape: tuple[int, int]) -> None:
    enc = _matrix(kind, *shape, seed=shape[0])
    w = codec.dequantize(enc, backend="reference").astype(np.float64)  # [rows, cols]
    for tokens in BATCHES:
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens))
        got = matmul(enc, x.to(DEVICE), backend="triton").cpu().double().numpy()
        want = x.double().numpy() @ w.T
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 2e-5 * scale * max(1.0, np.sqrt(shape[1] / 1024))
        cpu = matmul(enc, x, backend="cpu").double().numpy()
        assert np.abs(got - cpu).max() <= 2e-5 * scale * max(1.0, np.sqrt(shape[1] / 1024))


def test_routed_layer_on_the_device_matches_the_host_path() -> None:
    from qmoe.adapters.base import Routing
    from qmoe.adapters.qwen3_moe import Qwen3MoeAdapter
    from qmoe.runtime.experts import CompressedExperts

    n_exp, d, inter = (4, 12, 8) if DRY else (64, 256, 512)
    shapes = {"gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}

    def routing(args, kwargs):
        return Routing(*args)

    layers = []
    for backend in ("triton", "cpu"):
        glu = Qwen3MoeAdapter().expert_glu({"hidden_act": "silu"})
        m = CompressedExperts(Qwen3MoeAdapter.experts, routing, n_exp, glu, shapes)
        for e in range(n_exp):
            for p, (r, c) in shapes.items():
                m.set_expert(e, p, _matrix("ternary", r, c, seed=1000 * e + r + c))
        m.backend = backend
        layers.append(m)
    dev, host = layers
    dev.prepare(DEVICE)
    rng = np.random.default_rng(0)
    for tokens in BATCHES:
        k = 2
        x = torch.randn(tokens, d)
        picks = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(tokens)])  # [T, k]
        expert = torch.from_numpy(picks).reshape(-1)
        token = torch.arange(tokens).repeat_interleave(k)
        weight = torch.rand(tokens * k)
        got = dev(*(t.to(DEVICE) for t in (x, token, expert, weight))).cpu()
        want = host(x, token, expert, weight)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert dev.prepare_count == 1
