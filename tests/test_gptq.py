"""Batched GPTQ against a float64 column-by-column textbook GPTQ; Hessian accumulation; robustness."""

import logging

import numpy as np
import pytest
import torch

from qmoe.errors import ConfigError, QuantizationError
from qmoe.gptq import HessianAccumulator, QuantizedExperts, gptq_quantize, rtn_quantize
from qmoe.grids import get_grid


def correlated_problem(E=3, rows=24, cols=48, tokens=600, seed=0):
    """Weights [E, rows, cols] and inputs mixed through a matrix with decaying singular values + outliers."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    mix = Q * torch.exp(-torch.arange(cols) / (cols / 8))  # [cols, cols] singular values e^(-8i/cols)
    X = torch.randn(E * tokens, cols, generator=g) @ mix.T  # [T, cols]
    X[:, torch.randperm(cols, generator=g)[:2]] *= 10  # outlier features
    idx = torch.randint(0, E, (E * tokens,), generator=g)
    acc = HessianAccumulator(E, cols)
    acc.add(idx, X)
    W = torch.randn(E, rows, cols, generator=g) * 0.05
    return W, acc.H, acc.counts


def textbook_gptq(W, H, levels, damp, act_order):
    """One expert, float64, one column at a time with the OBS inverse update (no Cholesky, no blocks)."""
    W, H, levels = W.double().clone(), H.double().clone(), levels.double()  # [rows, cols], [cols, cols]
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(cols):
        w = W[:, j]
        q = levels.gather(1, (w[:, None] - levels).abs().argmin(1, keepdim=True))[:, 0]  # nearest level
        Q[:, j] = q
        err = (w - q) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def objective(W, Q, H):
    D = W.double() - Q.double()
    return float(((D @ H.double()) * D).sum())


def check_consistent(r: QuantizedExperts, W):
    grid = get_grid(r.grid)
    assert r.dequantized.shape == W.shape and r.dequantized.dtype == torch.float32
    assert r.codes.dtype == torch.int8 and r.codes.shape == W.shape
    assert r.levels.shape == (*W.shape[:2], grid.n_levels)
    assert torch.equal(grid.dequantize(r.codes, r.levels), r.dequantized)
    assert_codec_exact(r)


def assert_codec_exact(r: QuantizedExperts) -> None:
    """The levels lie on format 2's grid, and the codec gives back exactly what GPTQ quantized to."""
    from qmoe import codec

    if r.grid.startswith("ternary"):
        for e in range(r.codes.shape[0]):
            lo, hi = r.levels[e, :, 0].numpy(), r.levels[e, :, 2].numpy()
            enc = codec.encode_ternary(r.codes[e].numpy(), lo, hi)
            assert enc.version == 2
            got = codec.dequantize(codec.EncodedMatrix.from_blob(enc.to_blob()))
            assert np.array_equal(got.view(np.uint32), r.dequantized[e].numpy().view(np.uint32))
    elif r.grid != "int2":  # int3, int4: not stored by the codec; fp16 levels
        assert torch.equal(r.levels.half().float(), r.levels)
    else:
        for e in range(r.codes.shape[0]):
            enc = codec.encode_int2(r.codes[e].numpy().astype(np.uint8), r.levels[e].numpy())
            assert enc.version == 2
            got = codec.dequantize(codec.EncodedMatrix.from_blob(enc.to_blob()))
            assert np.array_equal(got.view(np.uint32), r.dequantized[e].numpy().view(np.uint32))


@pytest.mark.parametrize("grid", ["ternary", "int2", "ternary-opt"])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_textbook_gptq(grid, act_order):
    W, H, _ = correlated_problem()
    r = gptq_quantize(W, H, grid=grid, act_order=act_order, block_size=16)
    check_consistent(r, W)
    assert not r.fallback.any()
    for e in range(W.shape[0]):
        ref = textbook_gptq(W[e], H[e], r.levels[e], 0.1, act_order)
        ref_obj = objective(W[e], ref, H[e])
        assert objective(W[e], r.dequantized[e], H[e]) == pytest.approx(float(r.objective[e]), rel=1e-9)
        assert float(r.objective[e]) == pytest.approx(ref_obj, rel=0.02), (grid, e)


@pytest.mark.parametrize("grid", ["ternary", "int2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_halves_rtn_objective(grid, act_order):
    # Without act_order an outlier feature among the last columns leaves GPTQ little to compensate with
    # (ratio up to ~0.65 in a seed sweep); act_order quantizes it first. These seeds do not hit that case.
    W, H, _ = correlated_problem(seed=1)
    gptq = gptq_quantize(W, H, grid=grid, act_order=act_order).objective
    rtn = rtn_quantize(W, grid=grid, H=H).objective
    assert (gptq <= 0.5 * rtn).all(), (gptq / rtn).tolist()


def test_ternary_opt_beats_qmoe_grid_under_gptq():
    W, H, _ = correlated_problem(seed=2)
    base = gptq_quantize(W, H, grid="ternary").objective
    opt = gptq_quantize(W, H, grid="ternary-opt").objective
    assert (opt < base).all(), (opt / base).tolist()


def test_batched_equals_one_expert_at_a_time_and_expert_batch_invariant():
    W, H, counts = correlated_problem(E=5, seed=3)
    full = gptq_quantize(W, H, grid="int2", counts=counts)
    split = gptq_quantize(W, H, grid="int2", counts=counts, expert_batch=2)
    singles = [gptq_quantize(W[e : e + 1], H[e : e + 1], grid="int2") for e in range(5)]
    looped = QuantizedExperts(
        "int2", *(torch.cat([getattr(r, f) for r in singles]) for f in ("dequantized", "codes", "levels")),
        torch.cat([r.objective for r in singles]), torch.cat([r.fallback for r in singles]),
    )  # fmt: skip
    for other in (split, looped):
        # Batch size may change float summation order; a flipped rounding decision is allowed, not more.
        assert (other.codes == full.codes).float().mean() > 0.99
        assert torch.equal(other.levels, full.levels)
        torch.testing.assert_close(other.objective, full.objective, rtol=1e-3, atol=0)


def test_deterministic():
    W, H, _ = correlated_problem(seed=4)
    a, b = (gptq_quantize(W, H, grid="ternary", act_order=True) for _ in range(2))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.dequantized, b.dequantized)


def test_act_order_keeps_storage_order():
    W, H, _ = correlated_problem(seed=5)
    r = gptq_quantize(W, H, grid="ternary", act_order=True)
    check_consistent(r, W)
    # Storage order: the codes of a weight sit where the weight sits, so quantization error stays local.
    assert ((r.dequantized - W).abs() <= W.abs().amax(-1, keepdim=True) * 2).all()
    assert torch.equal(r.lo, r.levels[..., 0]) and torch.equal(r.hi, r.levels[..., 2])


def test_dead_columns_are_zeroed():
    W, H, _ = correlated_problem(seed=6)
    H[:, 5, :] = 0
    H[:, :, 5] = 0
    r = gptq_quantize(W, H, grid="int3")
    assert (r.dequantized[:, :, 5] == 0).all()
    assert torch.isfinite(r.objective).all() and not r.fallback.any()


def test_starved_and_empty_experts_round_to_nearest():
    W, H, counts = correlated_problem(E=4, seed=7)
    H[2] = 0  # no tokens at all
    counts = counts.clone()
    counts[2] = 0
    counts[1] = 3  # below min_tokens
    r = gptq_quantize(W, H, grid="ternary", counts=counts, min_tokens=10)
    rtn = rtn_quantize(W, grid="ternary", H=H)
    assert r.fallback.tolist() == [False, True, True, False]
    assert torch.equal(r.codes[1:3], rtn.codes[1:3])
    assert torch.equal(r.dequantized[1:3], rtn.dequantized[1:3])
    assert r.objective[2] == 0  # H is zero
    # Without counts, the all-zero Hessian alone is enough to detect the empty expert.
    assert gptq_quantize(W, H, grid="ternary").fallback.tolist() == [False, False, True, False]
    alone = gptq_quantize(W[[0, 3]], H[[0, 3]], grid="ternary")
    torch.testing.assert_close(r.objective[[0, 3]], alone.objective, rtol=1e-3, atol=0)


def test_indefinite_hessian_retries_then_falls_back(caplog):
    W, H, _ = correlated_problem(E=3, seed=8)
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1)  # [E]
    eye = torch.eye(H.shape[-1])
    H[0] -= 0.3 * mean_diag[0] * eye  # damping 0.1 is not enough, x10 is: retried, kept GPTQ
    H[1] = -H[1]  # negative definite: no damping helps, round to nearest
    with caplog.at_level(logging.WARNING, logger="qmoe.gptq"):
        r = gptq_quantize(W, H, grid="int2")
    assert r.fallback.tolist() == [False, True, False]
    assert "Cholesky failed for experts [0, 1]" in caplog.text
    assert torch.equal(r.codes[1], rtn_quantize(W[1:2], grid="int2").codes[0])
    assert torch.isfinite(r.dequantized).all()
    alone = gptq_quantize(W[2:], H[2:], grid="int2")
    assert torch.equal(r.codes[2], alone.codes[0])


@pytest.mark.parametrize("where", ["W", "H"])
def test_non_finite_input_names_the_expert(where):
    W, H, _ = correlated_problem(E=4, seed=9)
    (W if where == "W" else H)[3, 1, 2] = float("nan")
    with pytest.raises(QuantizationError, match="expert 3"):
        gptq_quantize(W, H, expert_batch=2)


def test_bad_arguments():
    W, H, _ = correlated_problem(E=2)
    with pytest.raises(ConfigError):
        gptq_quantize(W, H[:, :-1, :-1])
    with pytest.raises(ConfigError):
        gptq_quantize(W, H, damp=-1.0)
    with pytest.raises(ConfigError):
        gptq_quantize(W, H, grid="int9")


def test_float64_hessian_and_lo_hi_only_for_ternary():
    W, H, _ = correlated_problem(E=2, seed=10)
    r32 = gptq_quantize(W, H, grid="int4")
    r64 = gptq_quantize(W, H.double(), grid="int4")
    torch.testing.assert_close(r64.objective, r32.objective, rtol=1e-2, atol=0)
    with pytest.raises(AttributeError):
        _ = r32.lo


def test_rtn_result():
    W, H, _ = correlated_problem(E=2, seed=11)
    r = rtn_quantize(W, grid="int4")
    check_consistent(r, W)
    assert r.objective is None and not r.fallback.any()
    assert torch.equal(r.codes, get_grid("int4").quantize(W, r.levels))
    with_h = rtn_quantize(W, grid="int4", H=H)
    assert with_h.objective.dtype == torch.float64 and with_h.objective.shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hessian_accumulator_matches_direct_sums(dtype):
    E, cols = 6, 10
    g = torch.Generator().manual_seed(0)
    acc = HessianAccumulator(E, cols, dtype=dtype)
    xs, idxs = [], []
    # Imbalanced routing (expert 0 takes most tokens, expert 5 none) over several calls, incl. an empty one.
    for T in (50, 0, 300, 7):
        probs = torch.tensor([20.0, 5, 1, 1, 0.2, 0])
        idx = torch.multinomial(probs, max(T, 1), replacement=True, generator=g)[:T]
        x = torch.randn(T, cols, generator=g)
        acc.add(idx, x)
        xs.append(x)
        idxs.append(idx)
    x, idx = torch.cat(xs).to(dtype), torch.cat(idxs)
    counts = torch.bincount(idx, minlength=E)
    assert torch.equal(acc.counts, counts)
    for e in range(E):
        xe = x[idx == e]
        ref = 2 / max(len(xe), 1) * xe.T @ xe
        torch.testing.assert_close(acc.H[e], ref, rtol=1e-5, atol=1e-5)
    assert acc.H.dtype == dtype and (acc.H[5] == 0).all()
    with pytest.raises(ConfigError):
        acc.add(torch.tensor([6]), torch.randn(1, cols))
