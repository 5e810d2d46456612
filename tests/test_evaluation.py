"""Tests for the matting benchmark: metrics, composites, runner and report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from bshm_watchd.errors import BshmError, ModelError
from bshm_watchd.evaluation import Case, evaluate, load_pairs, make_cases, save_cases, truth_alpha
from bshm_watchd.evaluation.ageing import age
from bshm_watchd.evaluation.backdrops import BACKDROPS, LUMA, backdrop, keep_apart
from bshm_watchd.evaluation.composite import _draw_group, _draw_group_frame, _draw_pad, _read_alpha, _touches
from bshm_watchd.evaluation.metrics import (
    Scores,
    connectivity_error,
    gradient_error,
    mse,
    sad,
    score,
    soft_band,
    soft_band_sad,
)
from bshm_watchd.evaluation.report import (
    markdown_per_case,
    markdown_summary,
    result_from_dict,
    result_to_dict,
    to_json,
    write_report,
)
from bshm_watchd.evaluation.runner import CaseResult, EvalResult

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "portraits"
needs_data = pytest.mark.skipif(not (DATA / "image").is_dir(), reason=f"shared portraits not found at {DATA}")


class _PerImage:
    """Base of the fake matters here (the GPU boundary): a batch is each image's ``predict``."""

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.predict(im) for im in images]


def _blob(h: int = 60, w: int = 80) -> np.ndarray:
    """A solid rectangle with a soft ramp on its left edge."""
    a = np.zeros((h, w), np.float32)
    a[10:50, 30:70] = 1.0
    a[10:50, 20:30] = np.linspace(0, 1, 12, dtype=np.float32)[1:11]
    return a


def _write_portraits(root: Path, count: int = 3) -> list[np.ndarray]:
    """Small synthetic 'portraits': a coloured ellipse with a soft rim on a busy background."""
    (root / "image").mkdir(parents=True)
    (root / "alpha").mkdir()
    rng = np.random.default_rng(7)
    alphas = []
    for i in range(count):
        h, w = 180 + 20 * i, 240
        alpha = np.zeros((h, w), np.uint8)
        cv2.ellipse(alpha, (w // 2, h // 2), (50, 70), 0, 0, 360, 255, -1)
        alpha = cv2.GaussianBlur(alpha, (0, 0), 2.0)
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        img[alpha > 0] = (40 * i + 60, 120, 200 - 30 * i)
        cv2.imwrite(str(root / "image" / f"p{i}.jpg"), img)
        cv2.imwrite(str(root / "alpha" / f"p{i}.png"), alpha)
        alphas.append(alpha.astype(np.float32) / 255)
    return alphas


class TestMetrics:
    def test_perfect_prediction_scores_zero(self) -> None:
        """A prediction equal to the truth has every error 0."""
        t = _blob()
        assert score(t, t) == Scores(0.0, 0.0, 0.0, 0.0, 0.0)

    def test_all_wrong_is_1000_per_megapixel(self) -> None:
        """Predicting 0 where the truth is 1 everywhere gives SAD and connectivity 1000, MSE 1, grad 0."""
        s = score(np.zeros((40, 50)), np.ones((40, 50)))
        assert s.sad == pytest.approx(1000.0)
        assert s.conn == pytest.approx(1000.0)
        assert s.mse == pytest.approx(1.0)
        assert s.grad == pytest.approx(0.0)
        assert s.soft_sad == 0.0

    def test_half_wrong_sad(self) -> None:
        """Half the pixels off by 1 give SAD 500 per megapixel."""
        t = np.zeros((30, 40))
        t[:, :20] = 1
        assert sad(np.zeros_like(t), t) == pytest.approx(500.0)

    def test_megapixel_normalisation_is_size_invariant(self) -> None:
        """Doubling both mattes by pixel replication leaves SAD, MSE and connectivity unchanged."""
        t = _blob()
        p = np.clip(t + 0.3 * (np.arange(t.size).reshape(t.shape) % 7 == 0), 0, 1)
        p[0:5, 0:5] = 1.0  # a detached false positive
        big_p, big_t = (np.kron(a, np.ones((2, 2))) for a in (p, t))
        assert sad(big_p, big_t) == pytest.approx(sad(p, t))
        assert mse(big_p, big_t) == pytest.approx(mse(p, t))
        assert connectivity_error(big_p, big_t) == pytest.approx(connectivity_error(p, t))

    def test_connectivity_counts_a_detached_island(self) -> None:
        """An island of alpha 1 where the truth is 0 costs its area (φ goes 1 → 0), per megapixel."""
        t = np.zeros((100, 100))
        t[40:90, 40:90] = 1
        p = t.copy()
        p[2:12, 2:12] = 1  # 100 pixels, far from the body
        assert connectivity_error(p, t) == pytest.approx(100 / 1000 * 1e6 / 1e4)
        assert connectivity_error(t, t) == 0.0

    def test_gradient_error_sees_edges_not_offsets(self) -> None:
        """A constant offset keeps the gradients (grad 0, SAD > 0); a blurred edge does not."""
        t = _blob() * 0.5
        assert gradient_error(t + 0.5, t) == pytest.approx(0.0, abs=1e-9)
        assert sad(t + 0.5, t) > 0
        blurred = cv2.GaussianBlur(t, (0, 0), 3.0)
        assert gradient_error(blurred, t) > 0
        assert gradient_error(blurred, t) == pytest.approx(gradient_error(t, blurred))

    def test_soft_band_on_a_ramp(self) -> None:
        """The band is the strict ramp 51..59 widened by exactly 7 px each side (44..66)."""
        t = np.zeros((20, 100), np.float32)
        t[:, 50:61] = np.linspace(0, 1, 11)
        t[:, 61:] = 1
        cols = np.nonzero(soft_band(t)[10])[0]
        assert cols.min() == 44
        assert cols.max() == 66
        assert soft_band(t).all(axis=1).sum() == 0 and soft_band(t)[:, 44:67].all()

    def test_soft_band_sad_ignores_errors_far_from_edges(self) -> None:
        """An error deep inside the solid region counts in SAD but not in soft-band SAD."""
        t = _blob()
        p = t.copy()
        p[30:40, 50:60] = 0.0  # inside the body, > 7 px from the ramp
        assert sad(p, t) > 0
        assert soft_band_sad(p, t) == 0.0
        p2 = t.copy()
        p2[10:50, 20:30] = 0.0  # the ramp itself
        assert soft_band_sad(p2, t) == pytest.approx(sad(p2, t))

    def test_quantised_truth_has_no_phantom_band(self) -> None:
        """Float dust below half an 8-bit step (resampling noise) does not make a soft band."""
        t = np.ones((20, 20), np.float32) * np.float32(0.99999994)
        assert not soft_band(t).any()

    def test_rejects_bad_input(self) -> None:
        """Shape mismatches, NaNs and values outside [0, 1] are errors, not silent scores."""
        with pytest.raises(ValueError, match="same shape"):
            sad(np.zeros((3, 4)), np.zeros((4, 3)))
        with pytest.raises(ValueError, match="NaN"):
            sad(np.full((3, 3), np.nan), np.zeros((3, 3)))
        with pytest.raises(ValueError, match="outside"):
            sad(np.full((3, 3), 2.0), np.zeros((3, 3)))


class TestComposite:
    def test_deterministic_for_a_seed(self, tmp_path: Path) -> None:
        """The same seed gives byte-identical images, alphas and recipes."""
        _write_portraits(tmp_path)
        a, b = make_cases(tmp_path, 6, seed=3, max_side=160), make_cases(tmp_path, 6, seed=3, max_side=160)
        for x, y in zip(a, b, strict=True):
            assert x.name == y.name
            assert np.array_equal(x.image, y.image)
            assert np.array_equal(x.alpha, y.alpha)
            assert x.recipe == y.recipe

    def test_case_does_not_depend_on_n(self, tmp_path: Path) -> None:
        """Case i is the same whether 4 or 6 cases are asked for."""
        _write_portraits(tmp_path)
        a, b = make_cases(tmp_path, 4, seed=3, max_side=160), make_cases(tmp_path, 6, seed=3, max_side=160)
        assert np.array_equal(a[3].image, b[3].image)

    def test_seeds_differ(self, tmp_path: Path) -> None:
        """Different seeds give different composites of the same portrait."""
        _write_portraits(tmp_path)
        a, b = make_cases(tmp_path, 3, seed=1, max_side=160), make_cases(tmp_path, 3, seed=2, max_side=160)
        for x, y in zip(a, b, strict=True):
            assert x.recipe["source"] == y.recipe["source"]
            assert x.image.shape != y.image.shape or not np.array_equal(x.image, y.image)

    def test_alpha_is_the_exact_truth(self, tmp_path: Path) -> None:
        """Every case's alpha is the source alpha under the recipe's geometry, bit for bit, whatever
        the ageing did to the image (blur, rescan and JPEG included)."""
        sources = _write_portraits(tmp_path)
        cases = make_cases(tmp_path, 12, seed=5, max_side=160)
        for case in cases:
            src = sources[int(case.recipe["source"][1:])]
            assert np.array_equal(case.alpha, truth_alpha(src, case.recipe))
            assert case.alpha.min() >= 0 and case.alpha.max() <= 1
        resampled = [c for c in cases if {"rescan", "blur"} & set(c.recipe["age"])]
        assert resampled, "no case exercised the resampling steps"
        assert any("pad" in c.recipe["frame"] for c in cases), "no case exercised the small-subject framing"

    def test_small_subject_framing(self) -> None:
        """The padded framing puts the person on a wider canvas, taking 40–75 % of each axis it does not
        span; a person cut by the bottom edge stays on it, one cut by both side edges keeps them."""
        alpha = np.zeros((100, 80), np.float32)
        alpha[30:, :] = 1.0  # a bust: touches the bottom and both sides, not the top
        pads = [p for p in (_draw_pad(np.random.default_rng([s]), alpha) for s in range(60)) if p is not None]
        assert 8 <= len(pads) <= 30  # p 0.3 of 60
        for top, bottom, left, right in pads:
            assert bottom == left == right == 0 and top > 0
            assert 0.4 <= 100 / (100 + top) <= 0.75 + 1e-2
        floating = np.zeros((100, 80), np.float32)
        floating[40:60, 30:50] = 1.0  # touches nothing: the new room is split on both sides
        pads = [p for p in (_draw_pad(np.random.default_rng([s]), floating) for s in range(60)) if p is not None]
        assert all(min(p) > 0 for p in pads)
        assert all(max(100 + p[0] + p[1], 80 + p[2] + p[3]) <= 2.2 * min(100 + p[0] + p[1], 80 + p[2] + p[3]) + 1
                   for p in pads)
        spans = np.ones((100, 80), np.float32)
        assert all(_draw_pad(np.random.default_rng([s]), spans) is None for s in range(20))

    def test_groups_leave_the_other_cases_as_they_were(self, tmp_path: Path) -> None:
        """With ``groups`` > 0 the cases that are not groups are byte for byte those made without it; a group's
        alpha is exact (recomputed from its members' sources) and holds every member; a bad probability is
        refused."""
        sources = _write_portraits(tmp_path)
        plain, mixed = make_cases(tmp_path, 12, seed=4, max_side=160), make_cases(tmp_path, 12, seed=4, max_side=160,
                                                                                  groups=0.5)
        grouped = [c for c in mixed if "group" in c.recipe["frame"]]
        assert 2 <= len(grouped) <= 10
        for a, b in zip(plain, mixed, strict=True):
            if "group" not in b.recipe["frame"]:
                assert a.name == b.name and np.array_equal(a.image, b.image) and np.array_equal(a.alpha, b.alpha)
        by_name = {f"p{i}": src for i, src in enumerate(sources)}
        for c in grouped:
            members = [m["source"] for m in c.recipe["frame"]["group"]]
            assert c.name.startswith(f"{members[0]}-group{len(members)}-") and c.recipe["source"] == "+".join(members)
            assert np.array_equal(c.alpha, truth_alpha(by_name, c.recipe))
            json.dumps(c.recipe)  # --save-cases writes it
            frame = c.recipe["frame"]
            scale = frame["size"][0] / frame["canvas"][0]
            b = round(float(c.recipe["mount"].get("border", 0.0)) * max(frame["size"]))
            for m in frame["group"]:  # each member's ellipse shows where it was placed
                x0 = b + round((frame["offset"][0] + m["x"]) * scale)
                x1 = b + round((frame["offset"][0] + m["x"] + m["size"][0]) * scale)
                assert c.alpha[:, x0:x1].max() > 0.5
        with pytest.raises(ValueError, match="groups"):
            make_cases(tmp_path, 1, seed=1, groups=1.5)

    def test_group_placement_keeps_cut_edges_on_the_canvas_edge(self) -> None:
        """A person cut by the left of their portrait stands first, one cut by the right last, one cut by both is
        left out; a person cut by the top reaches the canvas's top, and no room is added beside a cut side."""
        free = np.zeros((100, 80), np.float32)
        free[20:, 20:60] = 1.0
        left_cut, right_cut, both_cut, top_cut = free.copy(), free.copy(), free.copy(), free.copy()
        left_cut[50:, :30] = 1.0
        right_cut[50:, 50:] = 1.0
        both_cut[50:, :] = 1.0
        top_cut[:, 30:50] = 1.0
        alphas = [right_cut, both_cut, free, left_cut, top_cut]
        edges = [_touches(a) for a in alphas]
        seen = []
        for s in range(40):
            members = _draw_group(np.random.default_rng([s]), s % 5, edges, 1.0)
            assert members is not None and 2 <= len(members) <= 3 and len(set(members)) == len(members)
            assert 1 not in members
            assert 3 not in members[1:] and 0 not in members[:-1]
            seen += members
            frame = _draw_group_frame(np.random.default_rng([s]), [alphas[m] for m in members],
                                      [f"p{m}" for m in members], [edges[m] for m in members], 160, 0.0)
            assert (frame["offset"][0] == 0) == (members[0] == 3)
            tallest = max(alphas[m].shape[0] for m in members)
            for m, placed in zip(members, frame["group"], strict=True):
                if m == 4:
                    assert placed["y"] == 0 and placed["size"][1] == tallest and frame["offset"][1] == 0
        assert {0, 2, 3, 4} <= set(seen)
        assert _draw_group(np.random.default_rng(0), 0, edges, 0.0) is None
        assert _draw_group(np.random.default_rng(0), 0, edges[:1], 1.0) is None

    def test_alpha_mass_follows_the_geometry(self, tmp_path: Path) -> None:
        """Checked independently of the helpers: an uncropped, unmounted case keeps the source's mean
        alpha, and a card border is alpha 0."""
        sources = _write_portraits(tmp_path)
        cases = make_cases(tmp_path, 30, seed=2, max_side=160)
        plain = [c for c in cases if c.recipe["frame"]["crop"][:2] == [0, 0] and set(c.recipe["mount"]) == {"card"}]
        plain = [c for c in plain if c.recipe["frame"]["crop"][2:] == c.recipe["frame"]["work"]
                 and "pad" not in c.recipe["frame"]]
        assert plain
        for c in plain:
            src = sources[int(c.recipe["source"][1:])]
            assert float(c.alpha.mean()) == pytest.approx(float(src.mean()), rel=0.02)
        bordered = [c for c in cases if "border" in c.recipe["mount"]]
        assert bordered
        for c in bordered:
            assert c.alpha[0].max() == 0 and c.alpha[-1].max() == 0 and c.alpha[:, 0].max() == 0

    def test_ageing_keeps_size_and_type(self) -> None:
        """Ageing returns a uint8 RGB image of the input's size (it cannot move the subject)."""
        img = np.random.default_rng(0).random((64, 48, 3), dtype=np.float32)
        out, recipe = age(img, np.random.default_rng(1))
        assert out.shape == (64, 48, 3) and out.dtype == np.uint8
        json.dumps(recipe)

    def test_every_backdrop_kind_renders(self) -> None:
        """Each backdrop kind gives an H×W×3 float32 image in [0, 1] and JSON-ready parameters."""
        for kind in BACKDROPS:
            bg, params = backdrop(kind, np.random.default_rng(0), 50, 70, (0.3, 0.2, 0.1))
            assert bg.shape == (50, 70, 3) and bg.dtype == np.float32
            assert bg.min() >= 0 and bg.max() <= 1
            assert params["kind"] == kind
            json.dumps(params)
        with pytest.raises(ValueError, match="unknown backdrop"):
            backdrop("nope", np.random.default_rng(0), 5, 5)

    def test_keep_apart_separates_a_silhouette(self) -> None:
        """A dark subject on an equally dark backdrop gets a backdrop at least 0.12 brighter at its rim."""
        alpha = np.zeros((80, 80), np.float32)
        alpha[20:60, 20:60] = 1
        fg = np.full((80, 80, 3), 0.1, np.float32)
        bg, shift = keep_apart(np.full((80, 80, 3), 0.12, np.float32), fg, alpha)
        assert shift > 0
        assert float(bg[5, 5] @ LUMA) - 0.1 >= 0.12 - 1e-6
        same, none = keep_apart(np.full((80, 80, 3), 0.9, np.float32), fg, alpha)
        assert none == 0.0 and float(same[5, 5, 0]) == pytest.approx(0.9)

    def test_severity_range_is_used_and_checked(self, tmp_path: Path) -> None:
        """Each case records a severity inside the requested range; a bad range is refused."""
        _write_portraits(tmp_path)
        cases = make_cases(tmp_path, 4, seed=1, max_side=128, severity=(0.2, 0.3))
        assert all(0.2 <= c.recipe["age"]["severity"] <= 0.3 for c in cases)
        with pytest.raises(ValueError, match="severity"):
            make_cases(tmp_path, 1, seed=1, severity=(0.8, 0.2))

    def test_mild_ageing_damages_less(self) -> None:
        """At severity 0 the aged image stays closer to the clean one than at severity 1 (over seeds)."""
        img = np.random.default_rng(0).random((96, 96, 3), dtype=np.float32)
        clean = (img * 255).astype(np.float64)

        def damage(sev: float) -> float:
            return float(
                np.mean([np.abs(age(img, np.random.default_rng(s), sev)[0] - clean).mean() for s in range(12)])
            )

        assert damage(0.0) < damage(1.0)

    def test_each_portrait_gets_distinct_variants(self, tmp_path: Path) -> None:
        """With n = 2P every portrait appears twice, with different recipes and names."""
        _write_portraits(tmp_path)
        cases = make_cases(tmp_path, 6, seed=9, max_side=160)
        for src in ("p0", "p1", "p2"):
            mine = [c for c in cases if c.recipe["source"] == src]
            assert len(mine) == 2
            assert mine[0].name != mine[1].name and mine[0].recipe != mine[1].recipe
        assert all(max(c.image.shape[:2]) <= 160 for c in cases)

    def test_save_and_load_round_trip(self, tmp_path: Path) -> None:
        """Saved cases load back with identical images, alphas within 16-bit rounding, and recipes."""
        _write_portraits(tmp_path / "src")
        cases = make_cases(tmp_path / "src", 4, seed=0, max_side=128)
        save_cases(cases, tmp_path / "out")
        back = {c.name: c for c in load_pairs(tmp_path / "out")}
        assert set(back) == {c.name for c in cases}
        for c in cases:
            assert np.array_equal(back[c.name].image, c.image)
            assert np.abs(back[c.name].alpha - c.alpha).max() <= 1 / 65535
            assert back[c.name].recipe == json.loads(json.dumps(c.recipe))

    def test_load_pairs_reads_8bit_alpha_and_bounds_size(self, tmp_path: Path) -> None:
        """Plain 8-bit alpha PNGs load as /255; max_side shrinks image and alpha together."""
        alphas = _write_portraits(tmp_path)
        cases = load_pairs(tmp_path)
        assert np.array_equal(cases[0].alpha, alphas[0])
        small = load_pairs(tmp_path, max_side=100)
        assert all(max(c.image.shape[:2]) == 100 and c.alpha.shape == c.image.shape[:2] for c in small)

    def test_load_pairs_errors(self, tmp_path: Path) -> None:
        """A folder without the layout, an image without alpha, or no images at all is an error."""
        with pytest.raises(BshmError, match="expected image/ and alpha/"):
            load_pairs(tmp_path)
        (tmp_path / "image").mkdir()
        (tmp_path / "alpha").mkdir()
        with pytest.raises(BshmError, match="no images"):
            load_pairs(tmp_path)
        cv2.imwrite(str(tmp_path / "image" / "x.png"), np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(BshmError, match="no alpha"):
            load_pairs(tmp_path)

    def test_read_16bit_alpha(self, tmp_path: Path) -> None:
        """A 16-bit grey PNG is read at full precision."""
        a = np.array([[0, 1, 32768, 65535]], np.uint16)
        cv2.imwrite(str(tmp_path / "a.png"), a)
        assert np.allclose(_read_alpha(tmp_path / "a.png"), a / 65535.0)

    def test_case_validates_arrays(self) -> None:
        """A Case refuses an alpha that does not match its image."""
        with pytest.raises(ValueError, match="alpha"):
            Case("x", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.float32))

    @needs_data
    def test_shared_portraits(self) -> None:
        """30 cases from the shared portraits: every portrait twice, every backdrop kind, bounded size."""
        cases = make_cases(DATA, 30, seed=0, max_side=384)
        assert len(cases) == 30
        sources = [c.recipe["source"] for c in cases]
        assert all(sources.count(s) >= 2 for s in set(sources)) and len(set(sources)) == 15
        assert {c.recipe["backdrop"]["kind"] for c in cases} == set(BACKDROPS)
        assert all(max(c.image.shape[:2]) <= 384 for c in cases)


class TestRunner:
    def test_truth_scores_zero_and_zeros_score_the_alpha_mass(self, tmp_path: Path) -> None:
        """The truth itself scores 0; an all-zero matte scores 1000 × mean alpha."""
        _write_portraits(tmp_path)
        cases = make_cases(tmp_path, 3, seed=0, max_side=128)
        truth = {c.image.tobytes(): c.alpha for c in cases}
        perfect = evaluate(cases, lambda im: truth[im.tobytes()], "truth", warmup=0)
        assert all(c.scores.sad == 0 and c.scores.conn == 0 for c in perfect.cases)
        zeros = evaluate(cases, lambda im: np.zeros(im.shape[:2], np.float32), "zeros")
        for r, c in zip(zeros.cases, cases, strict=True):
            assert r.scores.sad == pytest.approx(1000 * float(c.alpha.mean()), rel=1e-6)
            assert r.seconds >= 0

    def test_warmup_and_copies(self) -> None:
        """Warm-up calls are extra and untimed; the function gets a copy it may scribble on."""
        case = Case("c", np.full((8, 8, 3), 9, np.uint8), np.zeros((8, 8), np.float32))
        calls = []

        def fn(im: np.ndarray) -> np.ndarray:
            calls.append(1)
            im[:] = 0
            return np.zeros(im.shape[:2], np.float32)

        evaluate([case, case], fn, "x", warmup=2)
        assert len(calls) == 4
        assert (case.image == 9).all()

    def test_wrong_shape_is_a_model_error(self) -> None:
        """A matte of the wrong size stops the run with ModelError naming the case."""
        case = Case("c", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32))
        with pytest.raises(ModelError, match="c: matte has shape"):
            evaluate([case], lambda im: np.zeros((4, 4), np.float32), "x", warmup=0)

    def test_accepts_uint8_and_hw1(self) -> None:
        """An 8-bit or H×W×1 matte is accepted and read as alpha/255."""
        case = Case("c", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.float32))
        r = evaluate([case], lambda im: np.full((8, 8, 1), 255, np.uint8), "x", warmup=0)
        assert r.cases[0].scores.sad == 0

    def test_aggregate(self) -> None:
        """Mean, median and worst are computed per quantity over the cases."""
        res = EvalResult(
            "m",
            tuple(CaseResult(f"c{i}", Scores(v, v / 2, 0.0, 0.0, 0.0), 0.1 * v) for i, v in enumerate([1.0, 2.0, 6.0])),
        )
        agg = res.aggregate()
        assert (agg["sad"].mean, agg["sad"].median, agg["sad"].worst) == (3.0, 2.0, 6.0)
        assert agg["soft_sad"].worst == 3.0
        assert agg["seconds"].median == pytest.approx(0.2)


class TestReport:
    def _results(self) -> list[EvalResult]:
        a = EvalResult(
            "isnet",
            (CaseResult("c1", Scores(40, 10, 0.02, 5, 38), 1.2), CaseResult("c2", Scores(20, 8, 0.01, 3, 19), 1.0)),
        )
        b = EvalResult("selfie", (CaseResult("c1", Scores(22, 12, 0.01, 6, 21), 0.05),))
        return [a, b]

    def test_json_round_trip(self) -> None:
        """The JSON report is serialisable and reads back to the same results."""
        data = json.loads(json.dumps(to_json(self._results())))
        assert data["results"][0]["aggregate"]["sad"]["mean"] == 30.0
        assert result_from_dict(data["results"][1]) == self._results()[1]
        assert result_to_dict(self._results()[0])["n"] == 2

    def test_markdown_tables(self) -> None:
        """The summary has one row per label with the best value bold; the per-case table fills gaps."""
        summary = markdown_summary(self._results())
        rows = [line for line in summary.splitlines() if line.startswith("| isnet") or line.startswith("| selfie")]
        assert len(rows) == 2
        assert "**22.0**" in rows[1] and "**0.05**" in rows[1]
        per_case = markdown_per_case(self._results())
        assert "| c2 | 20.0 | 8.0 | – | – |" in per_case

    def test_write_report(self, tmp_path: Path) -> None:
        """write_report leaves report.json and report.md in the folder."""
        j, m = write_report(self._results(), tmp_path / "r")
        assert json.loads(j.read_text())["results"][1]["label"] == "selfie"
        assert "## Per case" in m.read_text()


class TestCommand:
    def test_eval_with_groups_end_to_end(self, tmp_path: Path, model_dir: Path) -> None:
        """``bshm-watchd eval --groups 1`` composites groups, runs the real (selfie) pipeline and writes both
        reports, the title naming the group share."""
        from bshm_watchd.cli import main

        _write_portraits(tmp_path / "src")
        out = tmp_path / "out"
        rc = main(["eval", "--data", str(tmp_path / "src"), "-n", "3", "--groups", "1", "--max-side", "160",
                   "--model", "selfie", "--model-dir", str(model_dir), "-o", str(out)])
        assert rc == 0
        report = json.loads((out / "report.json").read_text())
        (result,) = report["results"]
        assert result["label"] == "selfie" and result["n"] == 3
        assert all("-group" in c["name"] for c in result["cases"])
        assert "groups 1" in (out / "report.md").read_text().splitlines()[0]


class TestAblation:
    def test_each_part_switched_off_once(self) -> None:
        """--ablate's variants share fusion's models and switch off one part each, then all of them."""
        from bshm_watchd.engine.fusion import FusionMatter, FusionParams
        from bshm_watchd.evaluation.command import ablations

        class Flat(_PerImage):
            name = "flat"

            def predict(self, rgb: np.ndarray) -> np.ndarray:
                return np.full(rgb.shape[:2], 0.5, np.float32)

        sem, fine, third, large = Flat(), Flat(), Flat(), Flat()
        fused = FusionMatter(sem, fine, FusionParams(), matting=third, matting_large=large)
        variants = dict(ablations(fused))
        assert list(variants) == ["fusion no base rules", "fusion no rvm", "fusion no large rvm copy",
                                  "fusion no mounts", "fusion no strokes",
                                  "fusion no denoise",
                                  "fusion no half denoise", "fusion no stretch", "fusion no tiles",
                                  "fusion no people crop",
                                  "fusion no fill", "fusion no cut", "fusion no gate", "fusion no extend",
                                  "fusion no complete", "fusion no prune", "fusion no steepen",
                                  "fusion no band refine",
                                  "fusion pick only"]
        for v in variants.values():
            assert isinstance(v, FusionMatter) and v.semantic is sem and v.fine is fine and v.matting is third
            assert v.matting_large is large
        assert not variants["fusion no rvm"].params.matting and variants["fusion no rvm"].params.mounts
        no_large = variants["fusion no large rvm copy"].params
        assert not no_large.matting_large and no_large.matting and fused.params.matting_large
        assert not variants["fusion no mounts"].params.mounts and variants["fusion no mounts"].params.fill
        assert not variants["fusion no band refine"].refine and variants["fusion no band refine"].params == fused.params
        pick = variants["fusion pick only"]
        assert not variants["fusion no denoise"].params.denoise
        half = variants["fusion no half denoise"].params
        assert fused.params.denoise_half > 0 and half.denoise and half.denoise_half == 0
        assert fused.params.crop_below > 0 and variants["fusion no people crop"].params.crop_below == 0
        for plain in (variants["fusion no base rules"].params, pick.params):
            assert plain.prefer_fine[0] > 1.0 and plain.small_base[0] == 0.0
        assert not (pick.params.mounts or pick.params.strokes or pick.params.denoise or pick.params.stretch
                    or pick.params.tiles or pick.params.crop_below or pick.params.fill or pick.params.cut
                    or pick.params.gate
                    or pick.params.extend or pick.params.complete or pick.params.prune or pick.params.steepen != 1.0
                    or pick.params.matting or pick.refine)
        assert not variants["fusion no complete"].params.complete and variants["fusion no complete"].params.extend
        assert not variants["fusion no prune"].params.prune and variants["fusion no prune"].params.complete
        with pytest.raises(TypeError, match="fusion"):
            ablations(Flat())  # type: ignore[arg-type]


class TestFusionParts:
    def test_parts_change_the_matte(self) -> None:
        """Fill, cut and gate each do what they say on two disagreeing masks (fine is the base here)."""
        from bshm_watchd.engine.fusion import FusionParams, confidence, fuse

        h = w = 200
        fine = np.zeros((h, w), np.float32)
        fine[40:160, 60:140] = 1.0
        fine[90:110, 90:110] = 0.7  # unsure inside the subject
        fine[170:190, 10:30] = 0.3  # unsure on the backdrop
        fine[5:8, 5:8] = 1.0  # a speck far from the subject
        sem = np.zeros((h, w), np.float32)
        sem[40:160, 60:140] = 1.0
        sem[120:160, 60:140] = 0.6  # semantic is the less confident mask: fine is the base
        assert confidence(fine) > confidence(sem) > 0.3
        on, off = FusionParams(gate=False), FusionParams
        assert fuse(sem, fine, on)[100, 100] == 1.0
        assert fuse(sem, fine, off(gate=False, fill=False))[100, 100] == pytest.approx(0.7)
        assert fuse(sem, fine, on)[180, 20] == 0.0
        assert fuse(sem, fine, off(gate=False, cut=False))[180, 20] == pytest.approx(0.3)
        assert fuse(sem, fine, on)[6, 6] == 1.0
        assert fuse(sem, fine, FusionParams())[6, 6] < 0.05

    def test_base_is_isnet_when_both_are_sure(self) -> None:
        """Both masks are sure and isnet only a little less so: isnet is the base, and its arm (which selfie
        lacks) stays in the matte; when isnet must be the more confident (``prefer_fine`` off), it is lost."""
        from bshm_watchd.engine.fusion import FusionParams, confidence, fuse

        h = w = 200
        sem = np.zeros((h, w), np.float32)
        sem[60:190, 70:130] = 1.0
        fine = sem.copy()
        fine[98:112, 20:70] = 1.0  # the arm
        sem = cv2.GaussianBlur(sem, (0, 0), 1.0)
        fine = cv2.GaussianBlur(fine, (0, 0), 1.2)  # a little softer: a little less confident
        c_sem, c_fine = confidence(sem), confidence(fine)
        assert 0.8 <= c_fine < c_sem <= c_fine + 0.05
        off = FusionParams(gate=False, prefer_fine=(1.1, 0.0))
        assert fuse(sem, fine, FusionParams(gate=False))[105, 40] == pytest.approx(1.0, abs=0.01)
        assert fuse(sem, fine, off)[105, 40] < 0.05
        wide = cv2.GaussianBlur(fine, (0, 0), 4.0)  # isnet far less sure: selfie stays the base
        assert confidence(wide) < c_sem - 0.05
        assert fuse(sem, wide, FusionParams(gate=False))[105, 40] < 0.5

    def test_small_confident_base_gives_way(self) -> None:
        """A tiny, sure blob of isnet's beside selfie's large, fairly trusted person: selfie is the base.
        Against an untrusted selfie the blob stays the base."""
        from bshm_watchd.engine.fusion import FusionParams, confidence, fuse

        h = w = 200
        fine = np.zeros((h, w), np.float32)
        fine[100:120, 100:114] = 1.0  # a hand
        sem = np.zeros((h, w), np.float32)
        sem[40:200, 50:150] = 1.0
        sem[40:200, 50:105] = 0.6  # half-sure: too unsure for extend to add the body
        assert confidence(fine) > FusionParams().extend_voice > confidence(sem) >= 0.3
        assert fuse(sem, fine, FusionParams())[60, 120] == 1.0
        assert fuse(sem, fine, FusionParams(small_base=(0.0, 0.3)))[60, 120] < 0.05
        unsure = sem.copy()
        unsure[40:200, 50:130] = 0.6
        assert confidence(unsure) < 0.3
        assert fuse(unsure, fine, FusionParams())[60, 120] < 0.05

    def test_denoise_mattes_a_quiet_copy_when_both_models_fail(self) -> None:
        """Grain hides the subject from both (fake) models: their masks are all unsure. The fusion mattes an
        NL-means denoised copy, where they see the square; a clean scan is never matted twice, and a copy
        that leaves the models unsure is not taken. Grain too coarse for that copy gives way at half size."""
        from bshm_watchd.engine.fusion import FusionMatter, FusionParams

        class GrainBlind(_PerImage):
            name = "grain-blind"

            def __init__(self, sees_through: float = 12.0) -> None:
                self.sees_through, self.calls = sees_through, 0

            def predict(self, rgb: np.ndarray) -> np.ndarray:
                self.calls += 1
                grey = rgb.astype(np.float32).mean(axis=2)
                grain = float(np.abs(grey - cv2.blur(grey, (3, 3))).mean())
                if grain > self.sees_through:
                    return np.full(grey.shape, 0.5, np.float32)
                return (cv2.blur(grey, (5, 5)) > 128).astype(np.float32)

        clean = np.full((96, 96, 3), 60, np.uint8)
        clean[24:72, 30:66] = 200
        noise = np.random.default_rng(3).normal(0, 30, clean.shape)
        grainy = np.clip(clean + noise, 0, 255).astype(np.uint8)
        bare = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, steepen=1.0)

        def run(image: np.ndarray, params: FusionParams, sees: float = 12.0) -> tuple[np.ndarray, int]:
            sem, fine = GrainBlind(sees), GrainBlind(sees)
            return FusionMatter(sem, fine, params, refine=False).predict(image), sem.calls

        found, calls = run(grainy, bare)
        assert calls == 2 and found[48, 48] > 0.99 and found[5, 5] < 0.01
        lost, calls = run(grainy, replace(bare, denoise=False))
        assert calls == 1 and lost[48, 48] < 0.6
        _, calls = run(clean, bare)
        assert calls == 1
        still_lost, calls = run(grainy, bare, sees=0.1)  # the copies do not help: the first answer stays
        assert calls == 3 and np.array_equal(still_lost, run(grainy, replace(bare, denoise=False), sees=0.1)[0])
        # Coarse grain (2 px) that NL-means at full size leaves visible: the copy denoised at half size is
        # matted next, where the models see the square; without it the square stays lost.
        clean2 = np.full((192, 192, 3), 60, np.uint8)
        clean2[48:144, 60:132] = 200
        coarse = cv2.resize(np.random.default_rng(3).normal(0, 45, (96, 96, 3)).astype(np.float32), (192, 192))
        coarse_scan = np.clip(clean2 + coarse, 0, 255).astype(np.uint8)
        found, calls = run(coarse_scan, bare, sees=1.3)
        assert calls == 3 and found[96, 96] > 0.99 and found[10, 10] < 0.01
        lost, calls = run(coarse_scan, replace(bare, denoise_half=0.0), sees=1.3)
        assert calls == 2 and lost[96, 96] < 0.6

    def test_denoised_answer_that_takes_the_frame_is_not_taken(self) -> None:
        """On the denoised copy the (fake) models are sure, but of the backdrop: their person covers 81 % of the
        frame (bokeh and weaves did this on the eval). The first answer stays; with ``denoise_cover`` at 1 the
        backdrop would be the matte."""
        from bshm_watchd.engine.fusion import FusionMatter, FusionParams

        class Backwards(_PerImage):
            name = "backwards"

            def predict(self, rgb: np.ndarray) -> np.ndarray:
                grey = rgb.astype(np.float32).mean(axis=2)
                if float(np.abs(grey - cv2.blur(grey, (3, 3))).mean()) > 12.0:
                    return np.full(grey.shape, 0.5, np.float32)
                return (cv2.blur(grey, (5, 5)) < 128).astype(np.float32)

        clean = np.full((96, 96, 3), 60, np.uint8)
        clean[24:72, 30:66] = 200
        grainy = np.clip(clean + np.random.default_rng(3).normal(0, 30, clean.shape), 0, 255).astype(np.uint8)
        bare = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, steepen=1.0, gate=False)

        def run(params: FusionParams) -> np.ndarray:
            return FusionMatter(Backwards(), Backwards(), params, refine=False).predict(grainy)

        first = run(replace(bare, denoise=False))
        assert np.array_equal(run(bare), first)
        taken = run(replace(bare, denoise_cover=1.0))
        assert taken[5, 5] > 0.99 and taken[48, 48] < 0.01 and not np.array_equal(taken, first)

    def test_steepen_narrows_the_edge_ramp(self) -> None:
        """The last step maps α to clip(0.5 + k·(α − 0.5)); k = 1 leaves the fused matte as it is."""
        from bshm_watchd.engine.fusion import FusionMatter, FusionParams

        class Ramp(_PerImage):
            name = "ramp"

            def predict(self, rgb: np.ndarray) -> np.ndarray:
                a = np.zeros(rgb.shape[:2], np.float32)
                a[:, 40:] = 1.0
                a[:, 30:40] = np.linspace(0.05, 0.95, 10, dtype=np.float32)  # a 10 px edge ramp
                return a

        bare = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, fill=False, cut=False,
                            gate=False, extend=False)
        rgb = np.zeros((64, 64, 3), np.uint8)
        flat = FusionMatter(Ramp(), Ramp(), replace(bare, steepen=1.0), refine=False).predict(rgb)
        steep = FusionMatter(Ramp(), Ramp(), replace(bare, steepen=1.5), refine=False).predict(rgb)
        assert np.allclose(flat, Ramp().predict(rgb))
        assert np.allclose(steep, np.clip(0.5 + 1.5 * (flat - 0.5), 0, 1))
        assert steep[0, 31] == 0.0 and steep[0, 38] == 1.0 and 0.4 < steep[0, 34] < flat[0, 34] < 0.5

    def test_extend_adds_what_the_semantic_mask_is_sure_of_next_to_the_matte(self) -> None:
        """isnet (the base) has the head but not the dark torso below it; selfie is sure of both, and of a
        blob far off on the backdrop. The torso is added with selfie's α, the far blob is not; a small
        patch beside the head only when isnet is not itself very sure of its matte."""
        from bshm_watchd.engine.fusion import FusionParams, confidence, fuse

        h = w = 200
        fine = np.zeros((h, w), np.float32)
        fine[20:90, 70:130] = 1.0  # head
        fine[60:70, 55:70] = 0.4  # an unsure patch the semantic mask is sure of, beside the head
        sem = np.zeros((h, w), np.float32)
        sem[20:90, 75:125] = 0.95
        sem[90:200, 40:160] = 0.97  # torso down to the bottom edge
        sem[85:90, 40:160] = 0.6
        sem[90:200, 140:160] = 0.6  # an unsure side: selfie is the less confident mask
        sem[10:30, 5:25] = 0.99  # a sure blob far from the person
        sem[60:70, 55:70] = 0.93
        assert confidence(fine) > confidence(sem)  # isnet is the base
        on, off = FusionParams(gate=False), FusionParams(gate=False, extend=False)
        with_extend, without = fuse(sem, fine, on), fuse(sem, fine, off)
        assert without[150, 100] == 0.0
        assert with_extend[150, 100] == pytest.approx(0.97)
        assert with_extend[20, 15] == 0.0  # not next to the person
        assert (with_extend >= without).all()  # nothing lowered
        assert with_extend[50, 100] == 1.0
        # isnet is this sure of its matte (≥ extend_fine_sure): the small patch is selfie's, left out ...
        assert confidence(fine) >= on.extend_fine_sure
        assert with_extend[65, 62] == pytest.approx(0.4)
        # ... while from a less confident isnet it is taken, raised to selfie's α.
        doubtful = fuse(sem, fine, FusionParams(gate=False, extend_fine_sure=confidence(fine) + 0.01))
        assert doubtful[65, 62] == pytest.approx(0.93)
        assert doubtful[150, 100] == pytest.approx(0.97)
        assert (doubtful >= without).all()
        unsure = FusionParams(gate=False, extend_voice=confidence(sem) + 0.01)  # a mask this unsure has no say
        assert fuse(sem, fine, unsure)[150, 100] == 0.0

    def test_small_sitter_is_matted_again_as_a_crop(self) -> None:
        """A small sitter on a big print: the (fake) fine model takes the whole print for the subject and the
        semantic one is unsure of the sitter, as both are when the person is a few per cent of their input.
        Seen larger, in the crop around where the semantic model put the person, both get it right."""
        from bshm_watchd.engine.fusion import FusionMatter, FusionParams

        class SmallBlind(_PerImage):
            """Bright pixels are the person; under 5 % of the input, fine → the whole frame, semantic → unsure."""

            name = "small-blind"

            def __init__(self, fine: bool, sees_from: float = 0.05) -> None:
                self.fine, self.sees_from, self.seen = fine, sees_from, []  # type: list[tuple[int, ...]]

            def predict(self, rgb: np.ndarray) -> np.ndarray:
                self.seen.append(rgb.shape)
                person = (rgb[..., 0] > 128).astype(np.float32)
                if person.mean() >= self.sees_from:
                    return person
                return np.ones_like(person) if self.fine else 0.7 * person

        scan = np.full((400, 400, 3), 60, np.uint8)
        scan[260:360, 300:340] = 200  # 2.5 % of the scan
        truth = (scan[..., 0] > 128).astype(np.float32)
        bare = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, denoise=False, steepen=1.0,
                            crop_below=0.0)

        def run(params: FusionParams, image: np.ndarray = scan, sees_from: float = 0.05) -> tuple[np.ndarray, Any]:
            sem = SmallBlind(False, sees_from)
            return FusionMatter(sem, SmallBlind(True, sees_from), params, refine=False).predict(image), sem

        whole, sem = run(bare)  # crop_below 0: the print stays the subject
        assert whole.mean() > 0.9 and len(sem.seen) == 1
        cropped, sem = run(replace(bare, crop_below=0.4))
        assert np.abs(cropped - truth).mean() < 0.002
        assert sem.seen == [(400, 400, 3), (160, 100, 3)]  # the person's box grown by 0.3 of its height
        big = np.full((400, 400, 3), 60, np.uint8)
        big[100:400, 120:280] = 200  # a person this large is not cropped
        _, sem = run(replace(bare, crop_below=0.4), big)
        assert len(sem.seen) == 1
        sharp, sem = run(replace(bare, crop_below=0.4), sees_from=0.01)  # both models sure: no second pass
        assert len(sem.seen) == 1 and np.abs(sharp - truth).mean() < 0.002

    def test_a_crop_no_more_trusted_than_the_first_pass_is_not_taken(self) -> None:
        """The crop's answer replaces the first pass only when its weaker voice is trusted more than the first
        pass's was, and at least ``crop_trusted``: a crop in which a model still fails is no better evidence
        than the whole scan (eval, s13-000: 73.4 SAD with such a crop, 5.8 without; s4-005 at full size,
        a crop trusted 0.11 after a first pass trusted 0: 290.9 with it, 26.6 without)."""
        from bshm_watchd.engine.fusion import FusionMatter, FusionParams

        class Unsure(_PerImage):
            """Semantic: never sure of the bright person. Fine: sure of it on the scan; in a crop, unsure
            (``crop_sure`` False) or sure."""

            name = "unsure"

            def __init__(self, fine: bool, crop_sure: bool) -> None:
                self.fine, self.crop_sure, self.seen = fine, crop_sure, []  # type: list[tuple[int, ...]]

            def predict(self, rgb: np.ndarray) -> np.ndarray:
                self.seen.append(rgb.shape)
                person = (rgb[..., 0] > 128).astype(np.float32)
                if rgb.shape[0] == 400:  # the scan
                    return 0.7 * person if not self.fine else person
                return person if self.crop_sure else 0.6 * person  # 0.6, 0.7: every pixel unsure, trust 0

        scan = np.full((400, 400, 3), 60, np.uint8)
        scan[260:360, 300:340] = 200  # 2.5 % of the scan
        bare = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, denoise=False, steepen=1.0,
                            crop_below=0.4)

        def run(params: FusionParams, crop_sure: bool) -> tuple[np.ndarray, Any]:
            sem = Unsure(False, crop_sure)
            return FusionMatter(sem, Unsure(True, crop_sure), params, refine=False).predict(scan), sem

        first, sem = run(replace(bare, crop_below=0.0), False)
        assert len(sem.seen) == 1 and first[300, 320] > 0.5
        tried, sem = run(bare, False)
        assert len(sem.seen) == 2  # the crop was matted ...
        assert np.array_equal(tried, first)  # ... and, trusted no more (0 both times), not taken
        sure, sem = run(bare, True)  # both voices sure in the crop: taken ...
        assert len(sem.seen) == 2 and not np.array_equal(sure, first)
        assert sure[300, 320] == 1.0 and sure[100, 100] == 0.0
        floor, sem = run(replace(bare, crop_trusted=1.01), True)  # ... unless trusted under crop_trusted
        assert len(sem.seen) == 2 and np.array_equal(floor, first)

    def test_a_crop_that_cuts_the_person_is_grown_once(self) -> None:
        """The crop's matte running into an edge the crop cut through the scan means the box was too small:
        that side is grown by the margin; an edge that is the scan's own edge does not count."""
        from bshm_watchd.engine.fusion import FusionParams, cut_sides, grown

        p = FusionParams(crop_margin=0.3)
        crop = np.zeros((100, 50), np.float32)
        crop[40:, 10:40] = 1.0  # the person runs out of the bottom of the crop
        assert cut_sides(crop, (100, 100, 150, 200), (400, 400), p) == [1]
        assert cut_sides(crop, (100, 300, 150, 400), (400, 400), p) == []  # the scan's own bottom edge
        assert grown((100, 100, 150, 200), [1], (400, 400), p) == (100, 100, 150, 230)
        assert grown((100, 100, 150, 200), [0, 2, 3], (400, 400), p) == (70, 70, 180, 200)
        assert grown((10, 100, 60, 200), [2], (400, 400), p) == (0, 100, 60, 200)  # within the scan
