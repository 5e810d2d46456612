"""Tests for card-mount detection and its use in the fusion pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from bshm_watchd.engine import mount as mount_mod
from bshm_watchd.engine.fusion import FusionMatter, FusionParams
from bshm_watchd.engine.mount import Mount, find_mount

PORTRAITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "portraits"
U8 = npt.NDArray[np.uint8]


def _print(h: int, w: int, seed: int) -> U8:
    """A busy 'photograph': a smooth random backdrop, a dark bust touching the bottom, grain."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(40, 220, (6, 6, 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    cv2.ellipse(img, (w // 2, h), (w // 3, h // 2), 0, 0, 360, (30, 25, 20), -1)
    cv2.circle(img, (w // 2, h // 2 - h // 10), h // 7, (170, 140, 120), -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _mounted(kind: str, h: int = 600, w: int = 450, seed: int = 0) -> tuple[U8, npt.NDArray[np.bool_]]:
    img = _print(h, w, seed)
    window = np.zeros((h, w), np.uint8)
    if kind == "oval":
        cv2.ellipse(window, (w // 2, h // 2), (int(0.44 * w), int(0.46 * h)), 0, 0, 360, 1, -1)
    else:
        b = int(0.06 * h)
        window[b:-b, b:-b] = 1
    card = np.array([190, 175, 150], np.float32)
    grain = np.random.default_rng(seed + 1).normal(0, 4, img.shape).astype(np.float32)
    out = np.where(window[..., None].astype(bool), img, np.clip(card + grain, 0, 255)).astype(np.uint8)
    return out, window.astype(bool)


def _close_card(h: int = 600, w: int = 450, b: int = 30) -> tuple[U8, npt.NDArray[np.bool_]]:
    """A rectangular window in a card 6-7 ΔE from the print's backdrop, a dark bust cut by its lower rim."""
    img = np.zeros((h, w, 3), np.float32)
    img[...] = (150, 140, 120)  # the card
    img[b:-b, b:-b] = (158, 146, 124)  # the print's backdrop
    window = np.zeros((h, w), bool)
    window[b:-b, b:-b] = True
    bust = np.zeros((h, w), np.uint8)
    cv2.ellipse(bust, (w // 2, h - b), (w // 4, h // 3), 0, 0, 360, 1, -1)
    img[(bust > 0) & window] = (40, 35, 30)
    img += np.random.default_rng(0).normal(0, 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), window


def _iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


class TestFindMount:
    @pytest.mark.parametrize("kind", ["oval", "rect"])
    def test_finds_window(self, kind: str) -> None:
        """An oval or rectangular window in a plain card is found, of the right kind and shape."""
        img, truth = _mounted(kind)
        mount = find_mount(img)
        assert mount is not None and mount.kind == kind
        assert _iou(mount.window, truth) >= 0.97

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_no_card_no_mount(self, seed: int) -> None:
        """A print without a card (busy corners, or a plain backdrop with a bust) has no mount."""
        assert find_mount(_print(600, 450, seed)) is None
        plain = np.full((600, 450, 3), 200, np.uint8)
        cv2.ellipse(plain, (225, 600), (150, 300), 0, 0, 360, (30, 30, 30), -1)
        cv2.circle(plain, (225, 240), 80, (150, 120, 100), -1)
        assert find_mount(plain) is None

    def test_oval_view_and_paste(self) -> None:
        """The oval's view is its box with the card painted over; paste puts alpha back, zero on the card."""
        img, truth = _mounted("oval")
        mount = find_mount(img)
        assert mount is not None
        view = mount.view(img)
        y0, y1, x0, x1 = mount.box
        assert view.shape == (y1 - y0, x1 - x0, 3)
        window = mount.window[y0:y1, x0:x1].astype(np.uint8)
        # The card is gone from the view: just outside the rim the view goes on in the print's colours.
        outside = (cv2.dilate(window, np.ones((9, 9), np.uint8)) > 0) & (window == 0)
        inside = (window > 0) & (cv2.erode(window, np.ones((9, 9), np.uint8)) == 0)
        card = np.array([190, 175, 150], np.float32)
        ring_gap = np.abs(view[outside].mean(axis=0) - view[inside].mean(axis=0)).max()
        assert ring_gap < 12 and np.abs(view[outside].mean(axis=0) - card).max() > 3 * ring_gap
        assert (view[window > 0] == img[y0:y1, x0:x1][window > 0]).mean() > 0.95  # the print itself untouched
        back = mount.paste(np.ones(view.shape[:2], np.float32), img.shape[:2])
        assert back.shape == img.shape[:2]
        assert back[~cv2.dilate(truth.astype(np.uint8), np.ones((13, 13), np.uint8)).astype(bool)].max() == 0.0
        assert back[cv2.erode(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)].min() > 0.99

    def test_rect_view_and_paste(self) -> None:
        """A rectangular window's view is the scan cut to the window's box, unpainted (the card is outside it);
        paste puts alpha back in place, zero on the card. Matted with the card in sight, isnet took the whole
        print for the subject (eval, s14-021: SAD 353, 45 matted as the crop)."""
        img, truth = _mounted("rect")
        mount = find_mount(img)
        assert mount is not None and mount.kind == "rect"
        view = mount.view(img)
        y0, y1, x0, x1 = mount.box
        assert view.shape == (y1 - y0, x1 - x0, 3)
        assert np.array_equal(view, img[y0:y1, x0:x1])
        assert mount.window[y0:y1, x0:x1].mean() > 0.97  # next to no card left in sight
        back = mount.paste(np.ones(view.shape[:2], np.float32), img.shape[:2])
        assert back.shape == img.shape[:2]
        assert back[~cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)].max() == 0.0
        assert back[cv2.erode(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)].min() > 0.99

    def test_straight_edges_find_a_card_close_to_the_print(self) -> None:
        """A card a few ΔE from the print's backdrop: the rays walk on into the print and find no rim, the four
        straight edges do. The models then see the whole scan (``crop`` off) and paste cuts to the window."""
        scan, truth = _close_card()
        h, w = truth.shape
        card = mount_mod.card_mask(scan)
        assert card is not None
        points = mount_mod.rim_points(card)
        assert len(points) < 0.6 * mount_mod.RAYS or mount_mod._fitted(scan, card, points) is None
        found = find_mount(scan)
        assert found is not None and found.kind == "rect" and not found.crop
        assert _iou(found.window, truth) >= 0.97
        assert found.view(scan) is scan
        back = found.paste(np.ones((h, w), np.float32), (h, w))
        assert back[~cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)].max() < 0.01
        assert back[cv2.erode(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)].min() > 0.99

    @pytest.mark.parametrize("seed", [0, 1])
    def test_no_straight_window_in_a_print_without_a_card(self, seed: int) -> None:
        """Rows of polka dots on a plain backdrop step sharply row by row, and a floor line crosses the print:
        neither is a window (the dot rows are as strong as any edge in the band; the floor's strip is another
        colour)."""
        h, w = 450, 700
        rng = np.random.default_rng(seed)
        base = rng.uniform(80, 180, 3)
        img = np.zeros((h, w, 3), np.float32)
        img[...] = base
        for y in range(12, h, 36):
            for x in range(12, w, 36):
                cv2.circle(img, (x, y), 9, tuple(float(v) for v in base + 50), -1)
        cv2.ellipse(img, (w // 2, h), (w // 5, h // 2), 0, 0, 360, (30, 30, 30), -1)
        img += rng.normal(0, 3, img.shape)
        dots = np.clip(img, 0, 255).astype(np.uint8)
        assert mount_mod.straight_window(dots) is None and find_mount(dots) is None
        floor = np.zeros((h, w, 3), np.float32)
        floor[...] = base
        floor[int(0.85 * h):] = base * 0.6
        cv2.ellipse(floor, (w // 2, h), (w // 5, h // 2), 0, 0, 360, (30, 30, 30), -1)
        floor += rng.normal(0, 3, floor.shape)
        assert mount_mod.straight_window(np.clip(floor, 0, 255).astype(np.uint8)) is None

    def test_paint_is_the_print_not_the_rim(self) -> None:
        """A dark print in a light card, its rim blended over a few pixels: the paint is the print's dark,
        not the lighter blend at the rim (which left the oval in sight of the models)."""
        h, w = 600, 800
        window = np.zeros((h, w), np.uint8)
        cv2.ellipse(window, (w // 2, h // 2), (int(0.46 * w), int(0.42 * h)), 0, 0, 360, 1, -1)
        soft = cv2.GaussianBlur(window.astype(np.float32), (0, 0), 3.5)[..., None]
        dark = np.array([40, 30, 8], np.float32)
        img = np.where(soft > 0, dark, 0) * soft + np.array([130, 105, 55], np.float32) * (1 - soft)
        cv2.ellipse(img, (w // 3, h), (w // 8, h // 2), 0, 0, 360, (150, 150, 140), -1)  # a sitter at the rim
        img += np.random.default_rng(0).normal(0, 3, img.shape)
        scan = np.clip(img, 0, 255).astype(np.uint8)
        mount = find_mount(scan)
        assert mount is not None and mount.kind == "oval"
        view = mount.view(scan)
        y0, y1, x0, x1 = mount.box
        card = ~mount.window[y0:y1, x0:x1]
        far = card.copy()
        far[:, : (x1 - x0) // 2] = False  # away from the sitter at the left-hand rim
        assert np.abs(np.median(view[far], axis=0) - dark).max() <= 12

    def test_paint_follows_the_print(self) -> None:
        """A print light at the top and dark at the bottom: the card is painted light above and dark below,
        so no one-coloured oval frames it (one mid-grey paint left the rim in sight and the window was matted)."""
        h, w = 600, 450
        window = np.zeros((h, w), np.uint8)
        cv2.ellipse(window, (w // 2, h // 2), (int(0.44 * w), int(0.46 * h)), 0, 0, 360, 1, -1)
        light, dark, card = np.array([215, 210, 220]), np.array([60, 55, 65]), np.array([150, 140, 120])
        print_ = np.where((np.arange(h) < h // 2)[:, None, None], light, dark)
        scan = np.where(window[..., None] > 0, print_, card).astype(np.float32)
        scan += np.random.default_rng(3).normal(0, 3, scan.shape)
        scan_u8 = np.clip(scan, 0, 255).astype(np.uint8)
        mount = find_mount(scan_u8)
        assert mount is not None and mount.kind == "oval"
        view = mount.view(scan_u8).astype(np.float32)  # the window's box: its corners are card
        assert np.abs(view[:20, :20].mean(axis=(0, 1)) - light).max() < 15
        assert np.abs(view[-20:, :20].mean(axis=(0, 1)) - dark).max() < 15

    def test_oval_behind_cracks_is_found(self) -> None:
        """Cracks across the card stop some rays short of the rim: the fit still finds the oval (a fit with one
        tight tolerance from the first pass was pulled off the rim by those points and found nothing)."""
        img, truth = _mounted("oval")
        h, w = img.shape[:2]
        rng = np.random.default_rng(0)
        for _ in range(24):  # light cracks from the edges, 40 px in towards the centre, wandering a little
            side = int(rng.integers(4))
            x, y = [(int(rng.uniform(0, w)), 0), (0, int(rng.uniform(0, h))), (int(rng.uniform(0, w)), h - 1),
                    (w - 1, int(rng.uniform(0, h)))][side]
            dx, dy = w / 2 - x, h / 2 - y
            length = float(np.hypot(dx, dy))
            pts = [(x, y)] + [(int(x + dx / length * 8 * k + rng.uniform(-8, 8)),
                               int(y + dy / length * 8 * k + rng.uniform(-8, 8))) for k in range(1, 6)]
            cv2.polylines(img, [np.array(pts, np.int32)], False, (245, 245, 240), 2)
        mount = find_mount(img)
        assert mount is not None and mount.kind == "oval"
        assert _iou(mount.window, truth) >= 0.95

    @pytest.mark.skipif(not (PORTRAITS / "image").is_dir(), reason=f"portraits absent ({PORTRAITS})")
    def test_on_aged_composites(self) -> None:
        """On the eval's own aged composites: no false mounts, and most ovals (the harmful kind) found."""
        from bshm_watchd.evaluation.composite import make_cases

        cases = make_cases(PORTRAITS, 40, 0, 512, (0.0, 1.0))
        ovals = found_ovals = 0
        for case in cases:
            mount = find_mount(case.image)
            truth = case.recipe["mount"]
            if mount is not None:
                assert "oval" in truth or "border" in truth, case.name
            if "oval" in truth:
                ovals += 1
                found_ovals += mount is not None and mount.kind == "oval"
        assert ovals >= 2
        assert found_ovals >= ovals / 2


class _Recorder:
    """A fake matter (the GPU boundary) that records the shapes it saw and answers ``_answer`` (all ones)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[int, ...]] = []

    def predict(self, rgb: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: list[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        self.seen += [im.shape for im in images]
        return [self._answer(*im.shape[:2]) for im in images]

    def _answer(self, h: int, w: int) -> npt.NDArray[np.float32]:
        return np.ones((h, w), np.float32)


class TestFusionWithMount:
    @pytest.mark.parametrize(("kind", "mounts"), [("oval", True), ("oval", False), ("rect", True), ("rect", False)])
    def test_window_is_matted_as_crop(self, kind: str, mounts: bool) -> None:
        """With mounts on, both models see the window's box and the card gets alpha 0; off, the whole scan."""
        img, truth = _mounted(kind)
        sem, fine = _Recorder("selfie"), _Recorder("isnet")
        params = FusionParams(mounts=mounts, stretch=False, tiles=False)
        alpha = FusionMatter(sem, fine, params, refine=False).predict(img)
        assert alpha.shape == img.shape[:2]
        mount = find_mount(img)
        assert isinstance(mount, Mount)
        y0, y1, x0, x1 = mount.box
        expected = (y1 - y0, x1 - x0, 3) if mounts else img.shape
        assert sem.seen == [expected] and fine.seen == [expected]
        card = ~cv2.dilate(truth.astype(np.uint8), np.ones((13, 13), np.uint8)).astype(bool)
        assert (alpha[card].max() == 0.0) if mounts else (alpha[card].min() > 0.9)


    def test_straight_window_is_matted_whole_and_cut(self) -> None:
        """A window found by its straight edges alone: both models see the whole scan, and the card gets
        alpha 0 (the fakes' bust runs on over the card below the window)."""
        img, truth = _close_card()
        sem, fine = _Bust("selfie"), _Bust("isnet")
        params = FusionParams(stretch=False, tiles=False, strokes=False, denoise=False, crop_below=0.0)
        alpha = FusionMatter(sem, fine, params, refine=False).predict(img)
        assert sem.seen == [img.shape] and fine.seen == [img.shape]
        bust = sem.predict(img) > 0.5
        card = ~cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert (bust & card).any() and alpha[card].max() < 0.01
        inner = cv2.erode(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        inner &= cv2.erode(bust.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert alpha[inner].min() > 0.9


    @pytest.mark.parametrize("hw", [(1, 1), (2, 2), (8, 8), (12, 300), (300, 12), (3, 500)])
    def test_tiny_scans_are_matted(self, hw: tuple[int, int]) -> None:
        """A scan a few pixels across (a thumbnail dropped by mistake) has no mount looked for and is matted
        like any other: the ray walk divided by zero at 2 × 2, and a straight edge's band was empty at 8 × 8."""
        rng = np.random.default_rng(0)
        for img in (np.full((*hw, 3), 150, np.uint8), rng.integers(0, 256, (*hw, 3), dtype=np.uint8)):
            assert find_mount(img) is None and mount_mod.straight_window(img) is None
            alpha = FusionMatter(_Bust("selfie"), _Bust("isnet"), FusionParams(), refine=True).predict(img)
            assert alpha.shape == hw and np.isfinite(alpha).all()


class _WindowTaker(_Recorder):
    """A fake isnet that, like the real one on a mount it cannot see, mattes the oval window itself."""

    def _answer(self, h: int, w: int) -> npt.NDArray[np.float32]:
        a = np.zeros((h, w), np.float32)
        cv2.ellipse(a, (w // 2, h // 2), (int(0.44 * w), int(0.46 * h)), 0, 0, 360, 1.0, -1)
        return a


class TestWindowInMatte:
    def test_elliptic_matte_is_a_window(self) -> None:
        """A matte that is a large clean ellipse is taken for a window; a bust-shaped one is not."""
        from bshm_watchd.engine.mount import window_in_matte

        rgb = _print(600, 450, 0)
        oval = _WindowTaker("isnet").predict(rgb)
        found = window_in_matte(oval, rgb)
        assert found is not None and found.kind == "oval"
        assert _iou(found.window, oval > 0.5) >= 0.97
        bust = np.zeros((600, 450), np.float32)
        cv2.ellipse(bust, (225, 600), (150, 300), 0, 0, 360, 1.0, -1)
        cv2.circle(bust, (225, 240), 80, 1.0, -1)
        assert window_in_matte(bust, rgb) is None
        small = np.zeros((600, 450), np.float32)
        cv2.ellipse(small, (225, 300), (60, 80), 0, 0, 360, 1.0, -1)
        assert window_in_matte(small, rgb) is None  # a clean ellipse, but too small to be a window

    def test_window_crossed_by_a_scratch_is_a_window(self) -> None:
        """The matte is the window plus a scratch running out across the rim: the first fit is pulled off
        (IoU under 0.97), the fit without the matte's thin parts finds the window; a bust is not a window
        either way."""
        from bshm_watchd.engine import mount

        rgb = _print(600, 450, 0)
        oval = _WindowTaker("isnet").predict(rgb)
        scratched = oval.copy()
        cv2.line(scratched, (300, 350), (449, 599), 1.0, 10)
        found = mount.window_in_matte(scratched, rgb)
        assert found is not None and _iou(found.window, oval > 0.5) >= 0.97
        _, iou = mount._ellipse_fit((scratched > 0.5).astype(np.uint8))
        assert mount.WINDOW_RETRY[0] <= iou < mount.MIN_WINDOW_IOU
        bust = np.zeros((600, 450), np.float32)
        cv2.ellipse(bust, (225, 600), (150, 300), 0, 0, 360, 1.0, -1)
        cv2.circle(bust, (225, 240), 80, 1.0, -1)
        cv2.line(bust, (300, 350), (449, 599), 1.0, 10)
        assert mount.window_in_matte(bust, rgb) is None

    def test_fusion_mattes_again_on_the_window(self) -> None:
        """When isnet's matte is the window, both models run again on the window's box."""
        rgb = _print(600, 450, 0)
        assert find_mount(rgb) is None
        sem, fine = _Recorder("selfie"), _WindowTaker("isnet")
        alpha = FusionMatter(sem, fine, FusionParams(stretch=False, tiles=False), refine=False).predict(rgb)
        assert len(fine.seen) == 2 and fine.seen[0] == rgb.shape and fine.seen[1][0] < 600
        assert sem.seen[1] == fine.seen[1]
        assert alpha[5, 5] == 0.0 and alpha.shape == rgb.shape[:2]


class _Bust(_Recorder):
    """A fake selfie that finds the bust of ``_print``."""

    def _answer(self, h: int, w: int) -> npt.NDArray[np.float32]:
        a = np.zeros((h, w), np.float32)
        cv2.ellipse(a, (w // 2, h), (w // 3, h // 2), 0, 0, 360, 1.0, -1)
        return a


class TestWindowFilled:
    def test_a_matte_of_the_whole_window_is_dropped(self) -> None:
        """isnet mattes the whole print inside a rectangular border (the fake answers all ones): that
        answer is dropped, and the matte is selfie's bust; a bust inside the window is kept."""
        img, truth = _mounted("rect")
        mount = find_mount(img)
        assert mount is not None and mount.kind == "rect"
        view = mount.view(img)  # the mattes are judged on the view's grid: the window's box
        assert mount.filled_by(np.ones(view.shape[:2], np.float32))
        bust = _Bust("selfie").predict(view)
        assert not mount.filled_by(bust)
        params = FusionParams(stretch=False, tiles=False, strokes=False, denoise=False)
        alpha = FusionMatter(_Bust("selfie"), _Recorder("isnet"), params, refine=False).predict(img)
        y0, y1, x0, x1 = mount.box
        placed = np.zeros(img.shape[:2], np.float32)
        placed[y0:y1, x0:x1] = bust
        seen = (placed > 0.5) & truth  # the matte is cut to the window
        bust = placed
        assert _iou(alpha > 0.5, seen) >= 0.95
        assert alpha[truth & (bust < 0.5)].max() < 0.05

    def test_a_matte_of_most_of_the_window_against_far_less_is_dropped(self) -> None:
        """isnet mattes the window's backdrop round the sitter (an inverted matte of a dark print, most of the
        window) while selfie finds the bust: isnet's answer is dropped and the matte is the bust. Two mattes
        that both cover much of the window (a sitter who fills it) are both kept."""
        img, truth = _mounted("rect")
        mount = find_mount(img)
        assert mount is not None and mount.kind == "rect"
        h, w = img.shape[:2]
        y0, y1, x0, x1 = mount.box
        bust = np.zeros((h, w), np.float32)
        cv2.ellipse(bust, (w // 2, h), (w // 5, h // 3), 0, 0, 360, 1.0, -1)  # a small sitter
        backdrop = (truth & (bust < 0.5)).astype(np.float32)
        lower = (truth & (np.arange(h) > 0.3 * h)[:, None]).astype(np.float32)  # a sitter filling the window
        # The models see the window's box: each matte as they would give it there.
        bust, backdrop, lower = (a[y0:y1, x0:x1] for a in (bust, backdrop, lower))
        assert 0.8 <= mount.covered(backdrop) < 0.92 and mount.covered(bust) < 0.6
        assert not mount.filled_by(backdrop)  # not the whole window: only the other's verdict gives it away
        assert mount.outvoted(backdrop, bust) and not mount.outvoted(bust, backdrop)
        assert mount.covered(lower) >= 0.6 and not mount.outvoted(backdrop, lower)

        class _Small(_Recorder):
            def _answer(self, h: int, w: int) -> npt.NDArray[np.float32]:
                return bust if (h, w) == bust.shape else np.zeros((h, w), np.float32)

        class _Backdrop(_Recorder):
            def _answer(self, h: int, w: int) -> npt.NDArray[np.float32]:
                return backdrop if (h, w) == backdrop.shape else np.zeros((h, w), np.float32)

        params = FusionParams(stretch=False, tiles=False, strokes=False, denoise=False, crop_below=0.0)
        alpha = FusionMatter(_Small("selfie"), _Backdrop("isnet"), params, refine=False).predict(img)
        assert _iou(alpha[y0:y1, x0:x1] > 0.5, (bust > 0.5) & truth[y0:y1, x0:x1]) >= 0.9
        card = ~cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert alpha[card].max() == 0.0
