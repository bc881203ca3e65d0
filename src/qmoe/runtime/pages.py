"""Giving a tensor's memory pages back to the kernel once a load no longer needs them (Linux).

transformers loads a checkpoint's tensors as views of the memory-mapped shard files, and every page a
process has read stays in its resident set while the mapping lives, which is as long as any tensor of that
file does. ``qmoe.load(..., int8_weights=True)`` reads each 16-bit attention and head weight once to
quantize it and never again, yet on the real-shaped benchmark (docs/runtime.md) those pages kept ~170 MiB
of the process's peak resident memory: more than the int8 weights that replaced them.

``release(t)`` asks the kernel to reclaim the whole pages inside ``t``'s storage with
``madvise(MADV_PAGEOUT)`` (Linux 5.4+). It never changes a value: a clean page of a file mapping is dropped
and read again from the file (the page cache) if it is touched again, and a page that holds data of this
process alone (anonymous memory, or a written page of a private mapping) is swapped out, or stays where
there is no swap. So it is safe on a tensor that something else still reads (a tied embedding): that read
costs a page fault, not a wrong value. Elsewhere, or when the call fails, it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

from torch import Tensor

MADV_PAGEOUT = 21  # linux/mman.h
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def release(t: Tensor) -> int:
    """Ask the kernel to reclaim the whole pages inside CPU tensor ``t``'s bytes; returns the bytes asked
    for (0 where nothing was: not Linux, not CPU, smaller than a page, or the call failed)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    start, n = t.data_ptr(), t.numel() * t.element_size()
    lo = -(-start // page) * page  # whole pages only: the neighbours of t may still be in use
    hi = (start + n) // page * page
    if hi <= lo or _madvise()(lo, hi - lo, MADV_PAGEOUT) != 0:
        return 0
    return hi - lo
