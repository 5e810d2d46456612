"""Build a Matter by name from the model store, on the requested device."""

from __future__ import annotations

from pathlib import Path

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


CPU_RUNTIMES = ("auto", "onnxruntime", "torch")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AMX or AVX512-BF16 in the CPU flags: where bf16 convolutions run natively (fast)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def build_matter(name: str, store: ModelStore, *, device: str = "auto", threads: int | None = None,
                 cpu_runtime: str = "auto") -> Matter:
    """``cpu_runtime`` picks isnet's runtime on CPU: ``auto`` = torch in bf16 where torch is installed and
    the CPU has native bf16, else onnxruntime (fp32); ``torch`` = torch (bf16 if native, else fp32)."""
    if cpu_runtime not in CPU_RUNTIMES:
        raise ModelError(f"cpu_runtime must be one of {', '.join(CPU_RUNTIMES)}, got {cpu_runtime!r}")
    dev = resolve_device(device)
    if name == "isnet":
        return _isnet(store, dev, threads, cpu_runtime)
    if name == "selfie":
        from bshm_watchd.engine.tflite_selfie import SelfieMatter

        return SelfieMatter(store.path("selfie"), threads=threads)
    if name == "fusion":
        from bshm_watchd.engine.fusion import FusionMatter

        rvm, rvm_large = _rvm(store, dev, threads)
        return FusionMatter(build_matter("selfie", store, device=dev, threads=threads),
                            _isnet(store, dev, threads, cpu_runtime), matting=rvm, matting_large=rvm_large)
    if name == "bshm":
        from bshm_watchd.engine.bshm_tf import BshmMatter

        # TensorFlow finds its own GPUs; torch's view (resolve_device) is irrelevant here.
        return BshmMatter(store.path("bshm"), device=device, threads=threads)
    raise ModelError(f"unknown model {name!r}")


def _rvm(store: ModelStore, device: str, threads: int | None) -> tuple[Matter | None, Matter | None]:
    """The fusion's human matting model, and the same network on its larger copy (``RVM_LARGE_SIDE``); or
    (None, None), with a warning, where it or torch is not installed: the fusion then runs on selfie and isnet
    alone, as before rvm was added."""
    try:
        path = store.path("rvm")
        from bshm_watchd.engine.rvm import RVM_LARGE_SIDE, RvmMatter
    except (ModelError, ImportError) as exc:
        log.warning("fusion_without_rvm", reason=str(exc))
        return None, None
    rvm = RvmMatter(path, device=device, threads=threads)
    return rvm, rvm.at_side(RVM_LARGE_SIDE)


def _isnet(store: ModelStore, device: str, threads: int | None, cpu_runtime: str) -> Matter:
    path = store.path("isnet")
    on_cuda = device.startswith("cuda")
    bf16 = not on_cuda and cpu_has_native_bf16()
    if on_cuda or cpu_runtime == "torch" or (cpu_runtime == "auto" and bf16):
        try:
            from bshm_watchd.engine.isnet_torch import TorchIsnetMatter
        except ImportError:
            if cpu_runtime == "torch":
                raise ModelError("cpu_runtime torch needs the gpu extra (torch, onnx) installed") from None
            log.warning("torch_unavailable_using_onnxruntime", device=device)
        else:
            if on_cuda:
                log.info("isnet_runtime", runtime="torch", device=device, precision="fp16")
                return TorchIsnetMatter(path, device=device)
            if threads:
                import torch

                torch.set_num_threads(threads)
            log.info("isnet_runtime", runtime="torch", device="cpu", precision="bf16" if bf16 else "fp32")
            return TorchIsnetMatter(path, device="cpu", bf16=bf16, batch_size=1)
    from bshm_watchd.engine.onnx_isnet import OnnxIsnetMatter

    log.info("isnet_runtime", runtime="onnxruntime", device=device, precision="fp32")

    return OnnxIsnetMatter(path, threads=threads, device=device)
