"""The level grid of format version 2: per-row levels as small integers on a per-matrix base.

A version-2 matrix stores no float per row. Ternary levels are signed powers of ``2**(1/S)``::

    lo = -m(a),  hi = m(b),  m(e) = 2**(e / S)  (computed as ldexp(STEP[e mod S], e div S) in float32)

with ``a``, ``b`` integers (or the level exactly 0), ``S`` steps per octave (``LEVEL_STEPS``). 2-bit levels
are qmoe's uniform grid with a zero point: ``levels[k] = fl32(m(e) * (k - z))``, ``z`` in 0..3. The file
stores ``a, b`` (ternary) or ``e, z`` (int2) per row, relative to a per-matrix base (``qmoe.codec.format2``).

``round_levels`` puts any levels on this grid; the quantizer (``qmoe.gptq``) calls it before it quantizes
and after it refits, the encoder calls it to decide whether a matrix's levels fit version 2, so what the
decoders return is bit for bit what GPTQ quantized against. Everything is numpy float32 arithmetic in one
place, so the values do not depend on who computes them.
"""

from __future__ import annotations

import numpy as np

LEVEL_STEPS = 8  # steps per octave (docs/format.md section 9: measured against 4..32 and fp16)
MAX_STEPS = 64
MAX_OCTAVE = 100  # |log2 level| <= 100: far inside float32's normal range, no subnormal, no overflow
ZERO = -(1 << 31)  # exponent marking a level that is exactly 0 (ternary)


def _step_table(steps: int) -> np.ndarray:
    """``[steps] float32``: 2**(k / steps), the mantissas of one octave."""
    return np.array([2.0 ** (k / steps) for k in range(steps)], dtype=np.float64).astype(np.float32)


def exponent_range(steps: int) -> tuple[int, int]:
    """Smallest and largest legal exponent for ``steps`` steps per octave."""
    return -MAX_OCTAVE * steps, MAX_OCTAVE * steps


def magnitude(e: np.ndarray, steps: int) -> np.ndarray:
    """``2**(e / steps)`` as float32 ``[...]`` for integer exponents ``e`` inside ``exponent_range``."""
    e = np.asarray(e, dtype=np.int64)
    return np.ldexp(_step_table(steps)[e % steps], (e // steps).astype(np.int32)).astype(np.float32)


def _nearest_exponent(x: np.ndarray, steps: int) -> np.ndarray:
    """Integer exponent ``[...]`` nearest to ``steps * log2(x)`` for ``x > 0``, clamped to the legal range."""
    lo, hi = exponent_range(steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.rint(steps * np.log2(np.asarray(x, dtype=np.float64)))
    return np.clip(np.nan_to_num(e, nan=0.0, posinf=hi, neginf=lo), lo, hi).astype(np.int64)


def ternary_exponents(levels: np.ndarray, steps: int = LEVEL_STEPS) -> np.ndarray:
    """Exponents ``[..., 2] int64`` of ternary ``levels [..., 2]`` (lo, hi) rounded to the grid; ``ZERO``
    where the level is 0. ValueError for a lo above 0 or a hi below 0 (version 2 stores magnitudes only)."""
    lv = np.asarray(levels, dtype=np.float64)
    if np.any(lv[..., 0] > 0) or np.any(lv[..., 1] < 0):
        raise ValueError("ternary levels need lo <= 0 <= hi to lie on the version-2 grid")
    e = _nearest_exponent(np.abs(lv), steps)
    return np.where(lv == 0, ZERO, e)


def ternary_values(exps: np.ndarray, steps: int = LEVEL_STEPS) -> np.ndarray:
    """Levels ``[..., 2] float32`` (lo, hi) of exponents ``exps [..., 2]`` (``ZERO``: the level 0)."""
    zero = exps == ZERO
    m = magnitude(np.where(zero, 0, exps), steps)
    m[..., 0] = -m[..., 0]
    return np.where(zero, np.float32(0), m).astype(np.float32)


def int2_params(levels: np.ndarray, steps: int = LEVEL_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """``(e, z)``, each ``[...] int64``: the grid's scale exponent and zero point nearest to 2-bit ``levels
    [..., 4]`` (scale from the span of the levels, zero point from the lowest)."""
    lv = np.asarray(levels, dtype=np.float64)
    scale = (lv[..., 3] - lv[..., 0]) / 3.0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > 0, np.rint(-lv[..., 0] / scale), 0.0)
    z = np.clip(np.nan_to_num(z), 0, 3).astype(np.int64)
    return _nearest_exponent(np.where(scale > 0, scale, 1.0), steps), z


def int2_values(e: np.ndarray, z: np.ndarray, steps: int = LEVEL_STEPS) -> np.ndarray:
    """Levels ``[..., 4] float32``: ``m(e) * (k - z)`` for k = 0..3, one float32 multiply each."""
    k = np.arange(4, dtype=np.float32)
    zf = np.asarray(z, dtype=np.float32)[..., None]
    return (magnitude(e, steps)[..., None] * (k - zf)).astype(np.float32)


def round_levels(levels: np.ndarray, kind: str, steps: int = LEVEL_STEPS) -> np.ndarray:
    """``levels`` (``[..., 2]`` ternary lo, hi; ``[..., 4]`` int2) moved onto the version-2 grid, float32.

    Idempotent: levels already on the grid come back bit for bit (``on_grid``)."""
    if kind == "ternary":
        return ternary_values(ternary_exponents(levels, steps), steps)
    if kind == "int2":
        return int2_values(*int2_params(levels, steps), steps)
    raise ValueError(f"kind must be 'ternary' or 'int2', got {kind!r}")


def on_grid(levels: np.ndarray, kind: str, steps: int = LEVEL_STEPS) -> bool:
    """True if ``levels`` are bit for bit on the version-2 grid (a version-2 matrix stores them exactly)."""
    lv = np.ascontiguousarray(levels, dtype=np.float32)
    if not np.isfinite(lv).all():
        return False
    if kind == "ternary" and (np.any(lv[..., 0] > 0) or np.any(lv[..., 1] < 0)):
        return False
    return np.array_equal(round_levels(lv, kind, steps).view(np.uint32), lv.view(np.uint32))
