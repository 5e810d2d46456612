"""The SQLite ledger: claims, stale claims, supersession, byte-exact paths, and no silent reset."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bshm_watchd.ledger import Hint, Ledger, LedgerError, owner_alive, owner_id

H = Hint(10, 1, 2, 3)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3")


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class TestLedger:
    def test_wal_and_full_sync_read_back(self, ledger: Ledger) -> None:
        """The journal mode and synchronous level are verified at open (battery 12)."""
        assert ledger.pragmas() == ("wal", 2)
        assert ledger.integrity() == "ok"

    def test_claim_done_then_skip(self, ledger: Ledger) -> None:
        """A done scan cannot be claimed again."""
        row = ledger.claim("w", "a.jpg", "s1", "p", H)
        assert row is not None and row.state == "claimed" and row.attempts == 1
        ledger.done(row.id, ["/o/a_fg.png", "/o/a_matte.png"], base="/o/a")
        assert ledger.claim("w", "a.jpg", "s1", "p", H) is None
        assert ledger.get("w", "a.jpg", "s1", "p").state == "done"  # type: ignore[union-attr]

    def test_live_claim_not_stolen(self, ledger: Ledger) -> None:
        """A claim held by a running process (this test's parent, say) is left alone."""
        ledger.claim("w", "a.jpg", "s1", "p", H)
        parent = f"{socket.gethostname()}:{os.getppid()}"
        ledger._db.execute("UPDATE scans SET owner=?", (parent,))
        assert ledger.claim("w", "a.jpg", "s1", "p", H) is None

    def test_dead_claim_retaken_once(self, ledger: Ledger) -> None:
        """A claim left by a dead PID is listed as stale and taken over, attempts counting on (battery 16)."""
        ledger.claim("w", "a.jpg", "s1", "p", H)
        ledger._db.execute("UPDATE scans SET owner=?", (f"{socket.gethostname()}:{dead_pid()}:1",))
        assert [r.rel for r in ledger.stale_claims()] == ["a.jpg"]
        row = ledger.claim("w", "a.jpg", "s1", "p", H)
        assert row is not None and row.attempts == 2 and row.owner == owner_id()
        assert ledger.stale_claims() == []

    def test_reused_pid_is_not_alive(self) -> None:
        """A claim whose PID now belongs to another process (different start time) counts as dead."""
        me = owner_id()
        host, pid, start = me.split(":")
        assert owner_alive(me)
        assert not owner_alive(f"{host}:{pid}:{int(start) + 12345}")
        assert owner_alive(f"other-host:{pid}:1")  # another host's claim is never stolen

    def test_rewrite_supersedes_old_done(self, ledger: Ledger) -> None:
        """When new content at a path is done, the old row is superseded, so old content coming back is redone."""
        a = ledger.claim("w", "a.jpg", "s1", "p", H)
        assert a is not None
        ledger.done(a.id, ["x"])
        b = ledger.claim("w", "a.jpg", "s2", "p", H)
        assert b is not None
        ledger.done(b.id, ["x"])
        assert ledger.get("w", "a.jpg", "s1", "p").state == "superseded"  # type: ignore[union-attr]
        again = ledger.claim("w", "a.jpg", "s1", "p", H)
        assert again is not None and again.state == "claimed"

    def test_invalid_utf8_and_newlines_round_trip(self, ledger: Ledger) -> None:
        """Names that are not valid UTF-8, or hold a newline, are stored and found byte-exactly."""
        names = [os.fsdecode(b"bad\xff\xfe.jpg"), "new\nline.jpg", "caf\u00e9.jpg", "cafe\u0301.jpg"]
        for n in names:
            row = ledger.claim("w", n, "s", "p", H)
            assert row is not None and row.rel == n
        assert {r.rel for r in ledger.stale_claims()} == set()
        assert len({ledger.get("w", n, "s", "p").id for n in names}) == 4  # type: ignore[union-attr]

    def test_base_taken(self, ledger: Ledger) -> None:
        """An output base owned by another path's done row is reported taken; one's own is not."""
        row = ledger.claim("w", "a.jpg", "s", "p", H)
        assert row is not None
        ledger.done(row.id, ["x"], base="/o/a")
        assert ledger.base_taken("w", "/o/a", "a.png")
        assert not ledger.base_taken("w", "/o/a", "a.jpg")

    def test_garbage_file_is_an_error_not_a_reset(self, tmp_path: Path) -> None:
        """An unreadable ledger stops start-up with a clear error and is left exactly as it was."""
        path = tmp_path / "ledger.sqlite3"
        junk = b"this is not a database" * 100
        path.write_bytes(junk)
        with pytest.raises(LedgerError, match="never reset"):
            Ledger(path)
        assert path.read_bytes() == junk

    def test_old_schema_refused(self, tmp_path: Path) -> None:
        """A ledger from another schema version is refused, never converted silently."""
        path = tmp_path / "ledger.sqlite3"
        Ledger(path).close()
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
        db.commit()
        db.close()
        with pytest.raises(LedgerError, match="schema 1"):
            Ledger(path)

    def test_readonly_reader_sees_commits(self, ledger: Ledger) -> None:
        """A read-only connection (the rescanner's) sees the writer's commits."""
        row = ledger.claim("w", "a.jpg", "s", "p", H)
        assert row is not None
        ledger.done(row.id, ["x"])
        reader = Ledger(ledger.path, readonly=True)
        try:
            latest = reader.latest("w", "a.jpg", "p")
            assert latest is not None and latest.state == "done"
        finally:
            reader.close()

    def test_release_without_counting(self, ledger: Ledger) -> None:
        """A release with counts=False takes back the claim's attempt; a normal release keeps it."""
        row = ledger.claim("w", "a.jpg", "s" * 64, "p", H)
        assert row is not None and row.attempts == 1
        ledger.release(row.id, "output disk full", "write", counts=False)
        again = ledger.claim("w", "a.jpg", "s" * 64, "p", H)
        assert again is not None and again.attempts == 1
        ledger.release(again.id, "EBUSY", "read")
        third = ledger.claim("w", "a.jpg", "s" * 64, "p", H)
        assert third is not None and third.attempts == 2
