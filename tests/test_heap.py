"""The heap trimmer: glibc's malloc_trim after inference, only once RSS has grown past the slack."""

from __future__ import annotations

import numpy as np

from bshm_watchd.heap import HeapTrimmer, _glibc_trim, rss_mb


class FakeProcess:
    """RSS that the test sets; a trim brings it back to ``after_trim``."""

    def __init__(self, rss: float, after_trim: float) -> None:
        self.now, self.after_trim, self.trims = rss, after_trim, 0

    def rss(self) -> float:
        return self.now

    def trim(self) -> None:
        self.trims += 1
        self.now = self.after_trim


def test_trims_only_past_the_slack_and_measures_from_after_the_trim() -> None:
    proc = FakeProcess(rss=1000.0, after_trim=1100.0)
    heap = HeapTrimmer(500.0, trim=proc.trim, rss=proc.rss)
    for now in (1200.0, 1499.0):  # under 1000 + 500: no trim
        proc.now = now
        heap()
    assert proc.trims == heap.trims == 0
    proc.now = 1501.0
    heap()
    assert proc.trims == 1 and proc.now == 1100.0
    proc.now = 1550.0  # 1100 is the floor now: 450 above it is under the slack
    heap()
    assert proc.trims == 1
    proc.now = 1601.0
    heap()
    assert proc.trims == 2


def test_without_malloc_trim_it_does_nothing() -> None:
    heap = HeapTrimmer(0.0, rss=lambda: 1e9)
    heap._trim = None
    heap()
    assert heap.trims == 0


def test_the_real_trim_and_rss_run_here() -> None:
    """On this (glibc, Linux) machine: RSS is read from /proc and the trim call returns."""
    assert rss_mb() > 10.0
    trim = _glibc_trim()
    assert trim is not None
    blocks = [np.ones(2**18) for _ in range(64)]  # 128 MB in 2 MB blocks, then freed
    del blocks
    assert trim() in (0, 1)
