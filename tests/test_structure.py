"""Structural completeness: every proper prefix of a scan is incomplete, the whole file complete."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from daemon_helpers import image_bytes, pixels
from PIL import Image

from bshm_watchd.structure import Completeness, check_file


def verdict(data: bytes, tmp_path: Path) -> Completeness:
    p = tmp_path / "scan"
    p.write_bytes(data)
    with open(p, "rb") as fh:
        return check_file(fh)


def with_exif_thumbnail() -> bytes:
    """A JPEG whose APP1 carries a whole JPEG thumbnail, EOI included."""
    thumb = image_bytes(3, "JPEG", 32, 24)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "scan"
    Image.fromarray(pixels(4)).save(buf, "JPEG", exif=exif.tobytes() + thumb)
    return buf.getvalue()


def tiny_tiff(e: str) -> bytes:
    """A 4×2 grey TIFF with its IFD first and its one strip after it, in byte order ``e``."""
    entries = [(256, 3, 1, 4), (257, 3, 1, 2), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 0), (278, 3, 1, 2), (279, 4, 1, 8)]
    ifd_size = 2 + 12 * len(entries) + 4
    strip_at = 8 + ifd_size
    out = (b"II*\x00" if e == "<" else b"MM\x00*") + struct.pack(e + "I", 8) + struct.pack(e + "H", len(entries))
    for tag, typ, n, value in entries:
        value = strip_at if tag == 273 else value
        packed = struct.pack(e + "H", value) + b"\x00\x00" if typ == 3 else struct.pack(e + "I", value)
        out += struct.pack(e + "HHI", tag, typ, n) + packed
    return out + struct.pack(e + "I", 0) + bytes(range(8))


FORMATS = ["JPEG", "PNG", "TIFF", "BMP", "WEBP"]


class TestCheckFile:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_whole_file_complete(self, fmt: str, tmp_path: Path) -> None:
        """A finished file of each format is complete."""
        assert verdict(image_bytes(1, fmt), tmp_path) is Completeness.COMPLETE

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_every_prefix_incomplete(self, fmt: str, tmp_path: Path) -> None:
        """Cut anywhere (a writer that paused), the file is never taken as complete."""
        data = image_bytes(1, fmt)
        cuts = sorted({0, 1, 2, 3, 5, 7, 9, 13, 17, *range(20, len(data), max(1, len(data) // 97)), len(data) - 1})
        wrong = [n for n in cuts if verdict(data[:n], tmp_path) is Completeness.COMPLETE]
        assert wrong == []

    @pytest.mark.parametrize("order", ["<", ">"])
    def test_hand_built_tiff_both_orders(self, order: str, tmp_path: Path) -> None:
        """A TIFF in either byte order is complete only once its strip is inside the file."""
        data = tiny_tiff(order)
        assert verdict(data, tmp_path) is Completeness.COMPLETE
        assert all(verdict(data[:n], tmp_path) is Completeness.INCOMPLETE for n in range(len(data)))

    def test_tiny_tiff_header(self, tmp_path: Path) -> None:
        """Four to seven bytes of a TIFF header are incomplete, not an exception that stalls the gate."""
        for n in range(4, 8):
            assert verdict(b"II*\x00\x08\x00\x00\x00"[:n], tmp_path) is Completeness.INCOMPLETE

    def test_exif_thumbnail_eoi_does_not_fool(self, tmp_path: Path) -> None:
        """The EOI inside an EXIF thumbnail is skipped: a prefix ending right after it is incomplete."""
        data = with_exif_thumbnail()
        thumb_end = data.index(b"\xff\xd9") + 2
        assert thumb_end < len(data) - 2
        assert verdict(data[:thumb_end], tmp_path) is Completeness.INCOMPLETE
        assert verdict(data, tmp_path) is Completeness.COMPLETE

    def test_trailing_nuls_after_eoi(self, tmp_path: Path) -> None:
        """Some writers pad to a block size with NULs after EOI: still complete."""
        assert verdict(image_bytes(1) + b"\x00" * 700, tmp_path) is Completeness.COMPLETE

    def test_zero_bytes_is_a_placeholder(self, tmp_path: Path) -> None:
        """A 0-byte file is incomplete (a placeholder), not yet judged as not-an-image."""
        assert verdict(b"", tmp_path) is Completeness.INCOMPLETE

    @pytest.mark.parametrize("data", [b"hello, this is text\n", b"%PDF-1.4\n%....", b"PK\x03\x04" + b"\x00" * 40,
                                      b"GIF89a" + b"\x00" * 20])
    def test_other_content_not_image(self, data: bytes, tmp_path: Path) -> None:
        """Text, PDF, ZIP and unsupported formats go on to the decoder to be quarantined."""
        assert verdict(data, tmp_path) is Completeness.NOT_IMAGE

    def test_garbage_tiff_never_raises(self, tmp_path: Path) -> None:
        """A TIFF header followed by nonsense gives a verdict, never an exception."""
        for tail in (b"\xff" * 4, b"\x08\x00\x00\x00\xff\xff", b"\x08\x00\x00\x00\x01\x00" + b"\xff" * 12):
            assert verdict(b"II*\x00" + tail, tmp_path) in set(Completeness)
