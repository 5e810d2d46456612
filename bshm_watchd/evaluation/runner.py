"""Run a matting function over benchmark cases: time each call, score it, aggregate."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from structlog.typing import FilteringBoundLogger

from bshm_watchd.engine.base import RGB8, Alpha
from bshm_watchd.errors import ModelError
from bshm_watchd.evaluation.composite import Case
from bshm_watchd.evaluation.metrics import METRICS, Scores, score, scores_from_dict

MatteFn = Callable[[RGB8], Alpha]
"""Anything with ``Matter.predict``'s shape: H×W×3 uint8 RGB → H×W float32 alpha in [0, 1]."""

AGGREGATED = (*METRICS, "seconds")
"""The quantities ``EvalResult.aggregate`` summarises, in report order."""


@dataclass(frozen=True)
class CaseResult:
    """One case's scores and the wall time of the matte call alone."""

    name: str
    scores: Scores
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.scores.as_dict(), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseResult:
        return cls(str(data["name"]), scores_from_dict(data), float(data["seconds"]))


@dataclass(frozen=True)
class Summary:
    """Mean, median and worst (largest) of one quantity over the cases."""

    mean: float
    median: float
    worst: float


@dataclass(frozen=True)
class EvalResult:
    """The results of one labelled method on a set of cases."""

    label: str
    cases: tuple[CaseResult, ...]

    def __post_init__(self) -> None:
        if not self.cases:
            raise ValueError(f"{self.label}: no case results")

    def values(self, quantity: str) -> list[float]:
        """One quantity (a metric name or ``seconds``) for every case, in case order."""
        if quantity not in AGGREGATED:
            raise ValueError(f"unknown quantity {quantity!r}; expected one of {', '.join(AGGREGATED)}")
        if quantity == "seconds":
            return [c.seconds for c in self.cases]
        return [float(getattr(c.scores, quantity)) for c in self.cases]

    def aggregate(self) -> dict[str, Summary]:
        """``Summary`` per quantity in ``AGGREGATED``."""
        out = {}
        for q in AGGREGATED:
            v = self.values(q)
            out[q] = Summary(statistics.fmean(v), statistics.median(v), max(v))
        return out


def _as_alpha(out: object, h: int, w: int, name: str) -> Alpha:
    """Check a matte function's output; a wrong shape means a broken model, not a bad case."""
    arr = np.asarray(out)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.shape != (h, w):
        raise ModelError(f"{name}: matte has shape {arr.shape}, expected {(h, w)}")
    if arr.dtype == np.uint8:  # an 8-bit matte is common enough to accept
        return (arr.astype(np.float32) / 255.0).astype(np.float32)
    return np.asarray(arr, dtype=np.float32)


def evaluate(
    cases: Sequence[Case],
    matte_fn: MatteFn,
    label: str,
    *,
    warmup: int = 1,
    log: FilteringBoundLogger | None = None,
) -> EvalResult:
    """Run ``matte_fn`` on every case's image, time each call, and score it against the case's alpha.

    ``warmup`` untimed calls on the first image come first, so lazy session start-up and
    first-call allocation do not land in the first case's time. The image handed over is a copy:
    a function that edits its input in place cannot touch the case.
    """
    if not cases:
        raise ValueError("no cases to evaluate")
    if warmup < 0:
        raise ValueError(f"warmup must be ≥ 0, got {warmup}")
    log = log or structlog.get_logger(__name__)
    log = log.bind(label=label)
    for _ in range(warmup):
        matte_fn(cases[0].image.copy())
    results = []
    for case in cases:
        image = case.image.copy()
        t0 = time.perf_counter()
        out = matte_fn(image)
        seconds = time.perf_counter() - t0
        alpha = _as_alpha(out, case.alpha.shape[0], case.alpha.shape[1], case.name)
        s = score(alpha, case.alpha)
        results.append(CaseResult(case.name, s, seconds))
        log.info(
            "eval_case", case=case.name, sad=round(s.sad, 2), soft_sad=round(s.soft_sad, 2), ms=round(seconds * 1e3)
        )
    result = EvalResult(label, tuple(results))
    agg = result.aggregate()
    log.info("eval_done", n=len(results), sad_mean=round(agg["sad"].mean, 2), sad_worst=round(agg["sad"].worst, 2))
    return result
