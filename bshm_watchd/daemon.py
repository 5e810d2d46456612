"""``bshm-watchd run``: the main loop — watchers feed settle gates, the scan pipeline mattes, systemd is told.

Threads: watchdog observers push paths into ``events``; the main loop owns the settle gates,
rescans, share checks, reloads, the status file, the watchdog and all bookkeeping; one scan thread
(:mod:`bshm_watchd.runner`) claims scans, batches their inference and commits their results, while
the pipeline's worker processes decode, refine and encode them; each outcome comes back on
``results``. Nothing is shared but queues, the stop event and the progress tracker; each thread has
its own ledger connection.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bshm_watchd.config import Config, WatchSpec, load_config
from bshm_watchd.engine.base import Matter
from bshm_watchd.errors import BshmError, ConfigError
from bshm_watchd.ledger import Hint, Ledger
from bshm_watchd.parallel import ScanPipeline
from bshm_watchd.runner import ScanRunner
from bshm_watchd.sdnotify import Notifier, ProgressTracker, WatchdogGate
from bshm_watchd.settle import SettleGate
from bshm_watchd.status import Counters, write_status_file
from bshm_watchd.watcher import FolderWatch, folder_identity, path_ignored, walk_files
from bshm_watchd.worker import Outcome, ScanWorker, WorkItem, remove_crash_temps, sweep_temps

log = structlog.get_logger(__name__)

TICK = 0.25
STOP_GRACE = 25.0
DRAIN_GRACE = 20.0
"""Seconds the scans in flight get to finish at a stop before they are rolled back (within STOP_GRACE)."""
TEMP_TTL = 3600.0
BACKOFF = (5.0, 30.0, 120.0, 600.0)
RESTART_PAUSE = 5.0


@dataclass
class WatchState:
    spec: WatchSpec
    gate: SettleGate
    folder: FolderWatch | None = None
    available: bool = True
    ident: tuple[int, int] | None = None
    """(st_dev, st_ino) of the input folder the observer watches: a folder replaced under the same name
    (share remounted, folder renamed away and recreated) leaves an inotify observer on the old inode."""
    next_rescan: float = 0.0
    next_restart: float = 0.0
    """When a dead observer may be restarted again: a start that keeps failing is retried every few
    seconds, not logged four times a second."""


class Daemon:
    """One service instance; ``run()`` returns the exit status."""

    def __init__(self, cfg: Config, *, matter: Matter | None = None, notifier: Notifier | None = None,
                 stop: threading.Event | None = None,
                 hook: Callable[[str, WorkItem], None] | None = None,
                 metrics: Any = None, temp_ttl: float = TEMP_TTL,
                 backoff: tuple[float, ...] = BACKOFF) -> None:
        if temp_ttl < 0:
            raise ValueError(f"temp_ttl must be >= 0, got {temp_ttl}")
        if not backoff or any(b < 0 for b in backoff):
            raise ValueError(f"backoff must be a non-empty tuple of delays >= 0, got {backoff}")
        self.cfg = cfg
        self.temp_ttl = temp_ttl
        self.backoff = backoff
        self._matter = matter
        self.notifier = notifier or Notifier()
        self.stop = stop or threading.Event()
        self.hook = hook
        self.metrics = metrics
        self.events: queue.Queue[tuple[WatchSpec, Path]] = queue.Queue()
        self.work: queue.Queue[WorkItem | None] = queue.Queue(maxsize=64)
        self.results: queue.Queue[tuple[WorkItem, Outcome | None]] = queue.Queue()
        self.queued: set[Path] = set()
        self.dirty: set[Path] = set()
        """Queued paths that had an event while queued: offered again once their outcome is in."""
        self.retry_at: dict[Path, tuple[float, WatchSpec]] = {}
        self.attempts: dict[Path, int] = {}
        self.held: dict[Path, Hint] = {}
        """Paths left alone until their stat changes (refused, undisposable): one warning, not one per rescan."""
        self.watches: dict[str, WatchState] = {}
        self.progress = ProgressTracker(stuck_after=float(os.environ.get("BSHM_WATCHD_STUCK_SECONDS", "900")))
        self.counters = Counters()
        self._reload = threading.Event()
        self.ready = threading.Event()
        """Set once the observers run and the first tick (the backlog rescan) is over."""
        self._space_ok = True
        self.started = time.time()
        self.runner: ScanRunner | None = None

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
            remove_crash_temps(cfg, stale)
        if self._matter is None:
            from bshm_watchd.engine.factory import build_matter
            from bshm_watchd.modelstore import ModelStore, default_model_dir

            self._matter = build_matter(cfg.model, ModelStore(cfg.model_dir or default_model_dir()),
                                        device=cfg.device, cpu_runtime=cfg.cpu_runtime)
        self.worker = ScanWorker(cfg, self._matter, self.ledger, self.hook)
        # Rescans read through their own connection (WAL readers never wait for the writer), so the
        # main loop — and with it the watchdog — never blocks behind a scan in progress.
        self.checker = ScanWorker(cfg, self._matter, Ledger(self.ledger.path, readonly=True))
        # One pipeline for the daemon's life: the matter never changes without a restart, and a task
        # carries its profile, so a reload needs nothing from it.
        pipeline = ScanPipeline(self._matter, max_pixels=cfg.max_pixels, workers=cfg.workers)
        self.runner = ScanRunner(self.worker, pipeline, self.work, self.results, self.progress,
                                 drain_s=DRAIN_GRACE)
        self._set_watches(cfg)
        thread = threading.Thread(target=self.runner.run, name="scan-pipeline", daemon=True)
        thread.start()
        gate = WatchdogGate(self.notifier)
        self.notifier.ready(self._status_text())
        log.info("daemon_ready", watches=[w.name for w in cfg.watch], model=self._matter.name, pid=os.getpid(),
                 workers=pipeline.workers)
        last_status = 0.0
        while not self.stop.is_set():
            try:
                self._tick()
            except Exception:  # the main loop must outlive any one bad tick
                log.exception("tick_failed")
            self.ready.set()
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
        self._drain_results()
        self._write_status(running=False)
        self.checker.ledger.close()
        if thread.is_alive():
            # Closing the connection under a running scan would turn its commit into a crash; the
            # process exit abandons it instead (temp files only, no claim committed as done).
            log.error("worker_did_not_stop", grace_s=STOP_GRACE)
        else:
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
            st = WatchState(spec=spec, gate=SettleGate(spec.input, spec.settle_seconds, spec.incomplete_seconds))
            self.watches[spec.name] = st
            st.ident = folder_identity(spec.input)
            st.available = st.ident is not None
            if st.available:
                self._start_folder(st)
            else:
                log.error("watch_unavailable", watch=spec.name, input=str(spec.input))
        self._clean_temps(cfg)

    def _start_folder(self, st: WatchState) -> None:
        if st.folder is not None:
            st.folder.stop()
        st.folder = FolderWatch(st.spec, lambda spec, path: self.events.put((spec, path)))
        try:
            st.folder.start()
        except OSError as exc:
            log.error("watch_start_failed", watch=st.spec.name, reason=exc.strerror or str(exc))
            st.folder = None
        st.next_rescan = 0.0  # rescan now: the backlog, and whatever arrived while we were not looking

    def _clean_temps(self, cfg: Config) -> None:
        roots = {cfg.state_dir}
        for spec in cfg.watch:
            roots.update(p for p in (spec.output, spec.quarantine, spec.move_to) if p is not None)
        sweep_temps(sorted(roots), self.temp_ttl)

    # ---- the tick --------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        self._drain_results()
        self._drain_events()
        for path, (due, spec) in list(self.retry_at.items()):
            if now >= due:
                del self.retry_at[path]
                st = self.watches.get(spec.name)
                if st is not None:
                    st.gate.offer(path)
        self._space_ok = self._check_space()
        for st in self.watches.values():
            self._check_watch(st)
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
            if st is None:
                continue
            if path in self.queued:
                self.dirty.add(path)  # touched while being processed: look again once it is done
                continue
            if path.is_dir() and not path.is_symlink():
                for child in walk_files(st.spec, path):
                    self._offer(st, child)
            else:
                self._offer(st, path)

    def _offer(self, st: WatchState, path: Path) -> None:
        if path in self.queued or path in self.retry_at:
            return
        try:
            rel = path.relative_to(st.spec.input)
        except ValueError:
            return
        if path_ignored(rel, st.spec.ignore):
            return
        self.held.pop(path, None)  # an event means it changed: look again
        st.gate.offer(path)

    def _check_watch(self, st: WatchState) -> None:
        ident = folder_identity(st.spec.input)
        ok = ident is not None
        if ok != st.available:
            st.available = ok
            if ok:
                log.info("watch_available_again", watch=st.spec.name)
                st.ident = ident
                self._start_folder(st)
            else:
                # No mass actions while a share is away: keep state, stop the observer, rescan on return.
                log.error("watch_unavailable", watch=st.spec.name, input=str(st.spec.input))
                if st.folder is not None:
                    st.folder.stop()
                    st.folder = None
            return
        if not ok:
            return
        if ident != st.ident:
            log.warning("watch_folder_replaced_restarting", watch=st.spec.name)
            st.ident = ident
            self._start_folder(st)
        elif (st.folder is None or not st.folder.alive()) and time.monotonic() >= st.next_restart:
            log.warning("observer_dead_restarting", watch=st.spec.name)
            st.next_restart = time.monotonic() + RESTART_PAUSE
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
            if self.held.get(path) == hint:
                continue
            self.held.pop(path, None)
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
            self._hold(path)
        for path, reason in res.stuck:
            item = WorkItem(st.spec, path, Hint(0, 0, 0, 0))
            if not self.worker.quarantine(item, path.relative_to(st.spec.input), reason, "settle", "Incomplete",
                                          None, log.bind(watch=st.spec.name, rel=_rel(st.spec, path))):
                self._hold(path)
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

    def _hold(self, path: Path) -> None:
        try:
            self.held[path] = Hint.of(os.lstat(path))
        except OSError:
            self.held.pop(path, None)

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

    # ---- outcomes (main thread) -------------------------------------------------------------
    def _drain_results(self) -> None:
        while True:
            try:
                item, outcome = self.results.get_nowait()
            except queue.Empty:
                return
            self._settle_outcome(item, outcome)

    def _settle_outcome(self, item: WorkItem, outcome: Outcome | None) -> None:
        path, spec = item.path, item.watch
        result = outcome.result if outcome is not None else "retry"
        self.counters.add(spec.name, result)
        if result == "done":
            self.counters.done += 1
        elif result == "quarantined":
            self.counters.quarantined += 1
        elif result in ("retry", "changed"):
            self.counters.retries += 1
        else:
            self.counters.skipped += 1
        if result in ("retry", "changed"):
            # Back-off per file: one flaky share must not slow every later retry of the service.
            n = self.attempts[path] = self.attempts.get(path, 0) + 1
            delay = self.backoff[min(n - 1, len(self.backoff) - 1)] if result == "retry" else 0.0
            self.retry_at[path] = (time.monotonic() + delay, spec)
        else:
            self.attempts.pop(path, None)
            if outcome is not None and outcome.hold:
                self._hold(path)
        # Only now is it no longer queued: a rescan in between would otherwise offer it twice.
        self.queued.discard(path)
        if path in self.dirty:
            self.dirty.discard(path)
            st = self.watches.get(spec.name)
            if st is not None and path not in self.retry_at:
                self._offer(st, path)
        if self.metrics is not None:
            self.metrics.observe(spec.name, result, outcome, stage_ms=outcome.stages if outcome else None)

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
        if new.workers != self.cfg.workers:
            log.warning("reload_keeps_workers_until_restart", workers=self.cfg.workers, requested=new.workers)
        self.cfg = new
        self.worker.cfg = new
        self.checker.cfg = new
        if self.runner is not None:  # read at each submission; the pool itself lives until a restart
            self.runner.pipeline.max_pixels = new.max_pixels
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

    def _write_status(self, *, running: bool = True) -> None:
        ok, why = self.health()
        if self.metrics is not None:
            for name, st in self.watches.items():
                self.metrics.set_backlog(name, len(st.gate))
        data = {"pid": os.getpid(), "running": running, "started": self.started, "updated": time.time(),
                "healthy": ok, "workers": self.runner.workers if self.runner is not None else 0,
                "health": why, "backlog": self.backlog(), "done": self.counters.done,
                "quarantined": self.counters.quarantined, "by_watch": self.counters.by_watch,
                "watches": {n: {"available": st.available, "mode": st.folder.mode if st.folder else None,
                                "pending": len(st.gate)} for n, st in self.watches.items()}}
        self.notifier.status(self._status_text())
        try:
            write_status_file(self.cfg.state_dir / "status.json", json.dumps(data, indent=2).encode())
        except OSError as exc:
            log.warning("status_write_failed", error=exc.strerror or str(exc))


def _rel(spec: WatchSpec, path: Path) -> str:
    try:
        return str(path.relative_to(spec.input))
    except ValueError:
        return str(path)
