"""A TensorFlow.js graph model interpreted with torch, no TensorFlow needed.

A tfjs graph model is a ``model.json`` holding a TensorFlow GraphDef in protobuf-JSON form
(``modelTopology.node``), a ``signature`` and a ``weightsManifest``: groups of weights whose bytes
are the concatenation of the group's shard files, each weight stored in manifest order as raw
little-endian values or quantised (uint8/uint16: ``q * scale + min``; float16: half floats).
Every ``Const`` node takes its value from the weight of the same name.

Tensors keep TensorFlow's layout (NHWC); convolutions, pools and resizes look at them through a
zero-copy NCHW view (torch's channels-last memory format), so nothing is transposed in memory.
Shape arithmetic (``Shape`` and the integer ops fed by it) stays on the CPU whatever the device.
Control flow is the dead-branch kind of TF1 ``cond``: a ``Switch`` forwards its data to output 0
(predicate false) or 1 (true), a node that reads a dead output or has a dead control input is dead,
a ``Merge`` forwards its first live input. Loops (``Enter``/``NextIteration``) are not supported.
"""

from __future__ import annotations

import base64
import json
import math
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import EllipsisType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from bshm_watchd.errors import ModelError

__all__ = ["TfjsGraph"]

Tensor = torch.Tensor

_TF_DTYPES: dict[str, torch.dtype] = {
    "DT_FLOAT": torch.float32,
    "DT_HALF": torch.float16,
    "DT_DOUBLE": torch.float64,
    "DT_INT32": torch.int32,
    "DT_INT64": torch.int64,
    "DT_UINT8": torch.uint8,
    "DT_BOOL": torch.bool,
}
_WEIGHT_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QUANT_DTYPES: dict[str, type[np.generic]] = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


@dataclass
class _Node:
    name: str
    op: str
    inputs: list[tuple[str, int]]
    """Data inputs: (node name, output index)."""
    controls: list[str]
    attr: dict[str, Any]
    prep: dict[str, Tensor] = field(default_factory=dict)
    """Load-time work: a convolution's torch-layout filter (``w``) and bias (``b``)."""


OpFn = Callable[[_Node, list[Tensor]], list[Tensor]]


@dataclass
class _Plan:
    """What one (outputs, feeds) combination runs: the nodes in order, each with the values to drop after it."""

    steps: list[tuple[_Node, list[str]]]


# --------------------------------------------------------------------------- parsing


def _attr_value(v: dict[str, Any]) -> Any:
    """One protobuf-JSON AttrValue as a Python value (lists of ints/floats/strings, scalars, dtype names)."""
    if "list" in v:
        lst = v["list"]
        if "i" in lst:
            return [int(x) for x in lst["i"]]
        if "f" in lst:
            return [float(x) for x in lst["f"]]
        if "s" in lst:
            return [base64.b64decode(x).decode("utf-8", "replace") for x in lst["s"]]
        if "type" in lst:
            return list(lst["type"])
        return []
    if "i" in v:
        return int(v["i"])
    if "f" in v:
        return float(v["f"])
    if "b" in v:
        return bool(v["b"])
    if "s" in v:
        return base64.b64decode(v["s"]).decode("utf-8", "replace")
    if "type" in v:
        return str(v["type"])
    return v or None  # shape, tensor, func: kept raw


def _split_ref(ref: str) -> tuple[str, int]:
    """``"name:1"`` → ("name", 1); ``"name"`` → ("name", 0)."""
    name, sep, index = ref.rpartition(":")
    if sep and index.isdigit():
        return name, int(index)
    return ref, 0


def _parse_node(raw: dict[str, Any]) -> _Node:
    inputs, controls = [], []
    for ref in raw.get("input", []):
        if ref.startswith("^"):
            controls.append(ref[1:])
        else:
            inputs.append(_split_ref(ref))
    attr = {k: _attr_value(v) for k, v in (raw.get("attr") or {}).items()}
    return _Node(name=raw["name"], op=raw["op"], inputs=inputs, controls=controls, attr=attr)


def _decode_weights(groups: list[tuple[bytes, list[dict[str, Any]]]]) -> dict[str, npt.NDArray[Any]]:
    """All weights, dequantised; each group is (its shards' bytes concatenated, its manifest entries)."""
    out: dict[str, npt.NDArray[Any]] = {}
    for buf, entries in groups:
        off = 0
        for w in entries:
            name, dtype = w["name"], w["dtype"]
            shape = [int(s) for s in w["shape"]]
            count = math.prod(shape)
            q = w.get("quantization")
            stored = _QUANT_DTYPES.get(q["dtype"]) if q else _WEIGHT_DTYPES.get(dtype)
            if stored is None:
                raise ModelError(f"weight {name!r}: unsupported dtype {dtype!r} (quantisation {q})")
            nbytes = count * np.dtype(stored).itemsize
            if off + nbytes > len(buf):
                raise ModelError(
                    f"weights truncated: {name!r} needs bytes {off}..{off + nbytes}, the shards hold {len(buf)}"
                )
            raw = np.frombuffer(buf, stored, count, off)
            off += nbytes
            if q is None:
                value: npt.NDArray[Any] = raw.copy()
            elif q["dtype"] == "float16":
                value = raw.astype(np.float32)
            else:  # as tfjs does it: in double precision, rounded once to float32 (int32 to the nearest int)
                deq = raw.astype(np.float64) * float(q["scale"]) + float(q["min"])
                value = np.round(deq).astype(np.int32) if dtype == "int32" else deq.astype(np.float32)
            out[name] = value.reshape(shape)
        if off != len(buf):
            raise ModelError(f"the weight shards hold {len(buf)} bytes, the manifest describes {off}")
    return out


# --------------------------------------------------------------------------- helpers for the ops


def _ints(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _same_device(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """CPU shape values meet device tensors: a 0-d CPU tensor mixes with anything, else move it."""
    if a.device == b.device or (a.dim() == 0 and a.device.type == "cpu") or (b.dim() == 0 and b.device.type == "cpu"):
        return a, b
    return (a.to(b.device), b) if a.device.type == "cpu" else (a, b.to(a.device))


def _spatial(node: _Node, key: str) -> tuple[int, int]:
    v = node.attr.get(key) or [1, 1, 1, 1]
    return int(v[1]), int(v[2])


def _pads(
    node: _Node, size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dil: Sequence[int]
) -> list[int]:
    """[top, bottom, left, right] for TF padding VALID, EXPLICIT or SAME (the odd pixel at the bottom/right)."""
    mode = node.attr.get("padding", "VALID")
    if mode == "VALID":
        return [0, 0, 0, 0]
    if mode == "EXPLICIT":
        e = node.attr.get("explicit_paddings") or [0] * 8
        return [int(e[2]), int(e[3]), int(e[4]), int(e[5])]
    out: list[int] = []
    for n, k, s, d in zip(size, kernel, stride, dil, strict=True):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        out += [total // 2, total - total // 2]
    return out


def _nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def _torch_filter(op: str, w: Tensor) -> Tensor:
    """TF filter (HWIO, or H×W×C×multiplier for depthwise) → torch OIHW."""
    if "Depthwise" in op:
        kh, kw, c, m = w.shape
        return w.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw).contiguous()
    return w.permute(3, 2, 0, 1).contiguous()


# --------------------------------------------------------------------------- ops


def _conv(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    """Conv2D / DepthwiseConv2dNative and their tfjs-fused forms (conv + ``fused_ops``, args after the filter)."""
    x = xs[0]
    w = node.prep.get("w")
    if w is None:
        w = _torch_filter(node.op, xs[1])
    x, w = _same_device(x, w)
    extra = xs[2:]
    fused: list[str] = list(node.attr.get("fused_ops") or [])
    bias = None
    if fused[:1] == ["BiasAdd"]:
        bias = node.prep.get("b", extra[0] if extra else None)
        fused, extra = fused[1:], extra[1:]
    stride, dil = _spatial(node, "strides"), _spatial(node, "dilations")
    top, bottom, left, right = _pads(node, x.shape[1:3], w.shape[2:], stride, dil)
    xc = _nchw(x)
    if top != bottom or left != right:  # torch pads symmetrically only
        xc = F.pad(xc, (left, right, top, bottom))
        top = left = 0
    groups = x.shape[3] // w.shape[1]
    y = _nhwc(F.conv2d(xc, w, bias, stride, (top, left), dil, groups))
    for op in fused:
        if op == "BiasAdd":
            y = y + extra.pop(0)
        elif op == "Prelu":
            alpha = extra.pop(0)
            y = torch.where(y >= 0, y, y * alpha)
        else:
            y = _ACTIVATIONS[op](node, y)
    return [y]


_ACTIVATIONS: dict[str, Callable[[_Node, Tensor], Tensor]] = {  # in place: the conv's output is ours
    "Relu": lambda n, y: y.relu_(),
    "Relu6": lambda n, y: F.relu6(y, inplace=True),
    "Elu": lambda n, y: F.elu(y, inplace=True),
    "Sigmoid": lambda n, y: y.sigmoid_(),
    "Tanh": lambda n, y: y.tanh_(),
    "LeakyRelu": lambda n, y: F.leaky_relu(y, float(n.attr.get("leakyrelu_alpha", 0.2)), inplace=True),
}


def _pool(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    """AvgPool (TF averages the window's valid pixels only) and MaxPool, any padding."""
    x = xs[0]
    k, s = _spatial(node, "ksize"), _spatial(node, "strides")
    top, bottom, left, right = _pads(node, x.shape[1:3], k, s, (1, 1))
    pad = (left, right, top, bottom)
    xc = _nchw(x)
    if node.op == "MaxPool":
        return [_nhwc(F.max_pool2d(F.pad(xc, pad, value=-math.inf) if any(pad) else xc, k, s))]
    if not any(pad):
        return [_nhwc(F.avg_pool2d(xc, k, s))]
    sums = F.avg_pool2d(F.pad(xc, pad), k, s, divisor_override=1)
    ones = torch.ones((1, 1, *x.shape[1:3]), dtype=x.dtype, device=x.device)
    counts = F.avg_pool2d(F.pad(ones, pad), k, s, divisor_override=1)
    return [_nhwc(sums / counts)]


def _src_coords(n_out: int, n_in: int, align: bool, offset: float, device: torch.device) -> Tensor:
    """Source coordinate of each output pixel: ``(dst + offset) * scale``, TF's scale for align_corners or not."""
    scale = (n_in - 1) / (n_out - 1) if align and n_out > 1 else n_in / n_out
    return (torch.arange(n_out, dtype=torch.float64, device=device) + offset) * scale


def _resize(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    """ResizeBilinear / ResizeNearestNeighbor with TF's align_corners and half_pixel_centers."""
    x = xs[0] if xs[0].is_floating_point() else xs[0].float()
    oh, ow = _ints(xs[1])
    align, half = bool(node.attr.get("align_corners")), bool(node.attr.get("half_pixel_centers"))
    ih, iw = x.shape[1:3]
    if node.op == "ResizeBilinear" and (align or half):  # torch's two bilinear modes are exactly these
        return [_nhwc(F.interpolate(_nchw(x), size=(oh, ow), mode="bilinear", align_corners=align))]
    out = x
    for dim, n_out, n_in in ((1, oh, ih), (2, ow, iw)):
        if node.op == "ResizeNearestNeighbor":
            src = _src_coords(n_out, n_in, align, 0.5 if half else 0.0, x.device)
            # TF rounds half away from zero with align_corners, else floors.
            idx = (torch.floor(src + 0.5) if align else torch.floor(src)).long().clamp_(0, n_in - 1)
            out = out.index_select(dim, idx)
            continue
        src = _src_coords(n_out, n_in, False, 0.0, x.device)  # the legacy scaler: neither flag set
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = n_out
        frac = (src - lo.double()).to(x.dtype).reshape(shape)
        a, b = out.index_select(dim, lo), out.index_select(dim, hi)
        out = a + (b - a) * frac
    return [out]


def _strided_slice(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    x = xs[0]
    begin, end, strides = _ints(xs[1]), _ints(xs[2]), _ints(xs[3])
    bm, em, ellm, nam, sam = (
        int(node.attr.get(k) or 0)
        for k in ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask")
    )
    consuming = sum(1 for i in range(len(begin)) if not (ellm | nam) & (1 << i))
    index: list[int | slice | EllipsisType | None] = []
    flips: list[int] = []
    dim = 0  # the input dimension the next spec entry addresses
    for i, (b, e, s) in enumerate(zip(begin, end, strides, strict=True)):
        bit = 1 << i
        if ellm & bit:
            span = x.dim() - consuming
            index += [slice(None)] * span
            dim += span
        elif nam & bit:
            index.append(None)
        elif sam & bit:
            index.append(b)
            dim += 1
        else:
            sl = slice(None if bm & bit else b, None if em & bit else e, s)
            if s < 0:  # torch has no negative steps: flip the dimension, slice it forwards
                n = x.shape[dim]
                picked = range(n)[sl]
                sl = slice(n - 1 - picked[0], n - picked[-1], -s) if picked else slice(0, 0)
                flips.append(dim)
            index.append(sl)
            dim += 1
    if flips:
        x = x.flip(flips)
    return [x[tuple(index)]]


def _slice(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    x, begin, size = xs[0], _ints(xs[1]), _ints(xs[2])
    return [x[tuple(slice(b, n if s == -1 else b + s) for b, s, n in zip(begin, size, x.shape, strict=False))]]


def _split(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    if node.op == "Split":
        axis, x = int(xs[0]), xs[1]
        return list(torch.split(x, x.shape[axis] // int(node.attr["num_split"]), dim=axis))
    x, sizes, axis = xs[0], _ints(xs[1]), int(xs[2])
    if -1 in sizes:
        sizes[sizes.index(-1)] = x.shape[axis] - (sum(sizes) + 1)
    return list(torch.split(x, sizes, dim=axis))


def _concat(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    parts = xs[:-1]
    dev = next((p.device for p in parts if p.device.type != "cpu"), parts[0].device)
    return [torch.cat([p.to(dev) for p in parts], dim=int(xs[-1]))]


def _pack(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    dev = next((p.device for p in xs if p.device.type != "cpu"), xs[0].device)
    return [torch.stack([p.to(dev) for p in xs], dim=int(node.attr.get("axis") or 0))]


def _pad(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    pairs = _ints(xs[1])
    flat = [p for d in range(len(pairs) // 2 - 1, -1, -1) for p in pairs[2 * d : 2 * d + 2]]
    value = float(xs[2]) if len(xs) > 2 else 0.0
    return [F.pad(xs[0], flat, value=value)]


def _reduce(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    x, dims = xs[0], tuple(_ints(xs[1]))
    if not dims:
        return [x]
    keep = bool(node.attr.get("keep_dims"))
    if node.op == "Mean":
        return [x.mean(dim=dims, keepdim=keep)]
    if node.op == "Sum":
        return [x.sum(dim=dims, keepdim=keep)]
    return [x.amax(dim=dims, keepdim=keep) if node.op == "Max" else x.amin(dim=dims, keepdim=keep)]


def _space_to_batch(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    x, block, pads = xs[0], _ints(xs[1]), _ints(xs[2])
    m = len(block)
    flat = [p for d in range(m - 1, -1, -1) for p in pads[2 * d : 2 * d + 2]]
    x = F.pad(x, [0, 0] * (x.dim() - 1 - m) + flat)
    batch, spatial, rest = x.shape[0], x.shape[1 : 1 + m], x.shape[1 + m :]
    split = [v for s, bs in zip(spatial, block, strict=True) for v in (s // bs, bs)]
    x = x.reshape(batch, *split, *rest)
    perm = [2 + 2 * i for i in range(m)] + [0] + [1 + 2 * i for i in range(m)] + list(range(1 + 2 * m, x.dim()))
    return [
        x.permute(perm).reshape(
            batch * math.prod(block), *(s // bs for s, bs in zip(spatial, block, strict=True)), *rest
        )
    ]


def _batch_to_space(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    x, block, crops = xs[0], _ints(xs[1]), _ints(xs[2])
    m = len(block)
    batch, spatial, rest = x.shape[0] // math.prod(block), x.shape[1 : 1 + m], x.shape[1 + m :]
    x = x.reshape(*block, batch, *spatial, *rest)
    perm = [m] + [v for i in range(m) for v in (m + 1 + i, i)] + list(range(1 + 2 * m, x.dim()))
    x = x.permute(perm).reshape(batch, *(s * bs for s, bs in zip(spatial, block, strict=True)), *rest)
    return [x[(slice(None), *(slice(crops[2 * i], x.shape[1 + i] - crops[2 * i + 1]) for i in range(m)))]]


def _squeeze(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    dims = node.attr.get("squeeze_dims") or node.attr.get("axis") or []
    return [xs[0].squeeze(tuple(dims)) if dims else xs[0].squeeze()]


def _cast(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    return [xs[0].to(_TF_DTYPES[str(node.attr["DstT"])])]


def _shape(node: _Node, xs: list[Tensor]) -> list[Tensor]:
    dtype = _TF_DTYPES.get(str(node.attr.get("out_type")), torch.int32)
    return [torch.tensor(list(xs[0].shape), dtype=dtype)]


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    def op(node: _Node, xs: list[Tensor]) -> list[Tensor]:
        return [fn(xs[0])]

    return op


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def op(node: _Node, xs: list[Tensor]) -> list[Tensor]:
        return [fn(*_same_device(xs[0], xs[1]))]

    return op


_OPS: dict[str, OpFn] = {
    **{op: _conv for op in ("Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative")},
    **{op: _pool for op in ("AvgPool", "MaxPool")},
    **{op: _resize for op in ("ResizeBilinear", "ResizeNearestNeighbor")},
    **{op: _reduce for op in ("Mean", "Sum", "Max", "Min")},
    **{op: _split for op in ("Split", "SplitV")},
    **{op: _pad for op in ("Pad", "PadV2")},
    **{op: _unary(lambda x: x) for op in ("Identity", "StopGradient", "Snapshot")},
    "StridedSlice": _strided_slice,
    "Slice": _slice,
    "ConcatV2": _concat,
    "Pack": _pack,
    "SpaceToBatchND": _space_to_batch,
    "BatchToSpaceND": _batch_to_space,
    "Squeeze": _squeeze,
    "Cast": _cast,
    "Shape": _shape,
    "BroadcastTo": lambda n, xs: [xs[0].expand(_ints(xs[1]))],
    "Reshape": lambda n, xs: [xs[0].reshape(_ints(xs[1]))],
    "ExpandDims": lambda n, xs: [xs[0].unsqueeze(int(xs[1]))],
    "Transpose": lambda n, xs: [xs[0].permute(_ints(xs[1]))],
    "Relu": _unary(F.relu),
    "Relu6": _unary(F.relu6),
    "Elu": _unary(F.elu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Square": _unary(lambda x: x * x),
    "Sqrt": _unary(torch.sqrt),
    "Rsqrt": _unary(torch.rsqrt),
    "Exp": _unary(torch.exp),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor),
    "LogicalNot": _unary(torch.logical_not),
    "Mul": _binary(torch.mul),
    "Add": _binary(torch.add),
    "AddV2": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "RealDiv": _binary(torch.div),
    "FloorDiv": _binary(lambda a, b: torch.div(a, b, rounding_mode="floor")),
    "FloorMod": _binary(torch.remainder),
    "Minimum": _binary(torch.minimum),
    "Maximum": _binary(torch.maximum),
    "Pow": _binary(torch.pow),
    "SquaredDifference": _binary(lambda a, b: (a - b) * (a - b)),
    "Equal": _binary(torch.eq),
    "NotEqual": _binary(torch.ne),
    "Less": _binary(torch.lt),
    "LessEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterEqual": _binary(torch.ge),
    "LogicalAnd": _binary(torch.logical_and),
    "LogicalOr": _binary(torch.logical_or),
}
_SPECIAL = {"Const", "Placeholder", "NoOp", "Switch", "Merge"}
_FUSED_OK = {"BiasAdd", "Prelu", *_ACTIVATIONS}


# --------------------------------------------------------------------------- the graph


class TfjsGraph:
    """A loaded tfjs graph model; ``run`` evaluates the nodes the requested outputs need."""

    def __init__(
        self,
        nodes: list[dict[str, Any]],
        weights: Mapping[str, npt.NDArray[Any]],
        *,
        signature: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self._nodes: dict[str, _Node] = {}
        for raw in nodes:
            node = _parse_node(raw)
            if node.op not in _OPS and node.op not in _SPECIAL:
                raise ModelError(f"unsupported op {node.op!r} at node {node.name!r}")
            unknown_fused = set(node.attr.get("fused_ops") or []) - _FUSED_OK
            if unknown_fused:
                raise ModelError(f"unsupported fused op(s) {sorted(unknown_fused)} at node {node.name!r}")
            if node.attr.get("data_format", "NHWC") != "NHWC":
                raise ModelError(f"node {node.name!r}: data_format {node.attr['data_format']} is not supported")
            self._nodes[node.name] = node
        self._order = self._topological_order()
        self._consts: dict[str, list[Tensor | None] | None] = {}
        for node in self._nodes.values():
            if node.op == "Const":
                if node.name not in weights:
                    raise ModelError(f"constant {node.name!r} has no weight in the manifest")
                self._consts[node.name] = [self._place(torch.from_numpy(np.asarray(weights[node.name], order="C")))]
        self._prepare_convs()
        sig = signature or {}
        self.inputs: dict[str, str] = {k: str(v.get("name", k)) for k, v in (sig.get("inputs") or {}).items()}
        """Signature input key → graph tensor name."""
        self.outputs: dict[str, str] = {k: str(v.get("name", k)) for k, v in (sig.get("outputs") or {}).items()}
        """Signature output key → graph tensor name (e.g. ``pha`` → ``Identity_1:0``)."""
        self._plans: dict[tuple[tuple[tuple[str, int], ...], frozenset[str]], _Plan] = {}

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_bytes(
        cls, model_json: bytes, weights: Mapping[str, bytes] | bytes, device: str | torch.device = "cpu"
    ) -> TfjsGraph:
        """``model_json``: the model.json bytes; ``weights``: shard path → bytes, or all shards concatenated."""
        try:
            model = json.loads(model_json)
            nodes = model["modelTopology"]["node"]
            manifest = model.get("weightsManifest") or []
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"not a tfjs graph model JSON: {exc}") from exc
        if model.get("format", "graph-model") != "graph-model":
            raise ModelError(f"a tfjs {model['format']!r}, not a graph-model")

        if isinstance(weights, bytes | bytearray | memoryview):
            entries = [w for group in manifest for w in group["weights"]]
            values = _decode_weights([(bytes(weights), entries)])
        else:
            by_name = {PurePosixPath(k).name: v for k, v in weights.items()}

            def shard(path: str) -> bytes:
                data = weights.get(path, by_name.get(PurePosixPath(path).name))
                if data is None:
                    raise ModelError(f"weight shard {path!r} is missing")
                return data

            values = _decode_weights([(b"".join(shard(p) for p in g["paths"]), g["weights"]) for g in manifest])
        return cls(nodes, values, signature=model.get("signature"), device=device)

    @classmethod
    def from_zip(cls, path: Path, device: str | torch.device = "cpu") -> TfjsGraph:
        """A zip holding one ``<name>.json`` and the weight shards its manifest names."""
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                jsons = [n for n in names if n.endswith(".json")]
                if len(jsons) != 1:
                    raise ModelError(f"{path}: expected one .json model in the zip, found {jsons}")
                model_json = zf.read(jsons[0])
                shards = {n: zf.read(n) for n in names if n != jsons[0]}
        except (OSError, zipfile.BadZipFile) as exc:
            raise ModelError(f"{path}: cannot read the model zip: {exc}") from exc
        try:
            return cls.from_bytes(model_json, shards, device=device)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from exc

    def _topological_order(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1: on the DFS stack, 2: done

        def deps(name: str) -> Iterable[str]:
            node = self._nodes[name]
            for dep in [n for n, _ in node.inputs] + node.controls:
                if dep not in self._nodes:
                    raise ModelError(f"node {name!r} reads {dep!r}, which the graph lacks")
                yield dep

        for root in self._nodes:
            if root in state:
                continue
            state[root] = 1
            stack = [(root, iter(deps(root)))]
            while stack:
                name, pending = stack[-1]
                for dep in pending:
                    if dep not in state:
                        state[dep] = 1
                        stack.append((dep, iter(deps(dep))))
                        break
                    if state[dep] == 1:
                        raise ModelError(f"the graph has a cycle through {dep!r} (loops are not supported)")
                else:
                    stack.pop()
                    state[name] = 2
                    order.append(name)
        return order

    def _place(self, t: Tensor) -> Tensor:
        """Float tensors with a shape go to the device; scalars and integer (shape) values stay on the CPU."""
        return t.to(self.device) if t.is_floating_point() and t.dim() > 0 else t

    def _const(self, name: str) -> Tensor | None:
        outs = self._consts.get(name)
        return outs[0] if outs else None

    def _prepare_convs(self) -> None:
        for node in self._nodes.values():
            if _OPS.get(node.op) is not _conv:
                continue
            w = self._const(node.inputs[1][0]) if node.inputs[1][1] == 0 else None
            if w is not None:
                node.prep["w"] = _torch_filter(node.op, w.to(self.device).float())
            fused = node.attr.get("fused_ops") or []
            if fused[:1] == ["BiasAdd"] and len(node.inputs) > 2 and node.inputs[2][1] == 0:
                b = self._const(node.inputs[2][0])
                if b is not None:
                    node.prep["b"] = b.to(self.device).float()

    # ---- running ------------------------------------------------------------------------
    def _plan(self, outputs: tuple[tuple[str, int], ...], fed: frozenset[str]) -> _Plan:
        key = (outputs, fed)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        needed: set[str] = set()
        stack = [name for name, _ in outputs]
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            node = self._nodes.get(name)
            if node is None:
                raise ValueError(f"the graph has no node {name!r}")
            needed.add(name)
            if name not in fed:
                stack += [n for n, _ in node.inputs] + node.controls
        steps = [self._nodes[n] for n in self._order if n in needed and n not in fed and self._nodes[n].op != "Const"]
        missing = [n.name for n in steps if n.op == "Placeholder"]
        if missing:
            raise ValueError(f"inputs {missing} must be fed")
        last_use: dict[str, int] = {}
        for i, node in enumerate(steps):
            for dep in [n for n, _ in node.inputs] + node.controls:
                last_use[dep] = i
        keep = {name for name, _ in outputs} | set(self._consts)
        drops: list[list[str]] = [[] for _ in steps]
        for name, i in last_use.items():
            if name not in keep:
                drops[i].append(name)
        plan = _Plan(steps=list(zip(steps, drops, strict=True)))
        self._plans[key] = plan
        return plan

    def _feed(self, name: str, value: npt.NDArray[Any] | Tensor | float) -> Tensor:
        t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value, order="C"))
        dtype = _TF_DTYPES.get(str(self._nodes[name].attr.get("dtype"))) if name in self._nodes else None
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return self._place(t)

    def run(self, feeds: Mapping[str, npt.NDArray[Any] | Tensor | float], outputs: Sequence[str]) -> list[Tensor]:
        """Evaluate ``outputs`` (``"name"`` or ``"name:k"``) given ``feeds`` (``"name"`` or ``"name:0"``)."""
        refs = tuple(_split_ref(o) for o in outputs)
        with torch.inference_mode():
            env: dict[str, list[Tensor | None] | None] = dict(self._consts)
            for key, value in feeds.items():
                name = _split_ref(key)[0]
                if name not in self._nodes:
                    raise ValueError(f"the graph has no input {key!r}")
                env[name] = [self._feed(name, value)]
            for node, drops in self._plan(refs, frozenset(_split_ref(k)[0] for k in feeds)).steps:
                try:
                    env[node.name] = self._eval(node, env)
                except Exception as exc:
                    exc.add_note(f"while evaluating {node.op} node {node.name!r}")
                    raise
                for name in drops:
                    del env[name]
            result = []
            for (name, index), ref in zip(refs, outputs, strict=True):
                outs = env[name]
                out = outs[index] if outs is not None and index < len(outs) else None
                if out is None:
                    raise ValueError(f"output {ref!r} is dead (on the branch a Switch did not take) or absent")
                result.append(out)
        return result

    @staticmethod
    def _eval(node: _Node, env: Mapping[str, list[Tensor | None] | None]) -> list[Tensor | None] | None:
        """The node's outputs; None when it is dead."""
        args: list[Tensor | None] = []
        for name, index in node.inputs:
            outs = env[name]
            args.append(outs[index] if outs is not None else None)
        if node.op == "Merge":
            for i, value in enumerate(args):
                if value is not None:
                    return [value, torch.tensor(i, dtype=torch.int32)]
            return None
        if any(a is None for a in args) or any(env[c] is None for c in node.controls):
            return None
        live = [a for a in args if a is not None]
        if node.op == "Switch":
            taken = bool(live[1].reshape(()).item())
            return [None, live[0]] if taken else [live[0], None]
        if node.op == "NoOp":
            return []
        return list(_OPS[node.op](node, live))
