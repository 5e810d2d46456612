"""Tests for finding the scratches isnet matted, and matting again without them."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from bshm_watchd.engine.fusion import FusionMatter, FusionParams
from bshm_watchd.engine.scratches import thin_share, without_strokes


def _strokes(h: int = 512, w: int = 384) -> npt.NDArray[np.float32]:
    a = np.zeros((h, w), np.float32)
    for k in range(5):
        cv2.polylines(a, [np.array([(20 + 60 * k, 10), (80 + 50 * k, 250), (40 + 60 * k, 500)], np.int32)],
                      False, 1.0, 2)
    return a


def _bust(h: int = 512, w: int = 384) -> npt.NDArray[np.float32]:
    a = np.zeros((h, w), np.float32)
    cv2.ellipse(a, (w // 2, h), (w // 3, h // 2), 0, 0, 360, 1.0, -1)
    cv2.circle(a, (w // 2, h // 3), h // 7, 1.0, -1)
    return a


class TestThin:
    def test_strokes_and_bodies(self) -> None:
        """A matte of thin strokes is almost all thin; a body is not; nothing is nothing."""
        assert thin_share(_strokes()) > 0.9
        assert thin_share(_bust()) < 0.05
        assert thin_share(np.zeros((512, 384), np.float32)) == 0.0

    def test_paints_out_only_marked_strokes(self) -> None:
        """Inpainting removes the marked bright lines from the scan and leaves far pixels alone."""
        rgb = np.full((512, 384, 3), 90, np.uint8)
        rgb[300:, 100:280] = 40
        lines = _strokes()
        rgb[lines > 0.5] = 250
        clean = without_strokes(rgb, lines)
        assert clean is not None
        assert clean[lines > 0.5].mean() < 120
        far = cv2.dilate((lines > 0.5).astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
        assert (clean[far] == rgb[far]).all()
        assert without_strokes(rgb, _bust()) is None


class _LineTaker:
    """A fake isnet (the GPU boundary) that mattes bright lines if the scan has any, else a bust."""

    name = "isnet"

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self.calls += 1
        bright = (rgb.min(axis=2) > 200).astype(np.float32)
        return bright if bright.mean() > 0.001 else _bust(*rgb.shape[:2])

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [self.predict(im) for im in images]


class _Half:
    name = "selfie"

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.full(rgb.shape[:2], 0.5, np.float32)

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [self.predict(im) for im in images]


class TestFusionStrokes:
    def test_mattes_again_without_the_lines(self) -> None:
        """With strokes on, isnet runs twice and the second, line-free matte wins; off, the lines stay."""
        rgb = np.full((512, 384, 3), 90, np.uint8)
        rgb[_strokes() > 0.5] = 250
        on = _LineTaker()
        params = FusionParams(mounts=False, stretch=False, tiles=False)
        alpha = FusionMatter(_Half(), on, params, refine=False).predict(rgb)
        assert on.calls == 2
        assert alpha[450, 192] > 0.9
        off = _LineTaker()
        params = FusionParams(mounts=False, strokes=False, stretch=False, tiles=False)
        lines = FusionMatter(_Half(), off, params, refine=False).predict(rgb)
        assert off.calls == 1 and lines[450, 192] < 0.5


class _FadedOnlyInStretch:
    """A fake model (the GPU boundary) that is sure of itself only on a full-range image."""

    name = "isnet"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        self.seen.append(int(rgb.max()) - int(rgb.min()))
        if int(rgb.max()) - int(rgb.min()) > 200:
            return _bust(*rgb.shape[:2])
        return np.full(rgb.shape[:2], 0.5, np.float32)

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [self.predict(im) for im in images]


class TestFusionStretch:
    def test_faded_scan_voiced_by_its_stretched_copy(self) -> None:
        """A faded scan (range 100..160) is also shown stretched; the confident answer from that copy wins."""
        rgb = np.full((512, 384, 3), 100, np.uint8)
        rgb[300:, 100:280] = 160
        fine = _FadedOnlyInStretch()
        alpha = FusionMatter(_Half(), fine, FusionParams(mounts=False, tiles=False), refine=False).predict(rgb)
        assert sorted(fine.seen) == [60, 255]
        assert alpha[450, 192] > 0.9 and alpha[20, 20] < 0.1
        plain = _FadedOnlyInStretch()
        params = FusionParams(mounts=False, stretch=False, tiles=False, denoise=False)
        flat = FusionMatter(_Half(), plain, params, refine=False).predict(rgb)
        assert plain.seen == [60] and flat[450, 192] < 0.9
