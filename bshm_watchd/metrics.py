"""Prometheus metrics in a per-instance registry, and a small HTTP server for /metrics and /healthz."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest
from structlog.typing import FilteringBoundLogger

from bshm_watchd import __version__
from bshm_watchd.errors import BshmError, ConfigError

HealthCheck = Callable[[], tuple[bool, str]]
"""Returns (healthy, reason); /healthz answers 200 "ok" or 503 with the reason."""

#: The worker's results (worker.Outcome), pre-created at 0 per watch so rate() works from the first scrape.
SCAN_RESULTS = ("done", "skipped", "quarantined", "retry", "changed", "gone")

#: Stage times range from milliseconds (a header check) to minutes (a 6000×9000 scan on a CPU).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ScanOutcome(Protocol):
    """What ``Metrics.observe`` reads from the worker's outcome."""

    @property
    def ms(self) -> float: ...


class Metrics:
    """The daemon's metrics, registered in their own ``CollectorRegistry`` (never the global one).

    Exposed names: ``bshm_watchd_scans_total{watch,result}``, ``bshm_watchd_stage_seconds{stage}``
    (histogram), ``bshm_watchd_backlog{watch}``, ``bshm_watchd_last_success_timestamp_seconds{watch}``,
    ``bshm_watchd_model_info{model,device,version}``. Label values must come from a small set
    (watch names, stage names, results) — never file names, which would explode the series count.
    """

    def __init__(self, *, namespace: str = "bshm_watchd") -> None:
        if not namespace.replace("_", "").isalnum():
            raise ValueError(f"namespace must be [A-Za-z0-9_], got {namespace!r}")
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.scans = Counter(
            "scans",
            "Scans finished, by watch and result.",
            ["watch", "result"],
            namespace=namespace,
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "stage_seconds",
            "Wall time per pipeline stage.",
            ["stage"],
            namespace=namespace,
            buckets=STAGE_BUCKETS,
            registry=reg,
        )
        self.backlog = Gauge(
            "backlog",
            "Scans detected but not finished, by watch.",
            ["watch"],
            namespace=namespace,
            registry=reg,
        )
        self.last_success = Gauge(
            "last_success_timestamp_seconds",
            "Unix time of the last scan finished with result=done, by watch.",
            ["watch"],
            namespace=namespace,
            registry=reg,
        )
        self.model = Info("model", "Model and device in use.", namespace=namespace, registry=reg)

    def add_watches(self, names: Iterable[str]) -> None:
        """Create the series of these watches at 0 (call at start-up and after a reload)."""
        for name in names:
            self.backlog.labels(watch=name).set(0)
            for result in SCAN_RESULTS:
                self.scans.labels(watch=name, result=result)

    def scan_finished(self, watch: str, result: str, *, when: float | None = None) -> None:
        """Count one scan; ``result == "done"`` also sets the last-success time (default: now)."""
        self.scans.labels(watch=watch, result=result).inc()
        if result == "done":
            self.last_success.labels(watch=watch).set(time.time() if when is None else when)

    def observe(
        self,
        watch: str,
        result: str,
        outcome: ScanOutcome | None = None,
        *,
        stage_ms: Mapping[str, float] | None = None,
    ) -> None:
        """One finished scan from the worker loop: counted; its total time (``outcome.ms``, when > 0)
        goes to ``stage="total"`` and each of ``stage_ms`` (pipeline ``Timings.ms``) to its stage."""
        self.scan_finished(watch, result)
        if outcome is not None and outcome.ms > 0:
            self.observe_stage("total", outcome.ms / 1000)
        for stage, ms in (stage_ms or {}).items():
            self.observe_stage(stage, ms / 1000)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage duration."""
        self.stage_seconds.labels(stage=stage).observe(seconds)

    @contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """Time a block (monotonic clock), also when it raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - start)

    def set_backlog(self, watch: str, count: int) -> None:
        """Scans waiting in ``watch``."""
        self.backlog.labels(watch=watch).set(count)

    def set_model(self, model: str, device: str, **extra: str) -> None:
        """Publish the model and device (and any extra labels) as ``bshm_watchd_model_info``."""
        self.model.info({"model": model, "device": device, "version": __version__, **extra})

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` / ``":port"`` (all interfaces) → (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"metrics.listen must be host:port, got {listen!r}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"metrics.listen port out of range: {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"metrics.listen: write IPv6 addresses in brackets, got {listen!r}")
    return host, port


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that connects and sends nothing must not hold a thread for ever.
    timeout = 10

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry), body)
        elif path == "/healthz":
            ok, reason = self._health()
            if ok:
                self._reply(200, "text/plain; charset=utf-8", b"ok\n", body)
            else:
                payload = json.dumps({"status": "unhealthy", "reason": reason}).encode() + b"\n"
                self._reply(503, "application/json", payload, body)
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found\n", body)

    def _health(self) -> tuple[bool, str]:
        try:
            ok, reason = self.server.health()
        except Exception as exc:  # a broken check must answer 503, not kill the request thread
            return False, f"health check raised {type(exc).__name__}: {exc}"
        return bool(ok), str(reason)

    def _reply(self, code: int, content_type: str, payload: bytes, body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        # The default writes free text to stderr; keep access lines out of the journal unless debugging.
        self.server.log.debug("metrics_http", client=self.client_address[0], request=format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        registry: CollectorRegistry,
        health: HealthCheck,
        log: FilteringBoundLogger,
    ) -> None:
        self.address_family = family  # read by TCPServer.__init__ to create the socket
        self.registry = registry
        self.health = health
        self.log = log
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup: under the unit's
        # IPAddressDeny=any (or on a host with a dead resolver) that stalls start-up for seconds.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` from a daemon thread."""

    def __init__(
        self, registry: CollectorRegistry, health: HealthCheck, *, log: FilteringBoundLogger | None = None
    ) -> None:
        if not callable(health):
            raise TypeError("health must be callable")
        self._registry = registry
        self._health = health
        self._log = log or structlog.get_logger(__name__)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, listen: str) -> tuple[str, int]:
        """Bind ``listen`` ("127.0.0.1:9753"; port 0 picks a free one) and serve; returns (host, port)."""
        if self._server is not None:
            raise BshmError("metrics server already started")
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            server = _Server((host, port), family, self._registry, self._health, self._log)
        except OSError as exc:
            raise BshmError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        bound_host, bound_port = server.server_address[:2]
        self._log.info("metrics_listening", host=str(bound_host), port=int(bound_port))
        return str(bound_host), int(bound_port)

    @property
    def port(self) -> int:
        """The bound port (useful after ``start("127.0.0.1:0")``)."""
        if self._server is None:
            raise BshmError("metrics server not started")
        return int(self._server.server_address[1])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
