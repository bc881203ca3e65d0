"""CompressedExperts' decode fast path (``_forward_single``: every active expert has one token, as at batch 1)
against an obviously correct dense float64 computation from the reference decoder, next to the general
grouped path on calls that take it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qmoe import codec  # noqa: E402
from qmoe.adapters.base import Routing  # noqa: E402
from qmoe.adapters.qwen3_moe import Qwen3MoeAdapter  # noqa: E402
from qmoe.codec.decode import dequantize  # noqa: E402
from qmoe.runtime.experts import CompressedExperts  # noqa: E402

E, D, INTER = 8, 40, 24  # widths not multiples of the SIMD width


def _routing(args, kwargs):
    x, token, expert, weight = args
    return Routing(x=x, token=token, expert=expert, weight=weight)


def _layer(rng: np.random.Generator, int2: bool) -> CompressedExperts:
    layout = Qwen3MoeAdapter.experts
    shapes = {"gate_proj": (INTER, D), "up_proj": (INTER, D), "down_proj": (D, INTER)}
    m = CompressedExperts(layout, _routing, E, Qwen3MoeAdapter().expert_glu({"hidden_act": "silu"}), shapes)
    for e in range(E):
        for p, (rows, cols) in shapes.items():
            if int2:
                codes = rng.integers(0, 4, size=(rows, cols)).astype(np.uint8)
                levels = np.sort(rng.standard_normal((rows, 4)), axis=1).astype(np.float16)
                m.set_expert(e, p, codec.encode_int2(codes, levels))
            else:
                codes = rng.choice([-1, 0, 1], size=(rows, cols), p=[0.2, 0.6, 0.2]).astype(np.int8)
                lo = -rng.random(rows).astype(np.float16) - 0.1
                hi = rng.random(rows).astype(np.float16) + 0.1
                m.set_expert(e, p, codec.encode_ternary(codes, lo, hi))
    return m


def _dense(m: CompressedExperts, x, token, expert, weight) -> np.ndarray:
    """The layer in float64 from reference-decoded weights: per pair, gate * W2 (silu(W1g x) * W1u x)."""
    xd = x.double().numpy()
    out = np.zeros_like(xd)
    w = {p: [dequantize(m.matrix(p, e), backend="reference").astype(np.float64) for e in range(E)]
         for p in m.shapes}
    for t, e, g in zip(token.tolist(), expert.tolist(), weight.double().tolist(), strict=True):
        a, b = w["gate_proj"][e] @ xd[t], w["up_proj"][e] @ xd[t]
        out[t] += g * (w["down_proj"][e] @ (a / (1 + np.exp(-a)) * b))
    return out


@pytest.mark.parametrize("int2", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_single_token_experts_match_the_dense_reference(int2, backend, monkeypatch):
    rng = np.random.default_rng(7)
    m = _layer(rng, int2)
    m.backend = backend
    taken = []
    real = CompressedExperts._forward_single
    monkeypatch.setattr(CompressedExperts, "_forward_single",
                        lambda self, *a: taken.append(1) or real(self, *a))
    cases = [  # (tokens, expert per pair, token per pair): fast path, fast path, general path
        (1, rng.choice(E, size=4, replace=False), [0, 0, 0, 0]),
        (3, np.array([5, 1, 6, 2, 0, 7]), [0, 0, 1, 1, 2, 2]),
        (3, np.array([5, 1, 5, 2, 1, 7]), [0, 0, 1, 1, 2, 2]),
        (1, np.array([3, 3, 1]), [0, 0, 0]),  # one token routed twice to one expert: the general path
    ]
    for tokens, experts, tok in cases:
        x = torch.from_numpy(rng.standard_normal((tokens, D)).astype(np.float32))
        token, expert = torch.tensor(tok), torch.from_numpy(experts).long()
        weight = torch.from_numpy(rng.random(len(tok)).astype(np.float32))
        got = m(x, token, expert, weight).double().numpy()
        want = _dense(m, x, token, expert, weight)
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert len(taken) == 2  # the first two calls took the fast path, the last two did not


@pytest.mark.parametrize("budget", ["", "0.001"])
def test_the_fused_decode_step_is_the_layer(budget, monkeypatch):
    """Single-token calls with the experts' activation named (as loaded layers have it) take the fused step
    (qmoe.kernels.lists.moe_step) once every routed expert has lists; with a budget that lists one matrix
    only, every call takes the two-stage path (lists for that matrix, the stream kernel for the rest). Both
    against the dense float64 layer."""
    from qmoe.kernels import lists

    monkeypatch.setenv("QMOE_EXPERT_LISTS", budget)
    lists.reset()
    try:
        if lists.cache() is None:
            pytest.skip("no native kernel here")
        rng = np.random.default_rng(9)
        m = _layer(rng, False)
        m.activation, m.backend = "silu", "cpu"
        steps = []
        real = lists.moe_step
        monkeypatch.setattr(lists, "moe_step", lambda *a: steps.append(1) or real(*a))
        for _ in range(6):
            x = torch.from_numpy(rng.standard_normal((1, D)).astype(np.float32))
            expert = torch.from_numpy(rng.choice(E, size=3, replace=False)).long()
            token = torch.zeros(3, dtype=torch.long)
            weight = torch.from_numpy(rng.random(3).astype(np.float32))
            got = m(x, token, expert, weight).double().numpy()
            want = _dense(m, x, token, expert, weight)
            assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
        assert len(steps) == (6 if budget == "" else 0)
        assert len(lists.cache()) == (len(m._step_lists) if budget == "" else 1)
    finally:
        lists.reset()
