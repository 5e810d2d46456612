"""Generate test images in memory: every mode and format the decoder must accept, EXIF and crafted headers."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]

ORIENTATION_TAG = 0x0112


def asymmetric_rgb(h: int = 48, w: int = 72, seed: int = 0) -> U8:
    """An RGB image with no symmetry: gradients plus noise plus an off-centre block."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.dstack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x * 3 + y * 7) % 256]).astype(np.int32)
    img += rng.integers(-20, 21, size=img.shape)
    img[h // 5 : h // 5 + h // 4, w // 8 : w // 8 + w // 5] = (250, 20, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_u16(shape: tuple[int, ...], seed: int = 0) -> U16:
    """Random 16-bit values spanning the full range, so an 8-bit crush cannot go unnoticed."""
    return np.random.default_rng(seed).integers(0, 65536, size=shape, dtype=np.uint16)


def pil_bytes(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    """Encode a PIL image to ``fmt`` in memory."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def cv_bytes(arr: npt.NDArray[Any], ext: str) -> bytes:
    """Encode a BGR/BGRA/grey array (8- or 16-bit) with OpenCV, e.g. ``ext=".png"``."""
    ok, enc = cv2.imencode(ext, arr)
    assert ok, f"cv2 could not encode {ext}"
    return bytes(enc.tobytes())


def exif_bytes(orientation: int) -> bytes:
    """An EXIF block (with the ``Exif\\0\\0`` header, as JPEG wants it) carrying only Orientation."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return bytes(exif.tobytes())


def jpeg_with_orientation(rgb: U8, orientation: int, quality: int = 95) -> bytes:
    """A JPEG of ``rgb`` as stored (sensor order) with the EXIF Orientation tag set."""
    return pil_bytes(Image.fromarray(rgb), "JPEG", quality=quality, exif=exif_bytes(orientation))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_add_exif(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk right after IHDR (before IDAT, where readers look for it)."""
    body = exif_bytes(orientation)
    if body.startswith(b"Exif\x00\x00"):
        body = body[6:]  # PNG's eXIf chunk holds the bare TIFF structure
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return png[:ihdr_end] + png_chunk(b"eXIf", body) + png[ihdr_end:]


def png_claiming_size(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims ``w``×``h`` RGB pixels but whose IDAT holds almost nothing.

    Decoding it would fail (truncated) or allocate w·h·3 bytes; a guard that runs before decoding
    answers ImageTooLarge without either.
    """
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + png_chunk(b"IEND", b"")
    )


def palette_image(rgb: U8, colours: int = 16) -> Image.Image:
    """An adaptive-palette ("P") version of ``rgb``."""
    return Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=colours)
