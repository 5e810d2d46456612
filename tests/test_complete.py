"""Tests for the colour-model completion and pruning of the person (``engine.complete``) and their use in the fusion."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import numpy.typing as npt

from bshm_watchd.engine.complete import completed, pruned
from bshm_watchd.engine.fusion import FusionMatter, FusionParams, confidence

H, W = 200, 160
F32 = npt.NDArray[np.float32]


def _bust(seed: int = 0) -> npt.NDArray[np.uint8]:
    """A light, mottled backdrop; a skin-toned head; under it a dark shirt reaching the bottom edge."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), (205, 200, 190), np.float32)
    img += cv2.GaussianBlur(rng.normal(0, 12, (H, W, 1)).astype(np.float32), (0, 0), 6)[..., None]
    cv2.rectangle(img, (30, 120), (130, H), (35, 30, 30), -1)  # the shirt
    cv2.ellipse(img, (80, 80), (28, 40), 0, 0, 360, (180, 140, 120), -1)  # the head
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _head() -> F32:
    a = np.zeros((H, W), np.float32)
    cv2.ellipse(a, (80, 80), (28, 40), 0, 0, 360, 1.0, -1)
    return a


def _shirt() -> npt.NDArray[np.bool_]:
    m = np.zeros((H, W), np.uint8)
    cv2.rectangle(m, (30, 120), (130, H), 1, -1)
    return (m > 0) & (_head() < 0.5)


class _Fixed:
    """A fake model (the GPU boundary) that answers one given matte for any view of the same size."""

    name = "fixed"

    def __init__(self, alpha: F32) -> None:
        self.alpha = alpha

    def predict(self, rgb: npt.NDArray[np.uint8]) -> F32:
        return self.alpha.copy() if rgb.shape[:2] == self.alpha.shape else np.zeros(rgb.shape[:2], np.float32)

    def predict_batch(self, images: list[npt.NDArray[np.uint8]]) -> list[F32]:
        return [self.predict(im) for im in images]


def test_half_seen_shirt_is_added_and_the_backdrop_is_not() -> None:
    """selfie half-sees the shirt (α 0.4) and, as unsure, a patch of backdrop beside the head; the matte
    has the head only. The shirt (dark, unlike anything round the head) is added whole; the patch (the
    backdrop's own colour) is not."""
    head, shirt = _head(), _shirt()
    semantic = head.copy()
    semantic[shirt] = 0.4
    semantic[40:100, 112:150] = 0.4  # backdrop beside the head
    out = completed(head, semantic, _bust(), seen=0.25, min_area=0.05)
    assert float(out[shirt].mean()) > 0.97
    assert float(out[40:100, 115:150].max()) == 0.0
    assert np.array_equal(out[head > 0.5], head[head > 0.5])
    assert completed(head, semantic, _bust(), seen=0.5, min_area=0.05)[shirt].max() == 0.0  # not half-seen enough


def test_small_regions_are_left_out() -> None:
    """A region the colour model calls person but smaller than ``min_area`` of the matte is not added."""
    head, shirt = _head(), _shirt()
    semantic = head.copy()
    semantic[shirt] = 0.4
    share = shirt.sum() / (head > 0.5).sum()
    assert float(completed(head, semantic, _bust(), seen=0.25, min_area=share * 0.9)[shirt].mean()) > 0.97
    assert completed(head, semantic, _bust(), seen=0.25, min_area=share * 1.1)[shirt].max() == 0.0


def test_fusion_completes_only_where_a_voice_failed() -> None:
    """isnet mattes the head, selfie half-sees head and shirt. selfie, mostly unsure, failed (trust under 0.5):
    the fusion adds the shirt. A selfie sure of a larger head and unsure only of the shirt is trusted above
    0.5: nothing is added (where both were sure, the colour model added backdrop as often as person)."""
    head, shirt = _head(), _shirt()
    bare = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, denoise=False, crop_below=0.0,
                        steepen=1.0)
    unsure = head * 0.55
    unsure[shirt] = 0.55

    def run(semantic: F32, params: FusionParams) -> F32:
        out: F32 = FusionMatter(_Fixed(semantic), _Fixed(head), params, refine=False).predict(_bust())
        return out

    assert confidence(unsure) < 0.5
    assert float(run(unsure, bare)[shirt].mean()) > 0.97
    assert float(run(unsure, replace(bare, complete=False))[shirt].max()) < 0.6
    wide = np.zeros((H, W), np.float32)
    cv2.ellipse(wide, (80, 80), (45, 75), 0, 0, 360, 1.0, -1)  # selfie sure of a wider head and neck
    wide[shirt & (wide < 0.5)] = 0.55
    assert confidence(wide) > 0.5
    assert float(run(wide, bare)[shirt & (wide < 1)].max()) < 0.6
    assert float(run(wide, replace(bare, complete_failed=1.01))[shirt & (wide < 1)].mean()) > 0.97


def test_same_scan_same_matte_whatever_ran_before() -> None:
    """GrabCut's colour models start from k-means on OpenCV's random generator; ``completed`` seeds it, so
    a scan's matte does not depend on what the process drew before (the daemon mattes scans in any order)."""
    rng = np.random.default_rng(1)  # a busy, many-coloured, grainy print: where k-means starts matters
    blotches = cv2.resize(rng.uniform(0, 255, (5, 4, 3)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
    img = np.clip(blotches + rng.normal(0, 25, blotches.shape), 0, 255).astype(np.uint8)
    head = _head()
    semantic = head.copy()
    semantic[_shirt()] = 0.4
    semantic[40:100, 112:150] = 0.4
    outs = []
    for seed in (1, 2, 3):
        cv2.setRNGSeed(seed)
        outs.append(completed(head, semantic, img, seen=0.25, min_area=0.0))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def _lobe() -> npt.NDArray[np.bool_]:
    """A block of plain backdrop right of the head, touching it: what selfie mattes with the sitter."""
    m = np.zeros((H, W), bool)
    m[50:110, 100:150] = True
    return m & (_head() < 0.5) & ~_shirt()


def _selfie_with_lobe() -> F32:
    return ((_head() > 0.5) | _shirt() | _lobe()).astype(np.float32)


def test_pruned_removes_what_isnet_lacks_and_is_backdrop() -> None:
    """selfie mattes head, shirt and a block of backdrop; isnet has the head only. The block (the backdrop's
    colour) is removed; the shirt, which isnet lacks too but whose colour is no backdrop's, stays."""
    lobe, shirt = _lobe(), _shirt()
    out = pruned(_selfie_with_lobe(), _head(), _bust(), below=0.5, core=0.01, min_area=0.05, max_share=1.0)
    assert float(out[lobe].mean()) < 0.05
    assert float(out[shirt].mean()) > 0.97
    assert float(out[_head() > 0.5].min()) == 1.0


def test_pruned_removes_nothing_where_isnet_lacks_too_much() -> None:
    """The share limit: the block is removed only when it is under ``max_share`` of the person; a larger
    share means isnet lost the person, and the matte stays as it is."""
    base, lobe = _selfie_with_lobe(), _lobe()
    share = lobe.sum() / (base > 0.5).sum()
    kept = pruned(base, _head() + _shirt(), _bust(), below=0.5, core=0.01, min_area=0.05, max_share=share * 0.9)
    assert np.array_equal(kept, base)
    gone = pruned(base, _head() + _shirt(), _bust(), below=0.5, core=0.01, min_area=0.05, max_share=share * 1.1)
    assert float(gone[lobe].mean()) < 0.05


def _pruning_case() -> tuple[npt.NDArray[np.bool_], F32, FusionParams]:
    """The block selfie mattes with the sitter, a fine voice unsure of it (α 0.3, trusted about 0.7), and the
    fusion with only the voices, the base choice and steps 2–4d."""
    lobe = _lobe()
    fine = np.clip(_head() + _shirt(), 0, 1).astype(np.float32)
    fine[lobe] = 0.3
    bare = FusionParams(mounts=False, stretch=False, tiles=False, strokes=False, denoise=False, crop_below=0.0,
                        steepen=1.0)
    return lobe, fine, bare


def test_fusion_prunes_selfies_base_where_isnet_is_trusted() -> None:
    """selfie (sure: the base) mattes the sitter and a block of backdrop; isnet mattes the sitter and is unsure
    of the block (α 0.3, so trusted about 0.7). The fusion removes the block; not with ``prune`` off, nor when
    isnet's trust is under ``prune_voice``."""
    lobe, fine, bare = _pruning_case()

    def run(params: FusionParams) -> F32:
        out: F32 = FusionMatter(_Fixed(_selfie_with_lobe()), _Fixed(fine), params, refine=False).predict(_bust())
        return out

    assert 0.6 < confidence(fine) < 0.8
    assert float(run(bare)[lobe].mean()) < 0.05
    assert float(run(replace(bare, prune=False))[lobe].mean()) > 0.97
    assert float(run(replace(bare, prune_voice=0.8))[lobe].mean()) > 0.97


def test_fusion_does_not_prune_where_the_fine_voice_is_rvms() -> None:
    """The same answers, but the trusted fine voice is the matting model's (isnet failed: mid-grey). What a
    human matting model leaves out of selfie's person is more often a part of the sitter it missed, so the
    block stays."""
    lobe, fine, bare = _pruning_case()
    failed = np.full((H, W), 0.5, np.float32)
    out = FusionMatter(_Fixed(_selfie_with_lobe()), _Fixed(failed), bare, refine=False,
                       matting=_Fixed(fine)).predict(_bust())
    assert float(out[lobe].mean()) > 0.97
    as_isnet = FusionMatter(_Fixed(_selfie_with_lobe()), _Fixed(fine), bare, refine=False,
                            matting=_Fixed(failed)).predict(_bust())
    assert float(as_isnet[lobe].mean()) < 0.05
