"""Edge-aware upsampling of the matte: sizes, sharper edges than bilinear, strips equal to a full-size reference."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from bshm_watchd import refine
from bshm_watchd.refine import grey01, guided_filter, upsample_matte

RADIUS = int((upsample_matte.__kwdefaults__ or {})["radius"])
"""The production default, so the reference follows it."""

F64 = npt.NDArray[np.float64]


# ---- an independent full-size numpy implementation ------------------------------------------------
def box(x: npt.NDArray[np.floating], r: int) -> F64:
    """Mean over a (2r+1)² window with mirrored borders (OpenCV's BORDER_REFLECT), via integral images."""
    p = np.pad(x.astype(np.float64), r, mode="symmetric")
    c = np.pad(np.cumsum(np.cumsum(p, 0), 1), ((1, 0), (1, 0)))
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def bilinear(x: F64, h: int, w: int) -> F64:
    """Bilinear resize with pixel centres aligned (src = (dst + 0.5)·scale − 0.5), edges clamped."""
    hs, ws = x.shape
    ys = np.clip((np.arange(h) + 0.5) * hs / h - 0.5, 0, hs - 1)
    xs = np.clip((np.arange(w) + 0.5) * ws / w - 0.5, 0, ws - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, hs - 1), np.minimum(x0 + 1, ws - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bottom = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    out: F64 = top * (1 - fy) + bottom * fy
    return out


def luma(rgb: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> F64:
    f = rgb.astype(np.float64) / (255.0 if rgb.dtype == np.uint8 else 65535.0)
    out: F64 = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114
    return out


def reference_matte(
    alpha: npt.NDArray[np.float32],
    guide: npt.NDArray[np.float32],
    full: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    r: int | None = None,
    eps: float = 1e-4,
) -> npt.NDArray[np.uint8]:
    """Fast guided filter computed in one piece at full size, in float64."""
    r = RADIUS if r is None else r
    g, p = guide.astype(np.float64), alpha.astype(np.float64)
    mi, mp = box(g, r), box(p, r)
    a = (box(g * p, r) - mi * mp) / (box(g * g, r) - mi * mi + eps)
    b = mp - a * mi
    h, w = full.shape[:2]
    out = bilinear(box(a, r), h, w) * luma(full) + bilinear(box(b, r), h, w)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


# ---- scenes ------------------------------------------------------------------------------------------
def disc_scene(h: int, w: int, sh: int, sw: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """A textured full-size image with a brighter disc, and a soft small alpha of the disc."""
    yy, xx = np.mgrid[0:h, 0:w]
    full = np.dstack([(xx * 0.5 + yy * 0.2) % 256, (yy * 0.4) % 256, ((xx - yy) * 0.3) % 256]).astype(np.uint8)
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    full[disc] = np.clip(full[disc].astype(int) + 80, 0, 255).astype(np.uint8)
    alpha = cv2.resize(disc.astype(np.float32), (sw, sh), interpolation=cv2.INTER_AREA)
    return full, cv2.GaussianBlur(alpha, (0, 0), 2).astype(np.float32)


def small_guide(full: npt.NDArray[np.uint8], sh: int, sw: int) -> npt.NDArray[np.float32]:
    return grey01(cv2.resize(full, (sw, sh), interpolation=cv2.INTER_AREA))


class TestUpsampleShape:
    @pytest.mark.parametrize("edge_aware", [True, False])
    @pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
    def test_odd_sizes(self, edge_aware: bool, dtype: type) -> None:
        """A 97×151 alpha comes back as a 333×517 uint8 matte for 8- and 16-bit scans."""
        full8, alpha = disc_scene(333, 517, 97, 151)
        full = full8.astype(dtype) * (257 if dtype == np.uint16 else 1)
        m = upsample_matte(alpha, small_guide(full8, 97, 151), full, edge_aware=edge_aware)
        assert m.shape == (333, 517) and m.dtype == np.uint8
        assert m.min() < 20 and m.max() > 235

    @pytest.mark.parametrize("value", [0.0, 1.0])
    def test_constant_alpha_stays_constant(self, value: float) -> None:
        """An all-0 or all-1 alpha gives an all-0 or all-255 matte whatever the guide's texture."""
        full, _ = disc_scene(120, 90, 40, 30)
        m = upsample_matte(np.full((40, 30), value, np.float32), small_guide(full, 40, 30), full)
        assert (m == round(value * 255)).all()

    def test_same_size(self) -> None:
        """With no downscale, the matte is the guided-filtered alpha of the scan itself."""
        full, _ = disc_scene(64, 80, 64, 80)
        alpha = np.zeros((64, 80), np.float32)
        alpha[20:44, 25:55] = 1
        g = grey01(full)
        m = upsample_matte(alpha, g, full)
        expected = np.clip(guided_filter(g, alpha, RADIUS, 1e-4) * 255 + 0.5, 0, 255).astype(np.uint8)
        assert np.abs(m.astype(int) - expected.astype(int)).max() <= 1


class TestEdgeAware:
    def test_sharper_than_bilinear(self) -> None:
        """A sharp step in the full-resolution scan gives a sharp matte edge, where bilinear smears 4+ pixels."""
        h, w, edge = 300, 400, 203  # the edge falls between the small image's pixel centres
        full = np.full((h, w, 3), 25, np.uint8)
        full[:, edge:] = 230
        rng = np.random.default_rng(0)
        full = np.clip(full.astype(int) + rng.integers(-3, 4, full.shape), 0, 255).astype(np.uint8)
        truth = np.zeros((h, w), np.uint8)
        truth[:, edge:] = 255
        sh, sw = 75, 100
        alpha = cv2.resize(truth.astype(np.float32) / 255, (sw, sh), interpolation=cv2.INTER_AREA)
        guide = small_guide(full, sh, sw)
        sharp = upsample_matte(alpha, guide, full, edge_aware=True)
        plain = upsample_matte(alpha, guide, full, edge_aware=False)

        def blur_width(m: npt.NDArray[np.uint8]) -> float:
            return float(((m > 25) & (m < 230)).sum(axis=1).mean())

        assert blur_width(plain) >= 4
        assert blur_width(sharp) <= 1
        err = lambda m: float(np.abs(m.astype(int) - truth.astype(int)).mean())  # noqa: E731
        assert err(sharp) < 0.25 * err(plain)


class TestStrips:
    @pytest.mark.parametrize("edge_aware", [True, False])
    def test_strips_equal_single_shot(self, edge_aware: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """A 601-row scan processed in 256-row strips equals the same scan done in one strip."""
        full, alpha = disc_scene(601, 437, 203, 151)
        guide = small_guide(full, 203, 151)
        strips = upsample_matte(alpha, guide, full, edge_aware=edge_aware)
        monkeypatch.setattr(refine, "STRIP_ROWS", 10**6)
        single = upsample_matte(alpha, guide, full, edge_aware=edge_aware)
        np.testing.assert_array_equal(strips, single)

    @pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
    def test_matches_full_size_numpy_reference(self, dtype: type) -> None:
        """The strip-wise matte is within one level of a float64 full-size computation, everywhere."""
        full8, alpha = disc_scene(601, 437, 203, 151)
        full = full8.astype(dtype) * (257 if dtype == np.uint16 else 1)
        guide = small_guide(full8, 203, 151)
        diff = np.abs(upsample_matte(alpha, guide, full).astype(int) - reference_matte(alpha, guide, full).astype(int))
        assert diff.max() <= 1

    def test_plain_matches_bilinear_reference(self) -> None:
        """With edge_aware off, the matte is a centre-aligned bilinear resize (no half-pixel shift)."""
        full, alpha = disc_scene(601, 437, 203, 151)
        m = upsample_matte(alpha, small_guide(full, 203, 151), full, edge_aware=False)
        ref = np.clip(bilinear(alpha.astype(np.float64), 601, 437) * 255 + 0.5, 0, 255).astype(np.uint8)
        assert np.abs(m.astype(int) - ref.astype(int)).max() <= 1


class TestRefineBand:
    @staticmethod
    def scene() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """A red disc on a blue backdrop, its exact alpha, and a model-like blurry alpha of it."""
        h, w = 160, 200
        yy, xx = np.mgrid[0:h, 0:w]
        truth = (((yy - 80) ** 2 + (xx - 100) ** 2) < 50**2).astype(np.float32)
        rgb = np.empty((h, w, 3), np.uint8)
        rgb[:] = (30, 40, 200)
        rgb[truth > 0] = (220, 40, 30)
        blurry = cv2.GaussianBlur(truth, (0, 0), 4).astype(np.float32)
        return rgb, truth, blurry

    def test_band_snaps_to_image_edge(self) -> None:
        """On a clean colour edge, the re-solved band is closer to the truth than the blurry model alpha."""
        rgb, truth, blurry = self.scene()
        out = refine.refine_band(blurry, rgb)
        assert out.shape == blurry.shape and out.dtype == np.float32
        assert np.abs(out - truth).sum() < 0.5 * np.abs(blurry - truth).sum()

    def test_sure_regions_untouched(self) -> None:
        """Pixels the model was sure about (eroded > 0.9 or < 0.1) keep their value."""
        rgb, _, blurry = self.scene()
        out = refine.refine_band(blurry, rgb)
        sure = (cv2.erode((blurry > 0.9).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0)
        assert np.array_equal(out[sure], blurry[sure])

    def test_grain_does_not_set_the_solve(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Under heavy grain (σ 20 of 255) on a low-contrast edge, the solve on the bilateral-smoothed image
        (``GUIDE_SMOOTHING``) lands closer to the truth than on the grainy image itself, for three grains."""
        for seed in range(3):
            rng = np.random.default_rng(seed)
            truth = np.zeros((240, 240), np.float32)
            cv2.circle(truth, (120, 130), 70, 1.0, -1, cv2.LINE_AA)
            flat = truth[..., None] * np.array([150, 110, 90]) + (1 - truth[..., None]) * np.array([90, 100, 110])
            rgb = np.clip(flat + rng.normal(0, 20, flat.shape), 0, 255).astype(np.uint8)
            blurry = cv2.GaussianBlur(truth, (0, 0), 4)
            smoothed = float(np.abs(refine.refine_band(blurry, rgb) - truth).sum())
            with monkeypatch.context() as m:
                m.setattr(refine, "GUIDE_SMOOTHING", (1, 1e-6, 1e-6))  # a one-pixel bilateral: the image as it is
                grainy = float(np.abs(refine.refine_band(blurry, rgb) - truth).sum())
            assert smoothed < 0.8 * grainy

    def test_sixteen_bit_scan_solves_like_eight_bit(self) -> None:
        """A 16-bit scan (the full-size scan can reach the solve) gives the 8-bit result, within rounding."""
        rgb, _, blurry = self.scene()
        eight = refine.refine_band(blurry, rgb)
        sixteen = refine.refine_band(blurry, rgb.astype(np.uint16) * 257)
        assert np.abs(eight - sixteen).max() < 0.02

    def test_mostly_unknown_left_alone(self) -> None:
        """A matte that is mostly unsure is returned as it is (the solve cannot fix a model failure)."""
        rgb, _, _ = self.scene()
        unsure = np.full(rgb.shape[:2], 0.5, np.float32)
        unsure[:10] = 0.0
        unsure[-10:] = 1.0
        assert np.array_equal(refine.refine_band(unsure, rgb), unsure)


def test_refine_band_gives_pymatting_an_image_in_range(recwarn: pytest.WarningsRecorder) -> None:
    """A white backdrop (values at 1.0) through the smoothing stays within [0, 1]: pymatting warns otherwise."""
    rgb, _, blurry = TestRefineBand.scene()
    rgb[rgb[..., 2] == 200] = 255
    refine.refine_band(blurry, rgb)
    assert not [w for w in recwarn if "should be in [0, 1]" in str(w.message)]


def test_refine_band_solves_with_the_projects_epsilon(monkeypatch: pytest.MonkeyPatch) -> None:
    """The solve's regularisation is ``CF_EPSILON`` (the eval chose it), not pymatting's default."""
    import pymatting

    seen: list[dict[str, float]] = []
    real = pymatting.estimate_alpha_cf

    def spy(image: npt.NDArray[np.float64], trimap: npt.NDArray[np.float64], **kw: dict[str, float]) -> F64:
        seen.append(kw.get("laplacian_kwargs", {}))
        out: F64 = real(image, trimap, **kw)
        return out

    monkeypatch.setattr(pymatting, "estimate_alpha_cf", spy)
    rgb, _, blurry = TestRefineBand.scene()
    refine.refine_band(blurry, rgb)
    assert seen == [{"epsilon": refine.CF_EPSILON}]
