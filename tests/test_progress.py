"""qmoe.progress: plain lines outside a terminal, live bars on one, detail only when verbose."""

from __future__ import annotations

import io

import pytest

from qmoe.progress import LineBar, Progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_steps(progress: Progress, blocks: int = 5, batches: int = 7) -> None:
    bar = progress.bar(total=blocks, desc="blocks", unit="block")
    for b in range(blocks):
        bar.set_description(f"encoder block {b}")
        for _ in progress.bar(range(batches), desc="  calib", unit="batch", detail=True):
            pass
        progress.write(f"row {b}")
        bar.update(1)
    bar.close()


def test_not_a_terminal_writes_one_line_per_block_and_no_redraws(capsys: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    run_steps(Progress(stream=err))
    text = err.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines == [f"encoder block {b}: {b + 1}/5 blocks done, {line.rsplit(', ', 1)[1]}"
                     for b, line in enumerate(lines)]
    assert capsys.readouterr().out.splitlines() == [f"row {b}" for b in range(5)]


def test_verbose_adds_one_line_per_detail_pass() -> None:
    err = io.StringIO()
    run_steps(Progress(stream=err, verbose=True))
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert len(lines) == 5 + 5  # a line per block and one per finished pass, none per batch
    assert sum(line.startswith("  calib: 7/7 batches done") for line in lines) == 5


def test_disabled_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    run_steps(Progress(enabled=False, stream=err))
    assert err.getvalue() == "" and capsys.readouterr().out == ""


def test_throttled_bar_still_prints_its_last_state() -> None:
    err = io.StringIO()
    bar = Progress(stream=err, every_s=3600).bar(total=4, desc="eval", unit="batch")
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = err.getvalue().splitlines()
    # the first update prints (nothing printed yet), the rest are throttled, close prints the final count
    assert [line.split(",")[0] for line in lines] == ["eval: 1/4 batches done", "eval: 4/4 batches done"]


def test_terminal_gets_live_bars_only_at_the_main_level() -> None:
    tqdm = pytest.importorskip("tqdm").tqdm
    tty = FakeTTY()
    p = Progress(stream=tty)
    assert p.is_live()
    assert isinstance(p.bar(total=3, desc="blocks", unit="block"), tqdm)
    assert isinstance(p.bar(range(3), desc="calib", unit="batch", detail=True), LineBar)
    assert isinstance(Progress(stream=tty, verbose=True).bar(range(3), desc="c", unit="b", detail=True), tqdm)
    run_steps(p)
    assert "\r" in tty.getvalue()  # the live bar redraws in place
    assert "calib" not in tty.getvalue()


def test_of_accepts_bool_and_progress() -> None:
    assert Progress.of(True).enabled and not Progress.of(False).enabled
    p = Progress(verbose=True)
    assert Progress.of(p) is p
