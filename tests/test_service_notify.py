"""The service contract with systemd: READY, a steady WATCHDOG, RELOADING, STOPPING — and no pings when wedged."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from daemon_helpers import DaemonProcess, FakeMatter, NotifySocket, image_bytes, make_layout, running, wait_for

from bshm_watchd.sdnotify import Notifier


class TestNotifyProtocol:
    def test_ready_watchdog_reload_stop(self, tmp_path: Path) -> None:
        """The issue's check: READY within 60 s, ≥ 3 WATCHDOG=1 at WATCHDOG_USEC=2 s, RELOADING, STOPPING, exit 0."""
        lay = make_layout(tmp_path)
        notify = NotifySocket(tmp_path / "notify.sock")
        proc = DaemonProcess(lay, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}).start()
        try:
            wait_for(lambda: "READY=1" in "\n".join(notify.messages), 60, "READY=1")
            n0 = notify.messages.count("WATCHDOG=1")
            wait_for(lambda: notify.messages.count("WATCHDOG=1") >= n0 + 3, 10, "three watchdog pings")
            proc.signal(signal.SIGHUP)
            wait_for(lambda: notify.states()[-1:] == ["READY"] and "RELOADING" in notify.states(), 20, "reload")
        finally:
            rc = proc.terminate(30)
            notify.close()
        assert rc == 0
        assert notify.states() == ["READY", "RELOADING", "READY", "STOPPING"]


class _Wedged(FakeMatter):
    """A model call that never returns until released: a wedged GPU driver, say."""

    def __init__(self, release: threading.Event, entered: threading.Event) -> None:
        super().__init__()
        self.release = release
        self.entered = entered

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self.entered.set()
        self.release.wait(60)
        out: npt.NDArray[Any] = np.zeros(rgb.shape[:2], np.float32)
        return out


class TestWedgedWorker:
    def test_pings_stop_while_worker_is_stuck(self, tmp_path: Path, monkeypatch: Any) -> None:
        """A scan stuck past the stuck threshold withholds WATCHDOG=1; pings resume once it moves again."""
        monkeypatch.setenv("BSHM_WATCHD_STUCK_SECONDS", "1")
        lay = make_layout(tmp_path, settle_seconds=0.1)
        notify = NotifySocket(tmp_path / "notify.sock")
        release, entered = threading.Event(), threading.Event()
        notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
        try:
            with running(lay, matter=_Wedged(release, entered), notifier=notifier) as daemon:
                wait_for(lambda: notify.messages.count("WATCHDOG=1") >= 2, 10, "pings while idle")
                (lay.inbox / "stuck.jpg").write_bytes(image_bytes(7))
                wait_for(entered.is_set, 20, "the scan to start")
                wait_for(lambda: not daemon.progress.check()[0], 10, "the worker judged stuck")
                n_stuck = notify.messages.count("WATCHDOG=1")
                wait_for(lambda: not daemon.health()[0], 5, "health to turn unhealthy")
                # Four intervals pass with no ping while the worker stays wedged.
                assert not release.wait(0.8)
                assert notify.messages.count("WATCHDOG=1") == n_stuck
                release.set()
                wait_for(lambda: notify.messages.count("WATCHDOG=1") > n_stuck, 10, "pings to resume")
        finally:
            release.set()
            notify.close()


class TestStopDuringBigScan:
    def test_sigterm_during_16bit_6000x9000(self, tmp_path: Path) -> None:
        """Battery 13: SIGTERM while a 6000×9000 16-bit TIFF is in hand → STOPPING, exit 0 within the unit's
        TimeoutStopSec (90 s), finished or rolled back, and not redone after a restart."""
        import time

        import cv2
        from daemon_helpers import done_rels, files_under, ledger_rows

        lay = make_layout(tmp_path, settle_seconds=0.2)
        yy, xx = np.mgrid[0:9000, 0:6000]
        big = np.dstack([(xx * 10) % 65536, (yy * 7) % 65536, ((xx + yy) * 3) % 65536]).astype(np.uint16)
        staging = tmp_path / "big.tif"
        assert cv2.imwrite(str(staging), big, [cv2.IMWRITE_TIFF_COMPRESSION, 5])  # LZW keeps it small
        del big, yy, xx
        notify = NotifySocket(tmp_path / "notify.sock")
        proc = DaemonProcess(lay, {"NOTIFY_SOCKET": str(notify.path)}).start()
        try:
            proc.wait_ready()
            staging.rename(lay.inbox / "big.tif")
            wait_for(lambda: any(r["state"] == "claimed" for r in ledger_rows(lay)), 60, "the big scan claimed")
            t0 = time.monotonic()
            rc = proc.terminate(90)
            stopped_in = time.monotonic() - t0
        finally:
            proc.kill()
            notify.close()
        assert rc == 0 and stopped_in < 90
        assert "STOPPING" in notify.states()
        finished = "big.tif" in done_rels(lay)
        outputs = sorted(p.name for p in files_under(lay.out) if p.suffix == ".png")
        assert outputs == (["big_fg.png", "big_matte.png"] if finished else []), outputs
        again = DaemonProcess(lay, tag="again").start()
        try:
            again.wait_ready()
            wait_for(lambda: "big.tif" in done_rels(lay), 120, "the scan done once")
            # A sentinel dropped after start-up is done only after the start-up rescan was handled, so a
            # finished big scan had its chance to be (wrongly) redone by then.
            (lay.inbox / "after.jpg").write_bytes(image_bytes(3))
            wait_for(lambda: "after.jpg" in done_rels(lay), 60, "the sentinel done")
        finally:
            assert again.terminate(90) == 0
        redone = [e.get("rel") for e in again.events() if e.get("event") == "scan_done"]
        assert redone.count("big.tif") == (0 if finished else 1), redone
