"""Validation on Ray and on a real S3 API (moto server): the same verdicts as in process, and a
rerun that reads no unchanged photo.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pfstorer.settings import LimitsSettings
from pipelines.manifest import read_manifest, write_manifest
from pipelines.validate import (
    validate_manifest,
    validate_on_ray,
    write_quarantine,
)

from _validate_cases import T, check, quarantine_map, row, sha, spy_probes

REFS = LimitsSettings().references()


def test_write_quarantine_and_cli(ray_session, case, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from pipelines.cli import main

    result = validate_manifest(pa.Table.from_pylist(case["rows"]))
    q = write_quarantine(result, tmp_path / "q1.parquet")
    back = pq.read_table(q)
    assert back.num_rows == len(case["expected"])
    assert {"reason", "stage", "batch", "uri"} <= set(back.column_names)

    url = write_manifest(case["rows"], tmp_path / "m.parquet")
    rc = main(["manifest", "validate", url, "--quarantine-out", str(tmp_path / "q.parquet")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "people ready: 4" in out
    assert f"quarantined rows: {len(case['expected'])}" in out
    assert "read: unreadable" in out and "schema: bad role" in out
    assert quarantine_map(validate_manifest(read_manifest(url))) == {
        (r["tenant"], r["identity"], r["role"], r["uri"]): (r["stage"], r["reason"])
        for r in pq.read_table(tmp_path / "q.parquet").to_pylist()
    }
    assert main(["manifest", "validate", str(tmp_path / "nope.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["manifest", "validate", url, "--json"]) == 0
    assert '"people_ready": 4' in capsys.readouterr().out


@pytest.mark.integration
def test_validate_photos_and_manifest_on_s3(lfw_bench, s3_url: str, s3_storage_options: dict):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_storage_options)
    name, photos = next(iter(lfw_bench.items()))
    rows = []
    for p in photos[:4]:
        fs.pipe_file(f"{s3_url}/photos/{name}/{p.name}", p.read_bytes())
        rows.append(row(name, "ref", f"{s3_url}/photos/{name}/{p.name}"))
    rows.append(row(name, "ref", f"{s3_url}/photos/{name}/gone.jpg"))
    url = write_manifest(rows, f"{s3_url}/manifest.parquet", s3_storage_options)
    result = validate_manifest(read_manifest(url, s3_storage_options), storage_options=s3_storage_options)
    assert list(result.jobs) == [(T, name)]
    assert result.jobs[(T, name)].ref_sha256s == [sha(p) for p in photos[:4]]  # sorted by uri
    assert quarantine_map(result) == {
        (T, name, "ref", f"{s3_url}/photos/{name}/gone.jpg"): ("read", "unreadable: file not found")
    }
    # the CLI, with the endpoint as an option (credentials from the environment)
    from pipelines.cli import main

    endpoint = s3_storage_options["endpoint_url"]
    q = f"{s3_url}/quarantine.parquet"
    assert main(["manifest", "validate", url, "--s3-endpoint-url", endpoint, "--quarantine-out", q]) == 0
    reasons = read_manifest(q, s3_storage_options).column("reason").to_pylist()
    assert reasons == ["unreadable: file not found"]


def test_validate_on_ray_judges_like_local_and_a_rerun_reads_no_photo(ray_session, case, tmp_path: Path):
    url = write_manifest(case["rows"], tmp_path / "manifest", partition_by=["tenant"])  # hive
    cache = str(tmp_path / "probe-cache.parquet")
    first = validate_on_ray(url, cache_url=cache, batch_size=7)
    check(first, case)
    assert quarantine_map(first) == quarantine_map(validate_manifest(pa.Table.from_pylist(case["rows"])))
    assert first.probes["photos_cached"] == 0 and first.probes["photos_read"] > 20
    assert first.manifest.num_rows == len(case["rows"])

    again = validate_on_ray(url, cache_url=cache, batch_size=7)
    check(again, case)
    assert again.probes["photos_read"] == 0  # unchanged photos: a stat each, no read
    assert again.probes["photos_cached"] == first.probes["photos_read"]
    keys = {k: j.job_key("b", {}) for k, j in first.jobs.items()}
    assert {k: j.job_key("b", {}) for k, j in again.jobs.items()} == keys


def test_a_changed_photo_is_probed_again_and_changes_the_job_key(ray_session, lfw_bench, tmp_path: Path):
    import os

    name, photos = next((n, p) for n, p in lfw_bench.items() if len(p) >= 6)
    copies = []
    for i, p in enumerate(photos[:4]):
        dest = tmp_path / "photos" / f"{i}.jpg"
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(p.read_bytes())
        copies.append(dest)
    rows = [row(name, "ref", p) for p in copies[:3]] + [row(name, "restore", copies[3])]
    url = write_manifest(rows, tmp_path / "m.parquet")
    cache = str(tmp_path / "cache.parquet")
    key = validate_on_ray(url, cache_url=cache).jobs[(T, name)].job_key("b", {})

    st = copies[1].stat()  # touched, same bytes: probed again, same key
    os.utime(copies[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = validate_on_ray(url, cache_url=cache)
    assert touched.probes == {"rows": 4, "photos_read": 1, "photos_cached": 3}
    assert touched.jobs[(T, name)].job_key("b", {}) == key

    copies[1].write_bytes(photos[4].read_bytes())  # new bytes: a new key
    copies[3].write_bytes(b"not a photo any more")  # a cached good photo that turns bad
    changed = validate_on_ray(url, cache_url=cache)
    assert changed.probes["photos_read"] == 2
    assert changed.jobs[(T, name)].ref_sha256s[1] == sha(photos[4])
    assert changed.jobs[(T, name)].job_key("b", {}) != key
    assert quarantine_map(changed) == {
        (T, name, "restore", str(copies[3])): (
            "image", "image is text, not a supported image type (accepted: JPEG, PNG, WEBP)"
        )
    }

    copies[2].unlink()  # deleted since the last run: quarantined with its reason, every time
    for _ in range(2):
        gone = quarantine_map(validate_on_ray(url, cache_url=cache))
        assert gone[(T, name, "ref", str(copies[2]))] == ("read", "unreadable: file not found")
        assert gone[(T, name, "restore", str(copies[3]))][0] == "image"


def test_validate_on_ray_reads_s3_and_caches_by_etag(ray_session, lfw_bench, s3_url, s3_storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    name, photos = next((n, p) for n, p in lfw_bench.items() if len(p) >= 6)
    uris = [f"{s3_url}/photos/{i}.jpg" for i in range(4)]
    for uri, p in zip(uris, photos[:4]):
        fs.pipe_file(uri, p.read_bytes())
    fs.pipe_file(f"{s3_url}/photos/text.jpg", b"hello")
    rows = [row(name, "ref", u) for u in uris[:3]] + [row(name, "restore", uris[3])]
    rows.append(row(name, "ref", f"{s3_url}/photos/text.jpg"))
    rows.append(row(name, "ref", f"{s3_url}/photos/missing.jpg"))
    url = write_manifest(rows, f"{s3_url}/manifest", s3_storage_options, partition_by=["tenant"])
    cache = f"{s3_url}/state/probe-cache.parquet"
    first = validate_on_ray(url, storage_options=s3_storage_options, cache_url=cache)
    assert [r["uri"] for r in first.jobs[(T, name)].refs] == uris[:3]
    assert {(k[3], v[0]) for k, v in quarantine_map(first).items()} == {
        (f"{s3_url}/photos/text.jpg", "image"), (f"{s3_url}/photos/missing.jpg", "read"),
    }
    again = validate_on_ray(url, storage_options=s3_storage_options, cache_url=cache)
    assert again.probes["photos_read"] == 0 and again.probes["photos_cached"] == 5
    fs.pipe_file(uris[0], photos[5].read_bytes())  # a new ETag
    changed = validate_on_ray(url, storage_options=s3_storage_options, cache_url=cache)
    assert changed.probes["photos_read"] == 1
    assert changed.jobs[(T, name)].ref_sha256s[0] == sha(photos[5])


@pytest.fixture(params=["local", "file-url", "s3"])
def photo_store(request: pytest.FixtureRequest, tmp_path: Path):
    """``(base url, storage options, filesystem)`` of an empty folder on local disk (as a path
    or a ``file://`` URL) or on moto S3."""
    import fsspec

    if request.param != "s3":
        base = tmp_path / "store"
        url = base.as_uri() if request.param == "file-url" else str(base)
        return url, None, fsspec.filesystem("file", auto_mkdir=True)
    opts = request.getfixturevalue("s3_storage_options")
    return request.getfixturevalue("s3_url"), opts, fsspec.filesystem("s3", **opts)


@pytest.mark.integration
def test_a_rerun_probes_only_new_changed_or_missing_photos(photo_store, lfw_bench, monkeypatch):
    from pipelines.probe import ProbeCache, ProbeSpec
    from pipelines.validate import cache_rows, judge, probe_table

    base, opts, fs = photo_store
    name, photos = next((n, p) for n, p in lfw_bench.items() if len(p) >= 7)
    uris = [f"{base}/{name}/{i}.jpg" for i in range(6)]
    for uri, p in zip(uris, photos):
        fs.pipe_file(uri, p.read_bytes())
    text = f"{base}/bad/text.jpg"
    fs.pipe_file(text, b"not a photo")
    rows = [row(name, "ref", u) for u in uris[:4]] + [row(name, "restore", uris[4]), row(name, "ref", text)]
    rows.append(row("other", "ref", f"{base}/nowhere/gone.jpg"))  # a folder that cannot be listed
    spec = ProbeSpec(REFS, REFS, opts)
    probed = probe_table(pa.Table.from_pylist(rows), spec)
    cache = ProbeCache().merged(cache_rows(probed, spec))
    first = judge(probed)
    key = first.jobs[(T, name)].job_key("b", {})

    seen = spy_probes(monkeypatch)
    again = validate_manifest(pa.Table.from_pylist(rows), storage_options=opts, cache=cache)
    assert seen == [f"{base}/nowhere/gone.jpg"]  # a missing photo is checked again, nothing else
    assert again.jobs[(T, name)].job_key("b", {}) == key
    assert quarantine_map(again) == quarantine_map(first)  # the bad row keeps its reason from the cache
    assert quarantine_map(again)[(T, name, "ref", text)][0] == "image"

    fs.pipe_file(uris[1], photos[6].read_bytes())  # changed
    fs.rm(uris[2])  # deleted since the last run
    rows.append(row(name, "ref", uris[5]))  # new
    seen.clear()
    changed = validate_manifest(pa.Table.from_pylist(rows), storage_options=opts, cache=cache)
    assert sorted(seen) == sorted([uris[1], uris[2], uris[5], f"{base}/nowhere/gone.jpg"])
    assert changed.jobs[(T, name)].ref_uris == [uris[0], uris[1], uris[3], uris[5]]
    assert changed.jobs[(T, name)].ref_sha256s[1] == sha(photos[6])
    assert changed.jobs[(T, name)].job_key("b", {}) != key
    assert quarantine_map(changed)[(T, name, "ref", uris[2])] == ("read", "unreadable: file not found")
    assert quarantine_map(changed)[(T, name, "ref", text)] == quarantine_map(first)[(T, name, "ref", text)]


@pytest.mark.integration
def test_a_bulk_listing_finds_exactly_the_manifests_folders(photo_store, monkeypatch):
    """Folders sharing a parent: one ``find`` below it (nothing else of it listed), the same
    sizes and versions as a stat of each photo; a scattered folder: one ``ls``."""
    import pipelines.probe as probe
    from registry import url_to_fs

    base, opts, fs = photo_store
    monkeypatch.setattr(probe, "BULK_FOLDERS", 3)
    uris = [f"{base}/people/p{i}/{k}.jpg" for i in range(4) for k in range(2)] + [f"{base}/other/x/o.jpg"]
    for i, uri in enumerate(uris):
        fs.pipe_file(uri, b"x" * (i + 1))
    fs.pipe_file(f"{base}/people/zzz/unlisted.jpg", b"z")  # a folder of no manifest row
    fs.pipe_file(f"{base}/people/p0/sub/deeper.jpg", b"d")  # below a folder
    lister = url_to_fs(base, opts)[0]
    calls: list[tuple[str, str]] = []
    for name in ("find", "ls"):
        real = getattr(lister, name)
        monkeypatch.setattr(lister, name, lambda p, *a, _n=name, _r=real, **k: calls.append((_n, p)) or _r(p, *a, **k))
    asked = uris[::2] + [uris[-1]]  # some photos of each folder: the listing has their neighbours too
    listed = probe.list_versions(pa.array(asked), opts)
    [root] = [p for name, p in calls if name == "find"]
    assert root.endswith("/people")  # a local find walks below it with ls
    assert [p for name, p in calls if name == "ls" and not p.startswith(root)] == [root[:-7] + "/other/x"]
    assert sorted(listed.column("uri").to_pylist()) == sorted(uris)
    for got in listed.to_pylist():
        info = fs.info(got["uri"])
        assert (got["size"], got["version"]) == (info["size"], probe.file_version(info))


@pytest.mark.integration
def test_an_s3_listing_costs_a_call_per_1000_keys_not_one_per_folder(s3_url, s3_storage_options):
    """40 people of 2 photos under one prefix: one ListObjectsV2 call, not 40."""
    import fsspec

    from pipelines.probe import list_versions

    fs = fsspec.filesystem("s3", **s3_storage_options)
    uris = [f"{s3_url}/photos/p{i:03d}/{k}.jpg" for i in range(40) for k in range(2)]
    fs.pipe({u: b"x" for u in uris})
    calls: list[str] = []
    events = fs.s3.meta.events
    events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append("list"), unique_id="count-lists")
    try:
        listed = list_versions(pa.array(uris), s3_storage_options)
    finally:
        events.unregister("before-call.s3.ListObjectsV2", unique_id="count-lists")
    assert listed.num_rows == len(uris) and calls == ["list"]


@pytest.mark.integration
def test_a_rerun_listed_in_bulk_probes_only_the_changed_photo(photo_store, lfw_bench, monkeypatch):
    import pipelines.probe as probe
    from pipelines.probe import ProbeCache, ProbeSpec
    from pipelines.validate import cache_rows, probe_table

    base, opts, fs = photo_store
    monkeypatch.setattr(probe, "BULK_FOLDERS", 2)
    people = [(n, p) for n, p in lfw_bench.items() if len(p) >= 4][:3]
    rows = []
    for name, photos in people:
        for k, p in enumerate(photos[:3]):
            fs.pipe_file(f"{base}/people/{name}/{k}.jpg", p.read_bytes())
            rows.append(row(name, "ref", f"{base}/people/{name}/{k}.jpg"))
    spec = ProbeSpec(REFS, REFS, opts)
    first = probe_table(pa.Table.from_pylist(rows), spec)
    cache = ProbeCache().merged(cache_rows(first, spec))
    keys = {k: j.job_key("b", {}) for k, j in judge_probed(first).jobs.items()}

    seen = spy_probes(monkeypatch)
    again = validate_manifest(pa.Table.from_pylist(rows), storage_options=opts, cache=cache)
    assert seen == [] and again.probes == {"rows": 9, "photos_read": 0, "photos_cached": 9}
    assert {k: j.job_key("b", {}) for k, j in again.jobs.items()} == keys

    (changed_name, changed_photos), changed = people[1], f"{base}/people/{people[1][0]}/2.jpg"
    fs.pipe_file(changed, changed_photos[3].read_bytes())
    rerun = validate_manifest(pa.Table.from_pylist(rows), storage_options=opts, cache=cache)
    assert seen == [changed] and rerun.probes == {"rows": 9, "photos_read": 1, "photos_cached": 8}
    assert rerun.jobs[(T, changed_name)].ref_sha256s[2] == sha(changed_photos[3])
    assert {k: j.job_key("b", {}) for k, j in rerun.jobs.items() if k[1] != changed_name} == {
        k: v for k, v in keys.items() if k[1] != changed_name
    }
    assert rerun.jobs[(T, changed_name)].job_key("b", {}) != keys[(T, changed_name)]


def judge_probed(probed: pa.Table, **kwargs):
    from pipelines.validate import judge

    return judge(probed, **kwargs)
