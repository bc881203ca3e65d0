"""Grids: fp16-exact levels, QMoE's ternary formula, k-bit zero point, nearest-level rounding, registry."""

import pytest
import torch

from qmoe.errors import ConfigError, QuantizationError
from qmoe.grids import GRIDS, MinMaxGrid, OptimalTernaryGrid, TernaryGrid, get_grid

NAMES = ["ternary", "ternary-opt", "int2", "int3", "int4"]


def _weights(E: int = 3, rows: int = 17, cols: int = 29, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, rows, cols, generator=g) * 0.037  # [E, rows, cols], not fp16-exact values
    W[0, 0] = 0.0  # an all-zero row
    W[1, 1] = W[1, 1].abs()  # a row without negative weights
    W[2, 2] = -W[2, 2].abs()  # a row without positive weights
    return W


def test_registry_names_and_unknown_name():
    assert set(NAMES) <= set(GRIDS)
    for name in NAMES:
        assert get_grid(name).name == name
    grid = TernaryGrid()
    assert get_grid(grid) is grid
    with pytest.raises(ConfigError, match="ternary-opt"):
        get_grid("int9")


@pytest.mark.parametrize("name", NAMES)
def test_levels_are_fp16_exact_and_ascending(name):
    W = _weights()
    hdiag = torch.rand(W.shape[0], W.shape[2]) + 0.1
    levels = get_grid(name).fit(W, hdiag)
    assert levels.dtype == torch.float32 and levels.shape == (*W.shape[:2], get_grid(name).n_levels)
    assert torch.equal(levels.half().float(), levels)
    assert (levels[..., 1:] >= levels[..., :-1]).all()


def test_ternary_matches_qmoe_formula():
    W = _weights()
    levels = TernaryGrid().fit(W)
    lo = W.amin(-1).clamp(max=0)
    hi = W.amax(-1).clamp(min=0)
    zero_row = (lo == 0) & (hi == 0)
    lo[zero_row], hi[zero_row] = -1.0, 1.0
    assert torch.equal(levels[..., 0], lo.half().float())
    assert torch.equal(levels[..., 1], torch.zeros_like(lo))
    assert torch.equal(levels[..., 2], hi.half().float())
    assert levels[0, 0].tolist() == [-1.0, 0.0, 1.0]
    # Thresholds at lo/2 and hi/2: codes by the QMoE rule, on rows with both signs.
    codes = TernaryGrid().quantize(W, levels)
    ref = (W > levels[..., 2:3] / 2).to(torch.int8) - (W < levels[..., 0:1] / 2).to(torch.int8)
    both = (levels[..., 0] < 0) & (levels[..., 2] > 0)
    assert torch.equal(codes[both], ref[both])


@pytest.mark.parametrize("grid", [TernaryGrid(), OptimalTernaryGrid()])
def test_one_signed_rows_use_zero_code_not_a_zero_level(grid):
    W = _weights()
    levels = grid.fit(W)
    # During GPTQ a later column may drift to the other sign: it must round to code 0, not to lo == 0.
    x = torch.full_like(W, -0.5)
    assert (grid.quantize(x, levels)[1, 1] == 0).all()
    assert (grid.quantize(-x, levels)[2, 2] == 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kbit_zero_is_a_level_and_codes_in_range(bits):
    grid = MinMaxGrid(bits)
    W = _weights()
    levels = grid.fit(W)
    assert ((levels == 0).sum(-1) >= 1).all()
    codes = grid.quantize(W, levels)
    assert codes.dtype == torch.int8
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert (grid.dequantize(grid.quantize(torch.zeros_like(W), levels), levels) == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_quantize_picks_the_nearest_level(name):
    grid = get_grid(name)
    W = _weights()
    levels = grid.fit(W)
    x = W * 1.7 + 0.01  # values beyond the fitted range too
    q = grid.dequantize(grid.quantize(x, levels), levels)  # [E, rows, cols]
    best = (x.unsqueeze(-1) - levels.unsqueeze(-2)).abs().amin(-1)
    torch.testing.assert_close((x - q).abs(), best, rtol=0, atol=1e-7)
    # dequantize(quantize(level)) == level: the decoder reproduces levels exactly.
    lv = levels.clone()
    if grid.code_offset:  # skip degenerate ternary levels (lo == 0 or hi == 0): those map to code 0
        lv = torch.where(lv == 0, 0.0, lv)
    assert torch.equal(grid.dequantize(grid.quantize(lv, levels), levels), lv)


@pytest.mark.parametrize("weighted", [False, True])
def test_ternary_opt_never_worse_than_qmoe_grid(weighted):
    W = _weights(E=4, rows=32, cols=64, seed=1)
    hdiag = torch.rand(4, 64) ** 4 + 1e-3 if weighted else None
    d = torch.ones(4, 1, 64) if hdiag is None else hdiag[:, None, :]

    def row_error(grid):
        levels = grid.fit(W, hdiag)
        return (d * (W - grid.dequantize(grid.quantize(W, levels), levels)) ** 2).sum(-1)  # [E, rows]

    base, opt = row_error(TernaryGrid()), row_error(OptimalTernaryGrid())
    assert (opt <= base * (1 + 1e-3) + 1e-9).all()
    assert opt.sum() < 0.8 * base.sum()  # Gaussian rows: min/max levels are far from optimal


def test_fp16_overflow_is_refused():
    W = torch.zeros(2, 3, 4)
    W[1, 2, 3] = 1e6
    with pytest.raises(QuantizationError, match=r"\[1\]"):
        TernaryGrid().fit(W)
