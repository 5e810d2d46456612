"""Durable writes: complete content or nothing, no temp files left behind, private temp files."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from bshm_watchd.fsutil import TEMP_PREFIX, atomic_path, sha256_file, write_bytes_atomic, write_with


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX))


class TestAtomicWrite:
    def test_content_complete(self, tmp_path: Path) -> None:
        """A 5 MiB write lands complete under the final name, creating missing folders."""
        data = os.urandom(5 << 20)
        final = tmp_path / "a" / "b" / "out.bin"
        write_bytes_atomic(final, data)
        assert final.read_bytes() == data
        assert leftovers(final.parent) == []

    def test_replaces_existing(self, tmp_path: Path) -> None:
        """Writing over an existing file replaces its content entirely (no stale tail from a longer file)."""
        final = tmp_path / "out.txt"
        final.write_bytes(b"x" * 1000)
        write_bytes_atomic(final, b"short")
        assert final.read_bytes() == b"short"

    def test_exception_leaves_nothing(self, tmp_path: Path) -> None:
        """An exception inside the block leaves no temp file and no final file."""
        final = tmp_path / "out.png"
        with pytest.raises(RuntimeError), atomic_path(final, suffix=".png") as tmp:
            tmp.write_bytes(b"half a png")
            raise RuntimeError("encoder died")
        assert not final.exists()
        assert leftovers(tmp_path) == []

    def test_exception_keeps_previous_version(self, tmp_path: Path) -> None:
        """A failed rewrite leaves the previous file untouched."""
        final = tmp_path / "out.png"
        final.write_bytes(b"old complete file")
        with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
            tmp.write_bytes(b"new partial")
            raise KeyboardInterrupt
        assert final.read_bytes() == b"old complete file"
        assert leftovers(tmp_path) == []

    def test_writer_failure_via_write_with(self, tmp_path: Path) -> None:
        """write_with cleans up when its writer raises after writing part of the file."""

        def writer(tmp: Path) -> None:
            tmp.write_bytes(b"part")
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            write_with(tmp_path / "x.png", writer, suffix=".png")
        assert list(tmp_path.iterdir()) == []

    def test_temp_is_private_and_beside_final(self, tmp_path: Path) -> None:
        """The temp file is created 0600 in the final file's own folder (so the rename is atomic)."""
        final = tmp_path / "sub" / "out.png"
        with atomic_path(final, suffix=".png") as tmp:
            assert tmp.parent == final.parent
            assert tmp.name.startswith(TEMP_PREFIX) and tmp.suffix == ".png"
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
            tmp.write_bytes(b"data")
        assert final.read_bytes() == b"data"

    def test_final_mode_honours_umask(self, tmp_path: Path) -> None:
        """The final file gets the usual 0666 & ~umask permissions, not the temp file's 0600.

        Cut-outs land in a shared outbox that other accounts (the studio's, a Samba user) must read.
        """
        old = os.umask(0o022)
        try:
            write_bytes_atomic(tmp_path / "out.png", b"data")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "out.png").stat().st_mode) == 0o644

    def test_odd_names(self, tmp_path: Path) -> None:
        """Final names with spaces and non-ASCII letters work."""
        final = tmp_path / "sub dir" / "Zoë 1_fg.png"
        write_bytes_atomic(final, b"ok")
        assert final.read_bytes() == b"ok"


class TestSha256:
    def test_matches_hashlib_across_chunks(self, tmp_path: Path) -> None:
        """sha256_file equals hashlib's digest for a file spanning several read chunks."""
        data = os.urandom(3 * 1024 + 17)
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f", chunk=1024) == hashlib.sha256(data).hexdigest()
