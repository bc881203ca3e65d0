"""A process computes on the threads its environment asks for (qmoe.pipeline.dist.settle_threads): numba's
OpenMP layer shares the thread count with torch, and a numba call must not change torch's."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import numpy as np, torch
from qmoe import codec
from qmoe.pipeline.dist import settle_threads
threads, note = settle_threads()
enc = codec.encode_ternary(np.zeros((4, 8), np.int8), np.ones(4), np.ones(4))  # numba sets its threads
codec.decode(enc)
print(threads, torch.get_num_threads(), note)
"""


def _run(**env: str) -> str:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", CODE], env=full, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_threads_follow_omp_num_threads_through_numba_calls() -> None:
    assert _run(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2") == "1 1 None"
    assert _run(OMP_NUM_THREADS="2", NUMBA_NUM_THREADS="2") == "2 2 None"


def test_another_count_is_said_in_one_line() -> None:
    out = _run(OMP_NUM_THREADS="2", NUMBA_NUM_THREADS="1")
    threads, torch_threads, note = out.split(" ", 2)
    assert (threads, torch_threads) == ("1", "1") and "not the 2 asked for" in note and "\n" not in note
