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
    stuck: list[tuple[Path, str]] = field(default_factory=list)
    """Still incomplete after ``incomplete_seconds``: (path, reason) for the quarantine."""
    refused: list[tuple[Path, str]] = field(default_factory=list)
    """Not a regular file (symlink, FIFO, folder) or unreadable: dropped with a reason."""


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
"""O_NOFOLLOW: a symlink fails instead of being followed; O_NONBLOCK: a FIFO never blocks us."""


def open_beneath(root: Path, path: Path) -> int:
    """Open ``path`` (inside ``root``) for reading without following a symlink anywhere below ``root``.

    Each folder is opened relative to its parent's descriptor with O_NOFOLLOW, so a folder that a
    concurrent thread flips into a symlink (to ``/etc``, say) fails (ELOOP, or ENOTDIR for a folder)
    instead of being read through; ``root`` itself is configured, so it may be a symlink.
    """
    parts = path.relative_to(root).parts
    if not parts or any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, "not a file inside the watch folder", str(path))
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        return os.open(parts[-1], READ_FLAGS, dir_fd=dfd)
    finally:
        os.close(dfd)


#: Open errors that say "not something we may read", as opposed to "try again later".
REFUSE_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENXIO, errno.EINVAL,
                           errno.ENAMETOOLONG})


class SettleGate:
    """Candidates of one watch folder, keyed by path."""

    def __init__(self, root: Path, settle_seconds: float, incomplete_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if settle_seconds < 0 or incomplete_seconds <= 0:
            raise ValueError("settle_seconds must be >= 0 and incomplete_seconds > 0")
        self.root = root
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
                self._poll_one(path, cand, now, res)
            except Exception as exc:  # one odd file (EIO, a decoder-hostile header) must not stall the gate
                res.refused.append((path, f"cannot check: {type(exc).__name__}: {exc}"))
                self._c.pop(path, None)
        return res

    def _poll_one(self, path: Path, cand: _Candidate, now: float, res: GateResult) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            res.gone.append(path)
            del self._c[path]
            return
        except OSError as exc:
            res.refused.append((path, f"cannot stat: {exc.strerror}"))
            del self._c[path]
            return
        if not stat.S_ISREG(st.st_mode):
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            res.refused.append((path, kind))
            del self._c[path]
            return
        sig = Hint.of(st)
        if sig != cand.sig:
            cand.sig = sig
            cand.last_change = now
            return
        if now - cand.last_change < self.settle:
            return
        verdict = self._structure(path)
        if verdict is None:
            res.gone.append(path)
            del self._c[path]
        elif isinstance(verdict, str):
            res.refused.append((path, verdict))
            del self._c[path]
        elif verdict is Completeness.INCOMPLETE:
            if now - cand.first_seen >= self.incomplete:
                what = "not an image: still 0 bytes" if sig.size == 0 else "still structurally incomplete"
                res.stuck.append((path, f"{what} after {self.incomplete:.0f} s"))
                del self._c[path]
        else:
            res.ready.append((path, sig))
            del self._c[path]

    def _structure(self, path: Path) -> Completeness | str | None:
        """The structural verdict, why the file cannot be opened (through no symlink, never blocking),
        or None when it is gone."""
        try:
            fd = open_beneath(self.root, path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in REFUSE_ERRNOS:
                return f"cannot open for reading: {exc.strerror}"
            raise
        with os.fdopen(fd, "rb") as fh:
            return check_file(fh)
