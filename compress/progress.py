"""Progress of long work: a bar on a terminal (done of total, rate, elapsed, time left), a plain
line every few seconds when stderr is a file or a pipe (a log, CI), nothing with --quiet.

Every loop that can take long takes its bar from here, so one switch (`set_quiet`) and one check of
the terminal decide for all of them. Standard library and tqdm only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

_QUIET = False
PLAIN_EVERY_SECONDS = 10.0


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


class _PlainLines:
    """The tqdm calls we use, written as a line at most every PLAIN_EVERY_SECONDS, and at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.first = initial

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_SECONDS or self.n >= self.total:
            self.last = now
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = now - self.started
        done = self.n - self.first
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        eta = f", {left:.0f} s left" if left == left and self.n < self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, {elapsed:.0f} s{eta}{postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def __iter__(self):  # pragma: no cover - only the wrapping form below iterates
        raise TypeError("iterate over bar(iterable=...)")


class _Iterating(_PlainLines):
    def __init__(self, iterable: Any, total: int, desc: str, unit: str) -> None:
        super().__init__(total, desc, unit)
        self.iterable = iterable

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)


def bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, iterable: Any = None) -> Any:
    """A progress bar over `total` units (or wrapping `iterable`): `.update(n)`, `.close()`."""
    if iterable is not None and total is None:
        total = len(iterable)
    if _QUIET:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, disable=True)
    if not sys.stderr.isatty():
        return _Iterating(iterable, total, desc, unit) if iterable is not None else _PlainLines(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
