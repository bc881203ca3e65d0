"""Matrix products with entropy-coded expert weights, ``y = x @ W^T``, without materialising W.

Backends, chosen per call from a table (name -> module, imported on first use):

    reference   codec reference decode -> dense float64 matmul -> float32: the oracle (kernels/reference.py)
    cpu         fused numba decode-matmul, multi-threaded over row blocks (kernels/cpu.py)
    triton      fused GPU kernel for CUDA tensors (kernels/triton_*.py, registered in _BACKENDS)

A backend module defines ``probe()`` (raises BackendUnavailable with what to install), ``matmul(enc, x)`` and
``matmul_experts(encs, xs)``; it may add ``prepare_experts(encs, device)`` and ``matmul_routed(state, x,
counts, bound)`` for a whole layer's experts kept on the device (the triton backend does; for the others
``matmul_routed`` below splits the tokens on the host). ``backend=None`` picks triton for CUDA tensors and
cpu otherwise. ``import qmoe.kernels`` imports numpy only; numba, torch and triton load when a backend is
first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from qmoe.codec.format import EncodedMatrix
from qmoe.errors import BackendUnavailable

__all__ = ["matmul", "matmul_experts", "matmul_routed", "prepare", "prepare_experts", "available_backends",
           "register_backend", "get_backend"]

_BACKENDS: dict[str, str] = {
    "reference": "qmoe.kernels.reference",
    "cpu": "qmoe.kernels.cpu",
    "triton": "qmoe.kernels.triton_matmul",
}
_probed: dict[str, ModuleType | BackendUnavailable] = {}


def register_backend(name: str, module: str) -> None:
    """Add (or replace) backend ``name`` implemented by the importable ``module``."""
    _BACKENDS[name] = module
    _probed.pop(name, None)


def get_backend(name: str) -> ModuleType:
    """The backend module, probed once; BackendUnavailable says why it cannot be used."""
    if name not in _BACKENDS:
        raise BackendUnavailable(f"unknown kernel backend {name!r}; choose one of {sorted(_BACKENDS)}")
    got = _probed.get(name)
    if got is None:
        try:
            mod = importlib.import_module(_BACKENDS[name])
            mod.probe()
            got = mod
        except ModuleNotFoundError as err:
            got = BackendUnavailable(f"kernel backend {name!r} is not available: {err}")
        except BackendUnavailable as err:
            got = err
        _probed[name] = got
    if isinstance(got, BackendUnavailable):
        raise got
    return got


def available_backends() -> list[str]:
    """Names of the backends that probe successfully on this machine."""
    ok = []
    for name in _BACKENDS:
        try:
            get_backend(name)
            ok.append(name)
        except BackendUnavailable:
            pass
    return ok


def _default(x: Any) -> str:
    device = getattr(x, "device", None)
    return "triton" if getattr(device, "type", "cpu") == "cuda" else "cpu"


def matmul(enc: EncodedMatrix, x: Any, backend: str | None = None) -> Any:
    """``x @ W^T`` for ``W = enc [rows, cols]``, ``x [tokens, cols]`` float32 -> ``[tokens, rows]`` float32.

    ``x`` is a torch tensor (result: torch, same device) or a numpy array (result: numpy). Raises ValueError
    for a wrong shape or dtype, FormatError if the stream turns out corrupt.
    """
    return get_backend(backend or _default(x)).matmul(enc, x)


def matmul_experts(encs: Sequence[EncodedMatrix], xs: Sequence[Any], backend: str | None = None) -> list[Any]:
    """``[xs[e] @ W_e^T for each e]`` in one call (one parallel launch for a whole MoE layer on CPU).

    ``xs[e]`` is ``[t_e, cols_e]`` (t_e may be 0); returns ``[t_e, rows_e]`` each.
    """
    if backend is None:
        backend = _default(xs[0]) if len(xs) else "cpu"
    return get_backend(backend).matmul_experts(encs, xs)


def prepare(enc: EncodedMatrix, backend: str = "cpu") -> Any:
    """Build (and cache on the backend) per-matrix state ahead of the first call; a no-op where not needed."""
    mod = get_backend(backend)
    prep = getattr(mod, "prepare", None)
    return prep(enc) if prep is not None else None


def prepare_experts(encs: Sequence[EncodedMatrix], backend: str, device: Any) -> Any:
    """Backend state for every expert of one projection on ``device`` (None where the backend keeps none).
    The caller owns it: one per (layer, projection), made once, passed to every ``matmul_routed``."""
    prep = getattr(get_backend(backend), "prepare_experts", None)
    return prep(encs, device) if prep is not None else None


def matmul_routed(encs: Sequence[EncodedMatrix], state: Any, x: Any, counts: Any, bound: int,
                  backend: str) -> Any:
    """``y [N, rows]`` for ``x [N, cols]`` whose rows are grouped by expert (ascending) with ``counts [E]``
    rows per expert of ``encs``; ``bound`` >= the number of experts with rows. ``state`` is what
    ``prepare_experts`` returned for ``encs``."""
    mod = get_backend(backend)
    if state is not None and hasattr(mod, "matmul_routed"):
        return mod.matmul_routed(state, x, counts, bound)
    import torch

    per = counts.tolist()  # backends without device state split on the host
    active = [e for e, n in enumerate(per) if n]
    ys = mod.matmul_experts([encs[e] for e in active], list(x.split([per[e] for e in active])))
    return torch.cat(ys) if ys else x.new_zeros((0, encs[0].shape[0]))
