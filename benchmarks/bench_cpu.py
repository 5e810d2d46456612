"""The CPU acceptance check of the throughput issue, end to end, in one run.

    python benchmarks/bench_cpu.py [--rounds 2] [--skip-big] [--model-dir DIR]

1. Six 1024×1536 scans (portraits from ../shared/data cropped to 2:3, else synthetic ones):
   ``bshm-watchd process --model isnet`` against the naive sequential path (Pillow decode → isnet on
   onnxruntime with default options → Pillow PNG with default settings), each a fresh process, so model
   loading and start-up count for both; rounds alternate and the medians are compared (goal ≥ 1.3×).
2. One 6000×9000 scan through ``process --model isnet`` and through the default model: the child's
   peak RSS from wait4 (goal ≤ 3 GB).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "portraits" / "image"
SIZE = (1024, 1536)


def make_scans(folder: Path, n: int = 6) -> list[Path]:
    from bshm_watchd.bench import synthetic_scan

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(SHARED.glob("*.jpg")) if SHARED.is_dir() else []
    out = []
    for i in range(n):
        w, h = SIZE
        img = cv2.imread(str(sources[i % len(sources)])) if sources else None
        if img is None:
            img = cv2.cvtColor(synthetic_scan(SIZE, i), cv2.COLOR_RGB2BGR)
        else:  # centre crop to 2:3, then resize
            ih, iw = img.shape[:2]
            cw = min(iw, ih * w // h)
            ch = cw * h // w
            y0, x0 = (ih - ch) // 2, (iw - cw) // 2
            img = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], SIZE, interpolation=cv2.INTER_AREA)
        path = folder / f"scan_{i}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        out.append(path)
    return out


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB, exit status of ``cmd``.

    The peak comes from /usr/bin/time, or else from sampling the child's VmHWM: wait4's ru_maxrss would
    carry this (big) parent's own high-water mark into the child across fork and exec.
    """
    from bshm_watchd.bench import _descendants, hwm_mb

    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").is_file() else []
    t0 = time.perf_counter()
    proc = subprocess.Popen([*timer, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        if not timer:
            peak = max([peak, hwm_mb(proc.pid), *(hwm_mb(c) for c in _descendants(proc.pid))])
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr is not None else ""
    if timer:
        peak = int(err.split()[-1]) / 1024 if err.split() and err.split()[-1].isdigit() else 0.0
    if proc.returncode != 0:
        sys.stderr.write(err[-2000:])
    return seconds, peak, proc.returncode


def make_big(src: Path, dst: Path) -> None:
    """A 6000×9000 JPEG upscaled from ``src``, with grain so it does not compress like a smooth blow-up."""
    first = cv2.imread(str(src))
    assert first is not None
    img = cv2.resize(first, (6000, 9000), interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(0).integers(-6, 7, img.shape, dtype=np.int16)
    cv2.imwrite(str(dst), np.clip(img + noise, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])


def naive_child(folder: Path, out: Path, model_dir: Path | None) -> None:
    """The naive script as its own process. Same steps as ``bshm_watchd.bench.run_naive``, but importing only
    what such a script would (numpy, Pillow, onnxruntime): the bench module's imports would cost it ~0.4 s."""
    import onnxruntime as ort
    from PIL import Image

    from bshm_watchd.engine.isnet_common import isnet_postprocess, isnet_preprocess
    from bshm_watchd.modelstore import default_model_dir

    root = model_dir or default_model_dir()
    session = ort.InferenceSession(str(root / "isnet.onnx"), providers=["CPUExecutionProvider"])
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        (raw,) = session.run(["output"], {"input": isnet_preprocess(rgb)})
        matte = (isnet_postprocess(raw, rgb.shape[0], rgb.shape[1]) * 255 + 0.5).astype(np.uint8)
        Image.fromarray(np.dstack([rgb, matte])).save(out / f"{path.stem}_fg.png")
        Image.fromarray(matte).save(out / f"{path.stem}_matte.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="alternating naive/process rounds (0: skip)")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--naive-child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_child:
        naive_child(Path(args.naive_child[0]), Path(args.naive_child[1]), args.model_dir)
        return 0
    md = ["--model-dir", str(args.model_dir)] if args.model_dir else []
    cli = [sys.executable, "-m", "bshm_watchd", "--log-level", "warning", "process"]
    lines, ok = [], True
    with tempfile.TemporaryDirectory(prefix="bshm-bench-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        scans = tmp / "six"
        make_scans(scans)
        ours, naive = [], []
        for r in range(args.rounds):
            s, _, rc = timed([sys.executable, __file__, "--naive-child", str(scans), str(tmp / f"naive{r}"), *md])
            naive.append(s)
            s2, _, rc2 = timed([*cli, "--model", "isnet", "-i", str(scans), "-d", str(tmp / f"ours{r}"), *md])
            ours.append(s2)
            if rc or rc2:
                ok = False
            print(f"round {r + 1}: naive {s:.1f} s, process {s2:.1f} s", flush=True)
        if args.rounds:
            ratio = statistics.median(naive) / statistics.median(ours)
            ok &= ratio >= 1.3
            lines.append(f"six 1024x1536 scans, isnet, end to end: naive {statistics.median(naive):.1f} s, "
                         f"process {statistics.median(ours):.1f} s -> {ratio:.2f}x (goal >= 1.3x)")
        if not args.skip_big:
            big = tmp / "big" / "huge.jpg"
            big.parent.mkdir()
            make_big(next(scans.glob("*.jpg")), big)
            for model in ("isnet", "fusion"):
                s, mb, rc = timed([*cli, "--model", model, "-i", str(big), "-d", str(tmp / f"big_{model}"), *md])
                ok &= rc == 0 and mb <= 3072
                lines.append(f"6000x9000 scan, {model}: {s:.1f} s, peak RSS {mb:.0f} MB (goal <= 3072 MB), exit {rc}")
    print("\n".join(lines))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
