"""``fusion``: a person-aware semantic mask (selfie) gates and fills a fine boundary mask (isnet).

Where both agree, isnet's boundary is kept. Where isnet marks something the semantic model does
not consider part of a person (furniture, a backdrop stain, a scratch), it is cut away. Where the
semantic model is sure of a person and isnet missed it (dark clothes on a dark backdrop, a faded
body), the semantic confidence fills the hole.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from bshm_watchd.engine.base import RGB8, Alpha, Matter


@dataclass(frozen=True)
class FusionParams:
    person_threshold: float = 0.5
    gate_dilate: float = 0.04
    """Gate = person mask dilated by this fraction of the image's longer side."""
    core_erode: float = 0.02
    """Fill = person mask eroded by this fraction: deep inside the person, trust the semantic model."""


def _disc(radius: int) -> np.ndarray:
    r = max(1, radius)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def fuse(semantic: Alpha, fine: Alpha, params: FusionParams) -> Alpha:
    h, w = semantic.shape
    side = max(h, w)
    person = (semantic > params.person_threshold).astype(np.uint8)
    gate = cv2.dilate(person, _disc(round(params.gate_dilate * side)))
    gate_soft = cv2.GaussianBlur(gate.astype(np.float32), (0, 0), max(1.0, params.gate_dilate * side / 3))
    core = cv2.erode(person, _disc(round(params.core_erode * side))).astype(np.float32)
    alpha = np.maximum(fine * gate_soft, core * semantic)
    return np.clip(alpha, 0.0, 1.0).astype(np.float32)


class FusionMatter:
    """The default model: ``fuse(selfie, isnet)``."""

    name = "fusion"

    def __init__(self, semantic: Matter, fine: Matter, params: FusionParams | None = None) -> None:
        self.semantic = semantic
        self.fine = fine
        self.params = params or FusionParams()

    def predict(self, rgb: RGB8) -> Alpha:
        return fuse(self.semantic.predict(rgb), self.fine.predict(rgb), self.params)

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]:
        sem = self.semantic.predict_batch(images)
        fine = self.fine.predict_batch(images)
        return [fuse(s, f, self.params) for s, f in zip(sem, fine, strict=True)]
