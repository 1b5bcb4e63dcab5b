"""Issue 6: the demo's flow end to end with the tiny preset, as `make demo` runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration
PFSTORER = Path(sys.executable).with_name("pfstorer")


def demo(tmp_path: Path, photos: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(PFSTORER), "demo", "--photos", str(photos), "--state-dir", str(tmp_path / "state"), "--base", "tiny",
         "--steps", "2", "--restore-steps", "2", "--max-side", "64"],
        capture_output=True, text=True, timeout=480, env=env,
    )


def test_demo_personalizes_serves_and_reports_every_person(lfw_bench, tmp_path):
    photos = tmp_path / "people"
    names = list(lfw_bench)[:2]
    for name in names:  # links, not copies, of ../shared/data
        (photos / name).mkdir(parents=True)
        for src in lfw_bench[name][:5]:
            (photos / name / src.name).symlink_to(src)
    proc = demo(tmp_path, photos)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = tmp_path / "state" / "report" / "report.md"
    assert f"report: {report}" in proc.stdout
    text = report.read_text()
    assert "SMOKE" not in text
    tenants = {names[0]: "studio-a", names[1]: "studio-b"}  # two tenants
    for name, tenant in tenants.items():
        assert f"| {tenant}/{name} | personalized ({tenant}/{name}@1) |" in text  # served with its own adapter
        assert f"| {tenant}/{name} | base |" in text and f"| {tenant}/{name} | input (degraded) |" in text
        for img in ("input", "base", "personalized", "original"):
            assert (report.parent / name / f"{img}.png").is_file()
    grid = Image.open(report.parent / "report.png")
    assert grid.width > grid.height  # four columns, two rows
    assert "2 trained, 0 skipped, 0 failed" in text


def test_demo_without_photos_is_a_labelled_smoke_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = demo(tmp_path, empty)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE RUN ONLY" in proc.stdout
    text = (tmp_path / "state" / "report" / "report.md").read_text()
    assert "SMOKE RUN ONLY" in text and "astronaut" in text
