"""Seconds per image for the bshm runtime: a stand-in frozen U-Net with BSHM's tensor names, or a real graph.

    python benchmarks/bshm_graph_speed.py                       # random-weight U-Net, 1024×1536, CPU
    python benchmarks/bshm_graph_speed.py --graph bshm.pb --device auto

The stand-in has BSHM's contract (``input_image:0`` H×W×3 float 0–255 → ``output_png:0`` H×W×4 uint8) and
a comparable size and depth (tens of 3×3 conv layers, a few million weights, run at full resolution);
its numbers are an estimate of the official graph's cost, not a measurement of it.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bshm_watchd.engine.bshm_tf import BshmMatter, import_tensorflow

WIDTHS = (16, 32, 64, 128, 256)
CONVS_PER_BLOCK = 3


def build_unet(path: Path, seed: int = 0) -> tuple[int, int]:
    """Write a random-weight U-Net GraphDef with BSHM's tensor names; return (weights, conv layers)."""
    tf = import_tensorflow()
    rng = np.random.default_rng(seed)
    counts = [0, 0]

    def conv(x: Any, cin: int, cout: int, k: int = 3) -> Any:
        w = rng.normal(0.0, np.sqrt(2.0 / (k * k * cin)), (k, k, cin, cout)).astype(np.float32)
        counts[0] += w.size + cout
        counts[1] += 1
        y = tf.nn.conv2d(x, tf.constant(w), strides=1, padding="SAME") + tf.constant(
            np.zeros(cout, np.float32)
        )
        return tf.nn.relu(y)

    def block(x: Any, cin: int, cout: int) -> Any:
        for i in range(CONVS_PER_BLOCK):
            x = conv(x, cin if i == 0 else cout, cout)
        return x

    g = tf.Graph()
    with g.as_default():
        rgb = tf.compat.v1.placeholder(tf.float32, shape=[None, None, 3], name="input_image")
        x = (rgb / 255.0 - 0.5)[None]
        skips, cin = [], 3
        for width in WIDTHS[:-1]:
            x = block(x, cin, width)
            skips.append((x, width))
            x = tf.nn.max_pool2d(x, 2, 2, "SAME")
            cin = width
        x = block(x, cin, WIDTHS[-1])
        cin = WIDTHS[-1]
        for skip, width in reversed(skips):
            x = tf.image.resize(x, tf.shape(skip)[1:3], method="bilinear")
            x = block(tf.concat([x, skip], axis=-1), cin + width, width)
            cin = width
        logits = tf.nn.conv2d(
            x, tf.constant(rng.normal(0, 0.1, (1, 1, cin, 1)).astype(np.float32)), 1, "SAME"
        )
        alpha = tf.sigmoid(logits)[0] * 255.0
        rgba = tf.concat([rgb, alpha], axis=-1)
        tf.identity(tf.cast(tf.clip_by_value(rgba, 0.0, 255.0), tf.uint8), name="output_png")
    path.write_bytes(g.as_graph_def().SerializeToString())
    return counts[0] + cin, counts[1] + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graph", type=Path, help="a real tf_graph.pb; default: build the stand-in U-Net")
    ap.add_argument("--size", default="1024x1536", help="H×W of the test image (default 1024x1536)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        graph = args.graph
        if graph is None:
            graph = Path(tmp) / "unet.pb"
            weights, layers = build_unet(graph)
            print(f"stand-in U-Net: {weights / 1e6:.2f} M weights, {layers} conv layers")
        print(f"graph: {graph.stat().st_size / 2**20:.1f} MiB")
        t0 = time.perf_counter()
        matter = BshmMatter(graph, device=args.device, threads=args.threads)
        print(f"load: {time.perf_counter() - t0:.2f} s")
        rgb = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        matter.predict(rgb)
        print(f"first run (graph optimisation + run): {time.perf_counter() - t0:.2f} s")
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            alpha = matter.predict(rgb)
            times.append(time.perf_counter() - t0)
        matter.close()
    assert alpha.shape == (h, w)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"{h}×{w}: median {np.median(times):.2f} s/image over {args.runs} runs (min {min(times):.2f}); "
        f"peak RSS {rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()
