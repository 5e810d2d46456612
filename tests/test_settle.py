"""The settle gate on real files with a hand-driven monotonic clock, and reads that never leave the tree."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

import pytest
from daemon_helpers import image_bytes

from bshm_watchd import settle
from bshm_watchd.ledger import Hint
from bshm_watchd.settle import SettleGate, open_beneath
from bshm_watchd.structure import Completeness, check_file


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def gate(root: Path, clock: Clock, settle_s: float = 2.0, incomplete_s: float = 20.0) -> SettleGate:
    return SettleGate(root, settle_s, incomplete_s, clock=clock)


class TestSettleGate:
    def test_ready_only_after_window(self, tmp_path: Path, clock: Clock) -> None:
        """A complete file is handed on once it has been unchanged for settle_seconds, with its signature."""
        p = tmp_path / "a.jpg"
        p.write_bytes(image_bytes(1))
        g = gate(tmp_path, clock)
        g.offer(p)
        assert g.poll().ready == []
        clock.t += 1.9
        assert g.poll().ready == []
        clock.t += 0.2
        res = g.poll()
        assert res.ready == [(p, Hint.of(os.lstat(p)))]
        assert p not in g

    def test_change_restarts_window(self, tmp_path: Path, clock: Clock) -> None:
        """A size change inside the window starts the wait again."""
        p = tmp_path / "a.png"
        data = image_bytes(1, "PNG")
        p.write_bytes(data[:100])
        g = gate(tmp_path, clock)
        g.offer(p)
        g.poll()
        clock.t += 1.5
        p.write_bytes(data)
        assert g.poll().ready == []
        clock.t += 1.5
        assert g.poll().ready == []
        clock.t += 0.6
        assert [r[0] for r in g.poll().ready] == [p]

    def test_paused_writer_prefix_never_ready(self, tmp_path: Path, clock: Clock) -> None:
        """A prefix stable far longer than the window stays waiting (battery 1), then the whole file goes."""
        p = tmp_path / "a.jpg"
        data = image_bytes(1)
        p.write_bytes(data[: len(data) // 2])
        g = gate(tmp_path, clock)
        g.offer(p)
        for _ in range(10):
            clock.t += 1.5
            res = g.poll()
            assert res.ready == [] and res.stuck == []
        with open(p, "ab") as fh:
            fh.write(data[len(data) // 2:])
        g.poll()
        clock.t += 2.0
        assert [r[0] for r in g.poll().ready] == [p]

    def test_incomplete_is_stuck_after_limit(self, tmp_path: Path, clock: Clock) -> None:
        """A JPEG without EOI is reported stuck after incomplete_seconds, with a reason (battery 4)."""
        p = tmp_path / "cut.jpg"
        data = image_bytes(1)
        p.write_bytes(data[:-2])
        g = gate(tmp_path, clock, incomplete_s=10)
        g.offer(p)
        g.poll()
        clock.t += 9
        assert g.poll().stuck == []
        clock.t += 1
        assert g.poll().stuck == [(p, "still structurally incomplete after 10 s")]

    def test_zero_bytes_stuck_as_not_an_image(self, tmp_path: Path, clock: Clock) -> None:
        """A placeholder that never grows is reported as not an image (battery 18)."""
        p = tmp_path / "empty.jpg"
        p.write_bytes(b"")
        g = gate(tmp_path, clock, incomplete_s=5)
        g.offer(p)
        g.poll()
        clock.t += 5
        [(path, reason)] = g.poll().stuck
        assert path == p and reason.startswith("not an image")

    @pytest.mark.parametrize("mtime", [0.0, 1e9 + 3600 * 24 * 365 * 40])
    def test_odd_mtime_still_settles(self, mtime: float, tmp_path: Path, clock: Clock) -> None:
        """An mtime in 1970 or far in the future does not matter: the window runs on the monotonic clock."""
        p = tmp_path / "a.jpg"
        p.write_bytes(image_bytes(1))
        os.utime(p, (mtime, mtime))
        g = gate(tmp_path, clock)
        g.offer(p)
        g.poll()
        clock.t += 2
        assert [r[0] for r in g.poll().ready] == [p]

    def test_symlink_fifo_folder_refused(self, tmp_path: Path, clock: Clock) -> None:
        """Symlinks, FIFOs and folders are dropped with a reason, never opened or waited on."""
        (tmp_path / "passwd.jpg").symlink_to("/etc/passwd")
        os.mkfifo(tmp_path / "pipe.jpg")
        (tmp_path / "dir.jpg").mkdir()
        g = gate(tmp_path, clock)
        for name in ("passwd.jpg", "pipe.jpg", "dir.jpg"):
            g.offer(tmp_path / name)
        reasons = dict(g.poll().refused)
        assert reasons == {tmp_path / "passwd.jpg": "symlink", tmp_path / "pipe.jpg": "not a regular file",
                           tmp_path / "dir.jpg": "not a regular file"}
        assert len(g) == 0

    def test_symlinked_folder_refused(self, tmp_path: Path, clock: Clock) -> None:
        """A file reached through a symlinked sub-folder is refused when it is opened."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "a.jpg").write_bytes(image_bytes(1))
        root = tmp_path / "inbox"
        root.mkdir()
        (root / "sub").symlink_to(outside)
        g = gate(root, clock)
        g.offer(root / "sub" / "a.jpg")
        g.poll()
        clock.t += 2
        res = g.poll()
        assert res.ready == []
        assert [p for p, _ in res.refused] == [root / "sub" / "a.jpg"]

    def test_gone(self, tmp_path: Path, clock: Clock) -> None:
        """A file deleted while waiting is reported gone."""
        p = tmp_path / "a.jpg"
        p.write_bytes(b"x")
        g = gate(tmp_path, clock)
        g.offer(p)
        p.unlink()
        assert g.poll().gone == [p]

    def test_one_bad_file_does_not_stall_others(self, tmp_path: Path, clock: Clock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """An exception while checking one file refuses that file only; the others go on."""
        bad, good = tmp_path / "bad.jpg", tmp_path / "good.jpg"
        bad.write_bytes(image_bytes(1))
        good.write_bytes(image_bytes(2))
        def flaky(fh: BinaryIO) -> Completeness:
            if os.fstat(fh.fileno()).st_ino == bad.stat().st_ino:
                raise OSError(errno.EIO, "I/O error")
            return check_file(fh)

        monkeypatch.setattr(settle, "check_file", flaky)
        g = gate(tmp_path, clock)
        g.offer(bad)
        g.offer(good)
        g.poll()
        clock.t += 2
        res = g.poll()
        assert [p for p, _ in res.ready] == [good]
        assert [p for p, _ in res.refused] == [bad]


class TestOpenBeneath:
    def test_reads_inside(self, tmp_path: Path) -> None:
        """A file in a sub-folder opens and reads normally."""
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"data")
        fd = open_beneath(tmp_path, tmp_path / "a" / "b" / "x.jpg")
        with os.fdopen(fd, "rb") as fh:
            assert fh.read() == b"data"

    def test_symlink_anywhere_below_root_fails(self, tmp_path: Path) -> None:
        """A symlinked file or folder below the root fails (ELOOP or ENOTDIR); nothing outside is opened."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "x.jpg").write_bytes(b"secret")
        root = tmp_path / "root"
        root.mkdir()
        (root / "link.jpg").symlink_to(outside / "x.jpg")
        (root / "dir").symlink_to(outside)
        for path in (root / "link.jpg", root / "dir" / "x.jpg"):
            with pytest.raises(OSError) as err:
                open_beneath(root, path)
            assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)

    def test_root_itself_may_be_a_symlink(self, tmp_path: Path) -> None:
        """The configured root is trusted even when it is a symlink (a share's mount point alias)."""
        real = tmp_path / "real"
        real.mkdir()
        (real / "x.jpg").write_bytes(b"data")
        (tmp_path / "alias").symlink_to(real)
        os.close(open_beneath(tmp_path / "alias", tmp_path / "alias" / "x.jpg"))

    def test_fifo_never_blocks(self, tmp_path: Path) -> None:
        """Opening a FIFO returns at once (O_NONBLOCK) instead of waiting for a writer."""
        os.mkfifo(tmp_path / "p.jpg")
        os.close(open_beneath(tmp_path, tmp_path / "p.jpg"))
