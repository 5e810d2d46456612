"""The daemon's scans through the overlapped pipeline: worker processes, batched inference, outputs staged
by the workers and made visible only by the daemon's commit, and what a crash or a stop leaves behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from daemon_helpers import (
    DaemonProcess,
    Expect,
    FakeMatter,
    assert_oracle,
    done_rels,
    events,
    files_under,
    image_bytes,
    ledger_rows,
    make_layout,
    quarantined,
    running,
    sha,
    wait_for,
    write_config,
)

from bshm_watchd import daemon as daemon_mod
from bshm_watchd.failpoints import COUNT_DIR_ENV, ENV
from bshm_watchd.fsutil import TEMP_PREFIX, stage_bytes
from bshm_watchd.parallel import ScanPipeline
from bshm_watchd.worker import WorkItem


def temps_under(folder: Path) -> list[Path]:
    return [p for p in files_under(folder) if p.name.startswith(TEMP_PREFIX)]


def parent_of(pid: int) -> int | None:
    """The parent pid of a live process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class BatchRecorder(FakeMatter):
    """FakeMatter that declares a batch size and records the size of every batch it is given."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.batches: list[int] = []
        self.pids: set[int] = set()

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        self.batches.append(len(images))
        self.pids.add(os.getpid())
        return super().predict_batch(images)


class TestWorkerProcesses:
    def test_scans_are_written_by_pipeline_workers(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Each scan's outputs are written by a worker process, a child of the daemon, never by the daemon;
        inference stays in the daemon process; status.json reports the pool's size."""
        lay = make_layout(tmp_path, settle_seconds=0.2)
        matter = BatchRecorder(batch_size=1)
        names = [f"p{i}.jpg" for i in range(3)]
        parents: dict[int, int | None] = {}
        with running(lay, matter=matter) as d:
            for i, name in enumerate(names):
                (lay.inbox / name).write_bytes(image_bytes(500 + i))
            wait_for(lambda: done_rels(lay) == set(names), 30, "three scans done")
            for e in events(logs, "scan_done"):
                parents[e["worker_pid"]] = parent_of(e["worker_pid"])
            wait_for(lambda: (lay.state / "status.json").exists(), 10, "status.json")
            status = json.loads((lay.state / "status.json").read_text())
        done = events(logs, "scan_done")
        assert sorted(e["rel"] for e in done) == names
        assert all(e["worker_pid"] not in (0, os.getpid()) for e in done), done
        assert set(parents.values()) == {os.getpid()}, parents
        assert matter.pids == {os.getpid()}
        assert d.runner is not None and status["workers"] == d.runner.workers >= 1

    def test_worker_count_follows_config(self, tmp_path: Path) -> None:
        """``workers: 3`` in the config gives a pool of three worker processes."""
        lay = make_layout(tmp_path)
        doc_watch = {"name": "w", "input": str(lay.inbox), "output": str(lay.out), "quarantine": str(lay.failed),
                     "profile": "test", "settle_seconds": 0.2}
        write_config(lay, [doc_watch], workers=3)
        with running(lay) as d:
            assert d.runner is not None and d.runner.workers == 3


class TestBatching:
    def test_files_dropped_together_share_inference_batches(self, tmp_path: Path) -> None:
        """Eight files dropped at once reach a matter with batch_size 4 in batches, some larger than one."""
        lay = make_layout(tmp_path, settle_seconds=0.3)
        matter = BatchRecorder(batch_size=4)
        ex = Expect()
        for i in range(8):
            ex.add(f"b{i}.jpg", image_bytes(600 + i))
        with running(lay, matter=matter) as d:
            for rel, data in ex.originals.items():
                (lay.inbox / rel).write_bytes(data)
            wait_for(lambda: done_rels(lay) == ex.good, 40, "eight scans done")
            assert d.runner is not None and d.runner.pipeline.peak_inflight > 1
        assert sum(matter.batches) == 8, matter.batches
        assert max(matter.batches) > 1, matter.batches
        assert max(matter.batches) <= 4, matter.batches
        assert_oracle(lay, ex)


class TestStagedOutputs:
    def test_invisible_until_commit_and_dropped_when_source_changed(
        self, tmp_path: Path, logs: list[MutableMapping[str, Any]]
    ) -> None:
        """At the moment the daemon holds a finished result, its outputs exist only as private temps; a
        source changed by then gets no outputs for the stale content, and the new content is processed."""
        lay = make_layout(tmp_path, settle_seconds=0.2)
        first = image_bytes(700)
        final = first + b"\x00" * 64  # padding after EOI: a complete JPEG, but other content
        seen: list[tuple[list[str], list[int], list[str]]] = []

        def hook(stage: str, item: WorkItem) -> None:
            if stage == "staged" and item.path.stat().st_size == len(first):
                temps = temps_under(lay.out)
                finals = [p.name for p in files_under(lay.out) if not p.name.startswith(TEMP_PREFIX)]
                seen.append(([p.name for p in temps], [stat.S_IMODE(p.stat().st_mode) for p in temps], finals))
                with open(item.path, "ab") as fh:
                    fh.write(b"\x00" * 64)

        ex = Expect()
        ex.add("grow.jpg", final)
        with running(lay, hook=hook):
            (lay.inbox / "grow.jpg").write_bytes(first)
            wait_for(lambda: "grow.jpg" in done_rels(lay), 20, "grow.jpg done")
        assert len(seen) == 1
        temps, modes, finals = seen[0]
        assert finals == [], f"outputs visible before the commit: {finals}"
        assert len(temps) == 3, temps  # matte, cut-out and sidecar, staged
        assert set(modes) == {0o600}, modes
        states = {r["sha256"]: (r["state"], r["error"]) for r in ledger_rows(lay) if r["rel"] == "grow.jpg"}
        assert states == {sha(first): ("failed", "source changed while processing"), sha(final): ("done", None)}
        side = json.loads((lay.out / "grow.json").read_text(encoding="utf-8"))
        assert side["sha256"] == sha(final)
        assert len(events(logs, "scan_changed_during_processing")) == 1
        assert_oracle(lay, ex)

    def test_failed_commit_leaves_no_temp(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          logs: list[MutableMapping[str, Any]]) -> None:
        """A rename that fails with EIO at commit removes every staged temp and retries the scan."""
        lay = make_layout(tmp_path, settle_seconds=0.2, max_attempts=3)
        real_replace = os.replace
        refused: list[str] = []

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            if os.fspath(dst).endswith("_fg.png") and not refused:
                refused.append(os.fspath(dst))
                raise OSError(5, os.strerror(5), dst)
            real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "replace", replace)
        ex = Expect()
        ex.add("c.jpg", image_bytes(710))
        with running(lay, backoff=(0.1, 0.2, 0.3)):
            (lay.inbox / "c.jpg").write_bytes(ex.originals["c.jpg"])
            wait_for(lambda: "c.jpg" in done_rels(lay) or quarantined(lay), 20, "c.jpg done")
        assert refused
        assert [e["reason"] for e in events(logs, "scan_retry")] == [f"cannot write {refused[0]}: Input/output error"]
        assert_oracle(lay, ex)


class TestCrashLeftovers:
    def test_old_staged_temp_is_swept_at_start(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """A staged temp (named as the workers name them) older than the TTL, with no claim behind it, is
        removed when the daemon starts; a fresh one is left alone."""
        lay = make_layout(tmp_path)
        old = stage_bytes(lay.out / "sub" / "x_fg.png", b"stale")
        fresh = stage_bytes(lay.out / "y_fg.png", b"fresh")
        past = time.time() - 7200
        os.utime(old, (past, past))
        with running(lay, temp_ttl=3600):
            pass
        assert not old.exists()
        assert fresh.exists()
        assert [e["path"] for e in events(logs, "stale_temp_removed")] == [str(old)]

    def test_staged_temps_of_a_killed_daemon_removed_at_restart(self, tmp_path: Path, model_dir: Path) -> None:
        """SIGKILL between staging and commit (failpoint ``matted``) leaves staged temps and no outputs; the
        restart removes the temps at once and processes the scan exactly once."""
        lay = make_layout(tmp_path, settle_seconds=0.2)
        ex = Expect()
        ex.add("k.jpg", image_bytes(720))
        (lay.inbox / "k.jpg").write_bytes(ex.originals["k.jpg"])
        (tmp_path / "fp").mkdir()
        first = DaemonProcess(lay, {ENV: "matted@1", COUNT_DIR_ENV: str(tmp_path / "fp")}, tag="fp").start()
        assert first.wait_exit(60) == -signal.SIGKILL
        temps = temps_under(lay.out)
        assert len(temps) == 3, temps
        assert [p for p in files_under(lay.out) if not p.name.startswith(TEMP_PREFIX)] == []
        again = DaemonProcess(lay, tag="again").start()
        try:
            wait_for(lambda: done_rels(lay) == {"k.jpg"}, 30, "k.jpg done")
        finally:
            assert again.terminate(30) == 0
        removed = {e["path"] for e in again.events() if e.get("event") == "crash_temp_removed"}
        assert removed == {str(p) for p in temps}
        assert_oracle(lay, ex)


class TestWorkerCrash:
    def test_culprit_quarantined_daemon_survives(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 logs: list[MutableMapping[str, Any]]) -> None:
        """A scan whose worker process dies on every try (SIGKILL while staging) is quarantined with the
        reason; the daemon keeps running and the next scan is done."""
        lay = make_layout(tmp_path, settle_seconds=0.2)
        monkeypatch.setenv(ENV, "staged")  # fires in worker processes only: the daemon never stages
        ex = Expect()
        ex.add("crash.jpg", image_bytes(730), bad=True)
        with running(lay) as d:
            (lay.inbox / "crash.jpg").write_bytes(ex.originals["crash.jpg"])
            wait_for(lambda: quarantined(lay) == {"crash.jpg"}, 60, "the culprit quarantined")
            monkeypatch.delenv(ENV)  # the pool is rebuilt for the next scan, without the failpoint
            ex.add("fine.jpg", image_bytes(731))
            (lay.inbox / "fine.jpg").write_bytes(ex.originals["fine.jpg"])
            wait_for(lambda: "fine.jpg" in done_rels(lay), 60, "the next scan done")
            assert d.health()[0]
        info = json.loads((lay.failed / "crash.jpg.error.json").read_text(encoding="utf-8"))
        assert "worker process died" in info["reason"], info
        assert info["exception"] == "WorkerDied", info
        assert [e["rel"] for e in events(logs, "scan_crashed")] == ["crash.jpg"]
        assert_oracle(lay, ex)


    def test_worker_killed_once_leaves_no_temp(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                logs: list[MutableMapping[str, Any]]) -> None:
        """A worker killed once mid-staging: the scan is retried and done, and the temp the dead worker had
        staged (a name nobody was told) is removed."""
        lay = make_layout(tmp_path, settle_seconds=0.2)
        counts = tmp_path / "counts"
        counts.mkdir()
        monkeypatch.setenv(ENV, "staged@1")
        monkeypatch.setenv(COUNT_DIR_ENV, str(counts))
        ex = Expect()
        ex.add("once.jpg", image_bytes(735))
        with running(lay):
            (lay.inbox / "once.jpg").write_bytes(ex.originals["once.jpg"])
            wait_for(lambda: "once.jpg" in done_rels(lay) or quarantined(lay), 60, "once.jpg done")
        assert (counts / "failpoint-staged.count").read_text() != "0", "the failpoint never fired"
        assert events(logs, "scan_crashed") == []
        assert_oracle(lay, ex)


def big_png(path: Path, w: int, h: int) -> None:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.dstack([xx % 256, yy % 256, (xx + yy) % 256]).astype(np.uint8)
    assert cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])


class TestStop:
    def test_scan_in_flight_past_the_grace_is_rolled_back(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
    ) -> None:
        """A stop whose drain grace ends with a scan still in a worker: the worker is killed, the claim
        given back without counting an attempt, no output or temp left; the next start does it once."""
        monkeypatch.setattr(daemon_mod, "DRAIN_GRACE", 0.01)
        lay = make_layout(tmp_path, settle_seconds=0.2)
        staging = tmp_path / "big.png"
        big_png(staging, 5000, 4000)
        ex = Expect()
        ex.add("big.png", staging.read_bytes())
        with running(lay):
            staging.rename(lay.inbox / "big.png")
            wait_for(lambda: any(r["state"] == "claimed" for r in ledger_rows(lay)), 30, "the big scan claimed")
        [row] = ledger_rows(lay)
        assert (row["state"], row["error"], row["attempts"]) == ("failed", "daemon stopped before the scan finished", 0)
        assert [e["rel"] for e in events(logs, "scan_abandoned_at_stop")] == ["big.png"]
        assert files_under(lay.out) == []
        monkeypatch.setattr(daemon_mod, "DRAIN_GRACE", 20.0)
        with running(lay):
            wait_for(lambda: done_rels(lay) == {"big.png"}, 60, "big.png done after the restart")
        assert_oracle(lay, ex)


class TestPipelineLoop:
    def test_stop_lets_scans_in_flight_finish(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """A stop that comes while scans are in flight (asked for at the second claim) lets them finish and
        commit: no claim left, no temp, none abandoned; the unclaimed rest stays in the inbox."""
        lay = make_layout(tmp_path, settle_seconds=0.3)
        holder: list[threading.Event] = []
        claims: list[str] = []

        def hook(stage: str, item: WorkItem) -> None:
            if stage == "claimed":
                claims.append(item.path.name)
                if len(claims) == 2:
                    holder[0].set()

        names = [f"f{i}.jpg" for i in range(6)]
        with running(lay, hook=hook) as d:
            holder.append(d.stop)
            for i, name in enumerate(names):
                (lay.inbox / name).write_bytes(image_bytes(740 + i))
            wait_for(lambda: len(claims) >= 2, 30, "two scans claimed")
        assert [r for r in ledger_rows(lay) if r["state"] == "claimed"] == []
        assert temps_under(lay.out) == []
        assert events(logs, "scan_abandoned_at_stop") == []
        assert done_rels(lay) == set(claims)
        assert all((lay.inbox / name).is_file() for name in names)

    def test_pool_that_cannot_start_rolls_back_and_retries(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
    ) -> None:
        """Worker processes that cannot be started (EAGAIN) at the first scan: its claim is given back, the
        scan thread lives on, and the retry after the back-off does the scan."""
        real = ScanPipeline._pool_now
        refusals: list[int] = []

        def pool_now(self: ScanPipeline) -> Any:
            if len(refusals) < 2:  # the eager start at start-up, then the first scan's submission
                refusals.append(1)
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            return real(self)

        monkeypatch.setattr(ScanPipeline, "_pool_now", pool_now)
        lay = make_layout(tmp_path, settle_seconds=0.2)
        ex = Expect()
        ex.add("r.jpg", image_bytes(760))
        with running(lay, backoff=(0.2, 0.5)):
            (lay.inbox / "r.jpg").write_bytes(ex.originals["r.jpg"])
            wait_for(lambda: "r.jpg" in done_rels(lay) or quarantined(lay), 30, "r.jpg done")
        assert len(refusals) == 2
        assert len(events(logs, "workers_start_failed")) == 1
        assert len(events(logs, "scan_pipeline_failed")) == 1
        assert [e["rel"] for e in events(logs, "scan_rolled_back")] == ["r.jpg"]
        assert [r["attempts"] for r in ledger_rows(lay)] == [1]
        assert_oracle(lay, ex)


class TestReload:
    def test_reloaded_pixel_limit_reaches_the_pipeline(self, tmp_path: Path,
                                                       logs: list[MutableMapping[str, Any]]) -> None:
        """A reload that lowers max_pixels applies to the next scan (the pipeline outlives the reload)."""
        lay = make_layout(tmp_path, settle_seconds=0.2)
        watch = {"name": "w", "input": str(lay.inbox), "output": str(lay.out), "quarantine": str(lay.failed),
                 "profile": "test", "settle_seconds": 0.2}
        ex = Expect()
        ex.add("small.jpg", image_bytes(770, "JPEG", 900, 1000))
        ex.add("big.jpg", image_bytes(771, "JPEG", 1200, 1000), bad=True)
        with running(lay) as d:
            (lay.inbox / "small.jpg").write_bytes(ex.originals["small.jpg"])
            wait_for(lambda: "small.jpg" in done_rels(lay), 30, "small.jpg done")
            write_config(lay, [watch], max_pixels=1_000_000)
            d.request_reload()
            wait_for(lambda: events(logs, "config_reloaded"), 10, "the reload")
            (lay.inbox / "big.jpg").write_bytes(ex.originals["big.jpg"])
            wait_for(lambda: quarantined(lay) == {"big.jpg"}, 30, "big.jpg quarantined")
        info = json.loads((lay.failed / "big.jpg.error.json").read_text(encoding="utf-8"))
        assert info["stage"] == "decode" and ("too large" in info["reason"] or "exceeds" in info["reason"]), info
        assert_oracle(lay, ex)
