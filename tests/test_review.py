"""The review page: discovery, thumbnails (8- and 16-bit), escaping, relative links, and a headless browser load."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from structlog.testing import capture_logs

from bshm_watchd.errors import BshmError, ConfigError
from bshm_watchd.review import (
    CHECKER_GREYS,
    REVIEW_DIR,
    add_review_parser,
    build_review,
    cmd_review,
    find_scans,
    thumb_size,
)

HOSTILE = "a<img src=x onerror=alert(1)>&\"c' d é &amp; 写真"
SIDE = 32


# ---- helpers ---------------------------------------------------------------------------------
def _write_png(path: Path, img: npt.NDArray[Any]) -> None:
    """cv2.imencode + tofile: works for any file name cv2.imwrite might mangle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    buf.tofile(str(path))


def _disc_matte(h: int, w: int) -> npt.NDArray[np.uint8]:
    matte = np.zeros((h, w), np.uint8)
    cv2.circle(matte, (w // 2, h // 2), min(h, w) // 3, 255, -1)
    return matte


def make_scan(out: Path, rel: str, *, h: int = 64, w: int = 48, depth: int = 8, colour: tuple[int, int, int] = (
        200, 40, 90), sidecar: dict[str, Any] | None = None, fg: bool = True, matte: bool = True) -> None:
    """Write ``<rel>_fg.png`` (BGRA, RGB zeroed under alpha 0, like the pipeline) and ``<rel>_matte.png``."""
    m = _disc_matte(h, w)
    if fg:
        top = 65535 if depth == 16 else 255
        dtype = np.uint16 if depth == 16 else np.uint8
        bgra = np.zeros((h, w, 4), dtype)
        bgra[..., :3] = np.array(colour[::-1], np.float64) * top / 255
        bgra[..., 3] = m.astype(np.uint32) * top // 255
        bgra[m == 0, :3] = 0
        _write_png(out / f"{rel}_fg.png", bgra)
    if matte:
        _write_png(out / f"{rel}_matte.png", m)
    if sidecar is not None:
        (out / f"{rel}.json").write_text(json.dumps(sidecar), encoding="utf-8")


class _Collector(HTMLParser):
    """Collects img src, a href, h2 texts and the load-status attributes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.h2: list[str] = []
        self.status: dict[str, str | None] = {}
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"] or "")
        elif tag == "a":
            self.hrefs.append(a["href"] or "")
        elif tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        elif a.get("id") == "load-status":
            self.status = a

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2[-1] += data


def parse(page: Path) -> _Collector:
    c = _Collector()
    c.feed(page.read_text(encoding="utf-8"))
    return c


def resolves(base: Path, link: str) -> bool:
    """Whether a relative, percent-encoded link from a page in ``base`` names an existing file (bytes-exact)."""
    return os.path.isfile(os.fsencode(base) + b"/" + unquote_to_bytes(link))


def read_thumb(page: Path, src: str) -> npt.NDArray[Any]:
    img = cv2.imdecode(np.fromfile(page.parent / unquote(src), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img


def thumb_of(page: Path, kind: str, index: int = 0) -> npt.NDArray[Any]:
    srcs = [s for s in parse(page).srcs if re.search(rf"_{kind}\.(jpg|png)$", s)]
    return read_thumb(page, srcs[index])


# ---- discovery -------------------------------------------------------------------------------
class TestFindScans:
    def test_groups_outputs_and_sidecar(self, tmp_path: Path) -> None:
        """fg, matte and sidecar of one stem form one scan; nested folders keep their relative path."""
        make_scan(tmp_path, "x", sidecar={"source": "x.jpg"})
        make_scan(tmp_path, "sub/y", fg=False)
        scans = find_scans(tmp_path)
        assert [s.rel for s in scans] == ["sub/y", "x"]
        assert scans[1].fg and scans[1].matte and scans[1].sidecar
        assert scans[0].fg is None and scans[0].sidecar is None

    def test_suffix_lookalike_stems(self, tmp_path: Path) -> None:
        """A source named ``p_matte.jpg`` gives ``p_matte_fg.png``/``p_matte_matte.png``: one scan, not two."""
        make_scan(tmp_path, "p_matte")
        assert [s.rel for s in find_scans(tmp_path)] == ["p_matte"]

    def test_skips_review_folder_and_temps(self, tmp_path: Path) -> None:
        """Our own thumbnails and a batch's half-written temp files are not scans."""
        make_scan(tmp_path, f"{REVIEW_DIR}/old")
        (tmp_path / ".bshm-tmp-abc_fg.png").write_bytes(b"partial")
        make_scan(tmp_path, "real")
        assert [s.rel for s in find_scans(tmp_path)] == ["real"]


# ---- build -----------------------------------------------------------------------------------
class TestBuildReview:
    def test_lists_every_scan_with_four_views(self, tmp_path: Path) -> None:
        """Each scan gets a section with original, matte, checkerboard and white thumbnails."""
        names = ["one", "two", "deep/three"]
        for n in names:
            make_scan(tmp_path, n)
        page = build_review(tmp_path, thumb_side=SIDE)
        assert page == tmp_path / "review.html"
        c = parse(page)
        assert sorted(c.h2) == sorted(names)
        assert len(c.srcs) == 4 * len(names)
        for kind in ("original", "matte", "checker", "white"):
            assert sum(s.endswith((f"_{kind}.jpg", f"_{kind}.png")) for s in c.srcs) == len(names)

    def test_hostile_names_escaped_and_links_resolve(self, tmp_path: Path) -> None:
        """Names with < & quotes spaces and non-ASCII appear escaped, round-trip exactly, and every link resolves."""
        rel = f"dir {HOSTILE}/{HOSTILE}"
        make_scan(tmp_path, rel, sidecar={"source": f"{HOSTILE}.png", "model": "<script>x</script>"})
        page = build_review(tmp_path, thumb_side=SIDE)
        text = page.read_text(encoding="utf-8")
        assert "<img src=x" not in text and "<script>x" not in text
        c = parse(page)
        assert c.h2 == [rel]
        assert len(c.hrefs) == 3
        for link in c.srcs + c.hrefs:
            assert not link.startswith(("/", "file:")), link
            assert resolves(page.parent, link), link
        assert {Path(unquote(h)).name for h in c.hrefs} == {f"{HOSTILE}_fg.png", f"{HOSTILE}_matte.png"}

    def test_undecodable_file_name(self, tmp_path: Path) -> None:
        """A file name that is not UTF-8 still gets a page (shown with U+FFFD) and a working link."""
        raw = os.fsdecode(b"latin1-\xe9t\xe9")
        make_scan(tmp_path, raw)
        page = build_review(tmp_path, thumb_side=SIDE)
        c = parse(page)
        assert c.h2 == ["latin1-\ufffdt\ufffd"]
        assert len(c.hrefs) == 3 and all(resolves(page.parent, h) for h in c.hrefs)

    def test_sixteen_bit_cutout(self, tmp_path: Path) -> None:
        """A 16-bit fg gives correct 8-bit thumbnails: colour inside, white/checker outside, no dark fringe."""
        colour = (250, 250, 250)
        make_scan(tmp_path, "deep", h=256, w=192, depth=16, colour=colour)
        page = build_review(tmp_path, thumb_side=64)
        white = thumb_of(page, "white")
        checker = thumb_of(page, "checker")
        assert white.shape[:2] == (64, 48) and white.dtype == np.uint8
        assert np.abs(white[32, 24].astype(int) - 250).max() <= 3  # centre of the disc
        assert white[1, 1].min() >= 252  # outside: white
        # Shrinking straight colour zeroed under alpha 0 would darken the disc's rim far below both 250 and 255.
        assert white.min() >= 240
        assert {int(checker[1, 1, 0]), int(checker[1, 12, 0])} <= set(range(CHECKER_GREYS[0] - 4,
                                                                            CHECKER_GREYS[1] + 5))
        assert abs(int(checker[1, 1, 0]) - int(checker[1, 9, 0])) > 30  # neighbouring squares differ

    def test_missing_original_is_reconstructed_and_said(self, tmp_path: Path) -> None:
        """With the source absent from the input root, the original comes from the fg and the page says so."""
        inp, out = tmp_path / "in", tmp_path / "out"
        inp.mkdir()
        make_scan(out, "gone", sidecar={"source": "gone.png", "ms": {"decode": 5.0}})
        page = build_review(out, input_root=inp, thumb_side=SIDE)
        text = page.read_text(encoding="utf-8")
        assert "reconstructed" in text
        orig = thumb_of(page, "original")
        assert orig[1, 1].max() <= 12  # the cut-out's background was zeroed, so the reconstruction is black there

    def test_original_from_input_root(self, tmp_path: Path) -> None:
        """An existing original is shown from the input root, background included, without a reconstruction note."""
        inp, out = tmp_path / "in", tmp_path / "out"
        _write_png(inp / "sub" / "pic.png", np.full((64, 48, 3), (30, 160, 220), np.uint8))
        make_scan(out, "sub/pic", sidecar={"source": "sub/pic.png"})
        page = build_review(out, input_root=inp, thumb_side=SIDE)
        assert "reconstructed" not in page.read_text(encoding="utf-8")
        orig = thumb_of(page, "original")
        assert np.abs(orig[1, 1].astype(int) - (30, 160, 220)).max() <= 4

    def test_source_outside_input_root_not_read(self, tmp_path: Path) -> None:
        """A sidecar whose source climbs out of the input root is not followed."""
        inp, out = tmp_path / "in", tmp_path / "out"
        inp.mkdir()
        _write_png(tmp_path / "secret.png", np.full((8, 8, 3), 255, np.uint8))
        make_scan(out, "s", sidecar={"source": "../secret.png"})
        page = build_review(out, input_root=inp, thumb_side=SIDE)
        assert "reconstructed" in page.read_text(encoding="utf-8")

    def test_timings_and_meta_shown(self, tmp_path: Path) -> None:
        """Model, profile, size and every stage's milliseconds from the sidecar appear, with the total."""
        side = {"source": "t.jpg", "model": "fusion", "profile": "old-photo", "width": 48, "height": 64,
                "bit_depth": 8, "format": "JPEG", "ms": {"decode": 12.0, "matting": 4988.0}}
        make_scan(tmp_path, "t", sidecar=side)
        text = build_review(tmp_path, thumb_side=SIDE).read_text(encoding="utf-8")
        for needle in ("fusion", "old-photo", "48×64", "decode 12", "matting 4,988", "total 5.00"):
            assert needle in text, needle

    def test_partial_and_corrupt_outputs(self, tmp_path: Path) -> None:
        """A scan without fg, one with a corrupt fg and a corrupt sidecar get notes; the others still render."""
        make_scan(tmp_path, "matte_only", fg=False)
        make_scan(tmp_path, "broken")
        (tmp_path / "broken_fg.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        (tmp_path / "broken.json").write_text("{truncated", encoding="utf-8")
        make_scan(tmp_path, "fine")
        page = build_review(tmp_path, thumb_side=SIDE)
        text = page.read_text(encoding="utf-8")
        assert "no cut-out" in text and "cut-out unreadable" in text and "sidecar unreadable" in text
        assert len(parse(page).srcs) == 1 + 1 + 4  # matte only; matte only; all four

    def test_rebuild_reuses_and_prunes(self, tmp_path: Path) -> None:
        """A second build renders nothing; a changed fg is re-rendered and its old thumbnails removed."""
        make_scan(tmp_path, "a")
        make_scan(tmp_path, "b")
        build_review(tmp_path, thumb_side=SIDE)
        before = set(os.listdir(tmp_path / REVIEW_DIR))
        with capture_logs() as logs:
            build_review(tmp_path, thumb_side=SIDE)
        assert [e["rebuilt"] for e in logs if e["event"] == "review_done"] == [0]
        assert set(os.listdir(tmp_path / REVIEW_DIR)) == before
        make_scan(tmp_path, "a", colour=(10, 10, 10), h=66)
        with capture_logs() as logs:
            build_review(tmp_path, thumb_side=SIDE)
        assert [e["rebuilt"] for e in logs if e["event"] == "review_done"] == [1]
        after = set(os.listdir(tmp_path / REVIEW_DIR))
        assert len(after) == len(before) and after != before

    def test_copied_folder_still_works(self, tmp_path: Path) -> None:
        """Links are relative: a copy of the output folder resolves every image and link."""
        make_scan(tmp_path / "out", "x y")
        build_review(tmp_path / "out", thumb_side=SIDE)
        shutil.copytree(tmp_path / "out", tmp_path / "copy")
        shutil.rmtree(tmp_path / "out")
        c = parse(tmp_path / "copy" / "review.html")
        assert c.srcs and all(resolves(tmp_path / "copy", x) for x in c.srcs + c.hrefs)

    def test_thumbnails_are_world_readable(self, tmp_path: Path) -> None:
        """Page and thumbnails are 0644, so a web server or a colleague on the share can read them."""
        make_scan(tmp_path, "p")
        page = build_review(tmp_path, thumb_side=SIDE)
        for f in [page, *(tmp_path / REVIEW_DIR).iterdir()]:
            assert f.stat().st_mode & 0o777 == 0o644, f

    def test_write_failure_propagates(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A full disk stops the build with OSError (not a note saying the cut-out is unreadable), no page written."""

        def full(final: Path, writer: Any, suffix: str = "") -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        make_scan(tmp_path, "x")
        monkeypatch.setattr("bshm_watchd.review.write_with", full)
        with pytest.raises(OSError, match="No space"):
            build_review(tmp_path, thumb_side=SIDE)
        assert not (tmp_path / "review.html").exists()

    def test_bad_arguments(self, tmp_path: Path) -> None:
        """A missing folder or an absurd thumbnail side fails up front with ConfigError."""
        with pytest.raises(ConfigError):
            build_review(tmp_path / "nope")
        with pytest.raises(ConfigError):
            build_review(tmp_path, thumb_side=4)

    def test_thumb_size_never_upscales(self) -> None:
        """Small scans keep their size; large ones fit the longest side."""
        assert thumb_size(40, 30, 512) == (40, 30)
        assert thumb_size(4000, 3000, 512) == (512, 384)


# ---- CLI -------------------------------------------------------------------------------------
class TestCli:
    def test_review_command(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``review OUT_DIR -o FILE --thumb-side N`` writes the page where asked and prints its path."""
        make_scan(tmp_path / "out", "c")
        parser = argparse.ArgumentParser()
        add_review_parser(parser.add_subparsers(dest="command"))
        dest = tmp_path / "elsewhere" / "r.html"
        dest.parent.mkdir()
        args = parser.parse_args(["review", str(tmp_path / "out"), "-o", str(dest), "--thumb-side", "20"])
        assert args.func is cmd_review
        assert cmd_review(args) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == str(dest)  # log lines may precede it
        c = parse(dest)
        assert all(resolves(dest.parent, x) for x in c.srcs + c.hrefs)
        assert max(thumb_of(dest, "white").shape[:2]) == 20

    def test_write_failure_is_one_line_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An OSError while writing becomes a BshmError, which cli.main prints as one line with an exit code."""

        def full(final: Path, writer: Any, suffix: str = "") -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        make_scan(tmp_path, "x")
        monkeypatch.setattr("bshm_watchd.review.write_with", full)
        parser = argparse.ArgumentParser()
        add_review_parser(parser.add_subparsers(dest="command"))
        with pytest.raises(BshmError, match="No space"):
            cmd_review(parser.parse_args(["review", str(tmp_path)]))


# ---- browser ---------------------------------------------------------------------------------
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless browser check needs Debian's `chromium` package (apt-get install -y chromium)")
    return exe


def load_status(exe: str, page: Path, profile: Path) -> dict[str, str | None]:
    """Open ``page`` headless and return the load-status element the page's script fills after window load."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = _Collector()
    c.feed(proc.stdout)
    return c.status


class TestInBrowser:
    def test_every_image_loads(self, tmp_path: Path) -> None:
        """In headless Chromium every <img> has naturalWidth > 0, hostile and 16-bit scans included."""
        exe = _chromium()
        out = tmp_path / "out"
        make_scan(out, HOSTILE, sidecar={"source": "x.png"})
        make_scan(out, f"sub {HOSTILE}/deep", depth=16)
        make_scan(out, "plain")
        page = build_review(out, thumb_side=SIDE)
        status = load_status(exe, page, tmp_path / "profile")
        assert status.get("data-state") == "loaded", status
        assert status.get("data-total") == "12"
        assert status.get("data-broken") == "0"

    def test_missing_thumbnail_is_reported(self, tmp_path: Path) -> None:
        """The check can fail: with one thumbnail deleted, the browser counts exactly one broken image."""
        exe = _chromium()
        make_scan(tmp_path / "out", "a")
        page = build_review(tmp_path / "out", thumb_side=SIDE)
        next((tmp_path / "out" / REVIEW_DIR).glob("*_white.jpg")).unlink()
        status = load_status(exe, page, tmp_path / "profile")
        assert status.get("data-state") == "loaded", status
        assert (status.get("data-total"), status.get("data-broken")) == ("4", "1")
