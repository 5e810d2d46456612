"""The fusion's third voice: a human matting model (rvm) as a candidate for the fine voice (fakes at the
model boundary)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bshm_watchd.engine.factory import _rvm
from bshm_watchd.engine.fusion import FusionMatter, FusionParams, _overlap, _trust
from bshm_watchd.modelstore import ModelStore, default_model_dir

SIDE = 96
BARE = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, denoise=False, crop_below=0.0,
                    steepen=1.0)
"""Only the voices, the base choice and fill/cut/gate/extend: what this file is about."""


class Fixed:
    """A fake model that answers every image with the same matte and counts its calls."""

    name = "fixed"

    def __init__(self, alpha: np.ndarray) -> None:
        self.alpha, self.calls = alpha, 0

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.calls += len(images)
        return [self.alpha.copy() for _ in images]


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    a = np.zeros((SIDE, SIDE), np.float32)
    a[y0:y1, x0:x1] = 1.0
    return a


UNSURE = np.full((SIDE, SIDE), 0.5, np.float32)
"""What isnet answers where it failed: mid-grey, trust 0."""
SCAN = np.full((SIDE, SIDE, 3), 90, np.uint8)


def fused(sem: np.ndarray, fine: np.ndarray, matting: np.ndarray | None, params: FusionParams = BARE,
          large: np.ndarray | None = None) -> np.ndarray:
    third = Fixed(matting) if matting is not None else None
    out: np.ndarray = FusionMatter(Fixed(sem), Fixed(fine), params, refine=False, matting=third,
                                   matting_large=Fixed(large) if large is not None else None).predict(SCAN)
    return out


class TestMattingVoice:
    def test_a_more_trusted_matting_answer_is_the_fine_voice(self) -> None:
        """isnet failed (all mid-grey); rvm is sure of a sitter with an arm selfie missed. The arm is in the
        matte with rvm, not without it, nor with ``matting`` off."""
        sem = box(20, 90, 30, 66)
        rvm = box(20, 90, 30, 66) + box(40, 50, 66, 86)
        with_rvm = fused(sem, UNSURE, rvm)
        assert with_rvm[45, 80] > 0.99 and with_rvm[60, 48] > 0.99 and with_rvm[5, 5] < 0.01
        without = fused(sem, UNSURE, None)
        assert without[45, 80] < 0.01 and without[60, 48] > 0.99
        assert np.array_equal(fused(sem, UNSURE, rvm, replace(BARE, matting=False)), without)

    def test_an_answer_that_takes_most_of_the_view_is_not_taken(self) -> None:
        """rvm sure of 94 % of the view (it took a busy backdrop for the person): isnet's answer stays the
        fine voice; with the bar at 1 the backdrop would be taken."""
        sem = box(30, 90, 35, 60)
        backdrop = box(0, 96, 0, 90)
        assert BARE.matting_cover <= float(np.mean(backdrop > 0.5)) < 1.0
        without = fused(sem, UNSURE, None)
        assert np.array_equal(fused(sem, UNSURE, backdrop), without)
        taken = fused(sem, UNSURE, backdrop, replace(BARE, matting_cover=1.0))
        assert taken[10, 70] > 0.99 and without[10, 70] < 0.01

    def test_a_less_trusted_matting_answer_leaves_isnet(self) -> None:
        """isnet sure, rvm mostly unsure: the fusion is what it was without rvm."""
        sem, fine = box(20, 90, 30, 66), box(22, 90, 28, 70)
        vague = np.clip(box(20, 90, 20, 80) * 0.6 + 0.2, 0, 1).astype(np.float32)
        assert np.array_equal(fused(sem, fine, vague), fused(sem, fine, None))

    def test_extend_adds_only_small_regions_to_the_matting_voice(self) -> None:
        """selfie is sure of the sitter, of a shirt below it and of a backdrop region beside it as large as the
        sitter; rvm (the fine voice, isnet failed) has the sitter alone. Extend adds the shirt, a quarter
        of the sitter's area, but not the backdrop region (``extend_matting_max``); to isnet's voice, or
        with the bound lifted, it adds both."""
        person, shirt, beside = box(20, 60, 30, 60), box(60, 70, 32, 58), box(20, 55, 60, 96)
        sem = 0.97 * np.clip(person + shirt + beside, 0, 1).astype(np.float32)
        assert 0.1 * 1200 < float(shirt.sum()) < 0.6 * 1200 < float(beside.sum())  # person: 1200 px
        params = replace(BARE, cut=False, extend_touch=0.05)  # 1 % of this 96 px frame reaches no neighbour
        with_rvm = fused(sem, UNSURE, person, params)
        assert with_rvm[45, 45] > 0.99 and with_rvm[65, 45] > 0.9 and with_rvm[40, 80] < 0.01
        as_isnet = fused(sem, person, None, params)
        assert as_isnet[65, 45] > 0.9 and as_isnet[40, 80] > 0.9
        unbounded = fused(sem, UNSURE, person, replace(params, extend_matting_max=float("inf")))
        assert np.array_equal(unbounded, as_isnet)

    def test_the_matting_model_sees_every_view_the_others_see(self) -> None:
        """With the autocontrast copy on, each model is called on the view and its copy, rvm included."""
        sem, third = Fixed(box(20, 90, 30, 66)), Fixed(box(20, 90, 30, 66))
        FusionMatter(sem, Fixed(UNSURE), replace(BARE, stretch=True), refine=False, matting=third).predict(SCAN)
        assert third.calls == sem.calls == 2


def soft_box(y0: int, y1: int, x0: int, x1: int, ramp: int) -> np.ndarray:
    """A box whose edge is a linear ramp ``ramp`` px wide on each side (uncertain pixels: lower trust)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    dist = np.minimum.reduce([yy - y0, y1 - 1 - yy, xx - x0, x1 - 1 - xx])
    return np.clip(0.5 + dist / (2 * ramp), 0.0, 1.0).astype(np.float32)


class TestLargerCopy:
    """rvm answers on its usual copy and on a larger one; the larger answer is its voice where it is more
    trusted and agrees, or where the usual one found no one."""

    SEM = box(20, 90, 30, 66)

    def test_a_surer_answer_on_the_same_person_is_taken(self) -> None:
        """The usual copy has the sitter with soft edges (trust 0.55) and no arm; the larger one is sure of both
        (IoU 0.85): the arm is in the matte with the larger copy, not without it, nor with ``matting_large``
        off."""
        usual, large = soft_box(20, 90, 30, 66, 3), box(20, 90, 30, 66) + box(40, 50, 66, 86)
        with_large = fused(self.SEM, UNSURE, usual, large=large)
        assert with_large[45, 80] > 0.99 and with_large[60, 48] > 0.99
        assert np.array_equal(with_large, fused(self.SEM, UNSURE, large))
        assert fused(self.SEM, UNSURE, usual)[45, 80] < 0.01
        off = fused(self.SEM, UNSURE, usual, replace(BARE, matting_large=False), large=large)
        assert np.array_equal(off, fused(self.SEM, UNSURE, usual))

    def test_a_more_trusted_answer_elsewhere_is_not_taken(self) -> None:
        """The larger copy is sure of a region the usual answer barely overlaps (a print, a backdrop): the
        usual answer stays; with the agreement bar at 0 it would be taken."""
        usual, elsewhere = soft_box(20, 90, 30, 66, 3), box(10, 90, 20, 90)
        assert _overlap(usual, elsewhere) < BARE.matting_large_agree and _trust(usual) > BARE.matting_large_failed
        assert np.array_equal(fused(self.SEM, UNSURE, usual, large=elsewhere), fused(self.SEM, UNSURE, usual))
        taken = fused(self.SEM, UNSURE, usual, replace(BARE, matting_large_agree=0.0), large=elsewhere)
        assert np.array_equal(taken, fused(self.SEM, UNSURE, elsewhere))

    def test_where_the_usual_answer_failed_the_larger_one_is_taken(self) -> None:
        """The usual copy found no one (all mid-grey, trust 0); the larger one found the sitter."""
        found = box(40, 90, 40, 60)
        with_large = fused(self.SEM, UNSURE, UNSURE, large=found)
        assert np.array_equal(with_large, fused(self.SEM, UNSURE, found))
        assert not np.array_equal(with_large, fused(self.SEM, UNSURE, UNSURE))

    def test_a_less_trusted_larger_answer_leaves_the_usual(self) -> None:
        usual, vaguer = soft_box(20, 90, 30, 66, 2), soft_box(20, 90, 30, 66, 3)
        assert np.array_equal(fused(self.SEM, UNSURE, usual, large=vaguer), fused(self.SEM, UNSURE, usual))


class TestFactory:
    def test_fusion_runs_without_rvm_where_it_is_not_installed(self, tmp_path: Path) -> None:
        """An empty model folder: no matting voice (the fusion is then selfie + isnet, as before rvm)."""
        assert _rvm(ModelStore(tmp_path), "cpu", None) == (None, None)

    def test_rvm_is_loaded_where_it_is_installed(self) -> None:
        store = ModelStore(default_model_dir())
        if not store.file_for("rvm").is_file():
            pytest.skip("rvm is not installed here (`bshm-watchd models fetch rvm`)")
        matter, large = _rvm(store, "cpu", None)
        assert matter is not None and matter.name == "rvm" and large is not None
        for m in (matter, large):
            alpha = m.predict(np.full((64, 48, 3), 128, np.uint8))
            assert alpha.shape == (64, 48) and alpha.dtype == np.float32
