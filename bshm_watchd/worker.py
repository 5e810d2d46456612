"""Processing one settled scan under the ledger's rules: read once, hash, claim, matte, write, commit, dispose."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from bshm_watchd import PIPELINE_VERSION
from bshm_watchd.config import Config, WatchSpec
from bshm_watchd.disposal import move_file, quarantine
from bshm_watchd.engine.base import Matter
from bshm_watchd.errors import ScanError
from bshm_watchd.failpoints import failpoint
from bshm_watchd.ledger import Hint, Ledger
from bshm_watchd.pipeline import OutputPaths, ScanMeta, Timings, run_scan, write_outputs
from bshm_watchd.settle import open_nofollow

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WorkItem:
    watch: WatchSpec
    path: Path
    hint: Hint
    """The stat signature the settle gate saw as stable."""


@dataclass(frozen=True)
class Outcome:
    """``done`` | ``skipped`` | ``quarantined`` | ``retry`` | ``changed`` | ``gone``."""

    result: str
    reason: str = ""
    ms: float = 0.0


def pipeline_key(cfg: Config, watch: WatchSpec, matter_name: str) -> str:
    """Ledger key part: what would change the pixels (model, profile contents, code's pipeline version)."""
    profile = cfg.profile(watch.profile)
    return f"v{PIPELINE_VERSION}|{matter_name}|{watch.profile}|{hash_profile(profile.model_dump_json())}"


def hash_profile(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def output_base(watch: WatchSpec, rel: Path) -> Path:
    """The mirrored output base; confined to the output root whatever the file is called."""
    base = (watch.output / rel.parent / rel.stem)
    out_root = os.path.realpath(watch.output)
    if os.path.commonpath([out_root, os.path.realpath(base.parent)]) != out_root:
        raise ScanError(f"output path for {rel} escapes the output folder", stage="write")
    return base


def outputs_present(paths: list[str]) -> bool:
    return bool(paths) and all(os.path.isfile(p) for p in paths)


def read_stable(path: Path, expected: Hint) -> tuple[bytes, Hint] | None:
    """Read the whole file through one descriptor; None if it changed before or while we read it."""
    fd = open_nofollow(path)
    with os.fdopen(fd, "rb") as fh:
        before = os.fstat(fh.fileno())
        if not stat.S_ISREG(before.st_mode) or Hint.of(before) != expected:
            return None
        data = fh.read()
        after = os.fstat(fh.fileno())
    if Hint.of(after) != Hint.of(before) or len(data) != before.st_size:
        return None
    return data, Hint.of(after)


class ScanWorker:
    """Holds what one scan needs; ``handle`` never raises for a bad scan."""

    def __init__(self, cfg: Config, matter: Matter, ledger: Ledger,
                 hook: Callable[[str, WorkItem], None] | None = None) -> None:
        self.cfg = cfg
        self.matter = matter
        self.ledger = ledger
        self.hook = hook or (lambda stage, item: None)

    def already_done(self, watch: WatchSpec, path: Path, hint: Hint) -> bool:
        """Cheap pre-check for rescans: the latest row for this path is done, unchanged, outputs there."""
        rel = str(path.relative_to(watch.input))
        row = self.ledger.latest(watch.name, rel, pipeline_key(self.cfg, watch, self.matter.name))
        return row is not None and row.state == "done" and row.hint == hint and outputs_present(row.outputs)

    def handle(self, item: WorkItem) -> Outcome:
        watch, path = item.watch, item.path
        rel = path.relative_to(watch.input)
        jlog = log.bind(watch=watch.name, rel=str(rel))
        timings = Timings()
        try:
            got = read_stable(path, item.hint)
        except FileNotFoundError:
            jlog.info("scan_vanished")
            return Outcome("gone")
        except OSError as exc:
            jlog.warning("scan_unreadable", reason=exc.strerror)
            return Outcome("retry", f"cannot read: {exc.strerror}")
        if got is None:
            jlog.info("scan_changed_before_read")
            return Outcome("changed")
        data, hint = got
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        key = pipeline_key(self.cfg, watch, self.matter.name)
        existing = self.ledger.get(watch.name, str(rel), sha, key)
        if existing is not None and existing.state == "done":
            if outputs_present(existing.outputs):
                self.ledger.update_hint(existing.id, hint)
                self._dispose(watch, path, rel, hint, jlog)
                return Outcome("skipped", "already done")
            jlog.warning("outputs_missing_redo", outputs=existing.outputs)
            self.ledger.release(existing.id, "outputs missing", "verify")
        row = self.ledger.claim(watch.name, str(rel), sha, key, hint)
        if row is None:
            return Outcome("skipped", "claimed elsewhere")
        failpoint("claimed")
        self.hook("claimed", item)
        profile = self.cfg.profile(watch.profile)
        try:
            decoded, matte, timings = run_scan(data, path.name, self.matter, profile,
                                               max_pixels=self.cfg.max_pixels, timings=timings)
            failpoint("matted")
            # The source must still be what we hashed: an append after our read means a newer scan.
            try:
                now = Hint.of(os.lstat(path))
            except FileNotFoundError:
                now = None
            if now != hint:
                self.ledger.release(row.id, "source changed while processing", "verify")
                jlog.info("scan_changed_during_processing")
                return Outcome("changed")
            paths = OutputPaths.for_base(output_base(watch, rel))
            meta = ScanMeta(source=str(rel), sha256=sha, model=self.matter.name, profile=watch.profile)
            written = write_outputs(paths, decoded, matte, profile, meta, timings)
            failpoint("outputs_written")
        except ScanError as exc:
            return self._failed(item, rel, row.id, row.attempts, sha, exc, jlog)
        except MemoryError as exc:
            return self._failed(item, rel, row.id, row.attempts, sha,
                                ScanError(f"out of memory: {exc}", stage="matting", transient=True), jlog)
        except Exception as exc:  # a bug on one scan must not stop the service; quarantine with the reason
            jlog.exception("scan_crashed")
            err = ScanError(f"internal error {type(exc).__name__}: {exc}", stage="unknown")
            return self._failed(item, rel, row.id, row.attempts, sha, err, jlog, exc_type=type(exc).__name__)
        self.ledger.done(row.id, [str(p) for p in written])
        failpoint("committed")
        total = sum(timings.ms.values())
        jlog.info("scan_done", ms=timings.rounded(), total_ms=round(total, 1), sha256=sha[:16],
                  size=list(decoded.size), bit_depth=decoded.bit_depth)
        self._dispose(watch, path, rel, hint, jlog)
        return Outcome("done", ms=total)

    def _failed(self, item: WorkItem, rel: Path, row_id: int, attempts: int, sha: str, exc: ScanError,
                jlog: structlog.typing.FilteringBoundLogger, exc_type: str | None = None) -> Outcome:
        if exc.transient and attempts < item.watch.max_attempts:
            self.ledger.release(row_id, str(exc), exc.stage)
            jlog.warning("scan_retry", stage=exc.stage, reason=str(exc), attempt=attempts)
            return Outcome("retry", str(exc))
        self.ledger.failed(row_id, str(exc), exc.stage)
        self.quarantine(item, rel, str(exc), exc.stage, exc_type or type(exc).__name__, sha, jlog)
        return Outcome("quarantined", str(exc))

    def quarantine(self, item: WorkItem, rel: Path, reason: str, stage: str, exc_type: str, sha: str | None,
                   jlog: structlog.typing.FilteringBoundLogger) -> None:
        try:
            dest = quarantine(item.path, rel, item.watch.quarantine, reason=reason, stage=stage,
                              exc_type=exc_type, sha256=sha)
        except OSError as exc:
            jlog.error("quarantine_failed", reason=reason, error=exc.strerror or str(exc))
            return
        jlog.warning("scan_quarantined", stage=stage, reason=reason, dest=str(dest))

    def _dispose(self, watch: WatchSpec, path: Path, rel: Path, hint: Hint,
                 jlog: structlog.typing.FilteringBoundLogger) -> None:
        """The ``after_success`` action, only on the very file we processed (never a newer one)."""
        if watch.after_success == "keep":
            return
        try:
            if Hint.of(os.lstat(path)) != hint:
                jlog.info("dispose_skipped_changed")
                return
            if watch.after_success == "delete":
                os.unlink(path)
                jlog.info("source_deleted")
            elif watch.move_to is not None:
                dest = move_file(path, watch.move_to / rel)
                jlog.info("source_moved", dest=str(dest))
        except FileNotFoundError:
            return
        except OSError as exc:
            jlog.warning("dispose_failed", error=exc.strerror or str(exc))
            return
        failpoint("disposed")
