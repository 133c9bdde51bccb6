"""Progress of long work, the one way every command shows it: a bar on a terminal, plain lines elsewhere.

A tqdm bar redraws itself with carriage returns, which a log file or a pipe (``... 2>&1 | tee log``,
a SLURM output file) keeps as one ever-growing line of redraws. When standard error is not a terminal,
progress is a plain line instead, one every ``PLAIN_EVERY_S`` seconds, and one at the end with the time
taken (work done sooner says nothing: the command's own summary follows). Only rank 0 of a torchrun
job reports.
"""

from __future__ import annotations

import sys
import time

from . import distributed as xdist

PLAIN_EVERY_S = 30.0


class Progress:
    """``update(n)`` as work finishes, ``note(**figures)`` for running counts, ``close()`` at the end (or
    use it as a context manager). ``description`` None shows nothing."""

    def __init__(self, total: int | None, description: str | None, unit: str = "item", *, initial: int = 0,
                 enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.description, self.unit, self.count = total, description, unit, initial
        self.shown = enabled and description is not None and xdist.is_main_process()
        self.figures: dict = {}
        self.bar = None
        self.started = self.last_line = time.monotonic()
        self.lines = 0
        self.closed = False
        if self.shown and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit=unit, leave=False,
                            dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.shown:
            now = time.monotonic()
            if now - self.last_line >= PLAIN_EVERY_S:
                self._line(now)

    def note(self, **figures) -> None:
        self.figures.update(figures)
        if self.bar is not None:
            self.bar.set_postfix(**figures)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.shown and self.lines:
            self._line(time.monotonic(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        self.last_line, self.lines = now, self.lines + 1
        of = f"/{self.total}" if self.total else ""
        share = f" ({self.count / self.total:.0%})" if self.total else ""
        figures = "".join(f", {k} {v}" for k, v in self.figures.items())
        took = f" in {now - self.started:.0f} s" if done else ""
        print(f"{self.description}: {self.count}{of} {self.unit}s{share}{figures}{took}", file=self.stream,
              flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def progress(iterable, description: str | None, total: int | None = None, initial: int = 0, unit: str = "batch"):
    """``iterable``, reporting each item as done (see :class:`Progress`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, description, unit, initial=initial) as shown:
        for item in iterable:
            yield item
            shown.update(1)
