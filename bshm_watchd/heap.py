"""Give freed heap memory back to the system after inference, where glibc kept it.

The fusion's models allocate activations of a different size for every scan size (torch on the CPU takes
each tensor from malloc), and glibc keeps freed memory in its heaps (most likely because its mmap threshold
rises once large blocks are freed, so later tensors come from the heap, whose free holes of odd sizes it does
not return): ``bench --soak 80`` on the 40 old photos grew 1304 → 2331 MB with rvm's 768 px copy (session 16;
1086 → 1339 MB before it). ``malloc_trim(0)`` returns that memory; called after every batch it kept the same
soak flat (996 → 1022 MB) but cost 5–12 % of throughput. So it runs only when the process's RSS after
inference has grown by ``slack_mb`` since the last trim: at 1 GB the soak trimmed 7 times in 80 scans and the
process tree stayed within 1.0–2.04 GB; at 768 MB it trimmed 26 times (a scan's working set with rvm's larger
copy is about 0.8 GB above the trimmed heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory, this one's by default (0 where /proc is missing or the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _glibc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None on a libc without it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """Call after each inference batch: trims the heap when RSS grew ``slack_mb`` past the last trim."""

    def __init__(self, slack_mb: float = 1024.0, *, trim: Callable[[], object] | None = None,
                 rss: Callable[[], float] = rss_mb) -> None:
        self.slack_mb = slack_mb
        self._trim = trim if trim is not None else _glibc_trim()
        self._rss = rss
        self._floor = rss()
        self.trims = 0

    def __call__(self) -> None:
        if self._trim is None:
            return
        now = self._rss()
        if now - self._floor < self.slack_mb:
            return
        self._trim()
        self.trims += 1
        self._floor = self._rss()
        log.debug("heap_trimmed", rss_before_mb=round(now), rss_after_mb=round(self._floor))
