"""The plan of a model-wide bit budget: which expert matrices get how many bits, decided before any GPTQ.

``--target-bits B`` with ``--allocation global`` means B bits per expert weight for the whole model. Rate-
distortion theory says where the bits should go: at the optimum one more bit buys the same loss reduction
everywhere (equal slopes), so every rounding decision in the model pays one price per bit, in nats of the
model's loss. qmoe's per-weight decision already prices bits (``qmoe.gptq.rate``), but in units relative to
each matrix (column weights of mean 1, the row's mean square): importance is normalised away there. This
module restores it with two measured factors and plans the sizes:

1. **Sensitivity** (``measure``, one cheap pass over a small calibration sample through the *reference*
   model, block by block like the compression itself): for each MoE layer ``l``,

   - ``kappa_l``: nats of loss per unit of squared error added to the layer's output, per position.
     Measured by perturbation: Gaussian noise of a known size (``NOISE_SCALE`` times the layer output's RMS)
     is added to the layer's output and carried through every later block to the loss; a pair of opposite
     perturbations (+e, -e) cancels the first-order term, leaving the curvature (the trace of the loss
     Hessian with respect to the layer output, per dimension). Chosen over a gradient (Fisher) estimate
     because it needs only forward passes through the streamed blocks, which the pipeline already has;
   - ``energy_e``: the gate-weighted output energy ``sum_t g_t^2 ||y_e(x_t)||^2`` of each expert over its
     routed positions: a relative error ``r`` in expert ``e``'s output adds ``r^2 energy_e`` of squared
     error to the layer's output. So the loss cost of a relative squared error is
     ``importance_e = kappa_l * energy_e / positions`` (nats per token).

   The expert's first projection inherits the expert's importance: a relative error in it reaches the
   output as a relative error of about the same size.

2. **Prices per matrix.** In the relative units of ``qmoe.gptq.rate`` a decision costs
   ``c_j (w - l)^2 + rate * s_r * bits``; its loss cost is about ``importance_e / ||W||^2`` times the first
   term, so one model-wide price ``lambda`` per bit is ``rate_e = lambda * n_e / importance_e`` for a
   matrix of ``n_e`` weights. ``multipliers`` hold ``n_e / importance_e`` over one model-wide normaliser
   (their geometric mean), so a group's rates are ``rate * multipliers`` and the scalar ``rate`` stays on
   the usual scale.

3. **Sizes** (``curves`` and ``choose``): every group's stored size as a function of ``lambda`` from priced
   round-to-nearest (no Hessians: cheap), then the ``lambda`` at which the whole model's size meets the
   budget gives each group its planned bits. The quantizing pass then lands each group on its planned size
   with the usual GPTQ size search and corrects for its own drift: each group's target is scaled so that
   the bytes still to spend meet the budget (``BudgetPlan.target``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

PLAN_SAMPLES = 64  # calibration samples of the sensitivity pass (the first ones of the calibration set)
NOISE_SCALE = 0.3  # perturbation RMS as a fraction of the layer output's RMS: about a 1-bit expert's error
LAMBDAS = tuple(10.0 ** (k / 2) for k in range(-6, 7))  # the price grid of the size curves, 1e-3 .. 1e3
MAX_MULTIPLIER = 1e6  # an expert without measured importance (never routed) gets this times the others
KAPPA_FLOOR = 0.01  # a layer's curvature counts as at least this fraction of the median layer's


@dataclass(frozen=True)
class LayerSensitivity:
    """One MoE layer's measured sensitivity on the plan sample."""

    name: str  # the MoE layer's module path
    kappa: float  # nats per token per unit squared output error per position
    sigma: float  # the perturbation's RMS per output element
    positions: int  # positions of the layer's stack in the plan sample
    routed: tuple[int, ...]  # [E] routing slots each expert received
    energy: tuple[float, ...]  # [E] sum over its routed positions of g^2 ||y_e||^2

    def importance(self, kappa_floor: float = 0.0) -> np.ndarray:
        """``[E]`` nats per token per unit of relative squared error of each expert's output, with the
        layer's curvature taken as at least ``kappa_floor``."""
        kappa = max(self.kappa, kappa_floor)
        return kappa * np.asarray(self.energy, dtype=np.float64) / max(1, self.positions)


def kappa_floor(layers: Sequence[LayerSensitivity]) -> float:
    """The smallest curvature a layer is credited with: ``KAPPA_FLOOR`` of the median positive one.

    A curvature measured at or below zero is noise around a small value (a loss is locally convex in a
    trained model's activations; on a random model the loss barely depends on them): zero would price that
    layer's bits at infinity and zero every expert in it."""
    positive = [s.kappa for s in layers if s.kappa > 0]
    return KAPPA_FLOOR * float(np.median(positive)) if positive else 1.0


@dataclass(frozen=True)
class GroupPlan:
    """A projection group of one MoE layer (the fused first projections, or the second) in the plan."""

    layer: str
    group: str  # "first" or "second"
    weights: int  # weights of the group over all experts
    multipliers: tuple[float, ...]  # [E] relative bit price of each expert (model-wide geometric mean 1)
    bits: float  # planned stored bits/weight (every byte, as the report counts)
    lambdas: tuple[float, ...]  # the size curve: rate scale ...
    curve: tuple[float, ...]  # ... and bits/weight of priced round-to-nearest there


@dataclass(frozen=True)
class BudgetPlan:
    budget: float  # expert bits/weight for the whole model
    price: float  # lambda: the model-wide price, in the groups' rate scale
    predicted_bits: float  # the plan's size at that price (== budget unless out of reach)
    groups: tuple[GroupPlan, ...]
    layers: tuple[LayerSensitivity, ...]

    def index(self, layer: str, group: str) -> int:
        for i, g in enumerate(self.groups):
            if g.layer == layer and g.group == group:
                return i
        raise KeyError(f"{layer} {group} is not in the budget plan")

    def target(self, i: int, spent_bits: float) -> float:
        """Bits/weight for group ``i`` when groups ``0 .. i-1`` stored ``spent_bits`` bits in total.

        The groups still to quantize share what is left of the budget in the planned proportions, so a
        group that landed above its plan makes the later ones smaller (drift correction)."""
        total = self.budget * sum(g.weights for g in self.groups)
        rest = self.groups[i:]
        planned = sum(g.bits * g.weights for g in rest)
        scale = (total - spent_bits) / planned if planned > 0 else 1.0
        return float(np.clip(self.groups[i].bits * scale, 0.05, 2.5))

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "price": self.price,
            "predicted_bits": self.predicted_bits,
            "groups": [asdict(g) for g in self.groups],
            "layers": [asdict(s) for s in self.layers],
        }


def multipliers(importance: Sequence[np.ndarray], n_weights: Sequence[int]) -> list[np.ndarray]:
    """Per group ``[E]`` relative prices ``n / importance``, over ONE model-wide normaliser (their geometric
    mean over every group and expert that has any importance), so that equal rates mean equal prices in
    nats across layers. Experts never routed on the plan sample get ``MAX_MULTIPLIER``: their bits buy
    nothing measurable."""
    raw = [n / np.where(imp > 0, imp, np.nan) for imp, n in zip(importance, n_weights, strict=True)]
    logs = np.concatenate([np.log(r[np.isfinite(r)]) for r in raw])
    norm = math.exp(float(logs.mean())) if logs.size else 1.0
    return [np.minimum(np.nan_to_num(r / norm, nan=MAX_MULTIPLIER), MAX_MULTIPLIER) for r in raw]


def choose(budget: float, groups: Sequence[GroupPlan], layers: Sequence[LayerSensitivity]) -> BudgetPlan:
    """The model-wide price whose planned sizes meet ``budget``; each group's planned bits at that price.

    Curves are interpolated linearly in (log lambda, bits). Above the largest size of the grid (no price)
    every group is scaled alike (the search then shrinks levels); below the smallest, the smallest."""
    lam = np.log(np.asarray(LAMBDAS))
    w = np.array([g.weights for g in groups], dtype=np.float64)
    curves = np.array([g.curve for g in groups])  # [G, K] bits/weight, decreasing in lambda
    total = (curves * w[:, None]).sum(0) / w.sum()  # [K]
    if budget >= total[0]:
        bits, price = curves[:, 0] * budget / total[0], 0.0
    elif budget <= total[-1]:
        bits, price = curves[:, -1], float(LAMBDAS[-1])
    else:
        k = int(np.nonzero(total <= budget)[0][0])  # first grid point at or below the budget
        t = (total[k - 1] - budget) / (total[k - 1] - total[k])
        bits = curves[:, k - 1] + t * (curves[:, k] - curves[:, k - 1])
        price = float(np.exp(lam[k - 1] + t * (lam[k] - lam[k - 1])))
    planned = [GroupPlan(**{**asdict(g), "bits": float(b)}) for g, b in zip(groups, bits, strict=True)]
    predicted = float((bits * w).sum() / w.sum())
    return BudgetPlan(float(budget), price, predicted, tuple(planned), tuple(layers))


def size_curve(
    W: Tensor, mult: np.ndarray, grid: str, bits_of: Callable[[Any], float], level_scale: float
) -> tuple[float, ...]:
    """Bits/weight of priced round-to-nearest of ``W [E, rows, cols]`` at each ``LAMBDAS`` price (rates
    ``lambda * mult``), without Hessians: uniform column weights."""
    from qmoe.gptq import rtn_quantize

    m = torch.as_tensor(mult, dtype=torch.float32)
    out = []
    for lam in LAMBDAS:
        rate = (lam * m).clamp(max=MAX_MULTIPLIER)
        out.append(bits_of(rtn_quantize(W, grid=grid, rate=rate, level_scale=level_scale)))
    # priced rounding only removes bits as the price rises; keep the curve monotone against codec noise
    return tuple(np.minimum.accumulate(np.asarray(out)).tolist())


def make_plan(run: Any) -> BudgetPlan:
    """Measure (``qmoe.pipeline.sensitivity``), trace every group's size curve and choose the price that
    meets ``run.config.target_bits``. Deterministic: a resumed run plans the same."""
    from qmoe.pipeline.quantize import group_bits, stack_experts
    from qmoe.pipeline.sensitivity import measure

    p, config = run.p, run.config
    layout = p.adapter.experts
    layers = {s.name: s for s in measure(run)}
    floor = kappa_floor(list(layers.values()))
    blocks = [bp for bp in p.blocks if bp.moe_path is not None]
    moe = [bp.moe_path for bp in blocks]
    kinds = (("first", list(layout.first)), ("second", [layout.second]))
    sizes = []  # weights of one expert's matrix in each group, in plan order
    for bp in blocks:
        shapes = dict(bp.matrices)  # encoded matrix name -> (rows, cols)
        for _, projections in kinds:
            sizes.append(sum(math.prod(shapes[layout.expert_key(bp.moe_path, 0, k)]) for k in projections))
    mults = multipliers([layers[name].importance(floor) for name in moe for _ in kinds], sizes)
    groups = []
    experts = range(p.n_experts)
    for li, name in enumerate(moe):
        stacked = stack_experts(
            p.reader.get_many(layout.keys_of(name, experts)), layout, name, experts, run.device
        )
        for gi, ((kind, projections), W) in enumerate(zip(kinds, stacked, strict=True)):
            m = mults[2 * li + gi]

            def bits_of(q: Any, name: str = name, projections: list[str] = projections) -> float:
                return group_bits(layout, name, q, projections, config.bits)

            curve = size_curve(W, m, config.grid, bits_of, config.level_scale)
            groups.append(GroupPlan(name, kind, W.numel(), tuple(m.tolist()), 0.0, LAMBDAS, curve))
        del stacked
    return choose(float(config.target_bits), groups, [layers[n] for n in moe])
