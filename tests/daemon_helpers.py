"""Daemon test kit: a fake Matter (the GPU boundary), scan makers, configs, runners and the oracle.

The oracle is RELIABILITY.md's, checked after every fault test: each input is in exactly one of
inbox / done (with its outputs) / quarantine; every ledger row marked done has decodable outputs
whose source hash matches; no partial file under a final name; ``PRAGMA integrity_check`` is ok.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml
from PIL import Image

from bshm_watchd.config import Config, load_config
from bshm_watchd.daemon import Daemon
from bshm_watchd.fsutil import TEMP_PREFIX
from bshm_watchd.worker import WorkItem

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_PROFILE = {"matting": {"max_side": 256, "refine": False}, "outputs": {"sidecar": True}}
"""Small and quick, with a sidecar so the oracle can match each output to its source hash."""


# ---- the GPU boundary ------------------------------------------------------------------------
class FakeMatter:
    """Deterministic stand-in for a model: a centre-weighted blob scaled by the image's brightness."""

    name = "fake"

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        h, w = rgb.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        d = ((yy - h / 2) / (h / 2 + 1e-6)) ** 2 + ((xx - w / 2) / (w / 2 + 1e-6)) ** 2
        scale = 0.5 + float(rgb.mean()) / 510.0
        alpha: npt.NDArray[Any] = np.clip((1.2 - d) * scale, 0.0, 1.0).astype(np.float32)
        return alpha

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [self.predict(i) for i in images]


# ---- scans -----------------------------------------------------------------------------------
def pixels(seed: int, w: int = 160, h: int = 120) -> npt.NDArray[np.uint8]:
    """Gradients plus noise: no two seeds alike, and JPEG-compressible to a few tens of KB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.dstack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 3 + y * 7 + seed * 31) % 256]).astype(np.int32)
    img += rng.integers(-40, 41, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_bytes(seed: int, fmt: str = "JPEG", w: int = 160, h: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(seed, w, h)).save(buf, fmt)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_in_parts(path: Path, data: bytes, parts: int, pause: float) -> None:
    """A slow scanner: opens, appends and closes the file ``parts`` times, pausing in between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cuts = [len(data) * i // parts for i in range(parts + 1)]
    for i in range(parts):
        with open(path, "ab") as fh:
            fh.write(data[cuts[i]:cuts[i + 1]])
        if i < parts - 1:
            time.sleep(pause)  # the fault being injected (a paused writer), not synchronisation


def write_via_part(path: Path, data: bytes) -> None:
    """A scanner that writes ``name.part`` and renames it when done."""
    part = path.with_name(path.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    os.rename(part, path)


def start_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


# ---- waiting ---------------------------------------------------------------------------------
def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---- configs ---------------------------------------------------------------------------------
@dataclass
class Layout:
    """One watch's folders under a test's tmp_path, and the config file that names them."""

    root: Path
    config: Path
    inbox: Path
    out: Path
    failed: Path
    state: Path
    done_dir: Path

    @property
    def ledger(self) -> Path:
        return self.state / "ledger.sqlite3"

    def cfg(self) -> Config:
        return load_config(self.config)


def make_layout(root: Path, *, model: str = "fake", profile: str = "test", **watch: Any) -> Layout:
    """Folders plus a config with one watch named ``w``; ``watch`` overrides the watch's keys."""
    lay = Layout(root=root, config=root / "config.yaml", inbox=root / "inbox", out=root / "out",
                 failed=root / "failed", state=root / "state", done_dir=root / "done")
    lay.inbox.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"name": "w", "input": str(lay.inbox), "output": str(lay.out),
                            "quarantine": str(lay.failed), "profile": profile, "mode": "inotify",
                            "poll_seconds": 0.2, "settle_seconds": 0.4, "incomplete_seconds": 30,
                            "rescan_seconds": 3600, "after_success": "keep"}
    spec.update(watch)
    write_config(lay, [spec], model=model)
    return lay


def write_config(lay: Layout, watches: list[dict[str, Any]], *, model: str = "fake", **top: Any) -> None:
    # "fake" is not a model name the config accepts: in-process runs pass FakeMatter and the config
    # says selfie (what the subprocess runs use), so both read the same file.
    doc: dict[str, Any] = {"state_dir": str(lay.state), "model": "selfie" if model == "fake" else model,
                           "min_free_mb": 0, "profiles": {"test": TEST_PROFILE}, "watch": watches, **top}
    lay.config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


# ---- running the daemon ----------------------------------------------------------------------
@contextmanager
def running(lay: Layout, *, hook: Callable[[str, WorkItem], None] | None = None, matter: Any = None,
            **kw: Any) -> Iterator[Daemon]:
    """The daemon in a thread with FakeMatter; stopped (and required to stop cleanly) on exit."""
    stop = threading.Event()
    daemon = Daemon(lay.cfg(), matter=matter or FakeMatter(), stop=stop, hook=hook,
                    backoff=kw.pop("backoff", (0.2, 0.5, 1.0)), **kw)
    rc: list[int] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            rc.append(daemon.run())
        except BaseException as exc:  # surface start-up failures in the test, not in a dead thread
            errors.append(exc)

    thread = start_thread(main)
    wait_for(lambda: daemon.ready.is_set() or errors, 20, "the daemon to start")
    if errors:
        raise errors[0]
    try:
        yield daemon
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "daemon did not stop within 30 s"
        assert rc == [0], f"daemon exit {rc} {errors}"


class DaemonProcess:
    """``python -m bshm_watchd run -c CONFIG`` as a child; its JSON log lines are kept in a file."""

    def __init__(self, lay: Layout, env: Mapping[str, str] | None = None, tag: str = "run",
                 log_level: str = "info") -> None:
        self.lay = lay
        self.argv = [sys.executable, "-m", "bshm_watchd", "--log-level", log_level, "run", "-c", str(lay.config)]
        self.env = {**os.environ, **(env or {})}
        self.log_path = lay.root / f"daemon-{tag}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.has_event("daemon_ready") or self.exited(), timeout, "daemon_ready")
        assert not self.exited(), f"daemon exited at start-up: {self.log_path.read_text()[-2000:]}"

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and the exit status; fails if it takes longer than ``timeout``."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)


# ---- reading the results ---------------------------------------------------------------------
def _rel(blob: bytes | str) -> str:
    return blob if isinstance(blob, str) else bytes(blob).decode("utf-8", "surrogateescape")


def ledger_rows(lay: Layout) -> list[dict[str, Any]]:
    if not lay.ledger.exists():
        return []
    db = sqlite3.connect(f"file:{lay.ledger}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM scans ORDER BY id")]
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []  # the daemon created the file a moment ago and has not written the schema yet
    finally:
        db.close()
    for r in rows:
        r["rel"] = _rel(r["rel"])
        r["outputs"] = json.loads(r["outputs"] or "[]")
    return rows


def done_rels(lay: Layout) -> set[str]:
    return {r["rel"] for r in ledger_rows(lay) if r["state"] == "done"}


def files_under(folder: Path) -> list[Path]:
    return sorted(Path(d) / n for d, _, names in os.walk(folder) for n in names) if folder.exists() else []


def quarantined(lay: Layout) -> set[str]:
    """Relative paths of quarantined scans (those with their ``.error.json`` beside them)."""
    return {str(p.relative_to(lay.failed)) for p in files_under(lay.failed)
            if not p.name.endswith(".error.json") and p.with_name(p.name + ".error.json").exists()}


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception:
        return False
    return True


@dataclass
class Expect:
    """What a test wrote: final bytes per relative path, and which ones must end in the quarantine."""

    originals: dict[str, bytes] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)

    def add(self, rel: str, data: bytes, *, bad: bool = False) -> None:
        self.originals[rel] = data
        if bad:
            self.bad.add(rel)

    @property
    def good(self) -> set[str]:
        return set(self.originals) - self.bad


def assert_oracle(lay: Layout, expect: Expect, *, allow_temps: bool = False) -> None:
    """RELIABILITY.md's oracle, for one watch ``w`` of ``lay``."""
    cfg = lay.cfg()
    spec = cfg.watch[0]
    rows = ledger_rows(lay)
    done = {r["rel"]: r for r in rows if r["state"] == "done"}
    # Each input in exactly one place.
    for rel, data in expect.originals.items():
        in_inbox = (lay.inbox / rel).exists()
        in_q = (lay.failed / rel).exists()
        if rel in expect.bad:
            assert not in_inbox and in_q, f"{rel}: bad scan not (only) in the quarantine"
            assert (lay.failed / rel).read_bytes() == data, f"{rel}: quarantined copy differs from the original"
            info = json.loads((lay.failed / (rel + ".error.json")).read_text(encoding="utf-8"))
            assert info["reason"] and info["stage"], info
            assert rel not in done, f"{rel}: quarantined yet done"
            continue
        assert not in_q, f"{rel}: good scan in the quarantine"
        assert rel in done, f"{rel}: not done (states: {[r['state'] for r in rows if r['rel'] == rel]})"
        assert done[rel]["sha256"] == sha(data), f"{rel}: done row is for other content"
        moved = spec.move_to / rel if spec.move_to is not None else None
        if spec.after_success == "keep":
            assert in_inbox and (lay.inbox / rel).read_bytes() == data, f"{rel}: original changed or gone"
        elif moved is not None:
            assert not in_inbox and moved.read_bytes() == data, f"{rel}: not moved intact"
        else:
            assert not in_inbox, f"{rel}: not deleted"
    # Every done row: decodable outputs whose source hash matches.
    outputs: set[Path] = set()
    for rel, row in done.items():
        assert len(row["outputs"]) >= 2, row
        for out in map(Path, row["outputs"]):
            assert out.is_file(), f"{rel}: output {out} missing"
            outputs.add(out)
            if out.suffix == ".png":
                assert decodes(out), f"{rel}: output {out} does not decode"
            elif out.suffix == ".json":
                assert json.loads(out.read_text(encoding="utf-8"))["sha256"] == row["sha256"], f"{rel}: sidecar"
    # Exactly one result set per input and nothing else under the output root; no partial files.
    present = set(files_under(lay.out))
    temps = {p for p in present if p.name.startswith(TEMP_PREFIX)}
    assert allow_temps or not temps, f"temp files left: {temps}"
    assert present - temps == outputs, f"unexpected outputs: {sorted(map(str, (present - temps) ^ outputs))}"
    for folder in (lay.failed, lay.done_dir):
        left = [p for p in files_under(folder) if p.name.startswith(TEMP_PREFIX)]
        assert allow_temps or not left, f"temp files left: {left}"
    db = sqlite3.connect(f"file:{lay.ledger}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


class NotifySocket:
    """A fake ``$NOTIFY_SOCKET``: collects what the daemon tells systemd."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.path = path
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = start_thread(self._recv)

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def states(self) -> list[str]:
        """READY / RELOADING / STOPPING in order (status-only messages left out)."""
        keys = ("READY=1", "RELOADING=1", "STOPPING=1")
        return [k.split("=")[0] for m in self.messages for k in keys if k in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def events(logs: list[MutableMapping[str, Any]], name: str, **match: Any) -> list[MutableMapping[str, Any]]:
    """The captured events called ``name`` whose fields equal ``match`` (a snapshot: other threads log on)."""
    return [e for e in list(logs) if e.get("event") == name and all(e.get(k) == v for k, v in match.items())]
