"""Overlapped scan pipeline: CPU stages in a pool of worker processes, inference batched in this process.

Per scan::

    worker  read → decode → bounded analysis copy          ── analysis copy ──▶
    main    matter.predict_batch (GPU or onnxruntime)      ── small alpha   ──▶
    worker  read → decode again → refine/upsample → render → PNG writes

Full-resolution pixels never cross a process boundary: the finishing worker decodes the file again.
Measured on 2 cores: one pipe hop of the decoded scan costs 15 ms (1024×1536) / 0.7 s (6000×9000)
and the route through the main process needs two, against a decode of 20 ms / 0.6 s; and the main
process would hold every waiting scan's full-size pixels (162 MB each at 6000×9000), copying them
twice. At most ``max_inflight`` scans are between submission and result, so memory stays flat
however many scans wait. A bad file comes back as a failed result; a worker that dies (a decoder
crash, the OOM killer) is replaced, and the scans it held are retried one at a time so only the
culprit fails. With ``ScanTask.stage_outputs`` the writes stop short of the rename: the caller (the
daemon, once it re-checked the source) commits the fsynced temps. The worker side: :mod:`.stages`.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bshm_watchd.config import Profile
from bshm_watchd.decode import DEFAULT_MAX_PIXELS
from bshm_watchd.engine.base import RGB8, Alpha, Matter
from bshm_watchd.heap import HeapTrimmer
from bshm_watchd.stages import (
    Failed,
    Prepared,
    Work,
    as_failed,
    cpu_count,
    finish_stage,
    init_worker,
    ping,
    prepare_stage,
)

MAX_STRIKES = 2
"""A scan in flight when a worker died twice is the culprit (the second time it ran alone)."""


@dataclass(frozen=True)
class ScanTask:
    """One scan to process. ``data``: the file's bytes when the caller already holds them (the daemon
    hashes what it read); otherwise the workers read ``src``. ``tag`` is the caller's handle; it never
    leaves this process."""

    src: Path
    out_base: Path
    profile: Profile
    profile_name: str = "default"
    source: str = ""
    """What the sidecar records as the source; the file name when empty."""
    data: bytes | None = field(default=None, repr=False)
    tag: Any = field(default=None, compare=False)
    stage_outputs: bool = False
    """Leave the outputs as fsynced temps beside their final names (``ScanResult.staged``) for the
    caller to commit or discard: the daemon checks the source first. Otherwise they are renamed in place."""
    temp_tag: str = ""
    """Put in the staged temps' names, so the caller can remove what a worker that died left."""


@dataclass(frozen=True)
class ScanResult:
    task: ScanTask
    written: tuple[Path, ...] = ()
    ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    stage: str | None = None
    transient: bool = False
    crashed: bool = False
    """An internal error or a dead worker, not a verdict on the file."""
    disk_full: bool = False
    """The write failed because the output filesystem is full (judged in the worker, which saw the errno)."""
    staged: tuple[tuple[Path, Path], ...] = ()
    """(final, temp) per output, in write order, for a task with ``stage_outputs``."""
    worker_pid: int = 0
    """The worker process that wrote the outputs."""
    exc_type: str = ""
    """The failure's exception class (``WorkerDied`` for a dead worker)."""
    worker_deaths: int = 0
    """Workers that died holding this scan: each may have left a staged temp behind."""

    @property
    def ok(self) -> bool:
        return self.error is None


# ---- the scheduler (main process) -----------------------------------------------------------------
@dataclass
class _Item:
    task: ScanTask
    work: Work
    ms: dict[str, float] = field(default_factory=dict)
    stage: str = "prepare"
    """prepare → infer → finish."""
    analysis: RGB8 | None = None
    size: tuple[int, int] = (0, 0)
    alpha: Alpha | None = None
    strikes: int = 0
    deaths: int = 0
    """Workers that died holding this scan (``strikes`` is reset once it gets through)."""


class ScanPipeline:
    """Scans in, results out, stages overlapped. Use as a context manager (the pool is shut down on exit).

    ``submit`` blocks while ``max_inflight`` scans are in flight (processing meanwhile); ``poll`` and
    ``drain`` hand back results; ``run`` does both over an iterable, pulling tasks only as room frees.
    Results come in completion order. The matter runs only in this process.
    """

    def __init__(
        self,
        matter: Matter,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int = 0,
        batch_size: int | None = None,
        max_inflight: int | None = None,
        worker_nice: int = 0,
        start_method: str = "spawn",
    ) -> None:
        self.workers = workers or cpu_count()
        self.batch_size = batch_size or int(getattr(matter, "batch_size", 1))
        self.max_inflight = max_inflight or max(2 * self.workers, self.batch_size + self.workers)
        if self.workers < 1 or self.batch_size < 1 or self.max_inflight < 1:
            raise ValueError(f"workers ({self.workers}), batch_size ({self.batch_size}) and max_inflight "
                             f"({self.max_inflight}) must be >= 1")
        if not 0 <= worker_nice <= 19:
            raise ValueError(f"worker_nice must be in 0..19, got {worker_nice}")
        self.matter = matter
        self.max_pixels = max_pixels
        self.worker_nice = worker_nice
        # spawn, not fork: forking a process that holds CUDA or onnxruntime/OpenCV thread pools can hang.
        self._ctx = multiprocessing.get_context(start_method)
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0
        self._futures: dict[Future[Any], tuple[_Item, int]] = {}
        self._queued: deque[_Item] = deque()
        """Waiting to be sent to a worker: emptied at once, except while a dead worker's scans are retried alone."""
        self._ready: deque[_Item] = deque()
        self._done: deque[ScanResult] = deque()
        self._suspects = 0
        self.peak_inflight = 0
        self.batches: list[int] = []
        """Size of every inference batch run, for bench and tests."""
        self.heap = HeapTrimmer()
        """Returns the heap's freed holes to the system after inference, when RSS has grown (``heap``)."""

    # -- public API --
    @property
    def inflight(self) -> int:
        return len(self._futures) + len(self._queued) + len(self._ready)

    def submit(self, task: ScanTask) -> None:
        while self.inflight >= self.max_inflight:
            self._step(timeout=None)
        work = Work(src=task.src, data=task.data, out_base=task.out_base, profile=task.profile,
                     profile_name=task.profile_name, source=task.source or task.src.name,
                     model=self.matter.name, max_pixels=self.max_pixels, stage_outputs=task.stage_outputs,
                     temp_tag=task.temp_tag)
        self._queued.append(_Item(task=task, work=work))
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        self._dispatch()

    def poll(self, timeout: float | None = 0.0) -> list[ScanResult]:
        """Results finished so far; waits up to ``timeout`` s for one when none is (None: until one is)."""
        if not self._done and self.inflight:
            self._step(timeout=timeout)
        out = list(self._done)
        self._done.clear()
        return out

    def drain(self) -> Iterator[ScanResult]:
        """Every remaining result, as each finishes."""
        while self.inflight or self._done:
            yield from self.poll(timeout=None)

    def run(self, tasks: Iterable[ScanTask]) -> Iterator[ScanResult]:
        for task in tasks:
            self.submit(task)
            while self._done:
                yield self._done.popleft()
        yield from self.drain()

    def start_workers(self) -> None:
        """Start every worker now (imports included) rather than on the first scans: for timing, and so a
        daemon pays the start-up before its first scan arrives."""
        pool = self._pool_now()
        wait([pool.submit(ping) for _ in range(self.workers)])

    def abort(self) -> list[ScanTask]:
        """Kill the workers now and forget the scans in flight (returned; results already finished stay
        for ``poll``): for a stop that cannot wait. A killed worker may leave a staged temp behind."""
        lost = [it.task for it, _ in self._futures.values()] + [it.task for it in (*self._queued, *self._ready)]
        pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.kill()
            pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()
        self._queued.clear()
        self._ready.clear()
        self._suspects = 0
        self._generation += 1
        return lost

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ScanPipeline:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- scheduling --
    def _pool_now(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self._ctx,
                                             initializer=init_worker, initargs=(self.worker_nice, os.getpid()))
        return self._pool

    def _dispatch(self) -> None:
        """Send queued items to workers; one at a time while scans from a crashed worker are retried."""
        while self._queued and not (self._suspects and self._futures):
            item = self._queued.popleft()
            fut: Future[Any]
            if item.stage == "prepare" or item.alpha is None:
                fut = self._pool_now().submit(prepare_stage, item.work)
            else:
                fut = self._pool_now().submit(finish_stage, item.work, item.alpha, item.size, item.ms)
            self._futures[fut] = (item, self._generation)

    def _step(self, timeout: float | None) -> None:
        """Run one inference batch if one is due, else wait for worker results (up to ``timeout`` s)."""
        preparing = any(it.stage == "prepare" for it, _ in self._futures.values()) or any(
            it.stage == "prepare" for it in self._queued)
        if self._ready and (len(self._ready) >= self.batch_size or not preparing):
            self._infer()
        elif self._futures:
            done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
            for fut in done:
                self._harvest(fut)
        self._dispatch()

    def _harvest(self, fut: Future[Any]) -> None:
        item, generation = self._futures.pop(fut)
        # A dead worker breaks the whole pool: its futures fail with BrokenProcessPool, or are cancelled
        # when our own shutdown of the broken pool reaches them first.
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or isinstance(exc, BrokenProcessPool):
            self._worker_died(item, generation)
            return
        if item.strikes:
            item.strikes = 0
            self._suspects -= 1
        out: Any = as_failed(exc, item.stage, item.ms) if exc is not None else fut.result()
        if isinstance(out, Failed):
            self._finish(item, out)
        elif isinstance(out, Prepared):
            item.analysis, item.size, item.stage = out.analysis, out.size, "infer"
            item.ms.update(out.ms)
            self._ready.append(item)
        else:
            self._done.append(ScanResult(task=item.task, written=out.written, ms=out.ms, staged=out.staged,
                                         worker_pid=out.pid, worker_deaths=item.deaths))

    def _worker_died(self, item: _Item, generation: int) -> None:
        if generation == self._generation and self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._generation += 1
        item.strikes += 1
        item.deaths += 1
        if item.strikes == 1:
            self._suspects += 1
        if item.strikes >= MAX_STRIKES:
            self._suspects -= 1
            self._finish(item, Failed("a worker process died on this scan (decoder crash or out of memory)",
                                       item.stage, False, True, item.ms, exc_type="WorkerDied"))
        else:
            self._queued.appendleft(item)

    def _finish(self, item: _Item, failed: Failed) -> None:
        ms = {**item.ms, **failed.ms}
        self._done.append(ScanResult(task=item.task, ms=ms, error=failed.message, stage=failed.stage,
                                     transient=failed.transient, crashed=failed.crashed,
                                     disk_full=failed.disk_full, exc_type=failed.exc_type,
                                     worker_deaths=item.deaths))

    def _infer(self) -> None:
        batch = [self._ready.popleft() for _ in range(min(self.batch_size, len(self._ready)))]
        images = [it.analysis for it in batch if it.analysis is not None]
        t0 = time.perf_counter()
        try:
            alphas: list[Alpha | BaseException] = list(self.matter.predict_batch(images))
        except Exception as exc:  # one scan's failure (or CUDA OOM on the batch) must not fail its neighbours
            alphas = [exc] if len(batch) == 1 else [self._predict_one(im) for im in images]
        per_scan = (time.perf_counter() - t0) * 1000.0 / len(batch)
        self.heap()  # after the timing: "matting" stays the models' time (bench's scans/s counts the trims)
        self.batches.append(len(batch))
        for item, alpha in zip(batch, alphas, strict=True):
            item.ms["matting"] = per_scan
            shape = item.analysis.shape[:2] if item.analysis is not None else None
            item.analysis = None  # the analysis copy is not needed any more; do not carry it
            if isinstance(alpha, BaseException):
                self._finish(item, as_failed(alpha, "matting", {}))
            elif alpha.shape != shape:
                self._finish(item, Failed(f"model returned alpha {alpha.shape}, expected {shape}", "matting",
                                           False, True, {}))
            else:
                item.alpha, item.stage = alpha, "finish"
                self._queued.append(item)

    def _predict_one(self, image: RGB8) -> Alpha | BaseException:
        try:
            return self.matter.predict(image)
        except Exception as exc:
            return exc
