"""Error classes; the docstring is the message template, each carries an exit code."""

from __future__ import annotations


class BshmError(Exception):
    """bshm-watchd error."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "error").strip())


class ConfigError(BshmError):
    """The configuration is invalid."""

    exit_code = 2


class ModelError(BshmError):
    """A model is missing, damaged or cannot be loaded."""

    exit_code = 3


class ScanError(BshmError):
    """One scan cannot be processed; aborts that scan only, never the service.

    ``stage`` names the pipeline stage (decode, analysis, matting, refine, write ...);
    ``transient`` marks errors worth retrying (a share that said EBUSY, CUDA out of memory).
    """

    def __init__(self, message: str, *, stage: str, transient: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        self.transient = transient


class NotAnImage(ScanError):
    """The file is not an image we can decode."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage="decode")


class ImageTooLarge(ScanError):
    """The image exceeds the configured pixel limit (decompression-bomb guard)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage="decode")
