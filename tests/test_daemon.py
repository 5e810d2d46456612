"""The daemon in-process with real observers (inotify and polling) on real folders, FakeMatter at the GPU.

Battery items (RELIABILITY.md) are named in each test's docstring. Writers pause on purpose (that is
the fault); every wait for the daemon is a condition polled against a deadline.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy.typing as npt
import pytest
from daemon_helpers import (
    Expect,
    FakeMatter,
    Layout,
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
    sha,
    wait_for,
    write_in_parts,
    write_via_part,
)

from bshm_watchd import cli
from bshm_watchd.disposal import error_json_path, quarantine
from bshm_watchd.fsutil import TEMP_PREFIX
from bshm_watchd.worker import WorkItem, output_base, pipeline_key

MODES = ["inotify", "poll"]



def rows_for(lay: Layout, rel: str) -> list[dict[str, Any]]:
    return [r for r in ledger_rows(lay) if r["rel"] == rel]


def outputs_of(lay: Layout, rel: str) -> list[str]:
    [row] = [r for r in rows_for(lay, rel) if r["state"] == "done"]
    return list(row["outputs"])


# ---- partial writes ---------------------------------------------------------------------------
class TestPartialWrites:
    @pytest.mark.parametrize("mode", MODES)
    def test_chunked_writer_pausing_longer_than_window(self, mode: str, tmp_path: Path) -> None:
        """Battery 1: chunks with pauses 2.5× the settle window → never processed from a prefix."""
        lay = make_layout(tmp_path, mode=mode)
        data = image_bytes(1, "JPEG", 320, 240)
        ex = Expect()
        ex.add("scan.jpg", data)
        with running(lay):
            write_in_parts(lay.inbox / "scan.jpg", data, parts=3, pause=1.0)
            wait_for(lambda: "scan.jpg" in done_rels(lay), 20, "scan.jpg done")
        assert [r["sha256"] for r in rows_for(lay, "scan.jpg")] == [sha(data)]  # no row for any prefix
        assert_oracle(lay, ex)

    @pytest.mark.parametrize("mode", MODES)
    def test_zero_byte_placeholder(self, mode: str, tmp_path: Path) -> None:
        """Battery 2: a 0-byte placeholder filled later is not quarantined while waiting; processed once."""
        lay = make_layout(tmp_path, mode=mode, incomplete_seconds=8)
        data = image_bytes(2, "PNG")
        ex = Expect()
        ex.add("scan.png", data)
        with running(lay):
            (lay.inbox / "scan.png").write_bytes(b"")
            time.sleep(1.5)  # the placeholder's life (the fault), well past the settle window
            (lay.inbox / "scan.png").write_bytes(data)
            wait_for(lambda: "scan.png" in done_rels(lay), 20, "scan.png done")
        assert len(rows_for(lay, "scan.png")) == 1
        assert quarantined(lay) == set()
        assert_oracle(lay, ex)

    def test_reopened_five_times(self, tmp_path: Path) -> None:
        """Battery 3: opened and closed 5× with 0.2–1.0 s gaps → one result, from the final content."""
        lay = make_layout(tmp_path, mode="inotify")
        data = image_bytes(3, "JPEG", 320, 240)
        ex = Expect()
        ex.add("a/scan.jpg", data)
        cuts = [0, 900, 1500, 4000, 9000, len(data)]
        with running(lay):
            (lay.inbox / "a").mkdir()
            for i, gap in enumerate([0.2, 1.0, 0.3, 0.6, 0.0]):
                with open(lay.inbox / "a" / "scan.jpg", "ab") as fh:
                    fh.write(data[cuts[i]:cuts[i + 1]])
                time.sleep(gap)  # the writer's pause (the fault)
            wait_for(lambda: "a/scan.jpg" in done_rels(lay), 20, "scan done")
        assert [r["sha256"] for r in rows_for(lay, "a/scan.jpg")] == [sha(data)]
        assert_oracle(lay, ex)

    def test_incomplete_quarantined(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 4: JPEG without EOI, PNG without IEND → quarantined with a reason; the original kept."""
        lay = make_layout(tmp_path, mode="inotify", incomplete_seconds=1.5)
        ex = Expect()
        ex.add("cut.jpg", image_bytes(4)[:-2], bad=True)
        ex.add("cut.png", image_bytes(4, "PNG")[:-12], bad=True)
        ex.add("fine.jpg", image_bytes(5))
        with running(lay):
            for rel, data in ex.originals.items():
                (lay.inbox / rel).write_bytes(data)
            wait_for(lambda: quarantined(lay) == ex.bad and done_rels(lay) == ex.good, 20, "quarantine")
        for rel in ex.bad:
            info = json.loads((lay.failed / (rel + ".error.json")).read_text())
            assert info["stage"] == "settle" and "incomplete" in info["reason"]
        assert_oracle(lay, ex)

    @pytest.mark.parametrize("mode", MODES)
    def test_part_file_renamed(self, mode: str, tmp_path: Path) -> None:
        """Battery 5: ``x.jpg.part`` is ignored, the renamed ``x.jpg`` processed once; a lone .part never."""
        lay = make_layout(tmp_path, mode=mode)
        data = image_bytes(6)
        ex = Expect()
        ex.add("x.jpg", data)
        with running(lay):
            (lay.inbox / "never.jpg.part").write_bytes(image_bytes(7))
            write_via_part(lay.inbox / "x.jpg", data)
            wait_for(lambda: "x.jpg" in done_rels(lay), 20, "x.jpg done")
        assert {r["rel"] for r in ledger_rows(lay)} == {"x.jpg"}
        assert len(rows_for(lay, "x.jpg")) == 1
        assert (lay.inbox / "never.jpg.part").exists()
        assert_oracle(lay, ex)

    def test_appended_between_claim_and_write(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 6: bytes appended after the claim → that result discarded, the new content processed."""
        lay = make_layout(tmp_path, mode="inotify")
        first = image_bytes(8)
        final = first + b"\x00" * 64  # padding after EOI: still a complete JPEG, but other content
        ex = Expect()
        ex.add("grow.jpg", final)

        def hook(stage: str, item: WorkItem) -> None:
            if stage == "claimed" and item.path.stat().st_size == len(first):
                with open(item.path, "ab") as fh:
                    fh.write(b"\x00" * 64)

        with running(lay, hook=hook):
            (lay.inbox / "grow.jpg").write_bytes(first)
            wait_for(lambda: "grow.jpg" in done_rels(lay), 20, "grow.jpg done")
        states = {r["sha256"]: (r["state"], r["error"]) for r in rows_for(lay, "grow.jpg")}
        assert states == {sha(first): ("failed", "source changed while processing"), sha(final): ("done", None)}
        assert len(events(logs, "scan_changed_during_processing")) == 1
        assert_oracle(lay, ex)

    def test_deleted_before_claim(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 7: a file deleted between detection and claim → one log line, no ledger row."""
        lay = make_layout(tmp_path, mode="inotify")

        def hook(stage: str, item: WorkItem) -> None:
            if stage == "start":
                item.path.unlink()

        with running(lay, hook=hook):
            (lay.inbox / "gone.jpg").write_bytes(image_bytes(9))
            wait_for(lambda: events(logs, "scan_vanished"), 20, "scan_vanished")
        assert len(events(logs, "scan_vanished")) + len(events(logs, "scan_vanished_before_claim")) == 1
        assert ledger_rows(lay) == []

    @pytest.mark.parametrize("mode", MODES)
    def test_same_size_same_mtime_rewrite(self, mode: str, tmp_path: Path) -> None:
        """Battery 8: content rewritten in place with size and mtime restored → the hash sees it; redone.

        A polling observer cannot see such a change (it compares size and mtime); the periodic rescan,
        which also compares ctime, must find it.
        """
        lay = make_layout(tmp_path, mode=mode, rescan_seconds=1.0)
        v1, v2 = image_bytes(10, "BMP"), image_bytes(11, "BMP")
        assert len(v1) == len(v2) and v1 != v2
        ex = Expect()
        ex.add("scan.bmp", v2)
        with running(lay):
            (lay.inbox / "scan.bmp").write_bytes(v1)
            wait_for(lambda: "scan.bmp" in done_rels(lay), 20, "v1 done")
            st = (lay.inbox / "scan.bmp").stat()
            with open(lay.inbox / "scan.bmp", "r+b") as fh:
                fh.write(v2)
            os.utime(lay.inbox / "scan.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
            wait_for(lambda: any(r["sha256"] == sha(v2) and r["state"] == "done" for r in rows_for(lay, "scan.bmp")),
                     10, "v2 done")
        states = {r["sha256"]: r["state"] for r in rows_for(lay, "scan.bmp")}
        assert states == {sha(v1): "superseded", sha(v2): "done"}
        assert_oracle(lay, ex)

    def test_old_content_back_is_redone(self, tmp_path: Path) -> None:
        """v1 → v2 → v1 at one path: the last v1 is processed again, not skipped as "already done"."""
        lay = make_layout(tmp_path, mode="inotify")
        v1, v2 = image_bytes(12), image_bytes(13)
        path = lay.inbox / "flip.jpg"
        with running(lay):
            for n, data in enumerate([v1, v2, v1], 1):
                path.write_bytes(data)
                wait_for(lambda d=data: any(r["sha256"] == sha(d) and r["state"] == "done"  # type: ignore[misc]
                                            for r in rows_for(lay, "flip.jpg")), 10, f"version {n} done")
        sidecar = json.loads((lay.out / "flip.json").read_text())
        assert sidecar["sha256"] == sha(v1)


class OutOfMemory(FakeMatter):
    """A GPU that runs out of memory on the first ``fails`` calls (a transient error)."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.calls = 0

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self.calls += 1
        if self.calls <= self.fails:
            raise MemoryError("CUDA out of memory (simulated)")
        return super().predict(rgb)


class TestTransientErrors:
    def test_retried_with_backoff_then_done(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """A transient failure is retried after a back-off and then succeeds; nothing is quarantined."""
        lay = make_layout(tmp_path, mode="inotify", settle_seconds=0.2)
        ex = Expect()
        ex.add("t.jpg", image_bytes(95))
        with running(lay, matter=OutOfMemory(fails=2), backoff=(0.3, 0.6)):
            (lay.inbox / "t.jpg").write_bytes(ex.originals["t.jpg"])
            wait_for(lambda: "t.jpg" in done_rels(lay), 20, "t.jpg done")
        assert [e["attempt"] for e in events(logs, "scan_retry")] == [1, 2]
        assert_oracle(lay, ex)

    def test_bounded_then_quarantined(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """A failure that stays transient is tried max_attempts times, then quarantined with its reason."""
        lay = make_layout(tmp_path, mode="inotify", settle_seconds=0.2, max_attempts=3)
        ex = Expect()
        ex.add("t.jpg", image_bytes(96), bad=True)
        with running(lay, matter=OutOfMemory(fails=99), backoff=(0.2,)):
            (lay.inbox / "t.jpg").write_bytes(ex.originals["t.jpg"])
            wait_for(lambda: quarantined(lay) == {"t.jpg"}, 20, "quarantined")
        assert len(events(logs, "scan_retry")) == 2
        assert "out of memory" in json.loads((lay.failed / "t.jpg.error.json").read_text())["reason"]
        assert_oracle(lay, ex)


# ---- restart ----------------------------------------------------------------------------------
class TestRestart:
    def test_stale_claim_and_old_temps(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 16: a claim left by a dead PID is redone once; its crash temps and temps past the TTL are
        removed, a fresh temp elsewhere is not."""
        lay = make_layout(tmp_path, mode="inotify")
        data = image_bytes(14)
        (lay.inbox / "a.jpg").write_bytes(data)
        cfg = lay.cfg()
        with running(lay):  # creates the ledger
            wait_for(lambda: "a.jpg" in done_rels(lay), 20, "a.jpg done")
        db = sqlite3.connect(lay.ledger)
        db.execute("UPDATE scans SET state='claimed', outputs=NULL, owner=?", (f"{socket.gethostname()}:999999999:1",))
        db.commit()
        db.close()
        for p in files_under(lay.out):
            p.unlink()
        crashed = lay.out / f"{TEMP_PREFIX}crashed.png"  # beside the dead claim's outputs
        (lay.out / "other").mkdir()
        old = lay.out / "other" / f"{TEMP_PREFIX}old.png"
        fresh = lay.out / "other" / f"{TEMP_PREFIX}fresh.png"  # another writer's, maybe: not ours to judge
        for p in (crashed, old, fresh):
            p.write_bytes(b"partial")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        ex = Expect()
        ex.add("a.jpg", data)
        with running(lay):
            wait_for(lambda: "a.jpg" in done_rels(lay), 20, "a.jpg redone")
        [row] = rows_for(lay, "a.jpg")
        assert row["attempts"] == 2 and row["pipeline"] == pipeline_key(cfg, cfg.watch[0], "fake")
        assert len(events(logs, "stale_claims_redone")) == 1
        assert not crashed.exists() and not old.exists() and fresh.exists()
        shutil.rmtree(lay.out / "other")
        assert_oracle(lay, ex)

    def test_done_skipped_missing_outputs_redone(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """After a restart done scans are skipped without rework; one whose outputs vanished is redone."""
        lay = make_layout(tmp_path, mode="inotify")
        ex = Expect()
        for i in range(3):
            ex.add(f"s{i}.jpg", image_bytes(20 + i))
            (lay.inbox / f"s{i}.jpg").write_bytes(ex.originals[f"s{i}.jpg"])
        with running(lay):
            wait_for(lambda: done_rels(lay) == ex.good, 20, "all done")
        kept = {p: p.stat().st_mtime_ns for p in files_under(lay.out) if "s0" not in p.name}
        for p in files_under(lay.out):
            if p.name.startswith("s0"):
                p.unlink()
        del logs[:]
        with running(lay) as d:
            wait_for(lambda: events(logs, "scan_done"), 20, "s0 redone")
            wait_for(lambda: d.backlog() == 0, 15, "idle")
        assert [e["rel"] for e in events(logs, "scan_done")] == ["s0.jpg"]
        assert len(events(logs, "outputs_missing_redo")) == 1
        assert {p: p.stat().st_mtime_ns for p in kept} == kept
        assert_oracle(lay, ex)

    def test_crash_before_disposal_finishes_the_move(self, tmp_path: Path) -> None:
        """A done scan still in the inbox with ``move:`` (crash after commit) is moved on restart, not redone."""
        lay = make_layout(tmp_path, mode="inotify", after_success=f"move:{tmp_path / 'done'}")
        data = image_bytes(15)
        (lay.inbox / "m.jpg").write_bytes(data)
        with running(lay):
            wait_for(lambda: (lay.done_dir / "m.jpg").exists(), 20, "moved")
        os.rename(lay.done_dir / "m.jpg", lay.inbox / "m.jpg")  # as if killed between commit and move
        ex = Expect()
        ex.add("m.jpg", data)
        with running(lay):
            wait_for(lambda: (lay.done_dir / "m.jpg").exists(), 20, "moved again")
        assert [r["state"] for r in rows_for(lay, "m.jpg")] == ["done"]
        assert_oracle(lay, ex)


# ---- bad input --------------------------------------------------------------------------------
def malformed_corpus() -> dict[str, bytes]:
    jpg, png = image_bytes(30, "JPEG", 200, 150), image_bytes(31, "PNG", 200, 150)
    tif = image_bytes(32, "TIFF", 64, 48)
    corpus: dict[str, bytes] = {}
    for frac in (0.1, 0.5, 0.9):
        corpus[f"trunc{int(frac * 100)}.jpg"] = jpg[: int(len(jpg) * frac)]
        corpus[f"trunc{int(frac * 100)}.png"] = png[: int(len(png) * frac)]
    for i, pos in enumerate((30, 200, len(jpg) // 2, len(jpg) - 40)):
        flipped = bytearray(jpg)
        flipped[pos] ^= 0x5A
        corpus[f"flip{i}.jpg"] = bytes(flipped)
    flipped_png = bytearray(png)
    flipped_png[len(png) // 2] ^= 0xFF
    corpus["flip.png"] = bytes(flipped_png)
    corpus["magic.jpg"] = b"\x00\x00" + jpg[2:]
    corpus["magic.png"] = b"GIF89a" + png[6:]
    corpus["header.tif"] = b"II*\x00\x08\x00"
    corpus["loop.tif"] = b"II*\x00\x08\x00\x00\x00\x00\x00\x08\x00\x00\x00"
    corpus["trunc.tif"] = tif[: len(tif) // 2]
    corpus["ok.jpg"] = jpg
    return corpus


class TestBadInput:
    def test_malformed_corpus(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 17: truncations, bit flips, wrong magic → each done or quarantined; no internal error."""
        lay = make_layout(tmp_path, mode="inotify", incomplete_seconds=1.5)
        corpus = malformed_corpus()
        with running(lay) as d:
            for name, data in corpus.items():
                (lay.inbox / name).write_bytes(data)
            wait_for(lambda: done_rels(lay) | quarantined(lay) == set(corpus), 30, "every file settled")
            (lay.inbox / "after.jpg").write_bytes(image_bytes(33))
            wait_for(lambda: "after.jpg" in done_rels(lay), 20, "the daemon still works")
            wait_for(lambda: d.backlog() == 0, 15, "an empty backlog")
        assert done_rels(lay) & quarantined(lay) == set()
        assert "ok.jpg" in done_rels(lay)
        internal = [e for e in logs if e["event"] in ("scan_crashed", "scan_worker_error", "tick_failed",
                                                      "scan_infrastructure_error")]
        assert internal == []
        ex = Expect()
        for name, data in corpus.items():
            ex.add(name, data, bad=name in quarantined(lay))
        ex.add("after.jpg", image_bytes(33))
        assert_oracle(lay, ex)

    def test_not_images_quarantined(self, tmp_path: Path) -> None:
        """Battery 18: PDF, ZIP, text and 0-byte files named .jpg → quarantined as "not an image"."""
        lay = make_layout(tmp_path, mode="inotify", incomplete_seconds=1.5)
        ex = Expect()
        ex.add("doc.jpg", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n%%EOF\n", bad=True)
        ex.add("arch.jpg", b"PK\x03\x04" + b"\x14\x00" * 40, bad=True)
        ex.add("notes.jpg", b"just some text\n", bad=True)
        ex.add("empty.jpg", b"", bad=True)
        with running(lay):
            for rel, data in ex.originals.items():
                (lay.inbox / rel).write_bytes(data)
            wait_for(lambda: quarantined(lay) == ex.bad, 20, "all quarantined")
        for rel in ex.bad:
            info = json.loads((lay.failed / (rel + ".error.json")).read_text())
            assert "not an image" in info["reason"], info
        assert_oracle(lay, ex)

    def test_awkward_names(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 26: spaces, NFC/NFD, newline, leading dash, 255 bytes, invalid UTF-8, same stem → no collisions."""
        lay = make_layout(tmp_path, mode="inotify", profile="default")
        names = ["with space.jpg", "caf\u00e9.jpg", "cafe\u0301.jpg", "new\nline.jpg", "-rf.jpg",
                 "x" * 251 + ".jpg", os.fsdecode(b"bad\xff\xfe.jpg"), "twin.jpg", "twin.png"]
        ex = Expect()
        for i, name in enumerate(names):
            data = image_bytes(40 + i, "PNG" if name.endswith(".png") else "JPEG")
            ex.add(name, data)
        with running(lay):
            for name, data in ex.originals.items():
                with open(os.fsencode(lay.inbox / name), "wb") as fh:
                    fh.write(data)
            wait_for(lambda: done_rels(lay) == set(names), 30, "all names done")
        outs = [o for n in names for o in outputs_of(lay, n)]
        assert len(outs) == len(set(outs)) == 2 * len(names)  # fg and matte each; none shared
        assert all(len(os.fsencode(Path(o).name)) <= 255 for o in outs)
        assert {Path(o).name for o in outputs_of(lay, "twin.png")} == {"twin_png_fg.png", "twin_png_matte.png"}
        assert_oracle(lay, ex)

    def test_invalid_utf8_name_with_sidecar(self, tmp_path: Path) -> None:
        """Battery 26: a name that is not valid UTF-8 is processed with a sidecar too."""
        lay = make_layout(tmp_path, mode="inotify")
        name = os.fsdecode(b"bad\xff.jpg")
        with running(lay):
            with open(os.fsencode(lay.inbox / name), "wb") as fh:
                fh.write(image_bytes(50))
            wait_for(lambda: any(r["rel"] == name and r["state"] != "claimed" for r in ledger_rows(lay)), 20, "settled")
        assert done_rels(lay) == {name}

    def test_logs_escape_names(self, tmp_path: Path) -> None:
        """Battery 26: with JSON logs a newline or invalid UTF-8 in a name never breaks a line."""
        from bshm_watchd.logs import configure

        stream = io.StringIO()
        configure(stream, json=True, level="debug")
        lay = make_layout(tmp_path, mode="inotify", profile="default")
        names = ["new\nline.jpg", os.fsdecode(b"bad\xff.jpg")]
        with running(lay):
            for i, name in enumerate(names):
                with open(os.fsencode(lay.inbox / name), "wb") as fh:
                    fh.write(image_bytes(60 + i))
            wait_for(lambda: done_rels(lay) == set(names), 20, "done")
        docs = [json.loads(line) for line in stream.getvalue().splitlines()]
        done = {d["rel"] for d in docs if d["event"] == "scan_done"}
        assert done == set(names)

    @pytest.mark.parametrize("mtime", [time.time() + 3600, 0.0])
    def test_odd_mtime(self, mtime: float, tmp_path: Path) -> None:
        """Battery 37: mtime 1 h in the future or in 1970 → still processed (monotonic stability clock)."""
        lay = make_layout(tmp_path, mode="poll")
        data = image_bytes(70)
        ex = Expect()
        ex.add("t.jpg", data)
        with running(lay):
            tmp = tmp_path / "t.jpg"
            tmp.write_bytes(data)
            os.utime(tmp, (mtime, mtime))
            os.rename(tmp, lay.inbox / "t.jpg")
            wait_for(lambda: "t.jpg" in done_rels(lay), 20, "t.jpg done")
        assert_oracle(lay, ex)


# ---- security ---------------------------------------------------------------------------------
class TestConfinement:
    def test_symlinks_never_followed(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 38: symlink to /etc/passwd, symlinked sub-folder, folder flipped into a symlink mid-scan
        → nothing outside the tree is read."""
        lay = make_layout(tmp_path, mode="inotify", rescan_seconds=0.5)
        outside = tmp_path / "outside"
        outside.mkdir()
        secret = image_bytes(80)
        (outside / "s.jpg").write_bytes(secret)
        (lay.inbox / "flip").mkdir()
        inside = image_bytes(81)
        flipped: list[bool] = []

        def hook(stage: str, item: WorkItem) -> None:
            # The moment between settling and reading: swap the folder for a symlink to outside.
            if stage == "start" and item.path.parent.name == "flip" and not flipped:
                flipped.append(True)
                os.rename(lay.inbox / "flip", lay.inbox / "flip-real")
                (lay.inbox / "flip").symlink_to(outside)

        with running(lay, hook=hook):
            (lay.inbox / "passwd.jpg").symlink_to("/etc/passwd")
            (lay.inbox / "linked").symlink_to(outside)
            (lay.inbox / "flip" / "s.jpg").write_bytes(inside)
            wait_for(lambda: "flip-real/s.jpg" in done_rels(lay), 20, "the real file, at its new path")
            wait_for(lambda: len(events(logs, "rescan")) >= 3, 15, "a few rescans")
        assert flipped
        assert all(r["sha256"] != sha(secret) for r in ledger_rows(lay))
        assert {r["rel"] for r in ledger_rows(lay)} == {"flip-real/s.jpg"}
        refused = [e["rel"] for e in events(logs, "scan_refused")]
        assert {"passwd.jpg", "flip/s.jpg"} <= set(refused) <= {"passwd.jpg", "flip/s.jpg", "linked", "flip"}
        assert len(refused) == len(set(refused))  # once each, not once per rescan
        assert quarantined(lay) == set()

    def test_output_confined(self, tmp_path: Path) -> None:
        """Battery 39: an output sub-folder that is a symlink out of the tree → nothing written there;
        quarantined with the reason."""
        lay = make_layout(tmp_path, mode="inotify")
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        lay.out.mkdir(parents=True, exist_ok=True)
        (lay.out / "sub").symlink_to(outside)
        ex = Expect()
        ex.add("sub/a.jpg", image_bytes(82), bad=True)
        with running(lay):
            (lay.inbox / "sub").mkdir()
            (lay.inbox / "sub" / "a.jpg").write_bytes(ex.originals["sub/a.jpg"])
            wait_for(lambda: quarantined(lay) == {"sub/a.jpg"}, 20, "quarantined")
        assert list(outside.iterdir()) == []
        info = json.loads((lay.failed / "sub" / "a.jpg.error.json").read_text())
        assert info["stage"] == "write" and "escapes" in info["reason"]
        (lay.out / "sub").unlink()
        assert_oracle(lay, ex)

    def test_output_base_rejects_traversal(self, tmp_path: Path) -> None:
        """Battery 39: a relative path with ``..`` or an absolute one never yields an output outside the root."""
        spec = make_layout(tmp_path).cfg().watch[0]
        for rel in (Path("../../etc/x.jpg"), Path("/etc/x.jpg"), Path("a/../../x.jpg")):
            with pytest.raises(Exception, match="escapes"):
                output_base(spec, rel)
        assert output_base(spec, Path("a/b.jpg")) == spec.output / "a" / "b"

    def test_fifo_does_not_block(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """Battery 40: a FIFO in the inbox → one warning across many rescans; other scans go on."""
        lay = make_layout(tmp_path, mode="inotify", rescan_seconds=0.3)
        os.mkfifo(lay.inbox / "pipe.jpg")
        ex = Expect()
        ex.add("ok.jpg", image_bytes(83))
        with running(lay):
            (lay.inbox / "ok.jpg").write_bytes(ex.originals["ok.jpg"])
            wait_for(lambda: "ok.jpg" in done_rels(lay), 20, "ok.jpg done")
            wait_for(lambda: len(events(logs, "rescan")) >= 5, 15, "several rescans")
        assert len(events(logs, "scan_refused", rel="pipe.jpg")) == 1
        assert_oracle(lay, ex)


# ---- observers and status ---------------------------------------------------------------------
class TestObservers:
    def test_dead_observer_restarted(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """An observer that dies is restarted, and files arriving afterwards are still seen (no rescan)."""
        lay = make_layout(tmp_path, mode="inotify")
        with running(lay) as d:
            folder = d.watches["w"].folder
            assert folder is not None and folder._observer is not None
            folder._observer.stop()
            wait_for(lambda: events(logs, "observer_dead_restarting"), 15, "restart")
            wait_for(lambda: d.watches["w"].folder is not None and d.watches["w"].folder.alive(), 15, "alive")
            (lay.inbox / "late.jpg").write_bytes(image_bytes(90))
            wait_for(lambda: "late.jpg" in done_rels(lay), 20, "late.jpg done")

    def test_inbox_replaced_under_same_name(self, tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
        """An inbox renamed away and recreated (a remount) gets a new observer; new files are seen."""
        lay = make_layout(tmp_path, mode="inotify")
        with running(lay):
            os.rename(lay.inbox, tmp_path / "old-inbox")
            lay.inbox.mkdir()
            wait_for(lambda: events(logs, "watch_folder_replaced_restarting") or events(logs, "watch_available_again"),
                     5, "observer restart")
            (lay.inbox / "new.jpg").write_bytes(image_bytes(91))
            wait_for(lambda: "new.jpg" in done_rels(lay), 20, "new.jpg done")

    def test_status_json(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``status -c CONFIG --json`` reports counts per state, recent failures with reasons, the daemon."""
        lay = make_layout(tmp_path, mode="inotify")
        with running(lay) as d:
            (lay.inbox / "ok.jpg").write_bytes(image_bytes(92))
            (lay.inbox / "bad.jpg").write_bytes(b"text, not a scan\n")
            wait_for(lambda: "ok.jpg" in done_rels(lay) and quarantined(lay) == {"bad.jpg"}, 20, "settled")
            wait_for(lambda: d.counters.done == 1 and d.counters.quarantined == 1, 15, "counters")
            d._write_status()
            capsys.readouterr()
            assert cli.main(["status", "-c", str(lay.config), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["counts"] == {"done": 1, "failed": 1}
        assert data["recent_failures"][0]["rel"] == "bad.jpg" and "not an image" in data["recent_failures"][0]["error"]
        daemon = data["daemon"]
        assert daemon["running"] and daemon["healthy"] and daemon["done"] == 1 and daemon["backlog"] == 0
        assert data["inbox"] == {"w": 1}
        assert cli.main(["status", "-c", str(lay.config), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["daemon"]["running"] is False


class TestQuarantineFile:
    @pytest.mark.parametrize("name", ["x" * 251 + ".jpg", os.fsdecode(b"bad\xff.jpg"), "new\nline.jpg"])
    def test_error_json_for_awkward_names(self, name: str, tmp_path: Path) -> None:
        """Battery 26: a 255-byte or non-UTF-8 name still gets its reason file beside it in the quarantine."""
        src = tmp_path / "in" / name
        src.parent.mkdir()
        src.write_bytes(b"junk")
        dest = quarantine(src, Path(name), tmp_path / "q", reason="not an image", stage="decode",
                          exc_type="NotAnImage", sha256=None)
        assert dest == tmp_path / "q" / name and dest.read_bytes() == b"junk" and not src.exists()
        info = json.loads(error_json_path(dest).read_text(encoding="utf-8"))
        assert info["source"] == name and info["reason"] == "not an image"
        assert len(os.fsencode(error_json_path(dest).name)) <= 255


def test_fake_matter_is_deterministic() -> None:
    """The GPU stand-in gives the same alpha for the same image (mattes can be compared across runs)."""
    img = pixels(1)
    assert (FakeMatter().predict(img) == FakeMatter().predict(img)).all()
    assert not (FakeMatter().predict(img) == FakeMatter().predict(pixels(2) // 2)).all()
