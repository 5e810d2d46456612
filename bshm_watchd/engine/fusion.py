"""``fusion``: a person-aware semantic mask (selfie) and a fine boundary mask (isnet), fused.

Measured on aged composites (``bshm-watchd eval``), each model fails in its own way: isnet takes
bright cracks, bokeh and busy backdrops for the subject and turns faded bodies half-transparent;
selfie loses people in monochrome or toned prints and returns nothing for small subjects. A
failing model is rarely *confident*: its mask is mostly mid-grey. So:

1. the more confident mask (fewest pixels between 0.1 and 0.9 relative to its area) is the base —
   isnet when both are sure and it is only a little less so, and never a tiny blob beside a large,
   trusted other mask;
2. where both models agree on "person" (eroded), alpha is 1 — fills holes the base left;
3. where both agree on "background" (eroded), alpha is 0 — when the other mask is itself
   confident enough to have a say;
4. components of the result far smaller than the largest one, and everything far from the kept
   components, are faded out (specks, scratches, a stray blob on the backdrop); then what the
   semantic model is sure is person, next to the result but missing from it, is added (``extend``:
   dark clothes on a dark backdrop, a face flattened by a privacy blur; to rvm's voice only regions up
   to 0.6 of the person's area, ``extend_matting_max``); where a voice failed, what
   selfie half-sees (α > 0.25) beside the matte is given to a colour model of the image (GrabCut),
   and the regions it calls person are added (``complete``: a dark shirt under a bust, a faded body);
   where selfie's matte is the base and isnet (not rvm) is the trusted fine voice, what isnet lacks and the
   colour model calls backdrop is removed (``complete.pruned``: bokeh, a card's edge matted with the sitter);
5. the uncertain band is re-solved with closed-form matting on the image (``refine_band``), and the
   edge ramp is steepened (``steepen``: the models' edges follow the print's blur);
6. before all this, a card mount is looked for (``mount``): a window is matted as a crop of its box,
   an oval one with the card painted out, and the matte is cut to the window; an oval found only
   afterwards, because isnet's matte is the window itself, is matted again the same way; a model's
   matte that covers the window almost whole, or most of it where the other model's covers far less (it
   took the print for the subject), is dropped, as if it had found no one.
7. a matte of isnet's made of thin strokes means it matted scratches or cracks: they are inpainted
   and both models run again (``scratches``); when both models fail (neither is confident), heavy
   grain or a busy texture hid the subject: an NL-means denoised copy is matted again (``denoise``),
   and if its answer is not taken, a copy denoised at half size; an answer is taken only when one of
   its voices is confident and neither takes most of the frame.
8. every model call is made twice, on the view and on an autocontrast copy (faded prints stretched to
   full range), and the more confident answer is that model's voice; where a human matting model (rvm)
   is installed it answers too, and its voice replaces isnet's where it is more trusted and covers under
   ``matting_cover`` of the view (isnet's own voice still decides the window-in-matte and strokes retries).
   rvm answers twice, its encoder on a copy at 0.3 of the view and on a 768 px copy; the larger copy's
   answer is its voice where it is more trusted and agrees with the other, or the other found no one
   (``matting_large``).
9. on a long scan the semantic model also sees square tiles; their merged answer replaces its own
   where it is more trusted and agrees with isnet at least as well (``tiles``).
10. last, a small sitter (the people's box, grown by a margin, under ``crop_below`` of the scan) is
   matted again as a crop of that box when one of the two voices failed (trusted under
   ``crop_failed``): in the crop both models see the person larger. isnet took a small sitter's whole
   print for the subject, and selfie, at 256², is unsure of a person a few per cent of its input. The
   box is where selfie put the person; a crop whose matte runs into a side the crop cut is grown on
   that side and tried once more, and otherwise the first answer stays. The crop's answer is taken only
   when its weaker voice is trusted more than the first pass's was (and at least ``crop_trusted``).

Step 5 lives here, not in the generic finishing stage: it is what turns two segmenters into a
matte, and it costs CPU (0.13 s a scan on average) that the single-model paths need not pay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from bshm_watchd.engine.base import RGB8, Alpha, Matter
from bshm_watchd.engine.complete import completed, pruned
from bshm_watchd.engine.mount import find_mount, window_in_matte, window_shape
from bshm_watchd.engine.scratches import without_strokes
from bshm_watchd.engine.tiles import tiled_predictions
from bshm_watchd.refine import disc, refine_band
from bshm_watchd.steps import NlMeans, autocontrast


@dataclass(frozen=True)
class FusionParams:
    agree_erode: float = 0.01
    """Erosion of the agreed-person mask, as a fraction of the longer side."""
    background_erode: float = 0.03
    """Erosion of the agreed-background mask."""
    voice: float = 0.3
    """Minimum confidence of the non-base mask for its background verdict to count."""
    min_component: float = 0.05
    """Components smaller than this fraction of the largest are dropped."""
    keep_margin: float = 0.02
    """Dilation around kept components before the soft gate."""
    prefer_fine: tuple[float, float] = (0.8, 0.05)
    """isnet is the base also when its confidence is at least the first value and at most the second
    below selfie's: both are sure, and isnet's edges and thin parts (an arm, a microphone) are the better."""
    small_base: tuple[float, float] = (0.2, 0.3)
    """The base's person area must be at least the first value × the other mask's when the other's
    confidence reaches the second: a tiny blob is easily confident (isnet on a faded, cracked print kept
    a hand and lost the singer) — then the other mask is the base."""
    mounts: bool = True
    """Look for a card mount first (see ``mount``)."""
    stretch: bool = True
    """Each model also sees an autocontrast copy; its more confident answer is its voice."""
    tiles: bool = True
    """The semantic model also on square tiles of a long scan (see ``tiles``)."""
    strokes: bool = True
    """Matte again without the scratches when isnet's matte is made of them (see ``scratches``)."""
    denoise: bool = True
    """When both models fail (neither voice trusted above ``denoise_below``), matte an NL-means
    denoised copy again: heavy grain or a busy texture hid the subject (see ``predict_batch``)."""
    denoise_below: float = 0.3
    """Both voices under this trust count as failed."""
    denoise_h: float = 20.0
    """NL-means filter strength (luma and colour) of that copy."""
    denoise_accept: float = 0.45
    """The copy's answer replaces the first only when one of its voices is trusted at least this much:
    a denoised copy of bokeh can give a confident wrong matte too, but less confident."""
    denoise_cover: float = 0.6
    """... and only when neither of its voices covers this share of the view or more: where both models
    failed on the scan, a confident answer on the denoised copy that takes most of the frame took the
    backdrop (bokeh, a weave) for the person."""
    denoise_half: float = 0.6
    """When that copy's answer is not taken, a copy halved (by area, so grain averages out four to one),
    NL-means denoised there (``denoise_half_h``) and enlarged again is matted, and its answer is taken when a
    voice is trusted at least this much (and neither covers ``denoise_cover``). Eval, 450 composites: it
    changed one, s3-001 245 → 33 (a faded sitter under grain as coarse as 1.7 px). Taken from trust 0.45, as
    the first copy's is, it also turned s13-021 401 → 92 but s1-017 17 → 403 (selfie's answer half the frame);
    0 turns it off."""
    denoise_half_h: float = 15.0
    """NL-means filter strength of the half-size copy (its grain is already halved)."""
    fill: bool = True
    """Step 2 (agreed person → 1); off only to measure what it brings."""
    cut: bool = True
    """Step 3 (agreed background → 0); off only to measure what it brings."""
    gate: bool = True
    """Step 4 (component gate); off only to measure what it brings."""
    extend: bool = True
    """Step 4b (add what the semantic model is sure of next to the matte; see ``extend``)."""
    extend_sure: float = 0.9
    """Semantic α above which a pixel the matte lacks counts as a sure person."""
    extend_erode: float = 0.005
    """Erosion of those pixels before they are grouped (drops selfie's thin rims), then grown back."""
    extend_touch: float = 0.01
    """A group is added only when it lies within this fraction of the side of the matte."""
    extend_voice: float = 0.6
    """Minimum confidence of the semantic mask for ``extend``: a mostly unsure mask (bokeh, foliage)
    is sure of blobs on the backdrop too."""
    extend_fine_sure: float = 0.9
    """When the fine mask is this confident, ``extend`` adds only regions of at least
    ``extend_min_area``: a clean isnet matte misses whole torsos, not small pieces, and the small
    regions selfie is sure of beside it are its own blobs (a pocket between arm and body, bokeh)."""
    extend_min_area: float = 0.1
    """That smallest region, as a fraction of the matte's person area."""
    extend_matting_max: float = 0.6
    """When the fine voice is the matting model's (rvm), only regions up to this share of the matte's person area
    are added: rvm leaves out at most the lower part of a dark shirt, while a region as large as the person
    that a human matting model left out was the backdrop (eval, 450 composites: blurred scenery s1-007
    413 → 6.5, bokeh s3-003 218 → 8.7, the only two changed; without any extend for rvm's voice dark
    shirts were lost, s6-004 31 → 201). For isnet's voice there is no such bound: it drops whole dark torsos."""
    complete: bool = True
    """Step 4c: where a voice failed, complete the person with a colour model (see ``complete``)."""
    complete_failed: float = 0.5
    """... only when a voice is trusted less than this: where both were sure, the colour model added as
    much backdrop as person."""
    complete_seen: float = 0.25
    """Semantic α above which a pixel the matte lacks is a candidate."""
    complete_min_area: float = 0.05
    """Smallest added region, as a fraction of the matte's person area."""
    prune: bool = True
    """Step 4d: where selfie's matte is the base and isnet is trusted, remove what isnet lacks and a colour
    model calls backdrop (see ``complete.pruned``). Not where rvm's answer is the fine voice: what a human
    matting model leaves out of selfie's person is more often a part of the sitter it missed (a face flattened
    to the backdrop's grey) than backdrop (eval, 450 composites: 15.47 → 15.31, s3-000 76 → 7.0, s5-028
    9.2 → 5.6, none worse; 180 full-size composites unchanged)."""
    prune_voice: float = 0.6
    """... only when isnet's voice is trusted at least this much."""
    prune_below: float = 0.5
    """isnet α under which a pixel of the base's person is a candidate."""
    prune_core: float = 0.01
    """Opening of the candidates, as a fraction of the side (isnet's finer edges are not candidates)."""
    prune_min_area: float = 0.05
    """Smallest removed region, as a fraction of the matte's person area ..."""
    prune_max: float = 0.5
    """... and the most removed in all: where isnet lacks more, it lost the person (dark hair on a dark
    backdrop), and nothing is removed."""
    crop_below: float = 0.4
    """Crop to the people (a second pass, see ``people_box``): when the people found take a box under
    this share of the scan's area, the box (grown by ``crop_margin``) is matted again as a scan of its
    own, so both models see the people larger; 0 turns it off ..."""
    crop_failed: float = 0.5
    """... and only when a voice of the first pass is trusted less than this: one model failed there. Where
    both were sure, a crop changed their answers about as often for the worse as for the better."""
    crop_trusted: float = 0.2
    """A crop's answer is taken only when its weaker voice is trusted more than the first pass's was, and at
    least this much: a crop in which a model still fails is no better evidence than the whole scan."""
    crop_margin: float = 0.3
    """Growth of the people's box on each side, as a fraction of its longer side (at least 2 % of the scan's)."""
    crop_cut: float = 0.05
    """A crop whose matte is person on more than this share of an edge the crop cut through the scan
    cut the people off: it is grown on that side and tried once more; cut again, the first pass stays."""
    matting: bool = True
    """Where a human matting model (rvm) is installed, its answer is the fine voice wherever it is more trusted
    than isnet's (``_more_trusted``); off only to measure what it brings."""
    matting_cover: float = 0.9
    """... but never when it covers this share of the view or more: on grain and bokeh where isnet and selfie
    both failed, rvm at a 512 px copy matted most of the frame with trust 0.6 (s14-017 209 → 657; session 12:
    19.04 without a bar, 18.24 / 18.19 / 18.06 at 0.5 / 0.6 / 0.7). With its copy at ``RVM_RATIO`` of the view
    and extend bounded for its voice, the bar at 0.6 kept out close-ups rvm had right (session 13, the two
    harnesses, 450 / 180 composites: 0.5 15.85 / –, 0.6 15.72 / 12.97, 0.7 15.47 / 12.97, 0.8–1.0 15.47 /
    12.59; s5-019 60 → 14, s6-029 50 → 14, s7-015 36 → 12). 0.9 keeps out a matte that is the whole view."""
    matting_large: bool = True
    """Where the fusion has the matting model on a larger copy too (``matting_large`` of ``FusionMatter``: rvm
    with its encoder on a 768 px copy), that answer replaces the usual one where it is more trusted and either
    agrees with it (IoU ≥ ``matting_large_agree``) or the usual one failed (trusted under
    ``matting_large_failed``). The larger copy gives finer edges on the same person, and finds a small or
    grain-hidden sitter the small copy missed. Session 16, the three harnesses (mean SAD / mean of the per-seed
    worst / soft band): 450 composites 14.77 / 135.6 / 8.35 → 14.01 / 132.3 / 8.07; 180 full-size 12.24 / 77.7
    / 7.12 → 12.12 / 76.0 / 7.15; 180 group photos 63.30 → 60.52. Off only to measure what it brings."""
    matting_large_agree: float = 0.8
    """IoU with the usual answer above which the larger copy's more trusted answer is taken. Without the bar the
    larger copy matted a whole print (full size s4-019 19 → 86, IoU 0.71; 450 composites: no bar 14.03, 0.7
    13.94, 0.8 14.01, 0.9 14.16; full size: no bar 12.50, 0.8 12.12)."""
    matting_large_failed: float = 0.3
    """... or the usual answer trusted under this: it found no one (s0-003 57 → 23, s2-003 180 → 85; 0.1: 14.00)."""
    steepen: float = 1.5
    """Last, α ← clip(0.5 + steepen·(α − 0.5)): the models' edges follow a blurred, rescanned print
    and come out wider than the subject's; 1 leaves the matte as it is."""


def confidence(alpha: Alpha) -> float:
    """1 − (uncertain pixels / mask pixels); 0 for an (almost) empty mask."""
    mask = alpha > 0.5
    area = int(mask.sum())
    if area < 0.005 * alpha.size:
        return 0.0
    uncertain = int(((alpha > 0.1) & (alpha < 0.9)).sum())
    return 1.0 - min(1.0, uncertain / area)


def _trust(alpha: Alpha) -> float:
    """Confidence, except that a matte which is a window's ellipse is no person: a stretched copy of a
    painted-out oval view showed isnet the rim again, and it matted the oval with confidence 0.97."""
    return 0.0 if window_shape(alpha) is not None else confidence(alpha)


def _overlap(a: Alpha, b: Alpha) -> float:
    """IoU of the two mattes' α > 0.5 masks."""
    ma, mb = a > 0.5, b > 0.5
    return float((ma & mb).sum() / max(1, int((ma | mb).sum())))


def _largest_components(alpha: Alpha, params: FusionParams) -> Alpha:
    side = max(alpha.shape)
    mask = (alpha > 0.5).astype(np.uint8)
    if not mask.any():
        return alpha
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, dtype=bool)
    keep[1:] = areas >= params.min_component * areas.max()
    kept = keep[labels].astype(np.uint8)
    dilated = cv2.dilate(kept, disc(params.keep_margin * side)).astype(np.float32)
    gate = cv2.GaussianBlur(dilated, (0, 0), params.keep_margin * side / 2 + 1)
    out: Alpha = alpha * gate
    return out


def extend(alpha: Alpha, semantic: Alpha, params: FusionParams, fine_confidence: float = 0.0,
           largest: float = float("inf")) -> Alpha:
    """Add the regions the semantic model is sure are person (α > ``extend_sure``) where ``alpha``
    has none, when they touch ``alpha``'s person: isnet drops dark clothes on a dark backdrop and
    the face a privacy blur flattened, and when it is the base the agreed-person fill cannot bring
    them back. Each region takes the semantic α (its soft rim included), never lowering ``alpha``.
    ``fuse`` calls it only when the semantic mask is confident enough (``extend_voice``); when the
    fine mask is very confident (``fine_confidence`` ≥ ``extend_fine_sure``), small regions are
    left out (``extend_min_area``); regions larger than ``largest`` times the matte's person area always are."""
    side = max(alpha.shape)
    sure = cv2.erode(((semantic > params.extend_sure) & (alpha < 0.5)).astype(np.uint8),
                     disc(params.extend_erode * side))
    if not sure.any():
        return alpha
    near = cv2.dilate((alpha > 0.5).astype(np.uint8), disc(params.extend_touch * side)) > 0
    _, labels, stats, _ = cv2.connectedComponentsWithStats(sure)
    touching = np.unique(labels[near & (sure > 0)])
    touching = touching[touching > 0]
    grow = disc(params.extend_erode * side)
    person = max(1, int((alpha > 0.5).sum()))
    smallest = params.extend_min_area * person if fine_confidence >= params.extend_fine_sure else 0.0
    if smallest > 0 or largest < float("inf"):
        touching = np.array([k for k in touching
                             if smallest <= _grown_area(labels, stats, k, grow, semantic) <= largest * person],
                            dtype=np.int32)
    where = cv2.dilate(np.isin(labels, touching).astype(np.uint8), grow).astype(bool) & (semantic > 0.5)
    out: Alpha = alpha.copy()
    out[where] = np.maximum(out[where], semantic[where])
    return out


def _grown_area(labels: npt.NDArray[Any], stats: npt.NDArray[Any], label: int, grow: npt.NDArray[Any],
                semantic: Alpha) -> int:
    """Pixels of region ``label`` grown by ``grow`` where the semantic α > 0.5, dilated within the
    region's own box (padded by the element's reach) rather than over the whole frame."""
    x, y, w, h = (int(v) for v in stats[label, :4])
    r = grow.shape[0] // 2
    y0, y1, x0, x1 = max(0, y - r), min(labels.shape[0], y + h + r), max(0, x - r), min(labels.shape[1], x + w + r)
    region = (labels[y0:y1, x0:x1] == label).astype(np.uint8)
    grown = cv2.dilate(region, grow).astype(bool) & (semantic[y0:y1, x0:x1] > 0.5)
    return int(grown.sum())


def _fine_is_base(semantic: Alpha, fine: Alpha, c_sem: float, c_fine: float, params: FusionParams) -> bool:
    """Step 1's choice: the more confident mask; isnet also when it is confident and only a little less
    so (``prefer_fine``); but never a mask far smaller than a trusted other one (``small_base``)."""
    fine_base = c_fine >= c_sem or (c_fine >= params.prefer_fine[0] and c_fine >= c_sem - params.prefer_fine[1])
    base, other, c_other = (fine, semantic, c_sem) if fine_base else (semantic, fine, c_fine)
    if c_other >= params.small_base[1] and \
            np.count_nonzero(base > 0.5) < params.small_base[0] * np.count_nonzero(other > 0.5):
        return not fine_base
    return fine_base


def fuse(semantic: Alpha, fine: Alpha, params: FusionParams) -> Alpha:
    """Steps 1–4b (base choice, fill, cut, gate, extend) on the two voices."""
    return _fused(semantic, fine, params, _Base.of(semantic, fine, params))


@dataclass(frozen=True)
class _Base:
    """Step 1's choice and the confidences it was made from (the finish asks them again for the pruning)."""

    c_sem: float
    c_fine: float
    fine: bool
    """isnet's matte is the base."""

    @classmethod
    def of(cls, semantic: Alpha, fine: Alpha, params: FusionParams) -> _Base:
        c_sem, c_fine = confidence(semantic), confidence(fine)
        return cls(c_sem, c_fine, _fine_is_base(semantic, fine, c_sem, c_fine, params))


def _fused(semantic: Alpha, fine: Alpha, params: FusionParams, choice: _Base, by_matting: bool = False) -> Alpha:
    """``by_matting``: the fine voice is the matting model's (``extend_matting_max`` bounds what extend adds)."""
    side = max(semantic.shape)
    c_sem, c_fine = choice.c_sem, choice.c_fine
    base, c_other = (fine, c_sem) if choice.fine else (semantic, c_fine)
    alpha = base.copy()
    if params.fill:
        person = ((fine > 0.5) & (semantic > 0.5)).astype(np.uint8)
        alpha[cv2.erode(person, disc(params.agree_erode * side)).astype(bool)] = 1.0
    if params.cut and c_other > params.voice:
        background = ((fine < 0.5) & (semantic < 0.5)).astype(np.uint8)
        alpha[cv2.erode(background, disc(params.background_erode * side)).astype(bool)] = 0.0
    if params.gate:
        alpha = _largest_components(alpha, params)
    if params.extend and c_sem >= params.extend_voice:
        alpha = extend(alpha, semantic, params, c_fine,
                       params.extend_matting_max if by_matting else float("inf"))
    out: Alpha = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    return out


@dataclass(frozen=True)
class _Answer:
    """One scan's fused matte, with what the crop pass decides on (all on the scan's grid)."""

    alpha: Alpha
    semantic: Alpha
    """The semantic voice: where the people are."""
    weakest: float
    """The lesser trust of the two voices as fused (the completion and the crop pass both ask it)."""


class FusionMatter:
    """The default model: ``fuse(selfie, isnet)``, with rvm's answer in isnet's place where it is more trusted."""

    name = "fusion"

    def __init__(self, semantic: Matter, fine: Matter, params: FusionParams | None = None, *,
                 refine: bool = True, matting: Matter | None = None, matting_large: Matter | None = None) -> None:
        self.semantic = semantic
        self.fine = fine
        self.matting = matting
        """A human matting model (rvm), where installed: a second candidate for the fine voice."""
        self.matting_large = matting_large
        """The same model on a larger copy (rvm at 768 px), asked beside it (``FusionParams.matting_large``)."""
        self.params = params or FusionParams()
        self.refine = refine
        # The batched pipeline sizes GPU batches from this; isnet is the part that batches.
        self.batch_size = int(getattr(fine, "batch_size", 1))

    def _voices(self, views: list[RGB8]) -> tuple[list[Alpha], list[Alpha], list[bool]]:
        """Each model's answer per view (see ``_answers``), with the fine voice the more trusted of isnet's
        and the matting model's, and whether it is the matting model's."""
        sem, fine, matting = self._answers(views)
        return sem, *_more_trusted(fine, matting, self.params)

    def _answers(self, views: list[RGB8]) -> tuple[list[Alpha], list[Alpha], list[Alpha] | None]:
        """Each model's answer per view: selfie's, isnet's and the matting model's (None without one). With
        ``stretch``, the more trusted of the view and its autocontrast copy (one batch of both, so a GPU sees
        them together); with ``tiles``, the semantic model's answer on square tiles where it is more trusted
        and agrees with isnet as well."""
        both = views + [autocontrast(v) for v in views] if self.params.stretch else list(views)
        sem = self.semantic.predict_batch(both)
        fine = self.fine.predict_batch(both)
        matting = self.matting.predict_batch(both) if self.matting is not None and self.params.matting else None
        if matting is not None and self.matting_large is not None and self.params.matting_large:
            matting = [_larger_if_better(m, large, self.params)
                       for m, large in zip(matting, self.matting_large.predict_batch(both), strict=True)]
        if self.params.tiles:
            for k, tiled in enumerate(tiled_predictions(self.semantic, both)):
                if tiled is not None and _trust(tiled) > _trust(sem[k]) and \
                        _overlap(tiled, fine[k]) >= _overlap(sem[k], fine[k]):
                    sem[k] = tiled
        if not self.params.stretch:
            return sem, fine, matting
        n = len(views)
        voices = [[a if _trust(a) >= _trust(b) else b for a, b in zip(out[:n], out[n:], strict=True)]
                  for out in (sem, fine, matting or [])]
        return voices[0], voices[1], voices[2] if matting is not None else None

    def _denoised_if_failed(self, view: RGB8, sem: Alpha, fine: Alpha, rvm: bool) -> tuple[Alpha, Alpha, bool]:
        """Both voices failed: matte an NL-means denoised copy and keep its answer when it is confident; else
        the same at half size (``denoise_half``). ``rvm``: the fine voice is the matting model's (so is the
        third value returned)."""
        p = self.params
        if max(_trust(sem), _trust(fine)) >= p.denoise_below:
            return sem, fine, rvm
        quiet = NlMeans(step="nlmeans", h=p.denoise_h, h_color=p.denoise_h).apply(view)
        (sem2,), (fine2,), (rvm2,) = self._voices([quiet])
        if self._confident(sem2, fine2, p.denoise_accept):
            return sem2, fine2, rvm2
        if p.denoise_half <= 0:
            return sem, fine, rvm
        h, w = view.shape[:2]
        small = cv2.resize(view, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
        small = NlMeans(step="nlmeans", h=p.denoise_half_h, h_color=p.denoise_half_h).apply(small)
        (sem3,), (fine3,), (rvm3,) = self._voices([cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)])
        return (sem3, fine3, rvm3) if self._confident(sem3, fine3, p.denoise_half) else (sem, fine, rvm)

    def _confident(self, sem: Alpha, fine: Alpha, accept: float) -> bool:
        """A denoised copy's answer is taken: a voice trusted ≥ ``accept`` and neither covers ``denoise_cover``."""
        return max(_trust(sem), _trust(fine)) >= accept and \
            max(float(np.mean(sem > 0.5)), float(np.mean(fine > 0.5))) < self.params.denoise_cover

    def _finish(self, semantic: Alpha, fine: Alpha, rgb: RGB8, trusts: tuple[float, float],
                rvm: bool = False) -> Alpha:
        """Steps 1–5 on the two voices; ``trusts`` are theirs (semantic, fine); ``rvm``: the fine voice is the
        matting model's."""
        p = self.params
        choice = _Base.of(semantic, fine, p)
        alpha = _fused(semantic, fine, p, choice, rvm)
        if p.complete and min(trusts) < p.complete_failed:
            alpha = completed(alpha, semantic, rgb, seen=p.complete_seen, min_area=p.complete_min_area)
        if p.prune and not rvm and trusts[1] >= p.prune_voice and not choice.fine:
            alpha = pruned(alpha, fine, rgb, below=p.prune_below, core=p.prune_core, min_area=p.prune_min_area,
                           max_share=p.prune_max)
        alpha = refine_band(alpha, rgb) if self.refine else alpha
        if p.steepen == 1.0:
            return alpha
        out: Alpha = np.clip(0.5 + p.steepen * (alpha - 0.5), 0.0, 1.0).astype(np.float32)
        return out

    def predict(self, rgb: RGB8) -> Alpha:
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: list[RGB8]) -> list[Alpha]:
        """Each scan's matte; small sitters whose first pass had a failed voice are matted again as crops."""
        p = self.params
        first = self._matte(images)
        out = [answer.alpha for answer in first]
        if p.crop_below <= 0:
            return out
        pending = [(i, box) for i, answer in enumerate(first)
                   if (box := people_box(answer.semantic, p)) is not None and answer.weakest < p.crop_failed]
        for attempt in range(2):  # a crop that cut the people is grown on the cut sides and tried once more
            crops = self._matte([crop(images[i], box) for i, box in pending])
            again = []
            for (i, box), answer in zip(pending, crops, strict=True):
                sides = cut_sides(answer.alpha, box, images[i].shape[:2], p)
                if not sides:
                    if answer.weakest > first[i].weakest and answer.weakest >= p.crop_trusted:
                        out[i] = paste(answer.alpha, box, images[i].shape[:2])
                elif attempt == 0:
                    again.append((i, grown(box, sides, images[i].shape[:2], p)))
            pending = again
        return out

    def _matte(self, images: list[RGB8]) -> list[_Answer]:
        """Steps 1–9 and the finish for a batch of scans (or of crops: the people crop calls it again)."""
        mounts = [find_mount(im) if self.params.mounts else None for im in images]
        views = [m.view(im) if m is not None else im for m, im in zip(mounts, images, strict=True)]
        sem, isnet, matting = self._answers(views)
        fine, rvm = _more_trusted(isnet, matting, self.params)
        if self.params.mounts:  # a window the colours hid, given away by isnet's matte: matte again
            for i, im in enumerate(images):
                found = window_in_matte(isnet[i], im) if mounts[i] is None else None
                if found is not None:
                    mounts[i], views[i] = found, found.view(im)
                    (sem[i],), (isnet[i],), again = self._answers([views[i]])
                    (fine[i],), (rvm[i],) = _more_trusted([isnet[i]], again, self.params)
        if self.params.strokes:  # isnet matted scratches or cracks: paint them out and matte again
            for i, view in enumerate(views):
                clean = without_strokes(view, isnet[i])
                if clean is not None:
                    (sem[i],), (fine[i],), (rvm[i],) = self._voices([clean])
        if self.params.denoise:
            for i, view in enumerate(views):
                sem[i], fine[i], rvm[i] = self._denoised_if_failed(view, sem[i], fine[i], rvm[i])
        # A matte that is the whole window (or most of it, where the other's covers far less) says nothing of
        # the sitter. Dropped after the denoise retry, not before: the retry then mattes the window again
        # (eval, s9-002: 587 → 703 dropped before, 140 after).
        for i, mount in enumerate(mounts):
            if mount is not None:
                s, f = sem[i], fine[i]
                sem[i] = np.zeros_like(s) if mount.outvoted(s, f) else s
                if mount.outvoted(f, s):
                    fine[i], rvm[i] = np.zeros_like(f), False
        out: list[_Answer] = []
        for s, f, by_rvm, view, mount, im in zip(sem, fine, rvm, views, mounts, images, strict=True):
            trusts = _trust(s), _trust(f)
            alpha, semantic = self._finish(s, f, view, trusts, by_rvm), s
            if mount is not None:
                alpha, semantic = mount.paste(alpha, im.shape[:2]), mount.paste(s, im.shape[:2])
            out.append(_Answer(alpha, semantic, min(trusts)))
        return out


def _larger_if_better(usual: Alpha, large: Alpha, params: FusionParams) -> Alpha:
    """The matting model's answer on the larger copy where it is more trusted than its usual one and agrees
    with it, or where the usual one failed; else the usual one."""
    t_usual = _trust(usual)
    if _trust(large) > t_usual and (t_usual < params.matting_large_failed
                                    or _overlap(usual, large) >= params.matting_large_agree):
        return large
    return usual


def _more_trusted(fine: list[Alpha], matting: list[Alpha] | None,
                  params: FusionParams) -> tuple[list[Alpha], list[bool]]:
    """Per view, the matting model's answer where it is more trusted than isnet's (isnet's without one), and
    whether the answer is the matting model's."""
    if matting is None:
        return fine, [False] * len(fine)
    taken = [_trust(m) > _trust(f) and float(np.mean(m > 0.5)) < params.matting_cover
             for f, m in zip(fine, matting, strict=True)]
    return [m if t else f for f, m, t in zip(fine, matting, taken, strict=True)], taken


Box = tuple[int, int, int, int]
"""x0, y0, x1, y1 in pixels."""


def people_box(alpha: Alpha, params: FusionParams) -> Box | None:
    """The box around the people (α > 0.5 in the semantic voice: where the person-aware model put them),
    grown by ``crop_margin``, when it takes under ``crop_below`` of the scan's area; else None (next to
    nobody found — under the area ``confidence`` calls empty — or the people fill the scan already)."""
    ys, xs = np.nonzero(alpha > 0.5)
    if ys.size < 0.005 * alpha.size:
        return None
    h, w = alpha.shape
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    grow = max(params.crop_margin * max(x1 - x0, y1 - y0), 0.02 * max(h, w))
    x0, y0 = max(0, round(x0 - grow)), max(0, round(y0 - grow))
    x1, y1 = min(w, round(x1 + grow)), min(h, round(y1 + grow))
    if (x1 - x0) * (y1 - y0) >= params.crop_below * h * w:
        return None
    return x0, y0, x1, y1


def crop(rgb: RGB8, box: Box) -> RGB8:
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def paste(alpha: Alpha, box: Box, shape: tuple[int, ...]) -> Alpha:
    """The crop's matte in a frame of ``shape``; 0 outside the box."""
    x0, y0, x1, y1 = box
    out: Alpha = np.zeros(shape[:2], np.float32)
    out[y0:y1, x0:x1] = alpha
    return out


def cut_sides(alpha: Alpha, box: Box, shape: tuple[int, ...], params: FusionParams) -> list[int]:
    """The sides (0 top, 1 bottom, 2 left, 3 right) where the crop's matte runs into an edge the crop cut
    through the scan (not the scan's own edge): more than ``crop_cut`` of the edge is person."""
    x0, y0, x1, y1 = box
    person = alpha > 0.5
    edges = [(y0 > 0, person[:2]), (y1 < shape[0], person[-2:]),
             (x0 > 0, person[:, :2]), (x1 < shape[1], person[:, -2:])]
    return [k for k, (inside, edge) in enumerate(edges) if inside and float(edge.mean()) > params.crop_cut]


def grown(box: Box, sides: list[int], shape: tuple[int, ...], params: FusionParams) -> Box:
    """``box`` grown on ``sides`` by ``crop_margin`` of its longer side, within the scan."""
    x0, y0, x1, y1 = box
    step = round(params.crop_margin * max(x1 - x0, y1 - y0))
    y0 = max(0, y0 - step) if 0 in sides else y0
    y1 = min(shape[0], y1 + step) if 1 in sides else y1
    x0 = max(0, x0 - step) if 2 in sides else x0
    x1 = min(shape[1], x1 + step) if 3 in sides else x1
    return x0, y0, x1, y1
