"""Column lists (qmoe.kernels.lists, cpu_lists.c): the native builder writes the bytes of the plain-Python
definition, the lists read back to the decoded codes, the product matches the float64 product with the
reference-decoded matrix, the cache keeps to its budget, and the decode fast path uses them. Corrupt streams:
tests/test_corrupt_rows.py, with every other decoder."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qmoe import codec  # noqa: E402
from qmoe.codec.decode import decode_reference, dequantize  # noqa: E402
from qmoe.errors import BackendUnavailable, ConfigError  # noqa: E402
from qmoe.kernels import _native, lists  # noqa: E402


@pytest.fixture(autouse=True)
def _native_or_skip():
    try:
        _native.lists()
    except BackendUnavailable as err:
        pytest.skip(f"no native kernel here: {err}")


def _ternary(rng, rows, cols, p_zero):
    codes = rng.choice([-1, 0, 1], size=(rows, cols), p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])
    codes = codes.astype(np.int8)
    lo = (-rng.random(rows) - 0.1).astype(np.float16)
    hi = (rng.random(rows) + 0.1).astype(np.float16)
    return codes, codec.encode_ternary(codes, lo, hi)


CASES = [  # rows, cols, P(zero): widths not multiples of 8; gaps past 255 and 510 (escapes); dense rows
    (5, 1000, 0.999),
    (9, 2053, 0.995),
    (16, 37, 0.3),
    (33, 300, 0.9),
]


@pytest.mark.parametrize(("rows", "cols", "p_zero"), CASES)
def test_native_lists_are_the_definition_and_read_back_to_the_codes(rows, cols, p_zero):
    rng = np.random.default_rng(rows * cols)
    codes, enc = _ternary(rng, rows, cols, p_zero)
    codes[0] = 0  # an empty row
    codes[1, :] = 1  # a full row: every gap 1
    codes[2, :] = 0
    marks = [c for c in (0, 256, 511) if c < cols - 1] + [cols - 1]  # gaps of 256 and 255 where wide enough
    codes[2, marks] = [(-1) ** (i + 1) for i in range(len(marks))]  # first and last column too
    lo, hi = enc.levels[:, 0].astype(np.float16), enc.levels[:, 1].astype(np.float16)
    enc = codec.encode_ternary(codes, lo, hi)
    got, want = lists.build(enc), lists.build_reference(enc)
    assert np.array_equal(got.start, want.start)
    assert np.array_equal(got.gaps, want.gaps)
    assert np.array_equal(got.coef, want.coef)
    assert (np.diff(got.start) % 8 == 0).all()  # every list padded to whole 8-byte steps
    decoded = decode_reference(enc)
    for r in range(rows):
        for sign in (1, -1):
            assert lists.columns(got, r, sign) == np.flatnonzero(decoded[r] == sign).tolist()


@pytest.mark.parametrize(("rows", "cols", "p_zero"), CASES + [(300, 2048, 0.9), (7, 9, 0.0)])
def test_product_matches_the_float64_reference_in_one_call(rows, cols, p_zero):
    """Three matrices of one shape in one call, taking rows 2, 0 and 2 of x."""
    rng = np.random.default_rng(3)
    encs = [_ternary(rng, rows, cols, p_zero)[1] for _ in range(3)]
    x = torch.randn(3, cols)
    which = [2, 0, 2]
    y = lists.matvec([lists.build(enc) for enc in encs], x, which)
    assert y.shape == (3, rows)
    for i, enc in enumerate(encs):
        w = dequantize(enc, backend="reference").astype(np.float64)
        xd = x[which[i]].double().numpy()
        scale = np.abs(w) @ np.abs(xd)  # the error budget of a float32 sum, as the other CPU kernels
        assert (np.abs(y[i].numpy() - w @ xd) <= 1e-5 * np.maximum(1.0, scale)).all()


def test_portable_path(monkeypatch, tmp_path):
    """The library compiled with -DQMOE_SCALAR_ONLY (the path of machines without AVX2, and of non-x86
    ones): the same lists, and products within the same budget."""
    import os

    monkeypatch.setenv("QMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{os.environ.get('CC', 'cc')} -DQMOE_SCALAR_ONLY")
    _native.reset()
    try:
        rng = np.random.default_rng(8)
        for rows, cols, p_zero in CASES:
            encs = [_ternary(rng, rows, cols, p_zero)[1] for _ in range(2)]
            built = [lists.build(enc) for enc in encs]
            for enc, m in zip(encs, built, strict=True):
                assert np.array_equal(m.gaps, lists.build_reference(enc).gaps)
            x = torch.randn(2, cols)
            y = lists.matvec(built, x)
            for i, enc in enumerate(encs):
                w = dequantize(enc, backend="reference").astype(np.float64)
                xd = x[i].double().numpy()
                assert (np.abs(y[i].numpy() - w @ xd) <= 1e-5 * np.maximum(1.0, np.abs(w) @ np.abs(xd))).all()
    finally:
        monkeypatch.undo()
        _native.reset()


def test_wrong_inputs_are_refused():
    rng = np.random.default_rng(4)
    _, enc = _ternary(rng, 8, 16, 0.5)
    m = lists.build(enc)
    with pytest.raises(ValueError, match="x must be \\[m, 16\\]"):
        lists.matvec([m], torch.zeros(1, 15))
    with pytest.raises(ValueError, match="every index of which below m"):
        lists.matvec([m], torch.zeros(1, 16), [1])
    with pytest.raises(ValueError, match="got 1 matrices but 2 inputs"):
        lists.matvec([m], torch.zeros(2, 16), [0, 1])
    with pytest.raises(ValueError, match="the same shape"):
        lists.matvec([m, lists.build(_ternary(rng, 9, 16, 0.5)[1])], torch.zeros(2, 16))
    int2 = codec.encode_int2(rng.integers(0, 4, size=(4, 16)).astype(np.uint8),
                             np.sort(rng.standard_normal((4, 4)), axis=1).astype(np.float16))
    with pytest.raises(ValueError, match="ternary matrices, not int2"):
        lists.build(int2)
    assert lists.ListCache(1 << 30).get(int2) is None  # int2 keeps the stream kernel


def test_the_cache_keeps_to_its_budget_and_frees_with_the_matrix():
    rng = np.random.default_rng(6)
    encs = [_ternary(rng, 64, 512, 0.9)[1] for _ in range(6)]
    one = lists.build(encs[0]).nbytes
    cache = lists.ListCache(2 * one)  # room for two (the second reaches the budget, no more are built)
    got = [cache.get(enc) for enc in encs]
    assert [g is not None for g in got] == [True, True, False, False, False, False]
    assert cache.get(encs[0]) is got[0]  # built once
    assert cache.used == got[0].nbytes + got[1].nbytes
    used = cache.used
    del got, encs[0]
    import gc

    gc.collect()
    assert cache.used < used and len(cache) == 1


@pytest.mark.parametrize(("raw", "want"), [("0", 0), ("off", 0), ("1.5", 3 << 19), ("64", 64 << 20)])
def test_budget_from_the_environment(monkeypatch, raw, want):
    monkeypatch.setenv("QMOE_EXPERT_LISTS", raw)
    assert lists.budget_bytes() == want


def test_a_bad_budget_is_one_line(monkeypatch):
    monkeypatch.setenv("QMOE_EXPERT_LISTS", "lots")
    with pytest.raises(ConfigError, match="QMOE_EXPERT_LISTS='lots': give a size in MiB, 0 or off"):
        lists.budget_bytes()


def test_decode_fast_path_uses_the_lists_and_matches_the_stream_kernel(monkeypatch):
    """A layer at batch 1 through the lists (budget for all), through the stream kernel (budget 0), and
    through a budget that fits only some matrices (both kernels in one step): equal within float32
    summation order, and the lists were used."""
    from qmoe.adapters.base import Routing
    from qmoe.adapters.qwen3_moe import Qwen3MoeAdapter
    from qmoe.runtime.experts import CompressedExperts

    rng = np.random.default_rng(7)
    E, D, INTER = 6, 40, 24
    shapes = {"gate_proj": (INTER, D), "up_proj": (INTER, D), "down_proj": (D, INTER)}
    layer = CompressedExperts(Qwen3MoeAdapter.experts, lambda a, k: Routing(*a), E,
                              Qwen3MoeAdapter().expert_glu({"hidden_act": "silu"}), shapes)
    for e in range(E):
        for p, (rows, cols) in shapes.items():
            layer.set_expert(e, p, _ternary(rng, rows, cols, 0.6)[1])
    layer.backend = "cpu"
    x = torch.randn(1, D)
    token, expert, weight = torch.zeros(3, dtype=torch.long), torch.tensor([4, 0, 2]), torch.rand(3)
    outs, used = {}, {}
    for name, budget in (("stream", "0"), ("lists", "64"), ("mixed", str(2 * 200 / 2**20))):
        monkeypatch.setenv("QMOE_EXPERT_LISTS", budget)
        lists.reset()
        outs[name] = layer(x, token, expert, weight)
        used[name] = 0 if lists.cache() is None else len(lists.cache())
    lists.reset()
    assert used["stream"] == 0 and used["lists"] == 9 and 0 < used["mixed"] < 9
    scale = outs["stream"].abs().max()
    for name in ("lists", "mixed"):
        assert (outs[name] - outs["stream"]).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize(("act", "gated", "nf"), [("silu", True, 1), ("silu", True, 2), ("relu", False, 1)])
def test_moe_step_is_the_layer_in_float64(act, gated, nf):
    """One token's experts in one call (fused gate_up as transformers 5 holds them, separate gate and up,
    a plain activation), against float64 products of the reference decoder's matrices. Experts 1, 4, 6 of
    8; ``out`` starts non-zero (moe_step adds to it)."""
    rng = np.random.default_rng(11)
    E, d, inner = 8, 45, 19  # widths not multiples of 8
    rows = inner * (2 if gated else 1) // nf  # of each first projection
    first = [[_ternary(rng, rows, d, 0.7)[1] for _ in range(nf)] for _ in range(E)]
    second = [_ternary(rng, d, inner, 0.7)[1] for _ in range(E)]
    built = [[lists.build(m) for m in f] + [lists.build(s)] for f, s in zip(first, second, strict=True)]
    addr = np.array([[m.address for m in b] for b in built], dtype=np.int64)  # [E, nf + 1]
    experts = np.array([1, 4, 6], dtype=np.int64)
    weights = rng.random(3).astype(np.float32)
    x = torch.randn(d)
    out = torch.randn(1, d)
    start = out.clone().double().numpy()[0]
    lists.moe_step(addr, experts, weights, x, out, inner, act, gated)

    def dense(m):
        return dequantize(m, backend="reference").astype(np.float64)

    want = start.copy()
    xd = x.double().numpy()
    for e, w in zip(experts.tolist(), weights.tolist(), strict=True):
        h = np.concatenate([dense(m) @ xd for m in first[e]])
        a = h[:inner]
        a = a / (1 + np.exp(-a)) if act == "silu" else np.maximum(a, 0)
        hidden = a * h[inner:] if gated else a
        want += w * (dense(second[e]) @ hidden)
    budget = 1e-5 * max(1.0, float(np.abs(want).max()))
    assert np.abs(out.double().numpy()[0] - want).max() <= budget
    with pytest.raises(ValueError, match="moe_step computes \\['relu', 'silu', 'swish'\\], not 'gelu'"):
        lists.moe_step(addr, experts, weights, x, out, inner, "gelu", gated)
