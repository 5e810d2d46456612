"""Model store: list, add, verify, fetch (with a stand-in npm client), and the messages that say what to do."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bshm_watchd.cli import main
from bshm_watchd.errors import ModelError
from bshm_watchd.modelstore import LOCAL_INDEX, ModelStore, default_model_dir, load_manifest, zip_members

MISSING_NPM = "/nonexistent/bin/npm"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tgz(members: dict[str, bytes]) -> bytes:
    """An npm-pack style tarball holding ``members`` (paths start with ``package/``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_npm(tmp_path: Path, tgz: bytes) -> Path:
    """An executable standing in for the npm client: `pack SPEC --silent --pack-destination DIR`
    drops ``tgz`` into DIR and records SPEC, so fetch runs its real subprocess/tar/assembly path offline."""
    (tmp_path / "pkg.tgz").write_bytes(tgz)
    script = tmp_path / "npm"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = pack ] || exit 9\necho "$2" > "{tmp_path}/spec.txt"\ncp "{tmp_path}/pkg.tgz" "$5/x-1.0.0.tgz"\n'
    )
    script.chmod(0o755)
    return script


CHUNKS = [b"A" * 1000, b"B" * 500, b"C" * 7]
MODEL = b"".join(CHUNKS)


def chunked_manifest(**overrides: Any) -> dict[str, dict[str, Any]]:
    entry: dict[str, Any] = {
        "file": "chunky.onnx",
        "size": len(MODEL),
        "sha256": sha(MODEL),
        "license": "MIT",
        "source": {
            "kind": "npm",
            "package": "@acme/chunky",
            "version": "1.2.3",
            "resources": "package/dist/resources.json",
            "resource_key": "/models/medium",
            "license_files": ["package/LICENSE.md"],
        },
    }
    entry.update(overrides)
    return {"chunky": entry}


def chunked_tgz() -> bytes:
    """Chunks deliberately listed in an order different from their names, to catch a sorted glob."""
    names = ["c2", "c0", "c1"]
    offsets, pos = [], 0
    for c in CHUNKS:
        offsets.append([pos, pos + len(c)])
        pos += len(c)
    index = {"/models/medium": {"chunks": [{"hash": n, "offsets": o} for n, o in zip(names, offsets, strict=True)]},
             "/models/small": {"chunks": []}}
    members = {"package/dist/resources.json": json.dumps(index).encode(), "package/LICENSE.md": b"MIT licence\n"}
    members.update({f"package/dist/{n}": c for n, c in zip(names, CHUNKS, strict=True)})
    return make_tgz(members)


class TestList:
    def test_empty_dir_all_missing(self, tmp_path: Path) -> None:
        """In an empty folder every manifest model is listed as missing, with its path under the folder."""
        infos = ModelStore(tmp_path).list()
        assert [i.name for i in infos] == sorted(load_manifest())
        assert not any(i.present for i in infos)
        assert all(i.path.parent == tmp_path for i in infos)

    def test_present_file_marked(self, tmp_path: Path) -> None:
        """A model file in the folder is listed present; the others stay missing."""
        (tmp_path / "selfie.tflite").write_bytes(b"x")
        present = {i.name: i.present for i in ModelStore(tmp_path).list()}
        assert present == {"bshm": False, "isnet": False, "rvm": False, "selfie": True}

    def test_manifest_pins(self) -> None:
        """The manifest pins the issue's checksums and sizes for the embedded models."""
        m = load_manifest()
        assert m["isnet"]["sha256"] == "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb"
        assert m["isnet"]["size"] == 88_188_479
        assert m["selfie"]["sha256"] == "8d13b7fae74af625c641226813616a2117bd6bca19eb3b75574621fc08557f27"
        assert m["selfie"]["source"]["version"] == "0.1.1675465747"
        assert m["rvm"]["sha256"] == "73497d9d64e378e77fb970f9980a22a95823a3ff0a5604893b9de48e1b04acc7"
        assert m["rvm"]["source"]["version"] == "3.0.4"

    def test_cli_list_json_stdout_is_json(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`models list --json` prints only a JSON list with name and path on stdout."""
        assert main(["models", "--model-dir", str(tmp_path), "list", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert {d["name"] for d in data} == {"isnet", "selfie", "rvm", "bshm"}
        assert all(Path(d["path"]).parent == tmp_path and d["present"] is False for d in data)


class TestAddVerify:
    def test_add_copies_and_records(self, tmp_path: Path) -> None:
        """`add` copies the file under the model's name and records its sha256 in local.json; verify passes."""
        src = tmp_path / "download" / "tf_graph.pb"
        src.parent.mkdir()
        src.write_bytes(b"graph bytes" * 100)
        store = ModelStore(tmp_path / "models")
        final = store.add("bshm", src)
        assert final == tmp_path / "models" / "bshm.pb"
        assert final.read_bytes() == src.read_bytes()
        index = json.loads((tmp_path / "models" / LOCAL_INDEX).read_text())
        assert index == {"bshm": sha(src.read_bytes())}
        assert store.verify("bshm") == sha(src.read_bytes())
        assert {i.name: i.sha256 for i in store.list()}["bshm"] == sha(src.read_bytes())

    def test_verify_detects_tampering(self, tmp_path: Path) -> None:
        """A registered file changed after `add` fails verify."""
        src = tmp_path / "g.pb"
        src.write_bytes(b"graph")
        store = ModelStore(tmp_path / "m")
        final = store.add("bshm", src)
        final.write_bytes(b"graph, edited")
        with pytest.raises(ModelError, match="does not match"):
            store.verify("bshm")

    def test_verify_against_manifest_pin(self, tmp_path: Path) -> None:
        """A wrong file under a pinned model's name fails verify."""
        (tmp_path / "selfie.tflite").write_bytes(b"not the selfie model")
        with pytest.raises(ModelError, match="8d13b7fa"):
            ModelStore(tmp_path).verify("selfie")

    def test_cli_verify_exit_status(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`models verify` exits non-zero and names the model when a checksum is wrong."""
        (tmp_path / "selfie.tflite").write_bytes(b"nope")
        assert main(["models", "--model-dir", str(tmp_path), "verify"]) == 1
        assert "selfie: FAILED" in capsys.readouterr().err

    def test_validator_refusal_writes_nothing(self, tmp_path: Path) -> None:
        """A file the validator rejects is neither copied nor recorded."""
        src = tmp_path / "g.pb"
        src.write_bytes(b"junk")

        def refuse(path: Path) -> None:
            raise ModelError(f"{path}: not a graph")

        root = tmp_path / "m"
        with pytest.raises(ModelError, match="not a graph"):
            ModelStore(root).add("bshm", src, refuse)
        assert not (root / "bshm.pb").exists() and not (root / LOCAL_INDEX).exists()

    def test_add_missing_source_or_unknown_name(self, tmp_path: Path) -> None:
        """`add` of a missing file or an unknown model name raises ModelError."""
        store = ModelStore(tmp_path)
        with pytest.raises(ModelError, match="no such file"):
            store.add("bshm", tmp_path / "nope.pb")
        (tmp_path / "f").write_bytes(b"x")
        with pytest.raises(ModelError, match="unknown model 'sam'"):
            store.add("sam", tmp_path / "f")

    def test_unreadable_index_is_an_error(self, tmp_path: Path) -> None:
        """A damaged local.json raises instead of silently forgetting the registered checksums."""
        (tmp_path / LOCAL_INDEX).write_text("{not json")
        (tmp_path / "bshm.pb").write_bytes(b"x")
        with pytest.raises(ModelError, match="unreadable model index"):
            ModelStore(tmp_path).verify("bshm")


class TestPath:
    def test_missing_npm_model_says_fetch(self, tmp_path: Path) -> None:
        """path() of a missing registry model says to run `models fetch NAME`."""
        with pytest.raises(ModelError, match="bshm-watchd models fetch isnet"):
            ModelStore(tmp_path).path("isnet")

    def test_missing_user_model_says_add(self, tmp_path: Path) -> None:
        """path() of a missing user-supplied model says to `models add` it."""
        with pytest.raises(ModelError, match="bshm-watchd models add bshm PATH"):
            ModelStore(tmp_path).path("bshm")

    def test_default_model_dir(self, tmp_path: Path) -> None:
        """$BSHM_WATCHD_MODEL_DIR wins, then $XDG_DATA_HOME/bshm-watchd/models, then ~/.local/share."""
        assert default_model_dir({"BSHM_WATCHD_MODEL_DIR": "/m", "XDG_DATA_HOME": "/x"}) == Path("/m")
        assert default_model_dir({"XDG_DATA_HOME": "/x"}) == Path("/x/bshm-watchd/models")
        assert default_model_dir({}) == Path.home() / ".local" / "share" / "bshm-watchd" / "models"


class TestFetch:
    def test_without_npm_names_package_and_add(self, tmp_path: Path) -> None:
        """Without an npm client, fetch fails naming the package and the `models add` alternative."""
        with pytest.raises(ModelError) as info:
            ModelStore(tmp_path).fetch("selfie", npm=MISSING_NPM)
        msg = str(info.value)
        assert "@mediapipe/selfie_segmentation@0.1.1675465747" in msg
        assert "bshm-watchd models add selfie" in msg
        assert not (tmp_path / "selfie.tflite").exists()

    def test_cli_without_npm(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`models fetch isnet` with no npm on PATH exits 3 with the package and `models add` in the message."""
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
        assert main(["models", "--model-dir", str(tmp_path), "fetch", "isnet"]) == 3
        err = capsys.readouterr().err
        assert "@imgly/background-removal-data@1.4.5" in err and "models add isnet" in err

    def test_user_model_not_fetchable(self, tmp_path: Path) -> None:
        """Fetching a user-supplied model explains how to add it."""
        with pytest.raises(ModelError, match="models add bshm"):
            ModelStore(tmp_path).fetch("bshm", npm=MISSING_NPM)

    def test_present_and_verified_is_a_no_op(self, tmp_path: Path) -> None:
        """A present file with the pinned checksum is kept without calling npm (re-running setup is quick)."""
        (tmp_path / "chunky.onnx").write_bytes(MODEL)
        store = ModelStore(tmp_path, chunked_manifest())
        assert store.fetch("chunky", npm=MISSING_NPM) == tmp_path / "chunky.onnx"

    def test_assembles_chunks_in_listed_order(self, tmp_path: Path) -> None:
        """fetch concatenates the chunks in resources.json order, verifies, and keeps the licences."""
        npm = fake_npm(tmp_path, chunked_tgz())
        root = tmp_path / "models"
        final = ModelStore(root, chunked_manifest()).fetch("chunky", npm=str(npm))
        assert final.read_bytes() == MODEL
        assert (tmp_path / "spec.txt").read_text().strip() == "@acme/chunky@1.2.3"
        assert (root / "licenses" / "chunky" / "LICENSE.md").read_bytes() == b"MIT licence\n"
        assert "MIT" in (root / "licenses" / "chunky" / "LICENSE-SUMMARY.txt").read_text()
        assert not [p for p in root.iterdir() if p.name.startswith(".bshm-tmp-")]

    def test_refetches_damaged_file(self, tmp_path: Path) -> None:
        """A present file with a wrong checksum is replaced by a fresh fetch."""
        npm = fake_npm(tmp_path, chunked_tgz())
        (tmp_path / "chunky.onnx").write_bytes(b"damaged")
        final = ModelStore(tmp_path, chunked_manifest()).fetch("chunky", npm=str(npm))
        assert final.read_bytes() == MODEL

    def test_checksum_mismatch_leaves_nothing(self, tmp_path: Path) -> None:
        """A package whose assembled file does not match the pinned sha256 fails and leaves no model file."""
        npm = fake_npm(tmp_path, chunked_tgz())
        root = tmp_path / "models"
        store = ModelStore(root, chunked_manifest(sha256="0" * 64))
        with pytest.raises(ModelError, match="does not match"):
            store.fetch("chunky", npm=str(npm))
        assert not (root / "chunky.onnx").exists()

    def test_size_mismatch(self, tmp_path: Path) -> None:
        """A package whose chunks add up to the wrong size fails before anything is written."""
        npm = fake_npm(tmp_path, chunked_tgz())
        root = tmp_path / "models"
        with pytest.raises(ModelError, match="expected 9999"):
            ModelStore(root, chunked_manifest(size=9999)).fetch("chunky", npm=str(npm))
        assert not (root / "chunky.onnx").exists()

    def test_npm_failure_reported(self, tmp_path: Path) -> None:
        """An npm client that exits non-zero makes fetch fail with the command in the message."""
        script = tmp_path / "npm"
        script.write_text("#!/bin/sh\necho 'E404 not found' >&2\nexit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        with pytest.raises(ModelError, match=r"npm pack @acme/chunky@1\.2\.3.*E404"):
            ModelStore(tmp_path / "m", chunked_manifest()).fetch("chunky", npm=str(script))

    @pytest.mark.skipif(
        shutil.which("npm") is None or os.environ.get("BSHM_TEST_NPM") != "1",
        reason="real registry fetch: needs npm and BSHM_TEST_NPM=1",
    )
    def test_real_npm_fetch_selfie(self, tmp_path: Path) -> None:
        """The real npm client fetches selfie with the pinned checksum and its licence files."""
        store = ModelStore(tmp_path)
        final = store.fetch("selfie")
        assert store.verify("selfie") == load_manifest()["selfie"]["sha256"]
        assert final.stat().st_size == load_manifest()["selfie"]["size"]
        assert (tmp_path / "licenses" / "selfie" / "LICENSE-SUMMARY.txt").is_file()


class TestMembersZipped:
    """A tfjs graph model is a JSON and its weight shards: fetch zips them into one pinned file."""

    FILES: ClassVar[dict[str, bytes]] = {"package/models/net.json": b'{"format": "graph-model"}',
                                         "package/models/net.bin": b"\x00\x01" * 300}

    def entry(self, sha256: str) -> dict[str, dict[str, Any]]:
        return {"net": {"file": "net.zip", "sha256": sha256, "license": "GPL-3.0",
                        "source": {"kind": "npm", "package": "@acme/net", "version": "3.0.4",
                                   "members": ["package/models/net.json", "package/models/net.bin"],
                                   "license_files": []}}}

    def test_zip_is_deterministic_and_holds_the_members(self, tmp_path: Path) -> None:
        """The same files give the same bytes (so a sha256 can pin them), whatever their dates; each member
        sits under its own name, uncompressed."""
        paths = []
        for rel, data in self.FILES.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            paths.append(path)
        first = zip_members(paths)
        os.utime(paths[0], (1_000_000_000, 1_000_000_000))
        assert zip_members(paths) == first
        with zipfile.ZipFile(io.BytesIO(first)) as zf:
            assert zf.namelist() == ["net.json", "net.bin"]
            assert zf.read("net.bin") == self.FILES["package/models/net.bin"]
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}

    def test_fetch_zips_the_members(self, tmp_path: Path) -> None:
        """fetch runs npm, zips the listed members, and checks the zip against the pin."""
        npm = fake_npm(tmp_path, make_tgz(self.FILES))
        src = tmp_path / "src"
        for rel, data in self.FILES.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        expected = zip_members([src / rel for rel in self.FILES])
        final = ModelStore(tmp_path / "models", self.entry(sha(expected))).fetch("net", npm=str(npm))
        assert final.read_bytes() == expected

    def test_missing_member_is_named(self, tmp_path: Path) -> None:
        npm = fake_npm(tmp_path, make_tgz({"package/models/net.json": b"{}"}))
        with pytest.raises(ModelError, match=r"no net\.bin"):
            ModelStore(tmp_path / "models", self.entry("0" * 64)).fetch("net", npm=str(npm))
