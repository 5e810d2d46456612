"""Alpha matte errors (Rhemann et al. 2009, the alphamatting.com benchmark), per megapixel.

Inputs are a predicted and a true alpha, H×W floats in [0, 1] of the same shape; every metric
covers the whole image (no trimap). The project states SAD as "sum of absolute alpha errors / 1000,
normalised to one megapixel", i.e. ``sum(|p − t|) / 1000 × 1e6 / (H·W)`` (= 1000 × mean |p − t|;
all wrong everywhere scores 1000). The other sums get the same normalisation, so numbers are
comparable across image sizes:

- ``sad``: sum |p − t| / 1000, per megapixel.
- ``soft_sad``: that sum over the pixels within 7 px of the truth's soft band (0 < t < 1; values
  within half an 8-bit step of 0 or 1 count as 0 or 1), still per megapixel of the *whole* image,
  so ``soft_sad ≤ sad`` and the rest is the error far from any edge.
- ``mse``: the plain mean of (p − t)², not normalised (reports show it ×1e3 and say so).
- ``grad``: sum (|∇p| − |∇t|)² / 1000 per megapixel; ∇ by first-derivative-of-Gaussian filters,
  σ = 1.4, kernels scaled to unit L2 norm (as in the benchmark's MATLAB code).
- ``conn``: connectivity error, thresholds in steps of 0.1, θ = 0.15 (4-connected components),
  sum |φ(p) − φ(t)| / 1000 per megapixel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

METRICS = ("sad", "soft_sad", "mse", "grad", "conn")
"""Field names of ``Scores``, in report order."""

SOFT_BAND_RADIUS = 7
_HALF_STEP = 0.5 / 255  # below half an 8-bit step a value is 0 (or 1) in any saved matte


@dataclass(frozen=True)
class Scores:
    """The errors of one predicted matte (see the module docstring for units)."""

    sad: float
    soft_sad: float
    mse: float
    grad: float
    conn: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _pair(pred: npt.ArrayLike, true: npt.ArrayLike) -> tuple[F64, F64]:
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"alphas must be H×W and the same shape, got {p.shape} and {t.shape}")
    if p.size == 0:
        raise ValueError("alphas are empty")
    for name, a in (("prediction", p), ("truth", t)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} alpha has NaN or infinite values")
        if a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ValueError(f"{name} alpha is outside [0, 1] ({a.min():.4g}..{a.max():.4g})")
    return np.clip(p, 0, 1), np.clip(t, 0, 1)


def _per_megapixel(total: float, shape: tuple[int, ...]) -> float:
    return float(total) / 1000.0 * (1e6 / (shape[0] * shape[1]))


def sad(pred: npt.ArrayLike, true: npt.ArrayLike) -> float:
    """Sum of absolute errors / 1000, per megapixel."""
    p, t = _pair(pred, true)
    return _per_megapixel(np.abs(p - t).sum(), p.shape)


def mse(pred: npt.ArrayLike, true: npt.ArrayLike) -> float:
    """Mean squared error (plain mean, not scaled)."""
    p, t = _pair(pred, true)
    return float(np.mean((p - t) ** 2))


def soft_band(true: npt.ArrayLike, radius: int = SOFT_BAND_RADIUS) -> Mask:
    """Pixels within ``radius`` px (Euclidean) of the truth's soft band 0 < t < 1."""
    t = np.asarray(true, dtype=np.float64)
    band = (t > _HALF_STEP) & (t < 1 - _HALF_STEP)
    if not band.any():
        return band
    # distanceTransform measures each non-zero pixel's distance to the nearest zero (= band pixel).
    dist = cv2.distanceTransform((~band).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.asarray(dist <= radius + 1e-6, dtype=np.bool_)


def soft_band_sad(pred: npt.ArrayLike, true: npt.ArrayLike, radius: int = SOFT_BAND_RADIUS) -> float:
    """SAD over ``soft_band(true, radius)`` only, per megapixel of the whole image."""
    p, t = _pair(pred, true)
    return _per_megapixel(np.abs(p - t)[soft_band(t, radius)].sum(), p.shape)


def _gauss_gradient(a: F64, sigma: float) -> F64:
    """Gradient magnitude by first-derivative-of-Gaussian filters (unit-L2 kernels, replicated border)."""
    half = int(np.ceil(sigma * np.sqrt(-2 * np.log(np.sqrt(2 * np.pi) * sigma * 1e-2))))
    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * sigma**2)) / (sigma * np.sqrt(2 * np.pi))
    kx = g[:, None] * (-x * g / sigma**2)[None, :]
    kx /= np.sqrt((kx**2).sum())
    gx = cv2.filter2D(a, cv2.CV_64F, kx, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.filter2D(a, cv2.CV_64F, np.ascontiguousarray(kx.T), borderType=cv2.BORDER_REPLICATE)
    return np.asarray(np.hypot(gx, gy), dtype=np.float64)


def gradient_error(pred: npt.ArrayLike, true: npt.ArrayLike, sigma: float = 1.4) -> float:
    """Sum of squared differences of Gaussian-gradient magnitudes / 1000, per megapixel."""
    p, t = _pair(pred, true)
    return _per_megapixel(((_gauss_gradient(p, sigma) - _gauss_gradient(t, sigma)) ** 2).sum(), p.shape)


def _largest_component(mask: Mask) -> Mask:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    if n <= 1:
        return np.zeros_like(mask)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return np.asarray(labels == biggest, dtype=np.bool_)


def connectivity_error(pred: npt.ArrayLike, true: npt.ArrayLike, step: float = 0.1, theta: float = 0.15) -> float:
    """Connectivity error (Rhemann et al.): how far each pixel is from being connected to the main body.

    For each threshold the largest 4-connected region where both alphas reach it is the source;
    a pixel's level is the last threshold before it left that region. φ = 1 − d·[d ≥ θ] with
    d = α − level; the error is sum |φ(p) − φ(t)| / 1000, per megapixel.
    """
    p, t = _pair(pred, true)
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    level = np.full(p.shape, -1.0)
    prev = 0.0
    for thr in np.linspace(0, 1, round(1 / step) + 1)[1:]:
        omega = _largest_component((p >= thr) & (t >= thr))
        level[(level == -1) & ~omega] = prev
        prev = float(thr)
    level[level == -1] = 1.0
    dp, dt = p - level, t - level
    phi_p = 1 - dp * (dp >= theta)
    phi_t = 1 - dt * (dt >= theta)
    return _per_megapixel(np.abs(phi_p - phi_t).sum(), p.shape)


def score(pred: npt.ArrayLike, true: npt.ArrayLike) -> Scores:
    """All metrics of one prediction."""
    p, t = _pair(pred, true)
    return Scores(
        sad=sad(p, t),
        soft_sad=soft_band_sad(p, t),
        mse=mse(p, t),
        grad=gradient_error(p, t),
        conn=connectivity_error(p, t),
    )


def scores_from_dict(data: dict[str, Any]) -> Scores:
    """Inverse of ``Scores.as_dict`` (for reports read back from JSON)."""
    return Scores(**{k: float(data[k]) for k in METRICS})
