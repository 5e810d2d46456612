"""The shipped unit, its rendering for a config (quoting included), systemd-analyze verify, atomic install."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bshm_watchd.errors import BshmError, ConfigError
from bshm_watchd.service_install import install_service, load_template, quote_word, render_unit

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = REPO / "systemd"
EXE = "/opt/bshm-watchd/.venv/bin/bshm-watchd"


def service_settings(text: str) -> dict[str, list[str]]:
    """[Service] key → values, in file order."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def unquote(value: str) -> list[str]:
    """Words of a path-list setting, read back the way systemd does for our escapes."""
    return [w.replace("%%", "%") for w in shlex.split(value)]


def render(**overrides: object) -> str:
    kwargs: dict[str, object] = {
        "exec_start": EXE,
        "config_path": Path("/etc/bshm-watchd/config.yaml"),
        "user": "bshm-watchd",
        "read_write_paths": [Path("/var/lib/bshm-watchd"), Path("/srv/scans/out")],
        "read_only_paths": [Path("/srv/scans/in")],
    }
    kwargs.update(overrides)
    return render_unit(load_template(), **kwargs)  # type: ignore[arg-type]


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, env=env, check=False)


class TestShippedUnit:
    def test_required_directives(self) -> None:
        """The shipped unit carries the notify, watchdog, restart, account and sandbox settings."""
        s = service_settings((SYSTEMD_DIR / "bshm-watchd.service").read_text())
        expected = {
            "Type": "notify",
            "NotifyAccess": "main",
            "WatchdogSec": "30",
            "Restart": "on-failure",
            "ExecReload": "/bin/kill -HUP $MAINPID",
            "User": "bshm-watchd",
            "Group": "bshm-watchd",
            "ProtectSystem": "strict",
            "NoNewPrivileges": "yes",
            "PrivateTmp": "yes",
            "ProtectHome": "yes",
            "OOMPolicy": "continue",
            "ExecStart": "/usr/bin/env bshm-watchd run -c /etc/bshm-watchd/config.yaml",
        }
        assert {k: s.get(k, [None])[-1] for k in expected} == expected
        for key in ("ReadWritePaths", "MemoryMax", "TimeoutStopSec", "DeviceAllow", "SystemCallFilter"):
            assert key in s, key

    def test_keeps_gpu_reachable(self) -> None:
        """No setting that would hide or break CUDA: PrivateDevices, W^X, ProcSubset, PrivateUsers."""
        s = service_settings((SYSTEMD_DIR / "bshm-watchd.service").read_text())
        for key in ("PrivateDevices", "MemoryDenyWriteExecute", "ProcSubset", "PrivateUsers"):
            assert key not in s, key
        assert "char-nvidia* rw" in s["DeviceAllow"]

    def test_load_template_is_the_shipped_file(self) -> None:
        """load_template() finds the unit from a source checkout."""
        assert load_template() == (SYSTEMD_DIR / "bshm-watchd.service").read_text()

    def test_security_exposure(self) -> None:
        """systemd-analyze security rates the rendered unit at most 2.5 (OK)."""
        result = analyze("--version")
        if "--offline" not in analyze("security", "--help").stdout:
            pytest.skip(f"systemd-analyze too old for security --offline: {result.stdout.splitlines()[0]}")
        result = analyze("security", "--offline=true", "--threshold=25", str(SYSTEMD_DIR / "bshm-watchd.service"))
        assert result.returncode == 0, result.stdout + result.stderr


class TestRenderUnit:
    def test_replaces_site_lines(self) -> None:
        """ExecStart, User, Group and the path lists come from the arguments, once each."""
        s = service_settings(render(user="scanner", group="studio", exec_start="/usr/local/bin/bshm-watchd"))
        assert s["ExecStart"] == ["/usr/local/bin/bshm-watchd run -c /etc/bshm-watchd/config.yaml"]
        assert s["User"] == ["scanner"] and s["Group"] == ["studio"]
        assert s["ReadWritePaths"] == ["/var/lib/bshm-watchd /srv/scans/out"]
        assert s["ReadOnlyPaths"] == ["/srv/scans/in"]
        assert s["ProtectHome"] == ["yes"]

    def test_group_defaults_to_user(self) -> None:
        """Without a group the account's own group is used."""
        assert service_settings(render(user="scanner"))["Group"] == ["scanner"]

    def test_paths_with_spaces_and_specials_round_trip(self) -> None:
        """Spaces, quotes, backslashes and % survive quoting and read back as the original paths."""
        rw = [
            Path("/srv/my scans/out"),
            Path('/srv/a "quoted" b'),
            Path("/srv/back\\slash"),
            Path("/srv/100%d"),
        ]
        s = service_settings(render(read_write_paths=rw, read_only_paths=[Path("/srv/in box")]))
        assert unquote(s["ReadWritePaths"][0]) == [str(p) for p in rw]
        assert unquote(s["ReadOnlyPaths"][0]) == ["/srv/in box"]

    def test_exec_start_quoting(self) -> None:
        """The executable and config path are quoted; % and $ are doubled so systemd does not expand them."""
        s = service_settings(
            render(exec_start="/opt/bshm watchd/bin/bshm-watchd", config_path=Path("/etc/b w/$HOME%i.yaml"))
        )
        assert s["ExecStart"] == ['"/opt/bshm watchd/bin/bshm-watchd" run -c "/etc/b w/$$HOME%%i.yaml"']

    def test_read_write_wins_over_read_only(self) -> None:
        """An input also listed as writable (after_success: move/delete) appears only in ReadWritePaths."""
        s = service_settings(render(read_write_paths=[Path("/srv/in")], read_only_paths=[Path("/srv/in")]))
        assert s["ReadWritePaths"] == ["/srv/in"]
        assert "ReadOnlyPaths" not in s

    def test_home_folder_downgrades_protect_home(self) -> None:
        """A hot folder under /home switches ProtectHome to read-only, where ReadWritePaths still apply."""
        s = service_settings(render(read_write_paths=[Path("/home/studio/scans out")]))
        assert s["ProtectHome"] == ["read-only"]

    def test_tmp_folder_refused(self) -> None:
        """A folder under /tmp is refused with PrivateTmp on, and allowed (PrivateTmp=no) when asked."""
        with pytest.raises(ConfigError, match="PrivateTmp"):
            render(read_only_paths=[Path("/tmp/inbox")])
        s = service_settings(render(read_only_paths=[Path("/tmp/inbox")], private_tmp=False))
        assert s["PrivateTmp"] == ["no"]

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"read_write_paths": [Path("relative/out")]}, "absolute"),
            ({"read_only_paths": [Path("/srv/in\nExecStartPre=/bin/sh")]}, "control character"),
            ({"config_path": Path("/etc/\udcff.yaml")}, "UTF-8"),
            ({"user": "bad user"}, "account name"),
            ({"exec_start": '/opt/"x"/bshm-watchd'}, "quotes"),
        ],
    )
    def test_rejects_unrepresentable_input(self, kwargs: dict[str, object], match: str) -> None:
        """Relative paths, injected lines, invalid UTF-8, bad names, unsafe executables: ConfigError."""
        with pytest.raises(ConfigError, match=match):
            render(**kwargs)

    def test_inserts_missing_keys_into_service_section(self) -> None:
        """A template without path lines gets them inside [Service], not after [Install]."""
        template = (
            "[Unit]\nDescription=x\n\n[Service]\nType=notify\nExecStart=/bin/true\n\n"
            "[Install]\nWantedBy=multi-user.target\n"
        )
        text = render_unit(
            template,
            exec_start=EXE,
            config_path=Path("/etc/c.yaml"),
            user="u",
            read_write_paths=[Path("/srv/out")],
            read_only_paths=[],
        )
        service = text.split("[Service]")[1].split("[Install]")[0]
        assert "ReadWritePaths=/srv/out" in service and "User=u" in service

    def test_quote_word_leaves_plain_paths_bare(self) -> None:
        """Plain paths are not quoted, so the unit stays readable."""
        assert quote_word("/srv/scans/in") == "/srv/scans/in"


class TestVerify:
    @pytest.fixture
    def exe(self, tmp_path: Path) -> Path:
        exe = tmp_path / "venv 1%x" / "bin" / "bshm-watchd"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
        return exe

    def _verify(self, unit: Path) -> subprocess.CompletedProcess[str]:
        return analyze("verify", "--man=no", str(unit))

    def test_rendered_unit_verifies_clean(self, tmp_path: Path, exe: Path) -> None:
        """systemd-analyze verify accepts the rendered unit (paths with spaces and %) without a warning."""
        unit = tmp_path / "units" / "bshm-watchd.service"
        unit.parent.mkdir()
        unit.write_text(
            render(
                exec_start=str(exe),
                config_path=tmp_path / "conf dir" / "config.yaml",
                read_write_paths=[tmp_path / "my scans" / "out", tmp_path / "state%1"],
                read_only_paths=[tmp_path / "my scans" / "in"],
                private_tmp=False,
            )
        )
        result = self._verify(unit)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "" and result.stdout.strip() == ""

    def test_shipped_unit_verifies_as_is(self) -> None:
        """The issue's check: the shipped systemd/bshm-watchd.service passes systemd-analyze verify unrendered."""
        result = self._verify(SYSTEMD_DIR / "bshm-watchd.service")
        assert result.returncode == 0, result.stderr

    def test_verify_catches_broken_quoting(self, tmp_path: Path, exe: Path) -> None:
        """Control: a path written unquoted makes verify complain, so the clean run above means something."""
        text = render(exec_start=str(exe), read_write_paths=[Path("/srv/scans/out")], private_tmp=False)
        text = text.replace("ReadWritePaths=/srv/scans/out", "ReadWritePaths=/srv/my scans/out")
        unit = tmp_path / "bshm-watchd.service"
        unit.write_text(text)
        assert "not absolute" in self._verify(unit).stderr

    def test_missing_executable_is_reported(self, tmp_path: Path) -> None:
        """Control: verify does check ExecStart, so a mis-quoted executable path would be caught."""
        unit = tmp_path / "bshm-watchd.service"
        unit.write_text(render(exec_start=str(tmp_path / "no such" / "bshm-watchd"), private_tmp=False))
        result = self._verify(unit)
        assert result.returncode != 0
        assert "no such/bshm-watchd" in result.stderr


class TestInstallService:
    def test_writes_atomically(self, tmp_path: Path) -> None:
        """The unit lands complete with mode 0644 and no temp file is left behind."""
        target = install_service("[Service]\nType=notify\n", dry_run=False, unit_dir=tmp_path)
        assert target == tmp_path / "bshm-watchd.service"
        assert target.read_text() == "[Service]\nType=notify\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert [p.name for p in tmp_path.iterdir()] == ["bshm-watchd.service"]

    def test_replaces_existing_unit(self, tmp_path: Path) -> None:
        """Installing again replaces the old content."""
        install_service("old\n", dry_run=False, unit_dir=tmp_path)
        target = install_service("new\n", dry_run=False, unit_dir=tmp_path)
        assert target.read_text() == "new\n"

    def test_dry_run_prints_and_writes_nothing(self, tmp_path: Path) -> None:
        """dry_run prints the unit and leaves the directory untouched."""
        out = io.StringIO()
        target = install_service("[Service]\n", dry_run=True, unit_dir=tmp_path, out=out)
        assert out.getvalue() == "[Service]\n"
        assert target == tmp_path / "bshm-watchd.service"
        assert list(tmp_path.iterdir()) == []

    def test_unwritable_dir_is_bshm_error(self, tmp_path: Path) -> None:
        """A missing unit directory raises BshmError naming the target, not a bare OSError."""
        with pytest.raises(BshmError, match=r"bshm-watchd\.service"):
            install_service("x\n", dry_run=False, unit_dir=tmp_path / "absent")

    def test_rejects_path_as_name(self, tmp_path: Path) -> None:
        """The file name cannot climb out of unit_dir."""
        with pytest.raises(ValueError):
            install_service("x\n", dry_run=False, unit_dir=tmp_path, name="../evil.service")


class TestAccountSnippets:
    def test_sysusers_and_tmpfiles_apply(self, tmp_path: Path) -> None:
        """sysusers creates the account and tmpfiles the 0750 state directory, in a scratch root."""
        sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
        if sysusers is None or tmpfiles is None:
            pytest.skip("systemd-sysusers/systemd-tmpfiles not installed")
        if os.geteuid() != 0:
            pytest.skip("needs root to chown inside the scratch root")
        for kind, src in (
            ("sysusers.d", "bshm-watchd.sysusers.conf"),
            ("tmpfiles.d", "bshm-watchd.tmpfiles.conf"),
        ):
            (tmp_path / "etc" / kind).mkdir(parents=True)
            shutil.copy(SYSTEMD_DIR / src, tmp_path / "etc" / kind / "bshm-watchd.conf")
        subprocess.run([sysusers, f"--root={tmp_path}", "bshm-watchd.conf"], check=True, capture_output=True)
        passwd = (tmp_path / "etc" / "passwd").read_text()
        entry = next(line for line in passwd.splitlines() if line.startswith("bshm-watchd:"))
        assert entry.split(":")[5:] == ["/var/lib/bshm-watchd", "/usr/sbin/nologin"]
        subprocess.run(
            [tmpfiles, f"--root={tmp_path}", "--create", "bshm-watchd.conf"], check=True, capture_output=True
        )
        state = tmp_path / "var" / "lib" / "bshm-watchd"
        assert stat.S_IMODE(state.stat().st_mode) == 0o750
        assert state.stat().st_uid == int(entry.split(":")[2])
