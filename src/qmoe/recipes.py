"""Named recipes: complete sets of the settings that decide how experts are quantized.

A recipe is a ``CompressConfig`` with some fields fixed; what it leaves open (calibration text and size,
sequence length, seed, evaluation) stays the caller's, so two recipes can be compared on the same text.

- ``"default"``: qmoe's recipe, ``CompressConfig()``'s defaults (see ``docs/results.md`` for the measurements
  behind each choice).
- ``"qmoe"``: QMoE's recipe (Frantar & Alistarh, 2023), setting by setting:

  ============================  ==============================================================
  ternary grid per row          ``grid="ternary"``: {min(row, 0), 0, max(row, 0)}
  GPTQ, 10% dampening           ``method="gptq"``, ``damp=0.1``, columns in natural order
  nearest rounding              ``rate=0``, no level refit, no size target
  token cap 4x the mean         ``token_cap=4``
  no dropped calibration token  ``no_drop=True`` (router capacity lifted while calibrating)
  sentinels out of Hessians     ``skip_sentinels=True``
  RTN only without tokens       ``min_tokens=1``: only an expert that saw no token is rounded to nearest
  norms, attention as stored    ``tune="none"``
  ============================  ==============================================================
"""

from __future__ import annotations

from typing import Any

from qmoe.config import CompressConfig
from qmoe.errors import ConfigError

# The fields a recipe decides; everything else (data, seed, evaluation, batch size) is left to the caller.
RECIPE_FIELDS = (
    "bits", "method", "grid", "token_cap", "min_tokens", "damp", "block_size", "act_order", "rate",
    "target_bits", "allocation", "refit", "no_drop", "skip_sentinels", "gate_weighted",
    "level_scale", "row_prices", "tune", "tune_epochs", "tune_lr", "tune_samples",
)

_QMOE: dict[str, Any] = {
    "bits": "ternary",
    "method": "gptq",
    "grid": "ternary",
    "token_cap": 4.0,
    "min_tokens": 1,
    "damp": 0.1,
    "block_size": 128,
    "act_order": False,
    "rate": 0.0,
    "target_bits": None,
    "allocation": "uniform",
    "refit": False,
    "no_drop": True,
    "skip_sentinels": True,
    "gate_weighted": False,
    "level_scale": 1.0,
    "row_prices": "relative",
    "tune": "none",
    "tune_epochs": 4,
    "tune_lr": 3e-3,
    "tune_samples": 512,
}

RECIPES = ("default", "qmoe")


def recipe_settings(name: str) -> dict[str, Any]:
    """The settings recipe ``name`` fixes (``RECIPE_FIELDS``)."""
    if name == "default":
        d = CompressConfig().to_dict()
        return {k: d[k] for k in RECIPE_FIELDS}
    if name == "qmoe":
        return dict(_QMOE)
    raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")


def recipe(name: str, **overrides: Any) -> CompressConfig:
    """``CompressConfig`` of recipe ``name`` with ``overrides`` applied (e.g. ``calib_samples=512``)."""
    return CompressConfig(**{**recipe_settings(name), **overrides})
