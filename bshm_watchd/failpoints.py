"""Crash-test failpoints: ``BSHM_WATCHD_FAILPOINT=claimed`` SIGKILLs the process right after that stage.

Points: ``claimed``, ``matted``, ``temp_written``, ``fsynced``, ``renamed`` (the last three once per
durable file written: each output, an ``.error.json``), ``outputs_written``, ``committed``,
``disposed`` fire in the daemon; ``staged`` fires in a pipeline worker after it staged an output
(it kills that worker, not the daemon). Several may be given, comma-separated; ``name@N`` fires on
the N-th pass (1-based) so a test can let a few scans finish first. Unset in production: one getenv per point.
"""

from __future__ import annotations

import os
import signal

ENV = "BSHM_WATCHD_FAILPOINT"
COUNT_DIR_ENV = "BSHM_WATCHD_FAILPOINT_DIR"


def failpoint(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point != name:
            continue
        if nth and not _nth_pass(name, int(nth)):
            continue
        os.kill(os.getpid(), signal.SIGKILL)


def _nth_pass(name: str, nth: int) -> bool:
    """Count passes in a file (the count must survive nothing but this process, so a file is enough)."""
    folder = os.environ.get(COUNT_DIR_ENV)
    if not folder:
        return nth == 1
    path = os.path.join(folder, f"failpoint-{name}.count")
    try:
        with open(path, encoding="ascii") as fh:
            count = int(fh.read() or "0") + 1
    except FileNotFoundError:
        count = 1
    with open(path, "w", encoding="ascii") as fh:
        fh.write(str(count))
        fh.flush()
        os.fsync(fh.fileno())
    return count == nth
