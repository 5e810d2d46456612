"""One settled scan under the ledger's rules: read once, hash, claim (``begin``); the pipeline mattes and
stages the outputs; check the source, commit, dispose (``end``) — both halves in the daemon process."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bshm_watchd import PIPELINE_VERSION
from bshm_watchd.config import Config, WatchSpec
from bshm_watchd.disposal import move_file, quarantine
from bshm_watchd.engine.base import Matter
from bshm_watchd.errors import ScanError
from bshm_watchd.failpoints import failpoint
from bshm_watchd.fsutil import TEMP_PREFIX, commit_staged, discard_staged, discard_tagged, out_of_space
from bshm_watchd.ledger import Hint, Ledger, Row
from bshm_watchd.parallel import ScanResult, ScanTask
from bshm_watchd.settle import REFUSE_ERRNOS, open_beneath

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WorkItem:
    watch: WatchSpec
    path: Path
    hint: Hint
    """The stat signature the settle gate saw as stable."""


@dataclass(frozen=True)
class Outcome:
    """``done`` | ``skipped`` | ``quarantined`` | ``retry`` | ``changed`` | ``gone`` | ``refused``."""

    result: str
    reason: str = ""
    ms: float = 0.0
    hold: bool = False
    """Leave the file alone until it changes (refused, or done but not disposed of): no retry loop."""
    stages: dict[str, float] = field(default_factory=dict)
    """Milliseconds per pipeline stage, for a finished scan."""


@dataclass
class Claimed:
    """A scan read, hashed and claimed by :meth:`ScanWorker.begin`; ``task`` goes through the pipeline."""

    item: WorkItem
    rel: Path
    row_id: int
    attempts: int
    sha: str
    hint: Hint
    """The stat signature of what was read and hashed: the source must still have it at commit."""
    base: Path
    task: ScanTask | None = None

    @property
    def temp_tag(self) -> str:
        """In the names of this claim's staged temps (one claim of a row is in flight at a time)."""
        return f"r{self.row_id}-"


def pipeline_key(cfg: Config, watch: WatchSpec, matter_name: str) -> str:
    """Ledger key part: what would change the pixels (model, profile contents, code's pipeline version)."""
    profile = cfg.profile(watch.profile)
    return f"v{PIPELINE_VERSION}|{matter_name}|{watch.profile}|{hash_profile(profile.model_dump_json())}"


def hash_profile(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


NAME_MAX = 255
LONGEST_SUFFIX = len("_composite.png") + 1 + 8
"""The longest thing appended to a stem (an output suffix after a ``_ext`` disambiguation)."""


def safe_stem(stem: str) -> str:
    """``stem``, shortened (with a hash of the whole) when an output name would pass NAME_MAX bytes."""
    raw = os.fsencode(stem)
    if len(raw) + LONGEST_SUFFIX <= NAME_MAX:
        return stem
    digest = hashlib.sha256(raw).hexdigest()[:12]
    # Cut bytes, not characters: surrogateescape turns a split UTF-8 sequence into escapes, never an error.
    return os.fsdecode(raw[: NAME_MAX - LONGEST_SUFFIX - 13]) + "~" + digest


def output_base(watch: WatchSpec, rel: Path, *, taken: Callable[[Path], bool] = lambda base: False) -> Path:
    """The mirrored output base; confined to the output root whatever the file is called.

    ``taken(base)`` says another scan's results already live there (``a.jpg`` after ``a.png``): then
    ``stem_ext`` is used, as ``process`` does for stems that collide in one batch.
    """
    if rel.is_absolute() or ".." in rel.parts:
        raise ScanError(f"output path for {rel} escapes the output folder", stage="write")
    base = watch.output / rel.parent / safe_stem(rel.stem)
    if taken(base):
        base = base.with_name(safe_stem(rel.stem) + "_" + rel.suffix.lstrip(".").lower()[:8])
    out_root = os.path.realpath(watch.output)
    if os.path.commonpath([out_root, os.path.realpath(base.parent)]) != out_root:
        raise ScanError(f"output path for {rel} escapes the output folder", stage="write")
    return base


def outputs_present(paths: list[str]) -> bool:
    return bool(paths) and all(os.path.isfile(p) for p in paths)


def read_stable(root: Path, path: Path, expected: Hint) -> tuple[bytes, Hint] | None:
    """Read the whole file through one descriptor; None if it changed before or while we read it.

    The descriptor comes from :func:`open_beneath`: no symlink below the watch root is followed.
    """
    fd = open_beneath(root, path)
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
    """The daemon's half of a scan, around the pipeline: ``begin`` and ``end`` never raise for a bad scan.

    ``hook(stage, item)`` is called at ``start``, ``claimed`` and ``staged`` (the result is back, the
    outputs are temps, the source is not re-checked yet): a seam for tests.
    """

    def __init__(self, cfg: Config, matter: Matter, ledger: Ledger,
                 hook: Callable[[str, WorkItem], None] | None = None) -> None:
        self.cfg = cfg
        self.matter = matter
        self.ledger = ledger
        self.hook = hook or (lambda stage, item: None)
        # Pipeline keys per profile name, for the config they were computed from: a rescan asks for
        # one per file, and serialising + hashing the profile each time is wasted work on big inboxes.
        self._keys: dict[str, str] = {}
        self._keys_cfg: Config | None = None
        self._bases: dict[tuple[str, Path], str] = {}
        """Output bases of the scans in flight (watch, base) → rel: the ledger knows only finished ones,
        and ``a.jpg`` and ``a.png`` in flight together must not both write ``a_fg.png``."""

    def _key(self, watch: WatchSpec) -> str:
        if self._keys_cfg is not self.cfg:  # a reload swaps cfg: start over
            self._keys, self._keys_cfg = {}, self.cfg
        key = self._keys.get(watch.profile)
        if key is None:
            key = self._keys[watch.profile] = pipeline_key(self.cfg, watch, self.matter.name)
        return key

    def already_done(self, watch: WatchSpec, path: Path, hint: Hint) -> bool:
        """Cheap pre-check for rescans: the latest row for this path is done, unchanged, outputs there.

        With ``after_success`` delete or move, a done file still in the inbox means a crash came
        between commit and disposal: it is not "already done" until it has been disposed of.
        """
        if watch.after_success != "keep":
            return False
        rel = str(path.relative_to(watch.input))
        row = self.ledger.latest(watch.name, rel, self._key(watch))
        return row is not None and row.state == "done" and row.hint == hint and outputs_present(row.outputs)

    def begin(self, item: WorkItem) -> Outcome | Claimed:
        """Read, hash, skip what is done, claim, name the outputs: the scan to hand to the pipeline, or
        the outcome already (gone, changed, skipped, refused, an output path that escapes)."""
        watch, path = item.watch, item.path
        rel = path.relative_to(watch.input)
        jlog = log.bind(watch=watch.name, rel=str(rel))
        self.hook("start", item)
        try:
            got = read_stable(watch.input, path, item.hint)
        except FileNotFoundError:
            jlog.info("scan_vanished")
            return Outcome("gone")
        except OSError as exc:
            if exc.errno in REFUSE_ERRNOS:
                # A symlink somewhere in the path, no permission, a FIFO: retrying cannot help.
                jlog.warning("scan_refused", reason=exc.strerror or str(exc))
                return Outcome("refused", f"cannot read: {exc.strerror}", hold=True)
            jlog.warning("scan_unreadable", reason=exc.strerror or str(exc), errno=errno.errorcode.get(exc.errno or 0))
            return Outcome("retry", f"cannot read: {exc.strerror}")
        if got is None:
            jlog.info("scan_changed_before_read")
            return Outcome("changed")
        data, hint = got
        sha = hashlib.sha256(data).hexdigest()
        key = self._key(watch)
        existing = self.ledger.get(watch.name, str(rel), sha, key)
        if existing is not None and existing.state == "done":
            if outputs_present(existing.outputs):
                self.ledger.update_hint(existing.id, hint)
                disposed = self._dispose(watch, path, rel, hint, jlog)
                return Outcome("skipped", "already done", hold=not disposed)
            jlog.warning("outputs_missing_redo", outputs=existing.outputs)
            self.ledger.release(existing.id, "outputs missing", "verify")
        row = self.ledger.claim(watch.name, str(rel), sha, key, hint)
        if row is None:
            return Outcome("skipped", "claimed elsewhere")
        failpoint("claimed")
        self.hook("claimed", item)
        try:
            base = output_base(watch, rel, taken=lambda b: self._base_taken(watch.name, b, str(rel)))
        except ScanError as exc:
            return self._failed(item, rel, row.id, row.attempts, sha, exc, jlog)
        self._bases[(watch.name, base)] = str(rel)
        job = Claimed(item=item, rel=rel, row_id=row.id, attempts=row.attempts, sha=sha, hint=hint, base=base)
        job.task = ScanTask(src=path, out_base=base, profile=self.cfg.profile(watch.profile),
                            profile_name=watch.profile, source=str(rel), data=data, tag=job, stage_outputs=True,
                            temp_tag=job.temp_tag)
        return job

    def end(self, job: Claimed, result: ScanResult) -> Outcome:
        """Judge the pipeline's result in this process: a failure's verdict, or — the source unchanged —
        the staged outputs renamed into place, the ledger row done, the source disposed of.

        Whatever happens, no staged temp outlives this call except by a crash (then the restart sweeps it).
        """
        left = [tmp for _, tmp in result.staged]
        if result.worker_deaths:
            # A worker that died holding this scan told nobody its temps' names; the tag finds them.
            discard_tagged(job.base.parent, job.temp_tag, keep=left)
        try:
            return self._end(job, result, left)
        finally:
            discard_staged(left)
            self.forget(job)

    def forget(self, job: Claimed) -> None:
        """The scan is out of flight (ended or abandoned): its output base is free to others again."""
        self._bases.pop((job.item.watch.name, job.base), None)

    def _base_taken(self, watch: str, base: Path, rel: str) -> bool:
        other = self._bases.get((watch, base))
        return (other is not None and other != rel) or self.ledger.base_taken(watch, str(base), rel)

    def _end(self, job: Claimed, result: ScanResult, left: list[Path]) -> Outcome:
        item, rel, watch = job.item, job.rel, job.item.watch
        jlog = log.bind(watch=watch.name, rel=str(rel))
        if not result.ok:
            exc = ScanError(result.error or "failed", stage=result.stage or "unknown", transient=result.transient)
            if result.disk_full:
                return self._disk_full(job, exc, jlog)
            if result.crashed:
                jlog.error("scan_crashed", stage=exc.stage, reason=str(exc))
            return self._failed(item, rel, job.row_id, job.attempts, job.sha, exc, jlog,
                                exc_type=result.exc_type or None)
        failpoint("matted")
        self.hook("staged", item)
        # The source must still be what we hashed: an append after our read means a newer scan.
        try:
            now = Hint.of(os.lstat(item.path))
        except FileNotFoundError:
            now = None
        if now != job.hint:
            discard_staged(left)  # before the release: a crash in between leaves no temp without a claim
            left.clear()
            self.ledger.release(job.row_id, "source changed while processing", "verify")
            jlog.info("scan_changed_during_processing")
            return Outcome("changed")
        t0 = time.perf_counter()
        for final, tmp in result.staged:
            try:
                commit_staged(tmp, final)
            except OSError as err:
                discard_staged(left)
                left.clear()
                exc = ScanError(f"cannot write {final}: {err.strerror or err}", stage="write", transient=True)
                exc.__cause__ = err
                if out_of_space(exc, watch.output, 0):
                    return self._disk_full(job, exc, jlog)
                return self._failed(item, rel, job.row_id, job.attempts, job.sha, exc, jlog)
            left.remove(tmp)
        failpoint("outputs_written")
        self.ledger.done(job.row_id, [str(p) for p in result.written], base=str(job.base))
        failpoint("committed")
        stages = {k: round(v, 1) for k, v in {**result.ms, "commit": (time.perf_counter() - t0) * 1000}.items()}
        total = sum(result.ms.values())
        jlog.info("scan_done", ms=stages, total_ms=round(total, 1), sha256=job.sha[:16],
                  worker_pid=result.worker_pid)
        disposed = self._dispose(watch, item.path, rel, job.hint, jlog)
        return Outcome("done", ms=total, hold=not disposed, stages=stages)

    def _disk_full(self, job: Claimed, exc: ScanError, jlog: structlog.typing.FilteringBoundLogger) -> Outcome:
        # A full output disk is the site's fault, not the scan's: give the claim back and retry after the
        # back-off for as long as it lasts, without counting an attempt. Counted (or, with cv2's bare
        # False, taken for a bad image) it quarantined good scans (battery 27).
        self.ledger.release(job.row_id, f"output disk full: {exc}", exc.stage, counts=False)
        jlog.error("scan_paused_disk_full", reason=str(exc), output=str(job.item.watch.output))
        return Outcome("retry", f"output disk full: {exc}")

    def _failed(self, item: WorkItem, rel: Path, row_id: int, attempts: int, sha: str, exc: ScanError,
                jlog: structlog.typing.FilteringBoundLogger, exc_type: str | None = None) -> Outcome:
        if exc.transient and attempts < item.watch.max_attempts:
            self.ledger.release(row_id, str(exc), exc.stage)
            jlog.warning("scan_retry", stage=exc.stage, reason=str(exc), attempt=attempts)
            return Outcome("retry", str(exc))
        self.ledger.failed(row_id, str(exc), exc.stage)
        moved = self.quarantine(item, rel, str(exc), exc.stage, exc_type or type(exc).__name__, sha, jlog)
        return Outcome("quarantined", str(exc), hold=not moved)

    def quarantine(self, item: WorkItem, rel: Path, reason: str, stage: str, exc_type: str, sha: str | None,
                   jlog: structlog.typing.FilteringBoundLogger) -> bool:
        """Move the scan to the quarantine with its reason; False (logged) when it cannot be moved."""
        try:
            dest = quarantine(item.path, rel, item.watch.quarantine, reason=reason, stage=stage,
                              exc_type=exc_type, sha256=sha)
        except OSError as exc:
            jlog.error("quarantine_failed", reason=reason, error=exc.strerror or str(exc))
            return False
        jlog.warning("scan_quarantined", stage=stage, reason=reason, dest=str(dest))
        return True

    def _dispose(self, watch: WatchSpec, path: Path, rel: Path, hint: Hint,
                 jlog: structlog.typing.FilteringBoundLogger) -> bool:
        """The ``after_success`` action, only on the very file we processed (never a newer one).

        False when the file should have gone but could not (read-only share, ...): the daemon then
        leaves it alone until it changes, instead of retrying — and warning — forever.
        """
        if watch.after_success == "keep":
            return True
        try:
            if Hint.of(os.lstat(path)) != hint:
                jlog.info("dispose_skipped_changed")
                return True
            if watch.after_success == "delete":
                os.unlink(path)
                jlog.info("source_deleted")
            elif watch.move_to is not None:
                dest = move_file(path, watch.move_to / rel)
                jlog.info("source_moved", dest=str(dest))
        except FileNotFoundError:
            return True
        except OSError as exc:
            jlog.warning("dispose_failed", error=exc.strerror or str(exc))
            return False
        failpoint("disposed")
        return True


# ---- leftovers of a crash --------------------------------------------------------------------
def sweep_temps(roots: list[Path], ttl: float) -> None:
    """Remove our own temp files older than ``ttl`` under ``roots`` (a crash between write and rename)."""
    cutoff = time.time() - ttl
    for root in roots:
        for dirpath, _dirs, files in os.walk(root, followlinks=False):
            for name in files:
                p = Path(dirpath) / name
                try:
                    if name.startswith(TEMP_PREFIX) and p.lstat().st_mtime < cutoff:
                        p.unlink()
                        log.info("stale_temp_removed", path=str(p))
                except OSError:
                    continue


def remove_crash_temps(cfg: Config, stale: list[Row]) -> None:
    """Remove the temp outputs a killed run left beside the scans it had claimed.

    A temp in the output folder of a claim whose owner died, written after that claim, is that
    run's half-written output: it goes now rather than after the TTL, so a crash leaves no stray
    ``.png`` among the results (the TTL sweep still covers everything else).
    """
    specs = {w.name: w for w in cfg.watch}
    for row in stale:
        spec = specs.get(row.watch)
        if spec is not None:
            remove_temps_since(spec, Path(row.rel), row.updated_at)


def remove_temps_since(spec: WatchSpec, rel: Path, since: float) -> None:
    """Remove our temps in the output folder of ``rel`` written since ``since`` (ledger time, less a
    second for coarse mtimes): that scan's staged or half-written outputs, when it was claimed then."""
    try:
        folder = output_base(spec, rel).parent
        names = os.listdir(folder)
    except (OSError, ScanError):
        return
    for name in names:
        p = folder / name
        try:
            if name.startswith(TEMP_PREFIX) and p.lstat().st_mtime >= since - 1.0:
                p.unlink()
                log.info("crash_temp_removed", path=str(p), rel=str(rel))
        except OSError:
            continue
