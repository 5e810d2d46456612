"""Watching one folder: a watchdog observer (inotify or polling) plus full rescans as a safety net."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from bshm_watchd.config import WatchSpec

log = structlog.get_logger(__name__)

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
              "davfs", "sshfs", "virtiofs", "vboxsf", "prl_fs", "vmhgfs")


def mount_fstype(path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> str | None:
    """The filesystem type of the mount holding ``path`` (longest matching mount point)."""
    try:
        lines = mounts_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        under = target == point or target.startswith(point.rstrip("/") + "/") or point == "/"
        if under and (best is None or len(point) > best[0]):
            best = (len(point), parts[2])
    return best[1] if best else None


def choose_mode(spec: WatchSpec, mounts_file: Path = Path("/proc/self/mounts")) -> tuple[str, str | None]:
    """(``inotify`` | ``poll``, fstype): inotify never sees writes made by another host on a share."""
    fstype = mount_fstype(spec.input, mounts_file)
    if spec.mode != "auto":
        return spec.mode, fstype
    networked = fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse"))
    return ("poll" if networked else "inotify"), fstype


def folder_identity(folder: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a folder that is there and listable; None for a renamed-away or chmod-000 one.

    The identity tells a folder replaced under the same name (a share remounted) from the one an
    inotify observer is still attached to.
    """
    try:
        st = os.stat(folder)
    except OSError:
        return None
    if not os.path.isdir(folder) or not os.access(folder, os.R_OK | os.X_OK):
        return None
    return st.st_dev, st.st_ino


def path_ignored(rel: Path, patterns: tuple[str, ...]) -> bool:
    """Any component matching an ignore pattern hides the path (``@eaDir/x.jpg``, ``.git/...``)."""
    return any(fnmatch.fnmatchcase(part, pat) for part in rel.parts for pat in patterns)


def walk_files(spec: WatchSpec, start: Path | None = None) -> Iterator[Path]:
    """Every candidate file under the watch's input, or under ``start`` inside it (a folder that was just
    created or moved in); no symlinks followed, ignored names skipped."""
    root = spec.input if start is None else start
    if start is not None:
        try:
            rel = start.relative_to(spec.input)
        except ValueError:
            return
        if path_ignored(rel, spec.ignore) or (rel.parts and not spec.recursive):
            return

    def onerror(exc: OSError) -> None:
        log.warning("rescan_unreadable", watch=spec.name, path=str(exc.filename), reason=exc.strerror)

    for dirpath, dirs, files in os.walk(root, followlinks=False, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatchcase(d, p) for p in spec.ignore))
        if not spec.recursive:
            dirs[:] = []
        for name in sorted(files):
            if not any(fnmatch.fnmatchcase(name, p) for p in spec.ignore):
                yield Path(dirpath) / name


class _Handler(FileSystemEventHandler):
    def __init__(self, spec: WatchSpec, sink: Callable[[WatchSpec, Path], None]) -> None:
        self.spec = spec
        self.sink = sink

    def _offer(self, raw: Any) -> None:
        path = Path(os.fsdecode(raw))
        try:
            rel = path.relative_to(self.spec.input)
        except ValueError:
            return
        if not path_ignored(rel, self.spec.ignore):
            self.sink(self.spec, path)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                # A folder moved in whole brings files no per-file event announces.
                self._offer(event.dest_path or event.src_path)
            return
        if event.event_type in ("created", "modified", "closed"):
            self._offer(event.src_path)
        elif event.event_type == "moved":
            self._offer(event.dest_path)


class FolderWatch:
    """One observer for one watch entry; restartable when it dies."""

    def __init__(self, spec: WatchSpec, sink: Callable[[WatchSpec, Path], None],
                 mounts_file: Path = Path("/proc/self/mounts")) -> None:
        self.spec = spec
        self.sink = sink
        self.mode, self.fstype = choose_mode(spec, mounts_file)
        self._observer: Any = None

    def start(self) -> None:
        try:
            obs = self._start(self.mode)
        except OSError as exc:
            if self.mode == "poll":
                raise
            # inotify watch/instance limits (ENOSPC, EMFILE) on huge trees: polling still works.
            log.warning("inotify_failed_polling", watch=self.spec.name, reason=exc.strerror or str(exc))
            self.mode = "poll"
            obs = self._start("poll")
        self._observer = obs
        log.info("watch_started", watch=self.spec.name, input=str(self.spec.input), mode=self.mode,
                 fstype=self.fstype, requested=self.spec.mode)

    def _start(self, mode: str) -> Any:
        obs: Any = PollingObserver(timeout=self.spec.poll_seconds) if mode == "poll" else Observer()
        obs.schedule(_Handler(self.spec, self.sink), str(self.spec.input), recursive=self.spec.recursive)
        obs.daemon = True
        obs.start()
        return obs

    def alive(self) -> bool:
        """The observer thread *and* its emitters run (an emitter can die alone, on a vanished share)."""
        obs = self._observer
        if obs is None or not obs.is_alive():
            return False
        return all(e.is_alive() for e in getattr(obs, "emitters", ()))

    def stop(self) -> None:
        obs = self._observer
        self._observer = None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=5)
            except Exception as exc:  # an observer on a vanished share can fail to stop cleanly
                log.warning("watch_stop_failed", watch=self.spec.name, error=str(exc))
