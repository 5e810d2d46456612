"""Card mounts: the plain card around an old print, with an oval or rectangular window.

Measured on the eval (``bshm-watchd eval``): an oval window is itself a salient "object", and both
models matte the whole oval instead of the sitter (SAD 260 and 49 on two such cases); a rectangular
border is mistaken for the subject less often, but specks on the card leak into the matte. So a mount is
found first: its card colour from the four corners, the window's rim by walking rays from the
image's edge towards its centre while the pixels stay card-coloured, and an ellipse or a rectangle
fitted to the rim points robustly. A fit is only accepted when almost every rim point lies on it and
the pixels outside it are card. Then:

* oval: the models see the window's bounding box with the card painted in the print's colours just
  inside the rim, continued outwards (the oval disappears), and the matte is cut to the window: SAD
  260 → 59 and 49 → 23;
* rectangle: the models see the window's box, so the card is out of sight, and the matte is cut to the
  window. Seen with the card, isnet took a dark print in a light card for the subject and its answer was
  dropped (s14-021: 353 with the card in sight, 45 on the box). On 450 eval composites (15 seeds) the
  box moved 23 scans by more than 2: 14 better, 9 worse, mean SAD 23.96 → 22.81. Choosing per model the
  more trusted of the two views measured no better (22.82) for two more model calls a scan. A window
  found only by its straight edges, where the rays lose the card, is just cut to (``straight_window``).

Nothing is found (``None``) for scans without a uniform card at all four corners. When card and print
share one tone the rim cannot be seen in colour; then the model's own matte gives the oval away: a
matte that is an almost perfect large ellipse is the window, not a person (``window_in_matte``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.refine import disc

Mask = npt.NDArray[np.bool_]

CORNER = 0.015
"""Corner patches for the card colour, as a fraction of the longer side."""
TOLERANCE = 10.0
"""Lab distance under which a pixel is card (raised to twice the corners' own spread)."""
RAYS = 360
GAP = 4
"""Consecutive non-card pixels that end the card along a ray (grain and dust are shorter)."""
ON_RIM = 0.01
"""A rim point within this fraction of the longer side of the fitted shape is on it."""
MIN_ON_RIM = 0.8
MIN_CARD_OUTSIDE = 0.85
RIM_PAINT = 0.005
"""How far inside an oval window the card's paint reaches in the models' view (fraction of the side)."""
FILL_RING = (0.005, 0.02)
"""Where the paint's colours come from: the window between these depths inside its rim (fractions of the
side). The rim's outermost pixels blend print and card, and the fitted rim can lie a little outside the
print: sampled there, the paint came out lighter than a dark print and the oval stayed in sight (eval,
five oval cases: SAD 473 → 4, 26 → 9, 7 → 4, 13.9 → 14.5, 148 → 223, the last one failing either way)."""
FIT_PASSES = (8.0, 4.0, 2.0, 1.0, 1.0)
"""The ellipse fit's inlier tolerance in each pass, in units of ``ON_RIM``: wide at first, since the first
fit takes every rim point, the rays a crack or a stain on the card stopped early included."""
FILLED = 0.92
OUTVOTED = (0.8, 0.6)
"""A matte covering at least the first share of the window while the other model's covers under the second
took the print for the subject too (see ``Mount.outvoted``)."""
MIN_SIDE = 32
"""Scans narrower than this (pixels, either side) have no mount looked for: the corner patches, rays and
bands need room (an 8 × 8 scan left a straight edge's band empty and the fusion failed)."""
STRAIGHT_SPAN = 0.25
"""How deep into the scan (fraction of the side across) each side's card band and edge are looked for."""
STRAIGHT_BAND = 0.9
"""The share of a row within colour tolerance of the outermost strip for the row to be card."""
STRAIGHT_STEP = (4.0, 1.5)
"""A window's straight edge: its median colour step (Lab) at least the first, and at least the second times
the 90th percentile of the card band's own steps (grain, dust)."""
STRAIGHT_MIN_BAND = 0.01
"""The narrowest card band a straight-edged window is taken with (fraction of the longer side)."""
MIN_WINDOW_AREA = 0.2
MIN_WINDOW_IOU = 0.97
WINDOW_RETRY = (0.85, 0.012)
"""A matte whose ellipse fit reaches at least the first IoU, but not ``MIN_WINDOW_IOU``, is fitted again after an
opening of the second value × the side: a scratch across the rim, matted with the window, pulled the fit off
(eval s12-020: IoU 0.898, 0.990 opened)."""


@dataclass(frozen=True)
class Mount:
    kind: Literal["oval", "rect"]
    window: Mask
    """True inside the window (the print), False on the card."""
    box: tuple[int, int, int, int]
    """y0, y1, x0, x1 of the window."""
    ring: Mask
    """The band just inside the window's rim (``FILL_RING``) whose colours paint the card in the view."""
    crop: bool = True
    """Whether the models see the window's box (``view``) or the whole scan. Off for a window found by its
    straight edges alone (``straight_window``): there the card is close to the print's own colours and does
    not stand out as an object, and matting the box measured no better (see ``straight_window``)."""

    def view(self, rgb: RGB8) -> RGB8:
        """What the models see: the window's box, for an oval with the card painted over (the scan itself
        when ``crop`` is off).

        The paint continues the print's own colours outwards from ``ring`` (a push-pull fill: each card
        pixel takes the print's colours nearest to it, smoothly), so a print light at the top and dark
        at the bottom is not framed by one mid-grey oval. Painted one colour (the ring's median), the oval
        stayed in sight where the print was lighter or darker than that colour, and both models matted the
        window again (eval, 15 seeds × 30 composites: s7-021 222 with one colour, 32 with this paint; s14-013
        is lost either way, 255 → 271)."""
        if not self.crop:
            return rgb
        y0, y1, x0, x1 = self.box
        out = rgb[y0:y1, x0:x1].copy()
        if self.kind != "oval":
            return out
        # The paint reaches RIM_PAINT inside the window: the rim's own dark line, left visible, was
        # enough for isnet to matte the whole oval again (eval, three oval cases: isnet SAD 514 / 151 / 46
        # with the window painted exactly, 55 / 85 / 28 with the rim covered).
        inner = cv2.erode(self._window_in_view().astype(np.uint8), disc(RIM_PAINT * max(rgb.shape[:2]))) > 0
        paint = continued(out, self.ring[y0:y1, x0:x1])
        out[~inner] = paint[~inner]
        return out

    def covered(self, alpha: Alpha) -> float:
        """The share of the window (on the view's grid) where ``alpha`` > 0.5."""
        window = self._window_in_view()
        return float((alpha[window] > 0.5).mean()) if window.any() else 0.0

    def outvoted(self, alpha: Alpha, other: Alpha) -> bool:
        """Whether ``alpha`` took the print for the subject: it covers the window almost whole (``FILLED``,
        as ``filled_by``), or most of it (``OUTVOTED``) where the other model's matte covers far less. On
        the eval's mounted composites (89 with a mount found, 15 seeds) the sitter covers at most 0.72
        of the window, and the two models then agree (0.73, 0.78); an inverted matte of a dark print
        covered 0.84 against the other's 0.0, a selfie matte of a bokeh print 0.80 against 0.12."""
        mine = self.covered(alpha)
        return mine >= FILLED or (mine >= OUTVOTED[0] and self.covered(other) < OUTVOTED[1])

    def filled_by(self, alpha: Alpha) -> bool:
        """Whether a matte of the view covers the window almost whole (``FILLED``): the model took the
        print for the subject (isnet on a dark print in a light border: SAD 587, the sitter lighter than
        the matte's backdrop). In the eval's composites (63 scans with a mount found, 11 seeds) the sitter
        fills at most 0.67 of the window."""
        return self.covered(alpha) >= FILLED

    def _window_in_view(self) -> Mask:
        """The window on the view's grid (the window's box, or the scan when ``crop`` is off)."""
        if not self.crop:
            return self.window
        y0, y1, x0, x1 = self.box
        return self.window[y0:y1, x0:x1]

    def paste(self, alpha: Alpha, shape: tuple[int, int]) -> Alpha:
        """The view's alpha back on the scan's grid, cut to the window (its rim softened by a pixel)."""
        full = np.zeros(shape, np.float32)
        if self.crop:
            y0, y1, x0, x1 = self.box
            full[y0:y1, x0:x1] = alpha
        else:
            full[...] = alpha
        soft = cv2.GaussianBlur(self.window.astype(np.float32), (0, 0), 1.0)
        out: Alpha = full * soft
        return out


def _lab(rgb: RGB8) -> npt.NDArray[np.float32]:
    """The scan in Lab, lightly blurred (grain), as the card's colour is judged in."""
    lab: npt.NDArray[np.float32] = cv2.cvtColor(cv2.GaussianBlur(rgb, (0, 0), 1.5), cv2.COLOR_RGB2LAB).astype(
        np.float32)
    return lab


def card_mask(rgb: RGB8, lab: npt.NDArray[np.float32] | None = None) -> Mask | None:
    """Pixels of the corners' common colour; None when the four corners disagree (no card). ``lab``: the
    scan's ``_lab``, when the caller has it already."""
    h, w = rgb.shape[:2]
    lab = _lab(rgb) if lab is None else lab
    c = max(4, int(CORNER * max(h, w)))
    patches = [lab[:c, :c], lab[:c, -c:], lab[-c:, :c], lab[-c:, -c:]]
    medians = np.array([np.median(p.reshape(-1, 3), axis=0) for p in patches])
    card = np.median(medians, axis=0)
    if float(np.linalg.norm(medians - card, axis=1).max()) > TOLERANCE:
        return None
    spread = max(float(np.percentile(np.linalg.norm(p.reshape(-1, 3) - card, axis=1), 90)) for p in patches)
    mask = (np.linalg.norm(lab - card, axis=2) < max(TOLERANCE, 2.0 * spread)).astype(np.uint8)
    closed: Mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).astype(bool)
    return closed


def rim_points(card: Mask) -> npt.NDArray[np.float32]:
    """Where each ray from the edge towards the centre leaves the card (rays not starting on card skipped)."""
    h, w = card.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    theta = np.linspace(0, 2 * np.pi, RAYS, endpoint=False)
    dx, dy = np.cos(theta), np.sin(theta)
    with np.errstate(divide="ignore"):
        reach = np.minimum(np.abs((w / 2 - 1) / dx), np.abs((h / 2 - 1) / dy))
    t = np.arange(int(np.ceil(reach.max())) + 1)
    xs = np.clip(np.round(cx + dx[:, None] * t), 0, w - 1).astype(np.intp)
    ys = np.clip(np.round(cy + dy[:, None] * t), 0, h - 1).astype(np.intp)
    on_card = card[ys, xs]
    n = reach.astype(np.intp)
    inside = (t[None, :] >= 1) & (t[None, :] <= n[:, None])
    # A run of GAP non-card pixels ending at k: the outermost such k on each ray is where the card ends.
    run = np.cumsum(~on_card & inside, axis=1)
    run[:, GAP:] -= run[:, :-GAP].copy()
    ends = (run >= GAP) & inside
    has_run = ends.any(axis=1)
    r = np.where(has_run, ends.shape[1] - 1 - np.argmax(ends[:, ::-1], axis=1), 0)
    starts_on_card = on_card[np.arange(RAYS), n]
    # Skipped: rays not starting on card, the card reaching almost to the centre, no card band at all.
    keep = starts_on_card & has_run & (r >= 0.2 * reach) & (n - r >= 0.005 * max(h, w))
    points = np.stack([cx + dx[keep] * r[keep], cy + dy[keep] * r[keep]], axis=1)
    return np.asarray(points, np.float32).reshape(-1, 2)


def _fit_oval(points: npt.NDArray[np.float32], side: int) -> tuple[float, cv2.typing.RotatedRect]:
    """Share of rim points on a robustly fitted ellipse (``FIT_PASSES``, outliers dropped with a narrowing
    tolerance: with one tight tolerance from the start, cracks across a card pulled the first fit off the rim
    and the next kept 6 of 354 points)."""
    inliers = np.ones(len(points), bool)
    ellipse: cv2.typing.RotatedRect = ((0.0, 0.0), (1.0, 1.0), 0.0)
    for tolerance in FIT_PASSES:
        if inliers.sum() < 5:
            return 0.0, ellipse
        ellipse = cv2.fitEllipse(points[inliers])
        (ex, ey), (a1, a2), angle = ellipse
        if min(a1, a2) <= 1:
            return 0.0, ellipse
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        u = ((points[:, 0] - ex) * c + (points[:, 1] - ey) * s) / (a1 / 2)
        v = (-(points[:, 0] - ex) * s + (points[:, 1] - ey) * c) / (a2 / 2)
        inliers = np.abs(np.hypot(u, v) - 1) * min(a1, a2) / 2 < tolerance * ON_RIM * side
    return float(inliers.mean()), ellipse


def _fit_rect(points: npt.NDArray[np.float32], centre: tuple[float, float], side: int,
              ) -> tuple[float, tuple[float, float, float, float]]:
    """Share of rim points on the rectangle whose sides are the medians of the rim on each side."""
    ang = np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])
    right, left = np.abs(ang) < 0.5, np.abs(np.abs(ang) - np.pi) < 0.5
    bottom, top = np.abs(ang - np.pi / 2) < 0.5, np.abs(ang + np.pi / 2) < 0.5
    if min(int(m.sum()) for m in (right, left, bottom, top)) < 5:
        return 0.0, (0.0, 0.0, 0.0, 0.0)
    x0, x1 = float(np.median(points[left, 0])), float(np.median(points[right, 0]))
    y0, y1 = float(np.median(points[top, 1])), float(np.median(points[bottom, 1]))
    px, py, tol = points[:, 0], points[:, 1], ON_RIM * side
    dist = np.minimum.reduce([np.abs(px - x0), np.abs(px - x1), np.abs(py - y0), np.abs(py - y1)])
    inside = (px >= x0 - tol) & (px <= x1 + tol) & (py >= y0 - tol) & (py <= y1 + tol)
    return float(((dist < tol) & inside).mean()), (x0, y0, x1, y1)


def straight_window(rgb: RGB8, lab: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.uint8] | None:
    """A rectangular window found by its four straight edges, where the rays lost the card: a card close to
    the print's backdrop in colour (the rays walked on into the print) or darkened towards the corners by a
    vignette (the corners' colour no longer matched the card beside the window). Each side is turned to the
    top: the card band is the rows close in colour to the scan's outermost strip (``STRAIGHT_BAND`` of each
    row, its ends left out); the window's edge is the row, at most 2 % of the side past the band, across which
    the colour steps most (the median step along the row, so a sitter crossing the edge does not hide it). It
    must step by ``STRAIGHT_STEP`` ΔE and stand out from the band's own grain, the band must be at least
    ``STRAIGHT_MIN_BAND`` of the side, and the four outer strips must be one colour (a print's own backdrop
    that is plain at the top but a floor at the bottom is not a card).

    Eval, 15 seeds × 30 composites: rectangular mounts found 72 → 95 of 123, and none on the 290 composites
    without a mount; none either among the 40 old_photos scans. Matted as the box, the new finds measured
    22.81 → 22.79 (s6-002 54 → 3, s12-004 60 → 20; s4-019 20 → 115, s3-015 5 → 27); matted whole and only cut
    to the window, 22.81 → 22.70 (s12-004 60 → 14, s4-019 20 → 16, no case worse by more than 2): ``crop`` off.
    """
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        return None
    side = max(h, w)
    lab = _lab(rgb) if lab is None else lab
    k = 2  # the step is taken between rows i and i + 2k, the edge lying between them
    edges, strips = [], []
    for turn in range(4):  # top, right, bottom, left, each turned to the top
        a = np.rot90(lab, turn)
        n, m = a.shape[:2]
        span, lo, hi = int(STRAIGHT_SPAN * n), int(0.1 * m), m - int(0.1 * m)
        depth = max(2, int(0.004 * side))
        strip = np.median(a[1:1 + depth], axis=0)  # the outermost strip (row 0 may be the scanner's edge)
        strip = cv2.blur(strip[None], (max(3, int(0.05 * m)) | 1, 1))[0]
        dist = np.linalg.norm(a[:span, lo:hi] - strip[None, lo:hi], axis=2)
        tolerance = max(TOLERANCE, 2.0 * float(np.percentile(dist[1:1 + 2 * depth], 90)))
        off_card = np.nonzero((dist < tolerance).mean(axis=1) < STRAIGHT_BAND)[0]
        band = int(off_card[0]) if len(off_card) else span
        diff = np.linalg.norm(a[2 * k:span, lo:hi] - a[:span - 2 * k, lo:hi], axis=2)
        step = np.median(diff, axis=1)
        first, stop = max(1, int(STRAIGHT_MIN_BAND * side) - k), min(len(step), band + int(0.02 * side))
        if stop <= first:
            return None
        i = first + int(np.argmax(step[first:stop]))
        grain = diff[:max(1, i - k)]
        if step[i] < max(STRAIGHT_STEP[0], STRAIGHT_STEP[1] * float(np.percentile(grain, 90))):
            return None
        edges.append(i + k)
        strips.append(np.median(strip[lo:hi], axis=0))
    colours = np.array(strips)
    if float(np.linalg.norm(colours - np.median(colours, axis=0), axis=1).max()) > 2 * TOLERANCE:
        return None
    top, right, bottom, left = edges
    window = np.zeros((h, w), np.uint8)
    window[top:h - bottom, left:w - right] = 1
    return window if window.mean() >= 0.4 else None


def find_mount(rgb: RGB8) -> Mount | None:
    """The scan's card mount, or None: rim points fitted by an oval or a rectangle, else four straight edges."""
    if min(rgb.shape[:2]) < MIN_SIDE:
        return None
    lab = _lab(rgb)
    card = card_mask(rgb, lab)
    if card is None:
        return None
    points = rim_points(card)
    found = _fitted(rgb, card, points) if len(points) >= 0.6 * RAYS else None
    if found is not None:
        return found
    window = straight_window(rgb, lab)
    if window is None or cv2.dilate(window, np.ones((7, 7), np.uint8)).mean() > 0.98:
        return None  # no window, or next to no card outside it
    return _mount("rect", window, rgb, crop=False)


def _fitted(rgb: RGB8, card: Mask, points: npt.NDArray[np.float32]) -> Mount | None:
    """The oval or rectangle that the rim points fit best, when almost all lie on it and card lies outside."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    oval_score, ellipse = _fit_oval(points, side)
    rect_score, rect = _fit_rect(points, ((w - 1) / 2, (h - 1) / 2), side)
    window = np.zeros((h, w), np.uint8)
    kind: Literal["oval", "rect"]
    if oval_score >= rect_score:
        kind, score = "oval", oval_score
        cv2.ellipse(window, ellipse, 1, -1)
    else:
        kind, score = "rect", rect_score
        x0, y0, x1, y1 = (round(v) for v in rect)
        window[max(0, y0):y1 + 1, max(0, x0):x1 + 1] = 1
    outside = ~cv2.dilate(window, np.ones((7, 7), np.uint8)).astype(bool)
    if score < MIN_ON_RIM or outside.mean() < 0.02 or card[outside].mean() < MIN_CARD_OUTSIDE:
        return None
    return _mount(kind, window, rgb)


def window_in_matte(alpha: Alpha, rgb: RGB8) -> Mount | None:
    """An oval window the model took for the subject: its matte *is* an ellipse (IoU ≥ 0.97) covering
    a fifth of the scan or more. Catches the mounts ``find_mount`` misses (card and print of one tone):
    measured IoU 0.998 on such a case, at most 0.85 for isnet on 59 people (0.90 for selfie)."""
    window = window_shape(alpha)
    return None if window is None else _mount("oval", window, rgb)


def window_shape(alpha: Alpha) -> npt.NDArray[np.uint8] | None:
    """The ellipse the matte is (1 inside), when it is a large, almost perfect one; else None. A fit close to
    it is tried again without the matte's thin parts (``WINDOW_RETRY``)."""
    mask = (alpha > 0.5).astype(np.uint8)
    if mask.mean() < MIN_WINDOW_AREA:
        return None
    window, iou = _ellipse_fit(mask)
    if WINDOW_RETRY[0] <= iou < MIN_WINDOW_IOU:
        opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, disc(WINDOW_RETRY[1] * max(mask.shape)))
        window, iou = _ellipse_fit(np.asarray(opened, np.uint8))
    return window if iou >= MIN_WINDOW_IOU else None


def _ellipse_fit(mask: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], float]:
    """The filled ellipse fitted to the mask's largest outline, and its IoU with the mask (0 without one)."""
    window = np.zeros_like(mask)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return window, 0.0
    contour = max(contours, key=cv2.contourArea)
    if len(contour) < 5:
        return window, 0.0
    cv2.ellipse(window, cv2.fitEllipse(contour), 1, -1)
    return window, float((window & mask).sum() / max(1, (window | mask).sum()))


def _mount(kind: Literal["oval", "rect"], window: npt.NDArray[np.uint8], rgb: RGB8, *, crop: bool = True) -> Mount:
    side = max(rgb.shape[:2])
    ring = cv2.erode(window, disc(FILL_RING[0] * side)).astype(bool) & \
        ~cv2.erode(window, disc(FILL_RING[1] * side)).astype(bool)
    ys, xs = np.nonzero(window)
    return Mount(kind=kind, window=window.astype(bool),
                 box=(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1), ring=ring, crop=crop)


def continued(rgb: RGB8, known: Mask) -> RGB8:
    """``rgb`` with every pixel outside ``known`` filled by a push-pull pyramid: halve the known pixels'
    colours (each weighted by how much of it is known) down to a few pixels, then go back up, each level
    keeping what it knows and taking the coarser level's colour for the rest. Smooth, and each pixel takes
    the colours of the known pixels nearest to it; ``known`` empty gives the image's mean colour."""
    weight: npt.NDArray[Any] = known.astype(np.float32)
    value: npt.NDArray[Any] = rgb.astype(np.float32) * weight[..., None]
    levels = [(value, weight)]
    while min(weight.shape) > 4:
        size = ((weight.shape[1] + 1) // 2, (weight.shape[0] + 1) // 2)
        value = cv2.resize(value, size, interpolation=cv2.INTER_AREA)
        weight = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
        levels.append((value, weight))
    mean = rgb[known].mean(axis=0) if known.any() else rgb.reshape(-1, 3).mean(axis=0)
    value, weight = levels[-1]
    filled = np.where(weight[..., None] > 1e-6, value / np.maximum(weight, 1e-6)[..., None],
                      mean.astype(np.float32))
    for value, weight in reversed(levels[:-1]):
        coarse = cv2.resize(filled, (weight.shape[1], weight.shape[0]), interpolation=cv2.INTER_LINEAR)
        own = value / np.maximum(weight, 1e-6)[..., None]
        share = np.clip(weight, 0.0, 1.0)[..., None]
        filled = share * own + (1.0 - share) * coarse
    out: RGB8 = np.clip(filled + 0.5, 0, 255).astype(np.uint8)
    return out
