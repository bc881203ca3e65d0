"""The "triton" backend of qmoe.kernels: probe, matmul, matmul_experts, prepare, prepare_experts,
matmul_routed (see qmoe.kernels).

Two ways to run a layer's experts:

- ``prepare_experts`` packs *every* expert of one projection for the device once, and the caller keeps the
  group (``runtime.CompressedExperts`` does, per projection); ``matmul_routed`` then computes whichever
  experts the routing picked, selected by index inside one launch, with no host round trip. This is the
  runtime's path: nothing is prepared again whatever the routing, and device memory stays that of the groups.
- ``matmul`` / ``matmul_experts`` take EncodedMatrix lists and cache the packed form per matrix, or per list
  of matrices (dropped when a matrix is garbage-collected). Fine for a fixed list; a caller that passes a
  different subset each call prepares (and keeps) a group per subset.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any

from qmoe.codec.format import EncodedMatrix
from qmoe.errors import BackendUnavailable
from qmoe.kernels import triton_kernel as tk
from qmoe.kernels.triton_prepare import PreparedGroup

_GROUPS: dict[tuple, tuple[list[weakref.ref], PreparedGroup]] = {}


def probe() -> None:
    """Raise BackendUnavailable unless triton imports and a CUDA device (or the interpreter) is there."""
    if not tk.available():
        raise BackendUnavailable("the triton backend needs triton: pip install 'qmoe[gpu]'")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("the triton backend needs a CUDA GPU (none is visible to torch)")


def prepare(enc: EncodedMatrix, device: Any = "cuda") -> PreparedGroup:
    return tk.prepared_for(enc, device)


def matmul(enc: EncodedMatrix, x: Any) -> Any:
    """``x [tokens, cols] @ W^T -> [tokens, rows]`` in x's dtype, on x's device."""
    _check(x, enc.shape[1], "x")
    return tk.matmul_prepared(tk.prepared_for(enc, x.device), x)


def _group_for(encs: Sequence[EncodedMatrix], device: Any) -> PreparedGroup:
    key = (tuple(id(e) for e in encs), str(device))
    hit = _GROUPS.get(key)
    if hit is not None and all(r() is e for r, e in zip(hit[0], encs, strict=True)):
        return hit[1]
    group = tk.prepare(list(encs), device=device)
    refs = [weakref.ref(e, lambda _r, k=key: _GROUPS.pop(k, None)) for e in encs]
    _GROUPS[key] = (refs, group)
    return group


def prepare_experts(encs: Sequence[EncodedMatrix], device: Any) -> PreparedGroup:
    """Every matrix of ``encs`` (one projection of one layer: same kind and shape) packed on ``device``."""
    return tk.prepare(list(encs), device=device)


ROUTED_TOKEN_TILES = 32  # token-axis programs per slot; each strides over the tiles beyond (prefill)


def matmul_routed(group: PreparedGroup, x: Any, counts: Any, bound: int) -> Any:
    """``y [N, rows]``: row i of ``x [N, cols]`` times the weights of the expert it was routed to.

    ``x``'s rows are grouped by expert in ascending expert order; ``counts [E]`` (integer, on x's device)
    says how many belong to each of the group's E experts; ``bound`` (host int) is at least the number of
    experts with tokens (``min(E, N)`` always is). The active experts are found on the device (a stable sort
    puts them first, in order), so nothing waits for the host: one launch over ``bound`` slots, idle slots
    returning at once.
    """
    import torch

    _check(x, group.cols, "x")
    if counts.numel() != group.n_experts:
        raise ValueError(f"counts has {counts.numel()} entries, the group has {group.n_experts} experts")
    slots = max(1, min(int(bound), group.n_experts))
    eid = torch.argsort((counts == 0).to(torch.int32), stable=True)[:slots]  # [S]: active experts first
    offsets = torch.zeros(slots + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(counts[eid], 0)
    return tk.matmul_grouped(group, x, offsets, max_tokens=int(x.shape[0]), experts=eid.to(torch.int32),
                             token_tiles=ROUTED_TOKEN_TILES)


def matmul_experts(encs: Sequence[EncodedMatrix], xs: Sequence[Any]) -> list[Any]:
    """``[xs[e] @ W_e^T]``; one launch when all matrices share kind and shape, else one per matrix."""
    import torch

    if len(encs) != len(xs):
        raise ValueError(f"got {len(encs)} matrices but {len(xs)} inputs")
    if not encs:
        return []
    for e, (enc, x) in enumerate(zip(encs, xs, strict=True)):
        _check(x, enc.shape[1], f"xs[{e}]")
    if len({(e.kind, e.shape) for e in encs}) > 1:
        return [matmul(enc, x) for enc, x in zip(encs, xs, strict=True)]
    device = xs[0].device
    counts = [int(x.shape[0]) for x in xs]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)
    y = tk.matmul_grouped(_group_for(encs, device), torch.cat(list(xs)), offsets, max_tokens=max(counts))
    return list(y.split(counts))


def _check(x: Any, cols: int, what: str) -> None:
    if not hasattr(x, "device") or x.ndim != 2 or x.shape[1] != cols:
        got = getattr(x, "shape", type(x))
        raise ValueError(f"{what} must be a torch tensor [tokens, {cols}], got {got}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{what} is on {x.device}; the triton backend takes CUDA tensors (or use 'cpu')")
