"""The demo's flow end to end with the tiny preset, as `make demo` runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
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
        held = lfw_bench[name][4].name  # 5 photos: 4 references, the last one held out
        assert f"| {tenant}/{name} | {held} | personalized ({tenant}/{name}@1) |" in text  # its own adapter
        assert f"| {tenant}/{name} | {held} | base |" in text
        assert f"| {tenant}/{name} | {held} | input (degraded) |" in text
        assert f"| {tenant}/{name} | {held} | 0 steps |" in text  # the references before fine-tuning
        for img in ("input", "base", "zero", "personalized", "original"):
            assert (report.parent / name / Path(held).stem / f"{img}.png").is_file()
        assert f"| {tenant}/{name} | 1 |" in text  # the adapter effect, per person
    grid = Image.open(report.parent / "report.png")
    assert grid.width > grid.height  # five columns, two rows
    assert "No reference prior ships with this base, so the 0-step adapter is the base itself" in text
    assert "2 trained, 0 skipped, 0 failed" in text
    assert "## On the benchmark's report people" in text


def test_without_photos_the_demo_falls_back_to_a_labelled_astronaut_smoke_run(tmp_path, capsys):
    """No --photos content and no ../shared: one astronaut 'person' (5 references + a held-out
    view, all different), the run says SMOKE RUN ONLY, and so does the report. The pipeline after
    this choice is the one the end-to-end test above runs (``make demo`` with ../shared absent was
    also run by hand)."""
    from demo.run import _write_report, choose_people

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "too-few").mkdir()  # a person folder with fewer than 4 photos does not count
    (empty / "too-few" / "a.png").write_bytes(b"")
    for photos, shared in ((empty, tmp_path / "nowhere"), (None, tmp_path / "nowhere")):
        people, smoke = choose_people(photos, tmp_path / "state", ("t-a", "t-b"), shared=shared)
        assert smoke is True
        assert "SMOKE RUN ONLY" in capsys.readouterr().out
        [person] = people
        assert person.identity == "astronaut" and len(person.refs) == 5 and len(person.held_out) == 1
        views = [Image.open(p).convert("RGB").tobytes() for p in [*person.refs, *person.held_out]]
        assert len(set(views)) == 6  # augmented, not one photo six times
    # with the sample people beside the checkout there is no fallback
    people, smoke = choose_people(None, tmp_path / "state", ("t-a", "t-b"), shared=Path(__file__).parents[3] / "shared" / "data")
    if (Path(__file__).parents[3] / "shared" / "data" / "demo").is_dir():
        assert smoke is False and len(people) >= 2 and {p.tenant for p in people} == {"t-a", "t-b"}

    class Summary:
        def by_status(self, status):
            return ["x"] if status == "done" else []

    t = torch.rand(3, 8, 8)
    zero = SimpleNamespace(label="0 steps (prior 0123456789ab)", has_prior=True, fingerprint="f" * 32)
    report = _write_report(tmp_path / "report", [[t] * 5], ["t-a/astronaut"], [], "tiny", 2, 2, True, 1.0, Summary(), zero)
    assert "**SMOKE RUN ONLY**" in report.read_text()
    plain = _write_report(tmp_path / "plain", [[t] * 5], ["t-a/x"], [], "tiny", 2, 2, False, 1.0, Summary(), zero)
    assert "SMOKE" not in plain.read_text()
    assert "The 0-step adapter starts from the base's reference prior" in plain.read_text()


def test_the_report_says_in_numbers_what_each_adapter_changed():
    from demo.run import Scored, _adapter_effect

    def res(v):
        return SimpleNamespace(value=v)

    def scored(person, photo, base_id, pers_id, pers_psnr, changed, zero_id=None):
        metrics = {"base": {"psnr": res(23.0), "id_facenet": res(base_id)},
                   "zero": {"psnr": res(23.0), "id_facenet": res(base_id if zero_id is None else zero_id)},
                   "personalized": {"psnr": res(pers_psnr), "id_facenet": res(pers_id)}}
        return Scored(person, photo, f"{person.tenant}/{person.identity}@1", metrics, changed)

    anna = SimpleNamespace(tenant="t-a", identity="anna")
    bob = SimpleNamespace(tenant="t-b", identity="bob")
    table = [scored(anna, "1.jpg", 0.50, 0.56, 23.5, 3.0), scored(anna, "2.jpg", 0.50, 0.48, 23.1, 4.0),
             scored(bob, "1.jpg", 0.40, 0.49, 22.7, 2.0, zero_id=0.43)]
    text = "\n".join(_adapter_effect(table))
    assert "| t-a/anna | 2 | 3.50 | +0.30 | +2.0 | +0.0 |" in text  # means over anna's two photos
    assert "| t-b/bob | 1 | 2.00 | -0.30 | +9.0 | +3.0 |" in text
    assert ("Mean over 3 held-out photos: ID +4.3 points, PSNR +0.10 dB; the adapter raised ID on 2 of 3; "
            "with 0 fine-tuning steps, ID +1.0.") in text
