"""Progress is a bar on a terminal and plain lines in a log file or a pipe."""

import io

from xdc_fast import progress as progress_module
from xdc_fast.progress import Progress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_file_gets_plain_lines_at_intervals_and_the_time_taken(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    log = io.StringIO()
    with Progress(100, "prepare", "file", stream=log) as shown:
        for i in range(100):
            clock.now += 1.0  # one file a second: a line every PLAIN_EVERY_S files
            shown.note(kept=i + 1, rejected=0)
            shown.update(1)
    lines = log.getvalue().splitlines()
    every = int(progress_module.PLAIN_EVERY_S)
    assert "\r" not in log.getvalue()
    assert lines[0] == f"prepare: {every}/100 files ({every}%), kept {every}, rejected 0"
    assert len(lines) == 100 // every + 1
    assert lines[-1] == "prepare: 100/100 files (100%), kept 100, rejected 0 in 100 s"


def test_short_work_in_a_log_says_nothing(monkeypatch):
    log = io.StringIO()
    for _ in progress(range(50), "encoding", unit="batch"):
        pass
    with Progress(3, "shards", "video", stream=log) as shown:
        shown.update(3)
    assert log.getvalue() == ""


def test_a_terminal_gets_a_redrawn_bar_and_nothing_when_disabled():
    screen = Terminal()
    with Progress(4, "prepare", "file", stream=screen) as shown:
        for _ in range(4):
            shown.update(1)
    assert "\r" in screen.getvalue() and "prepare" in screen.getvalue()
    quiet = Terminal()
    with Progress(4, "prepare", "file", stream=quiet, enabled=False) as shown:
        shown.update(4)
    assert quiet.getvalue() == ""


def test_the_iterable_form_yields_everything_in_order():
    assert list(progress(iter(range(7)), "x", total=7)) == list(range(7))
    assert list(progress([1, 2], None)) == [1, 2]
