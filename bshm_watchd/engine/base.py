"""The seam every matting model implements."""

from __future__ import annotations

import re
from typing import Any, Protocol

import numpy.typing as npt

DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")
"""``device`` values everywhere (config, torch, TensorFlow), used with ``fullmatch``; group 1 is N of cuda:N."""

# numpy's dtype-level typing does not survive OpenCV calls or arithmetic; these aliases name the
# contract (dtype and layout) and the code converts explicitly where it matters.
RGB8 = npt.NDArray[Any]
"""H×W×3 uint8 image, RGB order."""

Alpha = npt.NDArray[Any]
"""H×W float32 alpha in [0, 1]."""


class Matter(Protocol):
    """A model that turns an RGB image into an alpha matte of the people in it.

    ``predict`` receives the analysis copy (already bounded in size by the pipeline) and
    returns an alpha of exactly the same height and width; resizing to and from the
    network's own input size is the model's business.
    """

    name: str

    def predict(self, rgb: RGB8) -> Alpha: ...

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]: ...
