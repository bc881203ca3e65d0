"""Typed, validated, versioned configuration of a compression run.

``CompressConfig`` holds every setting that changes the bytes of the compressed checkpoint; it is frozen,
validated on construction, and round-trips through ``to_dict``/``from_dict`` (the dict carries
``config_version`` so a future qmoe can read, or refuse, an old run's settings). Settings that only change
*how* the run executes (device, memory budget, progress bars) are arguments of ``qmoe.compress`` instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from qmoe.errors import ConfigError

CONFIG_VERSION = 7
# Settings that version 1 lacked, with the values version-1 runs used: read old configs as they ran.
_V1_DEFAULTS = {
    "rate": 0.0,
    "refit": False,
    "target_bits": None,
    "no_drop": False,
    "skip_sentinels": False,
    "gate_weighted": False,
    "level_scale": 1.0,
}
# Settings that version 2 lacked, with the values version-2 runs used.
_V2_DEFAULTS = {"shared_experts": "keep"}
# Settings that version 3 lacked, with the values version-3 runs used.
_V3_DEFAULTS = {"allocation": "uniform"}
# Settings that version 4 lacked, with the values version-4 runs used (they never dropped an expert).
_V4_DEFAULTS = {"drop_experts": False}
# Settings that version 5 lacked, with the values version-5 runs used.
_V5_DEFAULTS = {"row_prices": "relative"}
# Settings that version 6 lacked, with the values version-6 runs used (they tuned nothing).
_V6_DEFAULTS = {"tune": "none"}

BITS = ("ternary", "2")
SHARED = ("keep", *BITS)  # what to do with shared experts: keep them as stored, or quantize at these widths
METHODS = ("gptq", "rtn")
ALLOCATIONS = ("uniform", "global")
TUNES = ("none", "norms", "attention")  # what each compressed block fits to the original hidden states
# a row's bit price: relative to its own size, or in expert-output units; auto: output under a global budget
ROW_PRICES = ("auto", "relative", "output")
# how target_bits is spent: alike per group, or by one model-wide price
# Grids each width may use (names from qmoe.grids); the first is the default.
GRIDS_FOR_BITS = {"ternary": ("ternary", "ternary-opt"), "2": ("int2",)}


@dataclass(frozen=True)
class CompressConfig:
    """How to compress: quantization width/method/grid, calibration data and GPTQ settings.

    - ``bits``: ``"ternary"`` ({lo, 0, hi} per row, entropy coded, QMoE) or ``"2"`` (2-bit min-max).
    - ``grid``: a grid of that width (``None``: ``"ternary"`` / ``"int2"``).
    - ``method``: ``"gptq"`` (second-order, Hessians from calibration tokens) or ``"rtn"`` (round to nearest).
    - ``calib_data`` / ``calib_samples`` / ``seq_len`` / ``seed``: calibration text source (a split name,
      ``pydoc``, or a .txt/.jsonl file), number of samples, tokens per sample for decoder-only models
      (encoder-decoder models use fixed-length span-corruption samples), sampling seed.
    - ``token_cap``: tokens per expert entering its Hessian, as a multiple of the mean over experts
      (QMoE uses 4); ``0`` means no cap. ``min_tokens``: experts with fewer calibration tokens fall back to
      round-to-nearest (reported).
    - ``damp``, ``block_size``, ``act_order``: GPTQ's relative damping, lazy-batch width, column order.
    - ``rate``: price of one coded bit in each rounding decision (entropy-constrained rounding,
      ``qmoe.gptq.rate``); ``0`` is nearest rounding (QMoE). ``target_bits``: instead of a fixed ``rate``,
      search it per expert matrix group so that the group's stored expert bits/weight (every byte counted)
      land on this value (below the grid's own size by raising the rate, above it by shrinking the
      levels). ``allocation``: ``"uniform"`` lands every group on ``target_bits``; ``"global"`` spends
      ``target_bits`` over the whole model at one price per bit in nats of loss, so experts and layers that
      matter more get more bits (``qmoe.pipeline.budget``); without ``target_bits`` it prices every
      rounding decision at that one model-wide price, ``rate`` for an expert of typical importance and
      ``rate`` times its relative price for the others (no size search); ``drop_experts`` (global only)
      lets that price give an expert no weights at all: its router never chooses it
      (``qmoe.adapters.drop``).
      ``level_scale``: multiply the grid's levels by this before quantizing (< 1: more weights
      get a nonzero code, each smaller; more bits, less error). ``refit``: re-solve each row's levels for
      its final codes (``qmoe.gptq.refit``). ``row_prices``: how a bit's price scales from row to row of a
      matrix: ``"relative"`` to the row's own mean square (every row treated alike), or ``"output"``: one
      price per matrix in units of the expert's output error, so rows whose errors reach the output more
      (a first projection's rows weighted by their measured output sensitivity, the second's rows alike)
      get more bits (``qmoe.pipeline.rows``); ``"auto"``: output under ``allocation="global"`` (a budget
      spent at one price per bit in loss units, down to rows), relative otherwise (``rows``).
    - ``no_drop``: lift the router's expert capacity during calibration passes, so no calibration token is
      dropped (QMoE); evaluation runs keep the model's capacity. ``skip_sentinels``: leave span-corruption
      sentinel positions out of the Hessians (QMoE). Both only matter for families that have them (Switch).
    - ``gate_weighted``: weight each token in an expert's Hessian by its squared gate value: the layer's
      output is ``sum_e g_e(x) expert_e(x)``, so an error on a token the router gave weight ``g`` costs
      ``g^2`` times as much.
    - ``shared_experts``: ``"keep"`` the shared experts (the MLP every token uses next to the routed ones,
      Qwen2-MoE and DeepSeek-V3) as stored, or quantize them by ``method`` at ``"ternary"`` or ``"2"`` bits
      (the width's default grid, nearest rounding), with Hessians from every calibration token.
    - ``eval``: measure the loss of the reference and the compressed model on ``eval_data`` (first entry is
      the report's ``eval``; the rest go to ``eval_extra``) in the same streaming pass, with ``eval_samples``
      samples each. Evaluation samples never enter a Hessian.
    - ``tune``: ``"attention"`` (the default) fits each compressed MoE block's normalisation and attention
      weights so that its output on the compressed calibration stream matches the original model's hidden
      states at that depth (``qmoe.pipeline.tune``; no bits: they are stored as before, in the checkpoint's
      dtype), judged on held-out calibration samples; ``"norms"`` the normalisation weights alone;
      ``"none"`` keeps them.
      ``tune_epochs`` passes over the first ``tune_samples`` calibration samples at Adam learning rate
      ``tune_lr`` (the cap bounds the stage's cost).
    - ``batch_size``: samples per forward pass (it changes float rounding, hence part of the config).
    """

    bits: str = "ternary"
    method: str = "gptq"
    grid: str | None = None
    calib_data: str = "calibration"
    calib_samples: int = 1024
    seq_len: int = 128
    seed: int = 0
    token_cap: float = 4.0
    min_tokens: int = 32
    damp: float = 0.1
    block_size: int = 128
    act_order: bool = True
    rate: float = 0.1
    level_scale: float = 1.0
    target_bits: float | None = None
    allocation: str = "uniform"
    drop_experts: bool = True
    refit: bool = False
    row_prices: str = "auto"
    no_drop: bool = True
    gate_weighted: bool = True
    skip_sentinels: bool = True
    eval: bool = True
    eval_data: tuple[str, ...] = ("validation",)
    eval_samples: int = 256
    batch_size: int = 32
    shared_experts: str = "keep"
    tune: str = "attention"
    tune_epochs: int = 4
    tune_lr: float = 3e-3
    tune_samples: int = 512

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"bits must be one of {', '.join(BITS)}, got {self.bits!r}")
        if self.shared_experts not in SHARED:
            raise ConfigError(
                f"shared_experts must be one of {', '.join(SHARED)}, got {self.shared_experts!r}"
            )
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.row_prices not in ROW_PRICES:
            raise ConfigError(f"row_prices must be one of {', '.join(ROW_PRICES)}, got {self.row_prices!r}")
        if self.tune not in TUNES:
            raise ConfigError(f"tune must be one of {', '.join(TUNES)}, got {self.tune!r}")
        if not (isinstance(self.tune_lr, (int, float)) and 0 < self.tune_lr <= 1):
            raise ConfigError(f"tune_lr must lie in (0, 1], got {self.tune_lr!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        allowed = GRIDS_FOR_BITS[self.bits]
        if self.grid is None:
            object.__setattr__(self, "grid", allowed[0])
        elif self.grid not in allowed:
            raise ConfigError(
                f"grid {self.grid!r} does not fit bits={self.bits}; choose one of {', '.join(allowed)}"
            )
        object.__setattr__(self, "eval_data", tuple(self.eval_data))
        for name, low in (
            ("calib_samples", 1),
            ("seq_len", 2),
            ("block_size", 1),
            ("eval_samples", 1),
            ("batch_size", 1),
            ("min_tokens", 0),
            ("seed", 0),
            ("tune_epochs", 1),
            ("tune_samples", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (self.token_cap == 0 or self.token_cap >= 1):
            raise ConfigError(
                f"token_cap must be 0 (no cap) or >= 1 (x the mean tokens per expert), got {self.token_cap}"
            )
        if not 0 <= self.damp < 10:
            raise ConfigError(f"damp must lie in [0, 10), got {self.damp}")
        if not (isinstance(self.rate, (int, float)) and 0 <= self.rate < 1e6):
            raise ConfigError(f"rate must be a number >= 0 (0: nearest rounding), got {self.rate!r}")
        if not (isinstance(self.level_scale, (int, float)) and 0 < self.level_scale <= 4):
            raise ConfigError(f"level_scale must lie in (0, 4], got {self.level_scale!r}")
        if self.target_bits is not None:
            if self.bits != "ternary":
                raise ConfigError("target_bits needs bits='ternary' (2-bit codes have a fixed size grid)")
            if not (isinstance(self.target_bits, (int, float)) and 0.2 <= self.target_bits <= 2.5):
                raise ConfigError(
                    f"target_bits must lie in [0.2, 2.5] expert bits/weight, got {self.target_bits!r}"
                )
        if self.eval and not self.eval_data:
            raise ConfigError("eval_data is empty; give at least one text source or set eval=False")

    @property
    def rows(self) -> str:
        """The row prices in force: ``row_prices`` with ``"auto"`` resolved ("relative" or "output")."""
        if self.row_prices == "auto":
            return "output" if self.allocation == "global" else "relative"
        return self.row_prices

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_data"] = list(self.eval_data)
        return {"config_version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        d = dict(d)
        version = d.pop("config_version", CONFIG_VERSION)
        # what versions 2-6 added
        later = (_V2_DEFAULTS, _V3_DEFAULTS, _V4_DEFAULTS, _V5_DEFAULTS, _V6_DEFAULTS)
        if version == 1:
            d = {**_V1_DEFAULTS, **{k: v for m in later for k, v in m.items()}, **d}
        elif version in (2, 3, 4, 5, 6):
            d = {**{k: v for m in later[version - 2 :] for k, v in m.items()}, **d}
        elif version != CONFIG_VERSION:
            raise ConfigError(
                f"compress config version {version} is not supported (this qmoe reads "
                f"{CONFIG_VERSION}); upgrade qmoe"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown compress config fields {unknown}; known: {sorted(known)}")
        if "eval_data" in d:
            d["eval_data"] = tuple(d["eval_data"])
        return cls(**d)

    def replace(self, **changes: Any) -> CompressConfig:
        return CompressConfig.from_dict({**self.to_dict(), **changes})
