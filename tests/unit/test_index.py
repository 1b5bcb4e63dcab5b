"""The adapter index as a partitioned dataset: what a write costs, what a reader may see."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from registry import AdapterIndex, IndexEntry, write_bulk
from registry.index import bucket_of, delta_name


def entry(identity: str, version: int = 1, tenant: str = "acme") -> IndexEntry:
    return IndexEntry(tenant, identity, version, f"file:///{tenant}/{identity}/{version}", f"{version:064x}")


def bucket_files(url: Path, tenant: str, identity: str, buckets: int = 32) -> list[Path]:
    folder = url / f"tenant={tenant}" / f"bucket={bucket_of(identity, buckets):04d}"
    return sorted(p for p in folder.iterdir() if p.suffix in (".arrow", ".parquet"))


@pytest.mark.parametrize("people", [40, 4000])
def test_upsert_reads_nothing_and_writes_one_file_per_bucket(tmp_path: Path, people: int):
    """An upsert's cost is its batch's: the same files written, nothing read, at any index size."""
    url = tmp_path / "index.parquet"
    write_bulk(url, "acme", [entry(f"p{i}") for i in range(people)])
    index = AdapterIndex(url, compact_after=0)
    batch = [entry(f"p{i}", 2) for i in range(10)]
    index.upsert(batch)
    buckets = {bucket_of(e.identity, index.buckets) for e in batch}
    assert index.stats["files_written"] == len(buckets) <= len(batch)
    assert index.stats["files_read"] == index.stats["rows_read"] == 0
    # a lookup reads one bucket, not the index
    reader = AdapterIndex(url)
    assert reader.get("acme", "p3").version == 2
    assert reader.stats["files_read"] == 2  # the bulk file and the delta
    assert reader.stats["rows_read"] <= 10 + 3 * people // index.buckets


def test_a_writer_dying_mid_write_leaves_readers_the_old_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = tmp_path / "index.parquet"
    writer, reader = AdapterIndex(url, compact_after=0), AdapterIndex(url)
    writer.upsert([entry("bob", 1)])
    assert reader.get("acme", "bob").version == 1

    real_replace = os.replace

    def die(src: str, dst: str) -> None:  # the temp file is written; the process dies before the rename
        raise SystemExit("killed")

    monkeypatch.setattr(os, "replace", die)
    monkeypatch.setattr(os, "unlink", lambda p: None)  # a dead process cleans nothing up
    with pytest.raises(SystemExit):
        writer.upsert([entry("bob", 2)])
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.undo()
    folder = bucket_files(url, "acme", "bob")[0].parent
    tmp = [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert tmp, "the dead writer's temp file is there"
    tmp[0].write_bytes(tmp[0].read_bytes()[:20])  # and half written
    assert reader.get("acme", "bob").version == 1 and AdapterIndex(url).get("acme", "bob").version == 1
    old = time.time() - 7200
    os.utime(tmp[0], (old, old))
    writer.upsert([entry("bob", 3)])
    assert writer.compact("acme") >= 1
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # swept by compaction
    assert reader.get("acme", "bob").version == 3


def test_readers_during_writes_and_compactions_see_whole_versions(tmp_path: Path):
    """Readers racing a writer whose deltas are compacted away under them never fail and never
    see a person missing or going back."""
    url = tmp_path / "index.parquet"
    people = [f"p{i}" for i in range(12)]
    writer = AdapterIndex(url, compact_after=2)
    writer.upsert([entry(p, 1) for p in people])
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        reader, seen = AdapterIndex(url), dict.fromkeys(people, 1)
        try:
            while not stop.is_set():
                for p in people:
                    e = reader.get("acme", p)
                    assert e is not None and e.version >= seen[p], (p, e, seen[p])
                    seen[p] = e.version
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for v in range(2, 40):
        writer.upsert([entry(p, v) for p in people])
    writer.wait_background()
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert writer.stats["compactions"] > 0
    assert all(e.version == 39 for e in AdapterIndex(url).list("acme"))


def test_compaction_keeps_the_newest_and_drops_the_removed(tmp_path: Path):
    url = tmp_path / "index.parquet"
    index = AdapterIndex(url, compact_after=0)
    for v in (1, 2, 3):
        index.upsert([entry("bob", v), entry("ann", v)])
    cached = AdapterIndex(url, max_age_s=0)
    assert cached.get("acme", "bob").version == 3
    assert index.remove("acme", "ann") and not index.remove("acme", "ann")
    assert index.compact("acme") >= 1
    for who in ("bob", "ann"):
        assert len(bucket_files(url, "acme", who)) == 1
    assert cached.get("acme", "bob").version == 3  # a reader whose files were compacted away
    fresh = AdapterIndex(url)
    assert fresh.get("acme", "bob").version == 3 and fresh.get("acme", "ann") is None
    assert [e.identity for e in fresh.list("acme")] == ["bob"]
    assert fresh.stats["rows_read"] <= 2  # the tombstone is gone with the old files


def test_a_replica_sees_a_new_version_within_its_max_age(tmp_path: Path):
    url = tmp_path / "index.parquet"
    writer, replica = AdapterIndex(url), AdapterIndex(url, max_age_s=0.2)
    writer.upsert([entry("bob", 1)])
    assert replica.get("acme", "bob").version == 1
    writer.upsert([entry("bob", 2)])
    t0 = time.monotonic()
    while replica.get("acme", "bob").version != 2:
        assert time.monotonic() - t0 < 3.0, "the replica never saw the new version"
        time.sleep(0.02)
    writer.remove("acme", "bob")
    while replica.get("acme", "bob") is not None:
        assert time.monotonic() - t0 < 6.0, "the replica never saw the removal"
        time.sleep(0.02)


def test_tenants_are_isolated(tmp_path: Path):
    url = tmp_path / "index.parquet"
    index = AdapterIndex(url)
    index.upsert([entry("bob", 1, "acme"), entry("bob", 7, "globex"), entry("eve", 1, "globex")])
    assert index.get("acme", "bob").version == 1 and index.get("globex", "bob").version == 7
    assert index.get("acme", "eve") is None
    assert [e.key for e in index.list("acme")] == ["acme/bob"]
    assert index.remove("globex", "bob") and index.get("acme", "bob").version == 1
    assert index.tenants() == ["acme", "globex"]


def test_the_reader_cache_is_bounded(tmp_path: Path):
    url = tmp_path / "index.parquet"
    write_bulk(url, "acme", [entry(f"p{i}") for i in range(3200)])
    reader = AdapterIndex(url, max_rows=300)
    asked = [f"p{i}" for i in range(0, 3200, 7)]
    for who in asked:
        assert reader.get("acme", who) is not None
    cached = list(reader._cache.values())
    assert sum(b.rows for b in cached) == reader.rows_cached <= 300
    assert 1 <= sum(b.tables is not None for b in cached) <= 3  # buckets of ~100 rows held whole
    assert {i for b in cached if b.tables is None for i in b.found} <= set(asked)  # the rest: people asked
    read = reader.stats["files_read"]
    for who in asked[-5:]:  # the people asked last are answered from memory
        assert reader.get("acme", who).identity == who
    assert reader.stats["files_read"] == read


def test_a_bucket_given_up_for_room_keeps_its_people_and_sees_their_changes(tmp_path: Path):
    url = tmp_path / "index.parquet"
    write_bulk(url, "acme", [entry(f"p{i}") for i in range(3200)])  # buckets of ~100 rows
    reader = AdapterIndex(url, max_rows=150, max_age_s=0)
    ann = "p0"
    bob = next(f"p{i}" for i in range(1, 3200) if bucket_of(f"p{i}", 32) != bucket_of(ann, 32))
    assert reader.get("acme", ann).version == 1 and reader.get("acme", bob).version == 1
    held = reader._cache[("acme", bucket_of(ann, 32))]
    assert held.tables is None and set(held.found) == {ann}  # given up for bob's bucket
    read = reader.stats["files_read"]
    assert reader.get("acme", ann).version == 1 and reader.stats["files_read"] == read
    writer = AdapterIndex(url, compact_after=0)
    writer.upsert([entry(ann, 2)])
    assert reader.get("acme", ann).version == 2 and reader.stats["files_read"] == read + 1  # the new file only
    writer.remove("acme", ann)
    assert reader.get("acme", ann) is None and reader.stats["files_read"] == read + 2
    assert reader._cache[("acme", bucket_of(ann, 32))].tables is None


def test_a_cached_bucket_answers_another_person_without_reading(tmp_path: Path):
    """A replica's first lookup of a person whose bucket it holds is a dict lookup: no listing, no file."""
    url = tmp_path / "index.parquet"
    people = [f"p{i}" for i in range(400)]
    write_bulk(url, "acme", [entry(p) for p in people])
    reader = AdapterIndex(url, max_age_s=3600)
    same = bucket_of(people[0], reader.buckets)
    mates = [p for p in people[1:] if bucket_of(p, reader.buckets) == same]
    absent = next(n for n in (f"x{i}" for i in range(10_000)) if bucket_of(n, reader.buckets) == same)
    assert mates and reader.get("acme", people[0]).version == 1
    assert reader.stats["files_read"] == 1
    before = dict(reader.stats)
    for p in mates:
        e = reader.get("acme", p)
        assert (e.identity, e.version, e.uri, e.sha256) == (p, 1, entry(p).uri, entry(p).sha256)
    assert reader.get("acme", absent) is None
    assert reader.stats["files_read"] == before["files_read"] and reader.stats["lists"] == before["lists"]


def _old_parquet_delta(url: Path, rows: list[dict], ts_ns: int, columns: int = 9) -> None:
    """A delta file as earlier versions wrote it: Parquet (of the first ``columns`` columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from registry.index import DELTA_SCHEMA

    schema = pa.schema(list(DELTA_SCHEMA)[:columns])
    rows = [{k: r[k] for k in schema.names} for r in rows]
    folder = url / "tenant=acme" / f"bucket={bucket_of(rows[0]['identity'], 32):04d}"
    folder.mkdir(parents=True, exist_ok=True)
    name = delta_name(ts_ns).removesuffix(".arrow") + ".parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)


def test_old_parquet_and_new_arrow_files_resolve_newest_wins(tmp_path: Path):
    url = tmp_path / "index.parquet"
    index = AdapterIndex(url, compact_after=0)
    index.upsert([entry("seed")])  # creates the index (its meta) with 32 buckets
    old = time.time_ns() - 10**9
    _old_parquet_delta(url, [entry("bob", 1).to_row() | {"removed": False}], old)
    _old_parquet_delta(url, [entry("ann", 5).to_row()], old, columns=5)  # the required columns only
    assert AdapterIndex(url).get("acme", "bob").version == 1  # an old index keeps working
    assert AdapterIndex(url).get("acme", "ann").version == 5
    index.upsert([entry("bob", 2)])  # a newer Arrow file
    _old_parquet_delta(url, [entry("ann", 6).to_row() | {"removed": False}], time.time_ns() + 10**9)
    suffixes = {p.suffix for who in ("bob", "ann") for p in bucket_files(url, "acme", who)}
    assert suffixes == {".arrow", ".parquet"}
    fresh = AdapterIndex(url)
    assert fresh.get("acme", "bob").version == 2 and fresh.get("acme", "ann").version == 6
    assert {e.identity: e.version for e in fresh.list("acme")} == {"seed": 1, "bob": 2, "ann": 6}


def test_a_tombstone_hides_older_rows_until_compaction_drops_both(tmp_path: Path):
    url = tmp_path / "index.parquet"
    index = AdapterIndex(url, compact_after=0)
    index.upsert([entry("bob", 1)])
    _old_parquet_delta(url, [entry("bob", 2).to_row() | {"removed": False}], time.time_ns())
    reader = AdapterIndex(url, max_age_s=0)
    assert reader.get("acme", "bob").version == 2
    assert index.remove("acme", "bob")
    assert reader.get("acme", "bob") is None and index.list("acme") == []
    assert [p.suffix for p in bucket_files(url, "acme", "bob")] == [".arrow", ".parquet", ".arrow"]
    index.upsert([entry("ann", 1)])
    assert index.compact("acme") >= 1
    for who in ("bob", "ann"):  # mixed files compacted into one Arrow file
        assert [p.suffix for p in bucket_files(url, "acme", who)] == [".arrow"]
    fresh = AdapterIndex(url)
    assert fresh.get("acme", "bob") is None and fresh.get("acme", "ann").version == 1
    assert reader.get("acme", "bob") is None


def test_a_single_file_index_of_an_earlier_version_is_refused_then_imported(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from registry import INDEX_SCHEMA

    old = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist([entry("bob", 4).to_row()], schema=INDEX_SCHEMA), old)
    with pytest.raises(ValueError, match="single file"):
        AdapterIndex(old).check()
    new = AdapterIndex(tmp_path / "index.parquet")
    assert new.import_file(old) == 1 and new.get("acme", "bob").version == 4


def test_a_replica_notices_a_damaged_index_without_a_lookup_waiting(tmp_path: Path):
    url = tmp_path / "index.parquet"
    AdapterIndex(url).upsert([entry("bob")])
    replica = AdapterIndex(url, max_age_s=0.1)
    replica.check()
    assert replica.get("acme", "bob").version == 1
    (url / "_index.json").write_bytes(b"not json")
    time.sleep(0.5)  # the background re-read runs meanwhile; no lookup asked for it
    with pytest.raises(ValueError, match="unreadable"):
        replica.get("acme", "bob")
    with pytest.raises(ValueError, match="unreadable"):
        replica.check()


def test_a_fresh_lookup_sees_a_removal_the_cache_would_hide(tmp_path: Path):
    """A replica's sweep asks ``fresh``: a forgotten person must not outlive the cache's max age."""
    url = tmp_path / "index.parquet"
    writer, replica = AdapterIndex(url), AdapterIndex(url, max_age_s=3600)
    writer.upsert([entry("ann")])
    assert replica.get("acme", "ann") is not None  # cached
    writer.remove("acme", "ann")
    assert replica.get("acme", "ann") is not None  # a request-path lookup never waits: still cached
    assert replica.get("acme", "ann", fresh=True) is None
    assert replica.get("acme", "ann") is None  # and the cache now knows
