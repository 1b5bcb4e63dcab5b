"""The demo report's benchmark section: what the personalization benchmark measured on its
report people (never used to choose a setting) for the base the demo ran on.

The demo's own handful of photos is an example; this section is the measurement. It reads the
results files ``benchmarks/bench_personalization.py`` writes and keeps only report-split runs
of this very base (same fingerprint), so a number measured on another base is never shown as
this one's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _report_runs(results: Path, base: str, fingerprint: str) -> list[tuple[Path, dict[str, Any]]]:
    """Report-split runs of ``base`` at this fingerprint, fine-tuned first, then 0-step ones."""
    runs = []
    for path in sorted(results.glob(f"personalization_*_{base}_*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if run.get("base_fingerprint") == fingerprint and run.get("split") == "report" and "results" in run:
            runs.append((path, run))
    return sorted(runs, key=lambda pr: pr[1]["settings"].get("steps") == 0)


def _row(level: str, rows: dict[str, Any], steps: int) -> str:
    g = rows["gate"]
    lo, hi = g.get("id_gain_interval") or (float("nan"), float("nan"))
    helped = "n/a" if g.get("helped") is None else f"{g['helped']:.0%}"
    return (f"| {level} | {steps} | {rows['Base']['id_facenet']:.2f} | {rows['PFStorer']['id_facenet']:.2f} | "
            f"{g['id_gain']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {g['psnr_change']:+.2f} | {helped} | "
            f"{'pass' if g['passed'] else 'fail'} |")


def benchmark_section(base: str, fingerprint: str, results: Path = RESULTS) -> list[str]:
    """Markdown lines: each report-split run of this base, per level, against its gate."""
    lines = ["## On the benchmark's report people", ""]
    runs = _report_runs(results, base, fingerprint)
    if not runs:
        return lines + [f"No report-split run of `bench_personalization.py` is on file for this `{base}` "
                        f"(fingerprint {fingerprint[:12]}): see docs/personalization.md for how to measure it.", ""]
    lines += ["lfw128 bench people that chose no setting, FaceNet ID (cos x 100) and PSNR against the original; "
              "gain with its 95 % bootstrap interval over people, and the share of photos the adapter helped.", "",
              "| level | fine-tuning steps | Base ID | PFStorer ID | ID gain [95 %] | PSNR change (dB) | photos helped "
              "| gate |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    sources = []
    for path, run in runs:
        steps = run["settings"].get("steps")
        lines += [_row(level, rows, steps) for level, rows in run["results"].items()]
        sources.append(f"`benchmarks/results/{path.name}` ({run['people']} people, {run['test_photos']} photos, "
                       f"{run['card']})")
    return lines + ["", "From " + "; ".join(sources) + ".", ""]
