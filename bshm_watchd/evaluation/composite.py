"""Aged composites of portraits with exact alpha truth: the cases of the matting benchmark.

Case ``index`` of ``make_cases(seed=S)`` draws everything from ``numpy.random.default_rng([S, index])``
and records each drawn parameter in ``Case.recipe``. Portraits are used in turn (case i uses
portrait i mod P); backdrop kinds follow a per-seed permutation, shifted each round, so the
variants of one portrait get different backdrops. The recipe, in order:

1. frame: the portrait, resized to a long side of ``max_side`` (never enlarged), is optionally
   cropped (p 0.5; each side kept 60–100 %, only when ≥ 70 % of the alpha mass stays), then, for a
   small subject (p 0.3, from a stream of its own so the other cases stay as they were), set on a
   wider canvas where it takes 40–75 % of each axis it does not span (a person cut by the bottom edge
   stays on it; no canvas longer than 2.2:1), then resized to a long side of 40–100 % of ``max_side``
   (less any mount border). Image, foreground and alpha get the same crop, padding and resize, so the
   alpha stays exact. With ``groups`` > 0 a case is, with that probability (its own stream again), a
   **group** instead: 2–3 different portraits, each cut to its person's columns (plus 5 %), scaled to
   75–100 % of the tallest, standing on the bottom edge side by side, each overlapping the one before by
   0–25 % of its width, in a drawn depth order (the front one's alpha over the others'), on a canvas
   with 3–15 % room at each side and up to 15 % above (at least enough to stay within 2.2:1), resized
   like the single portraits. A person their portrait cuts at the top spans the canvas's height (and the
   canvas gets no room above); one cut at the left or right stands at that end with no room beside it,
   and a portrait cut at both sides is left out of groups, so no cut edge shows inside the picture.
   ``groups`` is 0 by default, so the seeds' cases are those of earlier versions.
2. foreground colours: pymatting ``estimate_foreground_ml`` once per portrait on the resized copy,
   so soft hair does not carry the old background into the new one.
3. backdrop (``BACKDROPS``): studio (mottled painted), scenery (painted sky, horizon, trees),
   gradient (linear or radial), dark, light, interior (blurred or sharp rectangles), texture
   (noise, fabric weave, wallpaper), planks, foliage (busy blobs), clothes (the tone of the
   subject's own clothes, mottled). Its brightness is then shifted, if need be, so the subject's
   rim and the backdrop beside it differ by ≥ 0.12 in luma (``keep_apart``).
4. composite ``I = αF + (1 − α)B`` in sRGB [0, 1].
5. mount (geometry, so the alpha follows): an oval window in a card (p 0.12; alpha × window), then
   a card border (p 0.3, 2–10 % of the side; alpha padded with 0).
6. ageing (image only; ``ageing.age``) at a severity drawn uniformly from ``severity``: tone
   (p 0.9: faded colour with a yellow cast 0.3, mono 0.22, sepia 0.3, cyanotype 0.06, hand-tinted
   0.12), fade (p 0.85: blacks lifted 0–0.3, whites capped 0.7–1, gamma 0.7–1.4), then, each less
   likely and milder at low severity: stains, vignette (dark or paper-light), blur (σ 0.3–2.5 px per
   1024 px), rescan (down to 20–90 % then back up), film grain, scratches, crease cracks, dust and
   hairs, JPEG re-compression (quality 20–95).
   No rotation or warp: the alpha would no longer be exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.errors import BshmError
from bshm_watchd.evaluation.ageing import age
from bshm_watchd.evaluation.backdrops import (
    BACKDROPS,
    F32,
    Recipe,
    Rng,
    backdrop,
    bounded,
    clothes_colour,
    f32,
    keep_apart,
    rand_rgb,
    resize,
    uniform,
)
from bshm_watchd.fsutil import write_bytes_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")


@dataclass(frozen=True, eq=False)
class Case:
    """One benchmark case: an RGB image, the exact alpha of the people in it, and how it was made."""

    name: str
    image: RGB8
    alpha: Alpha
    recipe: Recipe = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"{self.name}: image must be H×W×3 uint8, got {self.image.dtype} {self.image.shape}")
        if self.alpha.dtype != np.float32 or self.alpha.shape != self.image.shape[:2]:
            raise ValueError(f"{self.name}: alpha must be H×W float32 matching the image, got {self.alpha.shape}")


# ------------------------------------------------------- geometry (image, foreground and alpha alike)


def _draw_mount(rng: Rng) -> Recipe:
    mount: Recipe = {}
    if rng.random() < 0.12:
        mount["oval"] = {
            "rx": uniform(rng, 0.38, 0.5),
            "ry": uniform(rng, 0.4, 0.5),
            "soft": uniform(rng, 0.5, 4.0),
        }
    if rng.random() < 0.3:
        mount["border"] = uniform(rng, 0.02, 0.1)
    mount["card"] = rand_rgb(rng, 0.05, 0.95, sat=0.3)
    return mount


def _draw_frame(rng: Rng, alpha: Alpha, max_side: int, border: float, pad_rng: Rng) -> Recipe:
    h, w = alpha.shape
    crop = [0, 0, w, h]
    if rng.random() < 0.5:
        total = float(alpha.sum())
        for _ in range(5):  # a crop that loses most of the person would be a different benchmark
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            if float(alpha[y0 : y0 + ch, x0 : x0 + cw].sum()) >= 0.7 * total:
                crop = [x0, y0, x0 + cw, y0 + ch]
                break
    pad = _draw_pad(pad_rng, alpha[crop[1] : crop[3], crop[0] : crop[2]])
    long_side = max_side * uniform(rng, 0.4, 1.0) / (1 + 2 * border)
    frame: Recipe = {"work": [w, h], "crop": crop}
    if pad is not None:
        frame["pad"] = pad
    top, bottom, left, right = pad or (0, 0, 0, 0)
    frame["size"] = list(bounded(crop[2] - crop[0] + left + right, crop[3] - crop[1] + top + bottom, long_side))
    return frame


def _draw_pad(rng: Rng, alpha: Alpha) -> list[int] | None:
    """The small-subject framing (p 0.3): the cropped portrait on a wider canvas, the person taking 40–75 %
    of it along each axis the person does not already span; the new room goes to the side the person
    does not touch (a person cut by the bottom edge stays on it), split at random when it touches neither."""
    if rng.random() >= 0.3:
        return None
    share = uniform(rng, 0.4, 0.75)
    h, w = alpha.shape
    pad = [0, 0, 0, 0]  # top, bottom, left, right
    for axis, (lo_edge, hi_edge), length, other in ((0, (alpha[:2], alpha[-2:]), h, w),
                                                    (1, (alpha[:, :2], alpha[:, -2:]), w, h)):
        lo, hi = float(lo_edge.max()) > 0.5, float(hi_edge.max()) > 0.5
        if lo and hi:
            continue
        extra = min(length / share - length, 2.2 * other - length)  # no canvas longer than 2.2:1
        if extra <= 0:
            continue
        first = extra if hi else 0.0 if lo else extra * float(rng.uniform(0.2, 0.8))
        pad[2 * axis], pad[2 * axis + 1] = round(first), round(extra - first)
    return pad if any(pad) else None


def _reframe(arr: F32, frame: Recipe) -> F32:
    """Crop, pad (zeros: no person there) and resize a working-size array the way ``frame`` says."""
    x0, y0, x1, y1 = frame["crop"]
    arr = arr[y0:y1, x0:x1]
    if "pad" in frame:
        top, bottom, left, right = frame["pad"]
        arr = np.pad(arr, ((top, bottom), (left, right)) + ((0, 0),) * (arr.ndim - 2))
    return np.ascontiguousarray(np.clip(resize(arr, frame["size"]), 0.0, 1.0), dtype=np.float32)


def _oval_window(h: int, w: int, oval: Recipe) -> F32:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    d = np.hypot((xx - w / 2) / (oval["rx"] * w), (yy - h / 2) / (oval["ry"] * h))
    inside_px = (1 - d) * min(oval["rx"] * w, oval["ry"] * h)  # ≈ distance to the rim, in pixels
    return f32(np.clip(0.5 + inside_px / oval["soft"], 0, 1))


def _border_px(h: int, w: int, mount: Recipe) -> int:
    return round(float(mount.get("border", 0.0)) * max(h, w))


def mount_alpha(alpha: Alpha, mount: Recipe) -> Alpha:
    """The alpha seen through the mount: × the oval window, padded with 0 under the card border."""
    h, w = alpha.shape
    if "oval" in mount:
        alpha = alpha * _oval_window(h, w, mount["oval"])
    b = _border_px(h, w, mount)
    return np.pad(alpha, b).astype(np.float32) if b else alpha.astype(np.float32)


def _mount_image(img: F32, mount: Recipe) -> F32:
    h, w = img.shape[:2]
    card = np.asarray(mount["card"], np.float32)
    if "oval" in mount:
        win = _oval_window(h, w, mount["oval"])[..., None]
        img = img * win + card * (1 - win)
    b = _border_px(h, w, mount)
    if b:
        img = np.pad(img, ((b, b), (b, b), (0, 0)))
        img[:b], img[-b:], img[:, :b], img[:, -b:] = card, card, card, card
    return img.astype(np.float32)


def truth_alpha(source_alpha: Alpha | Mapping[str, Alpha], recipe: Recipe) -> Alpha:
    """Recompute a case's alpha from its full-size source alpha and the recipe: the same exact ops. A group's
    recipe needs its members' source alphas, by source name."""
    frame = recipe["frame"]
    if "group" in frame:
        if not isinstance(source_alpha, Mapping):
            raise ValueError("a group's truth needs its members' source alphas by name")
        alphas = [resize(source_alpha[m["source"]], m["work"]) for m in frame["group"]]
        alpha, _ = _group_layers(alphas, None, frame)
    else:
        if isinstance(source_alpha, Mapping):
            source_alpha = source_alpha[recipe["source"]]
        alpha = _reframe(resize(source_alpha, frame["work"]), frame)
    return mount_alpha(alpha, recipe["mount"])


# ---------------------------------------------------------------- groups


def _touches(alpha: Alpha) -> dict[str, bool]:
    """Which edges of its frame the person runs into (α > 0.5 within 2 px of it)."""
    return {"top": bool(alpha[:2].max() > 0.5), "left": bool(alpha[:, :2].max() > 0.5),
            "right": bool(alpha[:, -2:].max() > 0.5)}


def _draw_group(rng: Rng, index: int, edges: list[dict[str, bool]], groups: float) -> list[int] | None:
    """Source indices of a group, left to right, or None: 2–3 different portraits, taken in turn from the case's
    own on (the case's name is the leftmost's).

    A person cut by the left or right edge of their portrait can only stand at that end of the group, with
    the cut on the canvas's edge; portraits that cannot be placed so are passed over. ``edges``: each source's
    ``_touches``."""
    if groups <= 0 or len(edges) < 2 or rng.random() >= groups:
        return None
    k = int(rng.integers(2, 4))
    left: int | None = None
    right: int | None = None
    middle: list[int] = []
    for j in range(len(edges)):
        i = (index + j) % len(edges)
        t = edges[i]
        if t["left"] and t["right"]:
            continue
        if t["left"] and left is None:
            left = i
        elif t["right"] and right is None:
            right = i
        elif not (t["left"] or t["right"]):
            middle.append(i)
        else:
            continue
        if len(middle) + (left is not None) + (right is not None) == k:
            break
    order = ([left] if left is not None else []) + middle + ([right] if right is not None else [])
    return order if len(order) >= 2 else None


def _person_cols(alpha: Alpha) -> tuple[int, int]:
    """The columns the person takes (α > 0.5), plus 5 % of that width each side; all of them if none."""
    cols = np.nonzero(alpha.max(axis=0) > 0.5)[0]
    w = alpha.shape[1]
    if cols.size == 0:
        return 0, w
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    margin = round(0.05 * (c1 - c0))
    return max(0, c0 - margin), min(w, c1 + margin)


def _draw_group_frame(rng: Rng, alphas: list[Alpha], names: list[str], touches: list[dict[str, bool]],
                      max_side: int, border: float) -> Recipe:
    tallest = max(a.shape[0] for a in alphas)
    members: list[Recipe] = []
    x = right = 0.0
    for name, a, t in zip(names, alphas, touches, strict=True):
        c0, c1 = _person_cols(a)  # a cut side keeps its cut: it is the canvas's edge
        c0, c1 = 0 if t["left"] else c0, a.shape[1] if t["right"] else c1
        # a person cut by the top of their portrait reaches the canvas's top, cut there too
        scale = tallest * (1.0 if t["top"] else uniform(rng, 0.75, 1.0)) / a.shape[0]
        size = [max(1, round((c1 - c0) * scale)), max(1, round(a.shape[0] * scale))]
        members.append({"source": name, "work": [a.shape[1], a.shape[0]], "cols": [c0, c1], "size": size,
                        "x": round(x), "y": tallest - size[1]})
        right = max(right, round(x) + size[0])
        x = round(x) + size[0] * (1 - uniform(rng, 0.0, 0.25))
    left = 0 if touches[0]["left"] else round(right * uniform(rng, 0.03, 0.15))
    rgt = 0 if touches[-1]["right"] else round(right * uniform(rng, 0.03, 0.15))
    width = int(right) + left + rgt
    top = 0 if any(t["top"] for t in touches) else max(round(tallest * uniform(rng, 0.0, 0.15)),
                                                       int(np.ceil(width / 2.2)) - tallest)
    long_side = max_side * uniform(rng, 0.4, 1.0) / (1 + 2 * border)
    return {"group": members, "order": [int(i) for i in rng.permutation(len(members))],
            "canvas": [width, tallest + top], "offset": [left, top],
            "size": list(bounded(width, tallest + top, long_side))}


def _group_layers(alphas: list[Alpha], fgs: list[F32] | None, frame: Recipe) -> tuple[F32, F32 | None]:
    """The group's alpha (and foreground colours) at ``frame["size"]``: each member, back to front in
    ``frame["order"]``, laid over the ones behind it; alpha and premultiplied colour are resized together."""
    width, height = frame["canvas"]
    left, top = frame["offset"]
    acc = np.zeros((height, width), np.float32)
    pre = np.zeros((height, width, 3), np.float32) if fgs is not None else None
    for j in frame["order"]:
        m = frame["group"][j]
        c0, c1 = m["cols"]
        a = f32(np.clip(resize(alphas[j][:, c0:c1], m["size"]), 0.0, 1.0))
        x0, y0 = left + m["x"], top + m["y"]
        region = (slice(y0, y0 + a.shape[0]), slice(x0, x0 + a.shape[1]))
        if pre is not None and fgs is not None:
            fg = f32(np.clip(resize(fgs[j][:, c0:c1], m["size"]), 0.0, 1.0))
            pre[region] = a[..., None] * fg + (1 - a[..., None]) * pre[region]
        acc[region] = a + (1 - a) * acc[region]
    alpha = np.ascontiguousarray(np.clip(resize(acc, frame["size"]), 0.0, 1.0), dtype=np.float32)
    if pre is None:
        return alpha, None
    pre = f32(resize(pre, frame["size"]))
    fg = np.clip(pre / np.maximum(alpha, 1e-6)[..., None], 0.0, 1.0)
    return alpha, np.ascontiguousarray(np.where(alpha[..., None] > 0, fg, 0.0), dtype=np.float32)


# ---------------------------------------------------------------- cases


def _foreground(image: RGB8, alpha: Alpha) -> F32:
    from pymatting import estimate_foreground_ml

    fg = estimate_foreground_ml(image.astype(np.float64) / 255.0, alpha.astype(np.float64))
    return f32(np.clip(fg, 0, 1))


def make_cases(
    data_dir: Path, n: int, seed: int, max_side: int = 1024, severity: tuple[float, float] = (0.0, 1.0),
    groups: float = 0.0,
) -> list[Case]:
    """``n`` aged composites (recipe: module docstring) from the image/ + alpha/ pairs under ``data_dir``.

    Deterministic for ``(data_dir contents, n, seed, max_side, severity, groups)``; case i is the same
    whatever ``n``. Each case's ageing severity is uniform in the ``severity`` range; ``groups`` is the
    probability that a case is a group of 2–3 portraits.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= severity[0] <= severity[1] <= 1:
        raise ValueError(f"severity must be a range within [0, 1], got {severity}")
    if max_side < 64:
        raise ValueError(f"max_side must be at least 64, got {max_side}")
    if not 0 <= groups <= 1:
        raise ValueError(f"groups must be a probability in [0, 1], got {groups}")
    sources = load_pairs(data_dir)
    order = np.random.default_rng([seed, 0x6B696E64]).permutation(len(BACKDROPS))
    edges = [_touches(s.alpha) for s in sources] if groups > 0 else []
    work: dict[str, tuple[Alpha, F32]] = {}  # per portrait: working alpha and foreground
    cases = []

    def working(src: Case) -> tuple[Alpha, F32]:
        if src.name not in work:
            h, w = src.alpha.shape
            size = bounded(w, h, max_side)
            img_w, alpha_w = resize(src.image, size), f32(resize(src.alpha, size))
            work[src.name] = (alpha_w, _foreground(img_w, alpha_w))
        return work[src.name]

    for index in range(n):
        src = sources[index % len(sources)]
        kind = BACKDROPS[int(order[(index + index // len(sources)) % len(BACKDROPS)])]
        rng = np.random.default_rng([seed, index])
        mount = _draw_mount(rng)
        border = float(mount.get("border", 0.0))
        # Groups and the framing's padding draw from streams of their own, so the cases that have neither
        # are those of earlier versions.
        group_rng = np.random.default_rng([seed, index, 0x67726F7570])
        members = _draw_group(group_rng, index, edges, groups)
        if members is not None:
            parts = [working(sources[m]) for m in members]
            frame = _draw_group_frame(group_rng, [p[0] for p in parts], [sources[m].name for m in members],
                                      [edges[m] for m in members], max_side, border)
            a, group_fg = _group_layers([p[0] for p in parts], [p[1] for p in parts], frame)
            assert group_fg is not None
            fg = group_fg
        else:
            alpha_w, fg_w = working(src)
            frame = _draw_frame(rng, alpha_w, max_side, border, np.random.default_rng([seed, index, 0x706164]))
            a, fg = _reframe(alpha_w, frame), _reframe(fg_w, frame)
        bg, bg_params = backdrop(kind, rng, a.shape[0], a.shape[1], clothes_colour(fg, a))
        bg, bg_params["shift"] = keep_apart(bg, fg, a)
        comp = _mount_image(a[..., None] * fg + (1 - a[..., None]) * bg, mount)
        image, ageing = age(comp, rng, uniform(rng, *severity))
        recipe = {
            "seed": seed,
            "index": index,
            "source": src.name if members is None else "+".join(sources[m].name for m in members),
            "frame": frame,
            "mount": mount,
            "backdrop": bg_params,
            "age": ageing,
        }
        label = src.name if members is None else f"{sources[members[0]].name}-group{len(members)}"
        cases.append(Case(f"{label}-s{seed}-{index:03d}-{kind}", image, mount_alpha(a, mount), recipe))
    return cases


# ---------------------------------------------------------------- folders of image/ + alpha/ pairs


def save_cases(cases: list[Case], out_dir: Path) -> None:
    """Write ``image/NAME.png`` (8-bit RGB), ``alpha/NAME.png`` (16-bit grey) and ``recipe.json``."""
    recipes: dict[str, Recipe] = {}
    for case in cases:
        if "/" in case.name or case.name.startswith("."):
            raise ValueError(f"case name {case.name!r} is not a plain file name")
        ok_i, img = cv2.imencode(".png", cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR))
        ok_a, alp = cv2.imencode(".png", (np.clip(case.alpha, 0, 1) * 65535 + 0.5).astype(np.uint16))
        if not (ok_i and ok_a):
            raise BshmError(f"{case.name}: PNG encoding failed")
        write_bytes_atomic(out_dir / "image" / f"{case.name}.png", img.tobytes())
        write_bytes_atomic(out_dir / "alpha" / f"{case.name}.png", alp.tobytes())
        recipes[case.name] = case.recipe
    write_bytes_atomic(out_dir / "recipe.json", json.dumps(recipes, indent=1, sort_keys=True).encode())


def _read_alpha(path: Path) -> Alpha:
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNG
            return (np.asarray(im, dtype=np.float32) / 65535.0).clip(0, 1).astype(np.float32)
        if im.mode in ("LA", "RGBA", "PA"):
            return np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def load_pairs(directory: Path, max_side: int | None = None) -> list[Case]:
    """Cases from ``directory/image/*`` with ``directory/alpha/STEM.*`` as truth (and ``recipe.json`` if any).

    ``max_side`` shrinks both (area interpolation) so large held-out sets stay quick to score.
    """
    img_dir, alpha_dir = directory / "image", directory / "alpha"
    if not img_dir.is_dir() or not alpha_dir.is_dir():
        raise BshmError(f"{directory}: expected image/ and alpha/ folders")
    recipe_file = directory / "recipe.json"
    recipes: dict[str, Recipe] = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    alphas: dict[str, Path] = {}
    for p in sorted(alpha_dir.iterdir()):  # a lossless .png wins over a same-stem .jpg
        if p.suffix.lower() in IMAGE_SUFFIXES and (p.stem not in alphas or p.suffix.lower() == ".png"):
            alphas[p.stem] = p
    cases = []
    for path in sorted(img_dir.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem not in alphas:
            raise BshmError(f"{path}: no alpha for it in {alpha_dir}")
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        alpha = _read_alpha(alphas[path.stem])
        if alpha.shape != image.shape[:2]:
            raise BshmError(
                f"{path}: image is {image.shape[1]}×{image.shape[0]}, alpha {alpha.shape[1]}×{alpha.shape[0]}"
            )
        if max_side is not None:
            size = bounded(alpha.shape[1], alpha.shape[0], max_side)
            image, alpha = resize(image, size), resize(alpha, size)
        recipe = recipes.get(path.stem, {"source": str(path)})
        cases.append(Case(path.stem, np.ascontiguousarray(image), np.ascontiguousarray(alpha, np.float32), recipe))
    if not cases:
        raise BshmError(f"{img_dir}: no images")
    return cases
