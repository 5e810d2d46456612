"""MediaPipe selfie segmentation on LiteRT: 256² RGB/255 in, person probability out."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.errors import ModelError, ScanError


class SelfieMatter:
    """Person-aware but coarse: the semantic half of ``fusion``."""

    name = "selfie"

    def __init__(self, model_path: Path, *, threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ModelError("the LiteRT runtime is missing: pip install ai-edge-litert") from exc
        if not model_path.is_file():
            raise ModelError(f"selfie model not found at {model_path}")
        try:
            self._interp = Interpreter(model_path=str(model_path), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:
            raise ModelError(f"{model_path}: cannot load selfie model: {exc}") from exc
        inp = self._interp.get_input_details()[0]
        self._in_index = int(inp["index"])
        self._size = (int(inp["shape"][2]), int(inp["shape"][1]))
        self._out_index = int(self._interp.get_output_details()[0]["index"])
        # A LiteRT interpreter is not thread-safe; the daemon's threads share one.
        self._lock = threading.Lock()

    def predict(self, rgb: RGB8) -> Alpha:
        h, w = rgb.shape[:2]
        x = cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        try:
            with self._lock:
                self._interp.set_tensor(self._in_index, x[None])
                self._interp.invoke()
                out = np.array(self._interp.get_tensor(self._out_index)[0, :, :, 0], dtype=np.float32)
        except Exception as exc:
            raise ScanError(f"selfie inference failed: {exc}", stage="matting") from exc
        up = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
        alpha: Alpha = np.clip(up, 0.0, 1.0).astype(np.float32)
        return alpha

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]:
        return [self.predict(im) for im in images]
