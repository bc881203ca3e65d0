"""The compressed-experts module: one MoE layer's experts kept encoded, computed only for the routed tokens.

``CompressedExperts`` takes the place of a family's experts module (``SwitchTransformersExperts``,
``Qwen3MoeExperts``) inside the unchanged transformers model and is called with the same arguments; the
family's adapter reads the routing (token, expert, gate weight) from them, so this file knows no family.
The weights never become dense: each expert projection is an ``EncodedMatrix`` and the products go through
``qmoe.kernels``, which decodes inside the matmul. Loaded from a directory, the experts are ``MappedMatrix``
handles into the shard files (``qmoe.codec.mapped``): an expert is checked and opened the first time a token
routes to it (``matrix``), and its arrays stay views of the mapped file.

Two paths, by kernel backend (``backend``; default: triton for CUDA inputs, cpu otherwise):

- cpu / reference: the tokens are grouped by expert on the host and every active expert's projections run in
  one ``matmul_experts`` call per stage (one parallel launch over row blocks on the CPU);
- triton: each projection's experts are packed for the device once (``prepare``, at load or on first use)
  and kept here; a call sorts the (token, expert) pairs on the device and runs one ``matmul_routed`` launch
  per projection that selects the active experts by index. Nothing is prepared again for a new routing and
  nothing waits for the host, so generation stays on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qmoe.adapters.base import ExpertLayout, Routing, group_by_expert
from qmoe.codec import EncodedMatrix
from qmoe.codec.mapped import MappedMatrix
from qmoe.errors import FormatError


class CompressedExperts(nn.Module):
    """The experts of one MoE layer as encoded matrices; no parameters, no buffers.

    Expert ``e`` computes ``second(glu(first(x) + b_first)) + b_second`` (``ExpertLayout``; biases only where
    the family has them), scaled by its gate weight and summed into the token's output, as the module it
    replaces does.
    """

    def __init__(self, layout: ExpertLayout, routing: Callable[[tuple, dict[str, Any]], Routing],
                 num_experts: int, glu: Callable[[Tensor], Tensor], shapes: dict[str, tuple[int, int]],
                 activation: str = "") -> None:
        super().__init__()
        self.layout = layout
        self.routing = routing
        self.num_experts = num_experts
        self.activation = activation  # its name, for repr
        self.glu = glu  # [t, F*I] -> [t, I]
        self.shapes = dict(shapes)  # projection -> (rows, cols), nn.Linear orientation [out, in]
        # Stacked biases [E, rows] (gpt-oss) are ordinary parameters under their on-disk names relative to
        # this module ("gate_up_proj_bias"), so that transformers loads them as it loads the rest.
        self.bias_names: dict[str, str] = {}
        for p in layout.projections if layout.bias else ():
            name = layout.bias.format(proj=p).removeprefix(layout.container + ".")
            self.register_parameter(name, nn.Parameter(torch.zeros(num_experts, shapes[p][0]),
                                                       requires_grad=False))
            self.bias_names[p] = name
        # matrices[proj][e]; None until set_expert fills it; a MappedMatrix until its first use
        self.matrices: dict[str, list[EncodedMatrix | MappedMatrix | None]] = {p: [None] * num_experts
                                                                                for p in layout.projections}
        self.backend: str | None = None  # kernel backend; None: triton for CUDA inputs, cpu otherwise
        self._state: dict[str, Any] = {}  # projection -> prepared experts, for self._state_key
        self._state_key: tuple[str, str] | None = None  # (backend, device) the state was prepared for
        self.prepare_count = 0  # how often the experts were packed for a device (tests, diagnostics)
        self.dropped: tuple[int, ...] = ()  # experts with no weights: the router never chooses them
        self.drop_router: Callable[[], None] | None = None  # masks the router (after transformers loads it)
        # The fused decode step's table (``_fused_step``): [E, F + 1] Lists addresses of each expert's
        # projections in layout.projections order; 0 not looked up yet, -1 none (the stream kernel's).
        self._step_table: np.ndarray | None = None
        self._step_lists: dict[tuple[int, int], Any] = {}  # the Lists behind the table, kept alive here

    def drop(self, dropped: tuple[int, ...]) -> None:
        """Experts ``dropped`` have no weights. Each holds an all-zero placeholder of its shape, so that the
        kernels' per-layer state keeps one entry per expert index; the masked router never sends it a
        token (and if it did, the output would be zero)."""
        from qmoe.codec import encode_ternary

        self.dropped = tuple(dropped)
        for p, (rows, cols) in self.shapes.items():
            zero = encode_ternary(np.zeros((rows, cols), np.int8), np.zeros(rows, np.float32),
                                  np.zeros(rows, np.float32))
            for e in dropped:
                self.matrices[p][e] = zero

    def set_expert(self, e: int, proj: str, enc: EncodedMatrix | MappedMatrix, name: str = "") -> None:
        """Place expert ``e``'s projection ``proj``; FormatError if its shape does not fit the config (for a
        ``MappedMatrix``: when ``matrix`` first opens it)."""
        if isinstance(enc, EncodedMatrix):
            self._check_shape(enc, proj, name or str((e, proj)))
        self.matrices[proj][e] = enc

    def _check_shape(self, enc: EncodedMatrix, proj: str, name: str) -> None:
        want = self.shapes[proj]
        if tuple(enc.shape) != want:
            raise FormatError(f"encoded matrix {name} has shape {tuple(enc.shape)}, the model config expects "
                              f"{want}; the checkpoint does not match its config.json")

    def matrix(self, proj: str, e: int) -> EncodedMatrix:
        """Expert ``e``'s ``proj`` matrix, opened (and checked: crc32, structure, shape) on its first use."""
        m = self.matrices[proj][e]
        if isinstance(m, MappedMatrix):
            enc = m.get()  # FormatError naming file, matrix and row if corrupt
            self._check_shape(enc, proj, f"{m.name!r} in {m.path}")
            self.matrices[proj][e] = m = enc
        assert m is not None, f"expert {e} {proj} is not set"
        return m

    def prepare(self, device: Any, backend: str | None = None) -> None:
        """Pack every expert for ``device`` once (``qmoe.load(..., device=...)`` calls this); a no-op when
        it already is, or for backends that keep no device state."""
        from qmoe.kernels import prepare_experts

        backend = backend or self.backend or ("triton" if torch.device(device).type == "cuda" else "cpu")
        key = (backend, str(torch.device(device)))
        if self._state_key == key or backend in ("cpu", "reference"):  # the host backends keep no state
            return
        if self.missing():
            raise FormatError(f"{len(self.missing())} expert matrices are not set; cannot prepare the layer")
        self._state = {p: prepare_experts([self.matrix(p, e) for e in range(self.num_experts)], backend,
                                          device) for p in self.matrices}
        self._state_key = key
        self.prepare_count += 1

    @property
    def device_nbytes(self) -> int:
        """Bytes of the prepared device state (0 before ``prepare`` or for host-only backends)."""
        return sum(getattr(s, "nbytes", 0) for s in self._state.values())

    def missing(self) -> list[tuple[int, str]]:
        """``(expert, projection)`` pairs not set yet."""
        return [(e, p) for p, mats in self.matrices.items() for e, m in enumerate(mats) if m is None]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for mats in self.matrices.values() for e, m in enumerate(mats)
                   if m is not None and e not in self.dropped)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        r = self.routing(args, kwargs)
        backend = self.backend or ("triton" if r.x.device.type == "cuda" else "cpu")
        if backend in ("cpu", "reference"):
            return self._forward_grouped(r, backend)
        return self._forward_routed(r, backend)

    def _forward_routed(self, r: Routing, backend: str) -> Tensor:
        # x [T, d] -> out [T, d]; n (token, expert, gate) pairs, sorted by expert on the device
        from qmoe.kernels import matmul_routed

        out = torch.zeros_like(r.x)
        n = r.expert.numel()
        if n == 0:
            return out
        self.prepare(r.x.device, backend)
        order = torch.argsort(r.expert, stable=True)  # [n]
        tok, w = r.token[order], r.weight[order]
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=r.x.device)
        counts.index_add_(0, r.expert, torch.ones_like(r.expert, dtype=torch.int32))  # [E], no host sync
        bound = min(self.num_experts, n)  # experts with tokens, at most
        x = r.x.float()[tok]  # [n, d] grouped by expert
        expert = r.expert[order]  # [n]
        # prepare() opened every matrix, so the lists hold EncodedMatrix only
        h = torch.cat([matmul_routed(self.matrices[p], self._state[p], x, counts, bound, backend)
                       + self._bias(p, expert) for p in self.layout.first], dim=1)  # [n, F*I]
        second = self.layout.second
        y = matmul_routed(self.matrices[second], self._state[second], self.glu(h), counts, bound, backend)
        y = y + self._bias(second, expert)  # [n, d]
        out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
        return out

    def _forward_grouped(self, r: Routing, backend: str) -> Tensor:
        # x [T, d] -> out [T, d]; routing: n (token, expert, gate) pairs, t_e tokens for active expert e
        out = torch.zeros_like(r.x)
        x = r.x.float()  # the kernels compute in float32 whatever the model's dtype
        if r.x.shape[0] == 1 and r.expert.numel() and not self.bias_names:  # one token: decoding at batch 1
            order = torch.argsort(r.expert)  # its k experts in ascending order, as group_by_expert gives them
            experts = r.expert[order].tolist()
            if len(set(experts)) == len(experts):  # each once (a router may repeat none of them)
                if backend == "cpu" and self._fused_step(x, experts, r.weight[order], out):
                    return out
                return self._forward_single(x, experts, [0] * len(experts), r.token[order], r.weight[order],
                                            out, backend)
        groups = group_by_expert(r)  # [(e, token [t_e], gate [t_e])], ascending e as in transformers
        if not groups:
            return out
        from qmoe.kernels import matmul_experts

        if len(groups) == r.expert.numel() and not self.bias_names:
            tok = torch.cat([t for _, t, _ in groups])  # [n]: one token per active expert
            return self._forward_single(x, [e for e, _, _ in groups], tok.tolist(), tok,
                                        torch.cat([g for _, _, g in groups]), out, backend)
        first, second = self.layout.first, self.layout.second
        xs = [x[tok] for _, tok, _ in groups]  # [t_e, d] each
        # One grouped call per stage: every active expert's first projection(s), then every second one.
        h = matmul_experts([self.matrix(p, e) for e, _, _ in groups for p in first],
                           [xe for xe in xs for _ in first], backend)  # [t_e, I] per (expert, projection)
        k = len(first)
        hidden = [self.glu(torch.cat([h[i * k + j] + self._bias(p, e) for j, p in enumerate(first)], dim=1))
                  for i, (e, _, _) in enumerate(groups)]  # [t_e, I]
        y = matmul_experts([self.matrix(second, e) for e, _, _ in groups], hidden, backend)  # [t_e, d]
        for (e, tok, w), ye in zip(groups, y, strict=True):
            out.index_add_(0, tok, ((ye + self._bias(second, e)) * w[:, None]).to(out.dtype))
        return out

    def _forward_single(self, x: Tensor, experts: list[int], rows: list[int], tok: Tensor, w: Tensor,
                        out: Tensor, backend: str) -> Tensor:
        """``_forward_grouped`` when every active expert has one token (decoding at batch 1: the k experts of
        the one token), for families without expert biases: the same arithmetic, with the per-expert torch
        ops (slices, GLU, gate, scatter) done once for all, and the products of ternary experts read from
        their column lists (``_one_token``). Pair i: expert ``experts[i]`` (ascending), input row
        ``rows[i]`` of ``x [m, d]``, output row ``tok[i]``, gate ``w[i]``. A decode step on Qwen3-30B-A3B's
        shapes spent ~1.7 ms per layer in per-expert ops before (docs/runtime.md, issue 26). Tested against
        a dense float64 reference (tests/runtime/test_experts_single.py)."""
        first, second = self.layout.first, self.layout.second
        n = len(experts)
        h = _one_token([self.matrix(p, e) for e in experts for p in first], x,
                       [r for r in rows for _ in first], backend)  # [n*k, I], (expert, projection) order
        hidden = self.glu(h.view(n, -1))  # [n, k*I] -> [n, I]: row i is torch.cat(h_i, dim=1), as above
        y = _one_token([self.matrix(second, e) for e in experts], hidden, list(range(n)), backend)  # [n, d]
        # index_add_ adds the rows in index order, i.e. expert by expert ascending, as the general path does
        out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))  # [T, d]
        return out

    def _fused_step(self, x: Tensor, experts: list[int], w: Tensor, out: Tensor) -> bool:
        """One token's experts in one native call (``qmoe.kernels.lists.moe_step``: both stages, the
        activation and the gate-weighted sum) when every one of them has column lists, the activation is one
        it computes and the output is float32; False otherwise (the caller then takes ``_forward_single``,
        which builds lists on first use). The Python and small torch ops around two kernel calls cost a
        decode step on Qwen3-30B-A3B's shapes ~1.3 ms per layer (docs/runtime.md, issue 26)."""
        from qmoe.adapters.base import GLU
        from qmoe.kernels import lists

        glu = self.glu
        if (out.dtype != torch.float32 or not isinstance(glu, GLU) or self.activation not in lists.ACTIVATIONS
                or lists.cache() is None):
            return False
        if self._step_table is None:
            self._step_table = np.zeros((self.num_experts, len(self.layout.projections)), dtype=np.int64)
        table, e = self._step_table, np.asarray(experts, dtype=np.int64)
        rows = table[e]  # [k, F + 1]
        if (rows < 0).any():
            return False
        if not rows.all():
            cache = lists.cache()
            for ex in experts:
                for i, p in enumerate(self.layout.projections):
                    if table[ex, i] == 0:
                        got = cache.get(self.matrix(p, ex))  # builds the lists on first use, within budget
                        table[ex, i] = -1 if got is None else got.address
                        if got is not None:
                            self._step_lists[(ex, i)] = got
            if (table[e] <= 0).any():
                return False
        inner = self.shapes[self.layout.second][1]
        lists.moe_step(table, e, w.float().contiguous().numpy(), x, out, inner, self.activation, glu.gated)
        return True

    def _bias(self, proj: str, e: int | Tensor) -> Tensor | float:
        """``proj``'s bias for expert ``e`` (``[rows]``), or for each pair's expert ``e [n]`` (``[n, rows]``);
        0 where the family has none."""
        name = self.bias_names.get(proj)
        return 0.0 if name is None else getattr(self, name)[e].float()

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{p}={r}x{c}" for p, (r, c) in self.shapes.items())
        weights = self.num_experts * sum(r * c for r, c in self.shapes.values())
        n = self.nbytes
        return (f"experts={self.num_experts}, {shapes}, act={self.activation}, encoded={n / 2**20:.2f} MiB "
                f"({8 * n / max(weights, 1):.3f} bits/weight)")


def _one_token(encs: list[EncodedMatrix], x: Tensor, which: list[int], backend: str) -> Tensor:
    """``out[i] = x[which[i]] @ W_i^T`` for matrices of one shape and ``x [m, cols]``: ``[len(encs), rows]``.
    On the CPU backend the matrices that have column lists (``qmoe.kernels.lists``: built on first use
    within its memory budget) go through that kernel in one call and the rest through the stream kernel in
    one call; elsewhere all through ``matmul_experts``."""
    from qmoe.kernels import matmul_experts

    cache = None
    if backend == "cpu":
        from qmoe.kernels import lists

        cache = lists.cache()
    if cache is None:
        return torch.cat(matmul_experts(encs, [x[i:i + 1] for i in which], backend))
    got = [cache.get(enc) for enc in encs]
    rest = [i for i, g in enumerate(got) if g is None]
    if not rest:
        return lists.matvec(got, x, which)  # type: ignore[arg-type]
    out = torch.empty(len(encs), encs[0].shape[0], dtype=torch.float32)
    fast = [i for i, g in enumerate(got) if g is not None]
    if fast:
        out[fast] = lists.matvec([got[i] for i in fast], x, [which[i] for i in fast])
    out[rest] = torch.cat(matmul_experts([encs[i] for i in rest], [x[which[i]:which[i] + 1] for i in rest],
                                         backend))
    return out
