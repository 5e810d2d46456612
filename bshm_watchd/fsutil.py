"""Durable file writes: temp in the same folder → fsync → rename → fsync the folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
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
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
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
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
