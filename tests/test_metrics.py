"""Metrics registry per instance, and /metrics + /healthz served over loopback HTTP."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from bshm_watchd.errors import BshmError, ConfigError
from bshm_watchd.metrics import SCAN_RESULTS, Metrics, MetricsServer, parse_listen

TIMEOUT = 5.0


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


class Health:
    """A health callback whose answer the test flips."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: tuple[bool, str] = (True, "ok")

    def set(self, ok: bool, reason: str) -> None:
        with self._lock:
            self.state = (ok, reason)

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            return self.state


@pytest.fixture
def served() -> Iterator[tuple[Metrics, Health, str]]:
    metrics, health = Metrics(), Health()
    server = MetricsServer(metrics.registry, health)
    host, port = server.start("127.0.0.1:0")
    yield metrics, health, f"http://{host}:{port}"
    server.stop()


class TestMetrics:
    def test_instances_have_separate_registries(self) -> None:
        """Two instances register the same names without clashing and count independently."""
        a, b = Metrics(), Metrics()
        a.scan_finished("scans", "quarantined")
        assert sample(a, "bshm_watchd_scans_total", watch="scans", result="quarantined") == 1.0
        assert sample(b, "bshm_watchd_scans_total", watch="scans", result="quarantined") is None

    def test_done_sets_last_success(self) -> None:
        """A done scan counts and stamps last_success; a quarantined one leaves the stamp alone."""
        m = Metrics()
        m.scan_finished("scans", "done", when=1_700_000_000.0)
        m.scan_finished("scans", "quarantined")
        assert sample(m, "bshm_watchd_scans_total", watch="scans", result="done") == 1.0
        assert sample(m, "bshm_watchd_last_success_timestamp_seconds", watch="scans") == 1_700_000_000.0

    def test_add_watches_creates_zero_series(self) -> None:
        """Every known result and the backlog exist at 0 for a new watch."""
        m = Metrics()
        m.add_watches(["a"])
        for result in SCAN_RESULTS:
            assert sample(m, "bshm_watchd_scans_total", watch="a", result=result) == 0.0
        assert sample(m, "bshm_watchd_backlog", watch="a") == 0.0
        m.set_backlog("a", 7)
        assert sample(m, "bshm_watchd_backlog", watch="a") == 7.0

    def test_stage_histogram(self) -> None:
        """observe_stage and time_stage (also on error) land in the stage histogram."""
        m = Metrics()
        m.observe_stage("decode", 0.2)
        with pytest.raises(ValueError), m.time_stage("decode"):
            raise ValueError("bad scan")
        assert sample(m, "bshm_watchd_stage_seconds_count", stage="decode") == 2.0
        assert sample(m, "bshm_watchd_stage_seconds_bucket", stage="decode", le="0.25") == 2.0

    def test_observe_from_worker_outcome(self) -> None:
        """observe() counts the result and files the outcome's total and per-stage times in seconds."""

        class Outcome:
            ms = 1500.0

        m = Metrics()
        m.observe("scans", "done", Outcome(), stage_ms={"decode": 40.0})
        m.observe("scans", "retry", None)
        assert sample(m, "bshm_watchd_scans_total", watch="scans", result="done") == 1.0
        assert sample(m, "bshm_watchd_scans_total", watch="scans", result="retry") == 1.0
        assert sample(m, "bshm_watchd_stage_seconds_sum", stage="total") == 1.5
        assert sample(m, "bshm_watchd_stage_seconds_sum", stage="decode") == 0.04

    def test_model_info(self) -> None:
        """set_model publishes model, device and version labels."""
        m = Metrics()
        m.set_model("fusion", "cuda:0")
        text = m.render().decode()
        assert 'bshm_watchd_model_info{device="cuda:0",model="fusion",version="' in text


class TestParseListen:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [("127.0.0.1:9753", ("127.0.0.1", 9753)), ("[::1]:0", ("::1", 0)), (":9753", ("", 9753))],
    )
    def test_valid(self, text: str, expected: tuple[str, int]) -> None:
        """host:port, bracketed IPv6 and an empty host parse."""
        assert parse_listen(text) == expected

    @pytest.mark.parametrize("text", ["9753", "localhost", "host:http", "::1:80", "h:70000"])
    def test_invalid(self, text: str) -> None:
        """A missing or non-numeric port, bare IPv6 or an out-of-range port is a ConfigError."""
        with pytest.raises(ConfigError):
            parse_listen(text)


class TestMetricsServer:
    def test_metrics_over_http(self, served: tuple[Metrics, Health, str]) -> None:
        """GET /metrics returns the text format with the instance's counters."""
        metrics, _, base = served
        metrics.scan_finished("scans", "done")
        code, ctype, body = get(base + "/metrics")
        assert code == 200
        assert ctype.startswith("text/plain")
        assert 'bshm_watchd_scans_total{result="done",watch="scans"} 1.0' in body

    def test_healthz_turns_503_with_reason(self, served: tuple[Metrics, Health, str]) -> None:
        """/healthz is 200 ok while healthy and 503 with a JSON reason when not."""
        _, health, base = served
        assert get(base + "/healthz")[::2] == (200, "ok\n")
        health.set(False, "worker w1 stuck on scan.tif for 700s")
        code, ctype, body = get(base + "/healthz")
        assert (code, ctype) == (503, "application/json")
        assert json.loads(body) == {"status": "unhealthy", "reason": "worker w1 stuck on scan.tif for 700s"}
        health.set(True, "ok")
        assert get(base + "/healthz")[0] == 200

    def test_raising_health_check_is_503(self) -> None:
        """A health callback that raises answers 503 and the server keeps serving."""

        def broken() -> tuple[bool, str]:
            raise RuntimeError("ledger locked")

        with MetricsServer(Metrics().registry, broken) as server:
            server.start("127.0.0.1:0")
            base = f"http://127.0.0.1:{server.port}"
            code, _, body = get(base + "/healthz")
            assert code == 503
            assert "ledger locked" in json.loads(body)["reason"]
            assert get(base + "/metrics")[0] == 200

    def test_unknown_path_is_404(self, served: tuple[Metrics, Health, str]) -> None:
        """Paths other than /metrics and /healthz are 404."""
        assert get(served[2] + "/admin")[0] == 404

    def test_stop_releases_the_port(self) -> None:
        """After stop() the port refuses connections, and stop() twice is harmless."""
        server = MetricsServer(Metrics().registry, lambda: (True, "ok"))
        _, port = server.start("127.0.0.1:0")
        server.stop()
        server.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

    def test_port_in_use_is_bshm_error(self) -> None:
        """Binding a port another socket holds raises BshmError naming the address."""
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        try:
            listen = f"127.0.0.1:{holder.getsockname()[1]}"
            with pytest.raises(BshmError, match=listen):
                MetricsServer(Metrics().registry, lambda: (True, "ok")).start(listen)
        finally:
            holder.close()

    def test_port_before_start_raises(self) -> None:
        """Asking for the port of a server not started is an error, not 0."""
        with pytest.raises(BshmError):
            _ = MetricsServer(Metrics().registry, lambda: (True, "ok")).port

    def test_ipv6_loopback(self) -> None:
        """A bracketed IPv6 listen address is served over AF_INET6."""
        if not socket.has_ipv6:
            pytest.skip("no IPv6 support in this Python")
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            pytest.skip("no IPv6 loopback on this host")
        with MetricsServer(Metrics().registry, lambda: (True, "ok")) as server:
            host, port = server.start("[::1]:0")
            assert host == "::1"
            assert get(f"http://[::1]:{port}/healthz")[0] == 200
