"""The daemon as a process (``python -m bshm_watchd run``): SIGKILL at failpoints and at random, signals,
a hostile inbox, and the issue's acceptance scenario — with the real ``selfie`` model."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_helpers import (
    REPO,
    SHARED_DATA,
    DaemonProcess,
    Expect,
    Layout,
    NotifySocket,
    assert_oracle,
    decodes,
    done_rels,
    files_under,
    image_bytes,
    make_layout,
    quarantined,
    start_thread,
    wait_for,
    write_config,
    write_in_parts,
    write_via_part,
)
from PIL import Image

from bshm_watchd.failpoints import COUNT_DIR_ENV, ENV
from bshm_watchd.fsutil import TEMP_PREFIX

POINTS = ["claimed", "matted", "temp_written", "fsynced", "renamed", "outputs_written", "committed", "disposed"]
TEMP_POINTS = {"temp_written", "fsynced", "renamed"}
"""Kills that always leave a temp file behind: the scan's outputs are staged by a pipeline worker and the
daemon dies before it renamed the last. At the other points, scans still in flight may have staged
temps too (the pipeline overlaps them). The restart removes every one: each belongs to a dead run's claim."""


@pytest.fixture(autouse=True)
def _needs_models(model_dir: Path) -> None:
    """Every test here runs the real daemon, which loads the real selfie model."""


def no_partial_outputs(lay: Layout) -> None:
    """Whatever a crash left under a final name is whole: every PNG decodes, every sidecar parses."""
    for p in files_under(lay.out):
        if p.name.startswith(TEMP_PREFIX):
            continue
        if p.suffix == ".png":
            assert decodes(p), f"partial output {p}"
        elif p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))


def moved_all(lay: Layout, ex: Expect) -> bool:
    return done_rels(lay) >= ex.good and all((lay.done_dir / rel).exists() for rel in ex.good)


class TestFailpoints:
    @pytest.mark.parametrize("point", POINTS)
    def test_sigkill_then_restart(self, point: str, tmp_path: Path) -> None:
        """Battery 9: SIGKILL at each failpoint (2nd pass), restart → oracle holds; one output set per input."""
        lay = make_layout(tmp_path, settle_seconds=0.3, after_success=f"move:{tmp_path / 'done'}")
        ex = Expect()
        for i in range(3):
            ex.add(f"s{i}.jpg", image_bytes(100 + i))
            (lay.inbox / f"s{i}.jpg").write_bytes(ex.originals[f"s{i}.jpg"])
        (tmp_path / "fp").mkdir()
        first = DaemonProcess(lay, {ENV: f"{point}@2", COUNT_DIR_ENV: str(tmp_path / "fp")}, tag="fp").start()
        assert first.wait_exit(60) == -signal.SIGKILL
        no_partial_outputs(lay)
        temps = [p for p in files_under(lay.out) if p.name.startswith(TEMP_PREFIX)]
        assert temps or point not in TEMP_POINTS
        if point == "temp_written":  # battery 40: private while it is a temp file
            assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in temps)
        again = DaemonProcess(lay, tag="again").start()
        try:
            wait_for(lambda: moved_all(lay, ex), 30, "every scan done and moved")
        finally:
            assert again.terminate(30) == 0
        if point not in ("committed", "disposed"):
            assert again.has_event("stale_claims_redone")
        assert again.has_event("crash_temp_removed") == bool(temps)
        assert_oracle(lay, ex)


def reference_mattes(lay: Layout, ex: Expect, tmp_path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """What ``process`` gives for each final file, with the daemon's config (profile ``test``)."""
    src = tmp_path / "ref-in"
    for rel, data in ex.originals.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = tmp_path / "ref-out"
    subprocess.run([sys.executable, "-m", "bshm_watchd", "process", "-c", str(lay.config), "--profile", "test",
                    "--model", "selfie", "-i", str(src), "-d", str(out)], check=True, cwd=REPO,
                   capture_output=True)
    return {rel: np.asarray(Image.open(out / Path(rel).parent / (Path(rel).stem + "_matte.png")))
            for rel in ex.originals}


def assert_mattes_match(lay: Layout, ref: dict[str, np.ndarray[Any, Any]], tol: float = 1.0) -> None:
    for rel, want in ref.items():
        got = np.asarray(Image.open(lay.out / Path(rel).parent / (Path(rel).stem + "_matte.png")))
        diff = float(np.abs(got.astype(np.int16) - want.astype(np.int16)).mean())
        assert got.shape == want.shape and diff <= tol, f"{rel}: mean difference {diff:.2f}"


def random_kills(tmp_path: Path, files: int, kills: int, seed: int) -> None:
    lay = make_layout(tmp_path, settle_seconds=0.2)
    rng = random.Random(seed)
    ex = Expect()
    for i in range(files):
        rel = f"d{i % 4}/r{i}.jpg"
        ex.add(rel, image_bytes(1000 + i))
        (lay.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (lay.inbox / rel).write_bytes(ex.originals[rel])
    for n in range(kills):
        proc = DaemonProcess(lay, tag=f"kill{n}").start()
        # Kill at a random moment once the daemon is working (or at start-up, now and then).
        time.sleep(rng.uniform(0.3, 1.5))  # the fault's timing, drawn at random
        proc.kill()
        no_partial_outputs(lay)
    last = DaemonProcess(lay, tag="last").start()
    try:
        # Ready first: the earlier runs may have finished everything, and a SIGTERM that lands while
        # the interpreter is still importing (no handler yet) ends it by the signal, not with 0.
        last.wait_ready()
        wait_for(lambda: done_rels(lay) == ex.good, 60 + files, "every scan done")
    finally:
        assert last.terminate(30) == 0
    assert_oracle(lay, ex)
    assert_mattes_match(lay, reference_mattes(lay, ex, tmp_path))


class TestRandomKills:
    def test_few_random_kills(self, tmp_path: Path) -> None:
        """Battery 10 (small): 4 SIGKILLs at random moments over 24 files → outputs equal the expected set."""
        random_kills(tmp_path, files=24, kills=4, seed=10)

    @pytest.mark.soak
    def test_many_random_kills(self, tmp_path: Path) -> None:
        """Battery 10 (soak): 200 random SIGKILLs over 500 files → outputs equal the expected set."""
        random_kills(tmp_path, files=500, kills=200, seed=11)


class TestSignals:
    def test_sighup_broken_then_valid_config(self, tmp_path: Path) -> None:
        """Battery 14: SIGHUP with a broken config keeps the old one; with a valid one, RELOADING then READY."""
        lay = make_layout(tmp_path, settle_seconds=0.2)
        notify = NotifySocket(tmp_path / "notify.sock")
        proc = DaemonProcess(lay, {"NOTIFY_SOCKET": str(notify.path)}).start()
        try:
            proc.wait_ready()
            good = lay.config.read_text()
            lay.config.write_text(good + "\nwatch: [oops\n")
            proc.signal(signal.SIGHUP)
            wait_for(lambda: proc.has_event("reload_rejected_keeping_old_config"), 10, "reload rejected")
            (lay.inbox / "after-bad.jpg").write_bytes(image_bytes(200))
            wait_for(lambda: "after-bad.jpg" in done_rels(lay), 10, "old config still working")
            second = tmp_path / "inbox2"
            second.mkdir()
            write_config(lay, [
                {"name": "w", "input": str(lay.inbox), "output": str(lay.out), "quarantine": str(lay.failed),
                 "profile": "test", "settle_seconds": 0.2},
                {"name": "w2", "input": str(second), "output": str(tmp_path / "out2"),
                 "quarantine": str(tmp_path / "failed2"), "profile": "test", "settle_seconds": 0.2}])
            proc.signal(signal.SIGHUP)
            wait_for(lambda: proc.has_event("config_reloaded"), 10, "reloaded")
            (second / "new.jpg").write_bytes(image_bytes(201))
            wait_for(lambda: (tmp_path / "out2" / "new_matte.png").exists(), 10, "the new watch working")
        finally:
            assert proc.terminate(30) == 0
            notify.close()
        assert notify.states() == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
        reload_msgs = [m for m in notify.messages if "RELOADING=1" in m]
        assert all("MONOTONIC_USEC=" in m for m in reload_msgs)

    def test_sigterm_mid_backlog(self, tmp_path: Path) -> None:
        """SIGTERM with a backlog → exit 0 quickly, nothing partial; a restart finishes the rest exactly once."""
        lay = make_layout(tmp_path, settle_seconds=0.1)
        ex = Expect()
        for i in range(12):
            ex.add(f"t{i}.png", image_bytes(300 + i, "PNG", 640, 480))
            (lay.inbox / f"t{i}.png").write_bytes(ex.originals[f"t{i}.png"])
        proc = DaemonProcess(lay).start()
        wait_for(lambda: done_rels(lay), 30, "the first scan done")
        t0 = time.monotonic()
        assert proc.terminate(30) == 0
        assert time.monotonic() - t0 < 30
        assert proc.has_event("daemon_stopped")
        no_partial_outputs(lay)
        assert not [p for p in files_under(lay.out) if p.name.startswith(TEMP_PREFIX)]
        again = DaemonProcess(lay, tag="again").start()
        try:
            wait_for(lambda: done_rels(lay) == ex.good, 60, "the rest done")
        finally:
            assert again.terminate(30) == 0
        done_twice = [e["rel"] for e in again.events() if e.get("event") == "scan_done"]
        assert not set(done_twice) & {e["rel"] for e in proc.events() if e.get("event") == "scan_done"}
        assert_oracle(lay, ex)


class TestHostileInbox:
    @pytest.mark.skipif(shutil.which("capsh") is None and os.geteuid() == 0,
                        reason="root reads anything: needs capsh to drop CAP_DAC_OVERRIDE for the daemon")
    def test_unreadable_and_read_only(self, tmp_path: Path) -> None:
        """Battery 40: an unreadable file and a read-only inbox (move fails) → one warning each, no loop."""
        lay = make_layout(tmp_path, settle_seconds=0.2, rescan_seconds=0.3,
                          after_success=f"move:{tmp_path / 'done'}")
        (lay.inbox / "locked.jpg").write_bytes(image_bytes(400))
        os.chmod(lay.inbox / "locked.jpg", 0)
        (lay.inbox / "ok.jpg").write_bytes(image_bytes(401))
        os.chmod(lay.inbox, 0o555)
        proc = DaemonProcess(lay, log_level="debug")
        if os.geteuid() == 0:
            cmd = " ".join(proc.argv)
            with open(proc.log_path, "wb") as log:
                proc.proc = subprocess.Popen(["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--",
                                              "-c", f"exec {cmd}"], stdout=log, stderr=subprocess.STDOUT,
                                             env=proc.env, cwd=REPO)
        else:
            proc.start()
        try:
            wait_for(lambda: "ok.jpg" in done_rels(lay), 20, "ok.jpg done")
            wait_for(lambda: sum(e.get("event") == "rescan" for e in proc.events()) >= 8 or proc.exited(), 10,
                     "several rescans")
        finally:
            rc = proc.terminate(30)
            os.chmod(lay.inbox, 0o755)
        assert rc == 0
        evs = proc.events()
        assert [e.get("rel") for e in evs if e.get("event") == "scan_refused"] == ["locked.jpg"]
        assert [e.get("rel") for e in evs if e.get("event") == "dispose_failed"] == ["ok.jpg"]
        assert [e.get("rel") for e in evs if e.get("event") == "scan_done"] == ["ok.jpg"]


def old_photo_scans() -> list[Path]:
    folder = SHARED_DATA / "old_photos"
    if not folder.is_dir():
        pytest.skip(f"shared data set not found at {folder}")
    jpgs = sorted(p for p in folder.glob("deoldify__*.jpg") if p.stat().st_size < 200_000)
    if len(jpgs) < 13:
        pytest.skip(f"need 13 small JPEGs in {folder}, found {len(jpgs)}")
    return jpgs


def test_acceptance_scenario(tmp_path: Path) -> None:
    """Issue 3's check: 12 scans in 3 folders (two-part, .part rename, copied), a SIGKILL and restart,
    then bad.jpg and truncated.jpg; mattes match ``process``; SIGTERM ends it within 30 s."""
    scans = old_photo_scans()
    lay = make_layout(tmp_path, profile="default", mode="poll", poll_seconds=1, settle_seconds=2,
                      incomplete_seconds=20, rescan_seconds=300)
    ex = Expect()
    groups = {"two-part": scans[0:4], "renamed": scans[4:8], "copied": scans[8:12]}
    for folder, paths in groups.items():
        for p in paths:
            ex.add(f"{folder}/{p.name}", p.read_bytes())
    proc = DaemonProcess(lay, tag="first").start()
    proc.wait_ready()
    (lay.inbox / "copied").mkdir()
    for p in groups["copied"]:
        shutil.copy(p, lay.inbox / "copied" / p.name)
    writers = [start_thread(functools.partial(write_in_parts, lay.inbox / "two-part" / p.name, p.read_bytes(), 2, 4.0))
               for p in groups["two-part"]]
    wait_for(lambda: len(done_rels(lay)) >= 3, 60, "the first few scans done")
    proc.kill()
    proc = DaemonProcess(lay, tag="second").start()
    for p in groups["renamed"]:
        write_via_part(lay.inbox / "renamed" / p.name, p.read_bytes())
    for w in writers:
        w.join(30)
    try:
        wait_for(lambda: done_rels(lay) == set(ex.originals), 120, "all twelve scans done")
        (lay.inbox / "bad.jpg").write_text("this is a text file, not a scan\n")
        cut = scans[12].read_bytes()
        (lay.inbox / "truncated.jpg").write_bytes(cut[: len(cut) // 2])
        ex.add("bad.jpg", (lay.inbox / "bad.jpg").read_bytes(), bad=True)
        ex.add("truncated.jpg", cut[: len(cut) // 2], bad=True)
        wait_for(lambda: quarantined(lay) == {"bad.jpg", "truncated.jpg"}, 60, "both bad files quarantined")
    finally:
        t0 = time.monotonic()
        rc = proc.terminate(30)
        stop_s = time.monotonic() - t0
    assert rc == 0 and stop_s < 30
    pngs = sorted(str(p.relative_to(lay.out)) for p in files_under(lay.out) if p.suffix == ".png")
    want = sorted(str(Path(rel).parent / f"{Path(rel).stem}{s}") for rel in ex.good for s in ("_fg.png", "_matte.png"))
    assert pngs == want
    for rel in ex.good:
        assert (lay.inbox / rel).read_bytes() == ex.originals[rel]
    for rel in ex.bad:
        assert (lay.failed / (rel + ".error.json")).is_file()
    assert_oracle(lay, ex)
    # The reference: ``process -c CONFIG --model selfie`` on the final files.
    ref = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "bshm_watchd", "process", "-c", str(lay.config), "--model", "selfie",
                    "-i", str(lay.inbox), "-d", str(ref)], check=True, cwd=REPO, capture_output=True)
    for rel in ex.good:
        stem = Path(rel).stem + "_matte.png"
        got = np.asarray(Image.open(lay.out / Path(rel).parent / stem)).astype(np.int16)
        want_m = np.asarray(Image.open(ref / Path(rel).parent / stem)).astype(np.int16)
        assert got.shape == want_m.shape
        assert float(np.abs(got - want_m).mean()) <= 1.0, rel
