"""Ageing of a composite: the image-only half of the benchmark recipe (see ``composite``).

``age`` takes no alpha on purpose: no step moves a pixel, so the truth cannot drift.
``severity`` in [0, 1] scales how often the damage steps (stains … dust) happen and how far their
ranges reach (k = 0.25 + 0.75·severity stretches each range from its mild end); tone and the
kind of print do not depend on it. At severity 1 every range is fully open.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from bshm_watchd.engine.base import RGB8
from bshm_watchd.evaluation.backdrops import (
    F32,
    LUMA,
    Recipe,
    Rng,
    bounded,
    f32,
    mix,
    rand_rgb,
    smooth_noise,
    uniform,
)


def _span(rng: Rng, lo: float, hi: float, k: float) -> float:
    """Uniform on the first ``k`` of [lo, hi] (lo is the mild end)."""
    return uniform(rng, lo, lo + (hi - lo) * k)


def _tone(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    mode = str(rng.choice(["colour", "mono", "sepia", "cyanotype", "tinted"], p=[0.3, 0.22, 0.3, 0.06, 0.12]))
    lum = (img @ LUMA)[..., None]
    p: Recipe = {"mode": mode}
    if mode == "colour":
        p["sat"], p["gain"] = (
            round(1.05 - _span(rng, 0.0, 0.75, k), 4),
            [
                uniform(rng, 0.9, 1.08),
                round(1.02 - _span(rng, 0.0, 0.22, k), 4),
                round(1.0 - _span(rng, 0.02, 0.45, k), 4),
            ],
        )
        return (lum + p["sat"] * (img - lum)) * np.asarray(p["gain"], np.float32), p
    if mode == "mono":
        p["gain"] = [uniform(rng, 0.95, 1.05) for _ in range(3)]
        return lum * np.asarray(p["gain"], np.float32), p
    if mode == "cyanotype":
        p["dark"], p["light"] = (
            [uniform(rng, 0, 0.1), uniform(rng, 0.05, 0.2), uniform(rng, 0.25, 0.45)],
            rand_rgb(rng, 0.75, 1.0, 0.6),
        )
    else:  # sepia and the monochrome base of a hand-tinted print
        p["dark"] = [uniform(rng, 0.08, 0.25), uniform(rng, 0.04, 0.15), uniform(rng, 0.0, 0.08)]
        p["light"] = [uniform(rng, 0.92, 1.0), uniform(rng, 0.82, 0.95), uniform(rng, 0.55, 0.85)]
    toned = mix(p["dark"], p["light"], lum[..., 0])
    if mode == "tinted":
        p["tint"] = uniform(rng, 0.15, 0.6)
        toned = toned + p["tint"] * (img - lum)
    return toned, p


def _fade(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    p = {"lift": _span(rng, 0.0, 0.3, k), "cap": round(1 - _span(rng, 0.0, 0.3, k), 4), "gamma": uniform(rng, 0.7, 1.4)}
    return p["lift"] + (p["cap"] - p["lift"]) * np.clip(img, 0, 1) ** p["gamma"], p


def _stains(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    h, w = img.shape[:2]
    n, mask = int(rng.integers(1, 7)), np.zeros((h, w), np.float32)
    for _ in range(n):
        r = int(rng.uniform(0.04, 0.3) * max(h, w)) + 1
        cv2.circle(mask, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), r, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.02 * max(h, w) + 1) * smooth_noise(rng, h, w, 0.05 * max(h, w), 2)
    p: Recipe = {
        "n": n,
        "strength": _span(rng, 0.1, 0.45, k),
        "colour": [1.0, uniform(rng, 0.8, 0.95), uniform(rng, 0.5, 0.8)],
    }
    return img * (1 - p["strength"] * mask[..., None] * (1 - np.asarray(p["colour"], np.float32))), p


def _vignette(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    h, w = img.shape[:2]
    p: Recipe = {
        "cx": uniform(rng, 0.4, 0.6),
        "cy": uniform(rng, 0.4, 0.6),
        "strength": _span(rng, 0.1, 0.75, k),
        "power": uniform(rng, 1.5, 4.0),
        "light": bool(rng.random() < 0.25),
    }
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.clip(np.hypot((xx / w - p["cx"]) * 2, (yy / h - p["cy"]) * 2) / np.sqrt(2), 0, 1)
    v = (p["strength"] * r ** p["power"])[..., None]
    if p["light"]:  # faded to the paper colour at the edges, as on many cabinet cards
        paper = np.percentile(img.reshape(-1, 3), 99, axis=0).astype(np.float32)
        return img + (paper - img) * v, p
    return img * (1 - v), p


def _blur(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    sigma = _span(rng, 0.3, 2.5, k) * max(img.shape[:2]) / 1024
    return f32(cv2.GaussianBlur(img, (0, 0), max(sigma, 0.3))), {"sigma": round(sigma, 3)}


def _rescan(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    h, w = img.shape[:2]
    p: Recipe = {
        "factor": round(0.9 - _span(rng, 0.0, 0.7, k), 4),
        "up": str(rng.choice(["linear", "cubic", "nearest"], p=[0.45, 0.45, 0.1])),
    }
    small = cv2.resize(img, bounded(w, h, max(h, w) * p["factor"]), interpolation=cv2.INTER_AREA)
    up = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}[p["up"]]
    return f32(cv2.resize(small, (w, h), interpolation=up)), p


def _grain(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    h, w = img.shape[:2]
    # Skewed low: heavy grain is rare in real prints, but the tail keeps the model honest.
    amp = round(0.005 + 0.07 * k * float(rng.random()) ** 2, 4)
    p: Recipe = {"amp": amp, "size": uniform(rng, 0.5, 1.8), "mono": bool(rng.random() < 0.8)}
    n = rng.standard_normal((h, w, 1) if p["mono"] else (h, w, 3), dtype=np.float32)
    n = f32(cv2.GaussianBlur(n, (0, 0), p["size"])).reshape(h, w, -1)
    n /= max(float(n.std()), 1e-6)
    lum = (np.clip(img, 0, 1) @ LUMA)[..., None]
    return f32(img + amp * n * (0.5 + 2 * lum * (1 - lum))), p


def _paint(img: F32, mask: F32, value: float, opacity: float) -> F32:
    m = (mask * opacity)[..., None]
    return f32(img * (1 - m) + value * m)


def _scratches(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    h, w = img.shape[:2]
    n, film = 1 + int(_span(rng, 0, 25, k)), bool(rng.random() < 0.5)
    for _ in range(n):
        mask = np.zeros((h, w), np.float32)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        ang = rng.normal(np.pi / 2, 0.05) if film else rng.uniform(0, np.pi)
        step, pts = max(h, w) * rng.uniform(0.1, 1.0) / 20, []
        for _ in range(21):
            pts.append((int(x), int(y)))
            ang += rng.normal(0, 0.04)
            x, y = x + step * np.cos(ang), y + step * np.sin(ang)
        thick = max(1, int(rng.uniform(1, 3) * max(h, w) / 1024))
        cv2.polylines(mask, [np.array(pts, np.int32)], False, 1.0, thick, cv2.LINE_AA)
        bright = rng.random() < 0.65
        img = _paint(img, mask, rng.uniform(0.85, 1.0) if bright else rng.uniform(0, 0.2), rng.uniform(0.3, 1))
    return img, {"n": n, "film": film}


def _cracks(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    """Crease cracks: jagged, branching bright lines where the emulsion has flaked off."""
    h, w = img.shape[:2]
    n, mask = int(rng.integers(1, 5)), np.zeros((h, w), np.float32)
    for _ in range(n):
        starts = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * np.pi))]
        for b in range(int(rng.integers(1, 6))):
            x, y, ang = starts[int(rng.integers(len(starts)))] if b else starts[0]
            pts = []
            for _ in range(int(rng.integers(10, 60))):
                pts.append((int(x), int(y)))
                ang += rng.normal(0, 0.35)
                x, y = x + 0.012 * max(h, w) * np.cos(ang), y + 0.012 * max(h, w) * np.sin(ang)
            starts.append((x, y, ang + rng.normal(0, 0.8)))
            cv2.polylines(mask, [np.array(pts, np.int32)], False, 1.0, int(rng.integers(1, 4)), cv2.LINE_AA)
    p = {"n": n, "value": uniform(rng, 0.85, 1.0), "opacity": _span(rng, 0.4, 1.0, k)}
    return _paint(img, mask, p["value"], p["opacity"]), p


def _dust(img: F32, rng: Rng, k: float) -> tuple[F32, Recipe]:
    h, w = img.shape[:2]
    n, hairs = int(_span(rng, 20, 800, k) * h * w / 1e6) + 1, int(_span(rng, 0, 7, k))
    dark, light = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    for i in range(n + hairs):
        target = dark if rng.random() < 0.7 else light
        x, y = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        if i < n:
            cv2.circle(target, (x, y), int(rng.uniform(0.5, 3.0)), float(rng.uniform(0.4, 1)), -1, cv2.LINE_AA)
        else:  # a hair: a short curved stroke
            a0, L = rng.uniform(0, 2 * np.pi), rng.uniform(10, 60)
            pts = [
                (int(x + L * t * np.cos(a0 + 2 * t)), int(y + L * t * np.sin(a0 + 2 * t))) for t in np.linspace(0, 1, 8)
            ]
            cv2.polylines(target, [np.array(pts, np.int32)], False, 1.0, 1, cv2.LINE_AA)
    img = _paint(img, np.minimum(dark, 1), float(rng.uniform(0, 0.25)), 1.0)
    return _paint(img, np.minimum(light, 1), float(rng.uniform(0.85, 1.0)), 1.0), {
        "specks": n,
        "hairs": hairs,
    }


# (name, probability at severity 1, step); the damage steps after "fade" happen less often when mild.
_AGEING: tuple[tuple[str, float, Callable[[F32, Rng, float], tuple[F32, Recipe]]], ...] = (
    ("tone", 0.9, _tone),
    ("fade", 0.85, _fade),
    ("stains", 0.3, _stains),
    ("vignette", 0.6, _vignette),
    ("blur", 0.6, _blur),
    ("rescan", 0.6, _rescan),
    ("grain", 0.75, _grain),
    ("scratches", 0.55, _scratches),
    ("cracks", 0.18, _cracks),
    ("dust", 0.75, _dust),
)


def age(img: F32, rng: Rng, severity: float = 1.0) -> tuple[RGB8, Recipe]:
    """Age a float RGB image (H×W×3 in [0, 1]); returns uint8 RGB and the parameters of the steps taken."""
    if not 0 <= severity <= 1:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    k = 0.25 + 0.75 * severity
    # One child seed per step, drawn up front: switching a step on or off (or changing its
    # ranges) then leaves every other step's draws as they were, so old recipes stay comparable.
    seeds = rng.integers(0, 2**63, size=len(_AGEING) + 1)
    recipe: Recipe = {"severity": round(severity, 4)}
    for i, ((name, prob, step), s) in enumerate(zip(_AGEING, seeds, strict=False)):
        sub = np.random.default_rng(int(s))
        if sub.random() < (prob if i < 2 else prob * (0.4 + 0.6 * severity)):
            img, recipe[name] = step(img.astype(np.float32), sub, k)
            img = np.clip(img, 0, 1)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    sub = np.random.default_rng(int(seeds[-1]))
    if sub.random() < 0.85:
        quality = 95 - int(_span(sub, 0, 75, k))
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if decoded is None:
            raise RuntimeError("JPEG decoding failed")
        out = np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        recipe["jpeg"] = quality
    return np.ascontiguousarray(out, dtype=np.uint8), recipe
