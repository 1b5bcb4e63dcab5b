"""pfstorer.evaluate: folder pairing, the three tables, the grid and the `evaluate` subcommand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pfstorer.metrics as M
from pfstorer.cli import METRIC_NAMES, build_parser
from pfstorer.errors import InputError
from pfstorer.evaluate import GRID_HEADER, GRID_PAD, evaluate_folders, make_grid


def _save(img: torch.Tensor | np.ndarray, path: Path) -> None:
    arr = (
        img if isinstance(img, np.ndarray) else (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _folders(tmp: Path, n: int = 3, size: int = 48) -> dict[str, Path]:
    """gt as PNG, pred as PNG with a per-image known offset, 16 px inputs as JPEG, one stray file each."""
    rng = np.random.default_rng(0)
    d = {k: tmp / k for k in ("pred", "gt", "inp")}
    for i in range(n):
        gt = rng.integers(60, 190, (size, size, 3), dtype=np.uint8)
        _save(gt, d["gt"] / f"face{i}.png")
        _save(gt + np.uint8(5 * (i + 1)), d["pred"] / f"face{i}.png")  # PSNR = 20*log10(255 / (5*(i+1)))
        _save(gt[::3, ::3], d["inp"] / f"face{i}.jpg")
    _save(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), d["pred"] / "orphan.png")
    _save(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), d["gt"] / "lonely.png")
    (d["gt"] / "notes.txt").write_text("not an image")
    return d


def test_evaluate_folders_writes_tables_and_grid_with_the_right_rows(tmp_path: Path) -> None:
    d = _folders(tmp_path)
    out = tmp_path / "out"
    report = evaluate_folders(d["pred"], d["gt"], out, input_dir=d["inp"], metrics=["psnr", "ssim"])

    expected = {f"face{i}": 20 * math.log10(255 / (5 * (i + 1))) for i in range(3)}
    assert report.images == sorted(expected)
    assert report.unmatched_pred == ["orphan"] and report.unmatched_gt == ["lonely"]
    for name, value in expected.items():
        assert report.value(name, "psnr") == pytest.approx(value, abs=1e-6)
    assert report.means["psnr"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    assert set(report.files) == {"md", "json", "csv", "grid"}
    for f in ("metrics.md", "metrics.json", "metrics.csv", "grid.png"):
        assert (out / f).is_file()

    rows = list(csv.reader(open(out / "metrics.csv", newline="")))
    assert rows[0] == ["image", "psnr", "ssim"]
    assert [r[0] for r in rows[1:]] == ["face0", "face1", "face2", "mean"]
    assert float(rows[2][1]) == pytest.approx(expected["face1"], abs=1e-6)
    assert float(rows[-1][1]) == pytest.approx(report.means["psnr"], abs=1e-9)

    data = json.loads((out / "metrics.json").read_text())
    assert data["n_images"] == 3
    assert data["metrics"]["psnr"]["backend"] == M.available_metrics()["psnr"]
    assert data["metrics"]["ssim"]["count"] == 3
    assert [im["name"] for im in data["images"]] == ["face0", "face1", "face2"]
    assert data["images"][0]["values"]["psnr"] == pytest.approx(expected["face0"], abs=1e-6)
    assert data["unmatched"] == {"pred": ["orphan"], "gt": ["lonely"]}

    md = (out / "metrics.md").read_text()
    assert "| image | PSNR ↑ | SSIM ↑ |" in md
    assert md.count("| face") == 3 and "**mean**" in md and "orphan" in md and "grid.png" in md

    # one row per image, three labelled columns of 48 px cells (input 16 px is enlarged to the cell)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (GRID_HEADER + 3 * 48 + 4 * GRID_PAD, 3 * 48 + 4 * GRID_PAD, 3)
    y0, x0 = GRID_HEADER + GRID_PAD + 1 * (48 + GRID_PAD), GRID_PAD + 2 * (48 + GRID_PAD)
    gt1 = np.asarray(Image.open(d["gt"] / "face1.png"))
    assert np.array_equal(
        grid[y0 : y0 + 48, x0 : x0 + 48], gt1
    )  # row 2, column 3: its ground truth, untouched
    assert grid[: GRID_HEADER - 4].min() < 128  # the header band holds dark label text


def test_evaluate_without_input_has_two_columns_and_psnr_inf_is_json_safe(tmp_path: Path) -> None:
    d = _folders(tmp_path, n=2)
    for p in (d["gt"]).glob("face*.png"):
        (d["pred"] / p.name).write_bytes(p.read_bytes())  # perfect restoration
    report = evaluate_folders(d["pred"], d["gt"], tmp_path / "o", metrics=["psnr"])
    assert report.means["psnr"] == math.inf
    data = json.loads((tmp_path / "o" / "metrics.json").read_text())  # strict JSON: no bare Infinity
    assert data["metrics"]["psnr"]["mean"] == "inf"
    grid = Image.open(tmp_path / "o" / "grid.png")
    assert grid.size == (2 * 48 + 3 * GRID_PAD, GRID_HEADER + 2 * 48 + 3 * GRID_PAD)


def test_evaluate_rejects_unpaired_or_mismatched_folders(tmp_path: Path) -> None:
    d = _folders(tmp_path, n=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="same name"):
        evaluate_folders(d["pred"], tmp_path / "empty", tmp_path / "o", metrics=["psnr"])
    _save(np.zeros((20, 24, 3), np.uint8), tmp_path / "small" / "face0.png")
    with pytest.raises(InputError, match="same size"):
        evaluate_folders(tmp_path / "small", d["gt"], tmp_path / "o", metrics=["psnr"])
    with pytest.raises(InputError, match="does not exist"):
        evaluate_folders(tmp_path / "nope", d["gt"], tmp_path / "o")


def test_make_grid_size_and_validation() -> None:
    rows = [[torch.rand(3, 40, 30), torch.rand(3, 20, 60)], [torch.rand(3, 40, 30), torch.rand(3, 10, 10)]]
    g = make_grid(rows, ["a", "b"], row_labels=["r0", "r1"])
    # cells take the largest height (40) and width (60) of any image
    assert g.shape == (3, GRID_HEADER + 2 * 40 + 3 * GRID_PAD, 2 * 60 + 3 * GRID_PAD)
    assert g.dtype == torch.float32 and 0.0 <= float(g.min()) and float(g.max()) <= 1.0
    big = make_grid([[torch.rand(3, 1024, 512)]], [])
    assert big.shape == (3, 256 + 2 * GRID_PAD, 128 + 2 * GRID_PAD)  # capped at 256 px, no header
    with pytest.raises(InputError):
        make_grid(rows, ["only one label"])
    with pytest.raises(InputError):
        make_grid([[torch.rand(3, 8, 8)], [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]], [])


def test_cli_subcommand_runs_and_explains_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pfstorer.metrics import METRICS

    assert set(METRIC_NAMES) == set(METRICS)  # the help lists exactly the metrics there are
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--help"])
    helptext = capsys.readouterr().out
    for flag in ("--pred", "--gt", "--refs", "--input", "--out", "--metrics"):
        assert flag in helptext
    d = _folders(tmp_path, n=2)
    args = parser.parse_args(
        [
            "evaluate",
            "--pred",
            str(d["pred"]),
            "--gt",
            str(d["gt"]),
            "--out",
            str(tmp_path / "cli"),
            "--metrics",
            "psnr",
        ]
    )
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "metrics.csv").is_file() and (tmp_path / "cli" / "grid.png").is_file()
    assert "PSNR" in capsys.readouterr().out


@pytest.mark.eval
def test_evaluate_real_faces_with_references(tmp_path: Path, lfw_bench: dict[str, list[Path]]) -> None:
    """All metrics on real faces: the identity columns exist, name their backends, and a restored
    face of the right person scores closer to the references than someone else's face."""
    avail = M.available_metrics()
    if avail["id_facenet"].startswith("unavailable"):
        pytest.skip(avail["id_facenet"])
    people = [p for p in sorted(lfw_bench) if len(lfw_bench[p]) >= 7][:2]
    me, other = lfw_bench[people[0]], lfw_bench[people[1]]
    from pfstorer.images import load_image

    for ref in me[:5]:
        _save(load_image(ref), tmp_path / "refs" / ref.name)
    gt = load_image(me[5])
    _save(gt, tmp_path / "gt" / "mine.png")
    _save(gt.flip(-1), tmp_path / "pred" / "mine.png")  # a "restoration" that keeps the identity
    other_img = load_image(other[0])
    _save(gt, tmp_path / "gt" / "swapped.png")
    _save(other_img, tmp_path / "pred" / "swapped.png")  # a "restoration" that lost it
    report = evaluate_folders(
        tmp_path / "pred", tmp_path / "gt", tmp_path / "out", refs_dir=tmp_path / "refs"
    )
    assert {"psnr", "ssim", "id_facenet", "id_refs_facenet", "niqe"} <= set(report.metrics)
    assert "FaceNet" in report.backends["id_facenet"]
    assert report.value("mine", "id_facenet") > report.value("swapped", "id_facenet")
    assert report.value("mine", "id_refs_facenet") > report.value("swapped", "id_refs_facenet")
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["metrics"]["id_refs_facenet"]["count"] == 2
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "ID-refs FaceNet" in md and "ST-LPIPS" in md
