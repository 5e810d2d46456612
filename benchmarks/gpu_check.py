"""One-shot GPU check of the torch ISNet: parity with onnxruntime CPU, ms/img by batch, end-to-end scans/s.

Run through ``benchmarks/gpu_check.sh`` on the GPU host (budget: under 8 minutes). ``--cpu-smoke`` runs
every section on CPU with tiny counts, to prove the script cannot crash there. Needs only torch, numpy,
cv2, onnx, onnxruntime and this repo's ``bshm_watchd.engine.isnet_torch`` (no structlog/pydantic).
Prints one summary and, when ``$OUT`` is set, keeps ``$OUT/gpu_summary.json`` up to date section by
section so a run killed at its time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bshm_watchd.engine.isnet_torch import (
    ISNET_SIZE,
    TorchIsnetMatter,
    isnet_postprocess,
    isnet_preprocess,
    isnet_resize,
)

SCAN_HW = (1536, 1024)  # a portrait scan, H×W
PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]
Summary = dict[str, Any]

# --------------------------------------------------------------------------- images


def synth_scan(seed: int, h: int, w: int) -> np.ndarray:
    """A scan-like RGB image: smooth sepia background, a person-ish blob, film grain."""
    rng = np.random.default_rng(seed)
    bg = cv2.resize(rng.uniform(60, 200, (4, 3, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = bg * np.array([1.0, 0.9, 0.75], np.float32)
    cx, cy = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.3, 0.4))
    tone = tuple(float(v) for v in rng.uniform(20, 90, 3))
    cv2.circle(img, (cx, cy), int(0.1 * min(h, w)), tone, -1, cv2.LINE_AA)
    cv2.ellipse(img, (cx, int(cy + 0.35 * h)), (int(0.2 * w), int(0.3 * h)), 0, 0, 360, tone, -1, cv2.LINE_AA)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def load_images(images_dir: Path | None, n: int) -> list[tuple[str, np.ndarray]]:
    if images_dir is not None and images_dir.is_dir():
        files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        out = []
        for p in files[:n]:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is not None:
                out.append((p.name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        if out:
            return out
    sizes = [SCAN_HW, (900, 1300), (700, 560)]
    return [(f"synth{i}_{h}x{w}", synth_scan(i, h, w)) for i, (h, w) in enumerate(sizes[:n])]


# --------------------------------------------------------------------------- parity


def parity(model: Path, device: str, images: list[tuple[str, np.ndarray]], smoke: bool) -> list[Summary]:
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    refs = [sess.run(["output"], {"input": isnet_preprocess(img)})[0][0, 0] for _, img in images]
    del sess
    configs = [("cpu fp32", False, False)] if smoke else []
    if device != "cpu":
        configs += [("cuda fp32 tf32-off", False, False), ("cuda fp32 tf32-on", False, True), ("cuda fp16", True, True)]
    rows = []
    for label, fp16, tf32 in configs:
        torch.backends.cudnn.allow_tf32 = tf32
        matter = TorchIsnetMatter(model, device="cpu" if label.startswith("cpu") else device, fp16=fp16)
        for (name, img), ref in zip(images, refs, strict=True):
            raw = matter.predict_raw(isnet_resize(img)[None])[0]
            d = np.abs(raw - ref)
            a8 = np.rint(isnet_postprocess(raw, *img.shape[:2]) * 255).astype(np.int16)
            r8 = np.rint(isnet_postprocess(ref, *img.shape[:2]) * 255).astype(np.int16)
            rows.append(
                {
                    "config": label,
                    "image": name,
                    "raw_max_abs": float(d.max()),
                    "raw_mean_abs": float(d.mean()),
                    "matte8_frac_off_by_gt1": float((np.abs(a8 - r8) > 1).mean()),
                }
            )
        del matter
        _free_cuda()
    torch.backends.cudnn.allow_tf32 = True
    return rows


# --------------------------------------------------------------------------- throughput


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_predict_raw(matter: TorchIsnetMatter, batch: int, device: str, smoke: bool) -> Summary:
    """ms/img of predict_raw (uint8 H2D, normalise, forward, fp32 D2H) after warm-up."""
    import torch

    x = np.random.default_rng(0).integers(0, 256, (batch, ISNET_SIZE, ISNET_SIZE, 3), dtype=np.uint8)
    warm, min_iters, min_s, max_iters = (1, 1, 0.0, 1) if smoke else (3, 5, 2.0, 60)
    for _ in range(warm):
        matter.predict_raw(x)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0, iters = time.perf_counter(), 0
    while iters < max_iters and (iters < min_iters or time.perf_counter() - t0 < min_s):
        matter.predict_raw(x)
        iters += 1
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    ms = 1000 * dt / (iters * batch)
    return {
        "batch": batch,
        "iters": iters,
        "ms_per_img": round(ms, 3),
        "img_per_s": round(1000 / ms, 1),
        "peak_mem_mib": None if peak is None else round(peak),
    }


def time_forward_only(matter: TorchIsnetMatter, batch: int, device: str, smoke: bool) -> Summary:
    """ms/img of the bare network on a device-resident batch (what the transfers cost is the gap)."""
    import torch

    net = matter._net  # benchmark-only peek: isolates compute from H2D/D2H
    dtype = torch.float16 if matter.fp16 else torch.float32
    x = torch.zeros(batch, 3, ISNET_SIZE, ISNET_SIZE, device=matter.device, dtype=dtype)
    iters = 1 if smoke else 10
    with torch.inference_mode():
        for _ in range(1 if smoke else 3):
            net(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            net(x)
        _sync(device)
    ms = 1000 * (time.perf_counter() - t0) / (iters * batch)
    return {"batch": batch, "iters": iters, "ms_per_img": round(ms, 3), "img_per_s": round(1000 / ms, 1)}


def throughput(model: Path, device: str, smoke: bool, summary: Summary, out: Path | None) -> None:
    import torch

    rows: list[Summary] = summary.setdefault("throughput", [])
    fp16 = device != "cpu"
    plan: list[tuple[bool, bool, bool, list[int]]]  # cudnn.benchmark, fp16, channels_last, batches
    if smoke:
        plan = [(False, False, False, [1, 2]), (False, False, True, [2])]
    else:
        plan = [
            (False, True, False, [8]),
            (True, True, False, [1, 8, 16]),
            (True, False, False, [8]),
            (True, True, True, [8, 16]),
        ]
    for bench, half, cl, batches in plan:
        torch.backends.cudnn.benchmark = bench
        matter = TorchIsnetMatter(model, device=device, fp16=half and fp16, batch_size=max(batches), channels_last=cl)
        for b in batches:
            r = time_predict_raw(matter, b, device, smoke)
            r.update(cudnn_benchmark=bench, fp16=matter.fp16, channels_last=cl, what="predict_raw")
            rows.append(r)
            _print_row(r)
        if not cl and bench == (not smoke):
            f = time_forward_only(matter, max(batches), device, smoke)
            f.update(cudnn_benchmark=bench, fp16=matter.fp16, channels_last=cl, what="forward_only")
            rows.append(f)
            _print_row(f)
        del matter
        _free_cuda()
        _save(summary, out)
    torch.backends.cudnn.benchmark = not smoke


def try_compile(model: Path, device: str, smoke: bool, summary: Summary, out: Path | None) -> None:
    import torch

    rows: list[Summary] = summary.setdefault("compile", [])
    matter = TorchIsnetMatter(model, device=device, fp16=device != "cpu", batch_size=16)
    t0 = time.perf_counter()
    try:
        # Benchmark-only peek at the private net: is compile worth wiring into the matter?
        matter._net = torch.compile(matter._net, dynamic=False)  # type: ignore[assignment]
        for b in [2] if smoke else [8, 16]:
            r = time_predict_raw(matter, b, device, smoke)
            r.update(what="predict_raw compiled", fp16=matter.fp16)
            rows.append(r)
            _print_row(r)
    except Exception as e:  # no compiler/triton on the host must not cost the rest of the summary
        rows.append({"error": f"{type(e).__name__}: {e}"[:500]})
    rows.append({"compile_and_bench_s": round(time.perf_counter() - t0, 1)})
    del matter
    _free_cuda()
    _save(summary, out)


# --------------------------------------------------------------------------- end to end


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core: cv2's own pool would oversubscribe every core


def _noop(i: int) -> int:
    return i


def _decode(path: str) -> tuple[str, np.ndarray, np.ndarray]:
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RuntimeError(f"cannot decode {path}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return path, rgb, isnet_resize(rgb)


def _encode(path: str, rgb: np.ndarray, raw: np.ndarray, out_dir: str) -> int:
    h, w = rgb.shape[:2]
    a8 = (isnet_postprocess(raw, h, w) * 255 + 0.5).astype(np.uint8)
    bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    bgra[..., 3] = a8
    stem = Path(path).stem
    n = 0
    for suffix, img in (("_fg.png", bgra), ("_matte.png", a8)):
        ok, buf = cv2.imencode(".png", img, PNG_FAST)
        if not ok:
            raise RuntimeError(f"PNG encode failed for {path}")
        (Path(out_dir) / f"{stem}{suffix}").write_bytes(buf.tobytes())
        n += len(buf)
    return n


def _pipeline(
    pool: Executor, matter: TorchIsnetMatter, paths: list[str], out_dir: str, batch: int, window: int
) -> Summary:
    """decode (pool) → GPU batches (this thread) → matte + fg PNG encode (pool); returns timings."""
    todo = iter(paths)
    decodes: deque[Future[tuple[str, np.ndarray, np.ndarray]]] = deque()
    encodes: deque[Future[int]] = deque()
    gpu_s = wait_s = 0.0
    png_bytes = 0
    t0 = time.perf_counter()

    def refill() -> None:
        for p in todo:
            decodes.append(pool.submit(_decode, p))
            if len(decodes) >= window:
                break

    refill()
    while decodes:
        tw = time.perf_counter()
        group = [decodes.popleft().result() for _ in range(min(batch, len(decodes)))]
        wait_s += time.perf_counter() - tw
        refill()
        tg = time.perf_counter()
        raw = matter.predict_raw(np.stack([g[2] for g in group]))
        gpu_s += time.perf_counter() - tg
        encodes.extend(pool.submit(_encode, g[0], g[1], r, out_dir) for g, r in zip(group, raw, strict=True))
        while len(encodes) > window:
            png_bytes += encodes.popleft().result()
    png_bytes += sum(f.result() for f in encodes)
    dt = time.perf_counter() - t0
    return {
        "scans": len(paths),
        "s": round(dt, 2),
        "scans_per_s": round(len(paths) / dt, 1),
        "gpu_busy_frac": round(gpu_s / dt, 2),
        "wait_decode_frac": round(wait_s / dt, 2),
        "png_mb_per_scan": round(png_bytes / len(paths) / 1e6, 2),
    }


def stage_costs(images: list[np.ndarray]) -> Summary:
    """Single-thread ms per scan of each CPU stage, to size the worker pool (and try a faster PNG mode)."""
    cv2.setNumThreads(1)
    raw = np.zeros((ISNET_SIZE, ISNET_SIZE), np.float32)
    cv2.ellipse(raw, (512, 640), (220, 420), 0, 0, 360, 1.0, -1)
    raw = np.asarray(
        cv2.GaussianBlur(raw, (0, 0), 6), np.float32
    )  # a smooth, matte-like map: random noise would not compress
    huff = [*PNG_FAST, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    times: dict[str, float] = {}

    def timed(key: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        r = fn(*args)
        times[key] = times.get(key, 0.0) + (time.perf_counter() - t0) / len(images)
        return r

    for img in images:
        jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        rgb = cv2.cvtColor(timed("jpeg_decode", cv2.imdecode, jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        timed("isnet_resize", isnet_resize, rgb)
        a8 = (timed("postprocess", isnet_postprocess, raw, *rgb.shape[:2]) * 255 + 0.5).astype(np.uint8)
        bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
        bgra[..., 3] = a8
        timed("png_fg_level1", cv2.imencode, ".png", bgra, PNG_FAST)
        timed("png_fg_level1_huffman_only", cv2.imencode, ".png", bgra, huff)
        timed("png_matte_level1", cv2.imencode, ".png", a8, PNG_FAST)
    cv2.setNumThreads(-1)
    return {k: round(1000 * v, 1) for k, v in times.items()}


def e2e(model: Path, device: str, smoke: bool, summary: Summary, out: Path | None, n_scans: int) -> None:
    workers = 2 if smoke else os.cpu_count() or 1
    batch = 2 if smoke else 16
    n = max(batch, n_scans // batch * batch)  # whole batches: a ragged last batch re-tunes cuDNN
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        sources = [synth_scan(100 + i, *SCAN_HW) for i in range(2 if smoke else 8)]
        summary["cpu_stage_ms_single_thread"] = stage_costs(sources[:2])
        paths = []
        for i in range(n):
            p = tmp / f"scan{i:05d}.jpg"
            if i < len(sources):
                cv2.imwrite(str(p), cv2.cvtColor(sources[i], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            else:
                shutil.copyfile(tmp / f"scan{i % len(sources):05d}.jpg", p)
            paths.append(str(p))
        out_dir = tmp / "out"
        out_dir.mkdir()
        matter = TorchIsnetMatter(model, device=device, batch_size=batch)
        rows: list[Summary] = summary.setdefault("e2e", [])
        for kind in ("process", "thread"):
            pool: Executor
            if kind == "process":
                pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
            else:
                cv2.setNumThreads(1)
                pool = ThreadPoolExecutor(workers)
            with pool:
                list(pool.map(_noop, range(4 * workers)))  # start workers (and their imports) untimed
                _pipeline(pool, matter, paths[: 2 * batch], str(out_dir), batch, 2 * max(batch, workers))
                r = _pipeline(pool, matter, paths, str(out_dir), batch, 2 * max(batch, workers))
            cv2.setNumThreads(-1)
            r.update(pool=kind, workers=workers, batch=batch, fp16=matter.fp16, scan_hw=list(SCAN_HW))
            rows.append(r)
            _print_row(r)
            _save(summary, out)
        del matter
        _free_cuda()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- driver


def _print_row(r: Summary) -> None:
    print("  " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)


def _save(summary: Summary, out: Path | None) -> None:
    if out is not None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, out)


def env_info(device: str) -> Summary:
    import onnxruntime as ort
    import torch

    info: Summary = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cv2": cv2.__version__,
        "onnxruntime": ort.__version__,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "device": device,
    }
    if device != "cpu":
        p = torch.cuda.get_device_properties(torch.device(device))
        cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cudnn=cudnn)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    default_dir = os.environ.get("BSHM_WATCHD_MODEL_DIR", ".models")
    ap.add_argument("--model", type=Path, default=Path(default_dir) / "isnet.onnx")
    ap.add_argument("--images", type=Path, default=Path(".models/images"), help="real photos for parity")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-smoke", action="store_true", help="every section on CPU with tiny counts")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (after everything else)")
    ap.add_argument("--compile-if-under-s", type=float, default=200.0, help="skip compile past this elapsed")
    ap.add_argument("--e2e-scans", type=int, default=384)
    args = ap.parse_args(argv)
    import torch

    device = "cpu" if args.cpu_smoke else args.device
    if device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --cpu-smoke", file=sys.stderr)
        return 2
    out = Path(os.environ["OUT"]) / "gpu_summary.json" if os.environ.get("OUT") else None
    t_start = time.perf_counter()
    summary: Summary = {"env": env_info(device), "model": str(args.model)}
    print("env:", summary["env"], flush=True)
    images = load_images(args.images, 1 if args.cpu_smoke else 3)
    print(f"parity on {[n for n, _ in images]}", flush=True)
    summary["parity"] = parity(args.model, device, images, args.cpu_smoke)
    for r in summary["parity"]:
        _print_row(r)
    _save(summary, out)
    print("throughput (ms/img at 1024², predict_raw = H2D uint8 + forward + D2H fp32):", flush=True)
    throughput(args.model, device, args.cpu_smoke, summary, out)
    print("end to end (1536×1024 JPEG → isnet → fg + matte PNG, level 1):", flush=True)
    e2e(args.model, device, args.cpu_smoke, summary, out, 4 if args.cpu_smoke else args.e2e_scans)
    print("  cpu stage ms (single thread):", summary["cpu_stage_ms_single_thread"], flush=True)
    if args.compile:
        elapsed = time.perf_counter() - t_start
        if elapsed < args.compile_if_under_s:
            print("torch.compile:", flush=True)
            try_compile(args.model, device, args.cpu_smoke, summary, out)
        else:
            summary["compile"] = [{"skipped": f"elapsed {elapsed:.0f}s > {args.compile_if_under_s:.0f}s"}]
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    _save(summary, out)
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
