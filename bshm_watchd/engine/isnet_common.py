"""ISNet's input and output conventions, shared by the onnxruntime and torch runtimes (no torch here)."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from bshm_watchd.engine.base import RGB8, Alpha

ISNET_SIZE = 1024
"""The network's fixed square input size."""

# --------------------------------------------------------------------------- numpy pre/post (shared)


def _interp(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    # INTER_LINEAR aliases badly when shrinking a scan's film grain; INTER_AREA is blocky when enlarging.
    return cv2.INTER_AREA if src_hw[0] * src_hw[1] > dst_hw[0] * dst_hw[1] else cv2.INTER_LINEAR


def isnet_resize(rgb: RGB8) -> RGB8:
    """Resize an H×W×3 uint8 RGB image to the network's 1024×1024 (still uint8, HWC)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected H×W×3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    if (h, w) == (ISNET_SIZE, ISNET_SIZE):
        return np.ascontiguousarray(rgb)
    small = cv2.resize(rgb, (ISNET_SIZE, ISNET_SIZE), interpolation=_interp((h, w), (ISNET_SIZE,) * 2))
    return np.asarray(small, dtype=np.uint8)


def isnet_preprocess(rgb: RGB8) -> npt.NDArray[np.float32]:
    """Image → the network's ``input``: 1×3×1024×1024 float32, RGB/255 − 0.5, NCHW."""
    x = isnet_resize(rgb).astype(np.float32) / 255.0 - 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def isnet_postprocess(raw: npt.NDArray[np.floating], h: int, w: int) -> Alpha:
    """The network's ``output`` (1024² in any leading shape) → H×W float32 alpha in [0, 1].

    Min-max normalised per image like the imgly pipeline; a constant map (nothing found,
    max == min) gives all zeros instead of the NaNs a bare division would.
    """
    m = np.asarray(raw, dtype=np.float32).reshape(ISNET_SIZE, ISNET_SIZE)
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(m)
    if (h, w) != (ISNET_SIZE, ISNET_SIZE):
        m = np.asarray(cv2.resize(m, (w, h), interpolation=_interp((ISNET_SIZE,) * 2, (h, w))), np.float32)
    out: Alpha = np.clip(m, 0.0, 1.0, out=m).astype(np.float32, copy=False)
    return out
