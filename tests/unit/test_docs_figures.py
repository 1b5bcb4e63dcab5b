"""Every figure the README's benchmark table quotes comes from the results file it names.

A row of the table names its command (``python benchmarks/...``) and at least one
``benchmarks/results/<name>.md`` (or ``.json``); every decimal number in its result cell (and every
number with a thousands separator) must appear in one of those files, at the precision quoted.
A figure that no results file holds, or a row that cites none, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
# decimals (1.49, -0.05, +5.11) and numbers with thousands separators (100,400): integers alone are
# counts and settings (8 in flight, 20 people), not measurements
FIGURE = re.compile(r"(?<![\w.,])[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\w.,])[-+]?\d+\.\d+(?![\d])")
CITED = re.compile(r"benchmarks/results/([\w.-]+?)\.(?:md|json)")


def figures(text: str) -> list[str]:
    return [m.group(0).replace(",", "").lstrip("+") for m in FIGURE.finditer(text)]


def quoted(figure: str, values: list[float]) -> bool:
    """``figure`` is one of ``values`` rounded to its number of decimals (signs aside)."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    target = abs(float(figure))
    return any(abs(round(abs(v), decimals) - target) < 1e-9 for v in values)


def table_rows() -> list[str]:
    return [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| ") and "`python benchmarks/" in line]


def test_the_checker_finds_figures_and_matches_by_precision() -> None:
    assert figures("p95 1.49 s, +5.11, 100,400 rows, 8 in flight, -0.05 dB") == ["1.49", "5.11", "100400", "-0.05"]
    assert quoted("1.49", [1.485]) and quoted("-0.05", [0.05]) and not quoted("1.49", [1.4])


def test_every_benchmark_figure_in_the_readme_is_in_the_results_file_it_cites() -> None:
    rows = table_rows()
    assert len(rows) >= 8, "the README's benchmark table was not found"
    problems = []
    for row in rows:
        command = re.search(r"`python benchmarks/(\w+)\.py", row).group(1)
        cited = set(CITED.findall(row))
        if not cited:
            problems.append(f"{command}: cites no results file")
            continue
        values: list[float] = []
        for name in cited:
            files = [RESULTS / f"{name}.{ext}" for ext in ("md", "json")]
            if not any(f.exists() for f in files):
                problems.append(f"{command}: cites {name}, which is not in benchmarks/results/")
            values += [float(x) for f in files if f.exists() for x in figures(f.read_text())]
        result = row.split(" | ", 1)[1]
        missing = [x for x in figures(result) if not quoted(x, values)]
        if missing:
            problems.append(f"{command}: {missing} not in {sorted(cited)}")
    assert not problems, "\n".join(problems)
