"""The demo report's benchmark section shows report-split runs of the demo's own base only."""

import json

from demo.benchmark_note import benchmark_section


def _run(path, *, fingerprint="a" * 32, split="report", steps=150, gain=2.5):
    gate = {"id_gain": gain, "psnr_change": 0.31, "id_gain_interval": [0.5, 4.25], "helped": 0.625, "passed": False}
    heavy = {"Base": {"id_facenet": 54.0}, "PFStorer": {"id_facenet": 54.0 + gain}, "gate": gate}
    path.write_text(json.dumps({"base_fingerprint": fingerprint, "split": split, "people": 60, "test_photos": 322,
                                "card": "CPU (2 cores), no GPU", "settings": {"steps": steps},
                                "results": {"heavy": heavy}}))


def test_report_runs_of_this_base_are_shown_fine_tuned_first(tmp_path):
    _run(tmp_path / "personalization_both_compact_cpu_gate_0steps.json", steps=0, gain=-1.0)
    _run(tmp_path / "personalization_both_compact_cpu_gate.json")
    text = "\n".join(benchmark_section("compact", "a" * 32, tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| heavy")]
    assert rows == ["| heavy | 150 | 54.00 | 56.50 | +2.50 [+0.50, +4.25] | +0.31 | 62% | fail |",
                    "| heavy | 0 | 54.00 | 53.00 | -1.00 [+0.50, +4.25] | +0.31 | 62% | fail |"]
    assert "`benchmarks/results/personalization_both_compact_cpu_gate.json` (60 people, 322 photos" in text


def test_other_bases_and_tune_runs_are_never_shown_as_this_ones(tmp_path):
    _run(tmp_path / "personalization_both_compact_cpu_gate_tune.json", split="tune")
    _run(tmp_path / "personalization_both_compact_old_gate.json", fingerprint="b" * 32)
    _run(tmp_path / "personalization_both_tiny_cpu_gate.json")  # another base's name
    (tmp_path / "personalization_both_compact_broken.json").write_text("{not json")
    text = "\n".join(benchmark_section("compact", "a" * 32, tmp_path))
    assert "| heavy" not in text
    assert "No report-split run of `bench_personalization.py` is on file for this `compact` (fingerprint aaaaaaaaaaaa)" in text
