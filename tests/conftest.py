"""Shared fixtures: the model directory and the shared data set, each skipping with a reason when absent."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from bshm_watchd.modelstore import default_model_dir

REQUIRED_MODELS = ("isnet.onnx", "selfie.tflite")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The model dir ($BSHM_WATCHD_MODEL_DIR or the default); skips when the embedded models are absent."""
    root = default_model_dir()
    missing = [name for name in REQUIRED_MODELS if not (root / name).is_file()]
    if missing:
        pytest.skip(f"models not fetched: run `make setup` ({', '.join(missing)} missing in {root})")
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data set not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """cli.main() points structlog at the stream it was given (often a capture that closes after the
    test); without a reset, the next test's log call writes to a closed file and fails."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Structured events from every thread of an in-process daemon."""
    with structlog.testing.capture_logs() as cap:
        yield cap
