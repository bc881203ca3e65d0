"""Level refit (qmoe.gptq.refit) against an independent least-squares solve, and its energy constraint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmoe.gptq import gptq_quantize, rtn_quantize
from qmoe.gptq.refit import refit_levels
from qmoe.grids import get_grid


def _problem(seed: int, E: int = 2, rows: int = 12, cols: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, rows, cols, generator=g)
    X = torch.randn(E, 300, cols, generator=g) @ (
        torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g)
    )
    H = (2 / 300 * X.transpose(1, 2) @ X).double() + 0.01 * torch.eye(cols, dtype=torch.float64)
    return W, H


@pytest.mark.parametrize("grid", ["ternary", "int2"])
def test_least_squares_matches_lstsq(grid: str) -> None:
    g = get_grid(grid)
    W, H = _problem(0)
    q = rtn_quantize(W, grid=grid)
    free = torch.ones(g.n_levels, dtype=torch.bool)
    if g.code_offset:
        free[g.code_offset] = False
    new = refit_levels(W, q.codes, q.levels, H, g.code_offset, free, preserve_energy=False)
    took_ls = 0
    for e in range(W.shape[0]):
        L = np.linalg.cholesky(H[e].numpy())  # H = L L^T: the objective is ||L^T (w - q)||^2
        for r in range(W.shape[1]):
            idx = q.codes[e, r].long().numpy() + g.code_offset
            used = [k for k in range(g.n_levels) if free[k] and (idx == k).any()]
            design = np.stack([(idx == k).astype(np.float64) for k in used], 1)  # [cols, n]
            w = W[e, r].double().numpy()
            sol = np.linalg.lstsq(L.T @ design, L.T @ w, rcond=None)[0]
            old = q.levels[e, r].double().numpy()
            fit = old.copy()
            fit[used] = np.asarray(sol, dtype=np.float16).astype(np.float64)  # the codec stores fp16

            def objective(lv: np.ndarray, idx=idx, w=w, L=L) -> float:
                return float(np.sum((L.T @ (w - lv[idx])) ** 2))

            # the documented rule: the rounded fit, unless it is worse than the old levels or breaks the
            # ternary order lo <= 0 <= hi; then the old levels
            sound = objective(fit) <= objective(old) and (not g.code_offset or fit[0] <= 0 <= fit[-1])
            want = fit if sound else old
            np.testing.assert_allclose(new[e, r].double().numpy(), want, rtol=2e-3, atol=1e-4,
                                       err_msg=f"expert {e} row {r} ({'fit' if sound else 'old levels'})")
            took_ls += sound
    assert took_ls >= W.shape[0] * W.shape[1] // 2, "the least-squares branch is barely exercised"


def test_least_squares_never_worsens_the_objective() -> None:
    W, H = _problem(1, E=3, rows=32, cols=40)
    q = rtn_quantize(W)
    free = torch.tensor([True, False, True])
    new = refit_levels(W, q.codes, q.levels, H, 1, free, preserve_energy=False)
    g = get_grid("ternary")
    for lv in (q.levels, new):
        D = (W - g.dequantize(q.codes, lv)).double()
        lv_obj = ((D @ H) * D).sum(-1)
        if lv is q.levels:
            before = lv_obj
    assert (lv_obj <= before + 1e-9).all() and (lv_obj < before).float().mean() > 0.9


def test_energy_is_preserved_with_the_least_squares_shape() -> None:
    W, H = _problem(2, E=2, rows=16, cols=32)
    q = rtn_quantize(W)
    free = torch.tensor([True, False, True])
    ls = refit_levels(W, q.codes, q.levels, H, 1, free, preserve_energy=False)
    en = refit_levels(W, q.codes, q.levels, H, 1, free, preserve_energy=True)
    g = get_grid("ternary")
    Q = g.dequantize(q.codes, en).double()
    energy_q = ((Q @ H) * Q).sum(-1)
    energy_w = ((W.double() @ H) * W.double()).sum(-1)
    assert torch.allclose(energy_q, energy_w, rtol=3e-3)
    ratio_en, ratio_ls = en[..., 0] / en[..., 2], ls[..., 0] / ls[..., 2]
    assert torch.allclose(ratio_en, ratio_ls, rtol=2e-3)
    assert (en[..., 0] <= 0).all() and (en[..., 2] >= 0).all() and (en[..., 1] == 0).all()


def test_refit_in_gptq_keeps_codes_and_dequantization_consistent() -> None:
    W, H = _problem(3, E=2, rows=16, cols=32)
    a = gptq_quantize(W, H.float())
    b = gptq_quantize(W, H.float(), refit=True)
    assert torch.equal(a.codes, b.codes)  # the refit changes levels only
    assert not torch.equal(a.levels, b.levels)
    assert torch.equal(b.dequantized, get_grid("ternary").dequantize(b.codes, b.levels))
    from qmoe import codec

    for e in range(b.codes.shape[0]):  # the refitted levels are what the codec stores and gives back
        enc = codec.encode_ternary(b.codes[e].numpy(), b.levels[e, :, 0].numpy(), b.levels[e, :, 2].numpy())
        assert enc.version == 2
        got = codec.dequantize(codec.EncodedMatrix.from_blob(enc.to_blob()))
        assert np.array_equal(got.view(np.uint32), b.dequantized[e].numpy().view(np.uint32))
