"""ISNet (DIS) as a native torch module, weights read from the shipped ONNX file; GPU matter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from bshm_watchd.engine.base import DEVICE_RE, RGB8, Alpha
from bshm_watchd.engine.isnet_common import ISNET_SIZE, isnet_postprocess, isnet_preprocess, isnet_resize
from bshm_watchd.errors import ConfigError, ModelError, ScanError

__all__ = [
    "ISNET_SIZE",
    "ISNetDIS",
    "TorchIsnetMatter",
    "isnet_postprocess",
    "isnet_preprocess",
    "isnet_resize",
    "load_isnet",
]


# --------------------------------------------------------------------------- network


def _upsample_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # half_pixel bilinear, as the exported graph's Resize nodes.
    return F.interpolate(x, size=ref.shape[2:], mode="bilinear", align_corners=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, 2, ceil_mode=True)


class _RebnConv(nn.Module):  # type: ignore[misc]  # torch untyped where not installed
    """3×3 conv + ReLU (the export folded BatchNorm into the conv)."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv_s1(x), inplace=True)


class _RSU(nn.Module):  # type: ignore[misc]  # torch untyped where not installed
    """Residual U-block: RSU-L (max-pool ladder of height L) or RSU-4F (dilations 1-2-4-8, no pooling).

    Submodules carry the upstream names (``rebnconvin``, ``rebnconv1`` .. ``rebnconvL``,
    ``rebnconv{L-1}d`` .. ``rebnconv1d``) so they match the ONNX node names one to one.
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int, dilated: bool = False) -> None:
        super().__init__()
        self.height, self.dilated = height, dilated
        enc_dil = [2**i for i in range(height)] if dilated else [1] * (height - 1) + [2]
        dec_dil = enc_dil[height - 2 :: -1]
        self.rebnconvin = _RebnConv(in_ch, out_ch)
        self._enc: list[_RebnConv] = []
        self._dec: list[_RebnConv] = []
        for i in range(1, height + 1):
            conv = _RebnConv(out_ch if i == 1 else mid_ch, mid_ch, enc_dil[i - 1])
            self.add_module(f"rebnconv{i}", conv)
            self._enc.append(conv)
        for i, d in zip(range(height - 1, 0, -1), dec_dil, strict=True):
            conv = _RebnConv(2 * mid_ch, out_ch if i == 1 else mid_ch, d)
            self.add_module(f"rebnconv{i}d", conv)
            self._dec.append(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin: torch.Tensor = self.rebnconvin(x)
        skips: list[torch.Tensor] = []
        hx = hxin
        for i, conv in enumerate(self._enc[:-1]):
            hx = conv(hx)
            skips.append(hx)
            if not self.dilated and i < self.height - 2:
                hx = _pool(hx)
        hx = self._enc[-1](hx)
        for j, (conv, skip) in enumerate(zip(self._dec, reversed(skips), strict=True)):
            if j > 0 and not self.dilated:
                hx = _upsample_like(hx, skip)
            hx = conv(torch.cat((hx, skip), 1))
        out: torch.Tensor = hx + hxin
        return out


class ISNetDIS(nn.Module):  # type: ignore[misc]  # torch untyped where not installed
    """ISNet general-use segmentation: 6 RSU encoder stages, 5 decoder stages, side heads.

    ``forward`` takes N×3×1024×1024 (RGB/255 − 0.5) and returns only the finest head,
    sigmoid(side1) at input size — the ONNX ``output``; side2..6 are deep-supervision heads
    kept so every stored weight has a home, but never evaluated.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 64, 3, stride=2, padding=1)
        self.stage1 = _RSU(7, 64, 32, 64)
        self.stage2 = _RSU(6, 64, 32, 128)
        self.stage3 = _RSU(5, 128, 64, 256)
        self.stage4 = _RSU(4, 256, 128, 512)
        self.stage5 = _RSU(4, 512, 256, 512, dilated=True)
        self.stage6 = _RSU(4, 512, 256, 512, dilated=True)
        self.stage5d = _RSU(4, 1024, 256, 512, dilated=True)
        self.stage4d = _RSU(4, 1024, 128, 256)
        self.stage3d = _RSU(5, 512, 64, 128)
        self.stage2d = _RSU(6, 256, 32, 64)
        self.stage1d = _RSU(7, 128, 16, 64)
        self.side1 = nn.Conv2d(64, 1, 3, padding=1)
        self.side2 = nn.Conv2d(64, 1, 3, padding=1)
        self.side3 = nn.Conv2d(128, 1, 3, padding=1)
        self.side4 = nn.Conv2d(256, 1, 3, padding=1)
        self.side5 = nn.Conv2d(512, 1, 3, padding=1)
        self.side6 = nn.Conv2d(512, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The exported graph feeds conv_in straight into stage1 (upstream's pool_in is dead code).
        hx1 = self.stage1(self.conv_in(x))
        hx2 = self.stage2(_pool(hx1))
        hx3 = self.stage3(_pool(hx2))
        hx4 = self.stage4(_pool(hx3))
        hx5 = self.stage5(_pool(hx4))
        hx6 = self.stage6(_pool(hx5))
        hx5d = self.stage5d(torch.cat((_upsample_like(hx6, hx5), hx5), 1))
        hx4d = self.stage4d(torch.cat((_upsample_like(hx5d, hx4), hx4), 1))
        hx3d = self.stage3d(torch.cat((_upsample_like(hx4d, hx3), hx3), 1))
        hx2d = self.stage2d(torch.cat((_upsample_like(hx3d, hx2), hx2), 1))
        hx1d = self.stage1d(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))
        # Upsample + sigmoid in fp32 (as the graph's Resize casts do): fp16 rounds the matte to 1/2048 near 1.
        d1 = self.side1(hx1d).float()
        return torch.sigmoid(_upsample_like(d1, x))


# --------------------------------------------------------------------------- weights from ONNX

_NODE_NAME = re.compile(r"^/((?:[A-Za-z_][A-Za-z0-9_]*/)*[A-Za-z_][A-Za-z0-9_]*)/Conv$")


@dataclass(frozen=True)
class _OnnxConv:
    module: str
    weight: npt.NDArray[np.floating]
    bias: npt.NDArray[np.floating]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]


def _read_onnx_convs(path: Path) -> list[_OnnxConv]:
    """Every Conv of the graph with its weights; the node name ``/stage1/rebnconv1/conv_s1/Conv``
    names the module ``stage1.rebnconv1.conv_s1``. Unused initializers are an error."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ModelError(f"reading {path} needs the onnx package: {e}") from e
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:  # onnx raises DecodeError, OSError, ... for a truncated or foreign file
        raise ModelError(f"cannot read ONNX model {path}: {e}") from e
    inits = {t.name: t for t in graph.initializer}
    used: set[str] = set()
    convs: list[_OnnxConv] = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        m = _NODE_NAME.match(node.name)
        if m is None or len(node.input) != 3:
            raise ModelError(f"{path}: unexpected Conv node {node.name!r} inputs {list(node.input)}")
        missing = [n for n in node.input[1:] if n not in inits]
        if missing:
            raise ModelError(f"{path}: Conv {node.name!r} lacks initializer(s) {missing}")
        used.update(node.input[1:])
        attrs = {a.name: tuple(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.ints}
        convs.append(
            _OnnxConv(
                module=m.group(1).replace("/", "."),
                weight=numpy_helper.to_array(inits[node.input[1]]),
                bias=numpy_helper.to_array(inits[node.input[2]]),
                stride=attrs.get("strides", (1, 1)),
                dilation=attrs.get("dilations", (1, 1)),
                pads=attrs.get("pads", (0, 0, 0, 0)),
            )
        )
    unused = sorted(set(inits) - used)
    if unused:
        raise ModelError(f"{path}: {len(unused)} initializer(s) no Conv uses, e.g. {unused[:5]}")
    return convs


def load_isnet(path: Path) -> ISNetDIS:
    """Build the network and fill it from the ONNX file; any missing, unused or
    mis-shaped tensor, or a conv whose stride/dilation/padding differs, raises ModelError."""
    net = ISNetDIS()
    params = dict(net.named_parameters())
    modules = dict(net.named_modules())
    filled: set[str] = set()
    problems: list[str] = []
    for c in _read_onnx_convs(path):
        conv = modules.get(c.module)
        if not isinstance(conv, nn.Conv2d):
            problems.append(f"{c.module}: no such conv in ISNetDIS")
            continue
        geometry = (tuple(conv.stride), tuple(conv.dilation), tuple(conv.padding) * 2)
        if geometry != (c.stride, c.dilation, c.pads):
            problems.append(f"{c.module}: stride/dilation/pads {(c.stride, c.dilation, c.pads)} vs {geometry}")
        for suffix, arr in (("weight", c.weight), ("bias", c.bias)):
            key = f"{c.module}.{suffix}"
            if key in filled:
                problems.append(f"{key}: set twice")
            elif tuple(params[key].shape) != arr.shape:
                problems.append(f"{key}: shape {arr.shape} != {tuple(params[key].shape)}")
            else:
                with torch.no_grad():
                    params[key].copy_(torch.from_numpy(arr.astype(np.float32)))
                filled.add(key)
    problems += [f"{k}: no tensor in the file" for k in sorted(set(params) - filled)]
    if problems:
        raise ModelError(f"{path} does not fit ISNetDIS ({len(problems)} problem(s)): {problems[:5]}")
    net.eval()
    return net


# --------------------------------------------------------------------------- matter



def torch_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device, checked against the GPUs torch sees."""
    if not DEVICE_RE.fullmatch(device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s)")
    return dev


class TorchIsnetMatter:
    """ISNet on torch (CUDA fp16 by default; CPU fp32, or bf16 where the CPU computes it natively);
    same pre/post-processing as the onnxruntime path."""

    name = "isnet"

    def __init__(
        self,
        onnx_path: Path,
        device: str = "auto",
        fp16: bool | None = None,
        batch_size: int = 8,
        channels_last: bool = False,
        bf16: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch_device(device)
        on_cuda = self.device.type == "cuda"
        self.fp16 = on_cuda if fp16 is None else fp16
        if bf16 and (on_cuda or self.fp16):
            raise ConfigError("bf16 is the CPU mode; CUDA runs fp16")
        if self.fp16 and not on_cuda:
            # CPU half convolutions are an order of magnitude slower than fp32: refuse, don't crawl.
            raise ConfigError("fp16 needs a CUDA device")
        # bf16 autocast on a CPU with AMX / AVX512-BF16: 0.50 s a 1024² pass on 2 cores against 1.38 s
        # for onnxruntime fp32 (channels-last is what lets oneDNN pick its bf16 kernels). Without
        # native bf16 it would be emulated (not measured): the factory only asks for it where native.
        self.bf16 = bf16
        channels_last = channels_last or bf16
        if not Path(onnx_path).is_file():
            raise ModelError(f"model file not found: {onnx_path}")
        self.batch_size = batch_size
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        net = load_isnet(Path(onnx_path)).to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._net = net.half() if self.fp16 else net

    def predict(self, rgb: RGB8) -> Alpha:
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]:
        resized = [isnet_resize(im) for im in images]
        out: list[Alpha] = []
        for start in range(0, len(images), self.batch_size):
            raw = self.predict_raw(np.stack(resized[start : start + self.batch_size]))
            out += [
                isnet_postprocess(r, *im.shape[:2])
                for r, im in zip(raw, images[start : start + self.batch_size], strict=True)
            ]
        return out

    def predict_raw(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """N×1024×1024×3 uint8 RGB (from ``isnet_resize``) → N×1024×1024 float32 raw ``output``."""
        if batch.ndim != 4 or batch.shape[1:] != (ISNET_SIZE, ISNET_SIZE, 3) or batch.dtype != np.uint8:
            raise ValueError(f"expected N×{ISNET_SIZE}×{ISNET_SIZE}×3 uint8, got {batch.dtype} {batch.shape}")
        with torch.inference_mode():
            host = torch.from_numpy(np.ascontiguousarray(batch))
            if self.device.type == "cuda":
                # uint8 crosses the bus (4× less than float32); pinned memory lets the copy run async.
                host = host.pin_memory()
            x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0 - 0.5
            if self.fp16:
                x = x.half()
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    y = self._net(x.contiguous(memory_format=self._memory_format))[:, 0].float()
            except torch.cuda.OutOfMemoryError as e:
                # Another process took the GPU's memory: this batch is worth retrying, the service lives on.
                raise ScanError(
                    f"CUDA out of memory at batch {len(batch)}: {e}", stage="matting", transient=True
                ) from e
            if self.device.type == "cuda":
                # A pageable D2H copy runs at a fraction of the bus speed (16 mattes = 64 MB a batch).
                host_out = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
                host_out.copy_(y, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                host_out = y
            result: npt.NDArray[np.float32] = host_out.numpy()
        return result
