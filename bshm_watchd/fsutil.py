"""Durable file writes: temp in the same folder → fsync → rename → fsync the folder.

The two halves can run in different processes: a pipeline worker stages the temp, the daemon
commits it (or discards it) once it knows the scan may still be delivered.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bshm_watchd.failpoints import failpoint

TEMP_PREFIX = ".bshm-tmp-"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which is racy once threads run.
_FILE_MODE = 0o666 & ~_current_umask()


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success fsync it and rename it into place.

    The temp lives in the same folder so the rename is atomic (POSIX); it is created 0600 and
    removed on any failure, so a crash or ENOSPC never leaves a partial file under the final name.
    """
    tmp = _make_temp(final, suffix)
    try:
        yield tmp
    except BaseException:
        _discard(tmp)
        raise
    commit_staged(tmp, final)


def _make_temp(final: Path, suffix: str, tag: str = "") -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + tag, suffix=suffix, dir=final.parent)
    os.close(fd)
    return Path(tmp_name)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


def stage_file(final: Path, writer: Callable[[Path], None], suffix: str = "", tag: str = "") -> Path:
    """Let ``writer`` fill a private temp beside ``final``, fsync it, and leave it there: the temp path.

    The first half of :func:`atomic_path`, for a pipeline worker whose caller decides later whether
    the file may appear (:func:`commit_staged`) or not (:func:`discard_staged`). The fsync here takes
    the flush off the caller's thread; the commit's own fsync then finds nothing dirty. The name is
    ``TEMP_PREFIX + tag + random``: swept like any other temp after a crash, and ``tag`` lets the
    caller find what a worker that died half-way left (:func:`discard_tagged`).
    """
    tmp = _make_temp(final, suffix, tag)
    try:
        writer(tmp)
        failpoint("staged")  # fires in the worker process: a worker dying mid-scan, not the service
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def stage_bytes(final: Path, data: bytes, tag: str = "") -> Path:
    """:func:`stage_file` for bytes in hand."""

    def fill(tmp: Path) -> None:
        tmp.write_bytes(data)

    return stage_file(final, fill, tag=tag)


def commit_staged(tmp: Path, final: Path) -> None:
    """fsync a complete temp, give it the final mode, rename it to ``final`` and fsync the folder.

    The second half of :func:`atomic_path` (its failpoints included); the temp is removed on failure.
    """
    try:
        failpoint("temp_written")
        with open(tmp, "rb+") as fh:
            # mkstemp makes 0600 (right while it is a temp); the final file follows the umask so
            # studio staff and Samba users can read the outbox.
            os.fchmod(fh.fileno(), _FILE_MODE)
            os.fsync(fh.fileno())
        failpoint("fsynced")
        os.replace(tmp, final)
        fsync_dir(final.parent)
        failpoint("renamed")
    except BaseException:
        _discard(tmp)
        raise


def discard_staged(temps: Iterable[Path]) -> None:
    """Remove staged temps that must not become outputs (the source changed, the scan failed)."""
    for tmp in temps:
        with contextlib.suppress(OSError):
            tmp.unlink()


def discard_tagged(folder: Path, tag: str, keep: Iterable[Path] = ()) -> list[Path]:
    """Remove the temps staged with ``tag`` in ``folder``, but those in ``keep``: a dead worker's, whose
    names nobody was told."""
    if not tag:
        raise ValueError("an empty tag would match every temp in the folder")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    kept = set(keep)
    gone = [folder / n for n in names if n.startswith(TEMP_PREFIX + tag) and folder / n not in kept]
    discard_staged(gone)
    return gone


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def out_of_space(exc: BaseException, folder: Path, need: int) -> bool:
    """Did a write into ``folder`` fail because its filesystem is full (or over quota)?

    An OSError in the chain says so by its errno. cv2.imwrite says nothing: on ENOSPC libpng reports
    "Write Error", OpenCV removes the file and returns False (a "cannot encode" ScanError); then the free
    space decides — fewer than ``need`` bytes left (the outputs' uncompressed size) means the disk.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # a bounded walk down the chain: no loop on an odd, cyclic one
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < need
    except OSError:
        return False


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` durably and atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_with(final: Path, writer: Callable[[Path], None], suffix: str = "") -> None:
    """Let ``writer`` fill a temp path, then move it durably into place."""
    with atomic_path(final, suffix=suffix) as tmp:
        writer(tmp)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory for large scans)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
