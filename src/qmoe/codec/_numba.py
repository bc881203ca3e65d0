"""numba kernels for the codec: run histogram, row bit lengths, parallel bit writer, row decoder.

Imported lazily (first encode or fast decode), never by ``import qmoe.codec``. Compiled with ``cache=True``
so only the first process on a machine pays the compile time.

Conventions shared by every kernel: ``codes_u8 [rows, cols]`` is the code matrix viewed as uint8 and
``vmap [256] uint8`` maps a code byte to its symbol value (0 = background, 1..K nonzero, 255 = illegal).
The stream is ``words [nwords] uint32``; stream bit ``b`` is bit ``b & 31`` of ``words[b >> 5]``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange

from qmoe.codec.format import MAX_CODE_LEN
from qmoe.codec.huffman import LEN_MASK, SKIP_SHIFT, VAL_SHIFT

# Row-decode status codes: the rule of qmoe.codec.decode (ROW_OK = 0, ROW_PAST_BITS, ...), whose reference
# decoder defines them; `decode_rows` reports the first failing row and its status.
ERR_BITS = 1  # ROW_PAST_BITS: the next codeword needs bits at or past the row's end
ERR_LENGTH = 2  # ROW_ENDS_SHORT: the row is complete before its last bit
ERR_WIDTH = 3  # ROW_PAST_WIDTH: a value lands past the row's width
ERR_CODE = 4  # ROW_BAD_SYMBOL: the row's next 12 bits start no codeword


# Below this many weights a kernel runs on one thread: on a busy machine (the usual case when encoding while
# other work runs) waiting for a second thread costs more than it saves. Encode or decode several matrices
# from a thread pool instead: every kernel releases the GIL.
PARALLEL_MIN_WEIGHTS = 1 << 24


@contextmanager
def threads_for(n_weights: int):
    """Run numba kernels on one thread for matrices below PARALLEL_MIN_WEIGHTS, else on all numba threads.

    numba's OpenMP layer shares the OpenMP thread count with torch, so torch's count is put back too: a
    numba call must not change how many threads torch computes with (the bytes depend on it)."""
    import sys

    torch = sys.modules.get("torch")  # never imported here: only restored if the caller uses it
    torch_threads = torch.get_num_threads() if torch is not None else None
    prev = numba.get_num_threads()
    numba.set_num_threads(1 if n_weights < PARALLEL_MIN_WEIGHTS else prev)
    try:
        yield
    finally:
        numba.set_num_threads(prev)
        if torch_threads is not None and torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def _chunks(rows: int, per: int = 64) -> np.ndarray:
    # Row chunks for the parallel kernels: several per thread so uneven rows balance out.
    return np.unique(np.concatenate([np.arange(0, rows, per), [rows]])).astype(np.int64)


@njit(cache=True, nogil=True)
def _row_histogram(row, vmap, k, hist):  # pragma: no cover - compiled
    """Add one row's symbols to ``hist [(cols+1) * K]``; return (trailing background run, illegal bytes)."""
    run = 0
    illegal = 0
    for j in range(len(row)):
        v = vmap[row[j]]
        if v == 0:
            run += 1
        else:
            if v > k:
                illegal += 1
                v = 1
            hist[run * k + v - 1] += 1
            run = 0
    return run, illegal


@njit(cache=True, parallel=True, nogil=True)
def run_histogram(codes_u8, vmap, k, chunks):  # pragma: no cover - compiled
    """Counts of (run before it, value) ``[cols+1, K]``, of trailing runs ``[cols+1]``, illegal bytes."""
    rows, cols = codes_u8.shape
    nch = len(chunks) - 1
    hist = np.zeros((nch, (cols + 1) * k), dtype=np.int64)  # one per row chunk: no races
    trail = np.zeros((nch, cols + 1), dtype=np.int64)
    illegal = np.zeros(nch, dtype=np.int64)
    for c in prange(nch):
        for r in range(chunks[c], chunks[c + 1]):
            t, bad = _row_histogram(codes_u8[r], vmap, k, hist[c])
            trail[c, t] += 1
            illegal[c] += bad
    return hist.sum(axis=0).reshape(cols + 1, k), trail.sum(axis=0), illegal.sum()


@njit(cache=True, nogil=True, inline="always")
def tail_escapes(run, run_limit, lengths, esc, eor):  # pragma: no cover - compiled
    """Escapes that end a row after ``run`` > 0 trailing background codes; 0 = use end-of-row instead.

    Escapes may run past the row's end, which ends the row too; the encoder takes the cheaper option.
    """
    n = (run + run_limit - 1) // run_limit
    if lengths[esc] == 0 or (lengths[eor] != 0 and lengths[eor] <= n * lengths[esc]):
        return 0
    return n


@njit(cache=True, parallel=True, nogil=True)
def row_bits(codes_u8, vmap, k, run_limit, lengths):  # pragma: no cover - compiled
    """Coded bits of each row ``[rows] int64`` under code ``lengths`` (0 -> the symbol has no codeword)."""
    rows, cols = codes_u8.shape
    esc, eor = k * run_limit, k * run_limit + 1
    out = np.zeros(rows, dtype=np.int64)
    missing = np.zeros(rows, dtype=np.int64)
    for r in prange(rows):
        run = 0
        n = 0
        miss = 0
        for j in range(cols):
            v = vmap[codes_u8[r, j]]
            if v == 0:
                run += 1
            else:
                while run >= run_limit:
                    n += lengths[esc]
                    miss += lengths[esc] == 0
                    run -= run_limit
                s = run * k + v - 1
                n += lengths[s]
                miss += lengths[s] == 0
                run = 0
        if run > 0:
            t = tail_escapes(run, run_limit, lengths, esc, eor)
            if t > 0:
                n += t * lengths[esc]
            else:
                n += lengths[eor]
                miss += lengths[eor] == 0
        out[r] = n
        missing[r] = miss
    return out, missing.sum()


@njit(cache=True, parallel=True, nogil=True)
def write_stream(codes_u8, vmap, k, run_limit, rev_codes, lengths, row_start, chunks,
                 words):  # pragma: no cover - compiled
    """Write all rows into ``words`` (zeroed) in parallel over row chunks; deterministic.

    Each chunk owns every word it writes except its first, which may share bits with the previous chunk's
    last word: that one goes to ``first`` and is OR-ed in afterwards, sequentially.
    """
    rows, cols = codes_u8.shape
    esc, eor = k * run_limit, k * run_limit + 1
    nch = len(chunks) - 1
    first = np.zeros(nch, dtype=np.int64)
    first_idx = np.full(nch, -1, dtype=np.int64)
    for c in prange(nch):
        r0 = chunks[c]
        bit = row_start[r0]
        w = bit >> 5
        acc = np.int64(0)
        nacc = bit & 31  # bits already occupied in the current word (by the previous chunk)
        flushed = False
        for r in range(r0, chunks[c + 1]):
            run = 0
            for j in range(cols + 1):
                # j == cols is a sentinel step that emits the end-of-row symbol if the row ends in background.
                if j < cols:
                    v = vmap[codes_u8[r, j]]
                    if v == 0:
                        run += 1
                        continue
                    while run >= run_limit:
                        acc |= np.int64(rev_codes[esc]) << nacc
                        nacc += lengths[esc]
                        run -= run_limit
                        if nacc >= 32:
                            if flushed:
                                words[w] = acc & 0xFFFFFFFF
                            else:
                                first[c] = acc & 0xFFFFFFFF
                                first_idx[c] = w
                                flushed = True
                            w += 1
                            acc >>= 32
                            nacc -= 32
                    s = run * k + v - 1
                    run = 0
                elif run > 0:
                    s = eor
                    t = tail_escapes(run, run_limit, lengths, esc, eor)
                    if t > 0:
                        s = esc
                        for _ in range(t - 1):
                            acc |= np.int64(rev_codes[esc]) << nacc
                            nacc += lengths[esc]
                            if nacc >= 32:
                                if flushed:
                                    words[w] = acc & 0xFFFFFFFF
                                else:
                                    first[c] = acc & 0xFFFFFFFF
                                    first_idx[c] = w
                                    flushed = True
                                w += 1
                                acc >>= 32
                                nacc -= 32
                else:
                    break
                acc |= np.int64(rev_codes[s]) << nacc
                nacc += lengths[s]
                if nacc >= 32:
                    if flushed:
                        words[w] = acc & 0xFFFFFFFF
                    else:
                        first[c] = acc & 0xFFFFFFFF
                        first_idx[c] = w
                        flushed = True
                    w += 1
                    acc >>= 32
                    nacc -= 32
        if nacc > 0:
            if flushed:
                words[w] = acc & 0xFFFFFFFF
            else:
                first[c] = acc & 0xFFFFFFFF
                first_idx[c] = w
    for c in range(nch):
        if first_idx[c] >= 0:
            words[first_idx[c]] |= first[c]


@njit(inline="always")
def decode_symbol(words, bit, lut):  # pragma: no cover - compiled
    """The decode-table entry of the codeword starting at stream ``bit`` (see qmoe.codec.huffman).

    Reads ``words[bit >> 5]`` and the next word; the caller guarantees ``bit`` < the row's end bit, which
    validation keeps inside the stream (whose last word is a zero guard word).
    """
    i = bit >> 5
    window = np.int64(words[i]) | (np.int64(words[i + 1]) << 32)
    return lut[(window >> (bit & 31)) & (len(lut) - 1)]


@njit(cache=True, nogil=True)
def decode_row(words, bit, end, lut, cols, out_row, rowtab):  # pragma: no cover - compiled
    """Decode one row's symbols from stream bits [bit, end) into ``out_row [cols]``; returns a status.

    ``rowtab [4]`` holds what to write: ``rowtab[0]`` for background, ``rowtab[v]`` for value v. This is
    the loop a fused kernel copies: replace ``out_row[pos] = rowtab[v]`` with ``acc += x[pos] * rowtab[v]``.
    """
    for j in range(cols):
        out_row[j] = rowtab[0]
    pos = 0
    while pos < cols:
        if bit >= end:
            return ERR_BITS
        e = decode_symbol(words, bit, lut)
        n = e & LEN_MASK
        if n == 0:  # no codeword in the next 12 bits: invalid if all 12 lie in the row, else bits ran out
            return ERR_CODE if bit + MAX_CODE_LEN <= end else ERR_BITS
        if bit + n > end:
            return ERR_BITS
        bit += n
        pos += e >> SKIP_SHIFT  # end of row: a skip past any width; an escape may also run past the end
        v = (e >> VAL_SHIFT) & 3
        if v != 0:
            if pos >= cols:
                return ERR_WIDTH
            out_row[pos] = rowtab[v]
            pos += 1
    if bit != end:
        return ERR_LENGTH
    return 0


@njit(cache=True, parallel=True, nogil=True)
def decode_rows(words, starts, lut, rowtab, out):  # pragma: no cover - compiled
    """Decode all rows in parallel: ``starts [rows+1]`` bits, ``rowtab [rows or 1, 4]``, ``out [rows, cols]``.

    Returns ``(first bad row or -1, its status)``.
    """
    rows, cols = out.shape
    status = np.zeros(rows, dtype=np.int64)
    stride = np.int64(1) if rowtab.shape[0] > 1 else np.int64(0)  # rowtab [1, 4] is shared by all rows
    for r in prange(rows):
        tab = rowtab[np.int64(r) * stride]
        status[r] = decode_row(words, starts[r], starts[r + 1], lut, cols, out[r], tab)
    for r in range(rows):
        if status[r] != 0:
            return r, status[r]
    return -1, 0
