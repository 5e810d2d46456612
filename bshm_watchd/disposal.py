"""Moving originals: to quarantine with a reason, or away after success (``after_success``).

Never ``shutil.move`` (cpython gh-109503: a failed cross-device move can lose the source). Same
filesystem: one atomic rename. Across filesystems: copy to a temp name, fsync, rename, fsync the
folder, and only then unlink the source — a crash in between leaves a duplicate, never a loss.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bshm_watchd import PIPELINE_VERSION
from bshm_watchd.fsutil import atomic_path, fsync_dir, write_bytes_atomic


def free_name(dest: Path) -> Path:
    """``dest``, or ``dest`` with ``.1``, ``.2`` … before the suffix when taken."""
    if not dest.exists():
        return dest
    for n in range(1, 10_000):
        cand = dest.with_name(f"{dest.stem}.{n}{dest.suffix}")
        if not cand.exists():
            return cand
    raise FileExistsError(errno.EEXIST, "no free name", str(dest))


def move_file(src: Path, dest: Path) -> Path:
    """Move ``src`` to ``dest`` (or a free variant of it) durably; returns where it went."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest = free_name(dest)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(dest) as tmp:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            shutil.copystat(src, tmp)  # the temp is 0600: the moved original keeps its own mode and times
        os.unlink(src)
        fsync_dir(src.parent)
        return dest
    fsync_dir(dest.parent)
    fsync_dir(src.parent)
    return dest


def quarantine(src: Path, rel: Path, qroot: Path, *, reason: str, stage: str, exc_type: str,
               sha256: str | None, extra: dict[str, Any] | None = None) -> Path:
    """Move a bad scan to ``qroot/rel`` and write ``<name>.error.json`` beside it (the reason first)."""
    dest = free_name(qroot / rel)
    info = {
        "source": str(rel),
        "reason": reason,
        "stage": stage,
        "exception": exc_type,
        "sha256": sha256,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pipeline_version": PIPELINE_VERSION,
        **(extra or {}),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    # backslashreplace: a name with invalid UTF-8 (a surrogate escape) becomes a JSON \udcXX escape,
    # where a plain encode() would raise and leave the bad scan in the inbox.
    text = json.dumps(info, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(error_json_path(dest), text.encode("utf-8", "backslashreplace"))
    return move_file(src, dest)


def error_json_path(dest: Path) -> Path:
    """``<name>.error.json`` beside a quarantined file; shortened (with a hash) past NAME_MAX bytes."""
    name = dest.name + ".error.json"
    raw = os.fsencode(name)
    if len(raw) <= 255:
        return dest.with_name(name)
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return dest.with_name(os.fsdecode(os.fsencode(dest.name)[:200]) + "~" + digest + ".error.json")
