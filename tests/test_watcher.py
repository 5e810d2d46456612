"""Real inotify and polling observers on real folders; mode choice; walking without following links."""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import make_layout

from bshm_watchd.config import WatchSpec
from bshm_watchd.watcher import FolderWatch, choose_mode, path_ignored, walk_files


def spec_for(tmp_path: Path, **kw: Any) -> WatchSpec:
    return make_layout(tmp_path, **kw).cfg().watch[0]


def drain_until(q: queue.Queue[Path], want: Path, timeout: float) -> list[Path]:
    """Events up to and including ``want``; fails after ``timeout`` seconds without it."""
    seen: list[Path] = []
    while True:
        try:
            p = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event for {want} within {timeout} s (saw {seen})") from None
        seen.append(p)
        if p == want:
            return seen


@pytest.fixture(params=["inotify", "poll"])
def watched(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[WatchSpec, queue.Queue[Path]]:
    spec = spec_for(tmp_path, mode=request.param)
    events: queue.Queue[Path] = queue.Queue()
    fw = FolderWatch(spec, lambda _s, p: events.put(p))
    fw.start()
    request.addfinalizer(fw.stop)
    assert fw.mode == request.param and fw.alive()
    return spec, events


class TestFolderWatch:
    def test_new_file_announced(self, watched: tuple[WatchSpec, queue.Queue[Path]]) -> None:
        """Creating a file in a sub-folder produces an event for it."""
        spec, events = watched
        (spec.input / "sub").mkdir()
        (spec.input / "sub" / "a.jpg").write_bytes(b"x")
        drain_until(events, spec.input / "sub" / "a.jpg", 5)

    def test_part_rename_announces_final_name_only(self, watched: tuple[WatchSpec, queue.Queue[Path]]) -> None:
        """``x.jpg.part`` is ignored; its rename to ``x.jpg`` is announced (battery 5)."""
        spec, events = watched
        part = spec.input / "x.jpg.part"
        part.write_bytes(b"x")
        os.rename(part, spec.input / "x.jpg")
        seen = drain_until(events, spec.input / "x.jpg", 5)
        assert part not in seen

    def test_folder_moved_in_announced(self, watched: tuple[WatchSpec, queue.Queue[Path]], tmp_path: Path) -> None:
        """A whole folder moved in is announced as a folder (its files get no events of their own)."""
        spec, events = watched
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "a.jpg").write_bytes(b"x")
        os.rename(staging, spec.input / "batch")
        drain_until(events, spec.input / "batch", 5)

    @pytest.mark.parametrize("mode", ["inotify", "poll"])
    def test_stop_ends_observer(self, mode: str, tmp_path: Path) -> None:
        """After stop() the watch reports itself dead (so the daemon restarts it)."""
        fw = FolderWatch(spec_for(tmp_path, mode=mode), lambda _s, p: None)
        fw.start()
        assert fw.alive()
        fw.stop()
        assert not fw.alive()


class TestChooseMode:
    def write_mounts(self, tmp_path: Path, fstype: str, point: str) -> Path:
        mounts = tmp_path / "mounts"
        mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/x {point} {fstype} rw 0 0\n", encoding="utf-8")
        return mounts

    @pytest.mark.parametrize(("fstype", "mode"), [("nfs4", "poll"), ("cifs", "poll"), ("smb3", "poll"),
                                                  ("fuse.sshfs", "poll"), ("ext4", "inotify")])
    def test_auto_by_filesystem(self, tmp_path: Path, fstype: str, mode: str) -> None:
        """``auto`` polls on network and FUSE filesystems, uses inotify elsewhere."""
        spec = spec_for(tmp_path, mode="auto")
        mounts = self.write_mounts(tmp_path, fstype, str(spec.input.parent))
        assert choose_mode(spec, mounts) == (mode, fstype)

    def test_explicit_mode_wins(self, tmp_path: Path) -> None:
        """An explicit mode is kept even on a share."""
        spec = spec_for(tmp_path, mode="inotify")
        assert choose_mode(spec, self.write_mounts(tmp_path, "nfs", str(spec.input)))[0] == "inotify"


class TestWalk:
    def test_ignores_and_does_not_follow_links(self, tmp_path: Path) -> None:
        """Ignored names and anything behind a symlinked folder are not walked."""
        spec = spec_for(tmp_path)
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "o.jpg").write_bytes(b"x")
        (spec.input / "linked").symlink_to(outside)
        for rel in ("a.jpg", "sub/b.jpg", ".hidden.jpg", "c.jpg.part", "@eaDir/t.jpg", "Thumbs.db", "~lock.jpg"):
            (spec.input / rel).parent.mkdir(parents=True, exist_ok=True)
            (spec.input / rel).write_bytes(b"x")
        got = {str(p.relative_to(spec.input)) for p in walk_files(spec)}
        assert got == {"a.jpg", "sub/b.jpg"}
        assert {str(p.relative_to(spec.input)) for p in walk_files(spec, spec.input / "sub")} == {"sub/b.jpg"}
        assert list(walk_files(spec, spec.input / "@eaDir")) == []

    def test_path_ignored_any_component(self) -> None:
        """A pattern matching any component hides the path."""
        pats = (".*", "@eaDir")
        assert path_ignored(Path("a/@eaDir/x.jpg"), pats)
        assert path_ignored(Path(".git/x.jpg"), pats)
        assert not path_ignored(Path("a/b/x.jpg"), pats)
