"""The numba drivers of the native kernels (qmoe.kernels._drivers) load from numba's disk cache in a second
process instead of compiling again: defined inside a function, as they were, they missed the cache in every
process (seconds of every generation's start, a new file in __pycache__ each time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qmoe.errors import BackendUnavailable
from qmoe.kernels import _native

pytestmark = pytest.mark.slow  # two fresh processes, the first compiling the three drivers

SCRIPT = """
import json
import numpy as np
import torch
from qmoe import codec
from qmoe.kernels import _drivers, dense8, dense16, lists

rng = np.random.default_rng(0)
W = torch.randn(70, 33)
dense16.matmul16(W.to(torch.bfloat16), torch.randn(2, 33), native=True)
dense8.matmul8(*dense8.quantize(W), torch.randn(1, 33), native=True)

def ternary(rows, cols):
    codes = rng.choice([-1, 0, 1], size=(rows, cols)).astype(np.int8)
    lo = (-rng.random(rows) - 0.1).astype(np.float16)
    hi = (rng.random(rows) + 0.1).astype(np.float16)
    return lists.build(codec.encode_ternary(codes, lo, hi))

first, second = [ternary(8, 12) for _ in range(2)], [ternary(12, 4) for _ in range(2)]
lists.matvec(first, torch.randn(2, 12))
addr = np.array([[f.address, s.address] for f, s in zip(first, second)], dtype=np.int64)
lists.moe_step(addr, np.array([0, 1]), np.ones(2, dtype=np.float32), torch.randn(12), torch.zeros(12), 4,
               "silu", True)
stats = {f: getattr(_drivers, f).stats for f in ("dense_rows", "list_rows", "moe_step")}
print(json.dumps({f: [sum(s.cache_hits.values()), sum(s.cache_misses.values())] for f, s in stats.items()}))
"""


def _run(cache_dir) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_every_driver_from_the_cache(tmp_path) -> None:
    try:
        _native.lists()
        _native.dense16()
    except BackendUnavailable as err:
        pytest.skip(f"no native kernel here: {err}")
    first = _run(tmp_path)
    assert all(misses > 0 for _, misses in first.values()), first  # compiled and saved
    second = _run(tmp_path)
    for name, (hits, misses) in second.items():
        assert hits > 0 and misses == 0, (name, second[name])
    assert not any("locals" in p.name for p in tmp_path.rglob("*.nbi"))
