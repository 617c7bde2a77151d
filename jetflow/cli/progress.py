"""Progress of a long read of the log (replay, verify, export): a bar with events/s and
ETA on a terminal, a plain line every few seconds otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from jetflow.cli.tables import console

__all__ = ["progress_reporter", "Report"]

# (last sequence read, the sequence it stops at, events so far)
Report = Callable[[int, int, int], None]


@contextmanager
def progress_reporter(label: str, *, stream: TextIO | None = None,
                      every_s: float = 2.0) -> Iterator[Report]:
    out = stream or sys.stderr
    if out.isatty():
        with _bar(label) as report:
            yield report
    else:
        yield _PlainLines(label, out, every_s)


@contextmanager
def _bar(label: str) -> Iterator[Report]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("seq  {task.fields[rate]:>9,.0f} events/s"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=None, rate=0.0)
        started = time.monotonic()

        def report(seq: int, target: int, events: int) -> None:
            rate = events / max(time.monotonic() - started, 1e-9)
            bar.update(task, completed=seq, total=target, rate=rate)

        yield report


class _PlainLines:
    def __init__(self, label: str, out: TextIO, every_s: float) -> None:
        self.label = label
        self.out = out
        self.every_s = every_s
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, seq: int, target: int, events: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and seq < target:
            return
        self.last = now
        rate = events / max(now - self.started, 1e-9)
        eta = (target - seq) / rate if rate else 0.0
        percent = 100.0 * seq / target if target else 100.0
        print(f"{self.label}: seq {seq}/{target} ({percent:.0f}%), {events} events, "
              f"{rate:,.0f} events/s, ETA {eta:.0f}s", file=self.out, flush=True)
