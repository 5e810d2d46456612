"""`bshm-watchd bench`: runs end to end, reports stages, throughput, memory; soak and naive comparison."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from bshm_watchd import bench
from bshm_watchd.config import default_config
from bshm_watchd.parallel import ScanPipeline


class FakeMatter:
    """Stand-in at the GPU boundary: alpha = brightness."""

    name = "fake"

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        alpha: npt.NDArray[Any] = (rgb.mean(axis=2) / 255.0).astype(np.float32)
        return alpha

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [self.predict(im) for im in images]


def run_bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


@pytest.fixture
def fake_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model name builds the fake: the bench's own logic runs without model files."""
    monkeypatch.setattr("bshm_watchd.engine.factory.build_matter", lambda *a, **kw: FakeMatter())


class TestBenchCommand:
    def test_synthetic_run_reports_everything(self, fake_models: None, capsys: pytest.CaptureFixture[str]) -> None:
        """Two synthetic scans: per-stage ms, scans/s, RSS of this process, its workers and the tree, in JSON."""
        gpu_before = bench.gpu_memory_mb()  # None unless this process used CUDA already (earlier GPU tests)
        rc, out = run_bench(["-n", "2", "--size", "64x96", "--workers", "1", "--json"], capsys)
        report = json.loads(out)
        assert rc == 0
        run = report["pipeline"]
        assert run["scans"] == 2 and run["failed"] == 0 and run["scans_per_s"] > 0
        assert {"decode", "matting", "refine", "write"} <= set(run["stage_ms"])
        rss = report["rss"]
        assert rss["self_peak_mb"] > 0 and rss["workers_peak_mb"] > 0
        assert rss["tree_peak_mb"] > 0 and rss["curve_s_mb"]
        assert report["gpu"] == gpu_before and "naive" not in report  # the fake allocates nothing on a GPU

    def test_text_report(self, fake_models: None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """Given files, the human report names the scan count, throughput and peak RSS."""
        src = tmp_path / "in"
        bench.write_synthetic(src, 2, (48, 64))
        rc, out = run_bench(["-i", str(src), "-n", "3", "--workers", "1"], capsys)
        assert rc == 0
        assert "3 scans over 2 file(s)" in out
        assert "scans/s" in out and "peak RSS" in out

    def test_soak_reports_flatness(self, fake_models: None, capsys: pytest.CaptureFixture[str]) -> None:
        """--soak gives RSS after warm-up, at the end, the growth and a verdict, one reading per scan."""
        rc, out = run_bench(["--soak", "6", "--size", "48x64", "--workers", "1", "--json"], capsys)
        soak = json.loads(out)["soak"]
        assert rc == 0
        assert soak["scans"] == 6 and soak["run"]["failed"] == 0
        assert len(soak["rss_every_scan_mb"]) == 6
        assert soak["warm_rss_mb"] > 0 and isinstance(soak["flat"], bool)

    def test_real_selfie_model(self, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The real selfie model through the real pipeline on two tiny synthetic scans."""
        rc, out = run_bench(["--model", "selfie", "-n", "2", "--size", "96x128", "--workers", "1", "--json",
                             "--model-dir", str(model_dir)], capsys)
        report = json.loads(out)
        assert rc == 0 and report["model"] == "selfie" and report["pipeline"]["failed"] == 0

    def test_vs_naive_prints_ratio(self, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--vs-naive runs the naive isnet path on the same scans and prints the speed ratio."""
        rc, out = run_bench(["--model", "selfie", "-n", "1", "--size", "64x96", "--workers", "1", "--vs-naive",
                             "--model-dir", str(model_dir)], capsys)
        assert rc == 0
        assert "naive sequential: 1 scans" in out and "speed-up vs naive:" in out


class TestPieces:
    @pytest.mark.parametrize(("text", "size"), [("1024x1536", (1024, 1536)), ("64X48", (64, 48))])
    def test_parse_size(self, text: str, size: tuple[int, int]) -> None:
        """WIDTHxHEIGHT, either case of x."""
        assert bench.parse_size(text) == size

    @pytest.mark.parametrize("text", ["1024", "ax3", "8x8", "-5x100"])
    def test_parse_size_refuses(self, text: str) -> None:
        """Malformed or tiny sizes are argparse errors."""
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_size(text)

    def test_synthetic_scans_differ_and_have_the_size(self) -> None:
        """Each seed gives a different image of the requested width and height."""
        a, b = bench.synthetic_scan((40, 30), 0), bench.synthetic_scan((40, 30), 1)
        assert a.shape == (30, 40, 3) and a.dtype == np.uint8
        assert not np.array_equal(a, b)

    def test_tree_rss_counts_children(self) -> None:
        """A child process is among the descendants whose RSS the tree total adds up."""
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        try:
            assert child.pid in bench._descendants(os.getpid())
            assert bench.tree_rss_mb() > bench.tree_rss_mb(child.pid) > 0
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=30)

    def test_run_pipeline_can_discard_outputs(self, tmp_path: Path) -> None:
        """The soak's runs delete each scan's outputs as it lands, so disk use stays flat too."""
        files = bench.write_synthetic(tmp_path / "in", 2, (48, 64))
        profile = default_config().profile("default")
        seen: list[int] = []
        with ScanPipeline(FakeMatter(), workers=1) as pipe:
            stats = bench.run_pipeline(pipe, files, 5, tmp_path / "out", profile, keep_outputs=False,
                                       on_result=lambda i, r: seen.append(i))
        assert stats.scans == 5 and stats.failed == 0 and seen == [0, 1, 2, 3, 4]
        assert not list((tmp_path / "out").rglob("*.png"))
