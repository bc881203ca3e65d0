"""Length-limited canonical codes: optimality, the limit, and table/codeword consistency."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from qmoe.codec import huffman


def _huffman_cost(counts: np.ndarray) -> int:
    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


@pytest.mark.parametrize("seed", range(5))
def test_optimal_without_binding_limit(seed: int) -> None:
    counts = np.random.default_rng(seed).integers(0, 1000, size=50)
    lengths = huffman.code_lengths(counts, 15)
    assert huffman.kraft_ok(lengths, 15)
    assert int((lengths.astype(np.int64) * counts).sum()) == _huffman_cost(counts)
    assert np.all((lengths > 0) == (counts > 0))


def test_limit_is_respected() -> None:
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, dtype=np.int64)  # unconstrained Huffman would need 29-bit codes
    lengths = huffman.code_lengths(counts, 12)
    assert lengths.max() == 12 and huffman.kraft_ok(lengths, 12)
    assert list(huffman.code_lengths(np.array([0, 5, 0]), 12)) == [0, 1, 0]
    assert not huffman.kraft_ok(np.array([1, 1, 1]), 12)


def test_lut_matches_codewords() -> None:
    counts = np.random.default_rng(0).integers(1, 100, size=20)
    lengths = huffman.code_lengths(counts, 8)
    n = len(counts)
    lut = huffman.decode_lut(lengths, np.arange(n), np.ones(n, int), np.zeros(n, bool), 8)
    rev = huffman.reverse_bits(huffman.canonical_codes(lengths), lengths)
    for s in range(n):
        for fill in range(0, 256, 37):  # whatever bits follow the codeword
            e = int(lut[(int(rev[s]) | (fill << int(lengths[s]))) & 255])
            assert e & huffman.LEN_MASK == lengths[s] and e >> huffman.SKIP_SHIFT == s
