"""Generated backdrops for the benchmark composites, and the random helpers the recipe shares.

Every backdrop is an H×W×3 float32 sRGB image in [0, 1] drawn from a ``numpy`` Generator; its
parameters come back as a JSON-ready dict for the case's recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from bshm_watchd.engine.base import Alpha

F32 = npt.NDArray[np.float32]
Recipe = dict[str, Any]
Rng = np.random.Generator

BACKDROPS = (
    "studio",
    "scenery",
    "gradient",
    "dark",
    "light",
    "interior",
    "texture",
    "planks",
    "foliage",
    "clothes",
)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def uniform(rng: Rng, lo: float, hi: float) -> float:
    """A uniform draw rounded so the recipe JSON stays readable; the rounded value is the one used."""
    return round(float(rng.uniform(lo, hi)), 4)


def rand_rgb(rng: Rng, lo: float, hi: float, sat: float = 1.0) -> list[float]:
    c = np.array([rng.uniform(lo, hi) for _ in range(3)])
    c = c.mean() + sat * (c - c.mean())
    return [round(float(v), 4) for v in np.clip(c, 0.0, 1.0)]


def f32(x: Any) -> F32:
    """``x`` as a float32 array (OpenCV's results are typed loosely)."""
    return np.asarray(x, dtype=np.float32)


def fill(h: int, w: int, colour: Sequence[float]) -> F32:
    return np.broadcast_to(np.asarray(colour, np.float32), (h, w, 3)).copy()


def smooth_noise(rng: Rng, h: int, w: int, scale: float, octaves: int = 1) -> F32:
    """Smooth noise in [0, 1] with blobs about ``scale`` px wide (coarse grid, cubic upsampling)."""
    out = np.zeros((h, w), np.float32)
    for o in range(octaves):
        s = max(scale / 2**o, 1.0)
        grid = rng.random((int(h / s) + 3, int(w / s) + 3), dtype=np.float32)
        out += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) / 2**o
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def mix(a: Sequence[float] | F32, b: Sequence[float] | F32, t: F32) -> F32:
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a32 + (b32 - a32) * t[..., None]).astype(np.float32)


def resize(arr: npt.NDArray[Any], size: Sequence[int]) -> npt.NDArray[Any]:
    """Resize to (w, h): area when shrinking (no aliasing), linear otherwise (no overshoot)."""
    w, h = int(size[0]), int(size[1])
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    interp = cv2.INTER_AREA if w <= arr.shape[1] and h <= arr.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(arr, (w, h), interpolation=interp)


def bounded(w: int, h: int, long_side: float) -> tuple[int, int]:
    s = min(1.0, long_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


# ---------------------------------------------------------------- backdrops (H×W×3 float32 in [0, 1])


def _studio(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    c1 = rand_rgb(rng, 0.12, 0.75, sat=uniform(rng, 0.1, 0.7))
    c2 = [round(min(1.0, v * uniform(rng, 0.5, 1.6)), 4) for v in c1]
    scale = uniform(rng, 0.05, 0.4) * max(h, w)
    bg = mix(c1, c2, smooth_noise(rng, h, w, scale, octaves=3))
    spot = [uniform(rng, 0.3, 0.7), uniform(rng, 0.15, 0.6), uniform(rng, 0.3, 0.9), uniform(rng, 0.0, 0.35)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(xx / w - spot[0], yy / h - spot[1]) / spot[2]
    bg *= (1 + spot[3] * np.clip(1 - r, 0, 1) ** 2)[..., None]
    return bg, {"c1": c1, "c2": c2, "scale": round(scale, 1), "spot": spot}


def _scenery(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    horizon = uniform(rng, 0.35, 0.75)
    sky_top, sky_low = rand_rgb(rng, 0.45, 0.85, 0.4), rand_rgb(rng, 0.65, 0.95, 0.3)
    ground = rand_rgb(rng, 0.2, 0.55, 0.5)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
    bg = mix(sky_top, sky_low, np.clip(y / horizon, 0, 1))
    bg = np.where((y > horizon)[..., None], mix(ground, [v * 0.6 for v in ground], (y - horizon) / (1 - horizon)), bg)
    trees = int(rng.integers(0, 12))
    tree_col = rand_rgb(rng, 0.1, 0.4, 0.6)
    mask = np.zeros((h, w), np.float32)
    for _ in range(trees):
        cx, cy = int(rng.uniform(0, w)), int((horizon - rng.uniform(0, 0.25)) * h)
        ax, ay = int(rng.uniform(0.03, 0.15) * w), int(rng.uniform(0.05, 0.25) * h)
        cv2.ellipse(mask, (cx, cy), (ax, ay), 0, 0, 360, 1.0, -1)
    mask = f32(cv2.GaussianBlur(mask, (0, 0), 0.01 * max(h, w) + 1))
    bg = mix(bg, tree_col, mask * (0.6 + 0.4 * smooth_noise(rng, h, w, 0.03 * max(h, w))))
    return bg.astype(np.float32), {
        "horizon": horizon,
        "sky": [sky_top, sky_low],
        "ground": ground,
        "trees": trees,
    }


def _gradient(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    c1, c2 = rand_rgb(rng, 0.05, 0.95, uniform(rng, 0, 1)), rand_rgb(rng, 0.05, 0.95, uniform(rng, 0, 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radial = bool(rng.random() < 0.5)
    if radial:
        cx, cy = uniform(rng, 0.2, 0.8), uniform(rng, 0.2, 0.8)
        t = np.hypot(xx / w - cx, yy / h - cy) / uniform(rng, 0.4, 1.0)
        params: Recipe = {"radial": [cx, cy]}
    else:
        ang = uniform(rng, 0, 2 * np.pi)
        t = (np.cos(ang) * xx / w + np.sin(ang) * yy / h) + 0.5
        params = {"angle": ang}
    return mix(c1, c2, np.clip(t, 0, 1)), {"c1": c1, "c2": c2, **params}


def _flat(rng: Rng, h: int, w: int, lo: float, hi: float) -> tuple[F32, Recipe]:
    base = rand_rgb(rng, lo, hi, sat=uniform(rng, 0, 0.5))
    amp = uniform(rng, 0.0, 0.08)
    shade = 1 + amp * (2 * smooth_noise(rng, h, w, uniform(rng, 0.1, 0.6) * max(h, w), octaves=2) - 1)
    return np.clip(fill(h, w, base) * shade[..., None], 0, 1), {"base": base, "mottle": amp}


def _dark(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    return _flat(rng, h, w, 0.0, 0.16)


def _light(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    return _flat(rng, h, w, 0.75, 0.99)


def _interior(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    bg = fill(h, w, rand_rgb(rng, 0.2, 0.8, 0.5))
    rects = int(rng.integers(3, 15))
    for _ in range(rects):
        x0, y0 = rng.uniform(-0.1, 0.9), rng.uniform(-0.1, 0.9)
        x1, y1 = x0 + rng.uniform(0.05, 0.5), y0 + rng.uniform(0.05, 0.7)
        col = rand_rgb(rng, 0.0, 1.0, uniform(rng, 0.1, 0.8))
        cv2.rectangle(bg, (int(x0 * w), int(y0 * h)), (int(x1 * w), int(y1 * h)), col, -1)
    sigma = uniform(rng, 0.0, 0.02) * max(h, w)
    if sigma >= 0.5:
        bg = f32(cv2.GaussianBlur(bg, (0, 0), sigma))
    return bg, {"rects": rects, "blur": round(sigma, 2)}


def _texture(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    base, amp = rand_rgb(rng, 0.2, 0.85, 0.5), uniform(rng, 0.05, 0.3)
    style = str(rng.choice(["noise", "fabric", "wallpaper"]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = uniform(rng, 4, 40)
    if style == "noise":
        t = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), uniform(rng, 0.5, 3)) - 0.5
        t = t / max(float(np.abs(t).max()), 1e-6)
    elif style == "fabric":
        t = np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period * uniform(rng, 0.5, 2))
    else:
        ph = rng.uniform(0, 2 * np.pi, 2)
        t = np.cos(2 * np.pi * xx / (3 * period) + ph[0]) * np.cos(2 * np.pi * yy / (3 * period) + ph[1])
        t = (np.abs(t) > 0.6).astype(np.float32) * 2 - 1
    bg = np.clip(fill(h, w, base) * (1 + amp * t[..., None]), 0, 1)
    return bg.astype(np.float32), {"style": style, "base": base, "amp": amp, "period": period}


def _planks(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    vertical = bool(rng.random() < 0.6)
    width = uniform(rng, 0.02, 0.1) * max(h, w)
    base = rand_rgb(rng, 0.2, 0.7, uniform(rng, 0.2, 0.9))
    along, across = (h, w) if vertical else (w, h)
    grain = smooth_noise(rng, int(width), along, uniform(rng, 2, 8))  # stretched along the board
    board = np.zeros((along, across), np.float32)
    for i, x in enumerate(range(0, across, max(2, int(width)))):
        tone = uniform(rng, 0.75, 1.15)
        seg = board[:, x : x + int(width)]
        seg[:] = tone * (0.85 + 0.3 * cv2.resize(grain, (seg.shape[1], along)))
        if i:
            seg[:, :2] = 0.35
    if not vertical:
        board = board.T.copy()
    return np.clip(fill(h, w, base) * board[..., None], 0, 1), {
        "vertical": vertical,
        "width": round(width, 1),
    }


def _foliage(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    bg = fill(h, w, rand_rgb(rng, 0.05, 0.35, 0.6))
    blobs = int(rng.integers(60, 400))
    for _ in range(blobs):
        bright = rng.random() < 0.15
        col = rand_rgb(rng, 0.7, 1.0, 0.2) if bright else rand_rgb(rng, 0.05, 0.6, uniform(rng, 0.3, 1.0))
        r = int(rng.uniform(0.003, 0.04) * max(h, w)) + 1
        cv2.circle(bg, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), r, col, -1, cv2.LINE_AA)
    sigma = uniform(rng, 0.0, 3.0)
    if sigma >= 0.5:
        bg = f32(cv2.GaussianBlur(bg, (0, 0), sigma))
    return bg, {"blobs": blobs, "blur": sigma}


def _clothes(rng: Rng, h: int, w: int, clothes: list[float]) -> tuple[F32, Recipe]:
    base = [round(float(np.clip(c + rng.uniform(-0.05, 0.05), 0, 1)), 4) for c in clothes]
    amp = uniform(rng, 0.0, 0.1)
    shade = 1 + amp * (2 * smooth_noise(rng, h, w, uniform(rng, 0.05, 0.4) * max(h, w), octaves=2) - 1)
    return np.clip(fill(h, w, base) * shade[..., None], 0, 1), {"base": base, "mottle": amp}


_BACKDROP_FNS: dict[str, Callable[[Rng, int, int, list[float]], tuple[F32, Recipe]]] = {
    "studio": _studio,
    "scenery": _scenery,
    "gradient": _gradient,
    "dark": _dark,
    "light": _light,
    "interior": _interior,
    "texture": _texture,
    "planks": _planks,
    "foliage": _foliage,
    "clothes": _clothes,
}


def backdrop(kind: str, rng: Rng, h: int, w: int, clothes: Sequence[float] = (0.5, 0.5, 0.5)) -> tuple[F32, Recipe]:
    """A generated H×W×3 float32 backdrop of ``kind`` (one of ``BACKDROPS``) and its parameters."""
    if kind not in _BACKDROP_FNS:
        raise ValueError(f"unknown backdrop {kind!r}; expected one of {', '.join(BACKDROPS)}")
    bg, params = _BACKDROP_FNS[kind](rng, h, w, [float(c) for c in clothes])
    return np.clip(bg, 0, 1).astype(np.float32), {"kind": kind, **params}


def clothes_colour(fg: F32, alpha: Alpha) -> list[float]:
    """Median foreground colour in the lower 40 % of the subject's box (usually clothes)."""
    ys = np.nonzero(alpha.max(axis=1) > 0.5)[0]
    if ys.size == 0:
        return [0.5, 0.5, 0.5]
    top = int(ys[0] + 0.6 * (ys[-1] - ys[0]))
    sel = alpha[top:] > 0.95
    if not sel.any():
        sel = alpha[top:] > 0.5
    return [round(float(v), 4) for v in np.median(fg[top:][sel], axis=0)] if sel.any() else [0.5, 0.5, 0.5]


def keep_apart(bg: F32, fg: F32, alpha: Alpha, min_diff: float = 0.12) -> tuple[F32, float]:
    """Shift the backdrop so the subject's rim and the backdrop beside it differ in brightness by ≥ min_diff.

    Without it a dark silhouette on the dark backdrop vanished entirely: a case no method (or
    person) can score on, which only adds noise to the benchmark. Similar colours stay allowed.
    """
    solid = (alpha > 0.5).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (31, 31))
    outside = (cv2.dilate(solid, k) > 0) & (alpha < 0.05)
    rim = (alpha > 0.95) & (cv2.erode(solid, k) == 0)
    if not outside.any() or not rim.any():
        return bg, 0.0
    diff = float(np.median(bg[outside] @ LUMA)) - float(np.median(fg[rim] @ LUMA))
    if abs(diff) >= min_diff:
        return bg, 0.0
    lighter = diff > 0 if abs(diff) > 0.01 else float(np.median(fg[rim] @ LUMA)) < 0.5
    shift = round((min_diff - abs(diff)) * (1 if lighter else -1), 4)
    return np.clip(bg + shift, 0, 1).astype(np.float32), shift
