"""``bshm-watchd status``: ledger counts, recent failures, backlog, and the daemon's own status file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bshm_watchd.config import Config
from bshm_watchd.fsutil import TEMP_PREFIX
from bshm_watchd.ledger import Ledger
from bshm_watchd.watcher import walk_files


@dataclass
class Counters:
    done: int = 0
    quarantined: int = 0
    skipped: int = 0
    retries: int = 0
    by_watch: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, watch: str, result: str) -> None:
        w = self.by_watch.setdefault(watch, {})
        w[result] = w.get(result, 0) + 1


def write_status_file(final: Path, data: bytes) -> None:
    """Temp + rename, no fsync: the status file is rewritten every few seconds and no restart reads it
    (and it stays out of the crash failpoints, which are meant for the scan outputs)."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def collect_status(cfg: Config) -> dict[str, Any]:
    path = cfg.state_dir / "ledger.sqlite3"
    out: dict[str, Any] = {"ledger": str(path), "counts": {}, "recent_failures": [], "daemon": None,
                           "inbox": {}}
    if path.exists():
        ledger = Ledger(path, readonly=True)
        try:
            out["counts"] = ledger.counts()
            out["recent_failures"] = [ledger.as_dict(r) for r in ledger.recent_failures(10)]
        finally:
            ledger.close()
    status_file = cfg.state_dir / "status.json"
    if status_file.exists():
        try:
            daemon = json.loads(status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            daemon = None
        if daemon is not None:
            daemon["age_s"] = round(time.time() - float(daemon.get("updated", 0)), 1)
            # A SIGKILLed daemon never writes running=false: ask whether its PID still lives.
            daemon["running"] = bool(daemon.get("running", True)) and _pid_alive(daemon.get("pid"))
        out["daemon"] = daemon
    for spec in cfg.watch:
        try:
            out["inbox"][spec.name] = sum(1 for _ in walk_files(spec)) if spec.input.is_dir() else None
        except OSError:
            out["inbox"][spec.name] = None
    return out


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render_status(data: dict[str, Any]) -> str:
    lines = [f"ledger: {data['ledger']}"]
    counts = data["counts"]
    lines.append("scans: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet"))
    d = data["daemon"]
    if d and not d.get("running", True):
        lines.append(f"daemon: not running (pid {d['pid']} last wrote its status {d['age_s']} s ago)")
    elif d:
        lines.append(f"daemon: pid {d['pid']}, {'healthy' if d['healthy'] else 'UNHEALTHY: ' + d['health']}, "
                     f"backlog {d['backlog']}, status {d['age_s']} s old")
    else:
        lines.append("daemon: no status file (not running yet?)")
    for name, n in data["inbox"].items():
        lines.append(f"inbox {name}: {'unavailable' if n is None else f'{n} file(s)'}")
    for f in data["recent_failures"]:
        lines.append(f"failed {f['watch']}/{f['rel']} [{f['stage']}]: {f['error']}")
    return "\n".join(lines)
