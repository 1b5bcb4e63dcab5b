"""Validation before training: real lfw128 bench photos plus bad rows of many kinds."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pfstorer.errors import InputError, TooLargeError, UnsupportedMediaError
from pfstorer.image_checks import decode_photo
from pipelines.manifest import ManifestError, read_manifest, write_manifest
from pipelines.validate import (
    DEFAULT_LIMITS,
    ImageLimits,
    validate_manifest,
    validate_on_ray,
    write_quarantine,
)

T = "acme"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a few bytes of nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def row(identity: str, role: str, uri, tenant: str = T, **extra) -> dict:
    return {"tenant": tenant, "identity": identity, "role": role, "uri": None if uri is None else str(uri), **extra}


@pytest.fixture
def case(lfw_bench: dict[str, list[Path]], tmp_path: Path) -> dict:
    """A manifest of 4 good people + bad rows; returns rows, people and the expected quarantine."""
    from PIL import Image

    big = [n for n, p in lfw_bench.items() if len(p) >= 8]
    a, b, c, d = big[:4]
    e, f, o = [n for n in lfw_bench if n not in big[:4]][:3]
    other = lfw_bench[o]
    ph = {n: [str(p) for p in lfw_bench[n]] for n in (a, b, c, d, e, f)}

    missing = tmp_path / "missing.jpg"
    text = tmp_path / "text.jpg"
    text.write_text("this is not a photo\n")
    truncated = tmp_path / "truncated.jpg"
    data = other[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tiny)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(9000, 9000))
    copy = tmp_path / "dup" / "copy.jpg"
    copy.parent.mkdir()
    copy.write_bytes(Path(ph[c][0]).read_bytes())

    rows = []
    for n in (a, b, c, d):
        rows += [row(n, "ref", p, batch=1) for p in ph[n][:5]]
        rows.append(row(n, "restore", ph[n][5], batch=1))
    kept_dup, dropped_dup = sorted([str(copy), ph[c][0]])
    expected = {
        (T, a, "ref", str(missing)): ("read", "unreadable: file not found"),
        (T, a, "ref", str(text)): ("image", "image is text, not a supported image type (accepted: JPEG, PNG, WEBP)"),
        (T, a, "ref", str(truncated)): ("image", "image is corrupt or truncated"),
        (T, b, "ref", str(tiny)): ("image", "image is 16x16, smaller than the minimum side of 64 px"),
        (T, b, "ref", str(huge)): ("image", "image is 9000x9000 = 81,000,000 pixels, over the limit of 16,777,216 pixels"),
        (T, c, "ref", dropped_dup): ("dedup", f"duplicate: same bytes as {kept_dup}"),
        (T, d, "restore", ph[d][0]): ("dedup", f"duplicate: same photo as {ph[d][0]}"),
        (T, "../x", "ref", ph[a][6]): ("schema", "unsafe identity: '../x' is not a safe key"),
        ("a.b", a, "ref", ph[a][6]): ("schema", "unsafe tenant: 'a.b' is not a safe key"),
        (T, a, "train", ph[a][6]): ("schema", "bad role: 'train' (must be 'ref' or 'restore')"),
        (T, a, "ref", None): ("schema", "missing field: uri"),
        (T, e, "ref", ph[e][0]): ("refs", "person has 2 good references, needs >= 3"),
        (T, e, "ref", ph[e][1]): ("refs", "person has 2 good references, needs >= 3"),
        (T, e, "restore", ph[e][2]): ("refs", "person has 2 good references, needs >= 3"),
        # f: three references of which one is broken -> the broken one keeps its own reason
        (T, f, "ref", ph[f][0]): ("refs", "person has 2 good references, needs >= 3"),
        (T, f, "ref", ph[f][1]): ("refs", "person has 2 good references, needs >= 3"),
        (T, f, "ref", str(tmp_path / "f-missing.jpg")): ("read", "unreadable: file not found"),
    }
    rows.append(row(c, "ref", copy, batch=2))
    for (tenant, ident, role, uri), _ in expected.items():
        if (tenant, ident, role, uri) == (T, c, "ref", dropped_dup):
            continue  # already among the good rows
        rows.append(row(ident, role, uri, tenant=tenant, batch=2))
    good = {
        a: (ph[a][:5], ph[a][5:6]),
        b: (ph[b][:5], ph[b][5:6]),
        c: (sorted(({str(copy)} | set(ph[c][:5])) - {dropped_dup}), ph[c][5:6]),
        d: (ph[d][:5], ph[d][5:6]),
    }
    return {"rows": rows, "expected": expected, "good": good}


def quarantine_map(result) -> dict:
    return {
        (r["tenant"], r["identity"], r["role"], r["uri"]): (r["stage"], r["reason"])
        for r in result.quarantine.to_pylist()
    }


def check(result, case) -> None:
    got = quarantine_map(result)
    assert result.quarantine.num_rows == len(case["expected"])  # no row quarantined twice
    assert set(got) == set(case["expected"])
    for key, (stage, reason) in case["expected"].items():
        assert got[key] == (stage, reason), key
    # jobs: exactly the good people, their references intact
    assert [k[1] for k in result.jobs] == sorted(case["good"])
    for (tenant, ident), job in result.jobs.items():
        refs, restores = case["good"][ident]
        assert tenant == T
        assert job.ref_uris == sorted(refs)
        assert job.ref_sha256s == [sha(u) for u in sorted(refs)]
        assert [r["uri"] for r in job.restores] == sorted(restores)
        assert all(r["width"] == 128 and r["height"] == 128 for r in job.refs)
        assert job.refs[0]["batch"] == 1 or job.refs[0]["batch"] == 2  # extra columns kept
    # good + quarantine partition the manifest; extra columns survive in both
    assert result.good.num_rows + result.quarantine.num_rows == len(case["rows"])
    assert "batch" in result.quarantine.column_names and "batch" in result.good.column_names
    roles = result.good.column("role").to_pylist()
    shas = result.good.column("sha256").to_pylist()
    assert all(s is not None for s, r in zip(shas, roles) if r == "ref")
    assert all(s is None for s, r in zip(shas, roles) if r == "restore")  # judged from the header


def test_validate_quarantines_every_bad_row_with_its_reason(case):
    table = pa.Table.from_pylist(case["rows"])
    result = validate_manifest(table, limits=DEFAULT_LIMITS)
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
        decode_photo(png_header(100_000, 100_000), limits=DEFAULT_LIMITS)  # 10^10 pixels: never decoded
    with pytest.raises(TooLargeError, match="9000x9000"):
        decode_photo(png_header(9000, 9000), limits=DEFAULT_LIMITS)
    with pytest.raises(UnsupportedMediaError, match="is text"):
        decode_photo(b"plain text, named .jpg", limits=DEFAULT_LIMITS)
    data = next(iter(lfw_bench.values()))[0].read_bytes()
    assert decode_photo(data, limits=DEFAULT_LIMITS).size == (128, 128)
    with pytest.raises(InputError, match="corrupt or truncated"):
        decode_photo(data[:-700], limits=DEFAULT_LIMITS)


def test_missing_columns_raise_but_empty_table_is_fine():
    with pytest.raises(ManifestError, match="uri"):
        validate_manifest(pa.table({"tenant": ["a"], "identity": ["b"], "role": ["ref"]}))
    empty = pa.table({c: pa.array([], pa.string()) for c in ("tenant", "identity", "role", "uri")})
    result = validate_manifest(empty)
    assert result.good.num_rows == 0 and result.quarantine.num_rows == 0 and result.jobs == {}


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


# ---------------------------------------------------------------------------------------------
# on Ray Data, with the probe cache
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# a rerun touches only what changed (listing + probe cache), on local files and on S3
# ---------------------------------------------------------------------------------------------


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


def _spy_probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URIs that :func:`pipelines.probe.probe_uri` is asked about from now on."""
    import pipelines.probe as probe

    seen: list[str] = []
    real = probe.probe_uri

    def spy(uri: str, *args, **kwargs):
        seen.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(probe, "probe_uri", spy)
    return seen


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
    spec = ProbeSpec(DEFAULT_LIMITS, DEFAULT_LIMITS, opts)
    probed = probe_table(pa.Table.from_pylist(rows), spec)
    cache = ProbeCache().merged(cache_rows(probed, spec))
    first = judge(probed)
    key = first.jobs[(T, name)].job_key("b", {})

    seen = _spy_probes(monkeypatch)
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
    spec = ProbeSpec(DEFAULT_LIMITS, DEFAULT_LIMITS)
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
    spec = ProbeSpec(DEFAULT_LIMITS, DEFAULT_LIMITS)
    cache = ProbeCache().merged(cache_rows(probe_table(pa.Table.from_pylist(rows), spec), spec))
    seen = _spy_probes(monkeypatch)
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


# ---------------------------------------------------------------------------------------------
# listing in bulk: one recursive listing for many folders under one parent
# ---------------------------------------------------------------------------------------------


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
    spec = ProbeSpec(DEFAULT_LIMITS, DEFAULT_LIMITS, opts)
    first = probe_table(pa.Table.from_pylist(rows), spec)
    cache = ProbeCache().merged(cache_rows(first, spec))
    keys = {k: j.job_key("b", {}) for k, j in judge_probed(first).jobs.items()}

    seen = _spy_probes(monkeypatch)
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


# ---------------------------------------------------------------------------------------------
# judging as columns: the same result as taking each person's rows one by one
# ---------------------------------------------------------------------------------------------


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
