"""systemd notifications (the sd_notify datagram protocol) and a progress-gated watchdog."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import structlog
from structlog.typing import FilteringBoundLogger

#: Variables systemd passes to the main process; strip them from children's environments.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def without_notify_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` for a child process, without the notification variables."""
    return {k: v for k, v in environ.items() if k not in NOTIFY_ENV}


def _one_line(text: str) -> str:
    # Each line of a notification is one assignment: a newline in a status text would inject
    # a second one (e.g. a file name "x\nREADY=1").
    return text.replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends state changes to systemd over ``$NOTIFY_SOCKET``; every method is a no-op without it.

    Reload protocol: ``reloading()`` → re-read the config → ``ready()``, and ``ready()`` also when the
    new config is rejected (the old one stays), or systemd waits in "reloading" until it times out.
    Send failures never raise: the first is logged as a warning, later ones at debug level.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        log: FilteringBoundLogger | None = None,
        pid: int | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        send_timeout: float = 2.0,
    ) -> None:
        if send_timeout <= 0:
            raise ValueError(f"send_timeout must be > 0, got {send_timeout}")
        env = os.environ if environ is None else environ
        self._log = log or structlog.get_logger(__name__)
        self._monotonic_ns = monotonic_ns
        self._send_timeout = send_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed_once = False
        self._address = self._parse_socket(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = self._parse_watchdog(env, os.getpid() if pid is None else pid)

    def _parse_socket(self, value: str) -> bytes | None:
        if not value:
            return None
        if value.startswith("/"):
            return os.fsencode(value)
        if value.startswith("@") and len(value) > 1:
            # Linux abstract namespace: a leading NUL instead of the "@".
            return b"\0" + os.fsencode(value[1:])
        self._log.warning("sd_notify_unsupported_socket", notify_socket=value)
        return None

    def _parse_watchdog(self, env: Mapping[str, str], pid: int) -> int | None:
        raw = env.get("WATCHDOG_USEC", "")
        if not raw:
            return None
        try:
            usec = int(raw)
        except ValueError:
            usec = 0
        if usec <= 0:
            self._log.warning("sd_watchdog_bad_usec", watchdog_usec=raw)
            return None
        owner = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd watches; a child that inherited the variables must
        # not ping on the parent's behalf (it would hide a wedged parent).
        if owner and owner != str(pid):
            self._log.debug("sd_watchdog_other_pid", watchdog_pid=owner, pid=pid)
            return None
        return usec

    # ---- state -------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when a notification socket was given."""
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """True when systemd expects watchdog pings from this process."""
        return self._address is not None and self._watchdog_usec is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``), or None when no watchdog applies."""
        if not self.watchdog_enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # ---- messages ----------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up or reload finished: ``READY=1`` (plus ``STATUS=``)."""
        return self._send("READY=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """Reload begins: ``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd ≥ 253 requires the timestamp)."""
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={self._monotonic_ns() // 1000}", status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown begins: ``STOPPING=1``."""
        return self._send("STOPPING=1", status)

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status``."""
        return self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``; sent only when the watchdog applies to this process."""
        if not self.watchdog_enabled:
            return False
        return self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop/reload timeout fires (``EXTEND_TIMEOUT_USEC``)."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        return self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        """Close the socket; a later message opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: str, status: str | None = None) -> bool:
        if self._address is None:
            return False
        if status is not None:
            message = f"{message}\nSTATUS={_one_line(status)}"
        try:
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A full receive queue blocks a datagram send; bound it so a stalled systemd
                    # cannot stall the main loop.
                    sock.settimeout(self._send_timeout)
                    self._sock = sock
                # sendto, not connect: after `systemctl daemon-reexec` the socket path is bound anew.
                self._sock.sendto(message.encode("utf-8", "backslashreplace"), self._address)
        except OSError as exc:
            event = message.split("=", 1)[0]
            if self._failed_once:
                self._log.debug("sd_notify_failed", message=event, error=str(exc))
            else:
                self._failed_once = True
                self._log.warning("sd_notify_failed", message=event, error=str(exc))
            return False
        return True


# ---- progress tracking and the gate ---------------------------------------------------------


class WatchdogSink(Protocol):
    """What the gate needs from a notifier."""

    def watchdog(self) -> bool: ...

    def watchdog_interval(self) -> float | None: ...


def progress_ok(now: float, *, busy_since: float | None, last_progress: float | None, stuck_after: float) -> bool:
    """False when a job has been busy for more than ``stuck_after`` seconds without progress.

    An idle worker (``busy_since`` None) is always fine: idleness is not a wedge.
    """
    if busy_since is None:
        return True
    latest = busy_since if last_progress is None else max(busy_since, last_progress)
    return now - latest <= stuck_after


@dataclass(frozen=True)
class Busy:
    """One worker's current job."""

    worker: str
    what: str
    since: float
    last_progress: float
    budget: float


class ProgressTracker:
    """Thread-safe record of what each worker is doing, to tell a long job from a wedged one.

    Workers call ``started`` / ``progressed`` (per page, tile or stage) / ``finished``; the main loop
    asks ``check()`` and feeds the answer to ``WatchdogGate.maybe_ping``. A job is stuck when nothing
    was reported for longer than its budget (``stuck_after`` unless ``started`` gave one).
    """

    def __init__(self, *, stuck_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        if stuck_after <= 0:
            raise ValueError(f"stuck_after must be > 0, got {stuck_after}")
        self._stuck_after = stuck_after
        self._clock = clock
        self._lock = threading.Lock()
        self._busy: dict[str, Busy] = {}

    def started(self, worker: str, what: str = "", *, budget: float | None = None) -> None:
        """``worker`` begins a job; ``budget`` overrides ``stuck_after`` for a job known to be long."""
        if budget is not None and budget <= 0:
            raise ValueError(f"budget must be > 0, got {budget}")
        now = self._clock()
        with self._lock:
            self._busy[worker] = Busy(worker, what, now, now, budget or self._stuck_after)

    def progressed(self, worker: str) -> None:
        """``worker`` is still moving (a heartbeat from inside a long job)."""
        now = self._clock()
        with self._lock:
            job = self._busy.get(worker)
            if job is not None:
                self._busy[worker] = Busy(job.worker, job.what, job.since, now, job.budget)

    def finished(self, worker: str) -> None:
        """``worker`` is idle again (success or failure alike)."""
        with self._lock:
            self._busy.pop(worker, None)

    @contextmanager
    def job(self, worker: str, what: str = "", *, budget: float | None = None) -> Iterator[None]:
        """``started`` … ``finished`` around a block, also when it raises."""
        self.started(worker, what, budget=budget)
        try:
            yield
        finally:
            self.finished(worker)

    def stuck(self) -> list[Busy]:
        """The jobs past their budget, oldest first."""
        now = self._clock()
        with self._lock:
            jobs = list(self._busy.values())
        late = [
            j
            for j in jobs
            if not progress_ok(now, busy_since=j.since, last_progress=j.last_progress, stuck_after=j.budget)
        ]
        return sorted(late, key=lambda j: j.last_progress)

    def check(self) -> tuple[bool, str]:
        """(ok, reason): the shape of a health callback, and ``ok`` is what the gate wants."""
        late = self.stuck()
        if not late:
            return True, "ok"
        j = late[0]
        idle = self._clock() - j.last_progress
        return (
            False,
            f"worker {j.worker} stuck on {j.what or 'a job'} for {idle:.0f}s (budget {j.budget:.0f}s)",
        )


class WatchdogGate:
    """Pings the systemd watchdog at most once per interval, and only while progress is being made.

    Call ``maybe_ping(ok)`` from the main loop at least every ``seconds_until_due()`` seconds. When
    ``ok`` is False no ping is sent, so systemd kills and restarts the service one ``WatchdogSec``
    later; a wedged main loop never calls it at all, with the same result. ``ok`` must mean
    "workers are not wedged" — an idle daemon or an unavailable share is still ok.
    """

    def __init__(
        self,
        sink: WatchdogSink,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        if interval is not None and interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self._sink = sink
        self._interval = interval if interval is not None else sink.watchdog_interval()
        self._clock = clock
        self._log = log or structlog.get_logger(__name__)
        self._last_ping: float | None = None
        self._withheld = False

    @property
    def enabled(self) -> bool:
        """True when there is a watchdog to feed."""
        return self._interval is not None

    @property
    def interval(self) -> float | None:
        """Seconds between pings, None when disabled."""
        return self._interval

    def seconds_until_due(self) -> float | None:
        """How long the main loop may sleep before the next ``maybe_ping`` (None: no watchdog)."""
        if self._interval is None:
            return None
        if self._last_ping is None:
            return 0.0
        return max(0.0, self._last_ping + self._interval - self._clock())

    def maybe_ping(self, progress_ok: bool) -> bool:
        """Ping when due and ``progress_ok``; True when a ping was sent."""
        if self._interval is None:
            return False
        if not progress_ok:
            if not self._withheld:
                self._withheld = True
                self._log.warning("watchdog_withheld", reason="no progress")
            return False
        if self._withheld:
            self._withheld = False
            self._log.info("watchdog_resumed")
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self._interval:
            return False
        self._last_ping = now
        return self._sink.watchdog()
