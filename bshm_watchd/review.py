"""``bshm-watchd review OUT_DIR``: one static HTML page plus thumbnails to eyeball every matte.

Per scan: the original, the matte, and the cut-out over a checkerboard and over white, with the
sidecar's model, profile, size and per-stage timings. Thumbnails live in ``OUT_DIR/.review/`` under
hashed ASCII names, every link is relative, so the folder can be copied or served as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import numpy.typing as npt
import structlog

from bshm_watchd import __version__
from bshm_watchd.decode import decode_path, to_8bit
from bshm_watchd.errors import BshmError, ConfigError
from bshm_watchd.fsutil import TEMP_PREFIX, write_with

log = structlog.get_logger(__name__)

REVIEW_DIR = ".review"
RENDER_VERSION = "1"
"""Part of every thumbnail's cache key: bump it when the rendering changes."""
CHECKER_GREYS = (119, 170)
"""Mid greys, so both a white collar and a dark coat stand out against the squares."""
CHECKER_SQUARE = 8
_THUMB_NAME = re.compile(r"^[0-9a-f]{24}[._]")
_FG, _MATTE = "_fg.png", "_matte.png"

Image = npt.NDArray[Any]


@dataclass(frozen=True)
class ScanFiles:
    """One scan's outputs; ``rel`` is ``<rel dir>/<stem>`` relative to OUT_DIR, POSIX separators."""

    rel: str
    fg: Path | None
    matte: Path | None
    sidecar: Path | None


@dataclass(frozen=True)
class Thumb:
    name: str
    width: int
    height: int


@dataclass(frozen=True)
class Thumbs:
    """Thumbnail names inside ``.review``; ``None`` where a view could not be made, ``notes`` say why."""

    original: Thumb | None
    matte: Thumb | None
    checker: Thumb | None
    white: Thumb | None
    reconstructed: bool
    notes: tuple[str, ...]


# ---- discovery -------------------------------------------------------------------------------
def find_scans(out_dir: Path) -> list[ScanFiles]:
    """Every scan with a cut-out or a matte under ``out_dir``; hidden folders (``.review``) are skipped."""
    found: dict[str, dict[str, Path]] = {}
    for root, dirs, files in os.walk(out_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(TEMP_PREFIX):
                continue  # a half-written output of a running batch
            for suffix, kind in ((_FG, "fg"), (_MATTE, "matte")):
                if name.endswith(suffix) and len(name) > len(suffix):
                    path = Path(root) / name
                    base = path.relative_to(out_dir).parent / name[: -len(suffix)]
                    found.setdefault(base.as_posix(), {})[kind] = path
    scans = []
    for rel, kinds in sorted(found.items()):
        any_path = next(iter(kinds.values()))
        side = any_path.with_name(rel.rsplit("/", 1)[-1] + ".json")
        scans.append(ScanFiles(rel, kinds.get("fg"), kinds.get("matte"), side if side.is_file() else None))
    return scans


def read_sidecar(path: Path | None) -> dict[str, Any]:
    """The sidecar as a dict; empty when absent or unreadable (the page says so, the build goes on)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def original_path(sidecar: dict[str, Any], input_root: Path | None) -> Path | None:
    """``input_root / source`` when it stays inside the input root: a sidecar is data, not a path to trust."""
    source = sidecar.get("source")
    if input_root is None or not isinstance(source, str) or not source:
        return None
    root = input_root.resolve()
    candidate = (root / source).resolve()
    if root not in candidate.parents:
        return None
    return candidate


def write_public(final: Path, data: bytes) -> None:
    """Atomic write, then 0644: the temp file is 0600 and a page served or shared as-is must be readable."""

    def fill(tmp: Path) -> None:
        tmp.write_bytes(data)
        tmp.chmod(0o644)

    write_with(final, fill)


# ---- pixels ----------------------------------------------------------------------------------
def thumb_size(w: int, h: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _shrink(img: Image, side: int) -> Image:
    h, w = img.shape[:2]
    tw, th = thumb_size(w, h, side)
    if (tw, th) == (w, h):
        return img
    out: Image = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    return out


def _read_unchanged(path: Path) -> Image:
    """Decode any PNG as stored (8 or 16 bits, 1–4 channels); bytes in, so odd file names cannot trip cv2."""
    img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path.name}: not a readable image")
    return img


def _bgra(img: Image) -> Image:
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
    return img


def _grey8(img: Image) -> Image:
    if img.ndim == 3:
        img = img[..., -1] if img.shape[2] in (2, 4) else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return to_8bit(img)


def checkerboard(h: int, w: int) -> Image:
    y, x = np.mgrid[0:h, 0:w]
    light = ((y // CHECKER_SQUARE + x // CHECKER_SQUARE) % 2).astype(bool)
    grey = np.where(light, CHECKER_GREYS[1], CHECKER_GREYS[0]).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2)


def over(premult_bgr: Image, alpha: Image, backdrop: Image) -> Image:
    """Premultiplied colour over a backdrop, all float32 in [0, 255] except ``alpha`` in [0, 1]."""
    out = premult_bgr + backdrop * (1.0 - alpha[..., None])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def cutout_views(fg: Image, side: int) -> tuple[Image, Image, Image]:
    """(colour channels only, over checkerboard, over white) 8-bit BGR thumbnails from a BGRA cut-out.

    The colour is premultiplied *before* shrinking: the cut-out's RGB is zeroed under alpha 0, and
    shrinking straight colour would blend that black into the edge and fake a dark fringe.
    """
    fg = _bgra(fg)
    top = 65535.0 if fg.dtype == np.uint16 else 255.0
    small = _shrink(fg, side).astype(np.float32) / top
    premult = cv2.multiply(fg[..., :3], cv2.merge([fg[..., 3]] * 3), scale=1.0 / top)
    pm = _shrink(premult, side).astype(np.float32) * (255.0 / top)
    alpha = small[..., 3]
    h, w = alpha.shape
    white = np.full((h, w, 3), 255.0, dtype=np.float32)
    rgb = np.clip(small[..., :3] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return rgb, over(pm, alpha, checkerboard(h, w)), over(pm, alpha, white)


def _encode(img: Image, ext: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 88] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 6]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise ValueError(f"cannot encode a {ext} thumbnail")
    return bytes(buf)


# ---- thumbnails ------------------------------------------------------------------------------
def _stat_key(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        st = path.stat()
    except OSError:
        return "?"
    return f"{os.fsencode(path).hex()}:{st.st_size}:{st.st_mtime_ns}"


def cache_key(scan: ScanFiles, original: Path | None, side: int) -> str:
    """Changes whenever an input of the thumbnails changes, so a rebuild redoes only what is stale."""
    parts = [RENDER_VERSION, str(side), os.fsencode(scan.rel).hex()]
    parts += [_stat_key(p) for p in (scan.fg, scan.matte, original)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


class ThumbWriter:
    """Writes one scan's thumbnails into ``folder`` (atomically, one full-size image in memory at a time)."""

    def __init__(self, folder: Path, side: int) -> None:
        if not 16 <= side <= 4096:
            raise ConfigError(f"thumbnail side {side} outside 16..4096")
        self.folder = folder
        self.side = side

    def _put(self, key: str, kind: str, img: Image, ext: str) -> Thumb:
        name = f"{key}_{kind}{ext}"
        write_public(self.folder / name, _encode(img, ext))
        return Thumb(name, int(img.shape[1]), int(img.shape[0]))

    def cached(self, key: str) -> Thumbs | None:
        try:
            raw = json.loads((self.folder / f"{key}.json").read_bytes())
            views = {k: Thumb(**raw[k]) if raw[k] else None for k in ("original", "matte", "checker", "white")}
            thumbs = Thumbs(reconstructed=bool(raw["reconstructed"]), notes=tuple(raw["notes"]), **views)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        present = all((self.folder / t.name).is_file() for t in views.values() if t is not None)
        return thumbs if present else None

    def render(self, scan: ScanFiles, original: Path | None, key: str) -> Thumbs:
        """Read errors become notes on the page; write errors (a full disk) propagate and stop the build."""
        notes: list[str] = []
        views: dict[str, Thumb | None] = dict.fromkeys(("original", "matte", "checker", "white"))
        reconstructed = False
        if original is not None:
            try:
                rgb = cv2.cvtColor(to_8bit(_shrink(decode_path(original).rgb, self.side)), cv2.COLOR_RGB2BGR)
            except (BshmError, cv2.error, ValueError) as exc:
                notes.append(f"original unreadable: {exc}")
            else:
                views["original"] = self._put(key, "original", rgb, ".jpg")
        if scan.fg is None:
            notes.append("no cut-out (_fg.png) written for this scan")
        else:
            try:
                rgb8, checker, white = cutout_views(_read_unchanged(scan.fg), self.side)
            except (OSError, cv2.error, ValueError) as exc:
                notes.append(f"cut-out unreadable: {exc}")
            else:
                views["checker"] = self._put(key, "checker", checker, ".jpg")
                views["white"] = self._put(key, "white", white, ".jpg")
                if views["original"] is None:
                    views["original"] = self._put(key, "original", rgb8, ".jpg")
                    reconstructed = True
        if scan.matte is None:
            notes.append("no matte (_matte.png) written for this scan")
        else:
            try:
                matte = _shrink(_grey8(_read_unchanged(scan.matte)), self.side)
            except (OSError, cv2.error, ValueError) as exc:
                notes.append(f"matte unreadable: {exc}")
            else:
                views["matte"] = self._put(key, "matte", matte, ".png")
        thumbs = Thumbs(reconstructed=reconstructed, notes=tuple(notes), **views)
        # Written last: a crash mid-scan leaves no index, so the next build redoes the scan.
        write_public(self.folder / f"{key}.json", json.dumps(asdict(thumbs)).encode())
        return thumbs

    def prune(self, keep: set[str]) -> int:
        """Remove thumbnails no scan refers to any more (ours only: hashed names)."""
        removed = 0
        for path in self.folder.iterdir():
            if _THUMB_NAME.match(path.name) and path.name[:24] not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


# ---- page ------------------------------------------------------------------------------------
def _text(value: object) -> str:
    """HTML-escaped display text; undecodable bytes in a file name become U+FFFD instead of a crash."""
    s = os.fsencode(value).decode("utf-8", "replace") if isinstance(value, str) else str(value)
    return html.escape(s, quote=True)


def _href(target: Path, page_dir: Path) -> str:
    rel = os.path.relpath(target, page_dir)
    return html.escape(quote(os.fsencode(Path(rel).as_posix()), safe="/"), quote=True)


def _ms_line(ms: object) -> str:
    if not isinstance(ms, dict):
        return ""
    stages = [(str(k), float(v)) for k, v in ms.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    if not stages:
        return ""
    parts = [f"{_text(k)} {v:,.0f}&nbsp;ms" for k, v in stages]
    total = sum(v for _, v in stages)
    return f'<p class="ms">{" · ".join(parts)} · <b>total {total / 1000:.2f}&nbsp;s</b></p>'


def _meta_line(side: dict[str, Any], has_file: bool) -> str:
    if not side:
        why = "sidecar unreadable" if has_file else "no sidecar (profile without <code>sidecar: true</code>)"
        return f'<p class="meta">{why}</p>'
    bits = [f"{label} <b>{_text(side[k])}</b>" for k, label in (("model", "model"), ("profile", "profile"))
            if k in side]
    if "width" in side and "height" in side:
        bits.append(f"{_text(side['width'])}×{_text(side['height'])}")
    if "bit_depth" in side:
        bits.append(f"{_text(side['bit_depth'])}-bit {_text(side.get('format', ''))}".rstrip())
    if "source" in side:
        bits.append(f"source <code>{_text(side['source'])}</code>")
    return f'<p class="meta">{" · ".join(bits)}</p>'


def _figure(thumb: Thumb | None, folder: Path, page_dir: Path, caption: str, cls: str,
            link: Path | None, alt: str) -> str:
    if thumb is None:
        return (f'<figure class="{cls} missing"><div class="none">not available</div>'
                f"<figcaption>{caption}</figcaption></figure>")
    img = (f'<img src="{_href(folder / thumb.name, page_dir)}" width="{thumb.width}" height="{thumb.height}" '
           f'alt="{_text(alt)}">')
    if link is not None:
        img = f'<a href="{_href(link, page_dir)}">{img}</a>'
    return f'<figure class="{cls}">{img}<figcaption>{caption}</figcaption></figure>'


def scan_section(scan: ScanFiles, side: dict[str, Any], thumbs: Thumbs, folder: Path, page_dir: Path,
                 index: int) -> str:
    orig_caption = "original"
    if thumbs.reconstructed:
        orig_caption = "original not found: <em>reconstructed</em> from the cut-out (background lost)"
    figs = [
        _figure(thumbs.original, folder, page_dir, orig_caption, "original", None, f"original of {scan.rel}"),
        _figure(thumbs.matte, folder, page_dir, "matte", "matte", scan.matte, f"matte of {scan.rel}"),
        _figure(thumbs.checker, folder, page_dir, "cut-out over checkerboard", "checker", scan.fg,
                f"cut-out of {scan.rel} over a checkerboard"),
        _figure(thumbs.white, folder, page_dir, "cut-out over white", "white", scan.fg,
                f"cut-out of {scan.rel} over white"),
    ]
    notes = "".join(f'<p class="note">{_text(n)}</p>' for n in thumbs.notes)
    meta = _meta_line(side, scan.sidecar is not None) + _ms_line(side.get("ms"))
    return (f'<section class="scan" id="scan-{index}"><h2>{_text(scan.rel)}</h2>{meta}{notes}'
            f'<div class="row">{"".join(figs)}</div></section>\n')


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;background:#f4f4f4;color:#222}
h1{font-size:1.4em}h2{font-size:1.05em;margin:0 0 .3em;word-break:break-all}
.scan{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:0 0 1.2em}
.meta,.ms,.note{margin:.2em 0;color:#555}.note{color:#a40}
.row{display:grid;grid-template-columns:repeat(4,minmax(0,SIDEpx));gap:10px;align-items:start}
figure{margin:0}figure img{display:block;max-width:100%;height:auto;border:1px solid #ccc}
figcaption{font-size:12px;color:#666}.none{width:160px;height:120px;display:flex;align-items:center;
justify-content:center;background:#eee;color:#999}img.broken{outline:3px solid #d00}
#load-status[data-broken]:not([data-broken="0"]){color:#d00;font-weight:bold}"""

# Written into the page so that anyone (and the headless test) sees at a glance whether every
# thumbnail loaded: a copied page without its .review folder says so instead of showing blanks.
_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  broken.forEach(function (i) { i.classList.add("broken"); });
  var s = document.getElementById("load-status");
  s.setAttribute("data-total", String(imgs.length));
  s.setAttribute("data-broken", String(broken.length));
  s.setAttribute("data-state", "loaded");
  s.textContent = broken.length ? broken.length + " of " + imgs.length + " thumbnails failed to load"
                                : "all " + imgs.length + " thumbnails loaded";
});
</script>"""


def page_html(title: str, sections: list[str], side: int, summary: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="bshm-watchd {_text(__version__)}">'
            f"<title>review: {_text(title)}</title><style>{_CSS.replace('SIDE', str(side))}</style></head>\n"
            f"<body><h1>Review of <code>{_text(title)}</code></h1><p>{summary}</p>"
            f'<p id="load-status" data-state="pending">thumbnails loading…</p>\n'
            f"{''.join(sections) or '<p>No scans found (no <code>*_fg.png</code> or <code>*_matte.png</code>).</p>'}"
            f"{_SCRIPT}</body></html>\n")


def _scans_with_thumbs(scans: list[ScanFiles], writer: ThumbWriter,
                       input_root: Path | None) -> Iterator[tuple[ScanFiles, dict[str, Any], Thumbs, str, bool]]:
    for scan in scans:
        side = read_sidecar(scan.sidecar)
        original = original_path(side, input_root)
        if original is not None and not original.is_file():
            original = None
        key = cache_key(scan, original, writer.side)
        t0 = time.perf_counter()
        thumbs = writer.cached(key)
        fresh = thumbs is None
        if thumbs is None:
            thumbs = writer.render(scan, original, key)
            log.debug("review_thumbs", scan=scan.rel, ms=round((time.perf_counter() - t0) * 1000, 1))
        yield scan, side, thumbs, key, fresh


def build_review(out_dir: Path, *, input_root: Path | None = None, thumb_side: int = 512,
                 dest: Path | None = None) -> Path:
    """Write the review page (default ``out_dir/review.html``) and its thumbnails; return the page's path."""
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: not a folder")
    if input_root is not None and not input_root.is_dir():
        raise ConfigError(f"{input_root}: input root is not a folder")
    t0 = time.perf_counter()
    dest = dest if dest is not None else out_dir / "review.html"
    page_dir = dest.resolve().parent
    folder = out_dir.resolve() / REVIEW_DIR
    writer = ThumbWriter(folder, thumb_side)
    folder.mkdir(parents=True, exist_ok=True)
    scans = find_scans(out_dir.resolve())
    sections: list[str] = []
    keys: set[str] = set()
    with_notes = rebuilt = 0
    for i, (scan, side, thumbs, key, fresh) in enumerate(_scans_with_thumbs(scans, writer, input_root)):
        sections.append(scan_section(scan, side, thumbs, folder, page_dir, i))
        keys.add(key)
        with_notes += bool(thumbs.notes) or thumbs.reconstructed
        rebuilt += fresh
    pruned = writer.prune(keys)
    summary = (f"{len(scans)} scan(s); {with_notes} with a note. Originals from "
               + (f"<code>{_text(str(input_root))}</code>" if input_root else "nowhere (no <code>--input</code>): "
                  "reconstructed from the cut-outs") + ".")
    write_public(dest, page_html(out_dir.resolve().name, sections, thumb_side, summary).encode("utf-8"))
    log.info("review_done", page=str(dest), scans=len(scans), rebuilt=rebuilt, pruned=pruned,
             ms=round((time.perf_counter() - t0) * 1000, 1))
    return dest


# ---- CLI -------------------------------------------------------------------------------------
def add_review_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``review OUT_DIR [--input ROOT] [--thumb-side N] [-o FILE]`` on a subparsers object."""
    rv: argparse.ArgumentParser = sub.add_parser("review", help="static HTML page to eyeball the mattes in OUT_DIR")
    rv.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    rv.add_argument("--input", type=Path, default=None, metavar="ROOT",
                    help="input root the sidecars' sources are relative to (else originals are reconstructed)")
    rv.add_argument("--thumb-side", type=int, default=512, metavar="N", help="longest thumbnail side (16..4096)")
    rv.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                    help="page to write (default OUT_DIR/review.html)")
    rv.set_defaults(func=cmd_review)
    return rv


def cmd_review(args: argparse.Namespace) -> int:
    try:
        page = build_review(args.out_dir, input_root=args.input, thumb_side=args.thumb_side, dest=args.output)
    except OSError as exc:  # a full disk or a read-only share: one line, not a traceback
        raise BshmError(f"review of {args.out_dir} failed: {exc}") from exc
    print(page)
    return 0
