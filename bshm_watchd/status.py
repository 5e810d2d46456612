"""``bshm-watchd status``: ledger counts, recent failures, backlog, and the daemon's own status file."""

from __future__ import annotations

import json
import time
from typing import Any

from bshm_watchd.config import Config
from bshm_watchd.ledger import Ledger
from bshm_watchd.watcher import walk_files


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
        out["daemon"] = daemon
    for spec in cfg.watch:
        try:
            out["inbox"][spec.name] = sum(1 for _ in walk_files(spec)) if spec.input.is_dir() else None
        except OSError:
            out["inbox"][spec.name] = None
    return out


def render_status(data: dict[str, Any]) -> str:
    lines = [f"ledger: {data['ledger']}"]
    counts = data["counts"]
    lines.append("scans: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet"))
    d = data["daemon"]
    if d:
        lines.append(f"daemon: pid {d['pid']}, {'healthy' if d['healthy'] else 'UNHEALTHY: ' + d['health']}, "
                     f"backlog {d['backlog']}, status {d['age_s']} s old")
    else:
        lines.append("daemon: no status file (not running yet?)")
    for name, n in data["inbox"].items():
        lines.append(f"inbox {name}: {'unavailable' if n is None else f'{n} file(s)'}")
    for f in data["recent_failures"]:
        lines.append(f"failed {f['watch']}/{f['rel']} [{f['stage']}]: {f['error']}")
    return "\n".join(lines)
