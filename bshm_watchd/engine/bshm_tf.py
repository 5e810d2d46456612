"""BSHM on TensorFlow: the official frozen graph (``tf_graph.pb``) behind the Matter protocol.

Graph contract (ModelScope ``damo/cv_unet_image-matting``): ``input_image:0`` takes ONE H×W×3 array of
RGB values 0–255 (float, no batch dimension, no resizing or normalisation on our side); ``output_png:0``
returns H×W×4 RGBA uint8 whose last channel is the alpha.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from structlog.typing import FilteringBoundLogger

from bshm_watchd.engine.base import DEVICE_RE, RGB8, Alpha
from bshm_watchd.errors import ConfigError, ModelError, ScanError

INPUT_TENSOR = "input_image:0"
OUTPUT_TENSOR = "output_png:0"
INSTALL_HINT = "pip install -e '.[bshm]'"

_FEEDABLE_OPS = ("Placeholder", "PlaceholderWithDefault")

Shape = tuple[int | None, ...] | None
"""Static shape as TensorFlow knows it: ``None`` for an unknown rank, ``None`` entries for unknown dims."""


@dataclass(frozen=True)
class GraphInfo:
    """What ``validate_graph`` learnt about a BSHM graph file."""

    path: Path
    sha256: str
    size_bytes: int
    nodes: int
    input_dtype: str
    input_shape: Shape
    output_shape: Shape


def import_tensorflow() -> Any:
    """Import TensorFlow lazily, so the rest of bshm-watchd works without the ``bshm`` extra."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ModelError(
            f"the bshm model needs TensorFlow, which is not installed ({exc}); "
            f"install the 'bshm' extra: {INSTALL_HINT}"
        ) from exc
    except Exception as exc:  # a half-installed TF or a protobuf clash fails with arbitrary types
        raise ModelError(
            f"TensorFlow is installed but fails to import: {exc!r}; reinstall: {INSTALL_HINT}"
        ) from exc
    return tf


def validate_graph(path: Path) -> GraphInfo:
    """Check that ``path`` is a GraphDef with BSHM's two tensors; ModelError naming the bad one if not."""
    _, info = _load_graph(import_tensorflow(), Path(path))
    return info


def _shape(tensor: Any) -> Shape:
    dims = tensor.shape.as_list() if tensor.shape.rank is not None else None
    return None if dims is None else tuple(dims)


def _fmt(shape: Shape) -> str:
    return "unknown rank" if shape is None else "×".join("?" if d is None else str(d) for d in shape)


def _names(ops: list[Any]) -> str:
    names = [f"{op.name}:0" for op in ops[:6]]
    return ", ".join(names[:5]) + (", …" if len(names) > 5 else "") if names else "none"


def _tensor(graph: Any, name: str, path: Path, found: str) -> Any:
    try:
        return graph.get_tensor_by_name(name)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{path}: graph has no tensor '{name}' ({found})") from exc


def _load_graph(tf: Any, path: Path) -> tuple[Any, GraphInfo]:
    """Parse and import the GraphDef into a fresh tf.Graph, then check the two tensors of the contract."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read BSHM graph {path}: {exc.strerror or exc}") from exc
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError lives in a different module per protobuf backend
        raise ModelError(f"{path} is not a TensorFlow GraphDef (.pb): {exc}") from exc
    if not graph_def.node:
        raise ModelError(f"{path} holds no TensorFlow graph (0 nodes); expected BSHM's tf_graph.pb")
    # A fresh Graph per load: importing into the default graph would leak nodes between models and
    # prefix the tensor names ("import/input_image:0") on the second load.
    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
    except Exception as exc:  # ValueError/TypeError/OpError for unknown ops or broken node definitions
        raise ModelError(f"{path}: TensorFlow cannot import this graph: {_first_line(exc)}") from exc

    ops = graph.get_operations()
    feedable = [op for op in ops if op.type in _FEEDABLE_OPS]
    inp = _tensor(graph, INPUT_TENSOR, path, f"inputs found: {_names(feedable)}")
    consumed = {t.name for op in ops for t in op.inputs}
    sinks = [op for op in ops if op.outputs and op.outputs[0].name not in consumed and op.type != "Const"]
    out = _tensor(graph, OUTPUT_TENSOR, path, f"outputs found: {_names(sinks)}")

    in_shape, out_shape = _shape(inp), _shape(out)
    # An unknown rank is accepted (old TF1 exports often lose static shapes); the output shape is checked
    # again on every run, so a graph that lies here fails the scan, not the service.
    if (
        inp.op.type not in _FEEDABLE_OPS
        or not inp.dtype.is_floating
        or (in_shape is not None and (len(in_shape) != 3 or in_shape[2] not in (3, None)))
    ):
        raise ModelError(
            f"{path}: tensor '{INPUT_TENSOR}' must be a float Placeholder of shape H×W×3, "
            f"found {inp.dtype.name} {inp.op.type} of shape {_fmt(in_shape)}"
        )
    bad_out_shape = out_shape is not None and (len(out_shape) != 3 or out_shape[2] not in (4, None))
    if out.dtype != tf.uint8 or bad_out_shape:
        raise ModelError(
            f"{path}: tensor '{OUTPUT_TENSOR}' must be uint8 of shape H×W×4 (RGBA), "
            f"found {out.dtype.name} of shape {_fmt(out_shape)}"
        )
    info = GraphInfo(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        nodes=len(ops),
        input_dtype=inp.dtype.name,
        input_shape=in_shape,
        output_shape=out_shape,
    )
    return graph, info


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _session_config(tf: Any, device: str, threads: int | None) -> Any:
    """ConfigProto for one Session; nothing process-wide (env vars, tf.config) is changed.

    ``threads`` caps TF's intra- and inter-op pools; TF shares its inter-op pool across the sessions of a
    process, sized by the first session.
    """
    m = DEVICE_RE.fullmatch(device)
    if m is None:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be ≥ 1, got {threads}")
    config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    # Without allow_growth TF reserves ~all GPU memory at the first run and starves every other model
    # and process on the card; soft placement lets a graph frozen with "/device:GPU:0" pins run on CPU.
    config.gpu_options.allow_growth = True
    if threads is not None:
        config.intra_op_parallelism_threads = threads
        config.inter_op_parallelism_threads = threads
    if device == "cpu":
        # This session creates no GPU device at all; CUDA_VISIBLE_DEVICES would be process-wide and only
        # works if set before TensorFlow initialises CUDA, so it is not touched.
        config.device_count["GPU"] = 0
    elif device.startswith("cuda"):
        gpus = tf.config.list_physical_devices("GPU")
        index = int(m.group(1) or 0)
        if index >= len(gpus):
            raise ModelError(
                f"device {device!r} asked for, but TensorFlow sees {len(gpus)} GPU(s); "
                "install TensorFlow's CUDA build in this venv: pip install 'tensorflow[and-cuda]'"
            )
        config.gpu_options.visible_device_list = str(index)
    return config


class BshmMatter:
    """The official BSHM frozen graph on a ``tf.compat.v1.Session`` (graph mode; eager is not touched).

    The graph is loaded and validated once, in the constructor. ``device``: ``auto`` lets TensorFlow
    place the graph (GPU:0 when its CUDA build sees a GPU), ``cpu`` gives this session no GPU device,
    ``cuda``/``cuda:N`` requires GPU N. One process should use one GPU index for TensorFlow:
    TF maps devices once per process.

    Thread safety: ``Session.run`` is thread-safe, so ``predict`` may be called from several threads
    at once; each concurrent call holds its own activations (memory grows with the concurrency).
    """

    name = "bshm"

    def __init__(
        self,
        graph_path: Path,
        device: str = "auto",
        *,
        threads: int | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        tf = import_tensorflow()
        config = _session_config(tf, device, threads)
        t0 = time.monotonic()
        graph, info = _load_graph(tf, Path(graph_path))
        self._tf = tf
        self.device = device
        self.info = info
        self._input = graph.get_tensor_by_name(INPUT_TENSOR)
        self._output = graph.get_tensor_by_name(OUTPUT_TENSOR)
        self._input_dtype = np.dtype(self._input.dtype.as_numpy_dtype)
        self._session = tf.compat.v1.Session(graph=graph, config=config)
        graph.finalize()  # nothing may add nodes later: a growing graph is a leak and not thread-safe
        (log or structlog.get_logger(__name__)).info(
            "model_loaded",
            model=self.name,
            path=str(info.path),
            device=device,
            input_dtype=info.input_dtype,
            nodes=info.nodes,
            ms=round((time.monotonic() - t0) * 1000),
        )

    def predict(self, rgb: RGB8) -> Alpha:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ScanError(
                f"bshm expects an H×W×3 uint8 RGB image, got {rgb.dtype} {rgb.shape}", stage="matting"
            )
        h, w = rgb.shape[:2]
        # RGB order and the raw 0–255 range are the graph's contract; BGR input gives visibly worse mattes.
        feed = rgb.astype(self._input_dtype)
        try:
            out = self._session.run(self._output, feed_dict={self._input: feed})
        except self._tf.errors.ResourceExhaustedError as exc:
            raise ScanError(
                f"bshm ran out of memory on a {w}×{h} image: {_first_line(exc)}",
                stage="matting",
                transient=True,
            ) from exc
        except self._tf.errors.OpError as exc:
            raise ScanError(f"bshm failed on a {w}×{h} image: {_first_line(exc)}", stage="matting") from exc
        out = np.asarray(out)
        if out.shape != (h, w, 4):
            raise ScanError(f"bshm output has shape {out.shape}, expected ({h}, {w}, 4)", stage="matting")
        alpha: Alpha = out[:, :, 3].astype(np.float32) / np.float32(255.0)
        return alpha

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]:
        # The graph takes one image without a batch dimension, so a batch is a loop.
        return [self.predict(im) for im in images]

    def close(self) -> None:
        """Free the session (and its GPU memory); the matter is unusable afterwards."""
        self._session.close()
