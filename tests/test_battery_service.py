"""Issue 7's fault battery for the running service: full disks (27, 28), a share that vanishes (34), polling
observers that die, 200 malformed files (17) and confinement to the configured folders.

In-process daemons get FakeMatter (the GPU boundary); faults are injected at the OS layer (``os.replace``,
``os.fsync``, ``shutil.disk_usage``), on a real 1 MB tmpfs when we may mount one, or by renaming and
chmodding real folders. Every wait is a condition polled against a deadline.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from daemon_helpers import (
    REPO,
    DaemonProcess,
    Expect,
    Layout,
    NotifySocket,
    assert_oracle,
    done_rels,
    events,
    files_under,
    image_bytes,
    ledger_rows,
    make_layout,
    pixels,
    quarantined,
    running,
    wait_for,
)
from PIL import Image

from bshm_watchd.errors import ScanError
from bshm_watchd.fsutil import TEMP_PREFIX, out_of_space
from bshm_watchd.sdnotify import Notifier
from bshm_watchd.worker import WorkItem

IS_ROOT = os.geteuid() == 0



def set_top(lay: Layout, **top: Any) -> None:
    """Change top-level config keys (``min_free_mb``, ...) of a layout's config file."""
    doc = yaml.safe_load(lay.config.read_text(encoding="utf-8"))
    doc.update(top)
    lay.config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def temps_under(folder: Path) -> list[Path]:
    return [p for p in files_under(folder) if p.name.startswith(TEMP_PREFIX)]


def under(path: str | Path, root: Path) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(root)


# ---- battery 27: ENOSPC on the output -------------------------------------------------------
@dataclass
class DiskFull:
    """ENOSPC from the write layer for paths under ``root`` while ``active``; counts what it refused."""

    root: Path
    active: bool = True
    hits: int = 0

    def check(self, path: str) -> None:
        if self.active and under(path, self.root):
            self.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@dataclass
class Attempt:
    """What the inbox, output and ledger looked like when a scan attempt started."""

    t: float
    temps: list[Path]
    source_intact: bool
    done: set[str]
    quarantined: set[str]
    errors: list[str | None] = field(default_factory=list)


def attempt_recorder(lay: Layout, rel: str, data: bytes, *, hold_from: int = 0,
                     gate: threading.Event | None = None) -> tuple[list[Attempt], Callable[[str, WorkItem], None]]:
    """A worker hook that snapshots the trees at each attempt's start: the previous attempt is over
    by then (cleaned up or not) and the next has written nothing yet. Attempt ``hold_from`` (1-based)
    and later wait for ``gate`` after their snapshot: the test changes the disk between two attempts,
    never under one in progress."""
    seen: list[Attempt] = []

    def hook(stage: str, item: WorkItem) -> None:
        if stage != "start":
            return
        src = lay.inbox / rel
        seen.append(Attempt(t=time.monotonic(), temps=temps_under(lay.out),
                            source_intact=src.exists() and src.read_bytes() == data, done=done_rels(lay),
                            quarantined=quarantined(lay),
                            errors=[r["error"] for r in ledger_rows(lay) if r["rel"] == rel]))
        if gate is not None and hold_from and len(seen) >= hold_from:
            gate.wait(30)

    return seen, hook


def check_failed_attempts(seen: list[Attempt], backoff: tuple[float, ...], rel: str) -> None:
    """Every attempt after the first began with no temp left, the source intact, no done row, no
    quarantine, the claim given back for a full disk — and after at least its back-off."""
    for i, a in enumerate(seen[1:], start=1):
        assert a.temps == [], f"attempt {i + 1}: temp files left by the failed write: {a.temps}"
        assert a.source_intact, f"attempt {i + 1}: the source changed or went"
        assert rel not in a.done and rel not in a.quarantined, f"attempt {i + 1}: {a.done} {a.quarantined}"
        assert a.errors and a.errors[-1] and "disk full" in a.errors[-1], f"attempt {i + 1}: ledger {a.errors}"
        gap = a.t - seen[i - 1].t
        assert gap >= backoff[min(i - 1, len(backoff) - 1)], f"attempt {i + 1} came {gap:.2f} s after the last"


class TestOutOfSpace:
    def test_errno_in_the_chain(self, tmp_path: Path) -> None:
        """A write error caused by ENOSPC or EDQUOT is a full disk whatever the free space says; EIO is not."""
        for code, full in ((errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False)):
            try:
                try:
                    raise OSError(code, os.strerror(code))
                except OSError as cause:
                    raise ScanError("cannot write x_fg.png", stage="write", transient=True) from cause
            except ScanError as exc:
                assert out_of_space(exc, tmp_path, need=0) is full, code

    def test_bare_encoder_failure_judged_by_free_space(self, tmp_path: Path) -> None:
        """cv2.imwrite's bare False is a full disk only when less than the outputs' size is free."""
        exc = ScanError("cannot encode x_fg.png", stage="write")
        free = shutil.disk_usage(tmp_path).free
        assert out_of_space(exc, tmp_path, need=free + (1 << 30))
        assert not out_of_space(exc, tmp_path, need=1 << 20)
        assert not out_of_space(exc, tmp_path / "missing", need=free + (1 << 30))


class TestDiskFull:
    BACKOFF = (0.1, 0.2, 0.3)

    @pytest.mark.parametrize("where", ["replace", "fsync"])
    def test_enospc_retried_past_max_attempts_then_done(self, where: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """Battery 27: ENOSPC on the output (rename or fsync) → temps removed, source and ledger untouched,
        retried with back-off beyond max_attempts without quarantine, done once space is back."""
        lay = make_layout(tmp_path, settle_seconds=0.1, max_attempts=3)
        full = DiskFull(lay.out)
        real_replace, real_fsync = os.replace, os.fsync

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            full.check(os.fsdecode(dst))
            real_replace(src, dst, **kw)

        def fsync(fd: Any) -> None:
            num = fd if isinstance(fd, int) else fd.fileno()
            try:
                target = os.readlink(f"/proc/self/fd/{num}")
            except OSError:
                target = ""
            if os.path.basename(target).startswith(TEMP_PREFIX):
                full.check(target)
            real_fsync(fd)

        if where == "replace":
            monkeypatch.setattr(os, "replace", replace)
        else:
            monkeypatch.setattr(os, "fsync", fsync)
        ex = Expect()
        ex.add("a.jpg", image_bytes(270))
        seen, hook = attempt_recorder(lay, "a.jpg", ex.originals["a.jpg"])
        with running(lay, hook=hook, backoff=self.BACKOFF):
            (lay.inbox / "a.jpg").write_bytes(ex.originals["a.jpg"])
            wait_for(lambda: full.hits >= 4 or quarantined(lay), 30, "four refused writes (max_attempts is 3)")
            assert quarantined(lay) == set(), "a full disk quarantined a good scan"
            full.active = False
            wait_for(lambda: "a.jpg" in done_rels(lay) or quarantined(lay), 20, "a.jpg done once space is back")
        assert len(seen) >= 5
        check_failed_attempts(seen[:4], self.BACKOFF, "a.jpg")
        assert_oracle(lay, ex)

    def test_real_full_tmpfs(self, tmp_path: Path) -> None:
        """Battery 27 on a real 1 MB tmpfs: libpng's write error (cv2.imwrite returns False) is a full disk,
        not a bad image — retried, not quarantined, done once space is freed."""
        out = tmp_path / "out"
        out.mkdir()
        if not IS_ROOT:
            pytest.skip("mounting a tmpfs needs root; the injected ENOSPC tests cover the errno path")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(out)],
                                 capture_output=True, text=True, check=False)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        try:
            lay = make_layout(tmp_path, settle_seconds=0.1, max_attempts=3)
            filler = out / "filler.bin"
            with open(filler, "wb") as fh:
                fh.write(b"\xa5" * max(0, shutil.disk_usage(out).free - 8192))
            ex = Expect()
            ex.add("a.jpg", image_bytes(271))
            # The fifth attempt waits until the space is back: freed under the fourth, libpng's bare
            # error would meet a disk with room and be taken for a bad image.
            space_back = threading.Event()
            seen, hook = attempt_recorder(lay, "a.jpg", ex.originals["a.jpg"], hold_from=5, gate=space_back)
            with running(lay, hook=hook, backoff=self.BACKOFF):
                (lay.inbox / "a.jpg").write_bytes(ex.originals["a.jpg"])
                wait_for(lambda: len(seen) >= 5 or quarantined(lay), 30, "four attempts on a full disk")
                assert quarantined(lay) == set(), "a full disk quarantined a good scan"
                filler.unlink()
                space_back.set()
                wait_for(lambda: "a.jpg" in done_rels(lay) or quarantined(lay), 20, "a.jpg done once space is back")
            check_failed_attempts(seen[:4], self.BACKOFF, "a.jpg")
            assert_oracle(lay, ex)
        finally:
            if subprocess.run(["umount", str(out)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(out)], capture_output=True, check=False)


# ---- battery 28: free space below min_free_mb -----------------------------------------------
class LowDisk:
    """``shutil.disk_usage`` that reports 1 MB free under ``root`` while ``low``; counts those calls."""

    def __init__(self, root: Path, real: Callable[[Any], Any]) -> None:
        self.root = root
        self.real = real
        self.low = True
        self.calls = 0

    def __call__(self, path: Any) -> Any:
        got = self.real(path)
        if under(os.fsdecode(path), self.root):
            self.calls += 1
            if self.low:
                return got._replace(free=1 << 20)
        return got


class TestLowSpace:
    def test_claiming_pauses_and_resumes(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 28: free space under min_free_mb → nothing claimed, health names the disk space;
        space back → the scan is done and health is ok (each transition logged once)."""
        lay = make_layout(tmp_path, settle_seconds=0.1)
        set_top(lay, min_free_mb=64)
        low = LowDisk(lay.out, shutil.disk_usage)
        monkeypatch.setattr(shutil, "disk_usage", low)
        ex = Expect()
        ex.add("a.jpg", image_bytes(280))
        with running(lay) as d:
            wait_for(lambda: not d.health()[0], 10, "health to turn unhealthy")
            assert "disk space" in d.health()[1]
            (lay.inbox / "a.jpg").write_bytes(ex.originals["a.jpg"])
            wait_for(lambda: lay.inbox / "a.jpg" in d.watches["w"].gate, 10, "a.jpg seen")
            n0 = low.calls
            wait_for(lambda: low.calls >= n0 + 12, 20, "a dozen ticks with low space")  # ≫ settle_seconds
            assert ledger_rows(lay) == [] and files_under(lay.out) == [] and not d.queued
            assert not d.health()[0] and "disk space" in d.health()[1]
            low.low = False
            wait_for(lambda: "a.jpg" in done_rels(lay), 20, "a.jpg done once space is back")
            wait_for(lambda: d.health()[0], 10, "health ok again")
        assert len(events(logs, "disk_space_low_pausing")) == 1
        assert len(events(logs, "disk_space_ok_resuming")) == 1
        assert_oracle(lay, ex)


# ---- battery 34: the share vanishes and comes back ------------------------------------------
class TestShareVanishes:
    @pytest.mark.parametrize("mode", ["inotify", "poll"])
    def test_renamed_away_and_back(self, mode: str, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 34: the input folder renamed away → service up, health "unavailable", watchdog pinged,
        no quarantine (not even of a file left incomplete), ledger unchanged; renamed back → rescan finds
        the file added meanwhile, health ok."""
        incomplete = 2.0
        lay = make_layout(tmp_path, mode=mode, settle_seconds=0.1, incomplete_seconds=incomplete)
        away = tmp_path / "inbox-away"
        ex = Expect()
        ex.add("a.jpg", image_bytes(340))
        ex.add("bad.jpg", b"a note, not a scan\n", bad=True)
        half = image_bytes(341)
        ex.add("half.jpg", half)
        ex.add("sub/new.jpg", image_bytes(342))
        notify = NotifySocket(tmp_path / "notify.sock")
        notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
        try:
            with running(lay, notifier=notifier) as d:
                (lay.inbox / "a.jpg").write_bytes(ex.originals["a.jpg"])
                (lay.inbox / "bad.jpg").write_bytes(ex.originals["bad.jpg"])
                wait_for(lambda: "a.jpg" in done_rels(lay) and quarantined(lay) == {"bad.jpg"}, 20, "settled")
                before, failed_before = ledger_rows(lay), files_under(lay.failed)
                (lay.inbox / "half.jpg").write_bytes(half[: len(half) // 2])  # the scanner is mid-write
                wait_for(lambda: lay.inbox / "half.jpg" in d.watches["w"].gate, 10, "half.jpg seen")
                seen_at = time.monotonic()
                os.rename(lay.inbox, away)
                wait_for(lambda: not d.health()[0], 10, "health to turn unhealthy")
                assert "unavailable" in d.health()[1]
                (away / "sub").mkdir()
                (away / "sub" / "new.jpg").write_bytes(ex.originals["sub/new.jpg"])
                with open(away / "half.jpg", "ab") as fh:  # finished while the share was away
                    fh.write(half[len(half) // 2:])
                pings = notify.messages.count("WATCHDOG=1")
                wait_for(lambda: notify.messages.count("WATCHDOG=1") >= pings + 5
                         and time.monotonic() - seen_at > incomplete + 1.0, 20,
                         "watchdog pings while away, past incomplete_seconds")
                assert ledger_rows(lay) == before
                assert quarantined(lay) == {"bad.jpg"} and files_under(lay.failed) == failed_before
                assert not d.health()[0] and "unavailable" in d.health()[1]
                os.rename(away, lay.inbox)
                wait_for(lambda: {"half.jpg", "sub/new.jpg"} <= done_rels(lay), 20, "rescan on return")
                wait_for(lambda: d.health()[0], 10, "health ok again")
        finally:
            notify.close()
        assert [r for r in ledger_rows(lay) if r["rel"] in ("a.jpg", "bad.jpg")] == before
        assert len(events(logs, "watch_unavailable")) == 1
        assert len(events(logs, "watch_available_again")) == 1
        assert_oracle(lay, ex)

    @pytest.mark.skipif(IS_ROOT and shutil.which("capsh") is None,
                        reason="root passes any permission check: needs capsh to drop CAP_DAC_OVERRIDE")
    def test_permissions_flipped(self, tmp_path: Path, model_dir: Path) -> None:
        """Battery 34: the input folder chmod 000 → status "unavailable", nothing claimed or quarantined;
        permissions back → the file added meanwhile is done and status healthy (real daemon process)."""
        lay = make_layout(tmp_path, settle_seconds=0.1)
        status = lay.state / "status.json"
        proc = DaemonProcess(lay)
        if IS_ROOT:
            with open(proc.log_path, "wb") as log:
                proc.proc = subprocess.Popen(["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
                                              "exec " + " ".join(proc.argv)], stdout=log, stderr=subprocess.STDOUT,
                                             env=proc.env, cwd=REPO)
        else:
            proc.start()

        def daemon_status() -> dict[str, Any]:
            try:
                doc: dict[str, Any] = json.loads(status.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            return doc

        ex = Expect()
        ex.add("a.jpg", image_bytes(343))
        ex.add("new.jpg", image_bytes(344))
        try:
            proc.wait_ready()
            (lay.inbox / "a.jpg").write_bytes(ex.originals["a.jpg"])
            wait_for(lambda: "a.jpg" in done_rels(lay), 30, "a.jpg done")
            before = ledger_rows(lay)
            os.chmod(lay.inbox, 0)
            wait_for(lambda: "unavailable" in daemon_status().get("health", "") or proc.exited(), 15,
                     "status: unavailable")
            if IS_ROOT:
                (lay.inbox / "new.jpg").write_bytes(ex.originals["new.jpg"])
            else:
                os.chmod(lay.inbox, 0o300)  # still unlistable, but we can add a file
                (lay.inbox / "new.jpg").write_bytes(ex.originals["new.jpg"])
                os.chmod(lay.inbox, 0)
            stamp = daemon_status()["updated"]
            wait_for(lambda: daemon_status().get("updated", 0) > stamp + 1 or proc.exited(), 15,
                     "another status write (eight ticks) while unreadable")
            assert not proc.exited()
            away = daemon_status()
            assert away["healthy"] is False and "unavailable" in away["health"], away
            assert ledger_rows(lay) == before and quarantined(lay) == set()
        finally:
            os.chmod(lay.inbox, 0o755)
        try:
            wait_for(lambda: "new.jpg" in done_rels(lay), 30, "new.jpg done after permissions return")
            wait_for(lambda: daemon_status().get("healthy") is True, 15, "status healthy again")
        finally:
            rc = proc.terminate(30)
        assert rc == 0
        evs = [e.get("event") for e in proc.events()]
        assert evs.count("watch_unavailable") == 1 and evs.count("watch_available_again") == 1
        assert_oracle(lay, ex)


# ---- dead polling observers -----------------------------------------------------------------
class TestPollingObserver:
    @pytest.mark.parametrize("part", ["observer", "emitter"])
    def test_dead_polling_observer_replaced(self, part: str, tmp_path: Path,
                                            logs: list[MutableMapping[str, Any]]) -> None:
        """A polling observer (or only its emitter) that dies is replaced, still polling, and a file
        arriving after the restart's rescan is found by the new observer."""
        lay = make_layout(tmp_path, mode="poll", settle_seconds=0.1)
        with running(lay) as d:
            folder = d.watches["w"].folder
            assert folder is not None and folder.mode == "poll" and folder.alive()
            obs = folder._observer
            if part == "observer":
                obs.stop()
            else:
                for emitter in list(obs.emitters):
                    emitter.stop()
            rescans = len(events(logs, "rescan"))
            wait_for(lambda: events(logs, "observer_dead_restarting"), 15, "the restart")
            wait_for(lambda: len(events(logs, "rescan")) > rescans, 10, "the restart's rescan")

            def replaced() -> bool:
                new = d.watches["w"].folder
                return new is not None and new is not folder and new.alive()

            wait_for(replaced, 10, "a live replacement")
            new = d.watches["w"].folder
            assert new is not None and new.mode == "poll"
            (lay.inbox / "late.jpg").write_bytes(image_bytes(350))
            wait_for(lambda: "late.jpg" in done_rels(lay), 20, "late.jpg done")
        assert len(events(logs, "observer_dead_restarting")) == 1


# ---- battery 17 at scale: a generated corpus of malformed files -----------------------------
def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(w: int, h: int) -> bytes:
    """A structurally complete PNG whose IHDR claims w×h RGB pixels, with a few hundred bytes of data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
            + png_chunk(b"IEND", b""))


def tiff_bomb(w: int, h: int) -> bytes:
    """A little-endian grey TIFF claiming w×h pixels in one 16-byte strip (complete for the settle gate)."""
    entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
               (277, 3, 1), (278, 4, h), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x80" * 16


def encode(arr: np.ndarray[Any, Any], fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def valid_images(rng: random.Random, seed: int) -> list[tuple[str, bytes]]:
    """Valid but awkward scans of 64–160 px: RGB JPEG/PNG/TIFF, CMYK JPEG, 16-bit PNG/TIFF, palette PNGs."""
    w, h = rng.randint(64, 160), rng.randint(64, 160)
    px = pixels(seed, w, h)
    grey16 = (px[..., 0].astype(np.uint16) * 257) ^ np.uint16(seed)
    rgb16 = np.ascontiguousarray(px[..., ::-1].astype(np.uint16) * 257)
    pal = Image.fromarray(px).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal_t, pal_buf = io.BytesIO(), io.BytesIO()
    pal.save(pal_buf, "PNG")
    pal.save(pal_t, "PNG", transparency=0)
    return [("jpg", encode(px, "JPEG")), ("png", encode(px, "PNG")), ("tif", encode(px, "TIFF")),
            ("cmyk.jpg", _cmyk_jpeg(px)),
            ("grey16.png", encode(grey16, "PNG")), ("rgb16.png", cv2.imencode(".png", rgb16)[1].tobytes()),
            ("rgb16.tif", cv2.imencode(".tif", rgb16)[1].tobytes()),
            ("pal.png", pal_buf.getvalue()), ("palt.png", pal_t.getvalue())]


def _cmyk_jpeg(px: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


WRONG_MAGIC = (b"\x00\x00\x00\x00", b"GIF89a", b"%PDF-1.4", b"PK\x03\x04", b"\x7fELF", b"RIFF\x00\x00\x00\x00WAVE",
               b"#!/bin/sh\n", b"\xfe\xed\xfa\xce")


@dataclass
class Corpus:
    """Generated files by name, and what each must end as (``either`` when the fault's effect varies)."""

    files: dict[str, bytes] = field(default_factory=dict)
    must: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, data: bytes, must: str = "either") -> None:
        self.files[name] = data
        self.must[name] = must


def malformed_corpus(n: int, seed: int = 17) -> Corpus:
    """``n`` files: truncations at random points, bit flips, wrong magic, bombs, 0 bytes, and valid odd ones."""
    rng = random.Random(seed)
    corpus = Corpus()
    pool: list[tuple[str, bytes]] = []
    for i in range(4):
        pool += valid_images(rng, seed * 100 + i)
    for i, (kind, data) in enumerate(pool[:9]):
        corpus.add(f"valid{i:03d}.{kind}", data, "done")
    bombs = [png_bomb(100_000, 100_000), png_bomb(12_000, 12_000), png_bomb(1, 200_000_000),
             tiff_bomb(100_000, 100_000), tiff_bomb(11_000, 11_000)]
    for i, data in enumerate(bombs):
        ext = "png" if data.startswith(b"\x89PNG") else "tif"
        corpus.add(f"bomb{i:03d}.{ext}", data, "quarantined")
    i = 0
    while len(corpus.files) < n:
        kind, data = pool[rng.randrange(len(pool))]
        roll = rng.random()
        name = f"m{i:03d}"
        i += 1
        if roll < 0.35:
            cut = rng.randrange(1, len(data))
            # A JPEG or PNG cut short has no EOI / IEND; a TIFF may end right after its last strip.
            corpus.add(f"{name}-trunc.{kind}", data[:cut], "either" if kind.endswith("tif") else "quarantined")
        elif roll < 0.7:
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            corpus.add(f"{name}-flip.{kind}", bytes(flipped))
        elif roll < 0.85:
            magic = WRONG_MAGIC[rng.randrange(len(WRONG_MAGIC))]
            corpus.add(f"{name}-magic.{kind}", magic + data[len(magic):], "quarantined")
        elif roll < 0.93:
            corpus.add(f"{name}-empty.{kind}", b"", "quarantined")
        else:
            corpus.add(f"{name}-valid.{kind}", data, "done")
    return corpus


def vm_kb(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM (Linux ≥ 4.0), so the peak measured is this test's own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass  # then VmHWM includes earlier tests' peaks: the bound only gets looser


def run_corpus(tmp_path: Path, n: int, logs: list[MutableMapping[str, Any]]) -> None:
    lay = make_layout(tmp_path, settle_seconds=0.1, incomplete_seconds=2)
    corpus = malformed_corpus(n)
    assert len(corpus.files) == n
    reset_peak_rss()
    rss0 = vm_kb("VmRSS")
    with running(lay, backoff=(0.2,)) as d:
        for name, data in corpus.files.items():
            (lay.inbox / name).write_bytes(data)

        def settled() -> bool:
            assert not d.stop.is_set()
            return done_rels(lay) | quarantined(lay) == set(corpus.files)

        wait_for(settled, 90, f"all {n} files done or quarantined", interval=0.2)
        (lay.inbox / "after.jpg").write_bytes(image_bytes(170))
        wait_for(lambda: "after.jpg" in done_rels(lay), 20, "a fresh scan still processed")
        wait_for(lambda: d.backlog() == 0, 15, "an empty backlog")
        assert d.health()[0], d.health()
    peak, rss1 = vm_kb("VmHWM"), vm_kb("VmRSS")
    done, bad = done_rels(lay), quarantined(lay)
    assert done & bad == set()
    wrong = {name: must for name, must in corpus.must.items()
             if (must == "done" and name not in done) or (must == "quarantined" and name not in bad)}
    assert wrong == {}, f"ended the wrong way: {wrong}"
    for name in bad:
        info = json.loads((lay.failed / (name + ".error.json")).read_text(encoding="utf-8"))
        assert info["reason"] and info["stage"], info
        if name.startswith("bomb"):
            assert "too large" in info["reason"] or "exceeds" in info["reason"], info
        if "-empty." in name:
            assert "0 bytes" in info["reason"], info
    internal = [e for e in logs if e["event"] in ("scan_crashed", "scan_worker_error", "tick_failed",
                                                  "scan_infrastructure_error")]
    assert internal == []
    assert (peak - rss0) < 300 * 1024 and (rss1 - rss0) < 300 * 1024, f"RSS {rss0} → peak {peak}, end {rss1} kB"
    ex = Expect()
    for name, data in corpus.files.items():
        ex.add(name, data, bad=name in bad)
    ex.add("after.jpg", image_bytes(170))
    assert_oracle(lay, ex)


class TestMalformedCorpus:
    def test_two_hundred_files(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 17 at the issue's scale: 200 generated files → each done or quarantined with a reason;
        the daemon alive and healthy, a fresh scan still done; RSS bounded."""
        run_corpus(tmp_path, 200, logs)

    @pytest.mark.soak
    def test_thousand_files(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 17, soak size: 1000 generated malformed files, same promises."""
        run_corpus(tmp_path, 1000, logs)


# ---- nothing written outside the configured folders -----------------------------------------
def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under ``root``: kind, and for files size and mtime."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                out[p] = ("d", 0, 0)
            else:
                out[p] = ("f", st.st_size, st.st_mtime_ns)
    return out


class TestConfinement:
    def test_nothing_written_outside(self, tmp_path: Path, model_dir: Path) -> None:
        """A real daemon over good, bad and incomplete scans with after_success move: every new, changed
        or removed path under the sandbox's parent lies in input/output/quarantine/state/done (or is the
        test's own log); its HOME and TMPDIR stay empty."""
        lay = make_layout(tmp_path / "sandbox", settle_seconds=0.1, incomplete_seconds=2,
                          after_success=f"move:{tmp_path / 'sandbox' / 'done'}")
        home, tmp = tmp_path / "home", tmp_path / "tmp"
        home.mkdir()
        tmp.mkdir()
        ex = Expect()
        ex.add("a.jpg", image_bytes(360))
        ex.add("sub/b.png", image_bytes(361, "PNG"))
        ex.add("c16.png", cv2.imencode(".png", pixels(362).astype(np.uint16) * 257)[1].tobytes())
        ex.add("bad.jpg", b"%PDF-1.4\n%%EOF\n", bad=True)
        trunc = image_bytes(363, "PNG")
        ex.add("trunc.png", trunc[: len(trunc) // 2], bad=True)
        for rel, data in ex.originals.items():
            (lay.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            (lay.inbox / rel).write_bytes(data)
        env = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
               "XDG_DATA_HOME": str(home / ".local" / "share"), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_RUNTIME_DIR": str(tmp / "run"), "BSHM_WATCHD_MODEL_DIR": str(model_dir)}
        proc = DaemonProcess(lay, env)
        before = snapshot(tmp_path)
        proc.start()
        try:
            proc.wait_ready()
            wait_for(lambda: done_rels(lay) >= ex.good and quarantined(lay) == ex.bad
                     and all((lay.done_dir / rel).exists() for rel in ex.good), 60, "the batch settled")
        finally:
            rc = proc.terminate(30)
        assert rc == 0
        after = snapshot(tmp_path)
        # A folder that was there before and still is only changed its entries, which are checked themselves.
        changed = {p for p in before.keys() | after.keys()
                   if before.get(p) != after.get(p) and not before.get(p, ("?",))[0] == after.get(p, ("?",))[0] == "d"}
        allowed = (lay.inbox, lay.out, lay.failed, lay.state, lay.done_dir)
        stray = sorted(p for p in changed if p != str(proc.log_path) and not any(under(p, r) for r in allowed))
        assert stray == [], f"written outside the configured folders: {stray}"
        assert list(home.iterdir()) == [] and list(tmp.iterdir()) == []
        assert any(under(p, lay.out) for p in changed) and any(under(p, lay.state) for p in changed)
        assert_oracle(lay, ex)
