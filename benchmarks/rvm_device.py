"""rvm on cuda against the CPU, on real scans: max / mean |Δα| and ms a call on each device.

Usage: ``python benchmarks/rvm_device.py [--model rvm.zip] [--cpu-smoke] IMAGE ...``. Each image is scaled to a
1024 px long side (the fusion's analysis copy) and run 5 times on each device after one warm-up call; the
ratio cpu/cuda is of medians from the same process. ``--cpu-smoke`` runs both sides on the CPU (no GPU
here) so the script is proven before a GPU session. Prints one JSON object; also writes
``$OUT/rvm_device.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rvm_cold import load_scaled  # this folder is sys.path[0] when run as a script

from bshm_watchd.engine.rvm import RvmMatter


def _ms(matter: RvmMatter, rgb: np.ndarray, reps: int) -> tuple[float, np.ndarray]:
    out = matter.predict(rgb)  # warm-up (and the answer compared)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        matter.predict(rgb)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    if args.model is None:
        from bshm_watchd.modelstore import ModelStore, default_model_dir

        args.model = ModelStore(default_model_dir()).path("rvm")
    model = args.model
    cpu = RvmMatter(model, device="cpu")
    other = RvmMatter(model, device="cpu" if args.cpu_smoke else "cuda")
    rows = []
    for path in args.images:
        rgb = load_scaled(path, 1024, grow=False)
        ms_cpu, a = _ms(cpu, rgb, args.reps)
        ms_dev, b = _ms(other, rgb, args.reps)
        diff = np.abs(a - b)
        rows.append({"image": path.name, "hw": list(rgb.shape[:2]), "max_diff": float(diff.max()),
                     "mean_diff": float(diff.mean()), "share_off_1_of_255": float((diff > 1 / 255).mean()),
                     "ms_cpu": round(ms_cpu, 1), "ms_device": round(ms_dev, 1),
                     "cpu_over_device": round(ms_cpu / ms_dev, 2)})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"device": str(other.device), "images": len(rows), "max_diff": max(r["max_diff"] for r in rows),
               "median_cpu_over_device": statistics.median(r["cpu_over_device"] for r in rows), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "rvm_device.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
