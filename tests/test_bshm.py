"""BSHM TensorFlow runtime, driven by small frozen graphs built here with BSHM's tensor names."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import structlog.testing

tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e '.[bshm]')")

from bshm_watchd.engine.bshm_tf import BshmMatter, _session_config, validate_graph  # noqa: E402
from bshm_watchd.errors import ConfigError, ModelError, ScanError  # noqa: E402

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def write_graph(
    path: Path,
    *,
    rule: str = "red",
    input_name: str = "input_image",
    input_dtype: Any = None,
    output_dtype: Any = None,
) -> Path:
    """Write a GraphDef: ``input_name`` H×W×3 placeholder → ``output_png`` = input RGB + alpha by ``rule``.

    rule ``red``: alpha 255 where red > 128; ``identity``: alpha = red; ``half``: only the top half rows
    (a graph that breaks the H×W×4 contract at run time).
    """
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(input_dtype or tf.float32, shape=[None, None, 3], name=input_name)
        xf = tf.cast(x, tf.float32)
        red = xf[:, :, 0]
        alpha = tf.cast(red > 128.0, tf.float32) * 255.0 if rule == "red" else red
        rgba = tf.concat([xf, alpha[:, :, None]], axis=-1)
        if rule == "half":
            rgba = rgba[: tf.shape(rgba)[0] // 2]
        tf.identity(tf.cast(rgba, output_dtype or tf.uint8), name="output_png")
    path.write_bytes(g.as_graph_def().SerializeToString())
    return path


def square_image(h: int, w: int, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> tuple[Any, Any]:
    """An h×w RGB image of colour ``bg`` with an ``fg`` square in the middle, and the square's mask."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    mask = np.zeros((h, w), bool)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    img[mask] = fg
    return img, mask


def iou(alpha: Any, mask: Any) -> float:
    pred = alpha > 0.5
    return float((pred & mask).sum() / max((pred | mask).sum(), 1))


@pytest.fixture
def matter(tmp_path: Path) -> Any:
    m = BshmMatter(write_graph(tmp_path / "tf_graph.pb"), device="cpu")
    yield m
    m.close()


class TestValidateGraph:
    def test_accepts_contract_graph(self, tmp_path: Path) -> None:
        """A graph with BSHM's tensors is accepted and described."""
        info = validate_graph(write_graph(tmp_path / "g.pb"))
        assert info.input_dtype == "float32"
        assert info.input_shape == (None, None, 3)
        assert info.output_shape == (None, None, 4)
        assert len(info.sha256) == 64 and info.size_bytes > 0

    def test_refuses_wrong_input_name(self, tmp_path: Path) -> None:
        """A graph whose input is called ``image`` is refused with a message naming both names."""
        with pytest.raises(ModelError, match=r"'input_image:0'.*image:0"):
            validate_graph(write_graph(tmp_path / "g.pb", input_name="image"))

    def test_refuses_integer_input(self, tmp_path: Path) -> None:
        """An integer input placeholder is refused: BSHM takes float RGB values."""
        with pytest.raises(ModelError, match=r"input_image:0.*float.*uint8"):
            validate_graph(write_graph(tmp_path / "g.pb", input_dtype=tf.uint8))

    def test_refuses_wrong_output_dtype(self, tmp_path: Path) -> None:
        """A float32 ``output_png`` is refused with a message naming the tensor and uint8."""
        with pytest.raises(ModelError, match=r"output_png:0.*uint8.*float32"):
            validate_graph(write_graph(tmp_path / "g.pb", output_dtype=tf.float32))

    def test_refuses_garbage_file(self, tmp_path: Path) -> None:
        """Bytes that are not a GraphDef with the contract are refused with ModelError."""
        rng = np.random.default_rng(0)
        for i, blob in enumerate([b"", b"\x89PNG\r\n\x1a\n" + rng.bytes(2000), rng.bytes(4096)]):
            path = tmp_path / f"junk{i}.pb"
            path.write_bytes(blob)
            with pytest.raises(ModelError):
                validate_graph(path)

    def test_refuses_missing_file(self, tmp_path: Path) -> None:
        """A path that does not exist is a ModelError naming it, not an OSError."""
        with pytest.raises(ModelError, match=r"nope\.pb"):
            validate_graph(tmp_path / "nope.pb")

    def test_missing_tensorflow_names_extra(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without TensorFlow the error names the ``bshm`` extra and the pip command."""
        path = write_graph(tmp_path / "g.pb")
        monkeypatch.setitem(sys.modules, "tensorflow", None)
        with pytest.raises(ModelError, match=r"pip install -e '\.\[bshm\]'"):
            validate_graph(path)
        with pytest.raises(ModelError, match="'bshm' extra"):
            BshmMatter(path)


class TestBshmMatter:
    def test_logs_model_loaded(self, tmp_path: Path) -> None:
        """Loading emits one ``model_loaded`` event naming the model, device and input dtype."""
        with structlog.testing.capture_logs() as logs:
            BshmMatter(write_graph(tmp_path / "g.pb"), device="cpu", log=structlog.get_logger()).close()
        (event,) = [e for e in logs if e["event"] == "model_loaded"]
        assert (event["model"], event["device"], event["input_dtype"]) == ("bshm", "cpu", "float32")

    def test_colour_order_is_rgb(self, matter: BshmMatter) -> None:
        """Red-on-blue gives the square (alpha follows red); blue-on-red does not, so BGR would fail."""
        img, mask = square_image(64, 96, RED, BLUE)
        assert iou(matter.predict(img), mask) >= 0.97
        img, mask = square_image(64, 96, BLUE, RED)
        assert iou(matter.predict(img), mask) < 0.97

    def test_path_with_spaces_and_non_ascii(self, tmp_path: Path) -> None:
        """A graph under a folder named with spaces and non-ASCII letters loads and runs."""
        folder = tmp_path / "Modèles BSHM – grand-mère"
        folder.mkdir()
        m = BshmMatter(write_graph(folder / "tf graph ü.pb"), device="cpu")
        img, mask = square_image(16, 16, RED, BLUE)
        assert iou(m.predict(img), mask) >= 0.97
        m.close()

    def test_odd_size_and_range(self, tmp_path: Path) -> None:
        """A 37×91 image comes back 37×91 float32, with alpha = red/255 (raw 0–255 fed, nothing resized)."""
        rgb = np.random.default_rng(1).integers(0, 256, (37, 91, 3), dtype=np.uint8)
        m = BshmMatter(write_graph(tmp_path / "g.pb", rule="identity"), device="cpu")
        alpha = m.predict(rgb)
        m.close()
        assert alpha.shape == (37, 91) and alpha.dtype == np.float32
        np.testing.assert_allclose(alpha, rgb[:, :, 0] / 255.0, atol=1e-6)

    def test_float64_placeholder(self, tmp_path: Path) -> None:
        """A graph whose placeholder is float64 loads, reports float64 and gives the right mask."""
        m = BshmMatter(write_graph(tmp_path / "g.pb", input_dtype=tf.float64), device="cpu")
        img, mask = square_image(40, 30, RED, BLUE)
        assert m.info.input_dtype == "float64"
        assert iou(m.predict(img), mask) >= 0.97
        m.close()

    def test_bad_output_shape_is_scan_error(self, tmp_path: Path) -> None:
        """A graph that returns fewer rows than it got fails the scan at the matting stage."""
        m = BshmMatter(write_graph(tmp_path / "g.pb", rule="half"), device="cpu")
        with pytest.raises(ScanError) as err:
            m.predict(np.zeros((20, 10, 3), np.uint8))
        m.close()
        assert err.value.stage == "matting"

    def test_rejects_non_rgb_input(self, matter: BshmMatter) -> None:
        """A grey or 16-bit array is a ScanError, not a TensorFlow shape error."""
        bad_inputs: list[Any] = [
            np.zeros((8, 8), np.uint8),
            np.zeros((8, 8, 3), np.uint16),
            np.zeros((8, 8, 4), np.uint8),
        ]
        for bad in bad_inputs:
            with pytest.raises(ScanError, match="H×W×3 uint8"):
                matter.predict(bad)

    def test_predict_batch(self, matter: BshmMatter) -> None:
        """A batch of differently sized images comes back in order, each at its own size."""
        a, ma = square_image(30, 50, RED, BLUE)
        b, _ = square_image(17, 23, BLUE, BLUE)
        out = matter.predict_batch([a, b])
        assert [o.shape for o in out] == [(30, 50), (17, 23)]
        assert iou(out[0], ma) >= 0.97 and not out[1].any()

    def test_concurrent_predict(self, matter: BshmMatter) -> None:
        """Four threads sharing one session each get their own correct matte."""
        jobs = [square_image(24 + 8 * i, 40, RED, BLUE) for i in range(4)]
        results: dict[int, Any] = {}

        def work(i: int) -> None:
            results[i] = matter.predict(jobs[i][0])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == [0, 1, 2, 3]
        assert all(iou(results[i], jobs[i][1]) >= 0.97 for i in range(4))

    def test_cpu_device_config_has_no_gpu(self) -> None:
        """``device='cpu'`` asks the session for zero GPU devices and keeps memory growth on."""
        config = _session_config(tf, "cpu", None)
        assert dict(config.device_count) == {"GPU": 0}  # a proto map reads missing keys as 0
        assert config.gpu_options.allow_growth

    def test_cpu_device_hides_gpus(self, matter: BshmMatter) -> None:
        """On a machine with a GPU, a ``device='cpu'`` session lists no GPU device."""
        if not tf.config.list_physical_devices("GPU"):
            pytest.skip("no GPU visible to TensorFlow: nothing to hide")
        kinds = {d.device_type for d in matter._session.list_devices()}
        assert kinds == {"CPU"}

    def test_cuda_without_gpu_is_model_error(self, tmp_path: Path) -> None:
        """Asking for a GPU that TensorFlow cannot see fails at construction, pointing at the CUDA build."""
        if tf.config.list_physical_devices("GPU"):
            pytest.skip("a GPU is visible to TensorFlow here")
        with pytest.raises(ModelError, match=r"tensorflow\[and-cuda\]"):
            BshmMatter(write_graph(tmp_path / "g.pb"), device="cuda:0")

    def test_rejects_unknown_device(self, tmp_path: Path) -> None:
        """A device string outside auto|cpu|cuda|cuda:N is a ConfigError at construction."""
        with pytest.raises(ConfigError, match="tpu"):
            BshmMatter(write_graph(tmp_path / "g.pb"), device="tpu")


class TestCommandLine:
    def test_register_then_process(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The issue's check: `models add bshm` accepts a red>128 graph; `process --model bshm` cuts the red square."""
        import cv2

        from bshm_watchd.cli import main

        models = tmp_path / "models"
        graph = write_graph(tmp_path / "tf_graph.pb")
        assert main(["models", "--model-dir", str(models), "add", "bshm", str(graph)]) == 0
        listed = capsys.readouterr()
        assert main(["models", "--model-dir", str(models), "list", "--json"]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["bshm"]["present"] and rows["bshm"]["sha256"], listed
        img, mask = square_image(240, 320, RED, BLUE)
        src = tmp_path / "in" / "red square.png"
        src.parent.mkdir()
        cv2.imwrite(str(src), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        out = tmp_path / "out"
        rc = main(["process", "-i", str(src.parent), "-d", str(out), "--model", "bshm", "--device", "cpu",
                   "--model-dir", str(models)])
        assert rc == 0
        matte = cv2.imread(str(out / "red square_matte.png"), cv2.IMREAD_UNCHANGED)
        assert iou(matte.astype(np.float32) / 255.0, mask) >= 0.97

    def test_wrong_input_name_refused(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A graph whose input is `image` is refused, naming `input_image`, and nothing is registered."""
        from bshm_watchd.cli import main

        models = tmp_path / "models"
        graph = write_graph(tmp_path / "bad.pb", input_name="image")
        assert main(["models", "--model-dir", str(models), "add", "bshm", str(graph)]) != 0
        assert "input_image" in capsys.readouterr().err
        assert not (models / "bshm.pb").exists()
