"""The worker-process side of :class:`bshm_watchd.parallel.ScanPipeline`: what crosses the process boundary
(module level, so it pickles) and the two stages a worker runs on one scan."""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import cv2

from bshm_watchd.config import Profile
from bshm_watchd.decode import decode_bytes, read_file
from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.errors import BshmError, ScanError
from bshm_watchd.fsutil import out_of_space
from bshm_watchd.pipeline import (
    OutputPaths,
    ScanMeta,
    Staged,
    Timings,
    analysis_image,
    bounded_copy,
    full_matte,
    write_outputs,
)
from bshm_watchd.refine import grey01


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Work:
    """One scan as a worker sees it (a ScanTask without the caller's handle)."""

    src: Path
    data: bytes | None
    out_base: Path
    profile: Profile
    profile_name: str
    source: str
    model: str
    max_pixels: int
    stage_outputs: bool = False
    temp_tag: str = ""


@dataclass(frozen=True)
class Prepared:
    analysis: RGB8
    size: tuple[int, int]
    ms: dict[str, float]


@dataclass(frozen=True)
class Finished:
    written: tuple[Path, ...]
    ms: dict[str, float]
    staged: tuple[tuple[Path, Path], ...] = ()
    pid: int = 0


@dataclass(frozen=True)
class Failed:
    """Exceptions are returned as values: ScanError's keyword-only arguments do not survive unpickling."""

    message: str
    stage: str
    transient: bool
    crashed: bool
    ms: dict[str, float]
    disk_full: bool = False
    exc_type: str = ""


def as_failed(exc: BaseException, stage: str, ms: dict[str, float]) -> Failed:
    kind = type(exc).__name__
    if isinstance(exc, ScanError):
        return Failed(str(exc), exc.stage, exc.transient, False, ms, exc_type=kind)
    if isinstance(exc, BshmError):
        return Failed(str(exc), stage, False, False, ms, exc_type=kind)
    if isinstance(exc, MemoryError):  # worth another try later, when fewer big scans share the memory
        return Failed(f"out of memory: {exc}", stage, True, False, ms, exc_type=kind)
    return Failed(f"internal error {kind}: {exc}", stage, False, True, ms, exc_type=kind)


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies, however it dies.

    Without it a SIGKILLed daemon leaves its workers behind, blocked on the task queue for ever or,
    worse, still writing a scan's temps after the restart swept that scan's leftovers.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the prctl took hold
        os._exit(1)


def init_worker(nice: int, parent: int = 0) -> None:
    if parent:
        _die_with_parent(parent)
    # One core per worker: OpenCV's own thread pool in every worker would oversubscribe the cores
    # the pool already fills, and steal them from inference.
    cv2.setNumThreads(1)
    # Ctrl-C reaches the whole process group; the main process shuts the pool down in order, and a
    # traceback from every worker would bury the one line that matters.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)


def ping() -> int:
    return os.getpid()


def prepare_stage(work: Work) -> Prepared | Failed:
    """Worker: read, decode, and the bounded analysis copy the model will see."""
    t = Timings()
    try:
        with t.stage("read"):
            data = work.data if work.data is not None else read_file(work.src)
        with t.stage("decode"):
            decoded = decode_bytes(data, work.src.name, work.max_pixels)
        with t.stage("analysis"):
            analysis = analysis_image(bounded_copy(decoded, work.profile.matting.max_side), work.profile)
    except Exception as exc:  # a decoder bug on one file must come back as that file's failure
        return as_failed(exc, "decode", t.ms)
    return Prepared(analysis=analysis, size=decoded.size, ms=t.ms)


def finish_stage(work: Work, alpha: Alpha, size: tuple[int, int], ms: dict[str, float]) -> Finished | Failed:
    """Worker: decode again, bring the matte to full size, write the outputs (sidecar timings included)."""
    t = Timings(ms=dict(ms))
    need = 0
    staged = Staged(tag=work.temp_tag) if work.stage_outputs else None
    try:
        with t.stage("redecode"):
            data = work.data if work.data is not None else read_file(work.src)
            decoded = decode_bytes(data, work.src.name, work.max_pixels)
        if decoded.size != size:
            raise ScanError(f"{work.src.name} changed while it was processed", stage="decode", transient=True)
        need = 3 * decoded.rgb.nbytes  # ≥ cut-out + matte + composite, uncompressed
        with t.stage("refine"):
            guide = grey01(bounded_copy(decoded, work.profile.matting.max_side))
        matte = full_matte(decoded, guide, alpha, work.profile, t)
        sha = hashlib.sha256(data).hexdigest() if work.profile.outputs.sidecar else None
        meta = ScanMeta(source=work.source, sha256=sha, model=work.model, profile=work.profile_name)
        written = write_outputs(OutputPaths.for_base(work.out_base), decoded, matte, work.profile, meta, t,
                                staged)
    except Exception as exc:
        out = as_failed(exc, "write", t.ms)
        if out.stage == "write" and out_of_space(exc, work.out_base.parent, need):
            out = replace(out, disk_full=True)
        return out
    pairs = tuple((p, staged.files[p]) for p in written) if staged is not None else ()
    return Finished(written=tuple(written), ms=t.ms, staged=pairs, pid=os.getpid())
