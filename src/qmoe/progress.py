"""Progress reports that follow the terminal: live tqdm bars on a TTY, plain lines everywhere else.

A redirected log should read as a log: one line per finished step (a block, an evaluation), no carriage-return
redraws, no nested bars. So a :class:`Progress` makes two kinds of bar:

    main     (``detail=False``) the one bar a run shows: live on a terminal; else a line per update, at most
             one per ``every_s`` seconds (0: every update), and one when it ends
    detail   (``detail=True``) passes inside a step (batches through a block): shown only with ``verbose``;
             live on a terminal, else one line when the pass ends

``write`` prints a whole line (a table row) above a live bar, or plainly. Bars go to ``stream`` (default
stderr), lines to stdout. ``import qmoe.progress`` imports nothing heavy; tqdm loads with the first live bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class Progress:
    enabled: bool = True
    verbose: bool = False  # also show the detail bars
    live: bool | None = None  # redraw bars in place; None: when the bar stream is a terminal
    stream: TextIO | None = None  # where bars go; None: sys.stderr at the time of use
    every_s: float = 0.0  # non-live main bars: at most one line per this many seconds (the last always)

    @classmethod
    def of(cls, value: bool | Progress) -> Progress:
        """A Progress for the ``progress=`` argument of the API (True: the default, False: silent)."""
        return value if isinstance(value, Progress) else cls(enabled=bool(value))

    def _stream(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def is_live(self) -> bool:
        if self.live is not None:
            return self.live
        isatty = getattr(self._stream(), "isatty", None)
        return bool(isatty and isatty())

    def bar(self, iterable: Iterable[Any] | None = None, *, desc: str, unit: str = "it",
            total: int | None = None, initial: int = 0, detail: bool = False) -> Any:
        """A bar over ``iterable`` (or driven by ``update``) with tqdm's ``set_description``, ``update``,
        ``close`` and iteration."""
        shown = self.enabled and (self.verbose or not detail)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if shown and self.is_live():
            from tqdm import tqdm

            return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, leave=not detail,
                        file=self._stream(), dynamic_ncols=True)
        return LineBar(iterable, desc=desc, unit=unit, total=total, initial=initial,
                       stream=self._stream() if shown else None, every_s=None if detail else self.every_s)

    def write(self, line: str) -> None:
        """Print ``line`` to stdout, above a live bar if one is showing."""
        if not self.enabled:
            return
        if self.is_live():
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
        else:
            print(line, file=sys.stdout, flush=True)


class LineBar:
    """A bar that prints whole lines (or nothing, with ``stream=None``): ``every_s=None`` prints only when it
    closes, a number at most one line per that many seconds while it runs (0: every update)."""

    def __init__(self, iterable: Iterable[Any] | None, *, desc: str, unit: str, total: int | None,
                 initial: int, stream: TextIO | None, every_s: float | None) -> None:
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.n, self.initial, self.stream, self.every_s = initial, initial, stream, every_s
        self.start = time.perf_counter()
        self._last_line = -float("inf")
        self._printed_n: int | None = None  # n at the last line printed
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineBar without an iterable is driven by update()"
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.every_s is not None and now - self._last_line >= self.every_s:
            self._last_line = now
            self._line(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A main bar has printed its last update unless it was throttled; a detail bar prints only here.
        if self._printed_n != self.n:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        self._printed_n = self.n
        if self.stream is None:
            return
        of = f"/{self.total}" if self.total is not None else ""
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "x")) else "s")
        print(f"{self.desc}: {self.n}{of} {units} done, {now - self.start:.1f} s", file=self.stream,
              flush=True)
