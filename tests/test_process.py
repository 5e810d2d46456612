"""`bshm-watchd process` end to end on real models: mirrored tree, output invariants, bad files, refusals.

Real-model runs are few and shared: one `fusion` batch over three old photos (the issue's acceptance
check), one `selfie` batch over generated edge cases, one `isnet` run on a single small file.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from imaging import exif_bytes, pil_bytes
from PIL import Image

from bshm_watchd.batch import Job, collect, output_bases
from bshm_watchd.cli import main
from bshm_watchd.fsutil import TEMP_PREFIX

PHOTOS = {
    # tree path -> file in ../shared/data/old_photos
    "Dolores 1920s.jpg": "deoldify__Dolores1920s.jpg",
    "sub dir/Zoë 1.jpg": "deoldify__1870Girl.jpg",
    "sub dir/deeper/Ångström.png": "bopb__old__h.png",
}


@dataclass(frozen=True)
class Run:
    rc: int
    stdout: str
    stderr: str
    src: Path
    out: Path


def run_cli(argv: Sequence[str], src: Path, out: Path) -> Run:
    """cli.main() in this process with stdout/stderr captured."""
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(list(argv))
    return Run(rc, o.getvalue(), e.getvalue(), src, out)


def read_png(path: Path) -> npt.NDArray[Any]:
    """A PNG as stored (BGR[A], 8 or 16 bit), read without trusting the path's encoding to OpenCV."""
    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None, f"{path} is not a readable PNG"
    return arr


def outputs(out: Path, rel: str) -> tuple[Path, Path]:
    base = out / Path(rel).parent / Path(rel).stem
    return base.with_name(base.name + "_fg.png"), base.with_name(base.name + "_matte.png")


def upright_rgb(path: Path) -> npt.NDArray[np.uint8]:
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def check_pair(fg_path: Path, matte_path: Path, size: tuple[int, int]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The shared output invariants: RGBA fg and grey matte of ``size`` (w, h), alpha == matte, RGB 0 under alpha 0."""
    fg, matte = read_png(fg_path), read_png(matte_path)
    w, h = size
    assert fg.shape == (h, w, 4), fg_path
    assert matte.shape == (h, w) and matte.dtype == np.uint8, matte_path
    alpha8 = fg[..., 3] if fg.dtype == np.uint8 else (fg[..., 3] >> 8).astype(np.uint8)
    np.testing.assert_array_equal(alpha8, matte)
    assert (fg[..., :3][fg[..., 3] == 0] == 0).all(), "colour left under alpha 0"
    assert 5 < float(matte.mean()) < 250, f"{matte_path}: matte mean {matte.mean():.1f}"
    return fg, matte


@pytest.fixture(scope="module")
def fusion_run(model_dir: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The issue's check: three old photos (nested, spaces, accents) and a text file named broken.jpg."""
    root = tmp_path_factory.mktemp("fusion")
    src, out = root / "scans in", root / "cut outs"
    for rel, name in PHOTOS.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / "old_photos" / name, src / rel)
    (src / "broken.jpg").write_text("this is a text file, not a photograph\n")
    return run_cli(["process", "-i", str(src), "-d", str(out), "--model-dir", str(model_dir)], src, out)


@pytest.mark.models
class TestFusionBatch:
    def test_exit_status_and_summary(self, fusion_run: Run) -> None:
        """One bad file makes the exit status non-zero, and the summary counts 3 done and 1 failed."""
        assert fusion_run.rc != 0
        assert "done 3, failed 1" in fusion_run.stdout

    def test_broken_file_reported(self, fusion_run: Run) -> None:
        """The broken file gets one clear line naming it and saying it is not an image."""
        lines = [ln for ln in fusion_run.stderr.splitlines() if ln.startswith("FAILED")]
        assert len(lines) == 1, fusion_run.stderr
        assert "broken.jpg" in lines[0] and "not an image" in lines[0]

    @pytest.mark.parametrize("rel", list(PHOTOS))
    def test_mirrored_full_size_outputs(self, fusion_run: Run, rel: str) -> None:
        """Each photo has a full-size RGBA _fg.png at the mirrored path whose alpha is its _matte.png."""
        fg_path, matte_path = outputs(fusion_run.out, rel)
        with Image.open(fusion_run.src / rel) as im:
            size = im.size
        fg, _ = check_pair(fg_path, matte_path, size)
        assert fg.dtype == np.uint8

    @pytest.mark.parametrize("rel", list(PHOTOS))
    def test_cut_out_keeps_scan_pixels(self, fusion_run: Run, rel: str) -> None:
        """Where alpha > 0 the cut-out's colour is the scan's own pixels (no analysis step leaks into it)."""
        fg = read_png(outputs(fusion_run.out, rel)[0])
        rgb = upright_rgb(fusion_run.src / rel)
        keep = fg[..., 3] > 0
        np.testing.assert_array_equal(fg[..., 2::-1][keep], rgb[keep])

    def test_only_expected_files(self, fusion_run: Run) -> None:
        """The output tree holds exactly the six outputs: no temp files, nothing for broken.jpg."""
        expected = {str(p.relative_to(fusion_run.out)) for rel in PHOTOS for p in outputs(fusion_run.out, rel)}
        assert files_under(fusion_run.out) == expected
        assert not any(TEMP_PREFIX in name for name in files_under(fusion_run.out))

    def test_input_tree_untouched(self, fusion_run: Run) -> None:
        """Nothing is written into the input tree."""
        assert files_under(fusion_run.src) == {*PHOTOS, "broken.jpg"}


def make_edge_cases(src: Path, photo: Path) -> dict[str, tuple[int, int]]:
    """Generated inputs from one old photo; returns the expected (w, h) of each output."""
    src.mkdir(parents=True)
    base = Image.open(photo).convert("RGB")
    base.thumbnail((400, 400))
    rgb = np.asarray(base)
    h, w = rgb.shape[:2]
    # EXIF 6 (display rotated 90° clockwise): store the photo sideways, so upright it is w×h again and the
    # model sees a person standing up; the stored file itself is h×w.
    sideways = base.transpose(Image.Transpose.ROTATE_90)
    (src / "rot6.jpg").write_bytes(pil_bytes(sideways, "JPEG", quality=92, exif=exif_bytes(6)))
    # True 16-bit data: 8-bit levels ·257 plus low-byte noise that an 8-bit crush would lose.
    noise = np.random.default_rng(0).integers(0, 200, rgb.shape, dtype=np.uint16)
    rgb16 = rgb.astype(np.uint16) * 257 + noise
    np.save(src.parent / "deep16.npy", rgb16)
    ok, enc = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))
    assert ok
    (src / "deep16.png").write_bytes(enc.tobytes())
    # The scan's own alpha: left third transparent.
    rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
    rgba[:, : w // 3, 3] = 0
    (src / "cut.png").write_bytes(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    # Two scans sharing a stem in one folder must not overwrite each other.
    (src / "twin").mkdir()
    (src / "twin" / "same.jpg").write_bytes(pil_bytes(base, "JPEG"))
    (src / "twin" / "same.png").write_bytes(pil_bytes(base, "PNG"))
    (src / "notes.txt").write_text("not a scan")
    return {"rot6": (w, h), "deep16": (w, h), "cut": (w, h), "twin/same_jpg": (w, h), "twin/same_png": (w, h)}


@pytest.fixture(scope="module")
def selfie_run(
    model_dir: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Run, dict[str, tuple[int, int]]]:
    """`--model selfie` with a config's own profile (composite + sidecar) over generated edge cases."""
    root = tmp_path_factory.mktemp("selfie")
    src, out = root / "in", root / "out"
    sizes = make_edge_cases(src, shared_data / "old_photos" / "deoldify__1870Girl.jpg")
    cfg = root / "bshm.yaml"
    cfg.write_text(
        "profiles:\n  t:\n    analysis: [clahe]\n    matting: {max_side: 320}\n"
        "    outputs: {composite: white, sidecar: true}\n"
    )
    argv = ["process", "--input", str(src), "--output_dir", str(out), "--model", "selfie", "-c", str(cfg),
            "--profile", "t", "--model-dir", str(model_dir)]
    return run_cli(argv, src, out), sizes


@pytest.mark.models
class TestSelfieEdgeCases:
    def test_all_done(self, selfie_run: tuple[Run, dict[str, tuple[int, int]]]) -> None:
        """`--model selfie` processes all five scans, skips the text file and exits 0."""
        run, _ = selfie_run
        assert run.rc == 0, run.stderr
        assert "done 5, failed 0, skipped 1" in run.stdout

    def test_invariants(self, selfie_run: tuple[Run, dict[str, tuple[int, int]]]) -> None:
        """Every output pair has the oriented input's size, alpha == matte, and no colour under alpha 0."""
        run, sizes = selfie_run
        for stem, size in sizes.items():
            check_pair(run.out / f"{stem}_fg.png", run.out / f"{stem}_matte.png", size)

    def test_exif_orientation(self, selfie_run: tuple[Run, dict[str, tuple[int, int]]]) -> None:
        """An EXIF-6 JPEG gives outputs of the rotated size holding the upright pixels."""
        run, sizes = selfie_run
        fg = read_png(run.out / "rot6_fg.png")
        w, h = sizes["rot6"]
        with Image.open(run.src / "rot6.jpg") as im:
            assert im.size == (h, w)  # stored sideways
        assert fg.shape[:2] == (h, w)
        keep = fg[..., 3] > 0
        np.testing.assert_array_equal(fg[..., 2::-1][keep], upright_rgb(run.src / "rot6.jpg")[keep])

    def test_16bit_kept(self, selfie_run: tuple[Run, dict[str, tuple[int, int]]]) -> None:
        """A 16-bit PNG gives a 16-bit RGBA cut-out with its exact 16-bit colour and alpha >> 8 == matte."""
        run, _ = selfie_run
        fg, matte = read_png(run.out / "deep16_fg.png"), read_png(run.out / "deep16_matte.png")
        assert fg.dtype == np.uint16 and matte.dtype == np.uint8
        np.testing.assert_array_equal((fg[..., 3] >> 8).astype(np.uint8), matte)
        np.testing.assert_array_equal(fg[..., 3], matte.astype(np.uint16) * 257)
        rgb16 = np.load(run.src.parent / "deep16.npy")
        keep = fg[..., 3] > 0
        np.testing.assert_array_equal(fg[..., 2::-1][keep], rgb16[keep])

    def test_input_alpha_respected(self, selfie_run: tuple[Run, dict[str, tuple[int, int]]]) -> None:
        """Where the scan itself is transparent, the matte is 0."""
        run, sizes = selfie_run
        matte = read_png(run.out / "cut_matte.png")
        assert (matte[:, : sizes["cut"][0] // 3] == 0).all()

    def test_same_stem_not_overwritten(self, selfie_run: tuple[Run, dict[str, tuple[int, int]]]) -> None:
        """same.jpg and same.png in one folder get distinct outputs (same_jpg_*, same_png_*)."""
        run, _ = selfie_run
        names = {p.name for p in (run.out / "twin").iterdir()}
        assert {"same_jpg_fg.png", "same_png_fg.png", "same_jpg_matte.png", "same_png_matte.png"} <= names

    def test_composite_and_sidecar(self, selfie_run: tuple[Run, dict[str, tuple[int, int]]]) -> None:
        """The profile's white composite and JSON sidecar are written with the scan's facts."""
        run, sizes = selfie_run
        comp, matte = read_png(run.out / "rot6_composite.png"), read_png(run.out / "rot6_matte.png")
        assert comp.shape == (*matte.shape, 3) and comp.dtype == np.uint8
        assert (comp[matte == 0] == 255).all()
        side = json.loads((run.out / "rot6.json").read_text(encoding="utf-8"))
        assert (side["width"], side["height"], side["orientation"]) == (*sizes["rot6"], 6)
        assert (side["model"], side["profile"]) == ("selfie", "t")
        assert json.loads((run.out / "deep16.json").read_text())["bit_depth"] == 16


@pytest.mark.models
class TestIsnet:
    def test_single_file(self, model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
        """`--model isnet` on a single file writes a non-empty full-size pair beside nothing else."""
        src = tmp_path / "in"
        src.mkdir()
        photo = src / "Évelyn small.jpg"
        with Image.open(shared_data / "old_photos" / "deoldify__1920sFamilyPhoto.jpg") as im:
            im.convert("RGB").save(photo, "JPEG", quality=92)
            size = im.size
        out = tmp_path / "out"
        run = run_cli(["process", "-i", str(photo), "-d", str(out), "--model", "isnet",
                       "--model-dir", str(model_dir)], src, out)
        assert run.rc == 0, run.stderr
        check_pair(out / "Évelyn small_fg.png", out / "Évelyn small_matte.png", size)
        assert files_under(out) == {"Évelyn small_fg.png", "Évelyn small_matte.png"}


@pytest.mark.models
class TestRefusals:
    @pytest.mark.parametrize("where", ["inside", "same"])
    def test_output_in_input_tree(self, model_dir: Path, tmp_path: Path, where: str) -> None:
        """An output folder inside (or equal to) the input folder is refused with exit 2 and nothing written."""
        src = tmp_path / "in"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "a.png").write_bytes(pil_bytes(Image.new("RGB", (64, 64), "grey"), "PNG"))
        before = files_under(src)
        out = src / "sub" / "out" if where == "inside" else src
        run = run_cli(["process", "-i", str(src), "-d", str(out), "--model", "selfie",
                       "--model-dir", str(model_dir)], src, out)
        assert run.rc == 2
        assert "input" in run.stderr and "refusing" in run.stderr
        assert files_under(src) == before

    def test_output_is_file_folder(self, model_dir: Path, tmp_path: Path) -> None:
        """A single input file whose own folder is the output folder is refused with exit 2."""
        photo = tmp_path / "a.png"
        photo.write_bytes(pil_bytes(Image.new("RGB", (64, 64), "grey"), "PNG"))
        run = run_cli(["process", "-i", str(photo), "-d", str(tmp_path), "--model", "selfie",
                       "--model-dir", str(model_dir)], tmp_path, tmp_path)
        assert run.rc == 2
        assert files_under(tmp_path) == {"a.png"}

    def test_missing_input(self, model_dir: Path, tmp_path: Path) -> None:
        """A nonexistent input path is an error naming it, exit 2."""
        run = run_cli(["process", "-i", str(tmp_path / "nope"), "-d", str(tmp_path / "out"), "--model", "selfie",
                       "--model-dir", str(model_dir)], tmp_path, tmp_path)
        assert run.rc == 2 and "nope" in run.stderr

    def test_missing_models_say_how_to_fetch(self, tmp_path: Path) -> None:
        """With an empty model dir, process exits 3 and says how to fetch the model (no download)."""
        (tmp_path / "in").mkdir()
        run = run_cli(["process", "-i", str(tmp_path / "in"), "-d", str(tmp_path / "out"),
                       "--model-dir", str(tmp_path / "empty")], tmp_path, tmp_path)
        assert run.rc == 3
        assert "models fetch" in run.stderr
        assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


class TestOutputNames:
    """Model-free checks of how scans map to output names (the mirrored tree, collisions)."""

    @pytest.mark.parametrize(
        "names",
        [["a.jpg", "a.png"], ["a.jpg", "a.JPG"], ["a.jpg", "a.png", "a_png.jpg"], ["a.tif", "a.tiff", "a.TIF"]],
    )
    def test_bases_unique(self, names: list[str]) -> None:
        """Scans in one folder never share an output base, whatever their stems and suffixes."""
        jobs = [Job(src=Path("/in") / n, rel=Path(n)) for n in names]
        bases = output_bases(jobs, Path("/out"))
        assert len(set(bases.values())) == len(jobs), bases

    def test_mirrors_relative_path(self) -> None:
        """A nested scan's outputs sit at the same relative folder under the output root."""
        job = Job(src=Path("/in/sub dir/Zoë 1.jpg"), rel=Path("sub dir/Zoë 1.jpg"))
        assert output_bases([job], Path("/out"))[job] == Path("/out/sub dir/Zoë 1")

    def test_collect_walks_and_skips(self, tmp_path: Path) -> None:
        """collect finds images recursively by suffix (any case), counts other files as skipped."""
        src = tmp_path / "in"
        (src / "b").mkdir(parents=True)
        for rel in ("x.JPG", "b/y.tiff", "b/z.webp", "notes.txt", "b/readme"):
            (src / rel).write_bytes(b"")
        jobs, skipped = collect([src], tmp_path / "out")
        assert sorted(str(j.rel) for j in jobs) == ["b/y.tiff", "b/z.webp", "x.JPG"]
        assert skipped == 2
