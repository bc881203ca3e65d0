"""The device path of CompressedExperts (triton backend, under Triton's interpreter on CPU tensors): every
expert prepared once per layer whatever the routing, selection by index inside the launch, and outputs equal
to the host path's (cpu backend) within float32 accumulation error."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from qmoe import codec  # noqa: E402
from qmoe.adapters.base import Routing  # noqa: E402
from qmoe.adapters.qwen3_moe import Qwen3MoeAdapter  # noqa: E402
from qmoe.kernels import triton_kernel as tk  # noqa: E402
from qmoe.kernels import triton_matmul  # noqa: E402
from qmoe.runtime.experts import CompressedExperts  # noqa: E402

E, D, INTER = 8, 12, 8  # experts, hidden, intermediate: tiny, the interpreter runs programs one by one


def _routing(args, kwargs):
    x, token, expert, weight = args
    return Routing(x=x, token=token, expert=expert, weight=weight)


def _layer(seed: int = 0) -> CompressedExperts:
    rng = np.random.default_rng(seed)
    layout = Qwen3MoeAdapter.experts
    shapes = {"gate_proj": (INTER, D), "up_proj": (INTER, D), "down_proj": (D, INTER)}
    m = CompressedExperts(layout, _routing, E, Qwen3MoeAdapter().expert_glu({"hidden_act": "silu"}), shapes)
    for e in range(E):
        for p, (rows, cols) in shapes.items():
            codes = rng.choice([-1, 0, 1], size=(rows, cols), p=[0.2, 0.6, 0.2]).astype(np.int8)
            lo = -rng.random(rows).astype(np.float16) - 0.1
            hi = rng.random(rows).astype(np.float16) + 0.1
            m.set_expert(e, p, codec.encode_ternary(codes, lo, hi))
    return m


def _random_call(rng: np.random.Generator, tokens: int, top_k: int):
    x = torch.from_numpy(rng.standard_normal((tokens, D)).astype(np.float32))
    experts = np.stack([rng.choice(E, size=top_k, replace=False) for _ in range(tokens)])  # [T, k]
    token = torch.arange(tokens).repeat_interleave(top_k)
    weight = torch.from_numpy(rng.random(tokens * top_k).astype(np.float32))
    return x, token, torch.from_numpy(experts.reshape(-1)).long(), weight


# 105 s under Triton's CPU interpreter on 2 cores (the fast tier's longest test by 3x): the slow tier, which
# .ci/run also runs.
@pytest.mark.slow
def test_routed_path_matches_the_host_path_and_prepares_each_layer_once(monkeypatch):
    prepared = []
    real = tk.prepare
    monkeypatch.setattr(tk, "prepare", lambda *a, **k: prepared.append(1) or real(*a, **k))
    layer, host = _layer(), _layer()
    layer.backend, host.backend = "triton", "cpu"
    rng = np.random.default_rng(1)
    groups0, cache0 = len(triton_matmul._GROUPS), len(tk._CACHE)
    nbytes = None
    for i in range(100):
        tokens = int(rng.integers(1, 4)) if i % 10 else 9  # decode-sized calls, and a few wider ones
        call = _random_call(rng, tokens, top_k=2)
        got = layer(*call)
        if i % 10 == 0:  # the host path is the reference (itself tested against the reference decoder)
            want = host(*call)
            scale = max(1.0, float(want.abs().max()))
            assert float((got - want).abs().max()) <= 2e-5 * scale
        nbytes = nbytes or layer.device_nbytes
        assert layer.device_nbytes == nbytes  # nothing grows with new routings
    assert layer.prepare_count == 1
    assert len(prepared) == 3  # one group per projection, for 100 routings
    assert len(triton_matmul._GROUPS) == groups0 and len(tk._CACHE) == cache0
    encoded = layer.nbytes
    assert nbytes <= 4 * encoded + E * 3 * 4096 * 4  # streams + index, plus one 16 KiB table per matrix


def test_routed_path_handles_empty_and_single_expert_calls():
    layer = _layer(2)
    layer.backend = "triton"
    x = torch.randn(3, D)
    empty = torch.zeros(0, dtype=torch.long)
    out = layer(x, empty, empty, torch.zeros(0))
    assert out.shape == x.shape and not out.any()
    host = _layer(2)
    host.backend = "cpu"
    call = (x, torch.tensor([0, 1, 2]), torch.tensor([5, 5, 5]), torch.tensor([1.0, 0.5, 0.25]))
    torch.testing.assert_close(layer(*call), host(*call), atol=2e-5, rtol=2e-5)
