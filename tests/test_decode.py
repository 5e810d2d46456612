"""Decoding: every accepted format and mode, 16-bit kept, EXIF orientation once, bad files, the pixel guard."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from imaging import (
    asymmetric_rgb,
    cv_bytes,
    jpeg_with_orientation,
    palette_image,
    pil_bytes,
    png_add_exif,
    png_claiming_size,
    random_u16,
)
from PIL import Image, ImageOps

from bshm_watchd.decode import apply_orientation, decode_bytes, decode_path, to_8bit
from bshm_watchd.errors import ImageTooLarge, NotAnImage

# EXIF Orientation → the transpose that makes the stored pixels upright (EXIF 2.3, table 4.6.4).
UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The upright version of ``stored`` pixels, computed with Pillow's transposes (independent of ours)."""
    op = UPRIGHT[orientation]
    if op is None:
        return stored
    if stored.ndim == 3:
        return np.dstack([upright(stored[..., c], orientation) for c in range(stored.shape[2])])
    return np.asarray(Image.fromarray(stored).transpose(op))


RGB = asymmetric_rgb(37, 53, seed=1)


class TestDecodeMatrix:
    def test_png_rgb8(self) -> None:
        """An 8-bit RGB PNG decodes to exactly its pixels, 8-bit, no alpha."""
        d = decode_bytes(pil_bytes(Image.fromarray(RGB), "PNG"), "a.png")
        assert (d.format, d.bit_depth, d.rgb.dtype, d.alpha) == ("PNG", 8, np.uint8, None)
        np.testing.assert_array_equal(d.rgb, RGB)

    def test_png_rgba8(self) -> None:
        """An RGBA PNG keeps its colour and returns its own alpha in [0, 1]."""
        a = np.random.default_rng(2).integers(0, 256, RGB.shape[:2], dtype=np.uint8)
        d = decode_bytes(pil_bytes(Image.fromarray(np.dstack([RGB, a]), "RGBA"), "PNG"), "a.png")
        np.testing.assert_array_equal(d.rgb, RGB)
        assert d.alpha is not None and d.alpha.dtype == np.float32
        np.testing.assert_array_equal(np.round(d.alpha * 255).astype(np.uint8), a)

    def test_png_grey8(self) -> None:
        """A grey PNG becomes RGB with the grey value in every channel."""
        g = RGB[..., 1].copy()
        d = decode_bytes(pil_bytes(Image.fromarray(g), "PNG"), "g.png")
        assert d.rgb.shape == (*g.shape, 3)
        for c in range(3):
            np.testing.assert_array_equal(d.rgb[..., c], g)

    def test_png_la(self) -> None:
        """A grey+alpha PNG gives grey RGB and its alpha."""
        g, a = RGB[..., 0].copy(), RGB[..., 2].copy()
        d = decode_bytes(pil_bytes(Image.fromarray(np.dstack([g, a]), "LA"), "PNG"), "la.png")
        np.testing.assert_array_equal(d.rgb[..., 0], g)
        assert d.alpha is not None
        np.testing.assert_array_equal(np.round(d.alpha * 255).astype(np.uint8), a)

    def test_png_palette_trns(self) -> None:
        """A palette PNG with a tRNS entry gives the palette colours and alpha 0 on the transparent index."""
        p = palette_image(RGB)
        d = decode_bytes(pil_bytes(p, "PNG", transparency=0), "p.png")
        np.testing.assert_array_equal(d.rgb, np.asarray(p.convert("RGB")))
        assert d.alpha is not None
        idx = np.asarray(p)
        assert (idx == 0).any()
        np.testing.assert_array_equal(d.alpha == 0, idx == 0)
        assert (d.alpha[idx != 0] == 1.0).all()

    def test_png_palette_plain(self) -> None:
        """A palette PNG without transparency decodes to its colours and no alpha."""
        p = palette_image(RGB)
        d = decode_bytes(pil_bytes(p, "PNG"), "p.png")
        np.testing.assert_array_equal(d.rgb, np.asarray(p.convert("RGB")))
        assert d.alpha is None

    def test_png_1bit(self) -> None:
        """A 1-bit PNG becomes black and white RGB in the right places."""
        mask = RGB[..., 0] > 128
        d = decode_bytes(pil_bytes(Image.fromarray(mask), "PNG"), "b.png")
        np.testing.assert_array_equal(d.rgb[..., 0], np.where(mask, 255, 0))
        assert set(np.unique(d.rgb)) <= {0, 255}

    def test_png_grey16_kept(self) -> None:
        """A 16-bit grey PNG stays 16-bit with every value intact."""
        g = random_u16((31, 45), seed=3)
        d = decode_bytes(cv_bytes(g, ".png"), "g16.png")
        assert (d.bit_depth, d.rgb.dtype) == (16, np.uint16)
        for c in range(3):
            np.testing.assert_array_equal(d.rgb[..., c], g)

    def test_png_rgb16_kept(self) -> None:
        """A 16-bit RGB PNG (which Pillow would crush to 8 bits) stays 16-bit and exact, in RGB order."""
        bgr = random_u16((31, 45, 3), seed=4)
        d = decode_bytes(cv_bytes(bgr, ".png"), "c16.png")
        assert (d.bit_depth, d.rgb.dtype) == (16, np.uint16)
        np.testing.assert_array_equal(d.rgb, bgr[..., ::-1])

    def test_png_rgba16_kept(self) -> None:
        """A 16-bit RGBA PNG stays 16-bit and returns its alpha at full precision."""
        bgra = random_u16((31, 45, 4), seed=5)
        d = decode_bytes(cv_bytes(bgra, ".png"), "a16.png")
        np.testing.assert_array_equal(d.rgb, bgra[..., [2, 1, 0]])
        assert d.alpha is not None
        np.testing.assert_allclose(d.alpha, bgra[..., 3] / 65535.0, atol=1e-6)

    def test_tiff_rgb8(self) -> None:
        """An 8-bit RGB TIFF decodes exactly."""
        d = decode_bytes(pil_bytes(Image.fromarray(RGB), "TIFF"), "t.tif")
        assert (d.format, d.bit_depth) == ("TIFF", 8)
        np.testing.assert_array_equal(d.rgb, RGB)

    def test_tiff_rgb16_kept(self) -> None:
        """A 16-bit RGB TIFF stays 16-bit and exact."""
        bgr = random_u16((31, 45, 3), seed=6)
        d = decode_bytes(cv_bytes(bgr, ".tiff"), "t16.tif")
        assert (d.bit_depth, d.rgb.dtype) == (16, np.uint16)
        np.testing.assert_array_equal(d.rgb, bgr[..., ::-1])

    def test_tiff_grey16_kept(self) -> None:
        """A 16-bit grey TIFF written by Pillow (mode I;16) stays 16-bit and exact."""
        g = random_u16((31, 45), seed=7)
        d = decode_bytes(pil_bytes(Image.fromarray(g), "TIFF"), "g16.tif")
        assert d.rgb.dtype == np.uint16
        np.testing.assert_array_equal(d.rgb[..., 1], g)

    def test_tiff_cmyk(self) -> None:
        """A CMYK TIFF is converted to the RGB it was made from."""
        cmyk = Image.fromarray(RGB).convert("CMYK")
        d = decode_bytes(pil_bytes(cmyk, "TIFF"), "c.tif")
        assert d.mode == "CMYK"
        np.testing.assert_array_equal(d.rgb, RGB)

    def test_tiff_palette(self) -> None:
        """A palette TIFF decodes to its palette colours."""
        p = palette_image(RGB)
        d = decode_bytes(pil_bytes(p, "TIFF"), "p.tif")
        np.testing.assert_array_equal(d.rgb, np.asarray(p.convert("RGB")))

    def test_tiff_multipage(self) -> None:
        """A 3-page TIFF reports 3 pages and decodes the first."""
        pages = [Image.fromarray(RGB), Image.fromarray(RGB[::-1].copy()), Image.fromarray(RGB[:, ::-1].copy())]
        d = decode_bytes(pil_bytes(pages[0], "TIFF", save_all=True, append_images=pages[1:]), "m.tif")
        assert d.pages == 3
        np.testing.assert_array_equal(d.rgb, RGB)

    def test_bmp(self) -> None:
        """A BMP decodes exactly."""
        d = decode_bytes(pil_bytes(Image.fromarray(RGB), "BMP"), "b.bmp")
        assert d.format == "BMP"
        np.testing.assert_array_equal(d.rgb, RGB)

    def test_webp_lossless(self) -> None:
        """A lossless WebP decodes exactly."""
        d = decode_bytes(pil_bytes(Image.fromarray(RGB), "WEBP", lossless=True), "w.webp")
        assert d.format == "WEBP"
        np.testing.assert_array_equal(d.rgb, RGB)

    def test_webp_rgba(self) -> None:
        """A lossless RGBA WebP returns its alpha."""
        a = np.where(RGB[..., 0] > 100, 255, 0).astype(np.uint8)
        d = decode_bytes(pil_bytes(Image.fromarray(np.dstack([RGB, a]), "RGBA"), "WEBP", lossless=True), "w.webp")
        assert d.alpha is not None
        np.testing.assert_array_equal(np.round(d.alpha * 255).astype(np.uint8), a)

    def test_jpeg(self) -> None:
        """A JPEG decodes to what Pillow decodes, close to the original pixels."""
        y, x = np.mgrid[0:37, 0:53]
        smooth = np.dstack([x * 4, y * 6, 255 - x * 3]).astype(np.uint8)
        data = pil_bytes(Image.fromarray(smooth), "JPEG", quality=95)
        d = decode_bytes(data, "j.jpg")
        assert (d.format, d.bit_depth, d.rgb.shape) == ("JPEG", 8, smooth.shape)
        np.testing.assert_array_equal(d.rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        assert np.abs(d.rgb.astype(int) - smooth.astype(int)).mean() < 3

    def test_jpeg_grey(self) -> None:
        """A greyscale JPEG becomes 3-channel RGB."""
        d = decode_bytes(pil_bytes(Image.fromarray(RGB[..., 0].copy()), "JPEG"), "g.jpg")
        assert d.rgb.shape == (*RGB.shape[:2], 3)
        np.testing.assert_array_equal(d.rgb[..., 0], d.rgb[..., 2])

    def test_odd_file_name(self, tmp_path: Path) -> None:
        """A path with a space and non-ASCII letters in folder and file name decodes."""
        folder = tmp_path / "sub dir é"
        folder.mkdir()
        path = folder / "Zoë 1 (copy).png"
        path.write_bytes(pil_bytes(Image.fromarray(RGB), "PNG"))
        np.testing.assert_array_equal(decode_path(path).rgb, RGB)


class TestOrientation:
    @pytest.mark.parametrize("orientation", range(1, 9))
    def test_jpeg_exif_applied_once(self, orientation: int) -> None:
        """A JPEG with EXIF Orientation N decodes to exactly what exif_transpose gives: rotated once."""
        data = jpeg_with_orientation(RGB, orientation)
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        d = decode_bytes(data, "o.jpg")
        assert d.orientation == orientation
        np.testing.assert_array_equal(d.rgb, reference)
        np.testing.assert_array_equal(d.rgb, upright(stored, orientation))
        if orientation in (5, 6, 7, 8):
            assert d.size == (RGB.shape[0], RGB.shape[1])  # width and height swapped
        elif orientation != 1:
            assert not np.array_equal(d.rgb, stored)  # rotated twice would give the stored pixels back

    @pytest.mark.parametrize("orientation", [3, 6, 8])
    def test_png8_exif_applied_once(self, orientation: int) -> None:
        """An 8-bit PNG with an eXIf Orientation is made upright once."""
        data = png_add_exif(pil_bytes(Image.fromarray(RGB), "PNG"), orientation)
        d = decode_bytes(data, "o.png")
        assert d.orientation == orientation
        np.testing.assert_array_equal(d.rgb, upright(RGB, orientation))

    @pytest.mark.parametrize("orientation", [2, 3, 6, 8])
    def test_png16_exif_applied_once(self, orientation: int) -> None:
        """A 16-bit PNG (the OpenCV path) with an eXIf Orientation is made upright once and stays 16-bit."""
        bgr = random_u16((31, 45, 3), seed=8)
        d = decode_bytes(png_add_exif(cv_bytes(bgr, ".png"), orientation), "o16.png")
        assert d.rgb.dtype == np.uint16
        np.testing.assert_array_equal(d.rgb, upright(np.ascontiguousarray(bgr[..., ::-1]), orientation))

    @pytest.mark.parametrize("orientation", range(2, 9))
    def test_tiff8_orientation_applied_once(self, orientation: int) -> None:
        """An 8-bit TIFF with an Orientation tag is made upright exactly once (Pillow's reader may do it)."""
        data = pil_bytes(Image.fromarray(RGB), "TIFF", tiffinfo={0x0112: orientation})
        d = decode_bytes(data, "o.tif")
        np.testing.assert_array_equal(d.rgb, upright(RGB, orientation))

    @pytest.mark.parametrize("orientation", range(2, 9))
    def test_tiff16_orientation_applied_once(self, orientation: int) -> None:
        """A 16-bit TIFF with an Orientation tag is made upright exactly once (OpenCV's reader may do it)."""
        g = random_u16((31, 45), seed=9)
        data = pil_bytes(Image.fromarray(g), "TIFF", tiffinfo={0x0112: orientation})
        d = decode_bytes(data, "o16.tif")
        assert d.rgb.dtype == np.uint16
        np.testing.assert_array_equal(d.rgb[..., 0], upright(g, orientation))

    @pytest.mark.parametrize("orientation", range(1, 9))
    def test_apply_orientation_matches_pillow(self, orientation: int) -> None:
        """apply_orientation agrees with Pillow's transpose for every EXIF value, on 2-D and 3-D arrays."""
        np.testing.assert_array_equal(apply_orientation(RGB, orientation), upright(RGB, orientation))
        g = RGB[..., 0].copy()
        np.testing.assert_array_equal(apply_orientation(g, orientation), upright(g, orientation))

    def test_broken_orientation_value_is_upright(self) -> None:
        """An out-of-range Orientation value (0 or 9) is treated as upright rather than failing the scan."""
        for value in (0, 9):
            d = decode_bytes(jpeg_with_orientation(RGB, value), "o.jpg")
            assert d.orientation == 1 and d.rgb.shape == RGB.shape


class TestBadInput:
    @pytest.mark.parametrize(
        ("content", "label"),
        [
            (b"", "0 bytes"),
            (b"hello, this is a text file, not a photo\n" * 3, "text"),
            (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "pdf"),
            (b"<!DOCTYPE html><html><body>404</body></html>", "html"),
            (b"\xff\xd8\xff", "jpeg magic only"),
        ],
    )
    def test_not_an_image(self, content: bytes, label: str) -> None:
        """Content that is not a decodable image, named .jpg, raises NotAnImage naming the file."""
        with pytest.raises(NotAnImage, match=r"^broken\.jpg: ") as info:
            decode_bytes(content, "broken.jpg")
        assert info.value.stage == "decode"

    def test_gif_refused(self) -> None:
        """A GIF (a format Pillow reads but we do not accept) raises NotAnImage naming the format."""
        with pytest.raises(NotAnImage, match="GIF"):
            decode_bytes(pil_bytes(Image.fromarray(RGB), "GIF"), "anim.jpg")

    @pytest.mark.parametrize("fraction", [0.5, 0.9])
    def test_truncated_jpeg(self, fraction: float) -> None:
        """A JPEG cut off in its entropy-coded data raises NotAnImage instead of returning grey rows."""
        y, x = np.mgrid[0:300, 0:400]
        img = np.dstack([x % 256, y % 256, (x + y) % 256]).astype(np.uint8)
        data = pil_bytes(Image.fromarray(img), "JPEG", quality=90)
        with pytest.raises(NotAnImage, match="truncated"):
            decode_bytes(data[: int(len(data) * fraction)], "cut.jpg")

    @pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "WEBP"])
    def test_truncated_8bit(self, fmt: str) -> None:
        """A truncated 8-bit PNG/TIFF/BMP/WebP raises NotAnImage."""
        arr = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
        data = pil_bytes(Image.fromarray(arr), fmt)
        with pytest.raises(NotAnImage):
            decode_bytes(data[: int(len(data) * 0.6)], "cut")

    @pytest.mark.parametrize("ext", [".png", ".tiff"])
    def test_truncated_16bit(self, ext: str) -> None:
        """A truncated 16-bit PNG/TIFF (the OpenCV path) raises NotAnImage."""
        data = cv_bytes(random_u16((200, 300, 3)), ext)
        with pytest.raises(NotAnImage):
            decode_bytes(data[: int(len(data) * 0.6)], "cut" + ext)

    def test_directory(self, tmp_path: Path) -> None:
        """A directory named like an image raises NotAnImage."""
        (tmp_path / "folder.jpg").mkdir()
        with pytest.raises(NotAnImage, match="directory"):
            decode_path(tmp_path / "folder.jpg")


class TestPixelGuard:
    def test_huge_header_default_limit(self) -> None:
        """A 10-gigapixel header is refused as ImageTooLarge with no attempt to decode it."""
        with pytest.raises(ImageTooLarge):
            decode_bytes(png_claiming_size(100_000, 100_000), "bomb.png")

    def test_header_over_configured_limit(self) -> None:
        """A 2 MP header over a 1 MP limit is refused before decoding (else the empty IDAT gives NotAnImage)."""
        with pytest.raises(ImageTooLarge, match="2000x1000"):
            decode_bytes(png_claiming_size(2000, 1000), "big.png", max_pixels=1_000_000)

    def test_real_image_over_limit(self) -> None:
        """A valid 37×53 image with a 1000-pixel limit is refused."""
        with pytest.raises(ImageTooLarge):
            decode_bytes(pil_bytes(Image.fromarray(RGB), "PNG"), "a.png", max_pixels=1000)

    def test_limit_is_inclusive(self) -> None:
        """An image of exactly max_pixels pixels decodes."""
        n = RGB.shape[0] * RGB.shape[1]
        assert decode_bytes(pil_bytes(Image.fromarray(RGB), "PNG"), "a.png", max_pixels=n).size == (53, 37)

    def test_16bit_guard_before_opencv(self) -> None:
        """A 16-bit image over the limit is refused before OpenCV decodes it."""
        with pytest.raises(ImageTooLarge):
            decode_bytes(cv_bytes(random_u16((40, 40, 3)), ".png"), "a16.png", max_pixels=1000)

    def test_configured_limit_above_pillows_own(self) -> None:
        """A 200 MP header under a configured 500 MP limit is not refused as too large by Pillow's own guard."""
        with pytest.raises(NotAnImage) as info:
            decode_bytes(png_claiming_size(20_000, 10_000), "big.png", max_pixels=500_000_000)
        assert not isinstance(info.value, ImageTooLarge), str(info.value)


class TestTo8bit:
    def test_rounds_not_wraps(self) -> None:
        """16-bit values map to the nearest 8-bit level (65535 → 255, never wrapping to 0)."""
        v = np.array([[[0, 128, 129], [257, 32896, 65535]]], dtype=np.uint16)
        np.testing.assert_array_equal(to_8bit(v), [[[0, 0, 1], [1, 128, 255]]])

    def test_8bit_unchanged(self) -> None:
        """8-bit input comes back as-is."""
        assert to_8bit(RGB) is RGB

    def test_16bit_decode_roundtrip(self) -> None:
        """A 16-bit image made from 8-bit data (v·257) returns to the same 8-bit data."""
        bgr16 = RGB[..., ::-1].astype(np.uint16) * 257
        d = decode_bytes(cv_bytes(bgr16, ".png"), "x.png")
        assert d.rgb.dtype == np.uint16
        np.testing.assert_array_equal(to_8bit(d.rgb), RGB)
