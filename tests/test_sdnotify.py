"""sd_notify messages over real datagram sockets, watchdog parsing, and the progress-gated watchdog."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bshm_watchd.sdnotify import (
    Notifier,
    ProgressTracker,
    WatchdogGate,
    progress_ok,
    without_notify_env,
)

TIMEOUT = 5.0


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.sock.settimeout(TIMEOUT)

    def recv(self, timeout: float = TIMEOUT) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    # AF_UNIX paths are limited to 108 bytes: keep the name short.
    fake = FakeSystemd(str(tmp_path / "n.sock"))
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"@bshm-watchd-test-{uuid.uuid4().hex}")
    yield fake
    fake.close()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestNotifier:
    def test_ready_exact_message(self, systemd: FakeSystemd) -> None:
        """ready() sends exactly READY=1 to a path socket."""
        assert Notifier(systemd.env()).ready()
        assert systemd.recv() == "READY=1"

    def test_ready_with_status(self, systemd: FakeSystemd) -> None:
        """ready(status) appends a STATUS= line."""
        Notifier(systemd.env()).ready("watching 2 folders")
        assert systemd.recv() == "READY=1\nSTATUS=watching 2 folders"

    def test_abstract_socket(self, abstract_systemd: FakeSystemd) -> None:
        """An '@name' NOTIFY_SOCKET reaches the abstract-namespace socket."""
        Notifier(abstract_systemd.env()).stopping()
        assert abstract_systemd.recv() == "STOPPING=1"

    def test_reloading_sends_monotonic_usec(self, systemd: FakeSystemd) -> None:
        """reloading() sends RELOADING=1 and MONOTONIC_USEC from the injected clock in microseconds."""
        Notifier(systemd.env(), monotonic_ns=lambda: 123_456_789_999).reloading()
        assert systemd.recv() == "RELOADING=1\nMONOTONIC_USEC=123456789"

    def test_reloading_default_clock_is_clock_monotonic(self, systemd: FakeSystemd) -> None:
        """Without an injected clock MONOTONIC_USEC is CLOCK_MONOTONIC, the clock systemd compares with."""
        before = time.monotonic_ns() // 1000
        Notifier(systemd.env()).reloading()
        after = time.monotonic_ns() // 1000
        first, second = systemd.recv().split("\n")
        assert first == "RELOADING=1"
        key, value = second.split("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after

    def test_reload_sequence(self, systemd: FakeSystemd) -> None:
        """A reload is RELOADING=1 followed by READY=1, in that order."""
        n = Notifier(systemd.env(), monotonic_ns=lambda: 5_000)
        n.reloading()
        n.ready()
        assert [systemd.recv(), systemd.recv()] == ["RELOADING=1\nMONOTONIC_USEC=5", "READY=1"]

    def test_status_newlines_cannot_inject(self, systemd: FakeSystemd) -> None:
        """A newline in a status text cannot smuggle in a second assignment."""
        Notifier(systemd.env()).status("scan x\nREADY=1")
        assert systemd.recv() == "STATUS=scan x READY=1"

    def test_extend_timeout(self, systemd: FakeSystemd) -> None:
        """extend_timeout(seconds) sends EXTEND_TIMEOUT_USEC in microseconds."""
        Notifier(systemd.env()).extend_timeout(90)
        assert systemd.recv() == "EXTEND_TIMEOUT_USEC=90000000"

    def test_no_socket_is_noop(self) -> None:
        """Without NOTIFY_SOCKET every call returns False and nothing raises."""
        n = Notifier({})
        assert not n.enabled
        assert not any([n.ready("x"), n.reloading(), n.stopping(), n.status("x"), n.watchdog()])
        assert n.watchdog_interval() is None

    def test_unsupported_socket_disabled(self) -> None:
        """An address family we do not speak (vsock:) disables notifications with one warning."""
        with capture_logs() as logs:
            n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert not n.enabled
        assert [e["event"] for e in logs] == ["sd_notify_unsupported_socket"]

    def test_send_failure_never_raises_and_warns_once(self, tmp_path: Path) -> None:
        """A dead socket path makes sends return False; the first failure warns, later ones are debug."""
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
        with capture_logs() as logs:
            assert n.ready() is False
            assert n.status("still here") is False
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("sd_notify_failed", "warning"),
            ("sd_notify_failed", "debug"),
        ]

    def test_default_environ_is_os_environ(self, systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
        """Constructed without a mapping, the notifier reads os.environ."""
        monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
        Notifier().ready()
        assert systemd.recv() == "READY=1"

    def test_without_notify_env(self) -> None:
        """The child environment drops NOTIFY_SOCKET and WATCHDOG_* and keeps the rest."""
        env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "PATH": "/bin"}
        assert without_notify_env(env) == {"PATH": "/bin"}


class TestWatchdogEnv:
    def test_interval_is_half_of_watchdog_usec(self, systemd: FakeSystemd) -> None:
        """WATCHDOG_USEC=30s gives a 15 s ping interval."""
        n = Notifier(systemd.env(WATCHDOG_USEC="30000000"))
        assert n.watchdog_interval() == 15.0

    def test_matching_pid_pings(self, systemd: FakeSystemd) -> None:
        """WATCHDOG_PID equal to our pid enables WATCHDOG=1."""
        n = Notifier(systemd.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid())))
        assert n.watchdog_interval() == 1.0
        assert n.watchdog()
        assert systemd.recv() == "WATCHDOG=1"

    def test_pid_mismatch_disables_watchdog(self, systemd: FakeSystemd) -> None:
        """A WATCHDOG_PID naming another process means no watchdog pings from us, other messages still go."""
        n = Notifier(systemd.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid() + 1)))
        assert n.watchdog_interval() is None
        assert n.watchdog() is False
        n.status("marker")
        assert systemd.recv() == "STATUS=marker"  # the first datagram: no WATCHDOG=1 before it

    @pytest.mark.parametrize("value", ["0", "-5", "soon", ""])
    def test_bad_usec_disables_watchdog(self, systemd: FakeSystemd, value: str) -> None:
        """A zero, negative, non-numeric or empty WATCHDOG_USEC disables the watchdog."""
        assert Notifier(systemd.env(WATCHDOG_USEC=value)).watchdog_interval() is None

    def test_watchdog_needs_socket(self) -> None:
        """WATCHDOG_USEC without NOTIFY_SOCKET gives no interval."""
        assert Notifier({"WATCHDOG_USEC": "1000000"}).watchdog_interval() is None


class TestProgressTracker:
    def test_idle_is_ok(self) -> None:
        """No job in hand is healthy, however long it lasts."""
        clock = FakeClock()
        t = ProgressTracker(stuck_after=10, clock=clock)
        clock.now += 1e6
        assert t.check() == (True, "ok")

    def test_stalled_job_is_stuck(self) -> None:
        """A job silent past stuck_after makes check() fail and names the worker and job."""
        clock = FakeClock()
        t = ProgressTracker(stuck_after=10, clock=clock)
        t.started("w1", "scan_0042.tif")
        clock.now += 10
        assert t.check()[0]
        clock.now += 1
        ok, reason = t.check()
        assert not ok
        assert "w1" in reason and "scan_0042.tif" in reason

    def test_progress_resets_the_clock(self) -> None:
        """A heartbeat inside a long job keeps it healthy."""
        clock = FakeClock()
        t = ProgressTracker(stuck_after=10, clock=clock)
        t.started("w1")
        for _ in range(5):
            clock.now += 8
            t.progressed("w1")
        assert t.check()[0]

    def test_budget_overrides_stuck_after(self) -> None:
        """A per-job budget lets a known-long scan run past stuck_after."""
        clock = FakeClock()
        t = ProgressTracker(stuck_after=10, clock=clock)
        t.started("w1", "huge.tif", budget=100)
        clock.now += 50
        assert t.check()[0]
        clock.now += 51
        assert not t.check()[0]

    def test_job_context_finishes_on_error(self) -> None:
        """job() marks the worker idle even when the block raises."""
        clock = FakeClock()
        t = ProgressTracker(stuck_after=1, clock=clock)
        with pytest.raises(RuntimeError), t.job("w1", "bad.jpg"):
            raise RuntimeError("decode failed")
        clock.now += 100
        assert t.check()[0]

    def test_progress_ok_function(self) -> None:
        """progress_ok compares the later of busy_since/last_progress with the threshold."""
        assert progress_ok(100, busy_since=None, last_progress=None, stuck_after=1)
        assert progress_ok(100, busy_since=50, last_progress=95, stuck_after=10)
        assert not progress_ok(100, busy_since=50, last_progress=None, stuck_after=10)

    def test_rejects_bad_threshold(self) -> None:
        """stuck_after must be positive."""
        with pytest.raises(ValueError):
            ProgressTracker(stuck_after=0)


class TestWatchdogGate:
    def _gate(self, systemd: FakeSystemd, clock: FakeClock) -> WatchdogGate:
        n = Notifier(systemd.env(WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid())))
        return WatchdogGate(n, clock=clock)

    def test_pings_at_most_once_per_interval(self, systemd: FakeSystemd) -> None:
        """Calls inside one interval send one ping; the next ping goes once the interval has passed."""
        clock = FakeClock()
        gate = self._gate(systemd, clock)
        assert gate.interval == 5.0
        assert gate.maybe_ping(True)
        clock.now += 4.9
        assert not gate.maybe_ping(True)
        assert gate.seconds_until_due() == pytest.approx(0.1)
        clock.now += 0.1
        assert gate.maybe_ping(True)
        assert [systemd.recv(), systemd.recv()] == ["WATCHDOG=1", "WATCHDOG=1"]

    def test_stalled_progress_stops_pings(self, systemd: FakeSystemd) -> None:
        """When the tracker reports a wedged worker, no ping is sent until the worker recovers."""
        clock = FakeClock()
        gate = self._gate(systemd, clock)
        tracker = ProgressTracker(stuck_after=20, clock=clock)
        tracker.started("w1", "scan.tif")
        sent = []
        with capture_logs() as logs:
            for _ in range(10):  # 50 s of main-loop wake-ups, one per interval
                sent.append(gate.maybe_ping(tracker.check()[0]))
                clock.now += 5
            tracker.finished("w1")
            sent.append(gate.maybe_ping(tracker.check()[0]))
        # pings at t=0..20 (stuck only after 20 s), none at 25..45, one after recovery
        assert sent == [True] * 5 + [False] * 5 + [True]
        events = [e["event"] for e in logs]
        assert events.count("watchdog_withheld") == 1
        assert events.count("watchdog_resumed") == 1

    def test_disabled_gate(self) -> None:
        """Without a watchdog the gate never pings and has no due time."""
        gate = WatchdogGate(Notifier({}))
        assert not gate.enabled
        assert gate.seconds_until_due() is None
        assert gate.maybe_ping(True) is False

    def test_wedged_worker_under_real_time(self, systemd: FakeSystemd) -> None:
        """A loop feeding the gate pings every interval, then falls silent once a job wedges."""
        # WATCHDOG_USEC=0.2 s: interval 0.1 s; the job is stuck 0.3 s after it starts.
        n = Notifier(systemd.env(WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid())))
        gate = WatchdogGate(n)
        tracker = ProgressTracker(stuck_after=0.3)
        stop = threading.Event()

        def main_loop() -> None:
            while not stop.is_set():
                gate.maybe_ping(tracker.check()[0])
                stop.wait(min(gate.seconds_until_due() or 0.02, 0.02))

        tracker.started("w1", "wedged.tif")
        loop = threading.Thread(target=main_loop, daemon=True)
        loop.start()
        try:
            stamps = []
            while True:
                try:
                    assert systemd.recv(timeout=1.0) == "WATCHDOG=1"
                except TimeoutError:
                    break
                stamps.append(time.monotonic())
            assert not tracker.check()[0]
            # ~0.3 s of pings at 0.1 s spacing, then silence (the 1 s recv timeout above).
            assert 2 <= len(stamps) <= 6
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert all(g >= 0.09 for g in gaps)
            tracker.finished("w1")
            assert systemd.recv(timeout=TIMEOUT) == "WATCHDOG=1"
        finally:
            stop.set()
            loop.join(TIMEOUT)
