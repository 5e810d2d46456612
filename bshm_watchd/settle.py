"""The settle gate: a file is handed on only when it is stable *and* structurally complete.

Criteria, all of them:
- still a regular file (not a symlink, FIFO or folder: lstat, never followed);
- size, mtime, ctime and inode unchanged for ``settle_seconds`` on the monotonic clock (the file's
  own mtime may be in the future or in 1970: it is compared, never subtracted from now);
- structurally complete (see :mod:`bshm_watchd.structure`): a writer that pauses longer than the
  settle window leaves a stable prefix, which this refuses.
A file still incomplete ``incomplete_seconds`` after it was first seen is reported as stuck.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bshm_watchd.ledger import Hint
from bshm_watchd.structure import Completeness, check_file


@dataclass
class _Candidate:
    first_seen: float
    last_change: float
    sig: Hint | None


@dataclass
class GateResult:
    ready: list[tuple[Path, Hint]] = field(default_factory=list)
    gone: list[Path] = field(default_factory=list)
    stuck: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)
    """Not a regular file (symlink, FIFO, folder) or unreadable: dropped with a reason."""


def open_nofollow(path: Path) -> int:
    """O_NOFOLLOW + O_NONBLOCK: a symlink fails instead of being followed, a FIFO never blocks us."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))


class SettleGate:
    """Candidates of one watch folder, keyed by path."""

    def __init__(self, settle_seconds: float, incomplete_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if settle_seconds < 0 or incomplete_seconds <= 0:
            raise ValueError("settle_seconds must be >= 0 and incomplete_seconds > 0")
        self.settle = settle_seconds
        self.incomplete = incomplete_seconds
        self.clock = clock
        self._c: dict[Path, _Candidate] = {}

    def __len__(self) -> int:
        return len(self._c)

    def __contains__(self, path: object) -> bool:
        return path in self._c

    def offer(self, path: Path) -> None:
        """A watcher event or a rescan saw ``path``; (re)start its settle clock if new."""
        now = self.clock()
        if path not in self._c:
            self._c[path] = _Candidate(first_seen=now, last_change=now, sig=None)
        else:
            # An event means someone touched it: restart the stability window.
            self._c[path].last_change = now

    def discard(self, path: Path) -> None:
        self._c.pop(path, None)

    def poll(self) -> GateResult:
        now = self.clock()
        res = GateResult()
        for path, cand in list(self._c.items()):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                res.gone.append(path)
                del self._c[path]
                continue
            except OSError as exc:
                res.refused.append((path, f"cannot stat: {exc.strerror}"))
                del self._c[path]
                continue
            if not stat.S_ISREG(st.st_mode):
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                res.refused.append((path, kind))
                del self._c[path]
                continue
            sig = Hint.of(st)
            if sig != cand.sig:
                cand.sig = sig
                cand.last_change = now
                continue
            if now - cand.last_change < self.settle:
                continue
            verdict = self._structure(path)
            if verdict is None:
                res.refused.append((path, "cannot open for reading"))
                del self._c[path]
            elif verdict is Completeness.INCOMPLETE:
                if now - cand.first_seen >= self.incomplete:
                    res.stuck.append(path)
                    del self._c[path]
            else:
                res.ready.append((path, sig))
                del self._c[path]
        return res

    @staticmethod
    def _structure(path: Path) -> Completeness | None:
        try:
            fd = open_nofollow(path)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENOENT):
                return None
            raise
        with os.fdopen(fd, "rb") as fh:
            return check_file(fh)
