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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from qmoe.pipeline.context import RunContext

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
    curve: tuple[float, ...]  # ... and bits/weight of priced round-to-nearest there (no expert dropped)
    dropped: tuple[int, ...] = ()  # experts given no weights at all (the same for both groups of a layer)
    # [E][K] stored bits and relative squared error sum (W - Q)^2 / sum W^2 of each expert's matrices at
    # each price, from priced round-to-nearest: what dropping is decided on (not in the report: large)
    expert_bits: tuple[tuple[float, ...], ...] = ()
    expert_error: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class BudgetPlan:
    budget: float  # expert bits/weight for the whole model (a fixed price: the size predicted at it)
    price: float  # lambda: the model-wide price, in the groups' rate scale
    predicted_bits: float  # the plan's size at that price (== budget unless out of reach)
    groups: tuple[GroupPlan, ...]
    layers: tuple[LayerSensitivity, ...]
    fixed_price: bool = False  # no size target: every group quantized at ``price`` (no size search)

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

    def dropped(self, layer: str) -> frozenset[int]:
        """The experts of MoE layer ``layer`` that the plan gives no weights (none if it is not planned)."""
        for g in self.groups:
            if g.layer == layer:
                return frozenset(g.dropped)
        return frozenset()

    def to_dict(self) -> dict[str, Any]:
        skip = ("expert_bits", "expert_error")
        return {
            "budget": self.budget,
            "price": self.price,
            "predicted_bits": self.predicted_bits,
            "fixed_price": self.fixed_price,
            "groups": [{k: v for k, v in asdict(g).items() if k not in skip} for g in self.groups],
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


FINE = 481  # log-spaced prices of the search when experts may be dropped (decisions are discrete)


def choose(
    budget: float,
    groups: Sequence[GroupPlan],
    layers: Sequence[LayerSensitivity],
    top_k: int | None = None,
) -> BudgetPlan:
    """The model-wide price whose planned sizes meet ``budget``; each group's planned bits at that price.

    Without dropping (``top_k`` None) the group curves are interpolated linearly in (log lambda, bits).
    Above the largest size of the grid (no price) every group is scaled alike (the search then shrinks
    levels); below the smallest, the smallest. With dropping, ``top_k`` is the router's: a layer keeps at
    least that many experts (``drop_decisions``)."""
    if top_k is not None:
        return _choose_dropping(budget, groups, layers, top_k)
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


def at_prices(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``values [..., K]`` given at ``LAMBDAS``, interpolated linearly in log lambda at log-prices
    ``x [J]``: ``[..., J]``."""
    lam = np.log(np.asarray(LAMBDAS))
    k = np.clip(np.searchsorted(lam, x, side="right"), 1, len(lam) - 1)
    t = np.clip((x - lam[k - 1]) / (lam[k] - lam[k - 1]), 0.0, 1.0)
    return values[..., k - 1] * (1 - t) + values[..., k] * t


ZEROED = 1.0 - 1e-6  # relative squared error of a matrix group whose codes are all zero (exactly 1)


def drop_decisions(first: GroupPlan, second: GroupPlan, x: np.ndarray, top_k: int) -> np.ndarray:
    """``[E, J]`` bool: the experts of a layer dropped at each log-price ``x_j``: those whose fused first
    projections the price rounds entirely to zero.

    Such an expert outputs nothing (its activation is zero), yet it would still store every row's
    metadata in both groups and take a top-k slot from the token's next choice. Dropped, it costs no bits
    and the router gives that slot to the next expert. A wider rule (drop whenever the expert's loss is
    worth less than its bits) needs the error that its kept weights leave in the layer's *output*: the
    weight-space error of priced round-to-nearest overstates it several times (ternary rows keep about half
    their squared norm as error, while GPTQ's output error at the same size is far smaller), so on
    tiny-qwen3-moe that rule dropped 28 of 32 experts per layer at any price; it is not used.
    At most ``E - top_k`` experts are dropped (the router must still have ``top_k`` to choose): the ones
    with the largest first-group error, then the most expensive."""
    d1 = at_prices(np.asarray(first.expert_error), x)  # [E, J]
    drop = d1 >= ZEROED
    E = drop.shape[0]
    if E - drop.sum(0).max() < top_k:
        bits = at_prices(np.asarray(first.expert_bits) + np.asarray(second.expert_bits), x)
        score = d1 + 1e-9 * bits / max(1.0, float(bits.max()))  # [E, J] larger: dropped first
        rank = np.argsort(np.argsort(-score, axis=0, kind="stable"), axis=0, kind="stable")
        drop &= rank < E - top_k
    return drop


def _choose_dropping(
    budget: float, groups: Sequence[GroupPlan], layers: Sequence[LayerSensitivity], top_k: int
) -> BudgetPlan:
    lam = np.log(np.asarray(LAMBDAS))
    x = np.linspace(lam[0], lam[-1], FINE)
    w = np.array([g.weights for g in groups], dtype=np.float64)
    bits = np.zeros((len(groups), FINE))  # [G, J] planned bits/weight of each group, dropped experts free
    drops: list[np.ndarray] = []  # per layer [E, J]
    for i in range(0, len(groups), 2):
        first, second = groups[i], groups[i + 1]
        drop = drop_decisions(first, second, x, top_k)
        drops.append(drop)
        for j, g in enumerate((first, second)):
            bits[i + j] = (at_prices(np.asarray(g.expert_bits), x) * ~drop).sum(0) / g.weights
    total = (bits * w[:, None]).sum(0) / w.sum()  # [J], about decreasing in the price
    below = np.nonzero(total <= budget)[0]
    j = int(below[0]) if below.size else int(np.argmin(total))
    # the first price at or below the budget; its sizes scaled so that the plan spends exactly the budget
    # (the drops come in steps, so the size at a grid price is rarely B itself). Above the size of the
    # lowest price this is "no price": levels shrink alike. Out of reach below, the smallest as it is.
    scale = budget / total[j] if below.size and total[j] > 0 else 1.0
    planned = []
    for i, g in enumerate(groups):
        dropped = tuple(int(e) for e in np.nonzero(drops[i // 2][:, j])[0])
        planned.append(GroupPlan(**{**asdict(g), "bits": float(bits[i, j] * scale), "dropped": dropped}))
    predicted = float((bits[:, j] * scale * w).sum() / w.sum())
    price = 0.0 if j == 0 and total[0] < budget else float(np.exp(x[j]))
    return BudgetPlan(float(budget), price, predicted, tuple(planned), tuple(layers))


def expert_curves(
    W: Tensor, mult: np.ndarray, grid: str, bits_of: Callable[[Any], np.ndarray], level_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(bits [E, K], error [E, K])``: stored bits (``bits_of``) and relative squared error of each expert
    of ``W [E, rows, cols]`` under priced round-to-nearest at each ``LAMBDAS`` price (rates
    ``lambda * mult``), without Hessians: uniform column weights."""
    from qmoe.gptq import rtn_quantize

    m = torch.as_tensor(mult, dtype=torch.float32)
    norm = W.square().sum((1, 2)).clamp_min(1e-30)  # [E]
    bits, err = [], []
    for lam in LAMBDAS:
        rate = (lam * m).clamp(max=MAX_MULTIPLIER)
        q = rtn_quantize(W, grid=grid, rate=rate, level_scale=level_scale)
        bits.append(np.asarray(bits_of(q), dtype=np.float64))
        err.append(((W - q.dequantized).square().sum((1, 2)) / norm).double().cpu().numpy())
    return np.stack(bits, 1), np.stack(err, 1)


def make_plan(ctx: RunContext) -> BudgetPlan:
    """Measure (``qmoe.pipeline.sensitivity``), trace every group's size curve and choose the price that
    meets ``ctx.config.target_bits``. Deterministic: a resumed run plans the same."""
    from qmoe.pipeline.encode import expert_bits
    from qmoe.pipeline.quantize import stack_experts
    from qmoe.pipeline.sensitivity import measure

    p, config = ctx.plan, ctx.config
    layout = p.adapter.experts
    layers = {s.name: s for s in measure(ctx)}
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
            p.reader.get_many(layout.keys_of(name, experts)), layout, name, experts, ctx.device
        )
        for gi, ((kind, projections), W) in enumerate(zip(kinds, stacked, strict=True)):
            m = mults[2 * li + gi]

            def bits_of(q: Any, name: str = name, projections: list[str] = projections) -> np.ndarray:
                return expert_bits(layout, name, q, projections, config.bits)

            eb, ee = expert_curves(W, m, config.grid, bits_of, config.level_scale)
            # priced rounding only removes bits as the price rises: monotone against codec noise
            curve = tuple(np.minimum.accumulate(eb.sum(0) / W.numel()).tolist())
            groups.append(GroupPlan(name, kind, W.numel(), tuple(m.tolist()), 0.0, LAMBDAS, curve,
                                    expert_bits=tuple(map(tuple, eb.tolist())),
                                    expert_error=tuple(map(tuple, ee.tolist()))))
        del stacked
    top_k = p.adapter.top_k(p.source_cfg) if config.drop_experts else None
    if config.target_bits is None:
        return at_price(float(config.rate), groups, [layers[n] for n in moe], top_k)
    return choose(float(config.target_bits), groups, [layers[n] for n in moe], top_k)


def at_price(
    price: float, groups: Sequence[GroupPlan], layers: Sequence[LayerSensitivity], top_k: int | None = None
) -> BudgetPlan:
    """The plan of one fixed model-wide price (no budget): every group at rates ``price * multipliers``,
    its bits those of priced round-to-nearest there (a prediction; the GPTQ pass does not search a size),
    and the experts that price rounds to zero dropped (``top_k`` None: none)."""
    x = np.log(np.asarray([min(max(price, LAMBDAS[0]), LAMBDAS[-1])]))  # [1]
    planned = []
    for i in range(0, len(groups), 2):
        first, second = groups[i], groups[i + 1]
        drop = drop_decisions(first, second, x, top_k)[:, 0] if top_k is not None else None
        for g in (first, second):
            eb = at_prices(np.asarray(g.expert_bits), x)[:, 0]  # [E]
            kept = eb if drop is None else eb * ~drop
            dropped = () if drop is None else tuple(int(e) for e in np.nonzero(drop)[0])
            bits = float(kept.sum() / g.weights)
            planned.append(GroupPlan(**{**asdict(g), "bits": bits, "dropped": dropped}))
    w = np.array([g.weights for g in planned], dtype=np.float64)
    predicted = float(sum(g.bits * g.weights for g in planned) / w.sum())
    return BudgetPlan(predicted, float(price), predicted, tuple(planned), tuple(layers), fixed_price=True)


def spent_bits(plan: BudgetPlan | None, rows: Sequence[dict[str, Any]]) -> float:
    """Stored bits of the groups in the report ``rows`` of finished blocks (a resumed run's start), summed in
    the order the run quantized them, as the run adds them (the same float). 0 without a size to keep."""
    spent = 0.0
    if plan is None or plan.fixed_price:
        return spent
    for row in rows:
        for kind, bits in zip(("first", "second"), row["group_bits"], strict=True):
            spent += bits * plan.groups[plan.index(row["name"], kind)].weights
    return spent
