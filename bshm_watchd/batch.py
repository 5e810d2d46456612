"""``bshm-watchd process``: files or folders in, mirrored cut-outs and mattes out; one bad file never stops it."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import structlog

from bshm_watchd.config import Config, Profile
from bshm_watchd.decode import read_file
from bshm_watchd.engine.base import Matter
from bshm_watchd.errors import BshmError, ConfigError, ScanError
from bshm_watchd.fsutil import sha256_file
from bshm_watchd.pipeline import OutputPaths, ScanMeta, Timings, run_scan, write_outputs

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".webp"})


@dataclass(frozen=True)
class Job:
    src: Path
    rel: Path
    """Path of the source relative to its input root; the output mirrors it."""


@dataclass
class BatchSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return f"done {self.done}, failed {self.failed}, skipped {self.skipped} in {self.seconds:.1f} s"


def _inside(child: Path, parent: Path) -> bool:
    c, p = child.resolve(), parent.resolve()
    return c == p or p in c.parents


def collect(inputs: Iterable[Path], out_dir: Path, ignore: Iterable[str] = ()) -> tuple[list[Job], int]:
    """Jobs for every image under ``inputs`` (folders recursively); returns (jobs, skipped non-images).

    Refuses an output folder inside (or equal to) an input folder: other tools corrupted originals so.
    """
    from fnmatch import fnmatchcase

    patterns = tuple(ignore)
    jobs: list[Job] = []
    skipped = 0
    for inp in inputs:
        if not inp.exists():
            raise ConfigError(f"{inp}: no such file or folder")
        if inp.is_dir():
            if _inside(out_dir, inp):
                raise ConfigError(f"output folder {out_dir} is inside the input folder {inp}; refusing to write "
                                  "into the input tree")
            for root, dirs, files in os.walk(inp, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not any(fnmatchcase(d, p) for p in patterns))
                for name in sorted(files):
                    path = Path(root) / name
                    if any(fnmatchcase(name, p) for p in patterns):
                        continue
                    if path.is_symlink() or path.suffix.lower() not in IMAGE_SUFFIXES:
                        skipped += 1
                        continue
                    jobs.append(Job(src=path, rel=path.relative_to(inp)))
        else:
            if _inside(out_dir, inp.parent) and out_dir.resolve() == inp.parent.resolve():
                raise ConfigError(f"output folder {out_dir} is the input file's own folder; refusing to write "
                                  "into the input tree")
            jobs.append(Job(src=inp, rel=Path(inp.name)))
    return jobs, skipped


def output_bases(jobs: list[Job], out_dir: Path) -> dict[Job, Path]:
    """``out_dir/rel_parent/stem``; scans that share a stem in one folder get ``stem_ext`` instead (then
    ``stem_ext_2`` ...). Names are compared case-folded: on a case-insensitive share ``a.jpg`` and ``a.JPG``
    would otherwise overwrite each other's outputs."""

    def key(p: Path) -> str:
        return str(p).casefold()

    plain = {job: out_dir / job.rel.parent / job.rel.stem for job in jobs}
    counts = Counter(key(p) for p in plain.values())
    bases = {job: base for job, base in plain.items() if counts[key(base)] == 1}
    taken = {key(p) for p in bases.values()}
    for job, base in plain.items():
        if job in bases:
            continue
        first = base.with_name(f"{job.rel.stem}_{job.rel.suffix.lstrip('.').lower()}")
        cand, n = first, 2
        while key(cand) in taken:
            cand, n = first.with_name(f"{first.name}_{n}"), n + 1
        taken.add(key(cand))
        bases[job] = cand
    return {job: bases[job] for job in jobs}


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.on = stream.isatty() and total > 0

    def update(self, n: int, name: str) -> None:
        if not self.on:
            return
        width = 30
        filled = round(width * n / self.total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {n}/{self.total} {name[:40]:<40}")
        self.stream.flush()

    def close(self) -> None:
        if self.on:
            self.stream.write("\n")


def process_one(job: Job, base: Path, matter: Matter, profile: Profile, profile_name: str, cfg: Config) -> Timings:
    """Run one scan and write its outputs; raises ScanError on a bad scan."""
    timings = Timings()
    with timings.stage("read"):
        data = read_file(job.src)
    decoded, matte, timings = run_scan(data, job.src.name, matter, profile, max_pixels=cfg.max_pixels,
                                       timings=timings)
    sha = sha256_file(job.src) if profile.outputs.sidecar else None
    meta = ScanMeta(source=str(job.rel), sha256=sha, model=matter.name, profile=profile_name)
    write_outputs(OutputPaths.for_base(base), decoded, matte, profile, meta, timings)
    return timings


def run_batch(
    inputs: list[Path],
    out_dir: Path,
    matter: Matter,
    cfg: Config,
    profile_name: str,
    *,
    err: TextIO | None = None,
    workers: int | None = None,
) -> BatchSummary:
    """Process every scan under ``inputs``; several scans go through the overlapped :class:`ScanPipeline`
    (``workers``, default ``cfg.workers``; 0 = one per core), a single scan runs in this process."""
    stream = err or sys.stderr
    profile = cfg.profile(profile_name)
    t0 = time.monotonic()
    jobs, skipped = collect(inputs, out_dir)
    bases = output_bases(jobs, out_dir)
    summary = BatchSummary(skipped=skipped)
    bar = Progress(len(jobs), stream)
    if len(jobs) > 1:
        _run_parallel(jobs, bases, matter, cfg, profile, profile_name, summary, bar, stream,
                      cfg.workers if workers is None else workers)
    else:
        _run_sequential(jobs, bases, matter, cfg, profile, profile_name, summary, bar, stream)
    bar.update(len(jobs), "")
    bar.close()
    summary.seconds = time.monotonic() - t0
    return summary


def _report_failure(job: Job, reason: str, stage: str, summary: BatchSummary, bar: Progress, stream: TextIO) -> None:
    summary.failed += 1
    if bar.on:
        stream.write("\n")
    stream.write(f"FAILED {job.src}: {reason}\n")
    log.warning("scan_failed", src=str(job.src), stage=stage, reason=reason)


def _run_sequential(
    jobs: list[Job], bases: dict[Job, Path], matter: Matter, cfg: Config, profile: Profile, profile_name: str,
    summary: BatchSummary, bar: Progress, stream: TextIO,
) -> None:
    for i, job in enumerate(jobs, 1):
        bar.update(i - 1, job.rel.name)
        try:
            timings = process_one(job, bases[job], matter, profile, profile_name, cfg)
        except BshmError as exc:
            _report_failure(job, str(exc), exc.stage if isinstance(exc, ScanError) else "setup", summary, bar, stream)
            continue
        except Exception as exc:  # a decoder or runtime bug on one file must not stop the batch
            _report_failure(job, f"internal error {type(exc).__name__}: {exc}", "internal", summary, bar, stream)
            log.exception("scan_crashed", src=str(job.src))
            continue
        summary.done += 1
        log.info("scan_done", src=str(job.src), ms=timings.rounded())


def _run_parallel(
    jobs: list[Job], bases: dict[Job, Path], matter: Matter, cfg: Config, profile: Profile, profile_name: str,
    summary: BatchSummary, bar: Progress, stream: TextIO, workers: int,
) -> None:
    from bshm_watchd.parallel import ScanPipeline, ScanTask

    tasks = (ScanTask(src=job.src, out_base=bases[job], profile=profile, profile_name=profile_name,
                      source=str(job.rel), tag=job) for job in jobs)
    n = 0
    with ScanPipeline(matter, max_pixels=cfg.max_pixels, workers=workers) as pipe:
        for result in pipe.run(tasks):
            n += 1
            bar.update(n, result.task.src.name)
            job = result.task.tag
            if result.ok:
                summary.done += 1
                log.info("scan_done", src=str(job.src), ms={k: round(v, 1) for k, v in result.ms.items()})
            else:
                reason = result.error or "failed"
                if result.crashed and not reason.startswith("internal error"):
                    reason = f"internal error: {reason}"
                _report_failure(job, reason, result.stage or "internal", summary, bar, stream)
