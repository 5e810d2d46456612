"""Build a Matter by name from the model store, on the requested device."""

from __future__ import annotations

import structlog

from bshm_watchd.engine.base import Matter
from bshm_watchd.errors import ModelError
from bshm_watchd.modelstore import ModelStore

log = structlog.get_logger(__name__)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_matter(name: str, store: ModelStore, *, device: str = "auto", threads: int | None = None) -> Matter:
    dev = resolve_device(device)
    if name == "isnet":
        return _isnet(store, dev, threads)
    if name == "selfie":
        from bshm_watchd.engine.tflite_selfie import SelfieMatter

        return SelfieMatter(store.path("selfie"), threads=threads)
    if name == "fusion":
        from bshm_watchd.engine.fusion import FusionMatter

        return FusionMatter(build_matter("selfie", store, device=dev, threads=threads), _isnet(store, dev, threads))
    if name == "bshm":
        from bshm_watchd.engine.bshm_tf import BshmMatter

        # TensorFlow finds its own GPUs; torch's view (resolve_device) is irrelevant here.
        return BshmMatter(store.path("bshm"), device=device, threads=threads)
    raise ModelError(f"unknown model {name!r}")


def _isnet(store: ModelStore, device: str, threads: int | None) -> Matter:
    path = store.path("isnet")
    if device.startswith("cuda"):
        try:
            from bshm_watchd.engine.isnet_torch import TorchIsnetMatter
        except ImportError:
            log.warning("torch_unavailable_using_onnxruntime", device=device)
        else:
            return TorchIsnetMatter(path, device=device)
    from bshm_watchd.engine.onnx_isnet import OnnxIsnetMatter

    return OnnxIsnetMatter(path, threads=threads, device=device)
