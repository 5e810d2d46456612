"""Tests for the native torch ISNet: weight loading, parity with onnxruntime, batching."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional 'gpu' extra)")
onnx = pytest.importorskip("onnx", reason="the onnx package is needed to read ISNet weights")

import cv2  # noqa: E402

from bshm_watchd.engine.isnet_torch import (  # noqa: E402
    TorchIsnetMatter,
    isnet_postprocess,
    isnet_preprocess,
    isnet_resize,
    load_isnet,
)
from bshm_watchd.errors import ConfigError, ModelError, ScanError  # noqa: E402

T = TypeVar("T")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "old_photos"
# One image the network must shrink (INTER_AREA) and one it must enlarge (INTER_LINEAR).
PARITY_IMAGES = ("deoldify__1860Girls.jpg", "deoldify__1870Girl.jpg")


def _model_path() -> Path:
    env = os.environ.get("BSHM_WATCHD_MODEL_DIR")
    if env:
        return Path(env) / "isnet.onnx"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "bshm-watchd" / "models" / "isnet.onnx"


MODEL = _model_path()
_model_absent = pytest.mark.skipif(not MODEL.is_file(), reason=f"ISNet model not fetched ({MODEL} absent)")


def needs_model(obj: T) -> T:
    """Mark a test (or class) as needing the fetched ISNet model; skip it when the file is absent."""
    return pytest.mark.models(_model_absent(obj))  # type: ignore[return-value]


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test photos absent ({DATA})")


def _load_rgb(name: str) -> np.ndarray:
    bgr = cv2.imread(str(DATA / name), cv2.IMREAD_COLOR)
    assert bgr is not None, name
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def cpu_matter() -> TorchIsnetMatter:
    return TorchIsnetMatter(MODEL, device="cpu")


class TestIsnetPrePost:
    def test_preprocess_layout_and_range(self) -> None:
        """A white/black image becomes 1×3×1024×1024 float32 at +0.5 / −0.5."""
        img = np.zeros((300, 500, 3), np.uint8)
        img[:, 250:] = 255
        x = isnet_preprocess(img)
        assert x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32
        assert x[0, :, :, 0].max() == -0.5 and x[0, :, :, -1].min() == 0.5

    def test_preprocess_keeps_channel_order(self) -> None:
        """Channel 0 of the input is the image's red channel (no silent BGR swap)."""
        img = np.zeros((64, 64, 3), np.uint8)
        img[..., 0] = 255
        x = isnet_preprocess(img)
        assert np.allclose(x[0, 0], 0.5) and np.allclose(x[0, 1:], -0.5)

    def test_resize_rejects_grey(self) -> None:
        """A 2-D image is refused instead of broadcasting into nonsense."""
        with pytest.raises(ValueError):
            isnet_resize(np.zeros((32, 32), np.uint8))

    def test_postprocess_min_max_and_size(self) -> None:
        """Raw output is stretched to [0, 1] per image and resized to the caller's H×W."""
        raw = np.linspace(0.2, 0.7, 1024 * 1024, dtype=np.float32).reshape(1, 1, 1024, 1024)
        same = isnet_postprocess(raw, 1024, 1024)
        assert same.min() == pytest.approx(0.0, abs=1e-6) and same.max() == pytest.approx(1.0, abs=1e-6)
        a = isnet_postprocess(raw, 700, 1300)
        assert a.shape == (700, 1300) and a.dtype == np.float32
        assert 0.0 <= a.min() < 0.01 and 0.99 < a.max() <= 1.0

    def test_postprocess_constant_gives_zeros(self) -> None:
        """A flat output (nothing found) yields zeros, not NaNs from 0/0."""
        a = isnet_postprocess(np.full((1024, 1024), 0.3, np.float32), 10, 20)
        assert a.shape == (10, 20) and not np.isnan(a).any() and a.max() == 0.0


@needs_model
class TestLoadIsnet:
    def _tampered(self, tmp_path: Path, how: str) -> Path:
        model = onnx.load(str(MODEL))
        inits = model.graph.initializer
        if how == "missing":
            victim = next(t for t in inits if t.name.startswith("onnx::Conv_"))
            inits.remove(victim)
        elif how == "shape":
            arr = onnx.numpy_helper.to_array(inits[0])
            inits[0].CopyFrom(onnx.numpy_helper.from_array(arr[:-1], inits[0].name))
        elif how == "extra":
            inits.append(onnx.numpy_helper.from_array(np.zeros(3, np.float16), "stray.weight"))
        out = tmp_path / f"isnet-{how}.onnx"
        onnx.save(model, str(out))
        return out

    def test_loads_every_tensor(self) -> None:
        """The shipped file fills every parameter of the module (238 tensors, 119 convs)."""
        net = load_isnet(MODEL)
        assert sum(1 for _ in net.parameters()) == 238

    @pytest.mark.parametrize("how", ["missing", "shape", "extra"])
    def test_tampered_file_raises(self, tmp_path: Path, how: str) -> None:
        """A missing, mis-shaped or unexpected initializer is a ModelError, never a half-loaded net."""
        with pytest.raises(ModelError):
            load_isnet(self._tampered(tmp_path, how))

    def test_garbage_file_raises(self, tmp_path: Path) -> None:
        """A file that is not ONNX at all is a ModelError."""
        bad = tmp_path / "isnet.onnx"
        bad.write_bytes(b"<html>404</html>")
        with pytest.raises(ModelError):
            load_isnet(bad)


class TestTorchIsnetMatter:
    @pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
    def test_bad_device_string(self, device: str) -> None:
        """A device outside auto|cpu|cuda|cuda:N fails at construction."""
        with pytest.raises(ConfigError):
            TorchIsnetMatter(MODEL, device=device)

    def test_bad_batch_size(self) -> None:
        """batch_size < 1 fails at construction."""
        with pytest.raises(ConfigError):
            TorchIsnetMatter(MODEL, device="cpu", batch_size=0)

    def test_fp16_on_cpu_refused(self) -> None:
        """fp16 is refused on CPU, where it would be far slower than fp32."""
        with pytest.raises(ConfigError):
            TorchIsnetMatter(MODEL, device="cpu", fp16=True)

    def test_missing_model(self, tmp_path: Path) -> None:
        """An absent model file is a ModelError."""
        with pytest.raises(ModelError):
            TorchIsnetMatter(tmp_path / "isnet.onnx", device="cpu")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
    def test_cuda_without_gpu(self) -> None:
        """Asking for CUDA on a host without it is a ModelError, not a silent CPU fallback."""
        with pytest.raises(ModelError):
            TorchIsnetMatter(MODEL, device="cuda")

    @needs_model
    def test_out_of_memory_is_transient_scan_error(
        self, cpu_matter: TorchIsnetMatter, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A CUDA OOM in the forward pass becomes a retryable ScanError, not a crash of the service."""

        def oom(x: object) -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(cpu_matter, "_net", oom)
        with pytest.raises(ScanError) as info:
            cpu_matter.predict(np.zeros((64, 48, 3), np.uint8))
        assert info.value.transient and info.value.stage == "matting"

    @needs_model
    @needs_data
    def test_parity_with_onnxruntime(self, cpu_matter: TorchIsnetMatter) -> None:
        """Raw output matches onnxruntime CPU on real scans within 1e-3."""
        ort = pytest.importorskip("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
        for name in PARITY_IMAGES:
            rgb = _load_rgb(name)
            ref = sess.run(["output"], {"input": isnet_preprocess(rgb)})[0][:, 0]
            got = cpu_matter.predict_raw(isnet_resize(rgb)[None])
            diff = np.abs(got - ref)
            assert diff.max() <= 1e-3, (name, float(diff.max()))
            assert diff.mean() <= 2e-5, (name, float(diff.mean()))

    @needs_model
    @needs_data
    def test_batch_equals_singles(self, cpu_matter: TorchIsnetMatter) -> None:
        """A batch of three gives the same mattes as three single calls."""
        images = [_load_rgb(n) for n in ("bopb__old__a.png", "deoldify__1870Girl.jpg", "bopb__old__h.png")]
        batch = cpu_matter.predict_batch(images)
        for img, got in zip(images, batch, strict=True):
            single = cpu_matter.predict(img)
            assert got.shape == img.shape[:2] and got.dtype == np.float32
            assert got.min() >= 0.0 and got.max() <= 1.0
            assert np.abs(got - single).max() <= 1e-5


class TestCpuBf16:
    def test_bf16_on_cuda_refused(self) -> None:
        """bf16 is the CPU mode; asking for it with fp16 (the CUDA mode) is a configuration error."""
        with pytest.raises(ConfigError, match="bf16"):
            TorchIsnetMatter(MODEL, device="cpu", fp16=True, bf16=True)

    @needs_model
    @needs_data
    def test_bf16_mattes_close_to_fp32(self, cpu_matter: TorchIsnetMatter) -> None:
        """bf16 autocast changes the matte by little: mean |Δα| ≤ 0.005, and no more than 0.5% of pixels
        move by over 0.1 (measured: the eval's SAD moved by < 1%)."""
        bf16 = TorchIsnetMatter(MODEL, device="cpu", bf16=True, batch_size=1)
        for name in PARITY_IMAGES:
            rgb = _load_rgb(name)
            ref, got = cpu_matter.predict(rgb), bf16.predict(rgb)
            diff = np.abs(got - ref)
            assert diff.mean() <= 5e-3, (name, float(diff.mean()))
            assert (diff > 0.1).mean() <= 5e-3, (name, float((diff > 0.1).mean()))
            assert ref.max() > 0.9  # the scan has a subject: the comparison is not between two empty mattes


class TestFactoryCpuRuntime:
    @pytest.mark.parametrize(("flags", "native"), [("fpu avx512f amx_bf16 amx_tile", True),
                                                   ("fpu avx2 avx512_bf16", True), ("fpu avx2 avx512f", False)])
    def test_native_bf16_from_flags(self, tmp_path: Path, flags: str, native: bool) -> None:
        """Native bf16 is read from the CPU flags (AMX or AVX512-BF16)."""
        from bshm_watchd.engine.factory import cpu_has_native_bf16

        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16(info) is native
        assert cpu_has_native_bf16(tmp_path / "absent") is False

    @needs_model
    @pytest.mark.parametrize("native", [True, False])
    def test_auto_picks_torch_bf16_only_where_native(self, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
        """cpu_runtime auto: torch bf16 on a CPU with native bf16, onnxruntime otherwise."""
        from bshm_watchd.engine import factory
        from bshm_watchd.engine.onnx_isnet import OnnxIsnetMatter
        from bshm_watchd.modelstore import ModelStore

        monkeypatch.setattr(factory, "cpu_has_native_bf16", lambda: native)
        matter = factory.build_matter("isnet", ModelStore(MODEL.parent), device="cpu")
        if native:
            assert isinstance(matter, TorchIsnetMatter) and matter.bf16
        else:
            assert isinstance(matter, OnnxIsnetMatter)
        forced = factory.build_matter("isnet", ModelStore(MODEL.parent), device="cpu", cpu_runtime="torch")
        assert isinstance(forced, TorchIsnetMatter) and forced.bf16 is native
        ort = factory.build_matter("isnet", ModelStore(MODEL.parent), device="cpu", cpu_runtime="onnxruntime")
        assert isinstance(ort, OnnxIsnetMatter)

    def test_unknown_runtime_refused(self) -> None:
        """An unknown cpu_runtime is refused by name."""
        from bshm_watchd.engine.factory import build_matter
        from bshm_watchd.modelstore import ModelStore

        with pytest.raises(ModelError, match="cpu_runtime"):
            build_matter("isnet", ModelStore(MODEL.parent), cpu_runtime="tensorrt")
