"""The evaluation protocol of the personalization benchmark: which bench people settings may be
chosen on (tune) and which report, and intervals over people rather than photos."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import TUNE_PEOPLE, bench_split, bootstrap_interval, markdown_table  # noqa: E402

NAMES = [f"Person_{i:03d}" for i in range(100)]


def test_tune_and_report_split_every_bench_person_once():
    tune, report = bench_split(NAMES, "tune"), bench_split(NAMES, "report")
    assert len(tune) == TUNE_PEOPLE == 30 and len(report) == 70
    assert set(tune).isdisjoint(report) and set(tune) | set(report) == set(NAMES)
    assert tune == [n for n in NAMES if n in set(tune)]  # the order given is kept
    assert tune != NAMES[:30]  # by hash of the name, not the first names alphabetically


def test_the_split_depends_on_names_only():
    tune = bench_split(NAMES, "tune")
    assert bench_split(list(reversed(NAMES)), "tune") == list(reversed(tune))
    # a person added later lands on one side without moving anyone else
    more = bench_split(NAMES + ["Zed_Newcomer"], "tune")
    assert len(set(more) ^ set(tune)) <= 2


def test_demo_people_are_in_neither_part():
    demo = {NAMES[0], NAMES[1]}
    both = bench_split(NAMES, "tune", exclude=demo) + bench_split(NAMES, "report", exclude=demo)
    assert demo.isdisjoint(both) and len(both) == 98
    with pytest.raises(ValueError, match="tune"):
        bench_split(NAMES, "bench")


def test_bootstrap_resamples_people_not_photos():
    # one person with many identical photos must not make the interval narrow
    values = [10.0] * 50 + [0.0, 0.0]
    people = [0] * 50 + [1, 2]
    lo, hi = bootstrap_interval(values, people)
    assert lo <= 0.5 and hi >= 9.5  # whether person 0 is drawn decides almost everything
    lo, hi = bootstrap_interval([1.0] * 6, [0, 0, 1, 1, 2, 2])
    assert lo == hi == 1.0


def test_a_table_keeps_the_columns_only_some_rows_have() -> None:
    """A suite that scores more metrics than the first row's must not lose them from the table."""
    rows = [{"suite": "a", "psnr": 20.0, "gates": "pass"},
            {"suite": "b", "psnr": 30.0, "niqe": 6.5, "gates": "FAIL"}]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| suite | psnr | niqe | gates |"
    assert lines[2] == "| a | 20 |  | pass |" and lines[3] == "| b | 30 | 6.5 | FAIL |"


def test_a_resumed_run_says_its_wall_time_is_its_own() -> None:
    """Wall time of a run resumed with --resume covers only the people it scored itself."""
    from bench_personalization import wall_note

    assert wall_note({"people": 60, "resumed_people": 12}) == (
        " (this run; 12 of the 60 people were scored by earlier runs with --resume)")
    assert wall_note({"people": 60, "resumed_people": 0}) == ""
    assert wall_note({"people": 20}) == ""  # files written before runs recorded it


def test_the_control_row_never_gives_a_person_their_own_references() -> None:
    from bench_personalization import others_references

    refs = {name: [f"{name}/{k}.jpg" for k in range(3)] for name in NAMES[:5]}
    others = others_references(NAMES[:5], refs)
    assert set(others) == set(NAMES[:5])
    assert all(others[who] != refs[who] for who in NAMES[:5])
    assert sorted(map(tuple, others.values())) == sorted(map(tuple, refs.values()))  # everyone's photos used once
    assert others_references(NAMES[:5], refs) == others  # the same pairs in every run
    with pytest.raises(ValueError, match="two people"):
        others_references(NAMES[:1], refs)


def test_pfstorer_is_compared_with_each_row_photo_by_photo() -> None:
    """The ablation contrast pairs each photo's rows and draws people, so a row that PFStorer beats
    on one person only does not look like a clear win."""
    from bench_personalization import against_pfstorer, contrast_lines

    def photo(i: float | None, p: float) -> dict[str, float | None]:
        return {"id_facenet": i, "psnr": p}

    per_row = {
        "Input": [photo(10.0, 20.0)] * 4,
        "Base": [photo(50.0, 23.0), photo(50.0, 23.0), photo(52.0, 23.0), photo(None, 23.0)],
        "PFStorer": [photo(56.0, 23.2), photo(54.0, 23.2), photo(52.0, 23.2), photo(60.0, 23.2)],
        "Base + adapters, no alpha": [photo(58.0, 23.4), photo(58.0, 23.4), photo(52.0, 23.4), photo(61.0, 23.4)],
    }
    owners = [0, 0, 1, 2]
    c = against_pfstorer(per_row, owners)
    assert set(c) == {"Base", "Base + adapters, no alpha"}  # not the input, not PFStorer itself
    assert c["Base"]["paired_id_gain"] == pytest.approx(10 / 3) and c["Base"]["photos"] == 3  # unscored photo left out
    assert c["Base"]["helped"] == pytest.approx(2 / 3)
    no_alpha = c["Base + adapters, no alpha"]
    assert no_alpha["paired_id_gain"] == pytest.approx(-7 / 4) and no_alpha["helped"] == 0.0
    assert no_alpha["paired_psnr_change"] == pytest.approx(-0.2)
    lo, hi = no_alpha["id_gain_interval"]
    assert lo == pytest.approx(-3.0) and hi == pytest.approx(0.0)  # person 1 alone ties; person 0 alone loses 3
    table = "\n".join(contrast_lines(c))
    assert "| Base + adapters, no alpha | -1.75 | [-3.00, +0.00] | -0.20 |" in table
    assert contrast_lines({}) == []  # files written before the contrast
    unscored = against_pfstorer({row: [photo(None, 23.0)] for row in per_row}, [0])
    assert "| Base | — | — | — | — | 0 photos |" in contrast_lines(unscored)  # a row, not a crash
