"""Configuration: YAML validated once into frozen typed objects; errors name file, line, field, reason."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bshm_watchd.decode import DEFAULT_MAX_PIXELS
from bshm_watchd.engine.base import DEVICE_RE
from bshm_watchd.errors import ConfigError
from bshm_watchd.steps import Step, normalise_step_spec

MODELS = ("fusion", "isnet", "selfie", "bshm")
DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.crdownload", "~*", "Thumbs.db", "desktop.ini", "@eaDir",
                  ".DS_Store", "#recycle", "$RECYCLE.BIN", "lost+found")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MattingSpec(_Frozen):
    model: Literal["fusion", "isnet", "selfie", "bshm"] | None = None
    max_side: int = Field(1536, ge=256, le=8192)
    refine: bool = True


class OutputsSpec(_Frozen):
    foreground: bool = True
    matte: bool = True
    composite: str | None = None
    """A colour (``#rrggbb`` or ``white``/``black``/``grey``) or a path to a backdrop image."""
    sidecar: bool = False
    png_compression: int = Field(1, ge=0, le=9)

    @field_validator("composite")
    @classmethod
    def _composite(cls, v: str | None) -> str | None:
        if v is None or v in ("white", "black", "grey", "gray") or re.fullmatch(r"#[0-9a-fA-F]{6}", v):
            return v
        if not Path(v).is_absolute():
            raise ValueError("must be white, black, grey, #rrggbb, or an absolute path to a backdrop image")
        return v


class Profile(_Frozen):
    analysis: tuple[Step, ...] = ()
    delivery: tuple[Step, ...] = ()
    matting: MattingSpec = MattingSpec()
    outputs: OutputsSpec = OutputsSpec()

    @field_validator("analysis", "delivery", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        if v is None:
            return ()
        if not isinstance(v, list | tuple):
            raise ValueError("must be a list of steps")
        return [normalise_step_spec(s) for s in v]


class WatchSpec(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    input: Path
    output: Path
    quarantine: Path
    profile: str = "default"
    recursive: bool = True
    mode: Literal["inotify", "poll", "auto"] = "auto"
    poll_seconds: float = Field(5.0, gt=0, le=3600)
    settle_seconds: float = Field(5.0, ge=0, le=3600)
    incomplete_seconds: float = Field(300.0, gt=0, le=7 * 86400)
    rescan_seconds: float = Field(300.0, gt=0, le=86400)
    after_success: str = "keep"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    max_attempts: int = Field(3, ge=1, le=100)

    @field_validator("after_success")
    @classmethod
    def _after(cls, v: str) -> str:
        if v in ("keep", "delete"):
            return v
        if v.startswith("move:") and len(v) > 5:
            return v
        raise ValueError("must be keep, delete or move:/some/folder")

    @property
    def move_to(self) -> Path | None:
        return Path(self.after_success[5:]) if self.after_success.startswith("move:") else None

    def ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.ignore)

    @model_validator(mode="after")
    def _folders(self) -> WatchSpec:
        inp = self.input.resolve()
        for label, other in (("output", self.output), ("quarantine", self.quarantine), ("after_success", self.move_to)):
            if other is None:
                continue
            o = other.resolve()
            if o == inp or inp in o.parents:
                raise ValueError(f"{label} folder {other} is inside the input folder {self.input}; "
                                 "writing into the input tree corrupts originals in other tools")
            if o in inp.parents:
                raise ValueError(f"input folder {self.input} is inside the {label} folder {other}")
        return self


class MetricsSpec(_Frozen):
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[^\s:]+:\d{1,5}", v):
            raise ValueError("must be host:port, e.g. 127.0.0.1:9753")
        return v


class Config(_Frozen):
    state_dir: Path = Path("/var/lib/bshm-watchd")
    model: Literal["fusion", "isnet", "selfie", "bshm"] = "fusion"
    device: str = "auto"
    cpu_runtime: Literal["auto", "onnxruntime", "torch"] = "auto"
    """isnet's runtime on CPU; auto = torch bf16 where installed and the CPU has native bf16."""
    model_dir: Path | None = None
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1_000_000, le=2_000_000_000)
    workers: int = Field(0, ge=0, le=64)
    """Worker processes for CPU stages; 0 = one per core."""
    min_free_mb: int = Field(512, ge=0)
    watch: tuple[WatchSpec, ...] = ()
    profiles: dict[str, Profile] = Field(default_factory=dict)
    metrics: MetricsSpec = MetricsSpec()
    source: Path | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.fullmatch(v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Config:
        names = [w.name for w in self.watch]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate watch names: {sorted(dupes)}")
        return self

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(f"unknown profile {name!r} (known: {', '.join(sorted(self.profiles))})") from None


@dataclass(frozen=True)
class _Where:
    line: int | None
    field: str


def builtin_profiles_raw() -> dict[str, Any]:
    text = resources.files("bshm_watchd").joinpath("profiles.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def default_config() -> Config:
    """A config with only the built-in profiles (``process`` without ``-c``)."""
    return _validate({}, None, None)


def load_config(path: Path) -> Config:
    """Read and validate ``path``; ConfigError with file, line, field and reason on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of keys (state_dir, model, watch, ...)")
    return _validate(raw, path, node)


def _validate(raw: dict[str, Any], path: Path | None, node: yaml.Node | None) -> Config:
    base = path.parent if path is not None else Path.cwd()
    data = dict(raw)
    profiles = builtin_profiles_raw()
    user_profiles = data.get("profiles") or {}
    if not isinstance(user_profiles, dict):
        raise ConfigError(_fmt(path, node, ("profiles",), "must be a mapping of profile names"))
    profiles.update(user_profiles)
    data["profiles"] = profiles
    data["source"] = path
    try:
        cfg = Config.model_validate(_resolve_paths(data, base))
    except ValidationError as exc:
        err = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(_fmt(path, node, tuple(err["loc"]), str(err["msg"]) + more)) from exc
    for i, w in enumerate(cfg.watch):
        if w.profile not in cfg.profiles:
            known = ", ".join(sorted(cfg.profiles))
            raise ConfigError(_fmt(path, node, ("watch", i, "profile"), f"unknown profile {w.profile!r} ({known})"))
        wanted = cfg.profiles[w.profile].matting.model
        if wanted is not None and wanted != cfg.model:
            # The daemon loads one model for all watches; silently ignoring the profile would mislead.
            raise ConfigError(_fmt(path, node, ("watch", i, "profile"),
                                   f"profile {w.profile!r} asks for model {wanted!r} but the daemon runs "
                                   f"model {cfg.model!r}; set the top-level model or drop matting.model"))
    return cfg


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative folders are relative to the config file, not to wherever the service was started."""

    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and not Path(v).is_absolute():
            return str((base / v).resolve())
        return v

    out = dict(data)
    for key in ("state_dir", "model_dir"):
        if key in out:
            out[key] = fix(out[key])
    watches = out.get("watch")
    if isinstance(watches, list):
        fixed = []
        for w in watches:
            if isinstance(w, dict):
                w = dict(w)
                for key in ("input", "output", "quarantine"):
                    if key in w:
                        w[key] = fix(w[key])
                after = w.get("after_success")
                if isinstance(after, str) and after.startswith("move:"):
                    w["after_success"] = "move:" + str(fix(after[5:]))
            fixed.append(w)
        out["watch"] = fixed
    return out


def _fmt(path: Path | None, node: yaml.Node | None, loc: tuple[Any, ...], msg: str) -> str:
    where = _locate(node, loc)
    file = str(path) if path is not None else "<defaults>"
    line = f":{where.line}" if where.line else ""
    return f"{file}{line}: {where.field}: {msg}"


def _locate(node: yaml.Node | None, loc: tuple[Any, ...]) -> _Where:
    """Walk the YAML node tree along a pydantic error location; the deepest node found gives the line."""
    line = node.start_mark.line + 1 if node is not None else None
    parts: list[str] = []
    cur = node
    for key in loc:
        parts.append(f"[{key}]" if isinstance(key, int) else str(key))
        nxt: yaml.Node | None = None
        if isinstance(cur, yaml.MappingNode):
            for k, v in cur.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                    nxt = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(cur, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(cur.value):
            nxt = cur.value[key]
            line = nxt.start_mark.line + 1
        if nxt is not None:
            cur = nxt
    field = ".".join(parts).replace(".[", "[") or "(top level)"
    return _Where(line=line, field=field)
