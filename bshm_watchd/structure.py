"""Is a file structurally complete? Read from its own bytes, not from how long ago it changed.

A scanner that pauses longer than the settle window leaves a prefix that is size- and
mtime-stable; only the structure tells it apart from the finished file:
JPEG segments up to the scan data, then EOI at the end; PNG's IEND chunk last; TIFF's
directories and strips inside the file; BMP/WebP's declared size reached.
"""

from __future__ import annotations

import enum
import os
import struct
from typing import BinaryIO

PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
MAGICS = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM", b"RIFF")


class Completeness(enum.Enum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    NOT_IMAGE = "not_image"
    """Unknown magic: let the decoder say what it is (and quarantine it)."""


def check_file(fh: BinaryIO) -> Completeness:
    """The verdict on an open file; never raises for any content (a raise would stall the whole gate)."""
    size = os.fstat(fh.fileno()).st_size
    try:
        return _check(fh, size)
    except (struct.error, ValueError, OverflowError):
        return Completeness.NOT_IMAGE  # nonsense inside the header: the decoder will say what it is


def _check(fh: BinaryIO, size: int) -> Completeness:
    if size == 0:
        # A 0-byte file is a scanner's placeholder until proven otherwise.
        return Completeness.INCOMPLETE
    fh.seek(0)
    head = fh.read(16)
    if head.startswith(b"\xff\xd8"):
        return _jpeg(fh, size)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _tail_is(fh, size, PNG_IEND)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        if size < 8:
            return Completeness.INCOMPLETE  # the first IFD offset is not even there yet
        return _tiff(fh, size, head[:2] == b"II")
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return Completeness.COMPLETE  # BigTIFF: rare from scanners; the settle window and decoder decide
    if head.startswith(b"BM") and len(head) >= 6:
        declared = struct.unpack("<I", head[2:6])[0]
        return Completeness.COMPLETE if size >= declared > 0 else Completeness.INCOMPLETE
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        declared = struct.unpack("<I", head[4:8])[0] + 8
        return Completeness.COMPLETE if size >= declared else Completeness.INCOMPLETE
    short = (head.startswith(b"RIFF") and len(head) < 12) or (head.startswith(b"BM") and len(head) < 6)
    if short or any(m.startswith(head) for m in MAGICS):
        return Completeness.INCOMPLETE  # the first bytes of an image's magic, and a writer that paused
    return Completeness.NOT_IMAGE


def _tail_is(fh: BinaryIO, size: int, tail: bytes) -> Completeness:
    if size < len(tail):
        return Completeness.INCOMPLETE
    fh.seek(size - len(tail))
    return Completeness.COMPLETE if fh.read(len(tail)) == tail else Completeness.INCOMPLETE


def _jpeg(fh: BinaryIO, size: int) -> Completeness:
    """Walk marker segments to the first SOS (so an EXIF thumbnail's EOI cannot fool us), then EOI last."""
    pos = 2
    while True:
        fh.seek(pos)
        marker = fh.read(4)
        if len(marker) < 4:
            return Completeness.INCOMPLETE
        if marker[0] != 0xFF:
            return Completeness.INCOMPLETE  # corrupt; the decoder will say so once the file is stable
        code = marker[1]
        if code == 0xFF:  # fill byte
            pos += 1
            continue
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            pos += 2
            continue
        length = struct.unpack(">H", marker[2:4])[0]
        if pos + 2 + length > size:
            return Completeness.INCOMPLETE
        if code == 0xDA:  # start of scan: entropy-coded data follows up to EOI
            break
        pos += 2 + length
    # Trailing NULs (some writers pad to a block size) are allowed after EOI.
    fh.seek(max(0, size - 4096))
    tail = fh.read().rstrip(b"\x00")
    return Completeness.COMPLETE if tail.endswith(b"\xff\xd9") else Completeness.INCOMPLETE


def _tiff(fh: BinaryIO, size: int, little: bool) -> Completeness:
    e = "<" if little else ">"
    fh.seek(4)
    (ifd,) = struct.unpack(e + "I", fh.read(4))
    seen: set[int] = set()
    type_sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}
    while ifd:
        if ifd in seen or len(seen) > 4096:
            return Completeness.NOT_IMAGE  # IFD loop / absurd page count: let the decoder reject it
        seen.add(ifd)
        if ifd + 2 > size:
            return Completeness.INCOMPLETE
        fh.seek(ifd)
        (count,) = struct.unpack(e + "H", fh.read(2))
        end = ifd + 2 + 12 * count + 4
        if end > size:
            return Completeness.INCOMPLETE
        entries = fh.read(12 * count)
        offsets: list[int] = []
        counts: list[int] = []
        for i in range(count):
            tag, typ, n, value = struct.unpack(e + "HHI4s", entries[12 * i:12 * i + 12])
            width = type_sizes.get(typ, 1) * n
            if width > 4:
                (voff,) = struct.unpack(e + "I", value)
                if voff + width > size:
                    return Completeness.INCOMPLETE
                if tag in (273, 279, 324, 325) and typ in (3, 4):
                    fh.seek(voff)
                    vals = list(struct.unpack(e + ("H" if typ == 3 else "I") * n, fh.read(width)))
                else:
                    vals = []
            elif tag in (273, 279, 324, 325) and typ in (3, 4):
                fmt = e + ("H" if typ == 3 else "I") * n
                vals = list(struct.unpack(fmt, value[: struct.calcsize(fmt)]))
            else:
                vals = []
            if tag in (273, 324):  # StripOffsets / TileOffsets
                offsets = vals
            elif tag in (279, 325):  # StripByteCounts / TileByteCounts
                counts = vals
        if offsets and counts and max(o + c for o, c in zip(offsets, counts, strict=False)) > size:
            return Completeness.INCOMPLETE
        fh.seek(ifd + 2 + 12 * count)
        (ifd,) = struct.unpack(e + "I", fh.read(4))
    return Completeness.COMPLETE
