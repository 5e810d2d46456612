"""Config: the example loads; every error names file:line, the field and the reason; paths; frozen objects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from bshm_watchd.config import default_config, load_config
from bshm_watchd.errors import ConfigError
from bshm_watchd.steps import EqualizeYuv, NlMeans

REPO = Path(__file__).resolve().parents[1]

WATCH = """\
state_dir: state
watch:
  - name: a
    input: in
    output: out
    quarantine: q
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


class TestValidConfig:
    def test_example_loads(self) -> None:
        """config/example.yaml validates, with its watch folder and its own profile."""
        cfg = load_config(REPO / "config" / "example.yaml")
        assert [w.name for w in cfg.watch] == ["demo"]
        assert cfg.watch[0].profile in cfg.profiles
        assert "my-studio" in cfg.profiles and "old-photo" in cfg.profiles

    def test_default_config_has_builtin_profiles(self) -> None:
        """Without a file, the built-in profiles are there; seed-enhance carries equalize_yuv then nlmeans."""
        cfg = default_config()
        assert {"default", "old-photo", "raw", "seed-enhance"} <= set(cfg.profiles)
        steps = cfg.profile("seed-enhance").analysis
        assert isinstance(steps[0], EqualizeYuv) and isinstance(steps[1], NlMeans)
        assert cfg.profile("old-photo").outputs.sidecar is True

    def test_user_profile_replaces_builtin(self, tmp_path: Path) -> None:
        """A config's profile with a built-in name replaces the built-in one."""
        cfg = load_config(write(tmp_path, "profiles:\n  old-photo:\n    analysis: [gamma]\n"))
        assert [s.step for s in cfg.profile("old-photo").analysis] == ["gamma"]

    def test_empty_file(self, tmp_path: Path) -> None:
        """An empty config file gives the defaults."""
        assert load_config(write(tmp_path, "")).model == "fusion"

    def test_unknown_profile_lookup(self) -> None:
        """Config.profile() of an unknown name raises ConfigError listing the known ones."""
        with pytest.raises(ConfigError, match="old-photo"):
            default_config().profile("nope")


class TestPaths:
    def test_relative_to_config_folder(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Relative folders resolve against the config file's folder, not the working directory."""
        conf_dir = tmp_path / "etc"
        conf_dir.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        text = WATCH + "    after_success: move:done\nmodel_dir: models\n"
        cfg = load_config(write(conf_dir, text))
        base = conf_dir.resolve()
        w = cfg.watch[0]
        assert (cfg.state_dir, cfg.model_dir) == (base / "state", base / "models")
        assert (w.input, w.output, w.quarantine, w.move_to) == (base / "in", base / "out", base / "q", base / "done")

    def test_absolute_paths_kept(self, tmp_path: Path) -> None:
        """Absolute folders are kept as written."""
        cfg = load_config(write(tmp_path, f"state_dir: {tmp_path}/abs/state\n"))
        assert cfg.state_dir == tmp_path / "abs" / "state"

    def test_source_recorded(self, tmp_path: Path) -> None:
        """The config remembers which file it came from."""
        path = write(tmp_path, "model: isnet\n")
        assert load_config(path).source == path


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "line", "field", "reason"),
        [
            ("state_dir: s\nbogus: 1\n", 2, "bogus", "Extra inputs"),
            ("state_dir: s\nworkers: many\n", 2, "workers", "integer"),
            ("model: fancy\n", 1, "model", "fusion"),
            (WATCH + "    mode: fancy\n", 7, "watch[0].mode", "inotify"),
            (WATCH + "    colour: red\n", 7, "watch[0].colour", "Extra inputs"),
            (WATCH + "    profile: nope\n", 7, "watch[0].profile", "unknown profile 'nope'"),
            (WATCH + "    after_success: archive\n", 7, "watch[0].after_success", "keep, delete or move"),
            ("state_dir: s\ndevice: gpu\n", 2, "device", "cuda"),
            ("metrics:\n  listen: everywhere\n", 2, "metrics.listen", "host:port"),
            ("profiles:\n  p:\n    analysis:\n      - {sharpen: {x: 1}}\n", 4, "profiles.p.analysis[0]", "sharpen"),
            ("profiles:\n  p:\n    analysis:\n      - clahe\n      - {median: {ksize: 4}}\n", 5,
             "profiles.p.analysis[1]", "odd"),
            ("profiles:\n  p:\n    analysis:\n      - {clahe: {clp: 2}}\n", 4, "profiles.p.analysis[0]", "clp"),
            ("profiles:\n  p:\n    matting: {max_side: 10}\n", 3, "profiles.p.matting.max_side", "256"),
            ("profiles:\n  p:\n    outputs: {composite: pink}\n", 3, "profiles.p.outputs.composite", "#rrggbb"),
        ],
    )
    def test_names_file_line_field(self, tmp_path: Path, text: str, line: int, field: str, reason: str) -> None:
        """A bad value fails with `file:line: field: reason`."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}:{line}: {field}"), msg
        assert reason in msg, msg
        assert info.value.exit_code == 2

    @pytest.mark.parametrize(
        ("output", "quarantine", "label"),
        [("in/out", "q", "output"), ("in", "q", "output"), ("out", "in/q", "quarantine"), (".", "q", "input folder")],
    )
    def test_folders_inside_input(self, tmp_path: Path, output: str, quarantine: str, label: str) -> None:
        """An output or quarantine folder inside (or equal to) the input, or the input inside one, is refused."""
        text = f"watch:\n  - name: a\n    input: in\n    output: {output}\n    quarantine: {quarantine}\n"
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}:2: watch[0]"), msg
        assert label in msg, msg

    def test_move_target_inside_input(self, tmp_path: Path) -> None:
        """after_success: move: into the input tree is refused."""
        with pytest.raises(ConfigError, match="after_success folder"):
            load_config(write(tmp_path, WATCH + "    after_success: move:in/done\n"))

    def test_duplicate_watch_names(self, tmp_path: Path) -> None:
        """Two watches with the same name are refused."""
        text = WATCH + "  - name: a\n    input: in2\n    output: out2\n    quarantine: q2\n"
        with pytest.raises(ConfigError, match="duplicate watch names"):
            load_config(write(tmp_path, text))

    @pytest.mark.parametrize(("text", "line"), [("state_dir: s\nwatch: [\n  - a: b\n", 3), ("a: b\n  c: d\n", 2)])
    def test_invalid_yaml(self, tmp_path: Path, text: str, line: int) -> None:
        """Broken YAML fails with file:line and says it is invalid YAML."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError, match=re.escape(f"{path}:{line}: invalid YAML")):
            load_config(path)

    def test_not_a_mapping(self, tmp_path: Path) -> None:
        """A YAML list at the top level is refused with the file named."""
        path = write(tmp_path, "- a\n- b\n")
        with pytest.raises(ConfigError, match=re.escape(f"{path}:1:")):
            load_config(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config file that does not exist fails with its path."""
        with pytest.raises(ConfigError, match="cannot read config"):
            load_config(tmp_path / "nope.yaml")


class TestFrozen:
    def test_config_attribute(self) -> None:
        """Assigning to a Config field raises."""
        cfg = default_config()
        with pytest.raises(ValidationError):
            cfg.model = "isnet"  # type: ignore[misc]

    def test_nested_objects(self, tmp_path: Path) -> None:
        """Watch specs, profiles and steps are frozen too, and the watch list is a tuple."""
        cfg = load_config(write(tmp_path, WATCH))
        assert isinstance(cfg.watch, tuple)
        with pytest.raises(ValidationError):
            cfg.watch[0].input = tmp_path  # type: ignore[misc]
        profile = cfg.profile("seed-enhance")
        with pytest.raises(ValidationError):
            profile.matting.max_side = 512  # type: ignore[misc]
        with pytest.raises(ValidationError):
            profile.analysis[1].h = 9.0  # type: ignore[misc, union-attr]
