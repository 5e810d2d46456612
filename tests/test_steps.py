"""Profile steps: the three spellings, parameter validation, shape/dtype kept, and each step doing its job."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from imaging import asymmetric_rgb
from pydantic import ValidationError

from bshm_watchd.steps import STEP_NAMES, Clahe, Median, apply_steps, normalise_step_spec, parse_step

IMG = asymmetric_rgb(41, 67, seed=3)

ALL_STEPS: list[Any] = [
    {"white_balance": {"strength": 0.7}},
    "deyellow",
    {"clahe": {"clip": 3.0, "tiles": 4}},
    {"gamma": {"gamma": 0.6}},
    {"shadow_lift": {"amount": 0.5}},
    {"median": {"ksize": 5}},
    "despeckle",
    {"nlmeans": {"h": 10, "h_color": 10, "template": 7, "search": 21}},
    {"equalize_yuv": {"u_scale": 0.8, "v_scale": 0.9}},
    {"saturation": {"factor": 1.5}},
]


class TestParse:
    @pytest.mark.parametrize("raw", ["clahe", {"clahe": None}, {"clahe": {}}, {"step": "clahe"}])
    def test_bare_forms_give_defaults(self, raw: Any) -> None:
        """`clahe`, `{clahe: null}`, `{clahe: {}}` and `{step: clahe}` all give a default Clahe."""
        step = parse_step(raw)
        assert isinstance(step, Clahe) and (step.clip, step.tiles) == (2.0, 8)

    @pytest.mark.parametrize("raw", [{"clahe": {"clip": 2.5}}, {"step": "clahe", "clip": 2.5}])
    def test_param_forms_agree(self, raw: Any) -> None:
        """`{clahe: {clip: 2.5}}` and `{step: clahe, clip: 2.5}` give the same step."""
        assert parse_step(raw) == Clahe(step="clahe", clip=2.5)

    def test_normalise(self) -> None:
        """normalise_step_spec turns every spelling into the `{step: ..., **params}` form."""
        assert normalise_step_spec("gamma") == {"step": "gamma"}
        assert normalise_step_spec({"gamma": {"gamma": 0.5}}) == {"step": "gamma", "gamma": 0.5}
        assert normalise_step_spec({"step": "gamma", "gamma": 0.5}) == {"step": "gamma", "gamma": 0.5}

    @pytest.mark.parametrize(
        ("raw", "fragment"),
        [
            ({"median": {"ksize": 4}}, "odd"),
            ({"median": {"ksize": 1}}, "greater than or equal to 3"),
            ({"clahe": {"clip": 0}}, "greater than 0"),
            ({"clahe": {"clp": 2}}, "clp"),
            ({"gamma": {"gamma": "bright"}}, "valid number"),
            ({"saturation": {"factor": -1}}, "greater than or equal to 0"),
            ("sharpen", "sharpen"),
            ({"clahe": 2}, "step"),
            ({"clahe": {"clip": 2}, "median": {"ksize": 3}}, "step"),
        ],
    )
    def test_bad_specs(self, raw: Any, fragment: str) -> None:
        """Bad step names, unknown or out-of-range parameters and malformed specs are refused."""
        with pytest.raises(ValidationError, match=fragment):
            parse_step(raw)

    def test_all_names_parse(self) -> None:
        """Every name in STEP_NAMES parses with default parameters."""
        assert [parse_step(n).step for n in STEP_NAMES] == list(STEP_NAMES)

    def test_frozen(self) -> None:
        """Steps are immutable once validated."""
        step = parse_step({"median": {"ksize": 5}})
        with pytest.raises(ValidationError):
            step.ksize = 7  # type: ignore[misc, union-attr]


class TestApply:
    @pytest.mark.parametrize("raw", ALL_STEPS, ids=lambda r: r if isinstance(r, str) else next(iter(r)))
    def test_keeps_shape_dtype_and_changes_pixels(self, raw: Any) -> None:
        """Each step returns H×W×3 uint8 of the same size, does not alter its input, and changes the image."""
        before = IMG.copy()
        out = parse_step(raw).apply(IMG)
        assert out.shape == IMG.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(IMG, before)
        assert not np.array_equal(out, IMG)

    def test_gamma_brightens(self) -> None:
        """gamma < 1 brightens mid-tones and keeps black and white fixed."""
        ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
        out = parse_step({"gamma": {"gamma": 0.5}}).apply(ramp)
        assert out[0, 128, 0] > 170 and out[0, 0, 0] == 0 and out[0, 255, 0] == 255

    def test_white_balance_removes_cast(self) -> None:
        """Full-strength grey-world balance brings a sepia image's channel means together."""
        sepia = (IMG.astype(np.float32) * np.array([1.0, 0.8, 0.55])).astype(np.uint8)
        out = parse_step("white_balance").apply(sepia)
        spread = lambda a: np.ptp(a.reshape(-1, 3).mean(axis=0))  # noqa: E731
        assert spread(out) < 0.2 * spread(sepia)

    def test_median_removes_speck(self) -> None:
        """A one-pixel speck on a flat field disappears under a 3×3 median."""
        flat = np.full((21, 21, 3), 120, dtype=np.uint8)
        flat[10, 10] = 255
        np.testing.assert_array_equal(Median(step="median").apply(flat), np.full_like(flat, 120))

    def test_saturation_zero_is_grey(self) -> None:
        """Saturation factor 0 gives (nearly) equal channels."""
        out = parse_step({"saturation": {"factor": 0}}).apply(IMG).astype(int)
        assert np.abs(out[..., 0] - out[..., 1]).max() <= 2

    def test_apply_steps_in_order(self) -> None:
        """apply_steps runs steps in list order (gamma then clahe differs from clahe then gamma)."""
        g, c = parse_step({"gamma": {"gamma": 0.4}}), parse_step({"clahe": {"clip": 4}})
        np.testing.assert_array_equal(apply_steps(IMG, [g, c]), c.apply(g.apply(IMG)))
        assert not np.array_equal(apply_steps(IMG, [g, c]), apply_steps(IMG, [c, g]))
        np.testing.assert_array_equal(apply_steps(IMG, ()), IMG)
