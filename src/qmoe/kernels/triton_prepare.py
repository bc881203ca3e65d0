"""Device upload for the Triton kernel: pack encoded matrices once into flat device tensors.

A row of a c2048 expert (6144 columns at ~0.7 bits/weight) is ~700 codewords, and a prefix code must be
read in order: one lane per row would make the decode chain 700 dependent lookups long while only ~2k lanes
exist for the whole matrix. So each row is cut into P *pieces* (P a power of two) at codeword boundaries,
found here by one vectorised decode of the whole matrix; a piece records where it starts in the stream,
which column it starts at, and how many codewords it holds. P lanes then decode one row concurrently and
their partial dot products are summed in registers (no atomics). The pieces are a runtime index, not part
of the file format: 8 bytes per piece (int32 start bit, int16/int32 column, int16/int32 codeword count).

Everything for a group of same-shape matrices (the experts of one MoE layer) is concatenated:

    stream     int32  [sum of nwords]          every matrix's stream words (uint32 bits viewed as int32)
    stream_off int64  [E]                      first word of each matrix in ``stream``
    lut        int32  [E, 4096]                each matrix's single-lookup decode table
    scale      fp32   [E, rows, 4]             [base, scale(v=1), scale(v=2), scale(v=3)] per row, below
    pbit       int32  [E, rows * P + 1]        start bit of each piece (row-major); the last = total bits
    pcol       int16|int32 [E, rows * P]       column where each piece starts
    pnsym      int16|int32 [E, rows * P]       codewords in each piece

Weights: ``W[r, c] = base[r] + scale[r, v]`` where v is the symbol value written at c (0 = background), so
``y = base * sum(x) + sum over nonzeros of scale[v] * x[c]``. Ternary: base 0, scale (lo, hi, 0). int2:
base = level of the background code, scale[v] = level(code v) - base.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qmoe.codec import huffman
from qmoe.codec.format import MAX_CODE_LEN, EncodedMatrix

DEFAULT_PIECE_BITS = 512  # ~90 codewords per lane; the decode chain length vs 8 bytes of index per piece
MAX_PIECES = 64


@dataclass(frozen=True)
class PreparedGroup:
    """Same-shape encoded matrices packed for the Triton kernel (one matrix: ``n_experts == 1``)."""

    kind: str
    n_experts: int
    rows: int
    cols: int
    pieces: int  # P, lanes per row (power of two)
    stream: object  # torch.Tensor, see module docstring
    stream_off: object
    lut: object
    scale: object
    pbit: object
    pcol: object
    pnsym: object
    stream_words: tuple[int, ...] = ()  # words of each matrix's stream (host copy, for ``expert``)

    def expert(self, e: int) -> PreparedGroup:
        """Matrix ``e`` as a one-matrix group: views into this group's tensors, no copy."""
        import torch

        lo = int(sum(self.stream_words[:e]))
        return PreparedGroup(
            kind=self.kind, n_experts=1, rows=self.rows, cols=self.cols, pieces=self.pieces,
            stream=self.stream[lo: lo + self.stream_words[e]],
            stream_off=torch.zeros(1, dtype=torch.int64, device=self.stream.device),
            lut=self.lut[e: e + 1], scale=self.scale[e: e + 1], pbit=self.pbit[e: e + 1],
            pcol=self.pcol[e: e + 1], pnsym=self.pnsym[e: e + 1], stream_words=(self.stream_words[e],))

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        """Device bytes of the packed tensors."""
        return sum(t.numel() * t.element_size() for t in (self.stream, self.stream_off, self.lut, self.scale,
                                                          self.pbit, self.pcol, self.pnsym))

    @property
    def index_nbytes(self) -> int:
        """Device bytes of the piece index (the cost of intra-row parallelism)."""
        return sum(t.numel() * t.element_size() for t in (self.pbit, self.pcol, self.pnsym))


def choose_pieces(encs: list[EncodedMatrix], piece_bits: int = DEFAULT_PIECE_BITS) -> int:
    """P: the power of two nearest (in log scale) to mean row bits / ``piece_bits``, in [1, MAX_PIECES]."""
    mean_row_bits = np.mean([e.total_bits / e.shape[0] for e in encs])
    p = 2 ** round(np.log2(max(mean_row_bits / piece_bits, 1.0)))
    return int(min(max(p, 1), MAX_PIECES))


def scale_table(enc: EncodedMatrix) -> np.ndarray:
    """``[rows, 4] float32``: (base, scale of v=1, v=2, v=3); see the module docstring."""
    lv = enc.levels.astype(np.float32)
    rows = enc.shape[0]
    out = np.zeros((rows, 4), dtype=np.float32)
    if enc.kind == "ternary":
        out[:, 1:3] = lv  # v=1 is code -1 (lo), v=2 is code +1 (hi)
        return out
    by_v = lv[:, [(enc.table.background + v) & 3 for v in range(4)]]  # level of the code each v writes
    out[:, 0] = by_v[:, 0]
    out[:, 1:] = by_v[:, 1:] - by_v[:, :1]
    return out


def piece_index(enc: EncodedMatrix, pieces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start bit ``[rows*P + 1] int64``, start column ``[rows*P]``, codewords ``[rows*P]``) of each piece.

    Piece k of row r starts at the first codeword boundary at or after bit ``start + k * row_bits / P``.
    All rows are decoded in lockstep (one numpy step per codeword), which also validates the stream: after
    this, the kernel may trust that every piece ends exactly at the next piece's start bit and that every
    value it writes lies inside the row, so it needs no error paths.
    """
    enc.validate()  # offsets inside the stream before any word is read
    rows, cols = enc.shape
    starts = enc.row_starts()  # [rows + 1] int64
    begin, end = starts[:-1], starts[1:]
    targets = begin[:, None] + ((end - begin)[:, None] * np.arange(pieces)) // pieces  # [rows, P]
    words = enc.stream.astype(np.int64)
    lut = enc.lut.astype(np.int64)
    pbit = np.empty((rows, pieces), dtype=np.int64)
    pcol = np.zeros((rows, pieces), dtype=np.int64)
    pnsym = np.zeros((rows, pieces), dtype=np.int64)
    pbit[:, 0] = begin
    cur = np.zeros(rows, dtype=np.int64)  # piece being filled, per row
    bit, pos = begin.copy(), np.zeros(rows, dtype=np.int64)
    bad = np.zeros(rows, dtype=bool)  # rows that break the codec's row-status rule (qmoe.codec.decode)
    live = np.arange(rows)  # every row holds at least one bit (validated)
    while live.size:
        b, p, k, stop = bit[live], pos[live], cur[live], end[live]
        # A new piece starts at this boundary when the row has passed its next target (at most one per
        # codeword; a piece skipped that way starts at a later boundary and may end up empty).
        nxt = np.minimum(k + 1, pieces - 1)
        move = (k + 1 < pieces) & (b >= targets[live, nxt])
        k = np.where(move, k + 1, k)
        cur[live] = k
        pbit[live[move], k[move]] = b[move]
        pcol[live[move], k[move]] = p[move]
        window = (words[b >> 5] | (words[(b >> 5) + 1] << 32)) >> (b & 31)
        e = lut[window & ((1 << MAX_CODE_LEN) - 1)]
        n = e & huffman.LEN_MASK
        v = (e >> huffman.VAL_SHIFT) & 3
        p = p + (e >> huffman.SKIP_SHIFT)
        b = b + n
        complete = p + (v != 0) >= cols  # width filled, or end of row (a skip past any width)
        wrong = (n == 0) | (b > stop) | ((v != 0) & (p >= cols))  # invalid, cut codeword, past the width
        wrong |= np.where(complete, b != stop, b >= stop)  # bits left over / the next codeword has no bits
        bad[live[wrong]] = True
        pnsym[live, k] += 1
        bit[live] = b
        pos[live] = p + (v != 0)
        live = live[~(complete | wrong)]
    if bad.any():  # the kernel has no error paths: a bad row never reaches it
        from qmoe.codec.decode import raise_row_error

        raise_row_error(enc, int(np.flatnonzero(bad)[0]))
    # Pieces never reached (short rows) are empty and start at the row's end.
    unreached = np.arange(pieces)[None, :] > cur[:, None]
    pbit[unreached] = np.broadcast_to(end[:, None], (rows, pieces))[unreached]
    return np.append(pbit.reshape(-1), starts[-1]), pcol.reshape(-1), pnsym.reshape(-1)


def _small_int(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int16 if a.max(initial=0) < 1 << 15 else np.int32)


def prepare(encs: EncodedMatrix | list[EncodedMatrix], device: object = "cuda",
            piece_bits: int = DEFAULT_PIECE_BITS, pieces: int | None = None) -> PreparedGroup:
    """Pack one encoded matrix or a list of same-shape, same-kind ones into device tensors, once.

    ``pieces`` (a power of two) overrides the lanes per row chosen from ``piece_bits``. Raises FormatError
    if a stream does not decode, ValueError if the matrices differ in shape or kind.
    """
    import torch

    group = [encs] if isinstance(encs, EncodedMatrix) else list(encs)
    if not group:
        raise ValueError("prepare needs at least one encoded matrix")
    kind, shape = group[0].kind, group[0].shape
    if any(e.kind != kind or e.shape != shape for e in group):
        raise ValueError("a prepared group holds matrices of one kind and shape (the experts of one layer); "
                         f"got {sorted({(e.kind, e.shape) for e in group})}")
    if any(e.total_bits >= 1 << 31 for e in group):
        raise ValueError("a matrix of 2**31 bits or more cannot be prepared for the Triton kernel; split it")
    p = choose_pieces(group, piece_bits) if pieces is None else pieces
    if p < 1 or p & (p - 1) or p > MAX_PIECES:
        raise ValueError(f"pieces must be a power of two in [1, {MAX_PIECES}], got {p}")
    idx = [piece_index(e, p) for e in group]
    sizes = np.array([len(e.stream) for e in group], dtype=np.int64)

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return PreparedGroup(
        kind=kind, n_experts=len(group), rows=shape[0], cols=shape[1], pieces=p,
        stream=dev(np.concatenate([e.stream for e in group]).view(np.int32)),
        stream_off=dev(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)),
        lut=dev(np.stack([e.lut for e in group]).astype(np.int32)),
        scale=dev(np.stack([scale_table(e) for e in group])),
        pbit=dev(np.stack([i[0] for i in idx]).astype(np.int32)),
        pcol=dev(_small_int(np.stack([i[1] for i in idx]))),
        pnsym=dev(_small_int(np.stack([i[2] for i in idx]))),
        stream_words=tuple(int(n) for n in sizes),
    )
