"""``bshm-watchd bench``: scans through the real pipeline; per-stage ms, scans/s, peak RSS, GPU memory.

``--vs-naive`` times, in the same run and on the same files, the naive sequential path a first script
would take (Pillow decode → isnet on onnxruntime with default session options → Pillow PNG with default
settings, one scan at a time) and prints the ratio. ``--soak N`` pushes N scans through and compares the
process tree's RSS after warm-up with its RSS at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bshm_watchd.config import Profile, default_config, load_config
from bshm_watchd.engine.base import Matter
from bshm_watchd.errors import ConfigError
from bshm_watchd.heap import rss_mb
from bshm_watchd.parallel import ScanPipeline, ScanResult, ScanTask

STAGES = ("read", "decode", "analysis", "matting", "redecode", "refine", "write")


# ---- memory --------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children", encoding="ascii") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def tree_rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process and all its descendants, summed (0 where /proc is missing)."""
    root = pid or os.getpid()
    return sum(rss_mb(p) for p in [root, *_descendants(root)])


def hwm_mb(pid: int) -> float:
    """Peak RSS of one process since its exec (VmHWM). Unlike ru_maxrss, it does not inherit the
    high-water mark of the parent it was forked from, so a spawned worker reports its own peak."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class RssSampler:
    """Samples on a thread every ``interval`` s: the process tree's summed RSS (``curve``, [(s, MB)]) and
    each descendant's own peak (``child_peaks``, MB by pid)."""

    def __init__(self, interval: float = 0.25) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.curve: list[tuple[float, float]] = []
        self.child_peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _loop(self) -> None:
        while True:
            self.curve.append((round(time.monotonic() - self._t0, 2), round(tree_rss_mb(), 1)))
            for pid in _descendants(os.getpid()):
                self.child_peaks[pid] = max(self.child_peaks.get(pid, 0.0), hwm_mb(pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max((mb for _, mb in self.curve), default=0.0)

    @property
    def child_peak(self) -> float:
        return round(max(self.child_peaks.values(), default=0.0), 1)

    def thinned(self, points: int = 12) -> list[tuple[float, float]]:
        step = max(1, len(self.curve) // points)
        return self.curve[::step]


def self_peak_mb() -> float:
    """Peak RSS of this process (getrusage; Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def gpu_memory_mb() -> dict[str, float] | None:
    """torch's CUDA peak, when this process has used CUDA through torch."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {"allocated_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "reserved_peak_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


# ---- inputs --------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) < 16 or int(h) < 16:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT (each >= 16), got {text!r}")
    return int(w), int(h)


def synthetic_scan(size: tuple[int, int], seed: int) -> np.ndarray:
    """A portrait-like RGB image: textured backdrop, a head-and-shoulders figure with hair and clothing."""
    w, h = size
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    base = np.asarray(rng.integers(90, 200, 3), dtype=np.float32)
    img = base * (0.7 + 0.3 * y) + rng.normal(0, 8, (h, w, 3)).astype(np.float32)
    s, cx = min(w, h), w // 2 + int(rng.integers(-w // 10, w // 10 + 1))
    skin = tuple(float(c) for c in rng.integers(150, 230, 3))
    cloth = tuple(float(c) for c in rng.integers(20, 120, 3))
    cv2.ellipse(img, (cx, int(h * 0.95)), (int(s * 0.42), int(h * 0.38)), 0, 180, 360, cloth, -1)
    cv2.ellipse(img, (cx, int(h * 0.33)), (int(s * 0.16), int(s * 0.21)), 0, 0, 360, skin, -1)
    cv2.ellipse(img, (cx, int(h * 0.27)), (int(s * 0.18), int(s * 0.16)), 0, 180, 360, (40.0, 30.0, 25.0), -1)
    img += rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    out: np.ndarray = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_synthetic(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"synthetic_{i:03d}.jpg"
        if not cv2.imwrite(str(path), cv2.cvtColor(synthetic_scan(size, i), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"cannot write {path}")
        paths.append(path)
    return paths


# ---- runs ----------------------------------------------------------------------------------------
@dataclass
class RunStats:
    scans: int
    seconds: float
    failed: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    """Mean milliseconds per scan in each stage (stages overlap in the pipeline)."""

    @property
    def scans_per_s(self) -> float:
        return self.scans / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3), "scans_per_s": round(self.scans_per_s, 3),
                "stage_ms": {k: round(v, 1) for k, v in self.stage_ms.items()}}


def _mean_stages(results: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in STAGES if any(k in r for r in results)] + sorted({k for r in results for k in r} - set(STAGES))
    return {k: sum(r.get(k, 0.0) for r in results) / len(results) for k in keys} if results else {}


def run_pipeline(
    pipe: ScanPipeline,
    files: list[Path],
    n: int,
    out_dir: Path,
    profile: Profile,
    *,
    on_result: Callable[[int, ScanResult], None] | None = None,
    keep_outputs: bool = True,
) -> RunStats:
    """``n`` scans (cycling over ``files``) through ``pipe``; outputs are removed as they land unless kept."""
    tasks = (ScanTask(src=files[i % len(files)], out_base=out_dir / f"scan_{i:05d}", profile=profile)
             for i in range(n))
    ok: list[dict[str, float]] = []
    failed = 0
    t0 = time.perf_counter()
    for i, result in enumerate(pipe.run(tasks)):
        if result.ok:
            ok.append(result.ms)
        else:
            failed += 1
            print(f"FAILED {result.task.src}: {result.error}", file=sys.stderr)
        if not keep_outputs:
            for p in result.written:
                p.unlink(missing_ok=True)
        if on_result is not None:
            on_result(i, result)
    return RunStats(scans=n, seconds=time.perf_counter() - t0, failed=failed, stage_ms=_mean_stages(ok))


def run_naive(files: list[Path], n: int, out_dir: Path, isnet_path: Path) -> RunStats:
    """The naive sequential path, one scan at a time, with a default onnxruntime session (warmed up first)."""
    import onnxruntime as ort
    from PIL import Image

    from bshm_watchd.engine.isnet_common import isnet_postprocess, isnet_preprocess

    session = ort.InferenceSession(str(isnet_path), providers=["CPUExecutionProvider"])
    session.run(["output"], {"input": isnet_preprocess(np.zeros((64, 64, 3), np.uint8))})
    out_dir.mkdir(parents=True, exist_ok=True)
    per: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for i in range(n):
        ms: dict[str, float] = {}
        t = time.perf_counter()
        with Image.open(files[i % len(files)]) as im:
            rgb = np.asarray(im.convert("RGB"))
        t, ms["decode"] = time.perf_counter(), (time.perf_counter() - t) * 1000
        (raw,) = session.run(["output"], {"input": isnet_preprocess(rgb)})
        matte = (isnet_postprocess(raw, rgb.shape[0], rgb.shape[1]) * 255 + 0.5).astype(np.uint8)
        t, ms["matting"] = time.perf_counter(), (time.perf_counter() - t) * 1000
        Image.fromarray(np.dstack([rgb, matte])).save(out_dir / f"scan_{i:05d}_fg.png")
        Image.fromarray(matte).save(out_dir / f"scan_{i:05d}_matte.png")
        ms["write"] = (time.perf_counter() - t) * 1000
        per.append(ms)
    return RunStats(scans=n, seconds=time.perf_counter() - t0, stage_ms=_mean_stages(per))


def soak(pipe: ScanPipeline, files: list[Path], n: int, out_dir: Path, profile: Profile) -> dict[str, Any]:
    """RSS of the process tree after each scan; warm-up = the first window, end = the last window."""
    rss: list[float] = []
    stats = run_pipeline(pipe, files, n, out_dir, profile, keep_outputs=False,
                         on_result=lambda i, r: rss.append(tree_rss_mb()))
    window = max(1, min(len(rss) // 5, max(10, len(rss) // 10, 2 * pipe.max_inflight)))
    warm, end = max(rss[:window]), max(rss[-window:])
    growth = end - warm
    return {"scans": n, "window": window, "warm_rss_mb": round(warm, 1), "end_rss_mb": round(end, 1),
            "growth_mb": round(growth, 1), "flat": growth <= max(64.0, 0.05 * warm),
            "rss_every_scan_mb": [round(x) for x in rss[:: max(1, len(rss) // 50)]], "run": stats.as_dict()}


# ---- command -------------------------------------------------------------------------------------
def add_bench_parser(sub: Any) -> None:
    """Register ``bench`` on the CLI's subparsers object."""
    b = sub.add_parser("bench", help="throughput and memory of the real pipeline (optionally vs the naive path)")
    b.add_argument("-i", "--input", nargs="+", default=None, metavar="PATH", help="scans (default: synthetic)")
    b.add_argument("-n", type=int, default=6, help="scans to run (cycling over the inputs; default 6)")
    b.add_argument("--size", type=parse_size, default=(1024, 1536), help="synthetic size WxH (default 1024x1536)")
    b.add_argument("--model", choices=["fusion", "isnet", "selfie", "bshm"], default=None)
    b.add_argument("--profile", default="default")
    b.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: the config's; 0 = cores)")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--vs-naive", action="store_true", help="also time the naive sequential isnet path")
    b.add_argument("--soak", type=int, default=0, metavar="N", help="push N scans through and check RSS flatness")
    b.add_argument("--json", action="store_true", help="one JSON object on stdout")
    b.add_argument("-c", "--config", type=Path, default=None)
    b.add_argument("--model-dir", type=Path, default=None)
    b.set_defaults(func=cmd_bench)


def _inputs(args: argparse.Namespace, tmp: Path) -> list[Path]:
    if not args.input:
        return write_synthetic(tmp / "in", min(args.n, 16), args.size)
    from bshm_watchd.batch import collect

    jobs, _ = collect([Path(p) for p in args.input], tmp / "out")
    if not jobs:
        raise ConfigError(f"bench: no images among {' '.join(args.input)}")
    return [j.src for j in jobs]


def cmd_bench(args: argparse.Namespace) -> int:
    from bshm_watchd.engine.factory import build_matter, resolve_device
    from bshm_watchd.modelstore import ModelStore, default_model_dir

    if args.n < 1 or args.soak < 0 or (args.workers or 0) < 0 or (args.batch_size or 1) < 1:
        raise ConfigError("bench: -n and --batch-size must be >= 1, --soak and --workers >= 0")
    cfg = load_config(args.config) if args.config else default_config()
    profile = cfg.profile(args.profile)
    model = args.model or profile.matting.model or cfg.model
    device = args.device or cfg.device
    store = ModelStore(args.model_dir or cfg.model_dir or default_model_dir())
    report: dict[str, Any] = {"model": model, "device": resolve_device(device), "profile": args.profile}
    with tempfile.TemporaryDirectory(prefix="bshm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        files = _inputs(args, tmp)
        t = time.perf_counter()
        matter = build_matter(model, store, device=device, cpu_runtime=cfg.cpu_runtime)
        report["model_load_s"] = round(time.perf_counter() - t, 2)
        workers = cfg.workers if args.workers is None else args.workers
        with ScanPipeline(matter, max_pixels=cfg.max_pixels, workers=workers, batch_size=args.batch_size) as pipe:
            report.update(_warm_up(pipe, matter, files[0], profile))
            report.update(inputs=len(files), scans=args.soak or args.n)
            with RssSampler() as sampler:
                if args.soak:
                    report["soak"] = soak(pipe, files, args.soak, tmp / "out", profile)
                else:
                    report["pipeline"] = run_pipeline(pipe, files, args.n, tmp / "out", profile).as_dict()
            report["batches_mean"] = round(float(np.mean(pipe.batches)), 2) if pipe.batches else 0.0
        report["rss"] = {"self_peak_mb": self_peak_mb(), "workers_peak_mb": sampler.child_peak,
                         "tree_peak_mb": sampler.peak, "curve_s_mb": sampler.thinned()}
        report["gpu"] = gpu_memory_mb()
        if args.vs_naive and not args.soak:
            naive = run_naive(files, args.n, tmp / "naive", store.path("isnet"))
            report["naive"] = naive.as_dict()
            report["speedup_vs_naive"] = round(naive.seconds / report["pipeline"]["seconds"], 2)
    print(json.dumps(report, indent=2) if args.json else "\n".join(render(report)))
    return 1 if report.get("pipeline", report.get("soak", {}).get("run", {})).get("failed") else 0


def _warm_up(pipe: ScanPipeline, matter: Matter, sample: Path, profile: Profile) -> dict[str, Any]:
    """First inference batch (allocations, kernel selection) and worker start-up, timed apart from the run."""
    from bshm_watchd.decode import decode_path
    from bshm_watchd.pipeline import analysis_image, bounded_copy

    image = analysis_image(bounded_copy(decode_path(sample), profile.matting.max_side), profile)
    t = time.perf_counter()
    matter.predict_batch([image] * pipe.batch_size)  # a full batch: GPU kernels are chosen per batch shape
    warm = time.perf_counter() - t
    t = time.perf_counter()
    pipe.start_workers()
    return {"first_inference_s": round(warm, 2), "workers_start_s": round(time.perf_counter() - t, 2),
            "workers": pipe.workers, "batch_size": pipe.batch_size, "max_inflight": pipe.max_inflight}


def render(report: dict[str, Any]) -> Iterator[str]:
    yield (f"model {report['model']} on {report['device']}, profile {report['profile']}, {report['workers']} "
           f"workers, batch {report['batch_size']}, max in flight {report['max_inflight']}; "
           f"{report['scans']} scans over {report['inputs']} file(s)")
    yield (f"model load {report['model_load_s']} s, first inference {report['first_inference_s']} s, "
           f"workers start {report['workers_start_s']} s (not counted below)")
    run = report.get("pipeline") or report["soak"]["run"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stage_ms"].items())
    yield f"per-stage ms per scan (stages overlap): {stages}"
    yield (f"pipeline: {run['scans']} scans in {run['seconds']:.2f} s = {run['scans_per_s']:.2f} scans/s"
           f" ({run['failed']} failed; mean batch {report['batches_mean']})")
    rss = report["rss"]
    curve = " ".join(f"{s:g}s:{mb:.0f}" for s, mb in rss["curve_s_mb"])
    yield (f"peak RSS: this process {rss['self_peak_mb']:.0f} MB, largest worker {rss['workers_peak_mb']:.0f} MB, "
           f"whole tree (sampled) {rss['tree_peak_mb']:.0f} MB; curve MB: {curve}")
    if report.get("gpu"):
        gpu = report["gpu"]
        yield f"GPU peaks: {gpu['allocated_peak_mb']:.0f} MB allocated, {gpu['reserved_peak_mb']:.0f} MB reserved"
    if "soak" in report:
        s = report["soak"]
        verdict = "flat" if s["flat"] else "GROWING"
        yield (f"soak: RSS after warm-up {s['warm_rss_mb']:.0f} MB, at the end {s['end_rss_mb']:.0f} MB, growth "
               f"{s['growth_mb']:+.0f} MB over {s['scans']} scans: {verdict}")
    if "naive" in report:
        nv = report["naive"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in nv["stage_ms"].items())
        yield (f"naive sequential: {nv['scans']} scans in {nv['seconds']:.2f} s = {nv['scans_per_s']:.2f} scans/s"
               f" ({stages})")
        yield f"speed-up vs naive: {report['speedup_vs_naive']:.2f}x"
