"""Encoder: fit a code to a matrix's (run, value) statistics and write the row streams.

Steps, for codes ``[rows, cols]``: one parallel pass histograms (value, preceding background run); the run
limit R (escape every R background codes) is picked by the ideal coded size of each candidate; the code is
package-merge Huffman limited to 12 bits; a second pass sizes each row, a third writes the rows in parallel.
"""

from __future__ import annotations

import numpy as np

from qmoe.codec import huffman
from qmoe.codec import levels as lv
from qmoe.codec.format import MAX_CODE_LEN, MAX_COLS, N_VALUES, CodeTable, EncodedMatrix, block_log2_for

# Candidates for R (each costs K*R+2 table bytes). Runs are coded as escapes (a unary quotient) + run % R,
# a Golomb code: best near R = ln 2 / -ln P(background), e.g. 23 at P = 0.97, hence the 1.5x steps.
RUN_LIMITS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _vmap(kind: str, background: int) -> np.ndarray:
    """``[256] uint8``: code byte -> symbol value (0 background, 255 illegal)."""
    vmap = np.full(256, 255, dtype=np.uint8)
    if kind == "ternary":
        vmap[0], vmap[255], vmap[1] = 0, 1, 2  # int8 0, -1, +1 viewed as uint8
    else:
        for c in range(4):
            vmap[c] = (c - background) & 3
    return vmap


def _symbol_counts(hist: np.ndarray, trail: np.ndarray, k: int, run_limit: int,
                   tail_escapes: bool) -> np.ndarray:
    """Symbol counts ``[K*R+2]`` for run limit R, from ``hist [cols+1, K]`` (runs before each value) and
    ``trail [cols+1]`` (trailing runs), ending rows with escapes or with end-of-row."""
    hist = hist.T
    runs = np.arange(hist.shape[1])
    counts = np.zeros(k * run_limit + 2, dtype=np.int64)
    q, m = runs // run_limit, runs % run_limit
    for v in range(k):
        counts[: k * run_limit][v::k] = np.bincount(m, weights=hist[v], minlength=run_limit).astype(np.int64)
    counts[-2] = int((hist * q).sum())
    if tail_escapes:
        counts[-2] += int((trail * ((runs + run_limit - 1) // run_limit)).sum())
    else:
        counts[-1] = int(trail[1:].sum())
    return counts


def _estimated_bits(counts: np.ndarray) -> float:
    """Entropy, with every symbol costing at least 1 bit as in any prefix code: close to Huffman's size."""
    c = counts[counts > 0].astype(np.float64)
    return float((c * np.maximum(1.0, -np.log2(c / c.sum()))).sum())


def fit_table(hist: np.ndarray, trail: np.ndarray, kind: str, background: int,
              smooth: bool = False) -> CodeTable:
    """Choose R and the code for run histograms (see _symbol_counts): smallest coded size + table size.

    The size is estimated for every candidate and computed exactly (package-merge) for the best three.
    ``smooth`` gives every symbol a codeword (shared tables).
    """
    k = N_VALUES[kind]
    candidates = []
    for r in RUN_LIMITS:
        for tail_escapes in (False, True):
            counts = _symbol_counts(hist, trail, k, r, tail_escapes) + (1 if smooth else 0)
            candidates.append((_estimated_bits(counts) + 8 * len(counts), r, tail_escapes, counts))
    candidates.sort(key=lambda c: c[:3])
    best = None
    for _, r, _, counts in candidates[:3]:
        lengths = huffman.code_lengths(counts, MAX_CODE_LEN)
        bits = int((lengths.astype(np.int64) * counts).sum()) + 8 * len(counts)
        if best is None or bits < best[0]:
            best = (bits, r, lengths)
    return CodeTable(kind, best[1], background, best[2])


def _stored_levels(levels: np.ndarray, kind: str, version: int | None) -> tuple[np.ndarray, int]:
    """``(levels as stored in memory, format version)``: version 2 (float32) when the levels lie on its
    grid and ``version`` is None or 2, else version 1 (fp16 when exact, else fp32). ValueError if version 2
    is asked for and the levels are off its grid."""
    if version not in (None, 1, 2):
        raise ValueError(f"version must be None, 1 or 2, got {version!r}")
    if version != 1 and lv.on_grid(levels, kind):
        return np.ascontiguousarray(levels, dtype="<f4"), 2
    if version == 2:
        raise ValueError("levels are not on the version-2 grid: round them with "
                         "qmoe.codec.levels.round_levels(levels, kind) first, or pass version=1")
    return _check_levels(levels), 1


def _check_levels(levels: np.ndarray) -> np.ndarray:
    """fp16 if every level survives the fp16 round trip bit-exactly (after fp32), else fp32."""
    l32 = np.ascontiguousarray(levels, dtype=np.float32)
    l16 = l32.astype(np.float16)
    if np.array_equal(l16.astype(np.float32).view(np.uint32), l32.view(np.uint32)):
        return l16.astype("<f2")
    return l32.astype("<f4")


def _histogram(codes_u8: np.ndarray, vmap: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from qmoe.codec import _numba

    with _numba.threads_for(codes_u8.size):
        hist, trail, illegal = _numba.run_histogram(codes_u8, vmap, k, _numba._chunks(codes_u8.shape[0]))
    if illegal:
        grid = "{-1, 0, 1}" if k == 2 else "0..3"
        raise ValueError(f"codes hold {illegal} values outside the grid {grid}")
    return hist, trail


def _encode(codes_u8: np.ndarray, kind: str, levels: np.ndarray, table: CodeTable | None,
            background: int, version: int = 1) -> EncodedMatrix:
    from qmoe.codec import _numba

    rows, cols = codes_u8.shape
    if not (rows >= 1 and 1 <= cols <= MAX_COLS):
        raise ValueError(f"shape {codes_u8.shape} unsupported: need rows >= 1 and 1 <= cols <= {MAX_COLS}")
    k = N_VALUES[kind]
    shared = table is not None
    if shared:
        if table.kind != kind:
            raise ValueError(f"table is for {table.kind} matrices, not {kind}")
        background = table.background
    vmap = _vmap(kind, background)
    if not shared:
        hist, trail = _histogram(codes_u8, vmap, k)
        table = fit_table(hist, trail, kind, background)
    rev, lengths = table.encoder_codes()
    with _numba.threads_for(codes_u8.size):
        nbits, missing = _numba.row_bits(codes_u8, vmap, k, table.run_limit, lengths)
    if missing:
        if not shared:
            raise ValueError("codes hold values outside the grid")
        raise ValueError("the shared table has no codeword for some symbol of this matrix; build it with "
                         "qmoe.codec.build_table over all matrices that share it")
    starts = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(nbits, out=starts[1:])
    total = int(starts[-1])
    if total >= 1 << 32:
        raise ValueError(f"matrix needs {total} bits; split it (a stream holds at most 2**32 - 1 bits)")
    block_log2 = block_log2_for(starts)
    words = np.zeros((total + 31) // 32 + 1, dtype="<u4")
    with _numba.threads_for(codes_u8.size):
        _numba.write_stream(codes_u8, vmap, k, table.run_limit, rev, lengths, starts, _numba._chunks(rows),
                            words)
    block_starts = starts[:-1][:: 1 << block_log2]
    block_offsets = np.concatenate([block_starts, [total]]).astype("<u4")
    row_deltas = (starts[:-1] - np.repeat(block_starts, 1 << block_log2)[:rows]).astype("<u2")
    return EncodedMatrix(kind, (rows, cols), table, words, block_log2, block_offsets, row_deltas, levels,
                         total, table_shared=shared, version=version)


def encode_ternary(codes: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   table: CodeTable | None = None, version: int | None = None) -> EncodedMatrix:
    """Encode ternary ``codes [rows, cols]`` int8 in {-1, 0, 1} with per-row levels ``lo``/``hi [rows]``.

    Weight = lo[r] for -1, 0 for 0, hi[r] for +1. ``version`` None: format 2 when the levels lie on its
    grid (``qmoe.codec.levels.round_levels``, as the quantizer leaves them), else format 1 (levels as fp16
    when exact, else fp32); 1 or 2 forces one. ``table`` (from ``build_table``) is a code shared by
    several matrices (each matrix still stores it). Deterministic: equal inputs give byte-identical blobs.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.int8:
        raise ValueError(f"codes must be an int8 [rows, cols] array, got {codes.dtype}{codes.shape}")
    lo, hi = np.asarray(lo).reshape(-1), np.asarray(hi).reshape(-1)
    if lo.shape != (codes.shape[0],) or hi.shape != (codes.shape[0],):
        raise ValueError(f"lo and hi must have shape [{codes.shape[0]}], got {lo.shape} and {hi.shape}")
    levels, v = _stored_levels(np.stack([lo, hi], axis=1), "ternary", version)
    return _encode(np.ascontiguousarray(codes).view(np.uint8), "ternary", levels, table, 0, v)


def encode_int2(codes: np.ndarray, levels: np.ndarray, table: CodeTable | None = None,
                version: int | None = None) -> EncodedMatrix:
    """Encode 2-bit ``codes [rows, cols]`` uint8 in {0, 1, 2, 3} with ``levels [rows, 4]``.

    Weight = levels[r, codes[r, c]]. The most frequent code is the run-length background. ``version`` as in
    ``encode_ternary`` (format 2's int2 grid: ``m(e) * (k - z)``, a scale and a zero point per row).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be a uint8 [rows, cols] array, got {codes.dtype}{codes.shape}")
    levels = np.asarray(levels)
    if levels.shape != (codes.shape[0], 4):
        raise ValueError(f"levels must have shape [{codes.shape[0]}, 4], got {levels.shape}")
    codes = np.ascontiguousarray(codes)
    background = 0
    if table is None:
        freq = np.bincount(codes.reshape(-1)[:: max(1, codes.size // 1_000_000)], minlength=256)
        background = int(np.argmax(freq[:4]))
    stored, v = _stored_levels(levels, "int2", version)
    return _encode(codes, "int2", stored, table, background, v)


def build_table(matrices: list[np.ndarray], kind: str = "ternary") -> CodeTable:
    """A code shared by ``matrices`` (same kind), with a codeword for every symbol so any matrix encodes."""
    if kind not in N_VALUES:
        raise ValueError(f"kind must be 'ternary' or 'int2', got {kind!r}")
    k = N_VALUES[kind]
    mats = [np.ascontiguousarray(m) for m in matrices]
    background = 0
    if kind == "int2":
        background = int(np.argmax(sum(np.bincount(m.reshape(-1), minlength=4)[:4] for m in mats)))
    vmap = _vmap(kind, background)
    width = max(m.shape[1] for m in mats)
    total, trail = np.zeros((width + 1, k), dtype=np.int64), np.zeros(width + 1, dtype=np.int64)
    for m in mats:
        hist, t = _histogram(m.view(np.uint8), vmap, k)
        total[: hist.shape[0]] += hist
        trail[: len(t)] += t
    return fit_table(total, trail, kind, background, smooth=True)
