"""Length-limited canonical prefix codes: construction, canonical codewords, single-lookup decode table.

The code lengths are optimal under the length limit (package-merge, Larmore & Hirschberg 1990). Codewords
are canonical (deflate, RFC 1951 section 3.2.2): symbols sorted by (length, symbol index) get consecutive
MSB-first codewords. The stream is read LSB-first, so the encoder writes each codeword bit-reversed and the
decoder indexes its table with the next ``max_len`` stream bits as an integer (first stream bit = bit 0).
"""

from __future__ import annotations

import numpy as np

# Decode-table entry layout (int32), see docs/format.md "Decode table":
#   bits 0..4  codeword length in bits (0 = no codeword has this prefix -> corrupt stream)
#   bits 5..6  value v: 0 = no weight written (escape or end of row), 1..3 = nonzero value written at pos
#   bit  7     end of row: the remaining weights of the row are background
#   bits 8..30 skip: background weights to pass before writing (run length; escape = run_limit)
LEN_MASK = 0x1F
VAL_SHIFT = 5
EOR_FLAG = 0x80
SKIP_SHIFT = 8
EOR_SKIP = (1 << 23) - 1  # larger than any legal width, so `pos += skip` always ends the row


def code_lengths(counts: np.ndarray, max_len: int) -> np.ndarray:
    """Optimal code lengths ``[n] uint8`` for symbol ``counts [n]`` with no length above ``max_len``.

    Symbols with count 0 get length 0 (no codeword). A lone used symbol gets length 1. Deterministic: ties
    are broken by symbol index.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    n = len(used)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    if n == 0:
        return lengths
    if n == 1:
        lengths[used[0]] = 1
        return lengths
    assert n <= (1 << max_len), f"{n} symbols cannot fit codes of at most {max_len} bits"
    # Leaves sorted by (count, symbol). An item is (weight, node); node is a symbol index (int) for a leaf
    # or a (left, right) tuple for a package. Packages never share children, so counting leaf occurrences in
    # the selected 2n-2 items visits O(n * max_len) nodes.
    order = sorted(used.tolist(), key=lambda s: (int(counts[s]), s))
    leaves = [(int(counts[s]), s) for s in order]
    items = leaves
    for _ in range(max_len - 1):
        packages = [(items[i][0] + items[i + 1][0], (items[i][1], items[i + 1][1]))
                    for i in range(0, len(items) - 1, 2)]
        items = _merge(leaves, packages)
    stack = [node for _, node in items[: 2 * n - 2]]
    depth = np.zeros(len(counts), dtype=np.int64)
    while stack:
        node = stack.pop()
        if isinstance(node, tuple):
            stack.extend(node)
        else:
            depth[node] += 1
    lengths[:] = depth
    return lengths


def _merge(leaves: list, packages: list) -> list:
    # Stable merge by weight; on equal weight the leaf first (any fixed rule keeps encoding deterministic).
    out, i, j = [], 0, 0
    while i < len(leaves) and j < len(packages):
        if leaves[i][0] <= packages[j][0]:
            out.append(leaves[i])
            i += 1
        else:
            out.append(packages[j])
            j += 1
    out.extend(leaves[i:])
    out.extend(packages[j:])
    return out


def kraft_ok(lengths: np.ndarray, max_len: int) -> bool:
    """True if the nonzero ``lengths`` are at most ``max_len`` and form a prefix code (Kraft sum <= 1)."""
    lengths = np.asarray(lengths)
    if lengths.size and int(lengths.max()) > max_len:
        return False
    used = lengths[lengths > 0].astype(np.int64)
    return int(np.sum(np.left_shift(1, max_len - used))) <= (1 << max_len)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """MSB-first canonical codewords ``[n] uint32`` for ``lengths [n]`` (0 where the length is 0)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint32)
    code, prev_len = 0, 0
    for s in sorted(np.flatnonzero(lengths).tolist(), key=lambda s: (int(lengths[s]), s)):
        code <<= int(lengths[s]) - prev_len
        prev_len = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def reverse_bits(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Codewords with their ``length`` low bits reversed (what the LSB-first writer emits). ``[n] uint32``."""
    out = np.zeros(len(codes), dtype=np.uint32)
    c = np.asarray(codes, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    for b in range(int(lengths.max(initial=0))):
        bit = (c >> np.maximum(lengths - 1 - b, 0)) & 1
        out |= np.where(b < lengths, bit << b, 0).astype(np.uint32)
    return out


def decode_lut(lengths: np.ndarray, skips: np.ndarray, vals: np.ndarray, eor: np.ndarray,
               max_len: int) -> np.ndarray:
    """Single-lookup decode table ``[2**max_len] int32`` indexed by the next ``max_len`` stream bits.

    ``skips``, ``vals``, ``eor`` give each symbol's meaning ``[n]``. Entries no codeword reaches stay 0.
    """
    lut = np.zeros(1 << max_len, dtype=np.int32)
    rev = reverse_bits(canonical_codes(lengths), lengths)
    for s in np.flatnonzero(lengths).tolist():
        ln = int(lengths[s])
        entry = ln | (int(vals[s]) << VAL_SHIFT) | (EOR_FLAG if eor[s] else 0) | (int(skips[s]) << SKIP_SHIFT)
        lut[int(rev[s]):: 1 << ln] = entry
    return lut
