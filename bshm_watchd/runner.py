"""The daemon's scan loop: work items in, outcomes out, scans overlapped in one :class:`ScanPipeline`.

This thread runs ``ScanWorker.begin`` (read, hash, claim), submits the claimed scans with the bytes it
read, batches their inference (the pipeline's matter runs here, never in a worker), and runs ``end``
(source re-checked, staged outputs renamed into place, ledger, disposal) — so every ledger write and
every crash failpoint stays in the daemon process. Decode, refinement and PNG encoding run in the
worker processes. At most ``max_inflight`` scans are between claim and outcome: memory stays flat
however many scans wait.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import structlog

from bshm_watchd.errors import BshmError
from bshm_watchd.fsutil import discard_tagged
from bshm_watchd.parallel import ScanPipeline, ScanResult
from bshm_watchd.sdnotify import ProgressTracker
from bshm_watchd.worker import Claimed, Outcome, ScanWorker, WorkItem

log = structlog.get_logger(__name__)

JOB = "scan-pipeline"
"""The name this loop reports to the progress tracker (the watchdog's stuck detection)."""
POLL = 0.05
"""Seconds to wait for a stage to finish while there is room for more work (the work queue is looked at
again after each wait)."""


class ScanRunner:
    """Drives ``pipeline`` from the daemon's work queue; ``run`` is the thread's body and returns once a
    ``None`` arrived and the scans in flight are finished (or, after ``drain_s``, abandoned)."""

    def __init__(self, worker: ScanWorker, pipeline: ScanPipeline,
                 work: queue.Queue[WorkItem | None], results: queue.Queue[tuple[WorkItem, Outcome | None]],
                 progress: ProgressTracker, *, drain_s: float, start_workers: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if drain_s <= 0:
            raise ValueError(f"drain_s must be > 0, got {drain_s}")
        self.worker = worker
        self.pipeline = pipeline
        self.work = work
        self.results = results
        self.progress = progress
        self.drain_s = drain_s
        self.start_workers = start_workers
        self._clock = clock
        self._jobs: dict[int, Claimed] = {}
        self._busy = False

    @property
    def workers(self) -> int:
        return self.pipeline.workers

    def run(self) -> None:
        try:
            if self.start_workers:
                self._start()
            self._loop()
        finally:
            self.pipeline.close()
            self.progress.finished(JOB)

    def _start(self) -> None:
        t0 = time.perf_counter()
        try:
            self.pipeline.start_workers()
        except Exception as exc:  # the pool is started again on the first scan; no reason to stop here
            log.error("workers_start_failed", error=f"{type(exc).__name__}: {exc}")
            return
        log.info("workers_started", workers=self.pipeline.workers, ms=round((time.perf_counter() - t0) * 1000, 1))

    def _loop(self) -> None:
        deadline: float | None = None
        while True:
            try:
                if deadline is None and self._take():
                    deadline = self._clock() + self.drain_s
                    log.info("scan_pipeline_draining", inflight=self.pipeline.inflight)
                if not self.pipeline.inflight:
                    if deadline is not None:
                        return
                    continue
                full = self.pipeline.inflight >= self.pipeline.max_inflight
                # Full: nothing to take, wait for a stage. Otherwise look at the work queue again soon.
                for result in self.pipeline.poll(timeout=None if full and deadline is None else POLL):
                    self._end(result)
                if deadline is not None and self._clock() >= deadline and self.pipeline.inflight:
                    self._roll_back("daemon stopped before the scan finished", "scan_abandoned_at_stop",
                                    finish=True, post=False)
                    return
            except Exception:
                # The pool could not be (re)started, or a bug here: without this the thread would end and
                # the daemon would watch folders for ever without processing anything.
                log.exception("scan_pipeline_failed", inflight=len(self._jobs))
                self._roll_back("scan pipeline failed", "scan_rolled_back", finish=False, post=True)
                if deadline is not None:
                    return

    def _take(self) -> bool:
        """Begin and submit queued items while there is room; True once the stop marker arrived."""
        while self.pipeline.inflight < self.pipeline.max_inflight:
            if not self.pipeline.inflight:
                self._idle()
                item = self.work.get()  # idle: wait for work (or the stop marker)
            else:
                try:
                    item = self.work.get_nowait()  # busy: only what is there now
                except queue.Empty:
                    return False
            if item is None:
                return True
            self._busy_with(item)
            outcome: Outcome | Claimed | None
            try:
                outcome = self.worker.begin(item)
            except BshmError as exc:  # the ledger itself failed (disk full on the WAL, ...): retry later
                log.error("scan_infrastructure_error", rel=_rel(item), error=str(exc))
                outcome = None
            except Exception:
                log.exception("scan_worker_error", rel=_rel(item))
                outcome = None
            if isinstance(outcome, Claimed) and outcome.task is not None:
                self._jobs[id(outcome.task)] = outcome
                self.pipeline.submit(outcome.task)  # never blocks: there is room
            else:
                self.results.put((item, outcome if isinstance(outcome, Outcome) else None))
        return False

    def _end(self, result: ScanResult) -> None:
        job = self._jobs.pop(id(result.task), None)
        if job is None:  # rolled back already
            return
        self.progress.progressed(JOB)
        outcome: Outcome | None
        try:
            outcome = self.worker.end(job, result)
        except BshmError as exc:
            log.error("scan_infrastructure_error", rel=_rel(job.item), error=str(exc))
            outcome = None
        except Exception:
            log.exception("scan_worker_error", rel=_rel(job.item))
            outcome = None
        self.results.put((job.item, outcome))

    def _roll_back(self, reason: str, event: str, *, finish: bool, post: bool) -> None:
        """Kill the workers and give every scan in flight back: at a stop whose grace is over, or after
        the pipeline itself failed.

        ``finish``: end the results already there first. A rolled-back scan's temps (a killed worker's
        half-written ones too, found by their tag) go now; its claim is given back without counting an
        attempt. ``post``: its outcome is "retry"; otherwise none is posted (a stop: it is still in the
        inbox for the next start).
        """
        if finish:
            for result in self.pipeline.poll(timeout=0):
                self._end(result)
        try:
            self.pipeline.abort()
        except Exception:
            log.exception("scan_pipeline_abort_failed")
        for result in self.pipeline.poll(timeout=0):  # finished before the abort: nothing runs now
            self._end(result)
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            self.worker.forget(job)
            discard_tagged(job.base.parent, job.temp_tag)
            try:
                self.worker.ledger.release(job.row_id, reason, "stop" if not post else "pipeline", counts=False)
            except BshmError as exc:
                log.error("scan_infrastructure_error", rel=str(job.rel), error=str(exc))
            log.warning(event, watch=job.item.watch.name, rel=str(job.rel))
            if post:
                self.results.put((job.item, None))

    def _busy_with(self, item: WorkItem) -> None:
        if self._busy:
            self.progress.progressed(JOB)
        else:
            self._busy = True
            self.progress.started(JOB, _rel(item))

    def _idle(self) -> None:
        if self._busy:
            self._busy = False
            self.progress.finished(JOB)


def _rel(item: WorkItem) -> str:
    try:
        return str(item.path.relative_to(item.watch.input))
    except ValueError:
        return str(item.path)
