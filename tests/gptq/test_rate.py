"""Entropy-constrained rounding (qmoe.gptq.rate) against nearest rounding and a brute-force reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from qmoe.gptq import gptq_quantize, rtn_quantize
from qmoe.gptq import rate as rd
from qmoe.grids import get_grid


def _entropy_bits(codes: torch.Tensor) -> float:
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum() * codes.numel())


@pytest.mark.parametrize("grid", ["ternary", "int2"])
def test_zero_price_is_nearest_rounding(grid: str) -> None:
    g = get_grid(grid)
    torch.manual_seed(0)
    W = torch.randn(3, 17, 40)
    W[0, 0] = W[0, 0].abs()  # a row without negative weights: ternary lo == 0 must never be coded
    W[1, 1] = -W[1, 1].abs()
    levels = g.fit(W)
    lock = rd.zero_locks(levels, g.code_offset)
    got = rd.rd_codes(W, levels, torch.zeros(1, 1, 1, 1), g.code_offset, lock)
    assert torch.equal(got, g.quantize(W, levels))


def test_priced_codes_match_brute_force() -> None:
    g = get_grid("ternary")
    torch.manual_seed(1)
    W = torch.randn(2, 5, 7)
    levels = g.fit(W)
    bits = torch.tensor([[3.0, 0.4, 2.5], [1.0, 1.0, 6.0]])  # [B, L]
    c = torch.rand(2, 7) + 0.1
    scale = rd.row_scale(W)
    price = rd.price_of(0.7, scale, bits, c)
    got = rd.rd_codes(W, levels, price, g.code_offset, rd.zero_locks(levels, 1))
    for b, r, j in itertools.product(range(2), range(5), range(7)):
        costs = [
            float(
                c[b, j] * (W[b, r, j] - levels[b, r, k]) ** 2
                + 0.7 * scale[b, r] * (bits[b, k] - bits[b].min())
            )
            for k in range(3)
        ]
        assert int(got[b, r, j]) + 1 == min(range(3), key=lambda k: (costs[k], k))


def test_dead_columns_cost_nothing_to_zero() -> None:
    bits = torch.tensor([[2.0, 0.5, 2.0]])
    price = rd.price_of(0.3, torch.ones(1, 2), bits, torch.tensor([[1.0, 0.0, 2.0]]))
    assert torch.isinf(price[0, :, 1, [0, 2]]).all() and (price[0, :, 1, 1] == 0).all()
    assert torch.isfinite(price[0, :, [0, 2]]).all()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_higher_rate_gives_fewer_bits(method: str) -> None:
    torch.manual_seed(2)
    E, rows, cols = 3, 48, 64
    W = torch.randn(E, rows, cols)
    X = torch.randn(4000, cols) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols))
    H = (2 / 4000 * X.T @ X).expand(E, cols, cols).contiguous()
    sizes, errors = [], []
    for rate in (0.0, 0.05, 0.2, 0.5):
        q = rtn_quantize(W, H=H, rate=rate) if method == "rtn" else gptq_quantize(W, H, rate=rate)
        sizes.append(sum(_entropy_bits(q.codes[e]) for e in range(E)))
        errors.append(float(q.objective.sum()))
        assert torch.equal(q.dequantized, get_grid("ternary").dequantize(q.codes, q.levels))
    assert all(a > b for a, b in itertools.pairwise(sizes)), sizes
    assert sizes[-1] < 0.75 * sizes[0]
    if method == "rtn":  # a bit price buys size with error: never both better at once
        assert errors[1] > errors[0] * 0.5


def test_rate_zero_is_the_plain_recipe() -> None:
    torch.manual_seed(3)
    W = torch.randn(2, 16, 32)
    X = torch.randn(500, 32)
    H = (2 / 500 * X.T @ X).expand(2, 32, 32).contiguous()
    a, b = gptq_quantize(W, H), gptq_quantize(W, H, rate=0.0, refit=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.levels, b.levels)


def test_gptq_column_loop_prices_like_the_reference() -> None:
    """With U = I (no error feedback) GPTQ's inlined priced decision equals rd.rd_codes on whole matrices."""
    from qmoe.gptq.solver import _gptq_columns

    g = get_grid("ternary")
    torch.manual_seed(4)
    B, rows, cols = 3, 20, 40
    W = torch.randn(B, rows, cols)
    W[0, 3] = W[0, 3].abs()  # lo == 0: the locked code must never appear
    levels = g.fit(W)
    bits = torch.tensor([[0.0, 1.5, 2.0], [0.3, 0.0, 2.5], [4.0, 0.0, 0.2]])
    c = torch.rand(B, cols) + 0.2
    scale = 0.4 * rd.row_scale(W)
    U = torch.eye(cols).expand(B, cols, cols).contiguous()
    codes, _ = _gptq_columns(W.transpose(1, 2).contiguous(), U, g, levels, 16, (scale, bits, 1.0 / c))
    ref = rd.rd_codes(
        W,
        levels,
        rd.price_of(0.4, rd.row_scale(W), bits - bits.amin(-1, keepdim=True), c),
        1,
        rd.zero_locks(levels, 1),
    )
    assert torch.equal(codes.transpose(1, 2), ref)
