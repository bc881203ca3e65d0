"""Bit prices per row in output-error units (``row_prices="output"``, qmoe.pipeline.rows): the measured row
sensitivities against a finite-difference reference, the price scales they give, and the point of it: at the
same stored size, an expert whose neurons matter unequally loses less output accuracy."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from qmoe.adapters.base import GLU
from qmoe.config import CompressConfig
from qmoe.errors import ConfigError
from qmoe.gptq.rate import row_scale
from qmoe.pipeline.rows import RHO_RANGE, first_row_sensitivity, row_scales


def _reference_sensitivity(x, gate, w_first, w_second, glu, eps=1e-3):
    """sum_t g_t^2 (||w_second[:, r(k)]|| dh_r/dpre_k)^2 by central differences, one row at a time."""
    pre = (x @ w_first.T).double()  # [t, F*I]
    norms = w_second.double().pow(2).sum(0).sqrt()  # [I]
    out = torch.zeros(pre.shape[1], dtype=torch.float64)
    for k in range(pre.shape[1]):
        up, down = pre.clone(), pre.clone()
        up[:, k] += eps
        down[:, k] -= eps
        d = ((glu(up) * norms).sum(1) - (glu(down) * norms).sum(1)) / (2 * eps)  # [t]
        out[k] = (gate.double().pow(2) * d.pow(2)).sum()
    return out


@pytest.mark.parametrize("gated,act", [(True, F.silu), (False, F.gelu), (False, F.relu)])
def test_sensitivity_matches_finite_differences(gated, act) -> None:
    g = torch.Generator().manual_seed(0)
    t, d, inner = 40, 12, 6
    x = torch.randn(t, d, generator=g)
    w_first = torch.randn((2 if gated else 1) * inner, d, generator=g) * 0.4
    w_second = torch.randn(d, inner, generator=g) * torch.linspace(0.1, 2.0, inner)  # unequal neurons
    gate = torch.rand(t, generator=g)
    glu = GLU(act, gated)
    got = first_row_sensitivity(x, gate, w_first, None, w_second, glu)
    want = _reference_sensitivity(x, gate, w_first, w_second, glu)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-8)


def test_row_scales() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 4, 8, generator=g)
    s_bar = row_scale(W).mean(1)  # [3]
    second = row_scales(W, None)  # one price per matrix: the mean row scale
    assert torch.allclose(second, s_bar[:, None].expand(3, 4))
    sens = torch.tensor([[1.0, 4.0, 16.0, 64.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 2.0]],
                        dtype=torch.float64)
    first = row_scales(W, sens)
    # expert 0: prices inversely proportional to sensitivity, geometric mean s_bar
    assert torch.allclose(first[0] * torch.tensor([1.0, 4.0, 16.0, 64.0]), first[0, 0].expand(4))
    assert torch.allclose(first[0].double().log().mean().exp(), s_bar[0].double(), rtol=1e-5)
    assert torch.allclose(first[1], s_bar[1].expand(4))  # no data: every row at the matrix price
    # expert 2: a dead neuron's row gets the highest price there is, the live rows the matrix price
    assert torch.allclose(first[2, [0, 1, 3]], s_bar[2].expand(3))
    assert torch.isclose(first[2, 2], s_bar[2] / RHO_RANGE[0])


def test_output_prices_lose_less_output_at_the_same_size() -> None:
    """An expert whose second projection reads half its neurons 10x weaker: with output row prices its
    first projection spends the bits where they reach the output, so at the same stored size (searched
    to 1%) the expert's output error is smaller (on held-out tokens)."""
    from qmoe.gptq import HessianAccumulator
    from qmoe.pipeline.quantize import quantize_to_size

    g = torch.Generator().manual_seed(2)
    d, inner, t = 48, 32, 2000
    x = torch.randn(t, d, generator=g)
    w_first = torch.randn(1, inner, d, generator=g) * 0.2
    strength = torch.cat([torch.full((inner // 2,), 1.0), torch.full((inner // 2,), 0.1)])
    w_second = torch.randn(d, inner, generator=g) * strength
    glu = GLU(F.gelu, False)
    acc = HessianAccumulator(1, d)
    acc.add(torch.zeros(t // 2, dtype=torch.int64), x[: t // 2])
    sens = first_row_sensitivity(x[: t // 2], None, w_first[0], None, w_second, glu)[None]

    class Size:  # bits per weight of the codes alone (the zeroth-order entropy), what the price trades
        def bits_per_weight(self, q, comm) -> float:
            codes = q.codes.flatten().long() + 1
            p = torch.bincount(codes, minlength=3).double() / codes.numel()
            return float(-(p[p > 0] * p[p > 0].log2()).sum())

    config = CompressConfig(rate=0.05, target_bits=0.8)
    errs = {}
    for mode, rows in (("relative", None), ("output", row_scales(w_first, sens))):
        got = quantize_to_size(w_first, acc.H, acc.counts, config, Size(), row_scales=rows)
        assert abs(got.bits - 0.8) < 0.01
        held = x[t // 2 :]
        ref = glu(held @ w_first[0].T) @ w_second.T
        out = glu(held @ got.q.dequantized[0].T) @ w_second.T
        errs[mode] = float((out - ref).pow(2).mean())
    assert errs["output"] < 0.95 * errs["relative"], errs  # measured 0.91x


def test_config_reads_older_versions_and_refuses_unknown_modes() -> None:
    old = CompressConfig().to_dict()
    old.pop("row_prices")
    assert CompressConfig.from_dict({**old, "config_version": 5}).row_prices == "relative"
    with pytest.raises(ConfigError, match="row_prices must be one of auto, relative, output"):
        CompressConfig(row_prices="rows")
    assert CompressConfig().rows == "relative" and CompressConfig(allocation="global").rows == "output"
    assert CompressConfig(allocation="global", row_prices="relative").rows == "relative"
