"""Triton fused decode + matmul for entropy-coded experts: ``y = x @ W^T`` without materialising W.

Design (details and the performance reasoning: docs/kernels.md, "GPU"):

- Work is per codeword, never per weight. A lane owns one *piece* of a row (see triton_prepare: each row is
  cut into P pieces at codeword boundaries), reads the next 12 stream bits, looks the codeword up in the
  matrix's 4096-entry decode table (16 KiB, L1-resident), advances its column by the codeword's run, and for
  a nonzero gathers ``x[t, col]`` for its token tile and adds ``scale[v] * x`` to its accumulators.
- A program owns ``BLOCK_R`` rows x P pieces (``BLOCK_R * P`` lanes) and a tile of ``BLOCK_T`` tokens; the
  P partial sums of a row are reduced in registers at the end, so no atomics and a deterministic result.
- The loop runs a uniform trip count (the most codewords of any piece in the program, from the index)
  with finished lanes masked, so there is no per-step cross-warp vote.
- Grouped form: all matrices of a PreparedGroup share a shape, so the flat work list of (expert, row block)
  is implicit in the program id; tokens of expert e are rows ``offsets[e]:offsets[e+1]`` of the
  concatenated ``x`` and ``y``. One launch runs every active expert of a layer; an expert with no tokens
  costs its programs one load each.

Triton is optional (``pip install qmoe[gpu]``): it is imported on first use, never at module import.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernel runs on CPU tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from qmoe.errors import BackendUnavailable
from qmoe.kernels.triton_prepare import PreparedGroup, prepare

__all__ = ["LaunchConfig", "available", "prepare", "matmul_prepared", "matmul_grouped", "matmul"]


@dataclass(frozen=True)
class LaunchConfig:
    """Launch shape. ``lanes`` = BLOCK_R * P pieces per program; ``block_t`` caps the token tile."""

    lanes: int = 64
    num_warps: int = 2
    block_t: int = 16
    block_c: int = 256  # column chunk of the int2 sum(x) pre-pass


@functools.cache
def available() -> bool:
    """True if triton imports (probed once; never raises)."""
    try:
        import triton  # noqa: F401
    except Exception:  # any import failure (missing, broken install, no driver) means "not available"
        return False
    return True


@functools.cache
def _kernel():  # -> triton.JITFunction
    if not available():
        raise BackendUnavailable("the Triton backend needs triton: pip install 'qmoe[gpu]'")
    import triton
    import triton.language as tl

    @triton.jit
    def qmoe_matmul_kernel(
        stream_ptr, stream_off_ptr, lut_ptr, scale_ptr, pbit_ptr, pcol_ptr, pnsym_ptr,
        x_ptr, y_ptr, tok_ptr, eid_ptr,
        rows, cols, blocks_per_expert, stride_xt, stride_xc, stride_yt,
        P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_BASE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        slot = pid // blocks_per_expert  # the implicit work list: (slot, row block)
        rb = pid % blocks_per_expert
        e = tl.load(eid_ptr + slot).to(tl.int64)  # the expert a slot computes, among the group's E
        tok0 = tl.load(tok_ptr + slot)
        n_tok = tl.load(tok_ptr + slot + 1) - tok0
        t_first = tl.program_id(1) * BLOCK_T
        if t_first >= n_tok:  # expert idle, or no tokens left for this token-tile program
            return

        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] rows
        rmask = r < rows
        piece = r[:, None] * P + tl.arange(0, P)[None, :]  # [BR, P] lanes
        pmask = rmask[:, None]
        ebase = e * rows * P
        start = tl.load(pbit_ptr + ebase + e + piece, mask=pmask, other=0)  # pbit has rows*P+1 per expert
        end = tl.load(pbit_ptr + ebase + e + piece + 1, mask=pmask, other=0)
        col0 = tl.load(pcol_ptr + ebase + piece, mask=pmask, other=0).to(tl.int32)
        steps = tl.max(tl.max(tl.load(pnsym_ptr + ebase + piece, mask=pmask, other=0).to(tl.int32), 1), 0)
        srow = scale_ptr + (e * rows + r) * 4  # [BR]
        s1 = tl.load(srow + 1, mask=rmask, other=0.0)[:, None]  # [BR, 1]
        s2 = tl.load(srow + 2, mask=rmask, other=0.0)[:, None]
        s3 = tl.load(srow + 3, mask=rmask, other=0.0)[:, None]
        words = stream_ptr + tl.load(stream_off_ptr + e)
        lut = lut_ptr + e * 4096

        # Token tiles are spread over grid axis 1 (programs stride by the grid size); each re-decodes its
        # rows, which keeps the accumulators at BLOCK_T registers per lane for any token count.
        for t0 in range(t_first, n_tok, tl.num_programs(1) * BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)  # [BT]
            tmask = t < n_tok
            xrow = x_ptr + (tok0 + t).to(tl.int64) * stride_xt  # [BT] pointers to x[tok0 + t, 0]
            acc = tl.zeros((BLOCK_R, P, BLOCK_T), dtype=tl.float32)
            bit = start
            pos = col0
            for _ in range(steps):
                live = bit < end  # [BR, P]; pieces end exactly at the next piece's start (validated)
                w = bit >> 5
                lo = tl.load(words + w, mask=live, other=0).to(tl.uint32, bitcast=True)
                hi = tl.load(words + w + 1, mask=live, other=0).to(tl.uint32, bitcast=True)
                sh = (bit & 31).to(tl.uint32)
                # 12-bit window at `bit`, LSB-first; two shifts keep every shift amount below 32.
                window = (lo >> sh) | ((hi << 1) << (31 - sh))
                ent = tl.load(lut + (window & 4095).to(tl.int32), mask=live, other=0)
                bit += ent & 31
                pos += ent >> 8  # run of background weights (escape: run limit; end of row: past the width)
                v = (ent >> 5) & 3
                nz = live & (v != 0)
                s = tl.where(v == 1, s1, tl.where(v == 2, s2, s3))  # [BR, P]
                xv = tl.load(xrow[None, None, :] + (pos * stride_xc)[:, :, None],
                             mask=nz[:, :, None] & tmask[None, None, :], other=0.0)  # [BR, P, BT]
                acc += s[:, :, None] * xv.to(tl.float32)
                pos += (v != 0).to(tl.int32)
            out = tl.sum(acc, 1)  # [BR, BT]
            if HAS_BASE:  # int2: the background level times sum(x) over all columns
                xsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
                for c0 in range(0, cols, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    xt = tl.load(xrow[:, None] + (c * stride_xc)[None, :],
                                 mask=tmask[:, None] & (c < cols)[None, :], other=0.0)  # [BT, BC]
                    xsum += tl.sum(xt.to(tl.float32), 1)
                base = tl.load(srow, mask=rmask, other=0.0)  # [BR]
                out += base[:, None] * xsum[None, :]
            yp = y_ptr + (tok0 + t).to(tl.int64)[None, :] * stride_yt + r[:, None]  # [BR, BT]
            tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & tmask[None, :])

    return qmoe_matmul_kernel


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, (n - 1).bit_length()))


def matmul_grouped(group: PreparedGroup, x, offsets, max_tokens: int | None = None, out=None,
                   config: LaunchConfig = LaunchConfig(), experts=None, token_tiles: int | None = None):
    """Experts of a group in one launch: ``y[o_s:o_{s+1}] = x[o_s:o_{s+1}] @ W_{experts[s]}^T``.

    ``experts [S]`` (int32, on x's device; default every expert of the group in order) selects which of the
    group's prepared matrices each of S slots computes; ``x [N, cols]`` holds the tokens of slot 0, then
    slot 1, ...; ``offsets [S+1]`` (int32/int64, on x's device) their boundaries. A slot with no tokens costs
    its programs one load each. ``max_tokens`` bounds any slot's token count (read from ``offsets``, with a
    device sync, when not given); ``token_tiles`` caps the programs along the token axis (each then strides
    over several tiles). Returns ``y [N, rows]`` in x's dtype (or writes ``out``).
    """
    import torch
    import triton

    kernel = _kernel()
    n, cols = x.shape
    if cols != group.cols:
        raise ValueError(f"x has {cols} columns, the prepared matrices have {group.cols}")
    if experts is None:
        experts = _arange(group.n_experts, x.device)
    if offsets.numel() != experts.numel() + 1:
        raise ValueError(f"offsets must have {experts.numel() + 1} entries, got {offsets.numel()}")
    if max_tokens is None:
        max_tokens = int((offsets[1:] - offsets[:-1]).max()) if n else 0
    y = torch.empty((n, group.rows), dtype=x.dtype, device=x.device) if out is None else out
    if n == 0 or max_tokens == 0:
        return y
    p = group.pieces
    block_r = max(1, config.lanes // p)
    block_t = _pow2_at_most(max_tokens, config.block_t)
    blocks = triton.cdiv(group.rows, block_r)
    tiles = triton.cdiv(max_tokens, block_t)
    grid = (experts.numel() * blocks, tiles if token_tiles is None else max(1, min(tiles, token_tiles)))
    kernel[grid](
        group.stream, group.stream_off, group.lut, group.scale, group.pbit, group.pcol, group.pnsym,
        x, y, offsets, experts,
        group.rows, cols, blocks, x.stride(0), x.stride(1), y.stride(0),
        P=p, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_C=config.block_c, HAS_BASE=group.kind == "int2",
        num_warps=config.num_warps,
    )
    return y


def matmul_prepared(group: PreparedGroup, x, out=None, config: LaunchConfig = LaunchConfig()):
    """``y [T, rows] = x [T, cols] @ W^T`` for a one-matrix group (x: any strides; y: x's dtype)."""
    if group.n_experts != 1:
        raise ValueError(f"matmul_prepared takes one matrix, the group has {group.n_experts}: matmul_grouped")
    return matmul_grouped(group, x, _offsets(x.shape[0], x.device), max_tokens=x.shape[0], out=out,
                          config=config)


@functools.lru_cache(maxsize=64)
def _arange_cached(n: int, device: str):
    import torch

    return torch.arange(n, dtype=torch.int32, device=device)


def _arange(n: int, device) -> object:
    return _arange_cached(n, str(device))


@functools.lru_cache(maxsize=256)
def _offsets_cached(n: int, device: str):
    import torch

    return torch.tensor([0, n], dtype=torch.int32, device=device)


def _offsets(n: int, device) -> object:
    # Cached per (tokens, device): a fresh host-to-device copy per call would cost more than the kernel.
    return _offsets_cached(n, str(device))


def matmul(enc, x):
    """``x [..., cols] @ W^T`` for an EncodedMatrix; prepared on first use, cached per matrix/device."""
    lead = x.shape[:-1]
    y = matmul_prepared(prepared_for(enc, x.device), x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


_CACHE: dict = {}


def prepared_for(enc, device) -> PreparedGroup:
    """The PreparedGroup of ``enc`` on ``device``, built once and dropped when ``enc`` is collected."""
    import weakref

    key = (id(enc), str(device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is enc:
        return hit[1]
    group = prepare(enc, device=device)
    ref = weakref.ref(enc, lambda _r, k=key: _CACHE.pop(k, None))
    _CACHE[key] = (ref, group)
    return group
