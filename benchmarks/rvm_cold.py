"""What a scan of a size rvm has not seen yet costs on the device: the first call at each new shape against a
second call at it, with cuDNN on and off (``RvmMatter``'s default, chosen by this script's numbers). Fusion
calls rvm at each scan's own size, so a service fed scans of many sizes pays the first-call price on nearly
every scan.

Usage: ``python benchmarks/rvm_cold.py --model rvm.zip [--device cuda] IMAGE ...``. Each image is scaled to a
long side of 1024, 1000 and 976 px (three shapes never seen before), one set per mode. Prints per-call ms,
medians, and the top of a cProfile of one cold call; writes ``$OUT/rvm_cold.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bshm_watchd.engine.rvm import RvmMatter


def load_scaled(path: Path, side: int, *, grow: bool = True) -> np.ndarray:
    """An RGB image scaled to a long side of ``side`` px (only down, where ``grow`` is False)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {path}")
    s = side / max(bgr.shape[:2])
    if grow or s < 1:
        bgr = cv2.resize(bgr, (round(bgr.shape[1] * s), round(bgr.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _timed(matter: RvmMatter, rgb: np.ndarray) -> float:
    if matter.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    matter.predict(rgb)  # returns on the host: synchronised
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    matters = {on: RvmMatter(args.model, device=args.device, cudnn=on) for on in (True, False)}
    matter = matters[True]
    for m in matters.values():
        _timed(m, load_scaled(args.images[0], 512))  # load-time work out of the way
    out: dict[str, object] = {"device": str(matter.device), "torch": torch.__version__}
    for mode, side in (("cudnn", 1024), ("no-cudnn", 1000), ("cudnn-again", 976)):
        rows = []
        matter = matters[mode != "no-cudnn"]
        for path in args.images:
            rgb = load_scaled(path, side)
            first, second = _timed(matter, rgb), _timed(matter, rgb)
            rows.append((list(rgb.shape[:2]), round(first, 1), round(second, 1)))
        out[mode] = {"first_ms_median": statistics.median(r[1] for r in rows),
                     "second_ms_median": statistics.median(r[2] for r in rows), "rows": rows}
        print(mode, json.dumps(out[mode]), flush=True)
    matter = matters[True]
    prof = cProfile.Profile()
    rgb = load_scaled(args.images[0], 952)
    prof.enable()
    matter.predict(rgb)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
    out["cold_profile"] = text.getvalue()[-3000:]
    print(out["cold_profile"])
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "rvm_cold.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
