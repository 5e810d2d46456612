"""Tests for the torch interpreter of tfjs graph models: op semantics on small synthetic graphs (expectations
computed by hand or in numpy/cv2), load errors, and RVM against TensorFlow on the real model."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional 'gpu' extra)")

import cv2  # noqa: E402

from bshm_watchd.engine.rvm import RvmMatter, downsample_ratio  # noqa: E402
from bshm_watchd.engine.tfjs_graph import TfjsGraph  # noqa: E402
from bshm_watchd.errors import ModelError  # noqa: E402
from bshm_watchd.modelstore import ModelStore, default_model_dir  # noqa: E402

# --------------------------------------------------------------------------- building tfjs models


def _attr(value: Any) -> dict[str, Any]:
    """A Python value as a protobuf-JSON AttrValue."""
    if isinstance(value, bool):
        return {"b": value}
    if isinstance(value, int):
        return {"i": str(value)}
    if isinstance(value, float):
        return {"f": value}
    if isinstance(value, str):
        return {"type": value} if value.startswith("DT_") else {"s": base64.b64encode(value.encode()).decode()}
    if all(isinstance(v, int) for v in value):
        return {"list": {"i": [str(v) for v in value]}}
    return {"list": {"s": [base64.b64encode(v.encode()).decode() for v in value]}}


def node(name: str, op: str, *inputs: str, **attr: Any) -> dict[str, Any]:
    return {"name": name, "op": op, "input": list(inputs), "attr": {k: _attr(v) for k, v in attr.items()}}


def placeholder(name: str, dtype: str = "DT_FLOAT") -> dict[str, Any]:
    return node(name, "Placeholder", dtype=dtype)


class Model:
    """A tfjs graph model under construction: nodes plus Const weights, quantised to uint8 on request."""

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.entries: list[dict[str, Any]] = []
        self.blob = b""

    def add(self, *nodes: dict[str, Any]) -> Model:
        self.nodes += nodes
        return self

    def const(self, name: str, value: Any, *, dtype: str = "float32", quantize: bool = False) -> Model:
        arr = np.asarray(value, dtype=np.int32 if dtype == "int32" else np.float32)
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "dtype": dtype}
        if quantize:
            lo, hi = float(arr.min()), float(arr.max())
            scale = (hi - lo) / 255 or 1.0
            entry["quantization"] = {"dtype": "uint8", "min": lo, "scale": scale, "original_dtype": dtype}
            self.blob += np.round((arr - lo) / scale).astype(np.uint8).tobytes()
        else:
            self.blob += arr.tobytes()
        self.entries.append(entry)
        self.nodes.append(node(name, "Const", dtype="DT_INT32" if dtype == "int32" else "DT_FLOAT"))
        return self

    def json(self) -> bytes:
        model = {
            "format": "graph-model",
            "modelTopology": {"node": self.nodes, "library": {}, "versions": {}},
            "weightsManifest": [{"paths": ["group1-shard1of1.bin"], "weights": self.entries}],
        }
        return json.dumps(model).encode()

    def load(self) -> TfjsGraph:
        return TfjsGraph.from_bytes(self.json(), {"group1-shard1of1.bin": self.blob})


def run1(graph: TfjsGraph, feeds: dict[str, Any], out: str = "out") -> np.ndarray:
    (value,) = graph.run(feeds, [out])
    return np.asarray(value.cpu().numpy())


# --------------------------------------------------------------------------- numpy references


def np_conv(x: np.ndarray, w: np.ndarray, stride: int, pads: tuple[int, int, int, int]) -> np.ndarray:
    """x H×W×Cin, w kh×kw×Cin×Cout, pads (top, bottom, left, right)."""
    t, b, l_, r = pads
    xp = np.pad(x, ((t, b), (l_, r), (0, 0)))
    kh, kw = w.shape[:2]
    oh, ow = (xp.shape[0] - kh) // stride + 1, (xp.shape[1] - kw) // stride + 1
    out = np.zeros((oh, ow, w.shape[3]), np.float64)
    for i in range(oh):
        for j in range(ow):
            out[i, j] = np.tensordot(xp[i * stride : i * stride + kh, j * stride : j * stride + kw], w, axes=3)
    return out


def np_depthwise(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """VALID, stride 1; x H×W×C, w kh×kw×C×M → H'×W'×(C·M), channel c·M+m."""
    kh, kw, c, m = w.shape
    oh, ow = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    out = np.zeros((oh, ow, c, m), np.float64)
    for i in range(oh):
        for j in range(ow):
            out[i, j] = np.einsum("hwc,hwcm->cm", x[i : i + kh, j : j + kw], w)
    return out.reshape(oh, ow, c * m)


# --------------------------------------------------------------------------- op semantics


def test_quantized_weights_dequantise_and_load_from_zip(tmp_path: Path) -> None:
    q = np.array([0.0, 0.5, 1.0, 2.55], np.float32)  # uint8 with min 0, scale 0.01: 0, 50, 100, 255
    m = Model().const("q", q, quantize=True).const("f", [1.5, -2.0]).const("i", [3, -4], dtype="int32")
    m.add(node("out", "Identity", "q"))
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("model.json", m.json())
        zf.writestr("group1-shard1of1.bin", m.blob)
    graph = TfjsGraph.from_zip(path)
    got = [v.numpy() for v in graph.run({}, ["out", "f:0", "i"])]
    np.testing.assert_allclose(got[0], q, atol=1e-6)
    np.testing.assert_array_equal(got[1], [1.5, -2.0])
    assert got[2].dtype == np.int32 and got[2].tolist() == [3, -4]


@pytest.mark.parametrize(("size", "pads"), [(8, (0, 1, 0, 1)), (7, (1, 1, 1, 1))])
def test_fused_conv_same_stride2(size: int, pads: tuple[int, int, int, int]) -> None:
    """TF SAME puts the odd padding pixel at the bottom/right (8×8, 3×3, stride 2: 0 above, 1 below)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, size, size, 2)).astype(np.float32)
    w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    m = Model().const("w", w).const("b", bias).add(placeholder("x"))
    m.add(
        node("out", "_FusedConv2D", "x", "w", "b", fused_ops=["BiasAdd", "Relu"], padding="SAME", strides=[1, 2, 2, 1])
    )
    got = run1(m.load(), {"x": x})
    want = np.maximum(np_conv(x[0], w, 2, pads) + bias, 0)
    assert got.shape == (1, *want.shape)
    np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_fused_depthwise_conv_with_quantized_filter() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 5, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    m = Model().const("w", w, quantize=True).const("b", np.zeros(6)).add(placeholder("x"))
    m.add(node("out", "FusedDepthwiseConv2dNative", "x", "w", "b", fused_ops=["BiasAdd"], padding="VALID"))
    lo, scale = float(w.min()), float(w.max() - w.min()) / 255
    wq = np.round((w - lo) / scale) * scale + lo  # what the uint8 weight decodes to
    np.testing.assert_allclose(run1(m.load(), {"x": x})[0], np_depthwise(x[0], wq), atol=1e-4)


def test_avg_pool_same_averages_valid_pixels_only() -> None:
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    m = Model().add(placeholder("x"))
    m.add(node("out", "AvgPool", "x", ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="SAME", data_format="NHWC"))
    # windows {0,1,3,4}, {2,5}, {6,7}, {8}
    np.testing.assert_allclose(run1(m.load(), {"x": x})[0, :, :, 0], [[2.0, 3.5], [6.5, 8.0]])


def _resize_model(align: bool, half: bool) -> TfjsGraph:
    m = Model().add(placeholder("x"), placeholder("size_in", "DT_INT32"))
    return m.add(node("out", "ResizeBilinear", "x", "size_in", align_corners=align, half_pixel_centers=half)).load()


@pytest.mark.parametrize(
    ("align", "half", "out", "coords"),
    [
        (False, True, 4, [0.0, 0.25, 0.75, 1.0]),  # (d + .5) / 2 - .5, clamped into [0, 1]
        (True, False, 3, [0.0, 0.5, 1.0]),  # d · (2 - 1) / (3 - 1)
        (False, False, 4, [0.0, 0.5, 1.0, 1.0]),  # legacy: d / 2, the upper neighbour clamped
    ],
)
def test_resize_bilinear_modes(align: bool, half: bool, out: int, coords: list[float]) -> None:
    x = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32).reshape(1, 2, 2, 1)
    got = run1(_resize_model(align, half), {"x": x, "size_in": np.array([out, out], np.int32)})
    c = np.array(coords)
    np.testing.assert_allclose(got[0, :, :, 0], 2 * c[:, None] + c[None, :], atol=1e-6)


def test_resize_bilinear_half_pixel_matches_cv2() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((5, 7, 3)).astype(np.float32)
    got = run1(_resize_model(False, True), {"x": x[None], "size_in": np.array([9, 13], np.int32)})
    np.testing.assert_allclose(got[0], cv2.resize(x, (13, 9), interpolation=cv2.INTER_LINEAR), atol=1e-5)


def _strided_slice(begin: list[int], end: list[int], strides: list[int], **masks: int) -> TfjsGraph:
    m = Model().const("b", begin, dtype="int32").const("e", end, dtype="int32").const("s", strides, dtype="int32")
    m.add(placeholder("x"), node("out", "StridedSlice", "x", "b", "e", "s", **masks))
    return m.load()


def test_strided_slice_masks() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    # x[1, tf.newaxis, 0:3, ::-1]: shrink spec 0, new axis spec 1, spec 3 reversed with its end masked
    g = _strided_slice([1, 0, 0, -1], [2, 0, 3, 0], [1, 1, 1, -1], shrink_axis_mask=1, new_axis_mask=2, end_mask=8)
    np.testing.assert_array_equal(run1(g, {"x": x}), x[1, None, 0:3, ::-1])
    # x[..., 1]
    g = _strided_slice([0, 1], [0, 2], [1, 1], ellipsis_mask=1, shrink_axis_mask=2)
    np.testing.assert_array_equal(run1(g, {"x": x}), x[..., 1])
    # x[:, -2:, 3:0:-2] with the begin of spec 0 masked
    g = _strided_slice([5, -2, 3], [2, 5, 0], [1, 1, -2], begin_mask=1)
    np.testing.assert_array_equal(run1(g, {"x": x}), x[:2, -2:, 3:0:-2])


def test_space_to_batch_and_back() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    m = Model().const("block", [2, 2], dtype="int32").const("pads", [[1, 0], [1, 2]], dtype="int32")
    m.add(placeholder("x"), node("stb", "SpaceToBatchND", "x", "block", "pads"))
    m.add(node("out", "BatchToSpaceND", "stb", "block", "pads"))
    g = m.load()
    stb, back = (v.numpy() for v in g.run({"x": x}, ["stb", "out"]))
    padded = np.pad(x, ((0, 0), (1, 0), (1, 2), (0, 0)))
    want = np.concatenate([padded[:, i::2, j::2] for i in range(2) for j in range(2)])  # batch (i·2 + j)·B + b
    np.testing.assert_array_equal(stb, want)
    np.testing.assert_array_equal(back, x)


def _cond_model() -> TfjsGraph:
    """out = x * 2 if flag == 1 else x + 10, as TF1 cond lowers it (Switch, pivots, Merge)."""
    m = Model().const("one", 1.0).const("two", 2.0).const("ten", 10.0)
    m.add(
        placeholder("x"),
        placeholder("flag"),
        node("pred", "Equal", "flag", "one"),
        node("sw", "Switch", "x", "pred"),
        node("pivot_t", "Identity", "sw:1"),
        node("pivot_f", "Identity", "sw"),
        node("then", "Mul", "pivot_t", "two"),
        node("else_in", "Identity", "x", "^pivot_f"),  # live only through its control edge
        node("else", "AddV2", "else_in", "ten"),
        node("out", "Merge", "else", "then"),
    )
    return m.load()


def test_switch_merge_takes_the_live_branch() -> None:
    g = _cond_model()
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(run1(g, {"x": x, "flag": np.float32(1.0)}), [2.0, 4.0])
    np.testing.assert_array_equal(run1(g, {"x": x, "flag": np.float32(0.0)}), [11.0, 12.0])
    assert run1(g, {"x": x, "flag": np.float32(0.0)}, "out:1") == 0  # Merge's value_index
    with pytest.raises(ValueError, match="dead"):
        g.run({"x": x, "flag": np.float32(0.0)}, ["then"])


def test_unknown_op_is_a_model_error() -> None:
    m = Model().add(placeholder("x"), node("weird/node", "FancyOp", "x"))
    with pytest.raises(ModelError, match=r"'FancyOp'.*'weird/node'"):
        m.load()


def test_truncated_and_missing_weights_are_model_errors() -> None:
    m = Model().const("w", np.ones((4, 4))).add(node("out", "Identity", "w"))
    with pytest.raises(ModelError, match="truncated"):
        TfjsGraph.from_bytes(m.json(), {"group1-shard1of1.bin": m.blob[:-3]})
    with pytest.raises(ModelError, match="truncated"):
        TfjsGraph.from_bytes(m.json(), m.blob[:10])
    with pytest.raises(ModelError, match=r"group1-shard1of1\.bin.*missing"):
        TfjsGraph.from_bytes(m.json(), {"other.bin": m.blob})
    assert run1(TfjsGraph.from_bytes(m.json(), m.blob), {}).sum() == 16


# --------------------------------------------------------------------------- RVM against TensorFlow


def _rvm_zip() -> Path | None:
    try:
        return ModelStore(default_model_dir()).path("rvm")
    except (ModelError, KeyError):
        return None


RVM_ZIP = _rvm_zip()
HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def _tf_rvm(zip_path: Path) -> Any:
    """RVM in real TensorFlow: the GraphDef with the Consts filled in, tfjs's fused convs split back into
    conv + BiasAdd + activation; returns ``f(rgb01 H×W×3, ratio) -> alpha H×W``."""
    import tensorflow as tf
    from google.protobuf import json_format

    with zipfile.ZipFile(zip_path) as zf:
        jname = next(n for n in zf.namelist() if n.endswith(".json"))
        model = json.loads(zf.read(jname))
        blob = b"".join(zf.read(p) for g in model["weightsManifest"] for p in g["paths"])
    values, off = {}, 0
    for w in (w for g in model["weightsManifest"] for w in g["weights"]):
        n = int(np.prod(w["shape"]))
        q = w.get("quantization")
        if q:
            a = np.frombuffer(blob, np.uint8, n, off).astype(np.float64) * q["scale"] + q["min"]
            off += n
            a = np.round(a).astype(np.int32) if w["dtype"] == "int32" else a.astype(np.float32)
        else:
            dt = np.dtype({"float32": np.float32, "int32": np.int32, "bool": np.bool_}[w["dtype"]])
            a = np.frombuffer(blob, dt, n, off)
            off += n * dt.itemsize
        values[w["name"]] = a.reshape(w["shape"])
    topo = model["modelTopology"]
    gd = json_format.ParseDict({"node": topo["node"], "versions": topo.get("versions", {})}, tf.compat.v1.GraphDef())
    nodes = []
    for nd in gd.node:
        if nd.op == "Const":
            nd.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(values[nd.name]))
        if nd.op not in ("_FusedConv2D", "FusedDepthwiseConv2dNative"):
            nodes.append(nd)
            continue
        conv = tf.compat.v1.NodeDef()
        conv.CopyFrom(nd)
        conv.name, conv.op = nd.name + "/conv", "Conv2D" if nd.op == "_FusedConv2D" else "DepthwiseConv2dNative"
        del conv.input[2:]
        for key in ("fused_ops", "num_args", "epsilon", "leakyrelu_alpha", "TArgs", "num_host_args", "filter_format"):
            if key in conv.attr:
                del conv.attr[key]
        chain, last, extra = [conv], conv.name, list(nd.input[2:])
        for i, op in enumerate(x.decode() for x in nd.attr["fused_ops"].list.s):
            step = tf.compat.v1.NodeDef(name=f"{nd.name}/f{i}", op=op)
            step.attr["T"].type = nd.attr["T"].type
            step.input.extend([last, extra.pop(0)] if op == "BiasAdd" else [last])
            chain.append(step)
            last = step.name
        ident = tf.compat.v1.NodeDef(name=nd.name, op="Identity", input=[last])
        ident.attr["T"].type = nd.attr["T"].type
        nodes += [*chain, ident]
    del gd.node[:]
    gd.node.extend(nodes)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(gd, name="")
    sess = tf.compat.v1.Session(graph=graph)
    pha = model["signature"]["outputs"]["pha"]["name"]

    def run(rgb01: np.ndarray, ratio: float) -> np.ndarray:
        z = np.zeros((1, 1, 1, 1), np.float32)
        feed = {f"r{i}i:0": z for i in range(1, 5)}
        feed.update({"src:0": rgb01[None], "downsample_ratio:0": np.float32(ratio)})
        return np.asarray(sess.run(pha, feed)[0, :, :, 0])

    return run


def _test_image(h: int, w: int) -> np.ndarray:
    """A drawn head and shoulders on a smooth, lightly textured gradient (uint8 RGB): enough of a person
    for RVM to matte, so the comparison is not one of two all-zero alphas."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([60 + 80 * xx / w, 90 + 60 * yy / h, 140 - 40 * xx / w], axis=-1)
    img += 12 * (np.sin(xx / 9.0) * np.cos(yy / 13.0))[..., None]
    cx, u = w // 2, min(h, w)

    def ellipse(cy: float, ax: float, ay: float, start: int, color: tuple[int, int, int]) -> None:
        cv2.ellipse(img, (cx, int(cy * h)), (int(ax * u), int(ay * h)), 0, start, 360, color, -1)

    ellipse(1.05, 0.42, 0.42, 180, (40, 50, 120))  # shoulders
    cv2.rectangle(img, (cx - int(u * 0.07), int(h * 0.5)), (cx + int(u * 0.07), int(h * 0.7)), (205, 160, 135), -1)
    ellipse(0.38, 0.16, 0.2, 0, (215, 170, 145))  # face
    ellipse(0.27, 0.18, 0.13, 180, (35, 25, 20))  # hair
    for dx in (-0.06, 0.06):
        cv2.circle(img, (cx + int(dx * u), int(h * 0.36)), max(2, int(u * 0.015)), (30, 30, 30), -1)
    cv2.ellipse(img, (cx, int(h * 0.47)), (int(u * 0.05), int(u * 0.015)), 0, 0, 360, (150, 60, 60), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.models
@pytest.mark.skipif(not HAVE_TF, reason="TensorFlow is not installed: no reference to compare RVM against")
@pytest.mark.skipif(RVM_ZIP is None, reason="the rvm model is not fetched (bshm-watchd models fetch rvm)")
def test_rvm_matches_tensorflow() -> None:
    assert RVM_ZIP is not None
    reference = _tf_rvm(RVM_ZIP)
    matter = RvmMatter(RVM_ZIP)
    for h, w in ((320, 240), (241, 317)):
        rgb = _test_image(h, w)
        rgb01 = rgb.astype(np.float32) / 255.0
        alpha = matter.predict(rgb)  # at the ratio predict picks (0.8 for 320 px: downsampled, guided filter)
        assert alpha.shape == (h, w) and alpha.dtype == np.float32
        assert 0.1 < (alpha > 0.5).mean() < 0.6  # the drawn person is found, the background is not
        assert np.abs(alpha - np.clip(reference(rgb01, downsample_ratio(h, w)), 0, 1)).max() <= 2e-3
        # ratio 0.5: the downsampled path and the fast guided filter
        (pha,) = matter._graph.run(
            {
                "src": rgb01[None],
                **{f"r{i}i": np.zeros((1, 1, 1, 1), np.float32) for i in range(1, 5)},
                "downsample_ratio": np.float32(0.5),
            },
            ["Identity_1:0"],
        )
        assert np.abs(pha[0, :, :, 0].numpy() - reference(rgb01, 0.5)).max() <= 2e-3


@pytest.mark.models
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: rvm's GPU path is checked on a GPU host")
@pytest.mark.skipif(RVM_ZIP is None, reason="the rvm model is not fetched (bshm-watchd models fetch rvm)")
def test_rvm_on_cuda_matches_cpu() -> None:
    """The same graph on cuda (its constants placed there once; shape arithmetic on the CPU) gives the CPU's
    matte, within what TF32 convolutions change; and it returns a float32 matte on the host."""
    assert RVM_ZIP is not None
    cpu, cuda = RvmMatter(RVM_ZIP, device="cpu"), RvmMatter(RVM_ZIP, device="cuda")
    assert cuda.device.type == "cuda"
    for h, w in ((320, 240), (683, 1024)):
        rgb = _test_image(h, w)
        a, b = cpu.predict(rgb), cuda.predict(rgb)
        assert b.shape == (h, w) and b.dtype == np.float32
        assert 0.1 < (b > 0.5).mean() < 0.6
        assert np.abs(a - b).max() <= 2e-2 and np.abs(a - b).mean() <= 1e-3


@pytest.mark.models
@pytest.mark.skipif(RVM_ZIP is None, reason="the rvm model is not fetched (bshm-watchd models fetch rvm)")
def test_rvm_runs_without_cudnn_unless_asked() -> None:
    """cuDNN re-plans at every new input shape (2.2 s a first call on an H200, against 24 ms without it), so
    the graph runs with it off by default; the process-wide flag is back as it was afterwards."""
    assert RVM_ZIP is not None
    seen: list[bool] = []
    for asked in (False, True):
        matter = RvmMatter(RVM_ZIP, cudnn=asked)
        run = matter._graph.run

        def spy(*a: Any, _run: Any = run, **kw: Any) -> Any:
            seen.append(torch.backends.cudnn.enabled)
            return _run(*a, **kw)

        matter._graph.run = spy  # type: ignore[method-assign]
        before = torch.backends.cudnn.enabled
        assert matter.predict(_test_image(64, 48)).shape == (64, 48)
        assert torch.backends.cudnn.enabled == before
    assert seen == [False, True]


def test_rvm_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        RvmMatter(tmp_path / "absent.zip")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="zip"):
        RvmMatter(bad)
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "x")
    (tmp_path / "empty.zip").write_bytes(empty.getvalue())
    with pytest.raises(ModelError, match=r"one \.json"):
        RvmMatter(tmp_path / "empty.zip")


def test_downsample_ratio() -> None:
    """RVM_RATIO of the image, but a copy of at least RVM_MIN_SIDE px (or the image itself)."""
    assert downsample_ratio(683, 1024) == pytest.approx(0.3)
    assert downsample_ratio(1080, 1920) == pytest.approx(0.3)
    assert downsample_ratio(240, 320) == pytest.approx(0.8)
    assert downsample_ratio(100, 200) == 1.0


def test_downsample_ratio_for_a_side() -> None:
    """With a side, the ratio that brings the longer side to it, never above 1."""
    assert downsample_ratio(683, 1024, 768) == pytest.approx(0.75)
    assert downsample_ratio(1920, 1080, 768) == pytest.approx(0.4)
    assert downsample_ratio(240, 320, 768) == 1.0


@pytest.mark.models
@pytest.mark.skipif(RVM_ZIP is None, reason="the rvm model is not fetched (bshm-watchd models fetch rvm)")
def test_rvm_at_a_side_shares_the_network() -> None:
    """``at_side`` runs the same loaded graph with its encoder on a copy of that side; the original keeps its
    ratio."""
    assert RVM_ZIP is not None
    matter = RvmMatter(RVM_ZIP)
    large = matter.at_side(768)
    assert large._graph is matter._graph and matter.side is None and large.side == 768
    ratios: list[float] = []
    run = matter._graph.run

    def spy(feeds: Any, outputs: Any) -> Any:
        ratios.append(float(feeds["downsample_ratio"]))
        return run(feeds, outputs)

    matter._graph.run = spy  # type: ignore[method-assign]
    rgb = _test_image(683, 1024)
    small_alpha, large_alpha = matter.predict(rgb), large.predict(rgb)
    assert ratios == [pytest.approx(0.3), pytest.approx(0.75)]
    assert large_alpha.shape == small_alpha.shape == (683, 1024)
    assert 0.1 < (large_alpha > 0.5).mean() < 0.6
