"""The adapter index as a partitioned dataset: what a write costs, what a reader may see."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from registry import AdapterIndex, IndexEntry, write_bulk
from registry.index import bucket_of


def entry(identity: str, version: int = 1, tenant: str = "acme") -> IndexEntry:
    return IndexEntry(tenant, identity, version, f"file:///{tenant}/{identity}/{version}", f"{version:064x}")


def bucket_files(url: Path, tenant: str, identity: str, buckets: int = 32) -> list[Path]:
    folder = url / f"tenant={tenant}" / f"bucket={bucket_of(identity, buckets):04d}"
    return sorted(p for p in folder.iterdir() if p.name.endswith(".parquet"))


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
    held = [i for b in reader._cache.values() for i in b.rows]
    assert len(held) == reader._cached_rows <= 300  # the people asked about, never whole buckets
    assert set(held) <= set(asked) and asked[-1] in held


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
