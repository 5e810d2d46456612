"""Tests for the semantic model on square tiles of a long scan."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from bshm_watchd.engine.fusion import FusionMatter, FusionParams
from bshm_watchd.engine.tiles import square_tiles, tiled_predictions


class TestSquareTiles:
    @pytest.mark.parametrize(("h", "w"), [(400, 1200), (1200, 400), (300, 1000), (1000, 601)])
    def test_cover_the_scan_with_overlapping_squares(self, h: int, w: int) -> None:
        """Tiles are squares of the short side, overlap, and together cover every pixel."""
        tiles = square_tiles(h, w)
        assert len(tiles) >= 2
        covered = np.zeros((h, w), int)
        for rows, cols in tiles:
            covered[rows, cols] += 1
            assert covered[rows, cols].shape == (min(h, w), min(h, w))
        assert covered.min() >= 1 and covered.max() >= 2

    def test_near_square_is_not_tiled(self) -> None:
        """A scan within 1.2:1 is left whole."""
        assert square_tiles(1000, 1150) == []
        assert square_tiles(512, 512) == []


class _SquareOnly:
    """A fake semantic model (the GPU boundary): sure and right only on a square input (no squeeze);
    on the squeezed scan unsure everywhere, except ``leaning`` where it leans to "person"."""

    name = "selfie"

    def __init__(self, leaning: npt.NDArray[np.bool_] | None = None) -> None:
        self.leaning = leaning
        self.shapes: list[tuple[int, ...]] = []

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        out = []
        for im in images:
            self.shapes.append(im.shape)
            if im.shape[0] == im.shape[1]:
                out.append((im[..., 0] > 200).astype(np.float32))
                continue
            a = np.full(im.shape[:2], 0.45, np.float32)
            if self.leaning is not None:
                a[self.leaning] = 0.6
            out.append(a)
        return out


class _Fixed:
    """A fake isnet answering one matte for the scan (and nothing for other inputs)."""

    name = "isnet"

    def __init__(self, alpha: npt.NDArray[np.float32]) -> None:
        self.alpha = alpha

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return self.alpha if rgb.shape[:2] == self.alpha.shape else np.zeros(rgb.shape[:2], np.float32)

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [self.predict(im) for im in images]


def _scan() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    rgb = np.full((300, 900, 3), 80, np.uint8)
    rgb[60:300, 600:680] = 250  # a standing figure near the right
    truth = (rgb[..., 0] > 200).astype(np.float32)
    return rgb, truth


PARAMS = FusionParams(mounts=False, stretch=False, strokes=False, crop_below=0.0)  # the tiles alone


class TestTiledPredictions:
    def test_merged_by_max_on_the_scan_grid(self) -> None:
        """Tiles are batched in one call and merged back to the scan's grid."""
        rgb, truth = _scan()
        sem = _SquareOnly()
        (merged,) = tiled_predictions(sem, [rgb])
        assert merged is not None and merged.shape == truth.shape
        assert np.array_equal(merged > 0.5, truth > 0.5)
        assert all(s == (300, 300, 3) for s in sem.shapes)
        assert tiled_predictions(sem, [np.zeros((300, 320, 3), np.uint8)]) == [None]


class TestFusionTiles:
    def test_tiled_voice_wins_when_isnet_agrees(self) -> None:
        """isnet half-sure of the figure, selfie unsure on the squeezed scan: the tiled answer makes it whole."""
        rgb, truth = _scan()
        fine = truth * 0.6  # the right place, but unsure: it cannot be the base by itself
        alpha = FusionMatter(_SquareOnly(), _Fixed(fine), PARAMS, refine=False).predict(rgb)
        assert alpha[200, 640] > 0.9 and alpha[150, 300] < 0.1
        without = FusionMatter(_SquareOnly(), _Fixed(fine), replace(PARAMS, tiles=False), refine=False).predict(rgb)
        assert without[200, 640] < 0.9

    def test_tiled_voice_refused_against_isnet(self) -> None:
        """When isnet is sure of something else that the squeezed answer leans to, the tiled figure is refused."""
        rgb, truth = _scan()
        fine = np.zeros_like(truth)
        fine[0:140, 0:220] = 0.7  # a soft rim: isnet is sure, but less than the tiles would be
        fine[0:120, 0:200] = 1.0
        sem = _SquareOnly(leaning=fine > 0.5)
        alpha = FusionMatter(sem, _Fixed(fine), PARAMS, refine=False).predict(rgb)
        assert any(s[:2] == (300, 300) for s in sem.shapes)  # the tiles were tried
        assert alpha[200, 640] < 0.5 and alpha[60, 100] > 0.9
