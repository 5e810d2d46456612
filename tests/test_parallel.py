"""The overlapped pipeline: same pixels as the in-process path, bad files isolated, bounded, crash-tolerant."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from imaging import asymmetric_rgb, cv_bytes, random_u16

from bshm_watchd.batch import Job, collect, output_bases, process_one, run_batch
from bshm_watchd.config import Config, Profile, default_config
from bshm_watchd.failpoints import COUNT_DIR_ENV, ENV
from bshm_watchd.parallel import ScanPipeline, ScanResult, ScanTask


class FakeMatter:
    """Deterministic stand-in at the GPU boundary: alpha from the image's own content, records batch sizes."""

    name = "fake"

    def __init__(self, batch_size: int = 1, poison_mean_below: float = -1.0) -> None:
        self.batch_size = batch_size
        self.poison_mean_below = poison_mean_below
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if float(rgb.mean()) < self.poison_mean_below:
            raise ValueError("poisoned scan")
        g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        alpha: npt.NDArray[Any] = np.clip((g - 0.2) * 1.6, 0.0, 1.0).astype(np.float32)
        return alpha

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        self.batches.append(len(images))
        return [self.predict(im) for im in images]


def write_scans(root: Path, n: int, *, w: int = 72, h: int = 48) -> list[Path]:
    """``n`` small scans of several kinds (JPEG, PNG, 16-bit PNG, RGBA PNG), one in a sub-folder."""
    paths = []
    for i in range(n):
        rgb = asymmetric_rgb(h, w, seed=i)
        kind = i % 4
        if kind == 0:
            name, data = f"s{i}.jpg", cv_bytes(rgb[..., ::-1], ".jpg")
        elif kind == 1:
            name, data = f"sub/s{i}.png", cv_bytes(rgb[..., ::-1], ".png")
        elif kind == 2:
            name, data = f"s{i}_16.png", cv_bytes(random_u16((h, w, 3), seed=i), ".png")
        else:
            bgra = np.dstack([rgb[..., ::-1], np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)])
            name, data = f"s{i}_rgba.png", cv_bytes(bgra, ".png")
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def read_png(path: Path) -> npt.NDArray[Any]:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, path
    return arr


def tasks_for(src: Path, out: Path, profile: Profile, cfg: Config) -> list[ScanTask]:
    jobs, _ = collect([src], out)
    bases = output_bases(jobs, out)
    return [ScanTask(src=j.src, out_base=bases[j], profile=profile, source=str(j.rel), tag=j) for j in jobs]


@pytest.fixture
def cfg() -> Config:
    return default_config()


@pytest.fixture
def profile(cfg: Config) -> Profile:
    """The default profile with a small analysis size, so the guided upsampling is really exercised."""
    base = cfg.profile("default")
    return base.model_copy(update={"matting": base.matting.model_copy(update={"max_side": 40})})


class TestSameResult:
    def test_parallel_equals_in_process(self, tmp_path: Path, cfg: Config, profile: Profile) -> None:
        """Every output pixel of the worker pipeline equals the in-process path's, for 8- and 16-bit and RGBA scans."""
        src = tmp_path / "in"
        write_scans(src, 8)
        matter = FakeMatter()
        seq_out, par_out = tmp_path / "seq", tmp_path / "par"
        jobs, _ = collect([src], seq_out)
        bases = output_bases(jobs, seq_out)
        for job in jobs:
            process_one(job, bases[job], matter, profile, "default", cfg)
        with ScanPipeline(matter, workers=2) as pipe:
            results = list(pipe.run(tasks_for(src, par_out, profile, cfg)))
        assert all(r.ok for r in results), [r.error for r in results]
        seq_files = sorted(p.relative_to(seq_out) for p in seq_out.rglob("*.png"))
        assert seq_files == sorted(p.relative_to(par_out) for p in par_out.rglob("*.png"))
        assert len(seq_files) == 16
        for rel in seq_files:
            a, b = read_png(seq_out / rel), read_png(par_out / rel)
            assert a.dtype == b.dtype and a.shape == b.shape, rel
            np.testing.assert_array_equal(a, b, err_msg=str(rel))

    def test_run_batch_uses_pipeline_for_several_files(self, tmp_path: Path, cfg: Config) -> None:
        """run_batch over a folder writes the mirrored outputs of every scan and counts them done."""
        src = tmp_path / "in"
        write_scans(src, 5)
        err_path = tmp_path / "err.txt"
        with err_path.open("w") as err:
            summary = run_batch([src], tmp_path / "out", FakeMatter(), cfg, "default", err=err, workers=2)
        assert (summary.done, summary.failed) == (5, 0), err_path.read_text()
        assert (tmp_path / "out" / "sub" / "s1_matte.png").is_file()
        assert len(list((tmp_path / "out").rglob("*_fg.png"))) == 5

    def test_bytes_given_by_caller(self, tmp_path: Path, profile: Profile) -> None:
        """A task carrying the file's bytes needs no readable source path, and the sidecar hashes those bytes."""
        data = cv_bytes(asymmetric_rgb(40, 60)[..., ::-1], ".png")
        side = profile.model_copy(update={"outputs": profile.outputs.model_copy(update={"sidecar": True})})
        task = ScanTask(src=tmp_path / "gone.png", out_base=tmp_path / "out" / "gone", profile=side, data=data)
        with ScanPipeline(FakeMatter(), workers=1) as pipe:
            (result,) = list(pipe.run([task]))
        assert result.ok, result.error
        meta = json.loads((tmp_path / "out" / "gone.json").read_text())
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert {"decode", "matting", "refine", "write"} <= set(meta["ms"])


class TestFailures:
    def test_bad_file_reported_rest_finish(self, tmp_path: Path, cfg: Config, profile: Profile) -> None:
        """A text file named .jpg fails at decode with its name in the reason; every other scan is written."""
        src = tmp_path / "in"
        write_scans(src, 4)
        (src / "broken.jpg").write_text("not a photograph\n")
        with ScanPipeline(FakeMatter(), workers=2) as pipe:
            results = list(pipe.run(tasks_for(src, tmp_path / "out", profile, cfg)))
        bad = [r for r in results if not r.ok]
        assert len(results) == 5 and len(bad) == 1
        assert bad[0].task.src.name == "broken.jpg" and bad[0].stage == "decode" and not bad[0].crashed
        assert "broken.jpg" in (bad[0].error or "")
        assert len(list((tmp_path / "out").rglob("*_matte.png"))) == 4

    def test_model_failure_isolated_within_a_batch(self, tmp_path: Path, cfg: Config, profile: Profile) -> None:
        """When predict_batch fails, the batch is retried scan by scan and only the scan the model rejects fails."""
        src = tmp_path / "in"
        src.mkdir()
        for i, level in enumerate((200, 10, 200, 200)):
            (src / f"s{i}.png").write_bytes(cv_bytes(np.full((30, 40, 3), level, np.uint8), ".png"))
        matter = FakeMatter(batch_size=4, poison_mean_below=50)
        with ScanPipeline(matter, workers=2) as pipe:
            results = list(pipe.run(tasks_for(src, tmp_path / "out", profile, cfg)))
        failed = [r.task.src.name for r in results if not r.ok]
        assert failed == ["s1.png"]
        assert next(r for r in results if not r.ok).stage == "matting"

    def test_worker_killed_once_is_retried(self, tmp_path: Path, cfg: Config, profile: Profile,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """A worker SIGKILLed mid-write is replaced and the scans it held are retried: all finish."""
        src = tmp_path / "in"
        write_scans(src, 4)
        counts = tmp_path / "counts"
        counts.mkdir()
        monkeypatch.setenv(ENV, "temp_written@1")
        monkeypatch.setenv(COUNT_DIR_ENV, str(counts))
        with ScanPipeline(FakeMatter(), workers=1) as pipe:
            results = list(pipe.run(tasks_for(src, tmp_path / "out", profile, cfg)))
        assert (counts / "failpoint-temp_written.count").is_file(), "the failpoint never fired"
        assert all(r.ok for r in results), [r.error for r in results]
        assert len(list((tmp_path / "out").rglob("*_fg.png"))) == 4

    def test_worker_dying_every_time_fails_scans_without_hanging(
        self, tmp_path: Path, cfg: Config, profile: Profile, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Scans that kill their worker on every try come back as crashed failures and the run ends."""
        src = tmp_path / "in"
        write_scans(src, 2)
        monkeypatch.setenv(ENV, "temp_written")
        with ScanPipeline(FakeMatter(), workers=2) as pipe:
            results = list(pipe.run(tasks_for(src, tmp_path / "out", profile, cfg)))
        assert len(results) == 2
        assert all(not r.ok and r.crashed for r in results)


class TestBounds:
    def test_inflight_never_exceeds_bound(self, tmp_path: Path, cfg: Config, profile: Profile) -> None:
        """Tasks are pulled from the caller's iterator only while fewer than max_inflight scans are in flight."""
        src = tmp_path / "in"
        paths = write_scans(src, 3)
        yielded = 0
        gaps: list[int] = []

        def tasks() -> Iterator[ScanTask]:
            for i in range(14):
                gaps.append(i - yielded)  # scans pulled before this one and not yet handed back
                yield ScanTask(src=paths[i % 3], out_base=tmp_path / "out" / f"x{i}", profile=profile)

        results: list[ScanResult] = []
        with ScanPipeline(FakeMatter(), workers=1, max_inflight=3) as pipe:
            for r in pipe.run(tasks()):
                results.append(r)
                yielded += 1
        assert len(results) == 14 and all(r.ok for r in results)
        assert max(gaps) <= 3 and pipe.peak_inflight <= 3
        assert max(gaps) == 3, "the bound was never reached: the test did not exercise it"

    def test_batches_fill_to_batch_size(self, tmp_path: Path, cfg: Config, profile: Profile) -> None:
        """With room for eight scans and a batch size of four, the model sees two batches of four."""
        src = tmp_path / "in"
        write_scans(src, 8)
        matter = FakeMatter(batch_size=4)
        with ScanPipeline(matter, workers=2, max_inflight=8) as pipe:
            results = list(pipe.run(tasks_for(src, tmp_path / "out", profile, cfg)))
        assert all(r.ok for r in results)
        assert matter.batches == [4, 4] == pipe.batches

    def test_the_heap_is_checked_after_every_batch(self, tmp_path: Path, cfg: Config, profile: Profile) -> None:
        """The trimmer runs once per inference batch, and trims where RSS has grown past its slack (here
        always: slack 0, a fake trim)."""
        from bshm_watchd.heap import HeapTrimmer

        src = tmp_path / "in"
        write_scans(src, 8)
        trims: list[int] = []
        with ScanPipeline(FakeMatter(batch_size=4), workers=2, max_inflight=8) as pipe:
            pipe.heap = HeapTrimmer(0.0, trim=lambda: trims.append(1), rss=lambda: 1000.0 + 10 * len(trims))
            results = list(pipe.run(tasks_for(src, tmp_path / "out", profile, cfg)))
        assert all(r.ok for r in results)
        assert len(trims) == pipe.heap.trims == len(pipe.batches) == 2

    @pytest.mark.parametrize("kw", [{"workers": -1}, {"batch_size": -2}, {"max_inflight": -1}, {"worker_nice": 40}])
    def test_bad_arguments_refused(self, kw: dict[str, Any]) -> None:
        """Nonsensical sizes are refused at construction, not discovered mid-run."""
        with pytest.raises(ValueError):
            ScanPipeline(FakeMatter(), **kw)

    def test_results_carry_stage_timings(self, tmp_path: Path, cfg: Config, profile: Profile) -> None:
        """Each result names the milliseconds of every stage, from both workers and the model."""
        src = tmp_path / "in"
        write_scans(src, 2)
        with ScanPipeline(FakeMatter(), workers=1) as pipe:
            results = list(pipe.run(tasks_for(src, tmp_path / "out", profile, cfg)))
        for r in results:
            assert {"read", "decode", "analysis", "matting", "redecode", "refine", "write"} <= set(r.ms)
            assert isinstance(r.task.tag, Job)


class TestFullMatte:
    @pytest.mark.parametrize("refine", [True, False])
    def test_same_size_shortcut_equals_upsample(self, refine: bool) -> None:
        """When the analysis copy is the scan itself, the shortcut gives upsample_matte's exact bytes."""
        from bshm_watchd.decode import decode_bytes
        from bshm_watchd.pipeline import Timings, full_matte
        from bshm_watchd.refine import grey01, upsample_matte

        decoded = decode_bytes(cv_bytes(asymmetric_rgb(60, 90)[..., ::-1], ".png"), "x.png")
        guide = grey01(decoded.rgb)
        alpha = np.random.default_rng(3).random(guide.shape, dtype=np.float32)
        base = default_config().profile("default")
        profile = base.model_copy(update={"matting": base.matting.model_copy(update={"refine": refine})})
        expected = upsample_matte(alpha, guide, decoded.rgb, edge_aware=refine)
        np.testing.assert_array_equal(full_matte(decoded, guide, alpha, profile, Timings()), expected)
