"""numba drivers that spread the native kernels' row blocks over numba's threads.

Imported lazily (by qmoe.kernels.dense16, dense8 and lists on their first native call), never by
``import qmoe``. They live at module level, not inside the function that first imports numba: numba caches a
module-level ``cache=True`` function on disk once per machine, but a function defined inside another one
missed the cache in every process. Each process then compiled them again (the real-shaped benchmark's
warm-up took 7.5 s before and 3.8 s after, docs/kernels.md) and added a file to ``__pycache__`` (76 of them
for the dense driver on the development machine before this module).

Every native kernel has the signature ``int64 fn(meta*, x*, out*, ntok, tp, r0, r1)`` and is called through
``qmoe.kernels._cpu_numba._call_native`` with raw addresses, so these functions compile once for all shapes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qmoe.kernels._cpu_numba import _call_native


@njit(cache=True, parallel=True, nogil=True)
def dense_rows(fn, meta, x, y, ntok, rows, rpi):  # pragma: no cover - compiled
    """One dense matrix (dense16.c, dense8.c): ``y [ntok, rows] = x [ntok, cols] @ W^T``, ``rpi`` rows per
    work item; ``meta`` the kernel's int64 header (weight address, rows, cols, kind or scale address)."""
    items = (rows + rpi - 1) // rpi
    for i in prange(items):
        r0 = i * rpi
        r1 = min(r0 + rpi, rows)
        _call_native(fn, np.int64(meta.ctypes.data), np.int64(x.ctypes.data), np.int64(y.ctypes.data), ntok,
                     np.int64(0), r0, r1)


@njit(cache=True, parallel=True, nogil=True)
def list_rows(fn, calls, rpi):  # pragma: no cover - compiled
    """Column-list products (cpu_lists.c) for one token per matrix: ``calls [n, 4]`` int64 rows of (Lists
    address, x address, y address, rows); every matrix's rows cut into items of ``rpi``."""
    n = calls.shape[0]
    first = np.empty(n + 1, dtype=np.int64)
    first[0] = 0
    for c in range(n):
        first[c + 1] = first[c] + (calls[c, 3] + rpi - 1) // rpi
    for i in prange(first[n]):
        c = np.searchsorted(first, i, side="right") - 1
        r0 = (i - first[c]) * rpi
        r1 = min(r0 + rpi, calls[c, 3])
        _call_native(fn, calls[c, 0], calls[c, 1], calls[c, 2], np.int64(1), np.int64(0), r0, r1)


@njit(cache=True, parallel=True, nogil=True)
def moe_step(fn, addr, experts, weights, x, h, g, y, out, act, gated, rpi):  # pragma: no cover - compiled
    """One token's routed experts from column lists (``qmoe.kernels.lists.moe_step`` documents it).

    addr [E, F + 1]: Lists.address of each expert's F first projections and its second one; experts [k]
    ascending, weights [k]; x [cols]; h [k, F * R]; g [k, I]; y [k, d]; out [d] (+=); act 1 SiLU, 2 ReLU."""
    k, nf = experts.shape[0], addr.shape[1] - 1
    R, inner, d = h.shape[1] // nf, g.shape[1], y.shape[1]
    n1 = (R + rpi - 1) // rpi
    for i in prange(k * nf * n1):  # first projections: h[j, p*R : (p+1)*R] = x @ W_{e_j, p}^T
        jp = i // n1
        j, p = jp // nf, jp % nf
        r0 = (i - jp * n1) * rpi
        _call_native(fn, addr[experts[j], p], np.int64(x.ctypes.data),
                     np.int64(h.ctypes.data + 4 * (j * h.shape[1] + p * R)), np.int64(1), np.int64(0),
                     r0, min(r0 + rpi, R))
    for j in range(k):  # the activation: act(gate) * up over h's two halves, or act(h)
        for c in range(inner):
            a = h[j, c]
            a = a / (1.0 + np.exp(-a)) if act == 1 else max(a, 0.0)
            g[j, c] = a * h[j, inner + c] if gated else a
    n2 = (d + rpi - 1) // rpi
    for i in prange(k * n2):  # second projections: y[j] = g[j] @ W_{e_j, F}^T
        j = i // n2
        r0 = (i - j * n2) * rpi
        _call_native(fn, addr[experts[j], nf], np.int64(g.ctypes.data + 4 * j * inner),
                     np.int64(y.ctypes.data + 4 * j * d), np.int64(1), np.int64(0), r0, min(r0 + rpi, d))
    for j in range(k):  # expert by expert in ascending order, as index_add_ adds them
        for c in range(d):
            out[c] += weights[j] * y[j, c]
