"""The native lane-parallel CPU kernel (cpu_lanes.c) against the reference decoder and the numba kernel, its
corrupt-stream behaviour, and the fallback to numba when it cannot be built.

Error budget as in test_cpu_kernel: within 1e-5 of the float64 reference relative to ``|x| @ |W|^T``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_cpu_kernel import MAKERS, check, int2, ternary

from qmoe import codec, kernels
from qmoe.codec.format import EncodedMatrix
from qmoe.errors import BackendUnavailable, FormatError
from qmoe.kernels import _native, cpu


def _native_reason() -> str | None:
    try:
        _native.load()
    except BackendUnavailable as err:
        return str(err).splitlines()[0]
    return None


REASON = _native_reason()
needs_native = pytest.mark.skipif(REASON is not None, reason=f"native CPU kernel unavailable: {REASON}")


@pytest.fixture
def mode():
    """Set the CPU kernel mode for one test, restoring the previous one (and the loader's state) after."""
    before = cpu._kernel

    def use(name: str) -> str:
        return cpu.set_kernel(name)

    yield use
    _native.reset()
    cpu._kernel = before


def _both(enc: EncodedMatrix, x: np.ndarray, use) -> tuple[np.ndarray, np.ndarray]:
    use("native")
    y = kernels.matmul(enc, x, backend="cpu")
    use("numba")
    return y, kernels.matmul(enc, x, backend="cpu")


@needs_native
@pytest.mark.parametrize("kind", ["ternary", "int2"])
@pytest.mark.parametrize(("rows", "cols", "p0"), [
    (1, 1, 0.5), (7, 5, 0.5), (13, 1003, 0.3), (67, 301, 0.885), (130, 257, 0.99), (9, 4099, 0.97),
    (300, 65, 0.7), (40, 2000, 0.999),
])
def test_native_matches_reference_and_numba(kind: str, rows: int, cols: int, p0: float, mode) -> None:
    rng = np.random.default_rng([rows, cols, int(p0 * 1000), kind == "int2", 16])
    enc = MAKERS[kind](rng, rows, cols, p0, bool(rows % 2))  # fp16 and fp32 levels
    for tokens in (1, 2, 8, 70):  # 70: two token passes of the native batch path
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        y, ref = _both(enc, x, mode)
        check(y, enc, x)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(x).sum(1).max()))


@needs_native
@pytest.mark.parametrize("kind", ["ternary", "int2"])
def test_native_short_and_uneven_rows(kind: str, mode) -> None:
    """Rows of a few bits (single-symbol mode from the start) mixed with long ones in one item, so lanes
    refill out of order, and a matrix with fewer rows than lanes."""
    rng = np.random.default_rng(11)
    mode("native")
    for _ in range(25):
        cols = int(rng.integers(1, 200))
        rows = int(rng.integers(1, 40))
        p0 = float(rng.choice([0.5, 0.9, 0.995]))
        enc = MAKERS[kind](rng, rows, cols, p0)
        for tokens in (1, 3):
            x = rng.standard_normal((tokens, cols)).astype(np.float32)
            check(kernels.matmul(enc, x, backend="cpu"), enc, x)


@needs_native
def test_lane_tables_match_the_kernel_tables() -> None:
    """TA/TB (cpu_lanes.c) hold exactly the fields of the multi-symbol and single-symbol tables."""
    from qmoe.kernels import _cpu_numba as nb

    for kind in ("ternary", "int2"):
        enc = MAKERS[kind](np.random.default_rng(3), 8, 500, 0.885)
        tabs = cpu.build_lane_tables(enc).view(np.uint32).astype(np.int64)
        lut2, lut = cpu.build_lut2(enc)[0][:-1], cpu.build_lut(enc).astype(np.int64)
        ta, tb = tabs[0], tabs[1]
        assert tabs.shape == (2, 8193) and ta[8192] == 0 and tb[8192] == 0
        m, s = ta[:4096], ta[4096:8192]
        np.testing.assert_array_equal(m & 15, lut2 & 15)
        np.testing.assert_array_equal((m >> 4) & 15, (lut2 >> 4) & 15)
        np.testing.assert_array_equal(m >> 8, lut2 >> nb.E2_ADV_SHIFT)
        np.testing.assert_array_equal(tb[:4096] & 0x7FFF, (lut2 >> 8) & 0xFFFF)
        np.testing.assert_array_equal((tb[:4096] >> 16) & 0x7FFF, (lut2 >> 24) & 0xFFFF)
        np.testing.assert_array_equal((tb[:4096] >> 15) & 1, ((lut2 >> 4) & 3) != 0)
        np.testing.assert_array_equal(tb[:4096] >> 31, ((lut2 >> 6) & 3) != 0)
        np.testing.assert_array_equal(s & 15, lut & 15)
        np.testing.assert_array_equal((s >> 4) & 3, (lut >> 4) & 3)
        np.testing.assert_array_equal(s >> 8, np.minimum(lut >> 6, nb.E2_ADV_END))
        val = ((lut >> 4) & 3) != 0
        np.testing.assert_array_equal(tb[4096:8192], np.where(val, ((lut >> 6) - 1) | (1 << 15), 0))


@needs_native
@pytest.mark.parametrize("kind", ["ternary", "int2"])
def test_native_corrupt_streams_fail_like_the_codec(kind: str, mode) -> None:
    """Flipped stream bits: the native kernel rejects exactly what the codec rejects (at batch 1 and T), and
    what the codec accepts it computes right; never a crash."""
    rng = np.random.default_rng(5)
    enc = MAKERS[kind](rng, 40, 150, 0.885)
    x = rng.standard_normal((9, 150)).astype(np.float32)
    mode("native")
    rejected = 0
    for _ in range(80):
        arrays = enc.to_arrays()
        stream = arrays["stream"].copy()
        for _ in range(int(rng.integers(1, 3))):
            bit = int(rng.integers(enc.total_bits))
            stream[bit >> 5] ^= np.uint32(1 << (bit & 31))
        arrays["stream"] = stream
        bad = EncodedMatrix.from_arrays(arrays, verify=False)
        try:
            w = codec.dequantize(bad)
        except FormatError:
            rejected += 1
            for t in (1, 2, 9):
                with pytest.raises(FormatError, match="corrupt"):
                    kernels.matmul(bad, x[:t])
            continue
        y = kernels.matmul(bad, x)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    assert rejected > 10


def test_forced_numba_and_the_auto_mode(mode, monkeypatch) -> None:
    rng = np.random.default_rng(6)
    enc = int2(rng, 20, 90, 0.8)
    x = rng.standard_normal((3, 90)).astype(np.float32)
    monkeypatch.setenv("QMOE_CPU_KERNEL", "numba")
    cpu._kernel = None
    assert cpu.kernel() == "numba"
    check(kernels.matmul(enc, x), enc, x)
    monkeypatch.setenv("QMOE_CPU_KERNEL", "auto")
    cpu._kernel = None
    assert cpu.kernel() == ("auto" if REASON is None else "numba")
    monkeypatch.setenv("QMOE_CPU_KERNEL", "fastest")
    cpu._kernel = None
    with pytest.raises(BackendUnavailable, match="QMOE_CPU_KERNEL"):
        cpu.kernel()


def test_failed_compile_falls_back_to_numba(mode, monkeypatch, tmp_path) -> None:
    """No usable compiler: auto falls back to numba (results unchanged), native says why."""
    monkeypatch.setenv("QMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    _native.reset()
    assert mode("auto") == "numba"
    enc = ternary(np.random.default_rng(7), 30, 70, 0.885)
    x = np.random.default_rng(8).standard_normal((4, 70)).astype(np.float32)
    check(kernels.matmul(enc, x), enc, x)
    with pytest.raises(BackendUnavailable, match="compile"):
        mode("native")
    (tmp_path / "broken.h").write_text("#error simulated compile failure\n")
    monkeypatch.setenv("CC", f"cc -include {tmp_path / 'broken.h'}")  # a compile that fails
    _native.reset()
    with pytest.raises(BackendUnavailable, match="simulated compile failure"):
        mode("native")
    assert not list(tmp_path.rglob("*.so")), "a failed build left a library behind"
    monkeypatch.setenv("QMOE_CACHE_DIR", str(tmp_path / "broken.h"))  # a file: no directory can be made there
    monkeypatch.delenv("CC")
    _native.reset()
    assert mode("auto") == "numba"


@needs_native
@pytest.mark.parametrize("kind", ["ternary", "int2"])
def test_scalar_item_path(kind: str, mode, monkeypatch, tmp_path) -> None:
    """The native kernel's scalar path (items whose bits do not fit the lanes' int32 offsets; non-x86
    machines), forced for every item by compiling with -DQMOE_SCALAR_ONLY: reference results, corrupt
    rows rejected like the codec."""
    monkeypatch.setenv("QMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{os.environ.get('CC', 'cc')} -DQMOE_SCALAR_ONLY")
    _native.reset()
    mode("native")
    rng = np.random.default_rng(9)
    for rows, cols, p0 in [(5, 13, 0.5), (70, 300, 0.885), (9, 2000, 0.99)]:
        enc = MAKERS[kind](rng, rows, cols, p0)
        for tokens in (1, 3, 70):
            x = rng.standard_normal((tokens, cols)).astype(np.float32)
            check(kernels.matmul(enc, x), enc, x)
    enc = MAKERS[kind](rng, 20, 100, 0.885)
    x = rng.standard_normal((2, 100)).astype(np.float32)
    rejected = 0
    for _ in range(40):
        arrays = enc.to_arrays()
        stream = arrays["stream"].copy()
        bit = int(rng.integers(enc.total_bits))
        stream[bit >> 5] ^= np.uint32(1 << (bit & 31))
        arrays["stream"] = stream
        bad = EncodedMatrix.from_arrays(arrays, verify=False)
        try:
            codec.dequantize(bad)
        except FormatError:
            rejected += 1
            with pytest.raises(FormatError, match="corrupt"):
                kernels.matmul(bad, x)
            continue
        kernels.matmul(bad, x)
    assert rejected > 5


@needs_native
def test_import_compiles_nothing(tmp_path) -> None:
    env = {**os.environ, "QMOE_CACHE_DIR": str(tmp_path)}
    code = "import qmoe, qmoe.kernels, qmoe.kernels.cpu, qmoe.kernels._native"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert not any(tmp_path.iterdir()), "importing qmoe built the native kernel"
