"""ISNet (DIS) on onnxruntime: 1024² RGB/255 − 0.5 NCHW in, ``output`` min-max normalised out."""

from __future__ import annotations

import os
from pathlib import Path

from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.engine.isnet_common import isnet_postprocess, isnet_preprocess
from bshm_watchd.errors import ModelError, ScanError


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
