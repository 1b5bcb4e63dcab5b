"""Validation before training, in process: real lfw128 bench photos plus bad rows of many kinds."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from pfstorer.errors import InputError, TooLargeError, UnsupportedMediaError
from pfstorer.image_checks import decode_photo
from pfstorer.settings import LimitsSettings
from pipelines.manifest import ManifestError
from pipelines.validate import (
    ImageLimits,
    validate_manifest,
)

from _validate_cases import T, check, png_header, quarantine_map, row, sha, spy_probes

REFS = LimitsSettings().references()


def test_validate_quarantines_every_bad_row_with_its_reason(case):
    table = pa.Table.from_pylist(case["rows"])
    result = validate_manifest(table, limits=REFS)
    check(result, case)
    summary = result.summary()
    assert summary["people_ready"] == 4
    assert summary["good_refs"] == 20 and summary["good_restore"] == 4
    assert summary["quarantined_by_reason"]["refs: person has N good references, needs >= N"] == 5
    assert summary["quarantined_by_reason"]["dedup: duplicate"] == 2


def test_row_order_does_not_matter(case):
    base = validate_manifest(pa.Table.from_pylist(case["rows"]))
    for seed in (1, 2):
        rows = list(case["rows"])
        random.Random(seed).shuffle(rows)
        result = validate_manifest(pa.Table.from_pylist(rows))
        check(result, case)
        assert quarantine_map(result) == quarantine_map(base)
        assert {k: j.job_key("base", {"steps": 5}) for k, j in result.jobs.items()} == {
            k: j.job_key("base", {"steps": 5}) for k, j in base.jobs.items()
        }


def test_job_key_depends_on_photo_content_not_names(case, lfw_bench, tmp_path: Path):
    result = validate_manifest(pa.Table.from_pylist(case["rows"]))
    job = next(iter(result.jobs.values()))
    renamed = []
    for i, r in enumerate(job.refs):
        p = tmp_path / "renamed" / f"z{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(Path(r["uri"]).read_bytes())
        renamed.append(row(job.identity, "ref", p))
    other = validate_manifest(pa.Table.from_pylist(renamed)).jobs[(job.tenant, job.identity)]
    assert other.job_key("b", {}) == job.job_key("b", {})
    assert job.job_key("b", {}) != job.job_key("b2", {}) != job.job_key("b", {"steps": 1})


def test_too_many_refs_bytes_and_formats(lfw_bench, tmp_path: Path):
    name, photos = next((n, p) for n, p in lfw_bench.items() if len(p) >= 8)
    rows = [row(name, "ref", p) for p in photos[:5]]
    result = validate_manifest(pa.Table.from_pylist(rows), max_refs=3)
    assert result.jobs[(T, name)].ref_uris == [str(p) for p in photos[:3]]
    assert quarantine_map(result) == {
        (T, name, "ref", str(p)): ("refs", "too many references: keeping the first 3 by uri")
        for p in photos[3:5]
    }
    small = ImageLimits(max_bytes=1000, max_pixels=10**6, min_side=64, formats=frozenset({"JPEG"}))
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (80, 80)).save(png)
    result = validate_manifest(pa.Table.from_pylist(rows[:1] + [row(name, "ref", png)]), limits=small)
    got = quarantine_map(result)
    stage, reason = got[(T, name, "ref", str(photos[0]))]
    assert stage == "image" and "over the limit of 0.0 MiB" in reason  # 1000 bytes
    assert got[(T, name, "ref", str(png))] == (
        "image",
        "image is PNG, not a supported image type (accepted: JPEG)",
    )


def test_restore_limits_apply_to_restore_rows(lfw_bench, tmp_path: Path):
    from PIL import Image

    name, photos = next(iter(lfw_bench.items()))
    small = tmp_path / "small-lq.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(small)
    rows = [row(name, "ref", p) for p in photos[:3]] + [row(name, "restore", small)]
    strict = validate_manifest(pa.Table.from_pylist(rows))
    assert quarantine_map(strict)[(T, name, "restore", str(small))] == (
        "image",
        "image is 32x32, smaller than the minimum side of 64 px",
    )
    lenient = ImageLimits(max_bytes=10**7, max_pixels=10**7, min_side=8, formats=frozenset({"JPEG", "PNG"}))
    ok = validate_manifest(pa.Table.from_pylist(rows), restore_limits=lenient)
    assert ok.quarantine.num_rows == 0
    assert [r["uri"] for r in ok.jobs[(T, name)].restores] == [str(small)]


def test_photo_checks_refuse_bombs_before_decoding(lfw_bench):
    with pytest.raises(TooLargeError, match="too many pixels"):
        decode_photo(png_header(100_000, 100_000), limits=REFS)  # 10^10 pixels: never decoded
    with pytest.raises(TooLargeError, match="9000x9000"):
        decode_photo(png_header(9000, 9000), limits=REFS)
    with pytest.raises(UnsupportedMediaError, match="is text"):
        decode_photo(b"plain text, named .jpg", limits=REFS)
    data = next(iter(lfw_bench.values()))[0].read_bytes()
    assert decode_photo(data, limits=REFS).size == (128, 128)
    with pytest.raises(InputError, match="corrupt or truncated"):
        decode_photo(data[:-700], limits=REFS)


def test_missing_columns_raise_but_empty_table_is_fine():
    with pytest.raises(ManifestError, match="uri"):
        validate_manifest(pa.table({"tenant": ["a"], "identity": ["b"], "role": ["ref"]}))
    empty = pa.table({c: pa.array([], pa.string()) for c in ("tenant", "identity", "role", "uri")})
    result = validate_manifest(empty)
    assert result.good.num_rows == 0 and result.quarantine.num_rows == 0 and result.jobs == {}


def test_an_unchanged_photo_is_not_read_again(lfw_bench, tmp_path: Path):
    """Same size and mtime: the listing vouches for the photo and its bytes are not read (new
    bytes slipped in under the old mtime go unseen; that is what a version is for)."""
    import os

    from pipelines.probe import ProbeCache, ProbeSpec
    from pipelines.validate import cache_rows, probe_table

    name, photos = next((n, p) for n, p in lfw_bench.items() if len(p) >= 3)
    copies = []
    for i, p in enumerate(photos[:3]):
        copies.append(tmp_path / "photos" / f"{i}.jpg")
        copies[-1].parent.mkdir(exist_ok=True)
        copies[-1].write_bytes(p.read_bytes())
    rows = [row(name, "ref", p) for p in copies]
    spec = ProbeSpec(REFS, REFS)
    cache = ProbeCache().merged(cache_rows(probe_table(pa.Table.from_pylist(rows), spec), spec))
    st = copies[0].stat()
    copies[0].write_bytes(b"\0" * st.st_size)  # unreadable as a photo, same size ...
    os.utime(copies[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime
    again = validate_manifest(pa.Table.from_pylist(rows), cache=cache)
    assert again.quarantine.num_rows == 0
    assert again.jobs[(T, name)].ref_sha256s[0] == sha(photos[0])
    assert again.probes == {"rows": 3, "photos_read": 0, "photos_cached": 3}


def test_a_photo_the_listing_cannot_vouch_for_is_stat_not_read(lfw_bench, tmp_path, monkeypatch):
    """A bare relative path has no folder to list: one stat, and the cache still spares the read."""
    from pipelines.probe import ProbeCache, ProbeSpec
    from pipelines.validate import cache_rows, probe_table

    name, photos = next((n, p) for n, p in lfw_bench.items() if len(p) >= 3)
    monkeypatch.chdir(tmp_path)
    for i, p in enumerate(photos[:3]):
        Path(f"{i}.jpg").write_bytes(p.read_bytes())
    rows = [row(name, "ref", f"{i}.jpg") for i in range(3)]
    spec = ProbeSpec(REFS, REFS)
    cache = ProbeCache().merged(cache_rows(probe_table(pa.Table.from_pylist(rows), spec), spec))
    seen = spy_probes(monkeypatch)
    again = validate_manifest(pa.Table.from_pylist(rows), cache=cache)
    assert sorted(seen) == ["0.jpg", "1.jpg", "2.jpg"]
    assert again.probes == {"rows": 3, "photos_read": 0, "photos_cached": 3}


def test_restore_rows_are_judged_from_the_header(lfw_bench, tmp_path: Path):
    name, photos = next(iter(lfw_bench.items()))
    cut = tmp_path / "cut.jpg"
    data = photos[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # header intact, pixels missing
    rows = [row(name, "ref", p) for p in photos[1:4]] + [row(name, "restore", cut), row("other", "ref", cut)]
    result = validate_manifest(pa.Table.from_pylist(rows))
    job = result.jobs[(T, name)]
    assert [(r["uri"], r["width"], r["height"], r["sha256"]) for r in job.restores] == [(str(cut), 128, 128, None)]
    assert quarantine_map(result)[(T, "other", "ref", str(cut))] == ("image", "image is corrupt or truncated")


def test_listing_plan_lists_a_crowded_parent_once_and_scattered_folders_apart():
    from pipelines.probe import BULK_FOLDERS, listing_plan

    crowded = [f"s3://b/photos/000/p{i:03d}/{k}.jpg" for i in range(BULK_FOLDERS) for k in range(3)]
    sparse = [f"/data/few/p{i}/0.jpg" for i in range(BULK_FOLDERS - 1)]
    rest = ["s3://b/top.jpg", "s3://b/solo/x/1.jpg", "file:///d/x.jpg", "rel/x.jpg"]
    unlisted = ["file:///root.jpg", "/root.jpg", "s3://nokey", "bare.jpg", "a//b.jpg"]  # probed one by one
    plan = listing_plan(pa.array(crowded + sparse + rest + unlisted))
    assert sorted(plan) == sorted(
        [("s3://b/photos/000", True)]
        + [(f"/data/few/p{i}", False) for i in range(BULK_FOLDERS - 1)]
        + [("s3://b", False), ("s3://b/solo/x", False), ("file:///d", False), ("rel", False)]
    )
    assert listing_plan(pa.array([], pa.string())) == []


def judge_probed(probed: pa.Table, **kwargs):
    from pipelines.validate import judge

    return judge(probed, **kwargs)


def probed_rows(rows: list[dict]) -> pa.Table:
    """A :func:`probe_table`-like table from rows with ``sha`` and optional ``reason``."""
    from pipelines.probe import PROBE_SCHEMA

    names = [f"_probe_{n}" for n in PROBE_SCHEMA.names[2:]]
    table = pa.Table.from_pylist(
        [
            {"tenant": r["tenant"], "identity": r["identity"], "role": r["role"], "uri": r["uri"], "batch": i,
             "_probe_sha256": r.get("sha"), "_probe_width": 128, "_probe_height": 96,
             "_probe_stage": "image" if r.get("reason") else None, "_probe_reason": r.get("reason"),
             "_probe_size": 10, "_probe_version": "v", "_probe_cached": r.get("cached", False)}
            for i, r in enumerate(rows)
        ]
    )
    return table.cast(pa.schema([*table.schema][:5] + [pa.field(n, PROBE_SCHEMA.field(n[7:]).type) for n in names]))


def judged_one_by_one(rows: list[dict], min_refs: int, max_refs: int) -> tuple[dict, dict]:
    """The per-person stages taken row by row (the reference): ``(row -> (stage, reason),
    person -> (ref rows, restore rows))`` for the rows of :func:`probed_rows`."""
    bad = {i: ("image", r["reason"]) for i, r in enumerate(rows) if r.get("reason")}
    people: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        if i not in bad:
            people.setdefault((r["tenant"], r["identity"]), []).append(i)
    ready = {}
    for person, idxs in sorted(people.items()):
        by_uri, by_bytes, refs, restores = {}, {}, [], []
        for i in sorted(idxs, key=lambda i: (rows[i]["role"] != "ref", rows[i]["uri"], i)):
            uri, digest = rows[i]["uri"], rows[i].get("sha")
            if uri in by_uri:
                bad[i] = ("dedup", f"duplicate: same photo as {by_uri[uri]}")
            elif digest is not None and digest in by_bytes:
                bad[i] = ("dedup", f"duplicate: same bytes as {by_bytes[digest]}")
            else:
                by_uri[uri] = uri
                if digest is not None:
                    by_bytes[digest] = uri
                (refs if rows[i]["role"] == "ref" else restores).append(i)
        for i in refs[max_refs:]:
            bad[i] = ("refs", f"too many references: keeping the first {max_refs} by uri")
        refs = refs[:max_refs]
        if len(refs) < min_refs:
            bad.update({i: ("refs", f"person has {len(refs)} good references, needs >= {min_refs}") for i in refs + restores})
        else:
            ready[person] = (refs, restores)
    return bad, ready


def check_judged(rows: list[dict], min_refs: int, max_refs: int) -> None:
    result = judge_probed(probed_rows(rows), min_refs=min_refs, max_refs=max_refs)
    bad, ready = judged_one_by_one(rows, min_refs, max_refs)
    assert result.quarantine.column("batch").to_pylist() == sorted(bad)
    assert list(zip(result.quarantine.column("stage").to_pylist(), result.quarantine.column("reason").to_pylist(),
                    strict=True)) == [bad[i] for i in sorted(bad)]
    assert result.good.column("batch").to_pylist() == [i for i in range(len(rows)) if i not in bad]
    assert list(result.jobs) == list(ready)
    for person, (refs, restores) in ready.items():
        job = result.jobs[person]
        assert [r["batch"] for r in job.refs] == refs and [r["batch"] for r in job.restores] == restores
        assert job.ref_sha256s == [rows[i].get("sha") or "" for i in refs]
        assert all((r["sha256"], r["width"], r["height"]) == (rows[r["batch"]].get("sha"), 128, 96)
                   for r in job.refs + job.restores)
    assert result.probes == {"rows": len(rows), "photos_read": len(rows), "photos_cached": 0}


def test_judge_keeps_the_reference_count_boundaries():
    rows = []
    for refs, person in ((2, "two"), (3, "three"), (20, "twenty"), (21, "twenty-one")):
        rows += [{"tenant": T, "identity": person, "role": "ref", "uri": f"{person}/{k:02d}.jpg", "sha": f"{person}{k}"}
                 for k in range(refs)]
        rows.append({"tenant": T, "identity": person, "role": "restore", "uri": f"{person}/lq.jpg"})
    result = judge_probed(probed_rows(rows), min_refs=3, max_refs=20)
    assert [k[1] for k in result.jobs] == ["three", "twenty", "twenty-one"]
    assert [len(j.refs) for j in result.jobs.values()] == [3, 20, 20]
    assert quarantine_map(result) == {
        **{(T, "two", role, f"two/{name}.jpg"): ("refs", "person has 2 good references, needs >= 3")
           for role, name in (("ref", "00"), ("ref", "01"), ("restore", "lq"))},
        (T, "twenty-one", "ref", "twenty-one/20.jpg"): ("refs", "too many references: keeping the first 20 by uri"),
    }
    check_judged(rows, 3, 20)


def test_judge_takes_the_first_of_each_photo_and_each_bytes():
    rows = [
        {"tenant": T, "identity": "a", "role": "ref", "uri": u, "sha": s}
        for u, s in (("b.jpg", "s1"), ("a.jpg", "s1"), ("c.jpg", "s2"), ("c.jpg", "s2"), ("d.jpg", "s3"))
    ] + [
        {"tenant": T, "identity": "a", "role": "restore", "uri": "b.jpg"},  # its ref was a byte copy: kept
        {"tenant": T, "identity": "a", "role": "restore", "uri": "c.jpg"},  # a reference: same photo
        {"tenant": T, "identity": "a", "role": "restore", "uri": "e.jpg"},
        {"tenant": T, "identity": "a", "role": "restore", "uri": "e.jpg"},
        {"tenant": T, "identity": "b", "role": "ref", "uri": "a.jpg", "sha": "s1"},  # another person's: fine
    ]
    result = judge_probed(probed_rows(rows), min_refs=1, max_refs=20)
    assert quarantine_map(result) == {
        (T, "a", "ref", "b.jpg"): ("dedup", "duplicate: same bytes as a.jpg"),
        (T, "a", "ref", "c.jpg"): ("dedup", "duplicate: same photo as c.jpg"),
        (T, "a", "restore", "c.jpg"): ("dedup", "duplicate: same photo as c.jpg"),
        (T, "a", "restore", "e.jpg"): ("dedup", "duplicate: same photo as e.jpg"),
    }
    assert [r["uri"] for r in result.jobs[(T, "a")].restores] == ["b.jpg", "e.jpg"]
    check_judged(rows, 1, 20)


@pytest.mark.parametrize("seed", range(6))
def test_judge_equals_judging_row_by_row(seed: int):
    """Random manifests (photos shared within and across people and roles, byte copies, failed
    probes, restore photos with and without sha256), random reference bounds."""
    rng = random.Random(seed)
    probes: dict[tuple[str, str], dict] = {}  # one probe per (uri, role), as probe_table gives
    rows = []
    for _ in range(rng.randrange(50, 300)):
        role = rng.choice(["ref", "ref", "restore"])
        uri = f"{rng.choice(['x', 'y'])}/{rng.randrange(30):02d}.jpg"
        if (uri, role) not in probes:
            digest = f"s{rng.randrange(12)}" if role == "ref" or seed % 2 else None
            probes[(uri, role)] = {"sha": digest, "reason": "bad" if rng.random() < 0.1 else None}
        rows.append({"tenant": rng.choice([T, "zeta"]), "identity": f"p{rng.randrange(6)}", "role": role, "uri": uri,
                     **probes[(uri, role)]})
    check_judged(rows, rng.randrange(0, 5), rng.randrange(1, 8))
