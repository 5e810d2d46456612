"""Decode scans to RGB arrays: format whitelist, pixel guard, 16-bit kept, EXIF orientation once.

Pillow reads the header (format, size, mode, EXIF) without decoding pixels, so the pixel guard
runs before any large allocation. 8-bit images are decoded by Pillow; 16-bit PNG/TIFF by OpenCV
with IMREAD_UNCHANGED, because Pillow silently crushes 16-bit RGB to 8 bits and OpenCV's
IMREAD_COLOR does too. Neither path rotates; the EXIF orientation is applied here exactly once.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from bshm_watchd.errors import ImageTooLarge, NotAnImage, ScanError

FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "WEBP", "MPO"})
DEFAULT_MAX_PIXELS = 120_000_000
"""Generous: a 600 dpi A3 scan is ~70 MP. Bigger needs an explicit ``max_pixels`` in the config."""

ORIENT_TAG = 0x0112

# Our own guard (``max_pixels``, checked from the header before any decoding) replaces Pillow's,
# which would otherwise refuse anything over ~179 MP whatever the config allows.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class Decoded:
    """A decoded, upright scan.

    ``rgb`` is H×W×3 uint8 or uint16 (``bit_depth`` 8 or 16), RGB order; ``alpha`` the input's own
    alpha as float32 in [0, 1] when it had one; ``pages`` the page count of a multipage file
    (only the first page is processed).
    """

    rgb: npt.NDArray[Any]
    alpha: npt.NDArray[Any] | None
    bit_depth: int
    format: str
    mode: str
    orientation: int
    pages: int

    @property
    def size(self) -> tuple[int, int]:
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError as exc:
        raise NotAnImage(f"{path.name}: is a directory") from exc
    except OSError as exc:
        raise ScanError(f"{path.name}: cannot read: {exc.strerror or exc}", stage="read", transient=True) from exc


def decode_path(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    return decode_bytes(read_file(path), path.name, max_pixels)


def decode_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``data`` (the whole file) into an upright :class:`Decoded`."""
    if not data:
        raise NotAnImage(f"{name}: not an image (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between 1x and 2x its own limit; our guard below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage(f"{name}: not an image (unrecognised content, starts with {data[:8]!r})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise NotAnImage(f"{name}: not an image ({_first_line(exc)})") from exc
    with im:
        fmt = str(im.format)
        if fmt not in FORMATS:
            raise NotAnImage(f"{name}: not an image format we accept ({fmt})")
        w, h = im.size
        if w <= 0 or h <= 0:
            raise NotAnImage(f"{name}: image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageTooLarge(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        orientation = _orientation(im)
        pages = int(getattr(im, "n_frames", 1))
        mode = str(im.mode)
        if _is_16bit(im, data):
            rgb, alpha = _decode_16bit_cv(data, name)
            depth = 16
            # OpenCV turns TIFFs upright itself, even with IMREAD_UNCHANGED; other formats it leaves.
            pending = 1 if fmt == "TIFF" else orientation
        else:
            rgb, alpha = _decode_8bit_pil(im, name)
            depth = 8
            # Pillow applies a TIFF's orientation while loading and then drops the tag: rotate only
            # by what is still there, so a scan is turned exactly once.
            pending = _orientation(im)
    if {rgb.shape[0], rgb.shape[1]} != {h, w}:
        raise NotAnImage(f"{name}: decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from header {w}x{h}")
    rgb = apply_orientation(rgb, pending)
    if alpha is not None:
        alpha = apply_orientation(alpha, pending)
    return Decoded(rgb=rgb, alpha=alpha, bit_depth=depth, format=fmt, mode=mode, orientation=orientation, pages=pages)


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ORIENT_TAG, 1)
    except Exception:  # a broken EXIF block must not lose the scan: treat as upright
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _is_16bit(im: Image.Image, data: bytes) -> bool:
    if im.mode.startswith("I;16") or im.mode == "I":
        return True
    if im.format == "PNG" and len(data) > 25:
        return data[24] == 16  # IHDR bit depth: Pillow opens 16-bit RGB PNGs as 8-bit "RGB"
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)  # BitsPerSample
        if isinstance(bits, tuple | list):
            return any(int(b) == 16 for b in bits)
        return bits is not None and int(bits) == 16
    return False


def _decode_8bit_pil(im: Image.Image, name: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    try:
        im.load()
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("LA", "PA", "La", "RGBa"):
            im = im.convert("RGBA")
        elif mode == "F":
            im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8))
        if im.mode == "RGBA":
            arr = np.asarray(im)
            return np.ascontiguousarray(arr[..., :3]), (arr[..., 3].astype(np.float32) / 255.0)
        # Already RGB: no convert() copy (a 6000x9000 JPEG decodes with ~240 MB less peak memory).
        rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        raise NotAnImage(f"{name}: cannot decode ({_first_line(exc)})") from exc
    return np.ascontiguousarray(rgb), None


def _decode_16bit_cv(
    data: bytes, name: str
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    buf = np.frombuffer(data, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if arr is None:
        raise NotAnImage(f"{name}: cannot decode 16-bit image")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.uint16) * 257
    elif arr.dtype != np.uint16:
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    alpha = None
    if arr.ndim == 2:
        rgb = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 2:
        rgb = np.repeat(arr[..., :1], 3, axis=2)
        alpha = arr[..., 1].astype(np.float32) / 65535.0
    elif arr.shape[2] == 4:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
        alpha = arr[..., 3].astype(np.float32) / 65535.0
    else:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb), alpha


def apply_orientation(arr: npt.NDArray[Any], orientation: int) -> npt.NDArray[Any]:  # type: ignore[type-var]
    """Rotate/flip so the image is upright, per the EXIF Orientation value 1–8."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.swapaxes(a, 0, 1)[::-1, :],
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(arr))


def to_8bit(rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """8-bit view for the model's copy; 16-bit data are rounded, never wrapped."""
    if rgb.dtype == np.uint8:
        return rgb  # type: ignore[return-value]
    return ((rgb.astype(np.uint32) + 128) // 257).astype(np.uint8)
