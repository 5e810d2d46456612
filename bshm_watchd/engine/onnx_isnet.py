"""ISNet (DIS) on onnxruntime: 1024² RGB/255 − 0.5 NCHW in, ``output`` min-max normalised out."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.errors import ModelError, ScanError

ISNET_SIZE = 1024


def isnet_preprocess(rgb: RGB8, size: int = ISNET_SIZE) -> npt.NDArray[np.float32]:
    """H×W×3 uint8 RGB → 1×3×size×size float32, RGB/255 − 0.5."""
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
    x = cv2.resize(rgb, (size, size), interpolation=interp).astype(np.float32)
    x = x / 255.0 - 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def isnet_postprocess(raw: npt.NDArray[np.floating], h: int, w: int) -> Alpha:
    """Network output (any leading dims, last two spatial) → H×W float32 in [0, 1], min-max normalised."""
    m = np.asarray(raw, dtype=np.float32).reshape(raw.shape[-2], raw.shape[-1])
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(m)
    out = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class OnnxIsnetMatter:
    """isnet run by onnxruntime (CPU; CUDA/TensorRT providers when onnxruntime-gpu is installed)."""

    name = "isnet"

    def __init__(self, model_path: Path, *, threads: int | None = None, device: str = "cpu") -> None:
        import onnxruntime as ort

        if not model_path.is_file():
            raise ModelError(f"isnet model not found at {model_path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for damaged files
            raise ModelError(f"{model_path}: cannot load isnet: {exc}") from exc
        inputs = {i.name for i in self._session.get_inputs()}
        if "input" not in inputs:
            raise ModelError(f"{model_path}: isnet graph has no input named 'input' (found {sorted(inputs)})")

    def predict(self, rgb: RGB8) -> Alpha:
        h, w = rgb.shape[:2]
        try:
            (raw,) = self._session.run(["output"], {"input": isnet_preprocess(rgb)})
        except Exception as exc:
            raise ScanError(f"isnet inference failed: {exc}", stage="matting") from exc
        return isnet_postprocess(raw, h, w)

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]:
        return [self.predict(im) for im in images]
