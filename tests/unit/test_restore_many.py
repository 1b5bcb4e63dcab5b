"""Many photos in one command: ``pfstorer restore`` and ``pfstorer degrade`` over files, folders
and globs; a photo that fails is reported and the others go on; --skip-existing; one photo
behaves as it always did; and starting a restore imports none of the platform's heavy parts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pfstorer.cli import main

REPO = Path(__file__).resolve().parents[2]
FAST = ["--base", "tiny", "--steps", "1", "--seed", "3", "--quiet"]


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photos(lfw_bench) -> list[Path]:
    return next(iter(lfw_bench.values()))


@pytest.fixture
def layout(photos, tmp_path) -> dict[str, Path]:
    """folder/ with a.jpg, c.jpg and notes.txt; more/ with x1.jpg, x2.jpg and a PNG the glob
    leaves out; one loose file."""
    folder, more = tmp_path / "folder", tmp_path / "more"
    folder.mkdir()
    more.mkdir()
    shutil.copy(photos[0], folder / "c.jpg")
    shutil.copy(photos[1], folder / "a.jpg")
    (folder / "notes.txt").write_text("not a photo")
    shutil.copy(photos[2], more / "x2.jpg")
    shutil.copy(photos[3], more / "x1.jpg")
    shutil.copy(photos[3], more / "skipped_by_glob.png")
    loose = tmp_path / "loose.jpg"
    shutil.copy(photos[4], loose)
    return {"folder": folder, "more": more, "loose": loose, "out": tmp_path / "out"}


def test_folder_glob_and_file_in_one_call(layout, tmp_path, capsys):
    glob = layout["more"] / "x*.jpg"  # as if quoted: we expand it
    code, out, err = run(["restore", *FAST, "--input", layout["folder"], glob, layout["loose"],
                          "--out", layout["out"], "--suffix", "_r", "--ext", "webp"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(layout["out"])) == ["a_r.webp", "c_r.webp", "loose_r.webp", "x1_r.webp", "x2_r.webp"]
    assert all((layout["out"] / n).read_bytes()[8:12] == b"WEBP" for n in os.listdir(layout["out"]))
    # in the order given: the folder's images sorted, then the glob's, then the file
    order = [line.split(" -> ")[1].split(" (")[0] for line in out.splitlines() if line.startswith("restored ")]
    assert [Path(p).name for p in order] == ["a_r.webp", "c_r.webp", "x1_r.webp", "x2_r.webp", "loose_r.webp"]
    assert "5 of 5 photos" in out
    # a photo restored in a batch is the one restored alone
    assert run(["restore", *FAST, "--input", layout["folder"] / "c.jpg", "--out", tmp_path / "alone.webp"],
               capsys)[0] == 0
    assert (tmp_path / "alone.webp").read_bytes() == (layout["out"] / "c_r.webp").read_bytes()


def test_a_corrupt_photo_is_reported_and_the_others_are_written(layout, capsys):
    corrupt = layout["folder"] / "b.jpg"  # between a.jpg and c.jpg
    corrupt.write_bytes((layout["folder"] / "a.jpg").read_bytes()[:600])
    code, out, err = run(["restore", *FAST, "--input", layout["folder"], "--out", layout["out"]], capsys)
    assert code == 1
    assert f"error: {corrupt}: corrupt or truncated" in err
    assert err.count(f"error: {corrupt}:") == 2  # as it happens, then in the summary
    assert "1 of 3 photos failed" in err
    assert sorted(os.listdir(layout["out"])) == ["a.png", "c.png"]
    assert "2 of 3 photos" in out


def test_skip_existing_leaves_outputs_alone(layout, capsys):
    args = ["restore", *FAST, "--input", layout["folder"], "--out", layout["out"]]
    assert run(args, capsys)[0] == 0
    a, c = layout["out"] / "a.png", layout["out"] / "c.png"
    a.write_bytes(b"kept as it is")
    c.unlink()
    code, out, _ = run([*args, "--skip-existing"], capsys)
    assert code == 0 and "1 skipped" in out
    assert a.read_bytes() == b"kept as it is"  # not rewritten
    assert c.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the missing one is done
    assert run(args, capsys)[0] == 0  # without the flag it is rewritten: the check above can fail
    assert a.read_bytes() != b"kept as it is"


def test_one_photo_behaves_as_before(layout, tmp_path, capsys):
    src, dst = layout["loose"], tmp_path / "restored.png"
    code, out, err = run(["restore", *FAST, "--input", src, "--out", dst], capsys)
    assert code == 0 and err == ""
    assert out == f"restored {src} (128x128) with the base model only -> {dst} (128x128)\n"
    assert dst.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # problems with one photo stay user errors: one line, exit code 2, nothing written
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(src.read_bytes()[:600])
    for bad in (corrupt, tmp_path / "missing.jpg"):
        code, _, err = run(["restore", *FAST, "--input", bad, "--out", tmp_path / "no.png"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "no.png").exists()
    # into an existing folder it keeps its name
    folder = tmp_path / "into"
    folder.mkdir()
    assert run(["restore", *FAST, "--input", src, "--out", folder], capsys)[0] == 0
    assert os.listdir(folder) == ["loose.png"]


@pytest.mark.parametrize("case, expect", [
    ("glob_matches_nothing", "no image file matches"),
    ("out_is_a_file_name", "looks like an image file name"),
    ("same_output_twice", "would both be written to"),
    ("overwrites_an_input", "would overwrite an input"),
    ("unknown_ext", "--ext gif"),
    ("suffix_with_an_output_file", "--suffix and --ext"),
])
def test_a_bad_command_is_refused_before_any_work(case, expect, layout, capsys):
    folder, out = layout["folder"], layout["out"]
    twin = layout["more"] / "a.png"
    shutil.copy(layout["loose"], twin)
    args = {
        "glob_matches_nothing": ["--input", folder / "*.heic", "--out", out],
        "out_is_a_file_name": ["--input", folder, "--out", out / "x.png"],
        "same_output_twice": ["--input", folder, twin, "--out", out],
        "overwrites_an_input": ["--input", layout["more"], "--out", layout["more"]],
        "unknown_ext": ["--input", folder, "--out", out, "--ext", "gif"],
        "suffix_with_an_output_file": ["--input", layout["loose"], "--out", out / "x.png", "--suffix", "_r"],
    }[case]
    code, _, err = run(["restore", "--base", "tiny", *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not out.exists()


def test_degrade_takes_folders_like_restore(layout, tmp_path, capsys):
    code, out, _ = run(["degrade", "--input", layout["folder"], "--out", layout["out"], "--seed", "2",
                        "--quiet"], capsys)
    assert code == 0 and "2 of 2 photos" in out
    assert sorted(os.listdir(layout["out"])) == ["a.png", "c.png"]
    assert run(["degrade", "--input", layout["folder"] / "a.jpg", "--out", tmp_path / "a.png", "--seed", "2"],
               capsys)[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (layout["out"] / "a.png").read_bytes()


HEAVY = ("ray", "mlflow", "pyarrow", "s3fs", "pandas", "cv2", "dlib", "face_recognition_models", "skimage",
         "scipy.stats", "pfstorer.metrics", "pfstorer.evaluate", "pipelines", "serving", "demo")


def test_restoring_imports_none_of_the_platform(photos, tmp_path):
    """What `pfstorer restore` imports on its way to the first photo: torch, diffusers, the image
    code. Ray, MLflow, Arrow, the metrics' face models, scipy.stats (for diffusers' schedulers)
    and the other packages' commands cost seconds of every start-up and are not needed to restore."""
    base = "compact" if (REPO / "pfstorer" / "weights" / "compact" / "model.safetensors").exists() else "tiny"
    code = (
        "import sys\n"
        "from pfstorer.cli import main\n"
        f"assert main(['restore', '--base', {base!r}, '--steps', '1', '--quiet', '--input', {str(photos[0])!r}, "
        f"'--out', {str(tmp_path / 'r.png')!r}]) == 0\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (tmp_path / "r.png").exists()
