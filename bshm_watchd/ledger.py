"""The SQLite ledger: which scan (path + content hash + pipeline) is claimed, done or failed.

WAL + ``synchronous=FULL`` so an acknowledged commit survives power loss; both are read back at
open. The key is the content hash plus the pipeline version: size/mtime/ctime/inode are only a
hint to skip re-hashing files we have already seen unchanged (ctime catches ``os.utime`` tricks).
An unreadable ledger stops start-up; it is never silently reset.

Paths are stored as their bytes (``rel`` and ``base`` are BLOBs): a scan named with invalid UTF-8
must not crash the encoder, and two names must never collapse into one key.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bshm_watchd.errors import BshmError

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scans (
    id          INTEGER PRIMARY KEY,
    watch       TEXT NOT NULL,
    rel         BLOB NOT NULL,
    sha256      TEXT NOT NULL,
    pipeline    TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('claimed', 'done', 'failed', 'superseded')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    owner       TEXT,
    size        INTEGER,
    mtime_ns    INTEGER,
    ctime_ns    INTEGER,
    ino         INTEGER,
    outputs     TEXT,
    base        BLOB,
    error       TEXT,
    stage       TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    UNIQUE (watch, rel, sha256, pipeline)
);
CREATE INDEX IF NOT EXISTS scans_by_path ON scans (watch, rel, updated_at);
CREATE INDEX IF NOT EXISTS scans_by_state ON scans (state, updated_at);
CREATE INDEX IF NOT EXISTS scans_by_base ON scans (watch, base);
"""


class LedgerError(BshmError):
    """The ledger cannot be opened or is damaged."""

    exit_code = 4


@dataclass(frozen=True)
class Hint:
    """What stat says about a file: cheap evidence that it is unchanged since we hashed it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Hint:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, ino=st.st_ino)


@dataclass(frozen=True)
class Row:
    id: int
    watch: str
    rel: str
    sha256: str
    pipeline: str
    state: str
    attempts: int
    owner: str | None
    hint: Hint | None
    outputs: list[str]
    error: str | None
    stage: str | None
    updated_at: float


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def owner_id() -> str:
    """``host:pid:start``; the start time stops a stale claim from looking alive when its PID was reused
    (a restarted container gets the same low PIDs every time)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '-'}"


def owner_alive(owner: str | None) -> bool:
    """Is the process that claimed a row still running (on this host)?"""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # another host's claim: we cannot tell, so we do not steal it
    try:
        pid = int(pid_s)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (ValueError, OverflowError):
        return False
    if start and start != "-":
        now = _start_time(pid)
        return now is None or now == start
    return True


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _s(blob: bytes | str) -> str:
    return blob if isinstance(blob, str) else bytes(blob).decode("utf-8", "surrogateescape")


class Ledger:
    """One SQLite connection, used from one thread at a time (the daemon gives each thread its own)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            if not readonly:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                self._db.execute("PRAGMA synchronous=FULL")
                sync = self._db.execute("PRAGMA synchronous").fetchone()[0]
                if str(mode).lower() != "wal" or int(sync) != 2:
                    raise LedgerError(f"{path}: cannot enable WAL + synchronous=FULL (got {mode}, {sync})")
                self._db.executescript(SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                have = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
                if str(have) != str(SCHEMA_VERSION):
                    raise LedgerError(f"{path}: ledger schema {have}, this version needs {SCHEMA_VERSION}; "
                                      "it is never converted or reset automatically — move it aside to start over")
            ok = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise LedgerError(f"{path}: ledger is damaged ({ok}); restore it from a backup or move it "
                                  "aside deliberately — it is never reset automatically")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{path}: cannot open ledger: {exc}; it is never reset automatically — "
                              "move it aside yourself if you mean to start over") from exc

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- reads -----------------------------------------------------------------------------
    @staticmethod
    def _row(r: sqlite3.Row) -> Row:
        hint = Hint(r["size"], r["mtime_ns"], r["ctime_ns"], r["ino"]) if r["size"] is not None else None
        return Row(id=r["id"], watch=r["watch"], rel=_s(r["rel"]), sha256=r["sha256"], pipeline=r["pipeline"],
                   state=r["state"], attempts=r["attempts"], owner=r["owner"], hint=hint,
                   outputs=json.loads(r["outputs"] or "[]"), error=r["error"], stage=r["stage"],
                   updated_at=r["updated_at"])

    def latest(self, watch: str, rel: str, pipeline: str) -> Row | None:
        """The most recent row for this path under this pipeline."""
        r = self._db.execute(
            "SELECT * FROM scans WHERE watch=? AND rel=? AND pipeline=? ORDER BY updated_at DESC, id DESC LIMIT 1",
            (watch, _b(rel), pipeline)).fetchone()
        return self._row(r) if r else None

    def get(self, watch: str, rel: str, sha256: str, pipeline: str) -> Row | None:
        r = self._db.execute("SELECT * FROM scans WHERE watch=? AND rel=? AND sha256=? AND pipeline=?",
                             (watch, _b(rel), sha256, pipeline)).fetchone()
        return self._row(r) if r else None

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM scans GROUP BY state")}

    def recent_failures(self, limit: int = 10) -> list[Row]:
        rows = self._db.execute("SELECT * FROM scans WHERE state='failed' ORDER BY updated_at DESC LIMIT ?",
                                (limit,))
        return [self._row(r) for r in rows]

    def done_rows(self) -> list[Row]:
        return [self._row(r) for r in self._db.execute("SELECT * FROM scans WHERE state='done'")]

    def base_taken(self, watch: str, base: str, rel: str) -> bool:
        """Does another scan's done result already live at output ``base`` (``a.jpg`` vs ``a.png``)?"""
        r = self._db.execute("SELECT 1 FROM scans WHERE watch=? AND base=? AND rel<>? AND state='done' LIMIT 1",
                             (watch, _b(base), _b(rel))).fetchone()
        return r is not None

    def integrity(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def pragmas(self) -> tuple[str, int]:
        return (str(self._db.execute("PRAGMA journal_mode").fetchone()[0]),
                int(self._db.execute("PRAGMA synchronous").fetchone()[0]))

    # ---- writes ----------------------------------------------------------------------------
    def claim(self, watch: str, rel: str, sha256: str, pipeline: str, hint: Hint) -> Row | None:
        """Claim a scan for this process; None when it is done, or claimed by a live process.

        A claim left by a dead process is taken over (the scan is redone); a failed row is
        claimed again only by an explicit retry (``attempts`` carries over).
        """
        now = time.time()
        me = owner_id()
        key = (watch, _b(rel), sha256, pipeline)
        with self._tx() as db:
            r = db.execute("SELECT * FROM scans WHERE watch=? AND rel=? AND sha256=? AND pipeline=?", key).fetchone()
            if r is not None:
                row = self._row(r)
                if row.state == "done":
                    return None
                if row.state == "claimed" and row.owner != me and owner_alive(row.owner):
                    return None
                db.execute("UPDATE scans SET state='claimed', owner=?, attempts=attempts+1, size=?, mtime_ns=?, "
                           "ctime_ns=?, ino=?, updated_at=? WHERE id=?",
                           (me, hint.size, hint.mtime_ns, hint.ctime_ns, hint.ino, now, row.id))
            else:
                db.execute("INSERT INTO scans (watch, rel, sha256, pipeline, state, attempts, owner, size, mtime_ns, "
                           "ctime_ns, ino, created_at, updated_at) VALUES (?,?,?,?, 'claimed', 1, ?,?,?,?,?,?,?)",
                           (*key, me, hint.size, hint.mtime_ns, hint.ctime_ns, hint.ino, now, now))
            r = db.execute("SELECT * FROM scans WHERE watch=? AND rel=? AND sha256=? AND pipeline=?", key).fetchone()
        return self._row(r)

    def done(self, row_id: int, outputs: list[str], base: str | None = None) -> None:
        """Mark done; call only after every output is durable (fsynced and renamed).

        Older done rows of the same path become ``superseded``: their outputs were just overwritten,
        so if that older content comes back it must be processed again, not skipped as done.
        """
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE scans SET state='done', outputs=?, base=?, error=NULL, stage=NULL, updated_at=? "
                       "WHERE id=?", (json.dumps(outputs), None if base is None else _b(base), now, row_id))
            db.execute("UPDATE scans SET state='superseded', updated_at=? WHERE state='done' AND id<>? AND "
                       "(watch, rel, pipeline) = (SELECT watch, rel, pipeline FROM scans WHERE id=?)",
                       (now, row_id, row_id))

    def failed(self, row_id: int, error: str, stage: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE scans SET state='failed', error=?, stage=?, updated_at=? WHERE id=?",
                       (error, stage, time.time(), row_id))

    def release(self, row_id: int, error: str, stage: str, *, counts: bool = True) -> None:
        """Give a claim back (transient error, or the source changed underneath): retried later.

        ``counts=False`` takes back the attempt the claim added: a full output disk is not the scan's
        fault, and after a long outage the first real transient error must not quarantine it at once.
        """
        with self._tx() as db:
            db.execute("UPDATE scans SET state='failed', owner=NULL, error=?, stage=?, updated_at=?, "
                       "attempts=MAX(0, attempts - ?) WHERE id=?",
                       (error, stage, time.time(), 0 if counts else 1, row_id))

    def update_hint(self, row_id: int, hint: Hint) -> None:
        with self._tx() as db:
            db.execute("UPDATE scans SET size=?, mtime_ns=?, ctime_ns=?, ino=?, updated_at=? WHERE id=?",
                       (hint.size, hint.mtime_ns, hint.ctime_ns, hint.ino, time.time(), row_id))

    def stale_claims(self) -> list[Row]:
        """Claims whose owner process is gone: a crash left them; they are redone."""
        rows = [self._row(r) for r in self._db.execute("SELECT * FROM scans WHERE state='claimed'")]
        return [r for r in rows if not owner_alive(r.owner)]

    def as_dict(self, row: Row) -> dict[str, Any]:
        return {"watch": row.watch, "rel": row.rel, "sha256": row.sha256, "state": row.state,
                "attempts": row.attempts, "error": row.error, "stage": row.stage, "updated_at": row.updated_at}
