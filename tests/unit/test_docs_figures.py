"""Every measured figure in the README, docs/ and the model cards comes from a results file they cite.

The unit of a citation is a Markdown paragraph, list item or table row; a table row may also rely
on the paragraph that introduces its table. A unit holding a figure must name at least one
``benchmarks/results/<name>.md`` (or ``.json``), and every figure in it must appear in one of the
files it names, at the precision quoted. A figure is a decimal number (1.49, -0.05, +5.11) or a
number with thousands separators (100,400): integers alone are counts and settings (8 in flight, 20
people). Figures inside `code` are options and commands, not measurements; design constants and
version numbers outside code are listed in ``NOT_MEASURED``. A figure no results file holds, a unit
that cites none, or a cited results file that does not name the command that wrote it fails here.
The README's benchmark table also names each row's command.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "pfstorer" / "weights").glob("*/MODEL_CARD.md"))]
FIGURE = re.compile(r"(?<![\w.,])[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])"
                    r"|(?<![\w.,])[-+]?\d+\.\d+(?![\d]|\.\d)")
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?")
CITED = re.compile(r"benchmarks/results/([\w.-]+?)\.(?:md|json)")
CODE = re.compile(r"`[^`]*`")
# decimals (and numbers with separators) that are not measurements, as they appear outside code
NOT_MEASURED = [
    # versions, licences, the paper's sections
    "Python 3.11", "torch 2.13", "Ray 2.60", "Apache-2.0", "CC BY 4.0", "CC BY\n4.0", "SD 2.1", "SD-2.1",
    "sections 3.1–3.3", "section 4.3",
    # settings and gates
    "0.1 L_gen", "lambda_gen = 0.1", "lambda_gen 0, 0.1, 0.5 and 1", "lambda_gen 0, 0.1, 0.5, 1",
    "p_HQ = 0.03", "1.42 face-box", "1.7x the face box", "0.85-1.0", "0.6-1.0", "0.95-1.0",
    "at most 0.3 dB", "at most 0.2 dB",
    # S3's listing page, data sets, the base's training settings (model card)
    "1,000 keys", "10,537 photos of 5,599 people", "1,058 bench photos",
    "4,000 steps", "64,000 crops", "weight 0.05", "(ramped to step 1,400)", "weight 0.03", "2,400 steps x 8",
    "19,200 128 px crops",
    "(0.9/0.99, weight decay 0.01)", "EMA 0.999", "AdamW (0.5/0.99)",
]


def figures(text: str) -> list[str]:
    return [m.group(0).replace(",", "").lstrip("+") for m in FIGURE.finditer(text)]


def quoted(figure: str, values: list[float]) -> bool:
    """``figure`` is one of ``values`` rounded to its number of decimals (signs aside)."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    target = abs(float(figure))
    return any(abs(round(abs(v), decimals) - target) < 1e-9 for v in values)


@functools.cache
def names_its_command(name: str) -> bool:
    """``benchmarks/results/<name>.md`` says which ``python benchmarks/...`` command wrote it."""
    report = RESULTS / f"{name}.md"
    return report.exists() and "python benchmarks/" in report.read_text()


@functools.cache
def results_values(name: str) -> list[float] | None:
    """Every number in ``benchmarks/results/<name>.md`` and ``.json``; None if neither exists."""
    files = [f for f in (RESULTS / f"{name}.md", RESULTS / f"{name}.json") if f.exists()]
    if not files:
        return None
    return [float(m.group(0).replace(",", "")) for f in files for m in NUMBER.finditer(f.read_text())]


def units(text: str) -> list[tuple[int, str, str]]:
    """(first line, text, cited context) of each paragraph, list item and table row outside code.

    A table row's cited context is the row and the paragraph that introduces its table."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    fenced = indented = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if not line.strip():
            indented = False
            if current:
                blocks.append(current)
                current = []
            continue
        if indented or (not current and line.startswith("    ")):
            indented = True
            continue
        if re.match(r"\s*(\||- |\d+\. )", line) and current:
            blocks.append(current)
            current = []
        current.append((number, line))
    if current:
        blocks.append(current)
    out, caption = [], ""
    for block in blocks:
        body = "\n".join(line for _, line in block)
        table_row = body.lstrip().startswith("|")
        if not table_row:
            caption = body
        out.append((block[0][0], body, body + "\n" + caption if table_row else body))
    return out


def measured(body: str) -> list[str]:
    body = CODE.sub(" ", body)
    for phrase in NOT_MEASURED:
        body = body.replace(phrase, " ")
    return figures(body)


def problems_in(path: Path) -> list[str]:
    problems = []
    for line, body, context in units(path.read_text()):
        found = measured(body)
        if not found:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        cited = sorted(set(CITED.findall(context)))
        if not cited:
            problems.append(f"{where}: {found} but cites no benchmarks/results/ file")
            continue
        values: list[float] = []
        for name in cited:
            got = results_values(name)
            if got is None:
                problems.append(f"{where}: cites {name}, which is not in benchmarks/results/")
            elif not names_its_command(name):
                problems.append(f"{where}: benchmarks/results/{name}.md names no command")
            values += got or []
        missing = [x for x in found if not quoted(x, values)]
        if missing:
            problems.append(f"{where}: {missing} not in {cited}")
    return problems


def test_the_checker_finds_figures_and_matches_by_precision() -> None:
    assert figures("p95 1.49 s, +5.11, 100,400 rows, 8 in flight, -0.05 dB") == [
        "1.49", "5.11", "100400", "-0.05"]
    assert figures("on 127.0.0.1, KubeRay 1.5.1") == []
    assert quoted("1.49", [1.485]) and quoted("-0.05", [0.05]) and not quoted("1.49", [1.4])
    assert measured("`--adv-weight 0.05` and CC BY 4.0, then 2.5x") == ["2.5"]


def test_the_checker_splits_paragraphs_items_and_rows() -> None:
    text = ("Intro cites `benchmarks/results/a.md`:\n\n| x | y |\n| 1.5 | 2 |\n\n"
            "- item 0.3\n  more\n- next\n\n    code 9.9\n")
    got = [(line, body) for line, body, _ in units(text)]
    assert got == [(1, "Intro cites `benchmarks/results/a.md`:"), (3, "| x | y |"), (4, "| 1.5 | 2 |"),
                   (6, "- item 0.3\n  more"), (8, "- next")]
    assert "benchmarks/results/a.md" in units(text)[2][2]


def test_every_benchmark_row_in_the_readme_names_its_command_and_results() -> None:
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| ") and "`python benchmarks/" in line]
    assert len(rows) >= 8, "the README's benchmark table was not found"
    assert all(CITED.search(row) for row in rows), [row[:60] for row in rows if not CITED.search(row)]


def test_every_phrase_that_is_not_a_measurement_is_still_in_the_docs() -> None:
    texts = [path.read_text() for path in DOCS]
    assert [phrase for phrase in NOT_MEASURED if not any(phrase in text for text in texts)] == []


def test_every_figure_in_the_docs_is_in_the_results_file_it_cites() -> None:
    assert len(DOCS) >= 5, DOCS
    problems = [p for path in DOCS for p in problems_in(path)]
    assert not problems, f"{len(problems)} figures without a results file:\n" + "\n".join(problems)
