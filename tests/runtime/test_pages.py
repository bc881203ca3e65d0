"""qmoe.runtime.pages.release: a tensor's pages leave the resident set and its values do not change."""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
import torch

from qmoe.runtime.pages import MADV_PAGEOUT, release

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def _pageout_supported() -> bool:  # the kernel's answer on a page of our own, not release()'s
    m = mmap.mmap(-1, mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(mmap.PAGESIZE), MADV_PAGEOUT) == 0


@linux
def test_a_mapped_weight_leaves_the_resident_set_and_keeps_its_values(tmp_path) -> None:
    if not _pageout_supported():
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    n = 64 << 20
    path = tmp_path / "w.bin"
    g = torch.Generator().manual_seed(0)
    want = torch.randint(-128, 127, (n,), dtype=torch.int8, generator=g)
    want.numpy().tofile(path)
    w = torch.from_file(str(path), shared=False, size=n, dtype=torch.int8)  # a private file mapping
    before = _rss_file_kib()
    assert torch.equal(w, want)  # reads every page
    touched = _rss_file_kib()
    assert touched - before > 48 << 10  # KiB: most of the 64 MiB is resident now
    assert release(w) >= n - 2 * mmap.PAGESIZE
    assert touched - _rss_file_kib() > 48 << 10
    assert torch.equal(w, want)  # read again from the file


def test_values_stay_and_nothing_is_asked_for_where_nothing_can_be() -> None:
    x = torch.randn(1 << 18)  # 1 MiB of anonymous memory: swapped out or left in place, never changed
    keep = x.clone()
    release(x)
    assert torch.equal(x, keep)
    assert release(torch.zeros(10)) == 0  # inside one page
    assert release(torch.zeros(1 << 20)[::2]) == 0  # not contiguous
    assert release(torch.empty(1 << 20, device="meta")) == 0  # no memory of this process
