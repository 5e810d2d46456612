"""``bshm-watchd run``: the main loop — watchers feed settle gates, one worker thread mattes, systemd is told.

Threads: watchdog observers push paths into ``events``; the main loop owns the settle gates,
rescans, share checks, reloads, the status file and the watchdog; one worker thread runs scans
(the model uses the cores itself). Nothing is shared but queues, the stop event, the progress
tracker and the ledger behind its lock.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bshm_watchd.config import Config, WatchSpec, load_config
from bshm_watchd.engine.base import Matter
from bshm_watchd.errors import BshmError, ConfigError
from bshm_watchd.fsutil import TEMP_PREFIX, write_bytes_atomic
from bshm_watchd.ledger import Hint, Ledger
from bshm_watchd.sdnotify import Notifier, ProgressTracker, WatchdogGate
from bshm_watchd.settle import SettleGate
from bshm_watchd.watcher import FolderWatch, path_ignored, walk_files
from bshm_watchd.worker import ScanWorker, WorkItem

log = structlog.get_logger(__name__)

TICK = 0.25
STOP_GRACE = 25.0
TEMP_TTL = 3600.0
BACKOFF = (5.0, 30.0, 120.0, 600.0)


@dataclass
class WatchState:
    spec: WatchSpec
    gate: SettleGate
    folder: FolderWatch | None = None
    available: bool = True
    next_rescan: float = 0.0


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


class Daemon:
    """One service instance; ``run()`` returns the exit status."""

    def __init__(self, cfg: Config, *, matter: Matter | None = None, notifier: Notifier | None = None,
                 stop: threading.Event | None = None,
                 hook: Callable[[str, WorkItem], None] | None = None,
                 metrics: Any = None) -> None:
        self.cfg = cfg
        self._matter = matter
        self.notifier = notifier or Notifier()
        self.stop = stop or threading.Event()
        self.hook = hook
        self.metrics = metrics
        self.events: queue.Queue[tuple[WatchSpec, Path]] = queue.Queue()
        self.work: queue.Queue[WorkItem | None] = queue.Queue(maxsize=64)
        self.queued: set[Path] = set()
        self.retry_at: dict[Path, tuple[float, WatchSpec]] = {}
        self.watches: dict[str, WatchState] = {}
        self.progress = ProgressTracker(stuck_after=float(os.environ.get("BSHM_WATCHD_STUCK_SECONDS", "900")))
        self.counters = Counters()
        self._reload = threading.Event()
        self._space_ok = True
        self.started = time.time()

    # ---- signals ---------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def request_stop(self) -> None:
        self.stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    # ---- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self.ledger = Ledger(cfg.state_dir / "ledger.sqlite3")
        stale = self.ledger.stale_claims()
        if stale:
            log.warning("stale_claims_redone", count=len(stale), rels=[r.rel for r in stale[:20]])
        if self._matter is None:
            from bshm_watchd.engine.factory import build_matter
            from bshm_watchd.modelstore import ModelStore, default_model_dir

            self._matter = build_matter(cfg.model, ModelStore(cfg.model_dir or default_model_dir()),
                                        device=cfg.device)
        self.worker = ScanWorker(cfg, self._matter, self.ledger, self.hook)
        # Rescans read through their own connection (WAL readers never wait for the writer), so the
        # main loop — and with it the watchdog — never blocks behind a scan in progress.
        self.checker = ScanWorker(cfg, self._matter, Ledger(self.ledger.path, readonly=True))
        self._set_watches(cfg)
        thread = threading.Thread(target=self._work_loop, name="scan-worker", daemon=True)
        thread.start()
        gate = WatchdogGate(self.notifier)
        self.notifier.ready(self._status_text())
        log.info("daemon_ready", watches=[w.name for w in cfg.watch], model=self._matter.name, pid=os.getpid())
        last_status = 0.0
        while not self.stop.is_set():
            try:
                self._tick()
            except Exception:  # the main loop must outlive any one bad tick
                log.exception("tick_failed")
            gate.maybe_ping(self.progress.check()[0])
            now = time.monotonic()
            if now - last_status >= 2.0:
                last_status = now
                self._write_status()
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload()
            self.stop.wait(TICK)
        return self._shutdown(thread)

    def _shutdown(self, thread: threading.Thread) -> int:
        self.notifier.stopping("stopping")
        log.info("daemon_stopping", queued=len(self.queued))
        for st in self.watches.values():
            if st.folder is not None:
                st.folder.stop()
        # Drop queued-but-unstarted work: it is still in the inbox and the ledger has no claim for it.
        while True:
            try:
                self.work.get_nowait()
            except queue.Empty:
                break
        self.work.put(None)
        thread.join(timeout=STOP_GRACE)
        if thread.is_alive():
            log.error("worker_did_not_stop", grace_s=STOP_GRACE)
        self._write_status()
        self.checker.ledger.close()
        self.ledger.close()
        log.info("daemon_stopped")
        return 0

    # ---- watches ---------------------------------------------------------------------------
    def _set_watches(self, cfg: Config) -> None:
        for st in self.watches.values():
            if st.folder is not None:
                st.folder.stop()
        self.watches = {}
        for spec in cfg.watch:
            for folder in (spec.output, spec.quarantine):
                folder.mkdir(parents=True, exist_ok=True)
            st = WatchState(spec=spec, gate=SettleGate(spec.settle_seconds, spec.incomplete_seconds))
            self.watches[spec.name] = st
            st.available = self._available(spec)
            if st.available:
                self._start_folder(st)
            else:
                log.error("watch_unavailable", watch=spec.name, input=str(spec.input))
        self._clean_temps(cfg)

    def _start_folder(self, st: WatchState) -> None:
        st.folder = FolderWatch(st.spec, lambda spec, path: self.events.put((spec, path)))
        try:
            st.folder.start()
        except OSError as exc:
            log.error("watch_start_failed", watch=st.spec.name, reason=exc.strerror or str(exc))
            st.folder = None
        st.next_rescan = 0.0  # rescan now: the backlog, and whatever arrived while we were not looking

    @staticmethod
    def _available(spec: WatchSpec) -> bool:
        """The share is there and listable (a renamed-away or chmod-000 folder is not)."""
        try:
            return spec.input.is_dir() and os.access(spec.input, os.R_OK | os.X_OK)
        except OSError:
            return False

    def _clean_temps(self, cfg: Config) -> None:
        """Remove our own temp files older than the TTL (a crash between write and rename leaves them)."""
        cutoff = time.time() - TEMP_TTL
        for spec in cfg.watch:
            for root in (spec.output, spec.quarantine):
                for dirpath, _dirs, files in os.walk(root, followlinks=False):
                    for name in files:
                        p = Path(dirpath) / name
                        try:
                            if name.startswith(TEMP_PREFIX) and p.lstat().st_mtime < cutoff:
                                p.unlink()
                                log.info("stale_temp_removed", path=str(p))
                        except OSError:
                            continue

    # ---- the tick --------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        self._drain_events()
        for path, (due, spec) in list(self.retry_at.items()):
            if now >= due:
                del self.retry_at[path]
                st = self.watches.get(spec.name)
                if st is not None:
                    st.gate.offer(path)
        self._space_ok = self._check_space()
        for st in self.watches.values():
            self._check_watch(st, now)
            if st.available and now >= st.next_rescan:
                self._rescan(st)
                st.next_rescan = now + st.spec.rescan_seconds
            self._poll_gate(st)

    def _drain_events(self) -> None:
        while True:
            try:
                spec, path = self.events.get_nowait()
            except queue.Empty:
                return
            st = self.watches.get(spec.name)
            if st is None or path in self.queued:
                continue
            if path.is_dir() and not path.is_symlink():
                for child in walk_files(st.spec) if path == st.spec.input else self._walk_sub(st.spec, path):
                    self._offer(st, child)
            else:
                self._offer(st, path)

    @staticmethod
    def _walk_sub(spec: WatchSpec, folder: Path) -> list[Path]:
        return [p for p in walk_files(spec) if folder in p.parents]

    def _offer(self, st: WatchState, path: Path) -> None:
        if path in self.queued or path in self.retry_at:
            return
        try:
            rel = path.relative_to(st.spec.input)
        except ValueError:
            return
        if path_ignored(rel, st.spec.ignore):
            return
        st.gate.offer(path)

    def _check_watch(self, st: WatchState, now: float) -> None:
        ok = self._available(st.spec)
        if ok != st.available:
            st.available = ok
            if ok:
                log.info("watch_available_again", watch=st.spec.name)
                self._start_folder(st)
            else:
                # No mass actions while a share is away: keep state, stop the observer, rescan on return.
                log.error("watch_unavailable", watch=st.spec.name, input=str(st.spec.input))
                if st.folder is not None:
                    st.folder.stop()
                    st.folder = None
            return
        if ok and (st.folder is None or not st.folder.alive()):
            log.warning("observer_dead_restarting", watch=st.spec.name)
            self._start_folder(st)

    def _rescan(self, st: WatchState) -> None:
        n = 0
        for path in walk_files(st.spec):
            if path in self.queued or path in st.gate or path in self.retry_at:
                continue
            try:
                hint = Hint.of(os.lstat(path))
            except OSError:
                continue
            if not self.checker.already_done(st.spec, path, hint):
                st.gate.offer(path)
                n += 1
        log.debug("rescan", watch=st.spec.name, offered=n)

    def _poll_gate(self, st: WatchState) -> None:
        if not st.available:
            return
        res = st.gate.poll()
        for path in res.gone:
            log.info("scan_vanished_before_claim", watch=st.spec.name, rel=_rel(st.spec, path))
        for path, reason in res.refused:
            log.warning("scan_refused", watch=st.spec.name, rel=_rel(st.spec, path), reason=reason)
        for path in res.stuck:
            reason = f"still structurally incomplete after {st.spec.incomplete_seconds:.0f} s"
            item = WorkItem(st.spec, path, Hint(0, 0, 0, 0))
            self.worker.quarantine(item, path.relative_to(st.spec.input), reason, "settle", "Incomplete", None,
                                   log.bind(watch=st.spec.name, rel=_rel(st.spec, path)))
            self.counters.quarantined += 1
            self.counters.add(st.spec.name, "quarantined")
        for path, hint in res.ready:
            if not self._space_ok:
                st.gate.offer(path)  # paused on low disk space: keep it waiting, claim nothing
                continue
            try:
                self.work.put_nowait(WorkItem(st.spec, path, hint))
            except queue.Full:
                st.gate.offer(path)  # back-pressure: memory stays flat however many scans wait
                continue
            self.queued.add(path)

    def _check_space(self) -> bool:
        need = self.cfg.min_free_mb * 1024 * 1024
        for st in self.watches.values():
            try:
                free = shutil.disk_usage(st.spec.output).free
            except OSError:
                continue
            if free < need:
                if self._space_ok:
                    log.error("disk_space_low_pausing", watch=st.spec.name, free_mb=free // (1 << 20),
                              min_free_mb=self.cfg.min_free_mb)
                return False
        if not self._space_ok:
            log.info("disk_space_ok_resuming")
        return True

    # ---- the worker thread -----------------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                return
            try:
                with self.progress.job("scan-worker", _rel(item.watch, item.path)):
                    outcome = self.worker.handle(item)
            except BshmError as exc:  # the ledger itself failed (disk full on the WAL, ...): retry later
                log.error("scan_infrastructure_error", rel=_rel(item.watch, item.path), error=str(exc))
                outcome = None
            except Exception:
                log.exception("scan_worker_error", rel=_rel(item.watch, item.path))
                outcome = None
            self.queued.discard(item.path)
            result = outcome.result if outcome is not None else "retry"
            self.counters.add(item.watch.name, result)
            if result == "done":
                self.counters.done += 1
            elif result == "quarantined":
                self.counters.quarantined += 1
            elif result in ("retry", "changed"):
                n = self.counters.retries = self.counters.retries + 1
                delay = BACKOFF[min(n - 1, len(BACKOFF) - 1)] if result == "retry" else 0.0
                self.retry_at[item.path] = (time.monotonic() + delay, item.watch)
            else:
                self.counters.skipped += 1
            if self.metrics is not None:
                self.metrics.observe(item.watch.name, result, outcome)

    # ---- reload / status -------------------------------------------------------------------
    def _do_reload(self) -> None:
        self.notifier.reloading()
        src = self.cfg.source
        try:
            if src is None:
                raise ConfigError("no config file to reload")
            new = load_config(src)
            if (new.model, new.device, new.state_dir) != (self.cfg.model, self.cfg.device, self.cfg.state_dir):
                raise ConfigError("model, device and state_dir changes need a restart")
        except BshmError as exc:
            log.error("reload_rejected_keeping_old_config", error=str(exc))
            self.notifier.ready(self._status_text())
            return
        self.cfg = new
        self.worker.cfg = new
        self.checker.cfg = new
        self._set_watches(new)
        log.info("config_reloaded", watches=[w.name for w in new.watch])
        self.notifier.ready(self._status_text())

    def backlog(self) -> int:
        return sum(len(st.gate) for st in self.watches.values()) + len(self.queued) + len(self.retry_at)

    def health(self) -> tuple[bool, str]:
        away = [n for n, st in self.watches.items() if not st.available]
        if away:
            return False, f"watch folder unavailable: {', '.join(away)}"
        if not self._space_ok:
            return False, "disk space below min_free_mb: claiming paused"
        return self.progress.check()

    def _status_text(self) -> str:
        c = self.counters
        return f"done {c.done}, quarantined {c.quarantined}, backlog {self.backlog()}"

    def _write_status(self) -> None:
        ok, why = self.health()
        data = {"pid": os.getpid(), "started": self.started, "updated": time.time(), "healthy": ok,
                "health": why, "backlog": self.backlog(), "done": self.counters.done,
                "quarantined": self.counters.quarantined, "by_watch": self.counters.by_watch,
                "watches": {n: {"available": st.available, "mode": st.folder.mode if st.folder else None,
                                "pending": len(st.gate)} for n, st in self.watches.items()}}
        self.notifier.status(self._status_text())
        try:
            write_bytes_atomic(self.cfg.state_dir / "status.json", json.dumps(data, indent=2).encode())
        except OSError as exc:
            log.warning("status_write_failed", error=exc.strerror or str(exc))


def _rel(spec: WatchSpec, path: Path) -> str:
    try:
        return str(path.relative_to(spec.input))
    except ValueError:
        return str(path)
