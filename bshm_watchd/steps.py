"""Image steps for profiles: ``analysis`` (the model's copy only) and ``delivery`` (the cut-out's pixels).

Each step is a frozen pydantic model (its parameters, validated once at start-up) with
``apply(rgb) -> rgb`` on H×W×3 uint8 RGB. Analysis steps never touch the delivered pixels.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from bshm_watchd.engine.base import RGB8


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def apply(self, rgb: RGB8) -> RGB8:
        raise NotImplementedError


class WhiteBalance(_Step):
    """Grey-world white balance, blended by ``strength``: removes a yellow/sepia cast."""

    step: Literal["white_balance", "deyellow"]
    strength: float = Field(1.0, ge=0.0, le=1.0)

    def apply(self, rgb: RGB8) -> RGB8:
        f = rgb.astype(np.float32)
        means = f.reshape(-1, 3).mean(axis=0) + 1e-3
        gains = means.mean() / means
        gains = 1.0 + self.strength * (gains - 1.0)
        out: RGB8 = np.clip(f * gains, 0, 255).astype(np.uint8)
        return out


class Clahe(_Step):
    """Contrast-limited adaptive histogram equalisation on L (Lab): lifts faded contrast locally."""

    step: Literal["clahe"]
    clip: float = Field(2.0, gt=0.0, le=40.0)
    tiles: int = Field(8, ge=1, le=64)

    def apply(self, rgb: RGB8) -> RGB8:
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
        clahe = cv2.createCLAHE(clipLimit=self.clip, tileGridSize=(self.tiles, self.tiles))
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        out: RGB8 = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        return out


def autocontrast(rgb: RGB8, low: float = 0.5, high: float = 99.5) -> RGB8:
    """Stretch luminance percentiles ``low``..``high`` to 0..255, the same gain on every channel (tones kept)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    lo, hi = (float(v) for v in np.percentile(grey, [low, high]))
    if hi - lo < 1.0:
        return rgb
    lut = np.clip((np.arange(256, dtype=np.float32) - lo) * 255.0 / (hi - lo) + 0.5, 0, 255).astype(np.uint8)
    out: RGB8 = cv2.LUT(rgb, lut)
    return out


class AutoContrast(_Step):
    """Stretch the faded tonal range to full scale (luminance percentiles, one gain for all channels)."""

    step: Literal["autocontrast"]
    low: float = Field(0.5, ge=0.0, lt=50.0)
    high: float = Field(99.5, gt=50.0, le=100.0)

    def apply(self, rgb: RGB8) -> RGB8:
        return autocontrast(rgb, self.low, self.high)


class Gamma(_Step):
    """Gamma curve (``gamma`` < 1 brightens): lifts dark, underexposed prints."""

    step: Literal["gamma"]
    gamma: float = Field(0.8, gt=0.05, le=5.0)

    def apply(self, rgb: RGB8) -> RGB8:
        lut = (np.linspace(0, 1, 256) ** self.gamma * 255.0 + 0.5).astype(np.uint8)
        out: RGB8 = cv2.LUT(rgb, lut)
        return out


class ShadowLift(_Step):
    """Brighten shadows only (a smooth curve that leaves highlights alone)."""

    step: Literal["shadow_lift"]
    amount: float = Field(0.3, ge=0.0, le=1.0)

    def apply(self, rgb: RGB8) -> RGB8:
        x = np.linspace(0, 1, 256)
        y = x + self.amount * x * (1 - x) ** 2 * 4 / 1.185
        lut = (np.clip(y, 0, 1) * 255 + 0.5).astype(np.uint8)
        out: RGB8 = cv2.LUT(rgb, lut)
        return out


class Median(_Step):
    """Median filter: removes specks and thin scratches before the model sees them."""

    step: Literal["median", "despeckle"]
    ksize: int = Field(3, ge=3, le=15)

    @field_validator("ksize")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("ksize must be odd")
        return v

    def apply(self, rgb: RGB8) -> RGB8:
        out: RGB8 = cv2.medianBlur(rgb, self.ksize)
        return out


class NlMeans(_Step):
    """Non-local means denoising (OpenCV's coloured variant)."""

    step: Literal["nlmeans"]
    h: float = Field(5.0, ge=0.0, le=50.0)
    h_color: float = Field(5.0, ge=0.0, le=50.0)
    template: int = Field(7, ge=3, le=21)
    search: int = Field(21, ge=3, le=51)

    def apply(self, rgb: RGB8) -> RGB8:
        out: RGB8 = cv2.fastNlMeansDenoisingColored(rgb, None, self.h, self.h_color, self.template, self.search)
        return out


class EqualizeYuv(_Step):
    """Histogram equalisation of Y with U/V scaling (the BSHM guide's 'seed-enhance' recipe)."""

    step: Literal["equalize_yuv"]
    u_scale: float = Field(0.8, ge=0.0, le=2.0)
    v_scale: float = Field(0.9, ge=0.0, le=2.0)

    def apply(self, rgb: RGB8) -> RGB8:
        yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV)
        yuv[..., 0] = cv2.equalizeHist(np.ascontiguousarray(yuv[..., 0]))
        for ch, scale in ((1, self.u_scale), (2, self.v_scale)):
            c = yuv[..., ch].astype(np.float32) - 128.0
            yuv[..., ch] = np.clip(c * scale + 128.0, 0, 255).astype(np.uint8)
        out: RGB8 = cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB)
        return out


class Saturation(_Step):
    """Scale colour saturation (delivery: tame or restore faded colour)."""

    step: Literal["saturation"]
    factor: float = Field(1.0, ge=0.0, le=3.0)

    def apply(self, rgb: RGB8) -> RGB8:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * self.factor, 0, 255)
        out: RGB8 = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
        return out


Step = Annotated[
    WhiteBalance | Clahe | AutoContrast | Gamma | ShadowLift | Median | NlMeans | EqualizeYuv | Saturation,
    Field(discriminator="step"),
]
STEP_NAMES = ("white_balance", "deyellow", "clahe", "autocontrast", "gamma", "shadow_lift", "median",
              "despeckle", "nlmeans", "equalize_yuv", "saturation")

_ADAPTER: TypeAdapter[Step] = TypeAdapter(Step)


def normalise_step_spec(raw: Any) -> Any:
    """Accept ``clahe``, ``{clahe: {clip: 2}}`` or ``{step: clahe, clip: 2}``; return the last form."""
    if isinstance(raw, str):
        return {"step": raw}
    if isinstance(raw, dict) and "step" not in raw and len(raw) == 1:
        (name, params), = raw.items()
        if params is None:
            params = {}
        if isinstance(params, dict):
            return {"step": name, **params}
    return raw


def parse_step(raw: Any) -> Step:
    return _ADAPTER.validate_python(normalise_step_spec(raw))


def apply_steps(rgb: RGB8, steps: tuple[Step, ...] | list[Step]) -> RGB8:
    for step in steps:
        rgb = step.apply(rgb)
    return rgb
